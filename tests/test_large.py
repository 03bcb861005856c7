"""Offsets beyond 4 GiB, with a small memory footprint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import safetensors
import torch
import zerockpt
from conftest import craft

GiB = 1 << 30


def test_header_with_offsets_beyond_4_gib_on_a_sparse_file(tmp_path: Path) -> None:
    big = 5 * GiB
    header = {
        "big": {"dtype": "U8", "shape": [big], "data_offsets": [0, big]},
        "tail": {"dtype": "U8", "shape": [8], "data_offsets": [big, big + 8]},
    }
    path = craft(tmp_path / "sparse.safetensors", header)
    with open(path, "r+b") as f:  # sparse: no disk blocks for the zeros
        f.truncate(path.stat().st_size + big + 8)
    with zerockpt.open(path) as f:
        assert f.info("tail").data_offsets == (big, big + 8)
        assert f["tail"].tolist() == [0] * 8
        assert f.get_tensor("tail", mmap=False).tolist() == [0] * 8
    loaded = zerockpt.load(path)
    assert loaded["big"].shape == (big,) and int(loaded["big"][-1]) == 0


@pytest.mark.slow
def test_write_and_read_beyond_4_gib(tmp_path: Path) -> None:
    # A 4.1 GiB stride-0 view takes one byte of memory; it is written through staging.
    if os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize < 10 * GiB:
        pytest.skip("needs 10 GiB of free disk")
    big = 4 * GiB + (1 << 20)
    tensors = {
        "big": torch.full((1,), 7, dtype=torch.uint8).expand(big),
        "tail": torch.arange(16, dtype=torch.uint8),
    }
    path = tmp_path / "huge.safetensors"
    zerockpt.save(tensors, path)  # durable: O_DIRECT, no page cache build-up
    with zerockpt.open(path) as f:
        assert f.info("tail").data_offsets[0] == big  # beyond 2**32
        assert torch.equal(f.get_tensor("tail", mmap=False), tensors["tail"])
    loaded = zerockpt.load(path)
    assert torch.equal(loaded["tail"], tensors["tail"])
    probe = loaded["big"][:: 64 << 20]
    assert bool((probe == 7).all()) and int(loaded["big"][-1]) == 7
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert torch.equal(f.get_tensor("tail"), tensors["tail"])
    del loaded, probe
    path.unlink()
