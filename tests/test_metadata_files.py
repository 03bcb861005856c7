"""Small metadata files are read with bounds (issue 18, point 7).

The ``latest`` pointer of a Checkpointer, a sharded checkpoint's index and a DCP checkpoint's
``.metadata.json`` are read whole by one helper. A FIFO in their place must not hang the reader,
``/dev/zero`` (through a symlink) must not exhaust memory, a directory and an oversized file
are refused. Each case is built here; an alarm turns a hang into a test failure.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
import zerockpt
import zerockpt.dcp
from zerockpt import FormatError
from zerockpt._smallfile import MAX_JSON_BYTES, MAX_POINTER_BYTES

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs"),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
]


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    def hung(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError("the reader hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def replace_with(path: Path, kind: str, limit: int) -> None:
    """Puts a FIFO, a symlink to /dev/zero, a directory or an oversized file at ``path``."""
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "directory":
        path.mkdir()
    else:
        with open(path, "wb") as f:
            f.truncate(limit + 1)  # sparse: costs no disk


KINDS = ["fifo", "dev-zero", "directory", "oversize"]
WORDS = {
    "fifo": "is a FIFO, not a regular file",
    "dev-zero": "is a character device, not a regular file",
    "oversize": "larger than",
}


def expect_refusal(kind: str, path: Path, call: Callable[[], Any]) -> None:
    if kind == "directory":
        with pytest.raises(IsADirectoryError) as info:
            call()
        assert info.value.filename == str(path)
    else:
        with pytest.raises(FormatError, match=WORDS[kind]) as error:
            call()
        assert str(path) in str(error.value)


@pytest.mark.parametrize("kind", KINDS)
def test_sharded_index(tmp_path: Path, kind: str) -> None:
    directory = tmp_path / "sharded"
    zerockpt.save({"a": torch.ones(4), "b": torch.zeros(4)}, directory, max_shard_size=16)
    index = directory / "model.safetensors.index.json"
    replace_with(index, kind, MAX_JSON_BYTES)
    for call in (
        lambda: zerockpt.load(index),
        lambda: zerockpt.open(index),
        lambda: zerockpt.verify(index),
    ):
        expect_refusal(kind, index, call)
    if kind != "directory":  # a directory holding a directory named like the index
        expect_refusal(kind, index, lambda: zerockpt.load(directory))


@pytest.mark.parametrize("kind", KINDS)
def test_dcp_metadata(tmp_path: Path, kind: str) -> None:
    directory = tmp_path / "dcp"
    dcp.save({"w": torch.arange(4.0)}, storage_writer=zerockpt.dcp.Writer(directory), no_dist=True)
    metadata = directory / ".metadata.json"
    replace_with(metadata, kind, MAX_JSON_BYTES)
    if kind == "directory":
        with pytest.raises(IsADirectoryError):
            zerockpt.dcp.Reader(directory).read_metadata()
        return
    expect_refusal(kind, metadata, lambda: zerockpt.dcp.Reader(directory).read_metadata())


@pytest.mark.parametrize("kind", KINDS)
def test_checkpointer_pointer(tmp_path: Path, kind: str) -> None:
    ckpt = zerockpt.Checkpointer(tmp_path, keep_last=None, durable=False)
    ckpt.save(1, {"w": torch.ones(2)})
    ckpt.save(2, {"w": torch.full((2,), 2.0)})
    replace_with(tmp_path / "latest", kind, MAX_POINTER_BYTES)
    assert ckpt.latest_step() is None  # not a pointer: ignored
    found = ckpt.load_latest()  # falls back to the highest step
    assert found is not None and found[0] == 2
    assert torch.equal(found[1]["w"], torch.full((2,), 2.0))


def test_a_fifo_as_the_safetensors_file(tmp_path: Path) -> None:
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(FormatError, match="not a regular file"):
        zerockpt.load(fifo)
    with pytest.raises(FormatError, match="not a regular file"):
        zerockpt.open(fifo)
