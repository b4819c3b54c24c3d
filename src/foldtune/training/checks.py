"""Everything a run's config must agree with, checked once before anything starts.

A mistake fails here, in one line naming the setting and the fix, before a run folder
is made, a model loaded or an essay read: never after an hour of training. Every entry
that trains (a new run, a resume, a launched process, a distillation) passes here
through cross_validation.load_inputs. The checks of one section alone live in config.py.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from foldtune.config import Config, ConfigError
from foldtune.losses import LOSSES
from foldtune.models.attention import choose_attention, dflash_device_problem
from foldtune.models.deberta_attention import fused_on
from foldtune.models.pooling import POOLINGS
from foldtune.data.collate import STATIC_PAD_MULTIPLE
from foldtune.data.windows import Windows
from foldtune.models.regressor import check_backbone, load_backbone_config, load_tokenizer, resolve_backbone
from foldtune.optim.factory import check_optimizer
from foldtune.runtime.precision import resolve_precision
from foldtune.training.distributed import check_launch
from foldtune.training.progress import progress_settings
from foldtune.training.step import check_techniques

log = logging.getLogger("foldtune")


def check_run(cfg: Config, device: torch.device, world_size: int, fold_parallel: bool) -> None:
    """The config against the device it trains on and the launch (world_size processes,
    each training its own folds when fold_parallel)."""
    check_config_against_device(cfg, device)
    if cfg.model.type == "transformer":
        check_backbone(cfg.model.name)
        if cfg.data.long_text == "windows":     # the stride against the room the tokenizer's special tokens leave
            Windows.of(load_tokenizer(cfg.model.name), cfg.data)
    check_launch(cfg, world_size, fold_parallel)
    check_seeds(cfg, world_size)
    progress_settings()         # a FOLDTUNE_PROGRESS that means nothing fails now, not at the first fold


def check_seeds(cfg: Config, world_size: int) -> None:
    """training.seeds trains a transformer's folds once per seed, in one process."""
    if cfg.training.seeds is None:
        return
    if cfg.model.type != "transformer":
        raise ConfigError(f"training.seeds: model.type {cfg.model.type} fits the same model whatever the seed: "
                          "set training.seeds: null")
    if cfg.distill.teacher is not None:
        raise ConfigError("training.seeds: a distillation run trains one student: set training.seeds: null")
    if world_size > 1:
        raise ConfigError(f"training.seeds: not under a launch of {world_size} processes yet: run it as plain "
                          "python train.py (training.parallel_folds trains seeds side by side), or set "
                          "training.seeds: null")


def check_config_against_device(cfg: Config, device: torch.device) -> None:
    """Every name the config picks from a registry exists, and what it asks of the device
    (attention kernel, optimizer, precision, CUDA graphs) this device can do."""
    # The techniques' own checks, and those a CUDA graph cannot capture (their hooks' declarations).
    check_techniques(cfg)
    POOLINGS.get(cfg.model.pooling)
    LOSSES.get(cfg.training.loss)
    if cfg.model.attention == "flex" and device.type != "cuda":
        raise ConfigError(f"model.attention: flex trains on CUDA only (FlexAttention has no backward pass on "
                          f"{device.type}): set model.attention: eager")
    if cfg.model.attention == "flex" and not fused_on(device):
        raise ConfigError(f"model.attention: flex compiles a Triton kernel, which needs a GPU of compute "
                          f"capability 7.0 or newer; {torch.cuda.get_device_name(device)} has "
                          f"{torch.cuda.get_device_capability(device)}: set model.attention=eager "
                          f"model.gradient_checkpointing=true")
    if cfg.model.attention == "dflash":
        problem = dflash_device_problem(device)
        if problem is not None:
            raise ConfigError(f"model.attention: dflash cannot train here: {problem}; set model.attention: auto "
                              "(the fastest attention this machine has)")
    check_optimizer(cfg.training, device)
    precision = resolve_precision(cfg.training.precision, device)
    if cfg.training.cuda_graphs and device.type != "cuda":
        raise ConfigError(f"training.cuda_graphs: true needs a CUDA device; this run is on {device.type}: "
                          "set training.cuda_graphs: false")
    if cfg.training.cuda_graphs and precision.name == "fp16":
        raise ConfigError("training.cuda_graphs: true cannot train in fp16 (its grad scaler checks on the host): "
                          "this GPU has no bf16, so set training.precision: fp32 or training.cuda_graphs: false")
    if cfg.training.target_weights is not None and len(cfg.training.target_weights) != len(cfg.data.target_columns):
        raise ConfigError(f"training.target_weights has {len(cfg.training.target_weights)} values for "
                          f"{len(cfg.data.target_columns)} targets ({', '.join(cfg.data.target_columns)})")


def resolve_attention(cfg: Config, device: torch.device) -> Config:
    """`cfg` with model.attention auto replaced by this device's choice (choose_attention),
    logged with the reason; any other value unchanged. Called as a run starts, before its
    config.yaml is written. training.pad_to_multiple_of is checked against the attention then in place."""
    if cfg.model.attention == "auto" and cfg.model.type == "transformer":
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention=_auto_attention(cfg, device)))
    check_pad_multiple(cfg)
    return cfg


def _auto_attention(cfg: Config, device: torch.device) -> str:
    """What model.attention auto takes for cfg on `device`, logged with the reason."""
    config = load_backbone_config(resolve_backbone(cfg.model.name))
    choice, why = choose_attention(config, device, cfg.model.backbone_dropout)
    if choice == "dflash" and cfg.pruning.heads.enabled:
        choice, why = "eager", "pruning.heads: dflash's encoder bypasses the gated output projection"
    if choice == "dflash" and cfg.training.cuda_graphs:
        choice, why = "eager", f"training.cuda_graphs: true does not capture dflash's kernels ({why})"
    log.info("model.attention auto: %s (%s)", choice, why)
    return choice


def check_pad_multiple(cfg: Config) -> None:
    """training.pad_to_multiple_of against the attention in place: flex's kernels take
    widths in whole tiles of 64."""
    multiple = cfg.training.pad_to_multiple_of
    if cfg.model.attention == "flex" and multiple is not None and multiple % STATIC_PAD_MULTIPLE:
        raise ConfigError(f"training.pad_to_multiple_of: {multiple} with model.attention flex, whose kernels take "
                          f"widths in whole tiles of {STATIC_PAD_MULTIPLE}: set a multiple of {STATIC_PAD_MULTIPLE} "
                          "(e.g. 128 or 256) or null")
