"""FoldTrainer: fit one fold, keep its best checkpoint, write its OOF predictions.

Read it top to bottom: `setup()` builds everything from the config through small
`_setup_*` methods, `train()` is the loop (from the start, or from a saved training
state), `evaluate()` scores the validation rows, `_evaluate_and_keep_best()` saves the
checkpoint that the fold's OOF predictions come from, and `state_dict()` is what
`training/state.py` writes so that a stopped fold continues exactly where it was.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_model
from torch.utils.data import DataLoader

from foldtune import __version__
from foldtune.checkpoint import WEIGHTS_FILE, checkpoint_job, load_checkpoint, read_meta
from foldtune.config import Config
from foldtune.data.collate import STATIC_PAD_MULTIPLE, LengthBucketSampler, row_collate
from foldtune.data.windows import Windows
from foldtune.data.dataset import TextDataset
from foldtune.files import BackgroundWriter, atomic_write_csv
from foldtune.losses import build_loss
from foldtune.metrics import score_report
from foldtune.models.head_gates import attach_head_gates
from foldtune.models.regressor import TextRegressor
from foldtune.optim.factory import build_optimizer
from foldtune.optim.schedulers import build_scheduler, warmup_steps
from foldtune.run_layout import OOF_FILE, FoldResult, FoldSeed, oof_frame
from foldtune.runtime.launch_lock import CUDA_LAUNCH_LOCK, to_host
from foldtune.runtime.precision import resolve_device, resolve_precision
from foldtune.runtime.predict import padded_batches, predict_batches
from foldtune.runtime.snapshot import Snapshot
from foldtune.training.averaging import build_averaging
from foldtune.training.distributed import ONE_PROCESS, DataParallel, OneProcess, current_launch
from foldtune.training.graphs import NO_GRAPHS, GraphedSteps
from foldtune.training.head_pruning import fix_and_prune
from foldtune.training.hooks import GradientAccumulation
from foldtune.training.progress import NO_PROGRESS, FoldProgress, NoProgress, RunProgress
from foldtune.training.state import capture_rng, save_state
from foldtune.training.step import TrainingStep, technique_hooks
from foldtune.training.stopping import TrainingInterrupted, stop_requested

log = logging.getLogger("foldtune")

# Validation batches with static shapes are filled up to a multiple of this many rows.
EVAL_ROWS_MULTIPLE = 32


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """One seed for every generator; optionally torch's deterministic algorithms too."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def steps_per_epoch(train_rows: int, tcfg) -> int:
    """Optimizer steps in an epoch of train_rows rows: the loader's batches (the last one
    may be short, with or without length buckets) taken gradient_accumulation_steps at a time."""
    batches = math.ceil(train_rows / tcfg.batch_size)
    return math.ceil(batches / tcfg.gradient_accumulation_steps)


@dataclass
class FoldData:
    """One fold's rows, already tokenized; valid_index are their rows in the train file."""

    fold: int
    train: TextDataset
    valid: TextDataset
    valid_ids: list[str]
    valid_index: np.ndarray
    target_columns: tuple[str, ...]
    target_range: tuple[float, float]


