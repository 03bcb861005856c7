"""A small CPU training loop's throughput with a checkpoint every ~10 s, against none.

An MLP (4 x 2048 x 2048 linear layers) trains with Adam on a fixed batch; its full training
state (model, optimizer moments, step: ~200 MB) is checkpointed every K steps, K chosen from a
calibration run so that checkpoints come about every CHECKPOINT_INTERVAL_S seconds of
training. Each method runs the same number of steps (about 3.5 intervals, so three
checkpoints); the reported figure is steps per second over the whole run, waits for the last
background write included. The ratios to the run without checkpoints are printed at the end.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
import zerockpt
from conftest import SMOKE, report_ratio
from pytest_benchmark.fixture import BenchmarkFixture
from torch import nn

WIDTH = 64 if SMOKE else 2048
DEPTH = 4
BATCH = 32
CHECKPOINT_INTERVAL_S = 0.05 if SMOKE else 10.0

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


class Trainer:
    """The model, its optimizer and one fixed batch."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for _ in range(DEPTH):
            layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
        self.model = nn.Sequential(*layers)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.x = torch.randn(BATCH, WIDTH)
        self.y = torch.randn(BATCH, WIDTH)
        self.step_count = 0

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(self.model(self.x), self.y).backward()
        self.optimizer.step()
        self.step_count += 1

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optim": self.optimizer.state_dict(),
            "step": self.step_count,
        }


@pytest.fixture(scope="module")
def trainer() -> Trainer:
    return Trainer()


@pytest.fixture(scope="module")
def steps_per_checkpoint(trainer: Trainer) -> int:
    """K: steps in about CHECKPOINT_INTERVAL_S seconds (after warm-up steps)."""
    for _ in range(5):
        trainer.step()
    n = 5 if SMOKE else 20
    start = time.perf_counter()
    for _ in range(n):
        trainer.step()
    per_step = (time.perf_counter() - start) / n
    return max(2, round(CHECKPOINT_INTERVAL_S / per_step))


# A checkpoint method: (trainer, directory) -> (checkpoint(step), finish()).
Method = Callable[[Trainer, Path], tuple[Callable[[int], None], Callable[[], None]]]


def _none(trainer: Trainer, d: Path) -> tuple[Callable[[int], None], Callable[[], None]]:
    return (lambda step: None), (lambda: None)


def _zerockpt_save_async(
    trainer: Trainer, d: Path
) -> tuple[Callable[[int], None], Callable[[], None]]:
    pending: list[zerockpt.PendingSave] = []

    def checkpoint(step: int) -> None:
        pending.append(zerockpt.save_async(trainer.state(), d / f"step_{step}.safetensors"))

    def finish() -> None:
        for p in pending:
            p.result()

    return checkpoint, finish


def _zerockpt_checkpointer(
    trainer: Trainer, d: Path
) -> tuple[Callable[[int], None], Callable[[], None]]:
    ckpt = zerockpt.Checkpointer(d, keep_last=2)

    def checkpoint(step: int) -> None:
        ckpt.save(step, trainer.state(), async_save=True)

    return checkpoint, ckpt.close


def _zerockpt_save(trainer: Trainer, d: Path) -> tuple[Callable[[int], None], Callable[[], None]]:
    return (
        lambda step: zerockpt.save(trainer.state(), d / f"step_{step}.safetensors")
    ), lambda: None


def _torch_save(trainer: Trainer, d: Path) -> tuple[Callable[[int], None], Callable[[], None]]:
    return (lambda step: torch.save(trainer.state(), d / f"step_{step}.pt")), lambda: None


def _dcp_async_save(trainer: Trainer, d: Path) -> tuple[Callable[[int], None], Callable[[], None]]:
    futures: list[Any] = []

    def checkpoint(step: int) -> None:
        if futures:  # as save_async does: one checkpoint in flight at a time
            futures[-1].result()
        path = d / f"step_{step}"
        futures.append(dcp.async_save(trainer.state(), checkpoint_id=path, no_dist=True))

    def finish() -> None:
        for f in futures:
            f.result()

    return checkpoint, finish


METHODS: dict[str, Method] = {
    "no checkpoints": _none,
    "zerockpt.save_async": _zerockpt_save_async,
    "zerockpt.Checkpointer async_save": _zerockpt_checkpointer,
    "zerockpt.save": _zerockpt_save,
    "torch.save": _torch_save,
    "dcp.async_save no_dist": _dcp_async_save,
}

_STEPS_PER_S: dict[str, float] = {}


@pytest.mark.parametrize("method", list(METHODS))
def test_training_loop(
    benchmark: BenchmarkFixture,
    trainer: Trainer,
    steps_per_checkpoint: int,
    bench_dir: Path,
    method: str,
) -> None:
    k = steps_per_checkpoint
    total_steps = 3 * k + k // 2
    checkpoint, finish = METHODS[method](trainer, bench_dir)

    def run() -> None:
        for i in range(1, total_steps + 1):
            trainer.step()
            if i % k == 0:
                checkpoint(trainer.step_count)
        finish()

    def setup() -> None:
        shutil.rmtree(bench_dir, ignore_errors=True)
        bench_dir.mkdir()
        os.sync()

    benchmark.group = f"training loop, {total_steps} steps, a checkpoint every {k}"
    benchmark.extra_info["steps"] = total_steps
    benchmark.extra_info["steps per checkpoint"] = k
    benchmark.pedantic(run, setup=setup, rounds=1, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.min > 0:
        _STEPS_PER_S[method] = total_steps / stats.stats.min
        benchmark.extra_info["steps/s"] = round(_STEPS_PER_S[method], 3)
    if method != "no checkpoints":
        assert any(bench_dir.iterdir())


def test_report_training_ratios() -> None:
    """Prints the same-run ratios (not a timing)."""
    base = _STEPS_PER_S.get("no checkpoints")
    if base is None or len(_STEPS_PER_S) < 2:
        pytest.skip("timings disabled (--benchmark-disable) or not run")
    for method, rate in _STEPS_PER_S.items():
        if method != "no checkpoints":
            report_ratio(
                f"training steps/s with {method} / without checkpoints",
                rate / base,
                "target >= 0.95" if method == "zerockpt.save_async" else "",
            )
