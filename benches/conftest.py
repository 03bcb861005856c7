"""Shared fixtures for the benchmarks.

``ZEROCKPT_BENCH_SMOKE=1`` switches to tiny inputs so that
``pytest benches --benchmark-disable`` only checks that every benchmark runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from models import gpt2_small_state_dict, many_small_tensors

SMOKE = os.environ.get("ZEROCKPT_BENCH_SMOKE", "") not in ("", "0")
GPT2_SCALE = 0.01 if SMOKE else 1.0
N_SMALL = 500 if SMOKE else 20000
# Rounds per benchmark: few for the ~500 MB model, more for the small-tensor dict.
ROUNDS_BIG = 3
ROUNDS_SMALL = 5

# Same disk as the project (/tmp is on the same file system on the benchmark machine, but a
# directory under build/ makes that explicit wherever the benchmarks run).
_BENCH_TMP_ROOT = Path(__file__).resolve().parent.parent / "build" / "bench-tmp"


@pytest.fixture(scope="session")
def gpt2_sd() -> dict[str, torch.Tensor]:
    """GPT-2 small state dict (tiny in smoke mode); ``lm_head.weight`` is tied to wte."""
    return gpt2_small_state_dict(GPT2_SCALE)


@pytest.fixture(scope="session")
def small_sd() -> dict[str, torch.Tensor]:
    """Many small independent tensors (20,000; 500 in smoke mode)."""
    return many_small_tensors(N_SMALL)


@pytest.fixture(scope="session")
def datasets(
    gpt2_sd: dict[str, torch.Tensor], small_sd: dict[str, torch.Tensor]
) -> dict[str, dict[str, torch.Tensor]]:
    """The benchmark inputs by name."""
    return {"gpt2": gpt2_sd, "small": small_sd}


def _make_dir() -> Path:
    _BENCH_TMP_ROOT.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="zerockpt-", dir=_BENCH_TMP_ROOT))


def _remove_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        _BENCH_TMP_ROOT.rmdir()  # only if nothing else is left in it


@pytest.fixture(scope="session")
def rounds() -> dict[str, int]:
    """Timed rounds per input: few for the ~500 MB model, more for the small-tensor dict."""
    return {"gpt2": ROUNDS_BIG, "small": ROUNDS_SMALL}


@pytest.fixture
def bench_dir() -> Iterator[Path]:
    """A fresh directory on the project's disk, removed with everything in it afterwards."""
    path = _make_dir()
    yield path
    _remove_dir(path)


@pytest.fixture(scope="module")
def module_bench_dir() -> Iterator[Path]:
    """Like ``bench_dir`` but shared by the tests of one module (for files written once)."""
    path = _make_dir()
    yield path
    _remove_dir(path)


# Same-run ratios that benchmarks report; printed after pytest-benchmark's tables.
_RATIOS: list[str] = []


def report_ratio(what: str, ratio: float, target: str = "") -> None:
    """Records ``what = ratio`` (with its target, if any) for the end-of-session summary."""
    _RATIOS.append(f"{what}: {ratio:.2f}x" + (f"  ({target})" if target else ""))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _RATIOS:
        terminalreporter.section("same-run ratios")
        for line in _RATIOS:
            terminalreporter.write_line(line)


def save_each_format(model: torch.nn.Module, directory: Path, stem: str) -> dict[str, Path]:
    """``model`` saved by zerockpt (straight from the module), torch.save and safetensors
    (its state dict, tied tensors stored once), as files named ``stem`` in ``directory``."""
    import safetensors.torch
    import zerockpt
    from zerockpt.benchtools import unique_tensors

    sd = model.state_dict()
    files = {
        "zerockpt": directory / f"{stem}.zerockpt.safetensors",
        "torch": directory / f"{stem}.pt",
        "safetensors": directory / f"{stem}.safetensors",
    }
    zerockpt.save(model, files["zerockpt"], durable=False)
    torch.save(sd, files["torch"])
    safetensors.torch.save_file(unique_tensors(sd), files["safetensors"])
    return files
