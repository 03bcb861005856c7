"""A small CPU training loop's throughput with a checkpoint every ~10 s, against none.

An MLP (4 x 2048 x 2048 linear layers) trains with Adam on a fixed batch; its full training
state (model, optimizer moments, step: ~200 MB) is checkpointed every K steps, K chosen from a
calibration run so that checkpoints come about every CHECKPOINT_INTERVAL_S seconds of
training. The methods take turns (see
test_training_loop); the ratios of their steps per second to the run without checkpoints are
printed at the end.
"""

from __future__ import annotations

import os
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

ROUNDS = 1 if SMOKE else 3


def test_training_loop(
    benchmark: BenchmarkFixture,
    trainer: Trainer,
    steps_per_checkpoint: int,
    bench_dir: Path,
) -> None:
    """Every method in turn, ROUNDS times (order rotated each round), one interval each.

    A segment is one checkpoint followed by K training steps, then waiting for that
    checkpoint's background write if it is still running. The machine's speed drifts by tens
    of percent over minutes (other tenants), so the methods are interleaved rather than run one
    after another, and each method's best segment is compared.
    """
    k = steps_per_checkpoint
    names = list(METHODS)
    segments: dict[str, list[float]] = {name: [] for name in names}
    methods = {}
    for name in names:
        directory = bench_dir / name.replace(" ", "_")
        directory.mkdir()
        methods[name] = METHODS[name](trainer, directory)

    def run() -> None:
        for r in range(ROUNDS):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                checkpoint, finish = methods[name]
                os.sync()
                start = time.perf_counter()
                checkpoint(trainer.step_count)
                for _ in range(k):
                    trainer.step()
                finish()
                segments[name].append(time.perf_counter() - start)

    benchmark.group = f"training loop: {ROUNDS} x (1 checkpoint + {k} steps) per method"
    benchmark.pedantic(run, rounds=1, iterations=1)
    base = min(segments["no checkpoints"])
    for name, times in segments.items():
        benchmark.extra_info[f"{name}: steps/s (best segment)"] = round(k / min(times), 3)
        benchmark.extra_info[f"{name}: steps/s (median segment)"] = round(
            k / sorted(times)[len(times) // 2], 3
        )
        if name != "no checkpoints" and benchmark.enabled:
            report_ratio(
                f"training steps/s with {name} / without checkpoints (best of {ROUNDS})",
                base / min(times),
                "target >= 0.95" if name == "zerockpt.save_async" else "",
            )
    assert all(len(times) == ROUNDS for times in segments.values())
    assert any((bench_dir / "zerockpt.save_async").iterdir())
