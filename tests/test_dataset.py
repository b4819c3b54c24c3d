import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from foldtune.data.dataset import TextDataset, encode_texts, special_token_template
from foldtune.models.regressor import resolve_backbone


@pytest.fixture(scope="module")
def bert_tokenizer():
    return AutoTokenizer.from_pretrained(resolve_backbone("all-MiniLM-L6-v2"))


def test_special_tokens_of_bert_and_deberta(bert_tokenizer, tiny_deberta):
    assert special_token_template(bert_tokenizer) == ([101], [102])
    deberta = AutoTokenizer.from_pretrained(tiny_deberta)
    assert type(deberta).__name__ == "DebertaV2Tokenizer"
    assert special_token_template(deberta) == ([deberta.cls_token_id], [deberta.sep_token_id])


def test_texts_are_cut_to_max_len_keeping_the_special_tokens(bert_tokenizer):
    texts = ["one two three four five six seven eight", "short text"]
    full = bert_tokenizer(texts)["input_ids"]
    encoded = encode_texts(bert_tokenizer, texts, max_len=6)
    assert encoded.input_ids[0] == [101] + full[0][1:5] + [102]     # head kept, [SEP] put back
    assert encoded.input_ids[1] == full[1]                          # short text untouched
    assert encoded.full_lengths.tolist() == [len(full[0]), len(full[1])]
    assert encoded.lengths.tolist() == [6, len(full[1])]
    assert encoded.n_truncated == 1


def test_untruncated_encoding_equals_the_tokenizers_own(bert_tokenizer):
    texts = ["The essay argues that schools should start later.", "Hello, world!\n\nSecond paragraph."]
    assert encode_texts(bert_tokenizer, texts, max_len=512).input_ids == bert_tokenizer(texts)["input_ids"]


def test_dataset_rows_hold_ids_and_float32_targets():
    ds = TextDataset([[1, 2, 3], [4]], np.array([[1.0, 2.0], [3.0, 4.0]]))
    assert len(ds) == 2 and ds.lengths.tolist() == [3, 1]
    row = ds[1]
    assert row["input_ids"] == [4]
    assert row["labels"].dtype == torch.float32 and row["labels"].tolist() == [3.0, 4.0]
    assert "labels" not in TextDataset([[1]])[0]
    with pytest.raises(ValueError, match="2 texts but 1 target rows"):
        TextDataset([[1], [2]], np.zeros((1, 2)))


def test_cut_keeps_the_head_or_the_head_and_the_tail():
    from foldtune.data.dataset import cut

    body = list(range(20))
    assert cut(body, 8) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert cut(body, 8, "head_tail", head_fraction=0.25) == [0, 1, 14, 15, 16, 17, 18, 19]
    assert cut(body, 8, "head_tail", head_fraction=0.5) == [0, 1, 2, 3, 16, 17, 18, 19]
    assert cut(body[:5], 8, "head_tail") == [0, 1, 2, 3, 4]


def test_head_tail_truncation_keeps_the_end_of_the_text(bert_tokenizer):
    text = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    full = bert_tokenizer(text)["input_ids"]
    encoded = encode_texts(bert_tokenizer, [text], max_len=6, long_text="head_tail", head_fraction=0.5)
    assert encoded.input_ids[0] == [101, full[1], full[2], full[-3], full[-2], 102]
