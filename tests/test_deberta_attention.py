"""model.attention: flex, DeBERTa's disentangled attention as one FlexAttention call.

The fused kernel and its backward pass exist on CUDA only (tests/test_gpu.py compares
them with transformers there); on CPU FlexAttention's reference implementation runs the
same score function, which is what these tests check, in float64."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, DebertaV2Config, DebertaV2Model

from foldtune.config import ConfigError, load_config
from foldtune.models import deberta_attention
from foldtune.models.attention import use_attention
from foldtune.models.deberta_attention import use_flex
from foldtune.runtime.precision import resolve_device
from foldtune.training.checks import check_config_against_device


def _deberta(share_att_key=True, pos_att_type=("p2c", "c2p"), attention_dropout=0.0):
    # 8 buckets: distances of 4 and more fall in DeBERTa's log buckets within 40 tokens.
    config = DebertaV2Config(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=512, type_vocab_size=0,
                             position_biased_input=False, relative_attention=True, position_buckets=8,
                             pos_att_type=list(pos_att_type), norm_rel_ebd="layer_norm",
                             share_att_key=share_att_key, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=attention_dropout)
    torch.manual_seed(0)
    return DebertaV2Model(config).double().eval()


def _batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (3, 40), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    mask[2, 7:] = 0
    return ids, mask


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("share_att_key,pos_att_type,tile", [(True, ("p2c", "c2p"), 128), (False, ("p2c", "c2p"), 128),
                                                             (False, ("c2p",), 128), (True, ("p2c", "c2p"), 8)])
def test_fused_scores_equal_transformers_on_every_real_token(share_att_key, pos_att_type, tile, monkeypatch):
    # tiles of 8: five of them over the 40 tokens, rows of 40, 25 and 7 real tokens skip some
    eager = _deberta(share_att_key, pos_att_type)
    fused = copy.deepcopy(eager)
    assert use_flex(fused) == 2
    monkeypatch.setattr(deberta_attention, "FLEX_ON_CPU", True)
    monkeypatch.setattr(deberta_attention, "SPARSE_BLOCK", tile)
    ids, mask = _batch()
    with torch.no_grad():
        a = eager(input_ids=ids, attention_mask=mask).last_hidden_state
        b = fused(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert a[real].abs().max() > 0.5
    torch.testing.assert_close(b[real], a[real], atol=1e-10, rtol=0)
    # padding positions attend to the real tokens instead of uniformly: they differ, and nothing reads them
    assert not torch.allclose(b[~real], a[~real])


def test_the_block_mask_visits_the_tiles_of_real_tokens_only(monkeypatch):
    monkeypatch.setattr(deberta_attention, "SPARSE_BLOCK", 8)
    keep = torch.arange(40)[None, :] < torch.tensor([40, 25, 7, 16])[:, None]
    block_mask = deberta_attention.padding_block_mask(keep)
    tiles = block_mask.to_dense()[:, 0]                  # B x query tiles x key tiles, 1 where visited
    assert tiles.shape == (4, 5, 5)
    assert tiles[0].tolist() == [[1] * 5] * 5
    # 25 real tokens: query tiles 0-3 visit key tiles 0-3 (tile 3 holds token 24 only); tile 4 is padding
    assert tiles[1].tolist() == [[1, 1, 1, 1, 0]] * 4 + [[1, 0, 0, 0, 0]]
    assert tiles[2].tolist() == [[1, 0, 0, 0, 0]] * 5
    assert tiles[3].tolist() == [[1, 1, 0, 0, 0]] * 2 + [[1, 0, 0, 0, 0]] * 3
    # whole tiles skip the mask; the part-real tile and the padding queries' tile 0 evaluate it
    assert block_mask.full_kv_num_blocks[:, 0].tolist() == [[5] * 5, [3] * 4 + [0], [0] * 5, [2] * 2 + [0] * 3]
    assert block_mask.kv_num_blocks[:, 0].tolist() == [[0] * 5, [1] * 4 + [1], [1] * 5, [0] * 2 + [1] * 3]
    assert block_mask.kv_indices[1, 0, :, 0].tolist() == [3, 3, 3, 3, 0]
    # of the 100 tiles of a dense kernel, 54 are visited
    assert int(tiles.sum()) == 25 + 17 + 5 + 7


def test_the_block_mask_follows_padding_at_the_start_too(monkeypatch):
    monkeypatch.setattr(deberta_attention, "SPARSE_BLOCK", 8)
    keep = torch.arange(40)[None, :] >= 20                  # tokens 20-39 real: tile 2 in part, tiles 3 and 4 whole
    block_mask = deberta_attention.padding_block_mask(keep)
    assert block_mask.to_dense()[0, 0].tolist() == [[0, 0, 1, 0, 0]] * 2 + [[0, 0, 1, 1, 1]] * 3
    assert block_mask.full_kv_num_blocks[0, 0].tolist() == [0, 0, 2, 2, 2]
    assert block_mask.full_kv_indices[0, 0, 2, :2].tolist() == [3, 4]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_fused_scores_equal_transformers_with_padding_at_the_start(monkeypatch):
    eager = _deberta()
    fused = copy.deepcopy(eager)
    use_flex(fused)
    monkeypatch.setattr(deberta_attention, "FLEX_ON_CPU", True)
    monkeypatch.setattr(deberta_attention, "SPARSE_BLOCK", 8)
    ids, mask = _batch()
    mask = mask.flip(-1)                                    # rows of 15 and 33 padding tokens first
    with torch.no_grad():
        a = eager(input_ids=ids, attention_mask=mask).last_hidden_state
        b = fused(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(b[real], a[real], atol=1e-10, rtol=0)


def test_every_layer_of_a_forward_pass_shares_one_block_mask(monkeypatch):
    built = []
    monkeypatch.setattr(deberta_attention, "padding_block_mask",
                        lambda keep, build=deberta_attention.padding_block_mask: built.append(1) or build(keep))
    monkeypatch.setattr(deberta_attention, "FLEX_ON_CPU", True)
    fused = _deberta()
    use_flex(fused)
    ids, mask = _batch()
    with torch.no_grad():
        fused(input_ids=ids, attention_mask=mask)
        assert len(built) == 1                          # two layers, one mask
        fused(input_ids=ids, attention_mask=mask)
    assert len(built) == 2                              # a new forward pass builds its own


def test_off_cuda_the_swapped_modules_run_transformers_forward():
    eager = _deberta()
    fused = copy.deepcopy(eager)
    use_attention(fused, "flex")
    ids, mask = _batch()
    with torch.no_grad():
        assert torch.equal(fused(input_ids=ids, attention_mask=mask).last_hidden_state,
                           eager(input_ids=ids, attention_mask=mask).last_hidden_state)


def test_the_switch_keeps_the_checkpoint_format():
    eager = _deberta()
    fused = copy.deepcopy(eager)
    use_attention(fused, "flex")
    assert list(fused.state_dict()) == list(eager.state_dict())
    assert use_attention(_deberta(), "eager") == "eager"


def test_flex_refuses_other_backbones_and_attention_dropout():
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32))
    with pytest.raises(ValueError, match="BertModel has none; use model.attention=eager"):
        use_attention(bert, "flex")
    with pytest.raises(ValueError, match="attention_probs_dropout_prob is 0.1; set model.backbone_dropout=0.0"):
        use_attention(_deberta(attention_dropout=0.1), "flex")
    with pytest.raises(ValueError, match="must be one of auto, eager, flex, dflash"):
        use_attention(_deberta(), "sdpa")


def test_flex_on_cpu_is_refused_before_anything_loads_with_the_fallback_named():
    recipe = Path(__file__).resolve().parents[1] / "configs" / "deberta_v3_base.yaml"
    cfg = load_config(recipe, ["training.device=cpu", "model.attention=flex"])
    with pytest.raises(ConfigError, match="model.attention: flex trains on CUDA only .* set model.attention: eager"):
        check_config_against_device(cfg, resolve_device(cfg.training.device))


def test_flex_on_a_gpu_triton_cannot_compile_for_is_refused_with_the_fallback(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla P100-PCIE-16GB")
    cfg = load_config(None, ["model.attention=flex", "training.device=cuda"])
    with pytest.raises(ConfigError, match=r"Tesla P100-PCIE-16GB has \(6, 0\): set model.attention=eager "
                                          r"model.gradient_checkpointing=true"):
        check_config_against_device(cfg, torch.device("cuda", 0))


def test_the_fused_kernel_runs_where_triton_compiles_and_transformers_forward_elsewhere(monkeypatch):
    assert not deberta_attention.fused_on(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 0))     # P100
    assert not deberta_attention.fused_on(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))     # T4
    assert deberta_attention.fused_on(torch.device("cuda", 0))


def test_every_swapped_module_is_of_one_fused_class_and_a_second_switch_changes_nothing():
    model, other = _deberta(), _deberta()
    use_attention(model, "flex")
    use_attention(other, "flex")
    swapped = [m for m in [*model.modules(), *other.modules()] if "Disentangled" in type(m).__name__]
    assert len(swapped) == 4 and len({type(m) for m in swapped}) == 1
    before = copy.deepcopy(model.state_dict())
    assert use_flex(model) == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