class FoldTrainer:
    def __init__(self, cfg: Config, data: FoldData, tokenizer, fold_dir: str | Path,
                 group: OneProcess | DataParallel = ONE_PROCESS, progress: RunProgress | None = None):
        self.cfg = cfg
        self.data = data
        self.tokenizer = tokenizer
        self.fold_dir = Path(fold_dir)
        self.best_dir = self.fold_dir / "best"
        # The processes that train this fold together (training/distributed.py); only
        # the main one writes files.
        self.group = group
        # What the fold shows while it trains (training/progress.py): its main process only,
        # as the environment asks unless the caller chose.
        if not group.is_main:
            progress = NO_PROGRESS
        self.run_progress = RunProgress.from_environment() if progress is None else progress
        self.progress: FoldProgress = NoProgress()          # the fold's own, once it trains

    @property
    def unit(self) -> FoldSeed:
        """The fold and, in a run with training.seeds, the seed this model trains with
        (training.seed: the caller sets it to one of the seeds); how logs and progress name it."""
        return FoldSeed(self.data.fold, None if self.cfg.training.seeds is None else self.cfg.training.seed)

    # --- setup ---------------------------------------------------------------------

    def setup(self) -> "FoldTrainer":
        """Build the fold: model, data, optimizer and the rest of what training needs.

        The global generators are seeded here, so builds must not overlap (the caller
        serialises them). The model is loaded on the CPU outside the CUDA launch lock: folds
        already training in other threads go on launching their steps meanwhile (it took
        ~0.2 s of a MiniLM fold). What touches the device takes the launch lock.
        """
        self.fold_dir.mkdir(parents=True, exist_ok=True)
        self._setup_logging()
        self.device = current_launch().local_device(resolve_device(self.cfg.training.device))
        seed_everything(self.cfg.training.seed, self.cfg.training.deterministic)
        mcfg = self.cfg.model
        means = self.data.train.targets.mean(dim=0).numpy() if mcfg.init_head_bias else None
        self.model = TextRegressor.from_pretrained(mcfg, len(self.data.target_columns), means, self.device)
        attach_head_gates(self.model, self.cfg.pruning.heads)     # pruning.heads: before the optimizer
        self._setup_data()
        with CUDA_LAUNCH_LOCK:
            self._setup_on_device()
        return self

    def _setup_on_device(self) -> None:
        self._model_to_device()
        self._setup_optimizer()
        self.group.reseed_dropout(self.cfg.training.seed)
        self.precision = resolve_precision(self.cfg.training.precision, self.device)
        self.loss_fn = build_loss(self.cfg.training, len(self.data.target_columns)).to(self.device)
        self.averaging = build_averaging(self.model, self.optimizer, self.cfg.averaging, self.steps_per_epoch)
        tcfg = self.cfg.training
        self.accumulation = GradientAccumulation(tcfg.gradient_accumulation_steps, len(self.train_loader))
        # The step and the techniques around it (training/step.py, training/hooks.py); the
        # training loss is summed on the device and read only when the progress shows it
        # (a read is a host sync).
        hooks = technique_hooks(self.cfg, self.model, self.optimizer, self.scheduler, self.precision, self.averaging)
        self.training_step = TrainingStep(self.train_model, self.loss_fn, self.optimizer, self.precision, hooks,
                                          self.device, self.group.world_size)
        self.step = 0
        self.best_score = math.inf
        self.best_step = -1
        self.best_oof: np.ndarray | None = None
        self.best_per_target: dict[str, float] = {}
        self.metrics_rows: list[dict] = []
        self.loss_count = 0
        self.seconds_before = 0.0           # training time of earlier sessions of this fold
        # A data-parallel step must average its gradients over the processes, which a replay
        # of the model's own step would not: there every step runs eagerly.
        graphed = tcfg.cuda_graphs and self.group.world_size == 1
        self.graphs = GraphedSteps(self.training_step, tcfg.batch_size, windows=self.windows) if graphed else NO_GRAPHS
        # Checkpoints and training states are written in a thread while training goes on.
        self.writer = BackgroundWriter()
        self._valid_batches: list | None = None

    def _setup_logging(self) -> None:
        if not self.group.is_main:          # one fold log, written by the main process
            self._log_handler = logging.NullHandler()
            return
        self._log_handler = logging.FileHandler(self.fold_dir / "train.log", mode="a", encoding="utf-8")
        # Folds trained side by side in threads share the logger: keep this fold's thread
        # and its writer's lines only.
        own = threading.current_thread().name
        self._log_handler.addFilter(lambda record: record.threadName in (own, own + BackgroundWriter.SUFFIX))
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(self._log_handler)

    def _model_to_device(self) -> None:
        self.model.to(self.device)
        if self.cfg.training.compile:
            # In place: the module (and its state_dict's names) stays the same object.
            self.model.compile()
        # What the training steps call: the model itself, or its DistributedDataParallel
        # wrapper, which averages the gradients over the processes.
        self.train_model = self.group.wrap(self.model)

    def _setup_data(self) -> None:
        tcfg = self.cfg.training
        static = tcfg.compile or tcfg.cuda_graphs or self.model.attention == "flex"
        self.pad_multiple = tcfg.pad_to_multiple_of or (STATIC_PAD_MULTIPLE if static else 1)
        # data.long_text windows: batches of the texts' windows (data/windows.py); None: a row a text
        self.windows = Windows.of(self.tokenizer, self.cfg.data)
        collate = row_collate(self.data.train, self.tokenizer.pad_token_id, self.pad_multiple, self.windows)
        rows = range(len(self.data.train))      # the loader hands row numbers to the collate
        # The data order's own generator: saved with the state, so a resumed epoch
        # replays the same order and skips the batches already seen.
        self.generator = generator = torch.Generator().manual_seed(tcfg.seed)
        # The loader draws its workers' base seed from `generator` too, not from torch's
        # global generator, whose state (dropout) must not depend on where an epoch began.
        common = dict(collate_fn=collate, num_workers=tcfg.num_workers, pin_memory=False,
                      generator=generator)
        if tcfg.bucket_batches:
            sampler = LengthBucketSampler(self.data.train.lengths, tcfg.batch_size, generator)
            self.train_loader = DataLoader(rows, batch_sampler=sampler, **common)
        else:
            self.train_loader = DataLoader(rows, batch_size=tcfg.batch_size, shuffle=True, **common)

    def _setup_optimizer(self) -> None:
        tcfg = self.cfg.training
        self.steps_per_epoch = steps_per_epoch(len(self.data.train), tcfg)
        self.total_steps = self.steps_per_epoch * tcfg.epochs
        self.warmup_steps = warmup_steps(self.total_steps, tcfg.warmup_ratio, tcfg.warmup_steps)
        self.optimizer = build_optimizer(self.model, tcfg, self.device)
        self.scheduler = build_scheduler(self.optimizer, tcfg.scheduler, self.total_steps, self.warmup_steps)

    # --- training ------------------------------------------------------------------

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def train(self, state: dict | None = None, on_running: Callable[[], None] | None = None) -> FoldResult:
        """Train the fold, from the start or from a training state; return its result.

        on_running is called once, after this session's first two steps (with CUDA graphs:
        the eager one and the first replay, its graph captured), or when training ends
        before them.
        """
        tcfg = self.cfg.training
        fold, unit = self.data.fold, self.unit
        start_epoch, position = self.load_state_dict(state) if state else (0, 0)
        self.graphs.prepare()
        log.info("fold %s: %d train / %d valid rows, %d steps (%d warmup), device %s, precision %s%s%s",
                 unit, len(self.data.train), len(self.data.valid), self.total_steps, self.warmup_steps,
                 self.device, self.precision.name, self.group.describe(),
                 f"; resumed at step {self.step}" if state else "")
        started = time.perf_counter()
        running_at = self.step + 2
        self.progress = self.run_progress.fold(unit, self.total_steps, self.step)
        try:
            for epoch in range(start_epoch, tcfg.epochs):
                epoch_start_order = self.generator.get_state()
                self.model.train()
                self.training_step.start_epoch(epoch)
                self._choose_best_from_pruned(epoch)
                for i, batch in enumerate(self.train_loader):
                    if i < position:            # seen before the stop: same order, skipped
                        continue
                    with CUDA_LAUNCH_LOCK:
                        self._train_batch(batch, epoch, i, epoch_start_order, started)
                    if on_running is not None and self.step >= running_at:
                        on_running, call = None, on_running
                        call()
                    if i + 1 == len(self.train_loader):
                        # The epoch end evaluates and saves below. Left here, not run out: the
                        # loader's sampler would draw one more order from the data generator.
                        break
                position = 0
                last = epoch + 1 == tcfg.epochs
                with CUDA_LAUNCH_LOCK:
                    self._evaluate_and_keep_best(epoch + 1.0, self._take_train_loss())
                    # The next epoch's order is drawn from the generator as it is now. After
                    # the last epoch the fold's result is written next, and no state is needed.
                    if not last:
                        self._save_state(epoch + 1, 0, self.generator.get_state(), started)
                stop = not last and self.group.agree_on_stop(stop_requested())
                if stop:
                    raise TrainingInterrupted(stop)
            self.writer.wait()
            with CUDA_LAUNCH_LOCK:
                self._prune_best_heads()
            seconds = self.seconds_before + time.perf_counter() - started
            self._write_oof()
            self.progress.close()               # the bar's last state above the fold's result
            log.info("fold %s: best MCRMSE %.4f at step %d (%.0f s)", unit, self.best_score, self.best_step, seconds)
        finally:
            if on_running is not None:
                on_running()
            self.progress.close()               # again: closing twice does nothing
            self.writer.wait()                  # a stop too: its state must be on disk
            log.removeHandler(self._log_handler)
            self._log_handler.close()
        return FoldResult(fold, self.best_score, self.best_per_target, self.best_step, self.best_oof,
                          self.data.valid_index, self.best_dir, seconds)

    def _train_batch(self, batch: dict, epoch: int, i: int, epoch_start_order: torch.Tensor, started: float) -> None:
        """Micro-batch i of the epoch: step, and evaluate, save or stop when it is time
        (at the epoch's last batch the caller does those)."""
        tcfg = self.cfg.training
        n_batches = len(self.train_loader)
        # Data-parallel: this process's rows of the global batch, and their share of it.
        batch, batch_fraction = self.group.shard(batch, self.pad_multiple)
        if self.device.type == "cuda":
            # pinned here rather than by the loader: with folds in threads, while this one holds the launch lock
            batch = {key: value.pin_memory() for key, value in batch.items()}
        if self.graphs.run(batch):
            self.loss_count += 1
            self._count_step()
        else:
            self.graphs.before_eager_step()
            batch = self._to_device(batch)
            last_of_group = self.accumulation.ends_group(i)
            step = self.training_step
            with self.group.sync_gradients(self.train_model, last_of_group):
                step.count_loss(step.forward_backward(batch, batch_fraction, self.accumulation.group_size(i)))
            self.loss_count += 1
            if not last_of_group:
                return
            self._optimizer_step()
        self.progress.step(self.step, self._shown_loss_and_lr)
        if i + 1 == n_batches:
            return
        if tcfg.eval_steps and epoch >= tcfg.eval_steps_from_epoch and self.step % tcfg.eval_steps == 0:
            self._evaluate_and_keep_best(epoch + (i + 1) / n_batches, self._take_train_loss())
        stop = self.group.agree_on_stop(stop_requested())
        if stop or (tcfg.save_state_steps and self.step % tcfg.save_state_steps == 0):
            self._save_state(epoch, i + 1, epoch_start_order, started)
        if stop:
            raise TrainingInterrupted(stop)

    def _shown_loss_and_lr(self) -> tuple[float, float]:
        """The mean training loss since the last evaluation and the learning rate, for the
        progress display. Read by the main process alone (no exchange with the others): data-
        parallel, its rows' loss weighed by their share of the batch, times the processes,
        estimates the batch's."""
        loss = to_host(self.training_step.loss_sum).item() * self.group.world_size / max(self.loss_count, 1)
        return loss, self._backbone_lr()

    def _take_train_loss(self) -> float:
        """Mean training loss since the last evaluation (and reset the running sum)."""
        total = to_host(self.group.sum(self.training_step.take_loss()))
        loss = total.item() / max(self.loss_count, 1)
        self.loss_count = 0
        return loss

    def _optimizer_step(self) -> None:
        self.training_step.update()
        self.training_step.clear_gradients()
        self._count_step()

    def _count_step(self) -> None:
        self.step += 1
        # The hooks' part after the step: the schedule, the average.
        self.training_step.after_optimizer_step(self.step)

    # --- training state -------------------------------------------------------------

    def state_dict(self, epoch: int, position: int, epoch_start_order: torch.Tensor, seconds: float) -> dict:
        """Everything needed to continue at micro-batch `position` of `epoch` (0-based)."""
        return {
            "fold": self.data.fold, "epoch": epoch, "position": position, "step": self.step,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.precision.scaler.state_dict(),
            "averaging": self.averaging.state_dict(), "rng": capture_rng(), "data_order": epoch_start_order,
            "best": {"score": self.best_score, "step": self.best_step, "per_target": self.best_per_target,
                     "oof": None if self.best_oof is None else torch.from_numpy(self.best_oof)},
            "metrics_rows": self.metrics_rows, "loss_sum": to_host(self.group.sum(self.training_step.loss_sum)).item(),
            "loss_count": self.loss_count,
            "seconds": seconds,
        }

    def load_state_dict(self, state: dict) -> tuple[int, int]:
        """Restore a saved state; return the epoch and micro-batch to continue from."""
        self.model.load_state_dict(state["model"])
        self.averaging.load_state_dict(state["averaging"])       # before the optimizer: see averaging.py
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:   # a state of a graphed run holds tensor rates
            if torch.is_tensor(group["lr"]):
                group["lr"] = float(group["lr"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.precision.scaler.load_state_dict(state["scaler"])
        self.group.restore_rng(state, self.cfg.training.seed)
        self.generator.set_state(state["data_order"])
        best = state["best"]
        self.best_score, self.best_step, self.best_per_target = best["score"], best["step"], best["per_target"]
        self.best_oof = None if best["oof"] is None else best["oof"].cpu().numpy()
        self.metrics_rows = list(state["metrics_rows"])
        self.training_step.restore_loss(state["loss_sum"] if self.group.is_main else 0.0)   # summed over processes
        self.loss_count = state["loss_count"]
        self.step = state["step"]
        self.seconds_before = state["seconds"]
        return state["epoch"], state["position"]

    def _save_state(self, epoch: int, position: int, epoch_start_order: torch.Tensor, started: float) -> None:
        seconds = self.seconds_before + time.perf_counter() - started
        state = self.state_dict(epoch, position, epoch_start_order, seconds)
        rngs = self.group.gather(state["rng"])      # every process's generators: dropout differs
        if not self.group.is_main:
            return
        if len(rngs) > 1:
            state["rng_by_rank"] = rngs
        snapshot = Snapshot(state)          # the copies from the GPU finish while training goes on
        fold_dir, keep, fold, step = self.fold_dir, self.cfg.training.keep_states, self.unit, self.step

        def write() -> None:
            path = save_state(fold_dir, snapshot.value(), keep=keep)
            log.info("fold %s: training state saved at step %d (%s)", fold, step, path.name)

        self._submit(write)

    def _submit(self, job) -> None:
        """Give a write to the background writer, outside the launch lock: submitting waits for an
        earlier write when two are still unfinished, and the other folds go on launching."""
        with CUDA_LAUNCH_LOCK.released():
            self.writer.submit(job)

    # --- evaluation and the best checkpoint ------------------------------------------

    def evaluate(self, model: torch.nn.Module | None = None) -> tuple[dict, np.ndarray]:
        """Score `model` (default: the one being trained) on the fold's validation rows."""
        model = self.model if model is None else model
        rows = self.group.rows(len(self.data.valid))     # data-parallel: this process's share
        if self._valid_batches is None:     # padded and on the device once, for every evaluation
            valid = self.data.valid if rows is None else self.data.valid.subset(rows)
            # With static shapes (CUDA graphs, compile, flex) the folds' batches get the same shapes too.
            self._valid_batches = list(padded_batches(valid, self.cfg.training.eval_batch_size,
                                                      self.tokenizer.pad_token_id, self.device, self.pad_multiple,
                                                      EVAL_ROWS_MULTIPLE if self.pad_multiple > 1 else 1,
                                                      self.windows))
            self._valid_rows = len(valid)
        preds = (predict_batches(model, self._valid_batches, self._valid_rows, self.precision)
                 if self._valid_rows else np.empty((0, len(self.data.target_columns)), dtype=np.float32))
        preds = self.group.gather_rows(rows, preds, len(self.data.valid))
        self.model.train()
        with CUDA_LAUNCH_LOCK.released():
            report = score_report(self.data.valid.targets.numpy(), preds, self.data.target_columns)
        return report, preds

    def _evaluate_and_keep_best(self, epoch: float, train_loss: float) -> None:
        self.progress.doing(f"evaluating step {self.step} on {len(self.data.valid)} rows")
        candidates = [("trained", self.model, *self.evaluate())]
        averaged = self.averaging.averaged
        if averaged is not None:
            candidates.append(("averaged", averaged, *self.evaluate(averaged)))
        kind, model, report, preds = min(candidates, key=lambda c: c[2]["mcrmse"])
        improved = report["mcrmse"] < self.best_score
        if improved:
            self.best_score, self.best_step = report["mcrmse"], self.step
            self.best_per_target = report["per_target"]
            self.best_oof = preds
            self.save_checkpoint(model, averaged=kind == "averaged")
        lr = self._backbone_lr()
        # Files and logs are written outside the launch lock: the other folds go on launching meanwhile.
        with CUDA_LAUNCH_LOCK.released():
            self._record_evaluation(epoch, train_loss, lr, candidates, kind if improved else "")

    def _backbone_lr(self) -> float:
        """The backbone's top learning rate: training.lr as the schedule has it now."""
        lrs = [g["lr"] for g in self.optimizer.param_groups if not g["name"].startswith("head")]
        if not lrs:
            return 0.0
        if torch.is_tensor(lrs[0]):         # on the device (CUDA graphs): one read for all of them
            return float(to_host(torch.stack(lrs)).max())
        return max(float(lr) for lr in lrs)

    def _record_evaluation(self, epoch: float, train_loss: float, lr: float, candidates: list, best: str) -> None:
        """An evaluation's row in metrics.csv and its line in the log."""
        trained = candidates[0][2]
        row = {"step": self.step, "epoch": round(epoch, 4), "lr": lr, "train_loss": train_loss,
               "val_mcrmse": trained["mcrmse"]}
        row.update({f"val_{name}": value for name, value in trained["per_target"].items()})
        if self.cfg.averaging.method != "none":
            row["averaged_val_mcrmse"] = candidates[1][2]["mcrmse"] if len(candidates) > 1 else float("nan")
        row["best"] = best
        self.metrics_rows.append(row)
        if self.group.is_main:
            atomic_write_csv(self.fold_dir / "metrics.csv", pd.DataFrame(self.metrics_rows))
        extra = f", averaged {candidates[1][2]['mcrmse']:.4f}" if len(candidates) > 1 else ""
        log.info("fold %s step %d epoch %.2f: train loss %.4f, valid MCRMSE %.4f%s%s", self.unit, self.step,
                 epoch, train_loss, trained["mcrmse"], extra, f" (best: {best})" if best else "")

    def save_checkpoint(self, model: torch.nn.Module, averaged: bool = False, head_gates: dict | None = None) -> None:
        """Copy the weights now and write the best checkpoint folder in the background;
        head_gates: what pruning.heads did to the model (foldtune.json's "head_gates")."""
        if not self.group.is_main:
            return
        meta = {
            "fold": self.data.fold,
            "step": self.best_step,
            "val_mcrmse": self.best_score,
            "val_per_target": self.best_per_target,
            "averaged_weights": averaged,
            "target_columns": list(self.data.target_columns),
            "target_range": list(self.data.target_range),
            "pooling": self.cfg.model.pooling,
            "backbone": self.cfg.model.name,
            "max_len": self.cfg.data.max_len,
            "foldtune_version": __version__,
        }
        if self.unit.seed is not None:
            meta["seed"] = self.unit.seed
        if head_gates is not None:
            meta["head_gates"] = head_gates
        self.progress.doing(f"saving the checkpoint of step {self.best_step}")
        job = checkpoint_job(self.best_dir, model, self.tokenizer, self.cfg, meta)
        fold, step = self.unit, self.best_step

        def write() -> None:
            folder = job()
            # said once the folder is written: a write that fails ends the run instead
            log.info("fold %s: checkpoint of step %d saved to %s", fold, step, folder)

        self._submit(write)

    def _choose_best_from_pruned(self, epoch: int) -> None:
        """pruning.heads.fix_epoch: from the epoch whose gates are fixed, the best checkpoint
        is the pruned model's; one chosen before it (a step of gates still learning, or all
        heads open) is forgotten, and the next evaluation replaces it. One chosen since (a
        resume, a later epoch) stays."""
        gates = getattr(self.model, "head_gates", None)
        if gates is None or gates.mode != "fixed":
            return
        fixed_from = (self.cfg.pruning.heads.fix_epoch - 1) * self.steps_per_epoch    # the last step before
        if not 0 <= self.best_step <= fixed_from:
            return
        log.info("fold %s: epoch %d trains %d of %d attention heads, the gates fixed; the best checkpoint "
                 "(MCRMSE %.4f at step %d) is chosen again from here", self.unit, epoch + 1,
                 int(gates.mask.sum().item()), gates.mask.numel(), self.best_score, self.best_step)
        self.best_score, self.best_step = math.inf, -1

    def _prune_best_heads(self) -> None:
        """pruning.heads: the best checkpoint's weights with their gates fixed to 0/1 and the
        closed heads removed, scored again and saved in its place. The fold's score and OOF
        become that model's: it is the one inference loads, and fixing a gate of 0.7 to 1
        changes its predictions."""
        if getattr(self.model, "head_gates", None) is None or self.best_step < 0:
            return
        if "head_gates" in read_meta(self.best_dir):
            # Pruned before a stop that came ahead of the fold's result, and no step trained
            # since beat it: that model is the fold's. Scored again for the OOF.
            pruned, _ = load_checkpoint(self.best_dir, self.device)
            report, preds = self.evaluate(pruned)
            self.best_score, self.best_per_target, self.best_oof = report["mcrmse"], report["per_target"], preds
            with CUDA_LAUNCH_LOCK.released():
                log.info("fold %s: the best checkpoint's heads were pruned before the stop; valid MCRMSE %.4f",
                         self.unit, self.best_score)
            return
        self.progress.doing("pruning the attention heads of the best checkpoint")
        load_model(self.model, str(self.best_dir / WEIGHTS_FILE), device=str(self.device))
        done = fix_and_prune(self.model, self.cfg.pruning.heads)
        self.model.to(self.device)
        gated = self.best_score
        report, preds = self.evaluate()
        self.best_score, self.best_per_target, self.best_oof = report["mcrmse"], report["per_target"], preds
        self.save_checkpoint(self.model, head_gates={**done, "val_mcrmse_gated": gated})
        self.writer.wait()
        with CUDA_LAUNCH_LOCK.released():
            log.info("fold %s: %d of %d attention heads kept; valid MCRMSE %.4f gated, %.4f pruned", self.unit,
                     done["kept"], done["of"], gated, self.best_score)
            self._record_evaluation(float(self.cfg.training.epochs), float("nan"), self._backbone_lr(),
                                    [("pruned", self.model, report, preds)], "pruned")

    def _write_oof(self) -> None:
        if not self.group.is_main:
            return
        atomic_write_csv(self.fold_dir / OOF_FILE, oof_frame(self.data.valid_ids, self.data.fold, self.best_oof,
                                                             self.data.target_columns, self.cfg.data.id_column))
