"""`model.attention`: which implementation computes a backbone's attention.

- eager: the model as transformers builds it (SDPA for the families that have it).
- flex: DeBERTa-v2/v3's disentangled attention as one FlexAttention kernel, ours
  (deberta_attention.py). Compiles a kernel per batch width; no attention dropout.
- dflash: the same attention in the Triton training kernels of `disentangled-flash`
  (pinned below; installed by requirements.txt, but foldtune runs without it). Its
  kernels serve families of lengths (tuned on first use, not compiled per width), apply
  attention dropout and take a third less memory than flex.
- auto: the fastest of these that this device and backbone support (choose_attention),
  chosen once when a run starts (training/checks.py: resolve_attention) and written into
  its config.yaml, so a resumed or predicted run keeps it.

Every choice keeps the checkpoint format: a run trained with one predicts with another.
Prediction with a run trained under dflash, where the package or a GPU is missing (a
Kaggle notebook on CPU), uses transformers' attention with the same weights.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from foldtune.models.deberta_attention import MIN_CAPABILITY, fused_on, use_flex

log = logging.getLogger("foldtune")

ATTENTIONS = ("auto", "eager", "flex", "dflash")
DFLASH_PACKAGE, DFLASH_PINNED = "disentangled-flash", "1.1.1"
DFLASH_HEAD_SIZES = (32, 64, 128)       # the head widths its training kernels are built for
# The kernels dflash swaps in: "triton" on CUDA. Tests set "torch" (the package's own
# PyTorch implementation of the same modules) to check the swap's wiring on a CPU.
DFLASH_BACKEND = "triton"


def _is_deberta(config) -> bool:
    return getattr(config, "model_type", None) == "deberta-v2"


def _head_size(config) -> int:
    return config.hidden_size // config.num_attention_heads


def _attention_dropout(config, backbone_dropout: float | None) -> float:
    if backbone_dropout is not None:
        return backbone_dropout
    return getattr(config, "attention_probs_dropout_prob", 0.0) or 0.0


def dflash_problem(config, device: torch.device) -> str | None:
    """Why dflash cannot train `config`'s backbone on `device` (None: it can)."""
    if not _is_deberta(config):
        return f"it computes DeBERTa-v2/v3's attention and this backbone is a {getattr(config, 'model_type', '?')}"
    head_size = _head_size(config)
    if head_size not in DFLASH_HEAD_SIZES:
        return (f"its kernels take heads of {', '.join(map(str, DFLASH_HEAD_SIZES))} dimensions, this model's "
                f"have {head_size}")
    return dflash_device_problem(device)


def dflash_device_problem(device: torch.device) -> str | None:
    """Why dflash cannot train on `device`, whatever the backbone (None: it can)."""
    try:
        import disentangled_flash  # noqa: F401
    except ImportError:
        return f"{DFLASH_PACKAGE} is not installed (pip install {DFLASH_PACKAGE}=={DFLASH_PINNED})"
    if DFLASH_BACKEND != "triton":
        return None
    if device.type != "cuda":
        return f"its Triton kernels run on CUDA, this run is on {device.type}"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    if torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        return (f"Triton needs a GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer; "
                f"{torch.cuda.get_device_name(device)} has {torch.cuda.get_device_capability(device)}")
    return None


def choose_attention(config, device: torch.device, backbone_dropout: float | None) -> tuple[str, str]:
    """What model.attention: auto means for this backbone config on this device, and why.

    DeBERTa-v2/v3: flex where Triton compiles, the heads are of a size it is measured on
    and there is no attention dropout; else dflash where it can train; else eager. Flex
    first: the two take steps at about the same speed, and on a fresh machine the 5-fold
    recipe job paid less for flex's compilation than for dflash's kernel tuning
    (docs/benchmarks.md). dflash applies attention dropout and takes less memory. Every
    other family: eager (transformers fuses its attention).
    """
    if not _is_deberta(config):
        return "eager", f"{getattr(config, 'model_type', 'this backbone')} uses transformers' own attention"
    head_size = _head_size(config)
    dropout = _attention_dropout(config, backbone_dropout)
    if fused_on(device) and head_size in DFLASH_HEAD_SIZES and dropout == 0:
        return "flex", "foldtune's FlexAttention kernel"
    why_not_flex = ("Triton does not compile for this device" if not fused_on(device)
                    else f"flex is not tried on heads of {head_size}" if head_size not in DFLASH_HEAD_SIZES
                    else f"flex has no attention dropout and the backbone's is {dropout}")
    problem = dflash_problem(config, device)
    if problem is None:
        return "dflash", f"{DFLASH_PACKAGE}'s kernels; {why_not_flex}"
    return "eager", f"{why_not_flex}; dflash cannot be used: {problem}"


def use_attention(backbone: nn.Module, attention: str, device: torch.device | None = None,
                  for_training: bool = True) -> str:
    """Switch `backbone` to model.attention `attention` (auto: chosen here for `device`,
    default the GPU when there is one); returns the implementation in place.

    A training swap that cannot happen raises ValueError naming what to set. A swap for
    prediction (for_training False) that cannot happen leaves transformers' attention.
    """
    if attention not in ATTENTIONS:
        raise ValueError(f"model.attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if attention == "auto":
        attention, _ = choose_attention(backbone.config, device, None)
    if attention == "flex":
        use_flex(backbone)
    elif attention == "dflash":
        return _use_dflash(backbone, device, for_training)
    return attention


def _use_dflash(backbone: nn.Module, device: torch.device, for_training: bool) -> str:
    problem = dflash_problem(backbone.config, device)
    if problem is not None:
        if for_training:
            raise ValueError(f"model.attention=dflash: {problem}; set model.attention=auto to take the fastest "
                             "attention this machine has")
        log.info("model.attention dflash: %s; predicting with transformers' attention (the same weights)", problem)
        return "eager"
    import disentangled_flash
    from disentangled_flash import DebertaV2OptimizedEncoder, enable_deberta_training

    if disentangled_flash.__version__ != DFLASH_PINNED:
        log.warning("model.attention dflash: %s %s is installed; foldtune is checked against %s",
                    DFLASH_PACKAGE, disentangled_flash.__version__, DFLASH_PINNED)
    if not isinstance(backbone.encoder, DebertaV2OptimizedEncoder):
        # Its new modules draw random initial weights before the old ones' are copied in:
        # from a forked generator, so that what the run draws next (the head, re-initialised
        # layers) is what it draws under any other attention.
        with torch.random.fork_rng(devices=[]):
            enable_deberta_training(backbone, backend=DFLASH_BACKEND)
    # The package keeps transformers' attention, silently, where it finds Triton unusable:
    # check that its kernels are what is in place.
    encoder = backbone.encoder
    swapped = isinstance(encoder, DebertaV2OptimizedEncoder) and encoder.backend == DFLASH_BACKEND
    if not swapped:
        raise ValueError(f"model.attention=dflash: {DFLASH_PACKAGE} left transformers' attention in place "
                         f"(its {DFLASH_BACKEND} kernels are not usable here); set model.attention=flex or eager")
    return "dflash"

