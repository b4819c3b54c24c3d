"""Start the GPU while the essays are read and tokenized.

A run's first fold used to begin by paying, with the GPU idle and before its first step,
for what no data decides: the CUDA context and the first use of cuBLAS and cuDNN, which
load their libraries and engines. `start_warm_up` pays for them in a background thread
while the main thread imports transformers and the training code and reads, splits and
tokenizes the essays: it runs the kinds of kernels a transformer step runs (matrix
products, GELU, layer norm, attention with a padding mask), forward and backward, on
small constant tensors.

Only torch's operators run there, and they release the GIL: the main thread goes on
meanwhile. (A first version built a one-layer copy of the backbone there; importing and
building it in Python held the GIL and slowed the tokenizing down by as much as it saved,
docs/benchmarks.md.) No random numbers are drawn, so a run's results are the same with
or without the warm-up. A failure here changes nothing: the fold meets the same problem
and reports it.
"""

from __future__ import annotations

import logging
import threading
import time

import torch
import torch.nn.functional as F

from foldtune.config import Config, ConfigError
from foldtune.runtime.precision import resolve_device, resolve_precision

log = logging.getLogger("foldtune")


def start_warm_up(cfg: Config) -> threading.Thread | None:
    """Warm the GPU up in a background thread, if this process will train `cfg` on one.

    Called by train.py as soon as the run's config is known, before transformers and the
    training code are imported.
    """
    from foldtune.training.distributed import launched_world_size

    tcfg = cfg.training
    # deterministic: cuBLAS must first be used after seed_everything has fixed its workspace.
    # Under accelerate launch, or with a process per fold, this process trains nothing here
    # (or not alone): each fold starts its device as it is built, as without the warm-up.
    if (cfg.model.type != "transformer" or tcfg.deterministic or launched_world_size() != 1
            or (tcfg.parallel_folds > 1 and tcfg.parallel_mode == "processes")):
        return None
    try:
        device = resolve_device(tcfg.device)
        precision = resolve_precision(tcfg.precision, device)
    except ConfigError:         # the run says what is wrong with the config
        return None
    if device.type != "cuda":
        return None

    def warm() -> None:
        started = time.perf_counter()
        try:
            run_first_kernels(device, precision)
            log.info("%s warmed up (%.1f s)", device, time.perf_counter() - started)
        except Exception as err:  # noqa: BLE001 - the fold's own first step reports what is wrong
            log.debug("device warm-up skipped (%s: %s)", type(err).__name__, err)

    thread = threading.Thread(target=warm, name="warm-up-device", daemon=True)
    thread.start()
    return thread


def run_first_kernels(device: torch.device, precision, rows: int = 2, width: int = 64, heads: int = 4,
                      head_size: int = 32) -> torch.Tensor:
    """A block's worth of kernels on constant tensors, forward and backward; returns the input's gradient."""
    hidden = heads * head_size
    x = torch.linspace(-1.0, 1.0, rows * width * hidden, device=device).reshape(rows, width, hidden)
    x.requires_grad_(True)
    weight = torch.eye(hidden, device=device, requires_grad=True)
    bias = torch.zeros(hidden, device=device, requires_grad=True)
    mask = torch.ones(rows, 1, width, width, dtype=torch.bool, device=device)
    mask[-1, ..., width // 2:] = False              # a padded row, as in almost every real batch
    with precision.autocast():
        h = F.layer_norm(F.gelu(F.linear(x, weight, bias)), (hidden,))
        q = h.reshape(rows, width, heads, head_size).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    attended.float().square().mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return x.grad
