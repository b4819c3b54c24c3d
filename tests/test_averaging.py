"""SWA and EMA: the average equals the mean (or the EMA recurrence) of recorded snapshots."""

import pytest
import torch
from torch import nn

from foldtune.config import AveragingConfig
from foldtune.optim.schedulers import build_scheduler
from foldtune.training.averaging import AveragingHook, NoAveraging, WeightAveraging, build_averaging
from foldtune.training.hooks import LearningRateSchedule


def _train(cfg: AveragingConfig, steps: int, steps_per_epoch: int):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = build_scheduler(opt, "constant", total_steps=steps, warmup_steps=0)
    averaging = build_averaging(model, opt, cfg, steps_per_epoch)
    # the hooks the training step runs after each optimizer step (training/step.py: technique_hooks)
    hooks = [LearningRateSchedule(sched, averaging)] + ([AveragingHook(averaging)] if cfg.method != "none" else [])
    snapshots, lrs = [], []
    for step in range(1, steps + 1):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        for hook in hooks:
            hook.after_optimizer_step(step)
        snapshots.append([p.detach().clone() for p in model.parameters()])
        lrs.append(opt.param_groups[0]["lr"])
    return averaging, snapshots, lrs, sched


def test_swa_is_the_mean_of_the_weights_after_each_step_from_the_start_epoch():
    cfg = AveragingConfig(method="swa", start_epoch=2, swa_lr=0.01, anneal_steps=2, anneal_strategy="linear")
    averaging, snapshots, lrs, sched = _train(cfg, steps=9, steps_per_epoch=3)
    assert isinstance(averaging, WeightAveraging) and averaging.n_averaged == 6
    averaged = list(averaging.averaged.parameters())
    for i, param in enumerate(averaged):
        expected = torch.stack([snap[i] for snap in snapshots[3:]]).mean(dim=0)   # steps 4..9
        torch.testing.assert_close(param, expected, rtol=0, atol=1e-7)
    # SWALR took over after step 4 (the first averaged): linear annealing from 0.1 to 0.01 over 2 steps
    assert lrs[:3] == [0.1, 0.1, 0.1]
    assert lrs[3:] == pytest.approx([0.1, 0.055, 0.01, 0.01, 0.01, 0.01])
    assert sched.last_epoch == 3              # the main schedule stopped where SWA began


def test_ema_follows_its_recurrence_every_update_every_steps():
    cfg = AveragingConfig(method="ema", start_epoch=1, ema_decay=0.9, update_every=2)
    averaging, snapshots, lrs, _ = _train(cfg, steps=6, steps_per_epoch=6)
    assert averaging.n_averaged == 3
    for i, param in enumerate(averaging.averaged.parameters()):
        ema = snapshots[0][i].clone()                          # first update (step 1) copies the weights
        for snap in (snapshots[2], snapshots[4]):               # steps 3 and 5
            ema = 0.9 * ema + 0.1 * snap[i]
        torch.testing.assert_close(param, ema, rtol=0, atol=1e-7)
    assert lrs == [0.1] * 6                   # EMA leaves the schedule alone


def test_no_average_before_the_start_and_none_when_off():
    averaging, _, _, _ = _train(AveragingConfig(method="ema", start_epoch=3), steps=4, steps_per_epoch=2)
    assert averaging.n_averaged == 0 and averaging.averaged is None
    off, _, lrs, sched = _train(AveragingConfig(method="none"), steps=3, steps_per_epoch=3)
    assert isinstance(off, NoAveraging) and off.averaged is None and sched.last_epoch == 3
