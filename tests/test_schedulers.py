import pytest
import torch

from foldtune.config import ConfigError
from foldtune.optim.schedulers import build_scheduler, lr_factor


@pytest.mark.parametrize(("name", "step", "expected"), [
    ("linear", 0, 1 / 3), ("linear", 1, 2 / 3), ("linear", 2, 1.0), ("linear", 6, 0.5), ("linear", 10, 0.0),
    ("cosine", 0, 1 / 3), ("cosine", 2, 1.0), ("cosine", 6, 0.5), ("cosine", 4, 0.8535533905932737),
    ("cosine", 10, 0.0), ("constant", 1, 2 / 3), ("constant", 9, 1.0),
])
def test_lr_factor_at_chosen_steps(name, step, expected):
    # 10 steps, 2 of warmup: warmup climbs (step+1)/3, then the decay spans steps 2..10.
    assert lr_factor(name, step, total_steps=10, warmup_steps=2) == pytest.approx(expected)


def test_scheduler_drives_the_optimizer_lr():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = build_scheduler(opt, "linear", total_steps=4, warmup_steps=0)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1, 0.075, 0.05, 0.025])


def test_unknown_schedule_is_refused():
    with pytest.raises(ConfigError, match="valid: constant, cosine, linear"):
        lr_factor("cosnie", 0, 10, 0)


def test_warmup_as_steps_or_as_a_fraction():
    from foldtune.optim.schedulers import warmup_steps

    assert warmup_steps(400, ratio=0.05) == 20
    assert warmup_steps(400, ratio=0.05, steps=7) == 7          # steps win over the ratio
    assert warmup_steps(5, ratio=0.0, steps=50) == 5            # never longer than training
    assert warmup_steps(30, ratio=0.1) == 3
