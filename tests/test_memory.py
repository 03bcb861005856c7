"""Zero-copy in numbers: loads do not copy the file into memory, saves stage at most 64 MiB."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
import torch
import zerockpt

MiB = 1 << 20


def _rss() -> int:
    return psutil.Process().memory_info().rss


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mem") / "big.safetensors"
    zerockpt.save({"big": torch.ones(64 * MiB), "small": torch.arange(1024.0)}, path)  # 256 MiB
    return path


def test_mapped_load_does_not_grow_rss_by_file_size(big_file: Path) -> None:
    before = _rss()
    loaded = zerockpt.load(big_file)
    grown = _rss() - before
    assert grown < 16 * MiB, f"RSS grew by {grown / MiB:.1f} MiB for a 256 MiB file"
    assert loaded["big"].shape == (64 * MiB,)


def test_lazy_open_touches_only_the_tensor_asked_for(big_file: Path) -> None:
    before = _rss()
    with zerockpt.open(big_file) as f:
        small = f["small"]
        total = float(small.sum())
    grown = _rss() - before
    assert total == sum(range(1024))
    assert grown < 16 * MiB, f"RSS grew by {grown / MiB:.1f} MiB"


# Peak RSS of a child saving 256 MiB of tensors (contiguous and strided) vs its RSS before.
SAVE_CHILD = textwrap.dedent(
    """
    import resource, sys, torch, zerockpt
    path, durable, direct = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
    tensors = {f"w{i}": torch.ones(8 << 20) for i in range(6)}        # 192 MiB contiguous
    tensors["strided"] = torch.ones(4096, 4096).t()                   # 64 MiB strided
    tensors.update({f"s{i}": torch.ones(100) for i in range(1000)})   # many small
    zerockpt.save({"warm": torch.ones(16)}, path + ".warm")            # load code paths once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    zerockpt.save(tensors, path, durable=durable, direct_io=direct)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024)
    """
)


@pytest.mark.parametrize(
    ("durable", "direct"), [("0", "0"), ("1", "1")], ids=["buffered", "direct"]
)
def test_save_peak_extra_memory_is_bounded(tmp_path: Path, durable: str, direct: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", SAVE_CHILD, str(tmp_path / "m.safetensors"), durable, direct],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    extra = int(out.stdout.strip())
    assert extra <= 64 * MiB, f"save used {extra / MiB:.1f} MiB beyond the tensors"
