"""Checkpointer: step-numbered checkpoints, the `latest` pointer, retention, load_latest.

`Checkpointer(directory, keep_last=N)` writes `step_<step:08d>.safetensors` atomically, then
`latest` (atomically too) naming it, then removes the older checkpoints beyond `keep_last`;
with `async_save=True` all of that happens in the background after the state is snapshotted.
`load_latest()` tries the checkpoint `latest` names, then the others from the highest step
down, skipping (with a warning naming it) any that is damaged.

torch is the oracle throughout: what comes back is compared bitwise with clones of what was
saved, and a training run resumed from a checkpoint with an uninterrupted one. Failures come
from fault injection (zerockpt._C._inject_fault) and from SIGKILL of a child process that
saves in a loop.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import errno
import gc
import multiprocessing
import multiprocessing.sharedctypes
import os
import random
import re
import struct
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import zerockpt
from conftest import TEMP_NAME_RE, assert_same_state, forkserver_context, temp_leftovers
from torch import nn
from zerockpt import Checkpointer, PendingSave

C = zerockpt._C
POINTER = "latest"


@pytest.fixture(autouse=True)
def no_faults_left() -> Iterator[None]:
    """No save of another test in flight when a fault is armed, and none left armed after."""
    C.wait_async_saves()
    C._clear_faults()
    yield
    C.wait_async_saves()
    C._clear_faults()


# --- Helpers -----------------------------------------------------------------------------------


def name(step: int) -> str:
    return f"step_{step:08d}.safetensors"


def pointer(directory: Path) -> str:
    return (directory / POINTER).read_text(encoding="utf-8")


def clone(obj: Any) -> Any:
    """A deep copy whose tensors are fresh clones (the oracle for what a save must store)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        out = type(obj)((k, clone(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a state dict's module versions are saved too
            out._metadata = copy.deepcopy(obj._metadata)
        return out
    if isinstance(obj, list | tuple):
        return type(obj)(clone(v) for v in obj)
    return obj


def tensors_of(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_of(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in tensors_of(v)]
    return []


def filled(step: int, numel: int = 64) -> dict[str, Any]:
    """Training-state-shaped checkpoint whose every tensor element is `step`."""
    return {
        "model": {
            "w": torch.full((numel,), float(step)),
            "b": torch.full((3,), step, dtype=torch.int64),
        },
        "optim": {
            "state": {0: {"m": torch.full((2, 5), float(step), dtype=torch.float64)}},
            "param_groups": [{"lr": 0.1, "params": [0]}],
        },
        "step": step,
        "tag": f"step {step}",
    }


def check_filled(state: Any, step: int) -> None:
    """Asserts `state` is the checkpoint of `step`: every tensor holds `step`, and the leaves."""
    assert state["step"] == step and state["tag"] == f"step {step}", (state["step"], step)
    found = tensors_of(state)
    assert len(found) >= 3
    for t in found:
        assert t.numel() > 0 and bool((t == step).all()), (step, t)


@contextlib.contextmanager
def no_warnings() -> Iterator[None]:
    """Turns any warning into an error within the block."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every regular file of the directory and its bytes."""
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def tensor_data_offset(path: Path, key: str) -> int:
    """File offset of the first byte of stored tensor `key`."""
    with open(path, "rb") as raw:
        n = int.from_bytes(raw.read(8), "little")
    with zerockpt.open(path) as f:
        begin, _ = f.info(key).data_offsets
    return 8 + n + begin


def os_error(call: Callable[[], Any]) -> OSError:
    try:
        call()
    except OSError as e:
        return e
    raise AssertionError("no OSError was raised")


# --- Round trip, names, steps() ----------------------------------------------------------------


def test_training_state_round_trip(tmp_path: Path) -> None:
    directory = tmp_path / "runs" / "exp1"  # missing, parents too
    ckpt = Checkpointer(directory, keep_last=3)
    assert ckpt.directory == directory
    assert ckpt.steps() == [] and ckpt.latest_step() is None and ckpt.load_latest() is None
    assert not (tmp_path / "runs").exists()  # created by the first save, not before

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.8, 0.99))
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    state = {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "sched": sched.state_dict(),
        "step": 10,
        "rng": torch.get_rng_state(),
    }
    expected = clone(state)

    pending = ckpt.save(10, state)
    assert isinstance(pending, PendingSave)
    assert pending.done() and pending.exception() is None
    assert pending.path == str(directory / "step_00000010.safetensors")
    assert sorted(os.listdir(directory)) == [POINTER, "step_00000010.safetensors"]
    assert pointer(directory).strip() == "step_00000010.safetensors"
    assert ckpt.path(10) == directory / "step_00000010.safetensors"
    assert ckpt.steps() == [10] and ckpt.latest_step() == 10
    assert zerockpt.verify(ckpt.path(10)).ok

    with no_warnings():
        found = ckpt.load_latest()
    assert found is not None
    step, loaded = found
    assert step == 10
    assert_same_state(expected, loaded)
    for mmap in (True, False):
        assert_same_state(expected, ckpt.load(10, mmap=mmap))
        assert_same_state(expected, ckpt.load_latest(mmap=mmap, verify=False)[1])  # type: ignore[index]
    # A fresh Checkpointer on the directory (a restarted job) sees the same.
    again = Checkpointer(directory, keep_last=3)
    assert again.steps() == [10] and again.latest_step() == 10
    assert_same_state(expected, again.load_latest()[1])  # type: ignore[index]

    # What comes back restores: the RNG state reproduces the same draws.
    torch.set_rng_state(loaded["rng"])
    first = torch.rand(5)
    torch.set_rng_state(expected["rng"])
    assert torch.equal(first, torch.rand(5))
    fresh = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    fresh.load_state_dict(loaded["model"])
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, expected["model"][k]), k

    # A second save: `latest` moves to it; both files stay (keep_last=3).
    ckpt.save(25, filled(25))
    assert pointer(directory).strip() == name(25)
    assert ckpt.steps() == [10, 25] and ckpt.latest_step() == 25
    check_filled(ckpt.load_latest()[1], 25)  # type: ignore[index]
    assert_same_state(expected, ckpt.load(10))
    assert "keep_last=3" in repr(ckpt)


def test_steps_ignore_unrelated_entries(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=None)
    for step in (20, 3, 123456789):
        ckpt.save(step, filled(step))
    assert ckpt.path(123456789).name == "step_123456789.safetensors"
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "step_00000007.safetensors.bak").write_bytes(ckpt.path(3).read_bytes())
    (tmp_path / "old_step_00000008.safetensors").write_bytes(ckpt.path(3).read_bytes())
    (tmp_path / "step_00000009.safetensor").write_text("x")
    (tmp_path / "step_abc.safetensors").write_text("x")
    (tmp_path / "step_.safetensors").write_text("x")
    (tmp_path / "step_-0000011.safetensors").write_text("x")
    (tmp_path / name(50)).mkdir()  # a directory named like a checkpoint
    (tmp_path / name(60)).symlink_to(tmp_path / "nowhere")  # a dangling link
    temp = f".{name(70)}.12345.0123456789abcdef.zerockpt-tmp"  # a save's temporary file
    assert TEMP_NAME_RE.match(temp)
    (tmp_path / temp).write_bytes(b"partial")
    assert ckpt.steps() == [3, 20, 123456789]
    with no_warnings():
        found = ckpt.load_latest()
    assert found is not None and found[0] == 123456789
    check_filled(found[1], 123456789)
    # Retention ignores them too.
    ckpt2 = Checkpointer(tmp_path, keep_last=1)
    ckpt2.save(5, filled(5))
    assert ckpt2.steps() == [5]
    assert (tmp_path / name(50)).is_dir() and (tmp_path / "notes.txt").exists()
    assert (tmp_path / "step_00000007.safetensors.bak").exists()
    # The temporary file (its writer is gone: it is not locked) went with the next save.
    assert temp_leftovers(tmp_path) == []


def test_latest_step(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() is None
    ckpt.save(4, filled(4))
    ckpt.save(2, filled(2))
    assert ckpt.latest_step() == 2  # what `latest` names, not the highest step
    ckpt.path(2).unlink()
    assert ckpt.latest_step() is None  # names a file that is gone
    (tmp_path / POINTER).write_text("garbage")
    assert ckpt.latest_step() is None
    (tmp_path / POINTER).write_text(name(4) + "\n")
    assert ckpt.latest_step() == 4


def test_steps_count_only_the_names_checkpointer_writes(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=2)
    ckpt.save(1, filled(1))
    ckpt.save(2, filled(2))
    # Files a Checkpointer never writes: step 99 not zero-padded, step 10 in Arabic-Indic digits.
    (tmp_path / "step_99.safetensors").write_bytes(b"not a checkpoint")
    (tmp_path / "step_\u0661\u0660.safetensors").write_bytes(b"not a checkpoint")
    ckpt.save(3, filled(3))
    # keep_last=2 must keep two real checkpoints: 2 and 3.
    assert [s for s in (1, 2, 3) if ckpt.path(s).exists()] == [2, 3]
    assert all(ckpt.path(s).is_file() for s in ckpt.steps())


# --- Retention ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async", "mixed"])
@pytest.mark.parametrize("keep_last", [1, 2, 3])
def test_retention(tmp_path: Path, keep_last: int, mode: str) -> None:
    rng = random.Random(keep_last * 10 + len(mode))
    ckpt = Checkpointer(tmp_path, keep_last=keep_last, durable=False)
    saved: list[int] = []
    steps = [0, 1, 2, 5, 6, 7, 10, 11, 12, 20, 30, 31]
    for i, step in enumerate(steps):
        async_save = mode == "async" or (mode == "mixed" and rng.random() < 0.5)
        pending = ckpt.save(step, filled(step, 64 + 37 * i), async_save=async_save)
        saved.append(step)
        if async_save and rng.random() < 0.5:
            continue  # checked after a later save (which first waits for this one)
        ckpt.wait()
        assert pending.done()
        assert ckpt.steps() == saved[-keep_last:]
        assert pointer(tmp_path).strip() == name(step)
        assert ckpt.latest_step() == step
    ckpt.wait()
    assert ckpt.steps() == saved[-keep_last:]
    assert sorted(os.listdir(tmp_path)) == sorted([POINTER] + [name(s) for s in saved[-keep_last:]])
    assert temp_leftovers(tmp_path) == []
    for s in saved[-keep_last:]:
        check_filled(ckpt.load(s), s)
    found = ckpt.load_latest()
    assert found is not None and found[0] == 31
    check_filled(found[1], 31)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(
    ("keep_last", "kept"), [(1, [5]), (2, [5, 30]), (3, [5, 20, 30]), (None, [5, 10, 20, 30])]
)
def test_saving_a_lower_step_keeps_it_and_the_highest_others(
    tmp_path: Path, keep_last: int | None, kept: list[int], async_save: bool
) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=keep_last)
    for step in (10, 20, 30):
        ckpt.save(step, filled(step))
    ckpt.save(5, filled(5), async_save=async_save)
    ckpt.wait()
    assert ckpt.steps() == kept
    assert pointer(tmp_path).strip() == name(5)
    assert ckpt.latest_step() == 5
    with no_warnings():
        found = ckpt.load_latest()
    assert found is not None and found[0] == 5  # what `latest` names wins over step 30
    check_filled(found[1], 5)


def test_keep_last_none_keeps_everything(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=None, durable=False)
    for step in range(15):
        ckpt.save(step, filled(step), async_save=step % 2 == 1)
    ckpt.close()
    assert ckpt.steps() == list(range(15))
    for step in range(15):
        check_filled(ckpt.load(step), step)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_saving_a_step_again_replaces_it(tmp_path: Path, async_save: bool) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=2)
    ckpt.save(1, filled(1))
    ckpt.save(2, filled(2))
    first = ckpt.path(2).read_bytes()
    replacement = filled(2, numel=500)
    replacement["model"]["w"] = torch.arange(500.0)
    expected = clone(replacement)
    ckpt.save(2, replacement, async_save=async_save)
    ckpt.wait()
    assert ckpt.steps() == [1, 2]  # the other one is kept: 2 is not counted twice
    assert ckpt.path(2).read_bytes() != first
    assert_same_state(expected, ckpt.load(2))
    assert pointer(tmp_path).strip() == name(2)
    assert_same_state(expected, ckpt.load_latest()[1])  # type: ignore[index]
    assert temp_leftovers(tmp_path) == []


@pytest.mark.parametrize("keep_last", [0, -1, True, False, 1.5, "2", 2.0])
def test_invalid_keep_last(tmp_path: Path, keep_last: Any) -> None:
    directory = tmp_path / "ckpts"
    with pytest.raises(ValueError, match="keep_last"):
        Checkpointer(directory, keep_last=keep_last)
    assert not directory.exists()


@pytest.mark.parametrize("step", [-1, True, False, 1.0, "3", None, torch.tensor(3)])
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_invalid_step(tmp_path: Path, step: Any, async_save: bool) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=2)
    with pytest.raises(ValueError, match="step"):
        ckpt.save(step, filled(1), async_save=async_save)
    with pytest.raises(ValueError, match="step"):
        ckpt.path(step)
    with pytest.raises(ValueError, match="step"):
        ckpt.load(step)
    assert os.listdir(tmp_path) == []
    ckpt.save(0, filled(0))  # step 0 is valid
    assert ckpt.steps() == [0]


def test_unsupported_state_fails_before_anything_is_written(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=1)
    ckpt.save(1, filled(1))
    before = snapshot(tmp_path)
    for async_save in (False, True):
        with pytest.raises(TypeError, match=r"obj\['bad'\] is a builtins.complex"):
            ckpt.save(2, {"bad": 1j}, async_save=async_save)
        assert snapshot(tmp_path) == before
    ckpt.wait()
    ckpt.save(2, filled(2))
    assert ckpt.steps() == [2]


# --- Async saves -------------------------------------------------------------------------------


def big_state(step: int, mib: int = 8) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    n = (mib << 20) // 4
    return {
        "model": {"w": torch.randn(n, generator=g), "t": torch.randn(64, 32, generator=g).t()},
        "optim": {"state": {0: {"exp_avg": torch.randn(1000, generator=g, dtype=torch.float64)}}},
        "step": step,
    }


def test_async_save_stores_the_state_at_the_time_of_the_call(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=1)
    ckpt.save(0, filled(0))
    state = big_state(1)
    expected = clone(state)
    pending = ckpt.save(1, state, async_save=True)
    assert isinstance(pending, PendingSave)
    assert pending.path == str(ckpt.path(1))
    # The next optimizer step changes everything in place while the file is being written.
    for t in tensors_of(state):
        t.mul_(-3).add_(1)
    state["step"] = 2
    ckpt.wait()
    assert pending.done() and pending.exception() is None
    assert_same_state(expected, ckpt.load(1))
    assert zerockpt.verify(ckpt.path(1)).ok
    # After the wait, `latest` names it and retention has removed step 0.
    assert pointer(tmp_path).strip() == name(1)
    assert ckpt.steps() == [1]
    assert temp_leftovers(tmp_path) == []


def test_load_latest_waits_for_the_pending_save(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=2, durable=True)
    ckpt.save(1, filled(1))
    state = big_state(2, mib=32)
    expected = clone(state)
    ckpt.save(2, state, async_save=True)
    with no_warnings():
        found = ckpt.load_latest()
    assert found is not None and found[0] == 2
    assert_same_state(expected, found[1])
    assert pointer(tmp_path).strip() == name(2)
    ckpt.wait()  # no error to raise
    assert ckpt.steps() == [1, 2]


def test_async_saves_in_a_row(tmp_path: Path) -> None:
    # Each save waits for the one before; every file holds its own step.
    ckpt = Checkpointer(tmp_path, keep_last=None, durable=False)
    state = filled(0, numel=1 << 18)
    pendings = []
    for step in range(6):
        pendings.append(ckpt.save(step, state, async_save=True))
        for t in tensors_of(state):
            t.fill_(step + 1)
        state["step"], state["tag"] = step + 1, f"step {step + 1}"
    ckpt.wait()
    assert all(p.done() and p.exception() is None for p in pendings)
    for step in range(6):
        check_filled(ckpt.load(step), step)
    assert pointer(tmp_path).strip() == name(5)


# --- load_latest and damaged checkpoints -------------------------------------------------------


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    if how == "truncated":
        path.write_bytes(data[:-100])
    elif how == "truncated-in-header":
        path.write_bytes(data[: 8 + n // 2])
    elif how == "header-only":
        path.write_bytes(data[: 8 + n])
    elif how == "flipped":
        at = tensor_data_offset(path, "model/w") + 5
        path.write_bytes(data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :])
    elif how == "garbage":
        path.write_bytes(random.Random(0).randbytes(len(data)))
    elif how == "empty":
        path.write_bytes(b"")
    else:
        raise AssertionError(how)


DAMAGES = ["truncated", "truncated-in-header", "header-only", "flipped", "garbage", "empty"]


def three_checkpoints(directory: Path) -> Checkpointer:
    ckpt = Checkpointer(directory, keep_last=None)
    for step in (1, 2, 3):
        ckpt.save(step, filled(step, numel=256))
    return ckpt


@pytest.mark.parametrize("how", DAMAGES)
def test_load_latest_skips_a_damaged_checkpoint(tmp_path: Path, how: str) -> None:
    ckpt = three_checkpoints(tmp_path)
    damage(ckpt.path(3), how)
    with pytest.warns(UserWarning) as record:
        found = ckpt.load_latest()
    assert len(record) == 1, [str(w.message) for w in record]
    message = str(record[0].message)
    assert str(ckpt.path(3)) in message and "skipping" in message
    assert record[0].filename == __file__  # attributed to the caller of load_latest
    assert found is not None and found[0] == 2
    check_filled(found[1], 2)
    # Nothing was removed or changed by looking.
    assert ckpt.steps() == [1, 2, 3] and ckpt.latest_step() == 3
    if how == "flipped":
        assert "CRC-32C" in message and "model/w" in message


def test_verify_false_loads_a_checksum_failure_as_is(tmp_path: Path) -> None:
    ckpt = three_checkpoints(tmp_path)
    damage(ckpt.path(3), "flipped")
    for mmap in (True, False):
        with no_warnings():
            found = ckpt.load_latest(verify=False, mmap=mmap)
        assert found is not None and found[0] == 3
        w = found[1]["model"]["w"]
        expected = torch.full((256,), 3.0)
        differs = (w.view(torch.uint8) != expected.view(torch.uint8)).nonzero().flatten()
        assert differs.tolist() == [5]  # exactly the flipped byte
        assert (w == 3.0).sum() == 255
    with pytest.raises(zerockpt.ChecksumError):
        ckpt.load(3)  # load(step) verifies by default


def test_load_latest_skips_several_and_returns_none_when_all_are_damaged(
    tmp_path: Path,
) -> None:
    ckpt = three_checkpoints(tmp_path)
    damage(ckpt.path(3), "garbage")
    damage(ckpt.path(2), "flipped")
    with pytest.warns(UserWarning) as record:
        found = ckpt.load_latest()
    assert found is not None and found[0] == 1
    check_filled(found[1], 1)
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert str(ckpt.path(3)) in messages[0] and str(ckpt.path(2)) in messages[1]

    damage(ckpt.path(1), "truncated")
    with pytest.warns(UserWarning) as record:
        assert ckpt.load_latest() is None
    messages = [str(w.message) for w in record]
    assert len(messages) == 3
    for step, message in zip((3, 2, 1), messages, strict=True):
        assert str(ckpt.path(step)) in message


def test_load_latest_of_an_empty_directory(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path / "new")
    with no_warnings():
        assert ckpt.load_latest() is None
    assert not (tmp_path / "new").exists()
    (tmp_path / "new").mkdir()
    with no_warnings():
        assert ckpt.load_latest() is None
    (tmp_path / "new" / "unrelated.safetensors").write_bytes(b"x")
    with no_warnings():
        assert ckpt.load_latest() is None


def test_latest_naming_a_missing_file_warns_and_falls_back_to_the_highest_step(
    tmp_path: Path,
) -> None:
    ckpt = three_checkpoints(tmp_path)
    ckpt.save(9, filled(9))
    ckpt.path(9).unlink()
    assert ckpt.latest_step() is None
    with pytest.warns(UserWarning) as record:
        found = ckpt.load_latest()
    assert len(record) == 1
    message = str(record[0].message)
    assert str(tmp_path / POINTER) in message and str(ckpt.path(9)) in message
    assert found is not None and found[0] == 3
    check_filled(found[1], 3)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\n",
        b"garbage\n",
        b"\xff\xfe\x00\x01",
        b"../step_00000001.safetensors\n",
        b"step_00000001.safetensors/x\n",
        b"step_00000001.safetensors.bak\n",
        b"step_.safetensors\n",
    ],
)
def test_garbage_in_latest_is_ignored(tmp_path: Path, content: bytes) -> None:
    ckpt = three_checkpoints(tmp_path)
    (tmp_path / POINTER).write_bytes(content)
    assert ckpt.latest_step() is None
    with no_warnings():
        found = ckpt.load_latest()
    assert found is not None and found[0] == 3
    check_filled(found[1], 3)
    # The next save replaces it.
    ckpt.save(4, filled(4))
    assert pointer(tmp_path).strip() == name(4)


def test_latest_being_a_directory_is_ignored(tmp_path: Path) -> None:
    ckpt = three_checkpoints(tmp_path)
    (tmp_path / POINTER).unlink()
    (tmp_path / POINTER).mkdir()
    with no_warnings():
        found = ckpt.load_latest()
    assert found is not None and found[0] == 3


def test_load_latest_prefers_the_step_latest_names_over_higher_numbered_ones(
    tmp_path: Path,
) -> None:
    # Documented behaviour: `latest` is tried first, whatever higher steps exist (e.g. a later
    # checkpoint was written but its save failed before `latest` was updated).
    ckpt = three_checkpoints(tmp_path)
    (tmp_path / POINTER).write_text(name(2) + "\n")
    with no_warnings():
        found = ckpt.load_latest()
    assert found is not None and found[0] == 2
    check_filled(found[1], 2)
    # ...unless it is damaged: then the highest step.
    damage(ckpt.path(2), "truncated")
    with pytest.warns(UserWarning, match=re.escape(str(ckpt.path(2)))):
        found = ckpt.load_latest()
    assert found is not None and found[0] == 3


# --- Failures ----------------------------------------------------------------------------------

# (op, errno, durable): faults that fail the checkpoint file itself.
CHECKPOINT_FAULTS = [
    ("write", errno.ENOSPC, False),
    ("write", errno.EIO, True),
    ("fallocate", errno.ENOSPC, False),
    ("rename", errno.EIO, False),
    ("fsync", errno.EIO, True),
]
FAULT_IDS = [
    f"{op}-{errno.errorcode[err]}-{'durable' if d else 'buffered'}"
    for op, err, d in CHECKPOINT_FAULTS
]


def save_3_with_eio(ckpt: zerockpt.Checkpointer, op: str, after: int, async_save: bool) -> OSError:
    """The OSError of saving step 3 while `op` fails with EIO after `after` calls."""
    C._inject_fault(op, errno.EIO, after=after)
    try:
        ckpt.save(3, filled(3), async_save=async_save)
        error = os_error(ckpt.wait) if async_save else None
    except OSError as e:
        error = e
    finally:
        C._clear_faults()
    assert error is not None and error.errno == errno.EIO
    return error


def two_checkpoints(directory: Path, durable: bool) -> Checkpointer:
    ckpt = Checkpointer(directory, keep_last=2, durable=durable)
    ckpt.save(1, filled(1))
    ckpt.save(2, filled(2))
    return ckpt


@pytest.mark.parametrize(("op", "err", "durable"), CHECKPOINT_FAULTS, ids=FAULT_IDS)
def test_failed_sync_save_changes_nothing(tmp_path: Path, op: str, err: int, durable: bool) -> None:
    ckpt = two_checkpoints(tmp_path, durable)
    before = snapshot(tmp_path)
    C._inject_fault(op, err)
    try:
        error = os_error(lambda: ckpt.save(3, filled(3)))
    finally:
        C._clear_faults()
    assert error.errno == err, error
    assert error.filename == str(ckpt.path(3))
    assert snapshot(tmp_path) == before  # `latest` and both checkpoints, byte for byte
    assert temp_leftovers(tmp_path) == []
    assert ckpt.load_latest()[0] == 2  # type: ignore[index]
    # Nothing is left pending: the next save works.
    ckpt.save(3, filled(3))
    assert ckpt.steps() == [2, 3] and pointer(tmp_path).strip() == name(3)


@pytest.mark.parametrize("next_async", [False, True], ids=["then-sync", "then-async"])
@pytest.mark.parametrize(("op", "err", "durable"), CHECKPOINT_FAULTS, ids=FAULT_IDS)
def test_failed_async_save_is_raised_by_the_next_save(
    tmp_path: Path, op: str, err: int, durable: bool, next_async: bool
) -> None:
    ckpt = two_checkpoints(tmp_path, durable)
    before = snapshot(tmp_path)
    C._inject_fault(op, err)
    try:
        pending = ckpt.save(3, filled(3), async_save=True)
        error = pending.exception()  # waits; the Checkpointer still holds the error
    finally:
        C._clear_faults()
    assert isinstance(error, OSError)
    assert error.errno == err and error.filename == str(ckpt.path(3))
    assert snapshot(tmp_path) == before
    assert temp_leftovers(tmp_path) == []
    # load_latest in between sees the old state and does not consume the error.
    with no_warnings():
        assert ckpt.load_latest()[0] == 2  # type: ignore[index]

    with pytest.raises(OSError) as info:
        ckpt.save(4, filled(4), async_save=next_async)
    assert info.value is error
    assert not ckpt.path(4).exists()  # that save was not started
    assert snapshot(tmp_path) == before

    ckpt.save(4, filled(4), async_save=next_async)  # reported once: this one runs
    ckpt.wait()
    assert ckpt.steps() == [2, 4] and pointer(tmp_path).strip() == name(4)
    check_filled(ckpt.load_latest()[1], 4)  # type: ignore[index]


def test_wait_raises_a_failed_async_save_once(tmp_path: Path) -> None:
    ckpt = two_checkpoints(tmp_path, durable=False)
    C._inject_fault("write", errno.ENOSPC)
    try:
        pending = ckpt.save(3, filled(3), async_save=True)
        with pytest.raises(OSError) as info:
            ckpt.wait()
    finally:
        C._clear_faults()
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(ckpt.path(3))
    assert pending.done()
    ckpt.wait()  # reported once
    ckpt.close()
    # The PendingSave itself still reports it, as often as asked.
    with pytest.raises(OSError):
        pending.result()
    assert pending.exception() is info.value
    ckpt.save(3, filled(3), async_save=True)
    ckpt.wait()
    assert ckpt.steps() == [2, 3]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(
    ("op", "after", "durable"),
    # One call of the kind passes (the checkpoint's rename; its fsyncs of file and directory):
    # the next one, for `latest`, fails.
    [("rename", 1, False), ("fsync", 2, True)],
    ids=["rename", "fsync"],
)
def test_failure_to_update_latest_after_the_checkpoint_is_written(
    tmp_path: Path, op: str, after: int, durable: bool, async_save: bool
) -> None:
    ckpt = two_checkpoints(tmp_path, durable)
    before = snapshot(tmp_path)
    error = save_3_with_eio(ckpt, op, after, async_save)
    assert error.filename == str(tmp_path / POINTER)
    # The checkpoint is complete, `latest` unchanged, nothing removed, no temporary file.
    check_filled(ckpt.load(3), 3)
    assert ckpt.steps() == [1, 2, 3]
    assert {k: v for k, v in snapshot(tmp_path).items() if k != name(3)} == before
    assert temp_leftovers(tmp_path) == []
    with no_warnings():
        assert ckpt.load_latest()[0] == 2  # type: ignore[index]
    # The next save applies retention to all of them.
    ckpt.save(4, filled(4))
    assert ckpt.steps() == [3, 4] and pointer(tmp_path).strip() == name(4)


def test_close_and_context_manager_wait(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, keep_last=1) as ckpt:
        state = big_state(1)
        expected = clone(state)
        pending = ckpt.save(1, state, async_save=True)
    assert pending.done() and pending.exception() is None
    assert pointer(tmp_path).strip() == name(1)
    assert_same_state(expected, ckpt.load(1))

    ckpt = Checkpointer(tmp_path, keep_last=1)
    pending = ckpt.save(2, big_state(2), async_save=True)
    ckpt.close()
    assert pending.done() and ckpt.steps() == [2]

    # A failed save is raised when the block ends.
    C._inject_fault("write", errno.EIO)
    try:
        with pytest.raises(OSError) as info, Checkpointer(tmp_path, keep_last=1) as ckpt:
            ckpt.save(3, big_state(3), async_save=True)
    finally:
        C._clear_faults()
    assert info.value.errno == errno.EIO and info.value.filename == str(ckpt.path(3))
    assert ckpt.steps() == [2]
    ckpt.close()  # already reported

    # An exception in the block is not masked; the save in flight still completes.
    with pytest.raises(KeyError, match="boom"), Checkpointer(tmp_path, keep_last=1) as ckpt:
        pending = ckpt.save(4, big_state(4), async_save=True)
        raise KeyError("boom")
    assert pending.done() and pending.exception() is None
    assert ckpt.steps() == [4] and pointer(tmp_path).strip() == name(4)

    # close() raises a failed save once.
    ckpt = Checkpointer(tmp_path, keep_last=1)
    C._inject_fault("rename", errno.ENOSPC)
    try:
        ckpt.save(5, filled(5), async_save=True)
        with pytest.raises(OSError) as info:
            ckpt.close()
    finally:
        C._clear_faults()
    assert info.value.errno == errno.ENOSPC
    ckpt.close()
    assert ckpt.steps() == [4]


# --- Bitwise resume ----------------------------------------------------------------------------

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}
TOTAL_STEPS = 12
EVERY = 3


class Run:
    """A model (with dropout: the global RNG matters), optimizer, LR schedule and data stream."""

    def __init__(self, optimizer: str, init_seed: int, data_seed: int) -> None:
        torch.manual_seed(init_seed)
        self.model = nn.Sequential(
            nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)
        )
        self.opt = OPTIMIZERS[optimizer](self.model.parameters())
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=4, gamma=0.5)
        self.data = torch.Generator().manual_seed(data_seed)

    def step(self) -> None:
        x = torch.randn(8, 6, generator=self.data)
        y = torch.randn(8, 3, generator=self.data)
        self.opt.zero_grad()
        F.mse_loss(self.model(x), y).backward()  # type: ignore[no-untyped-call]
        self.opt.step()
        self.sched.step()

    def state(self, step: int) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optim": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "rng": torch.get_rng_state(),
            "data": self.data.get_state(),
            "step": step,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optim"])
        self.sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["rng"])
        self.data.set_state(state["data"])


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_resume_from_load_latest_is_bitwise_identical(tmp_path: Path, optimizer: str) -> None:
    straight = Run(optimizer, init_seed=0, data_seed=1)
    torch.manual_seed(123)
    for _ in range(TOTAL_STEPS):
        straight.step()
    straight_rng = torch.get_rng_state()

    # The same run, checkpointed (in the background, training on at once) every EVERY steps,
    # dies after step 10: the newest checkpoint is that of step 9.
    run = Run(optimizer, init_seed=0, data_seed=1)
    torch.manual_seed(123)
    ckpt = Checkpointer(tmp_path, keep_last=2, durable=False)
    for step in range(1, 11):
        run.step()
        if step % EVERY == 0:
            ckpt.save(step, run.state(step), async_save=True)
    ckpt.wait()
    del run
    assert ckpt.steps() == [6, 9]

    # A new job: other initial weights, RNG and data position, all replaced by the checkpoint.
    resumed = Run(optimizer, init_seed=7, data_seed=99)
    torch.manual_seed(999)
    found = Checkpointer(tmp_path, keep_last=2).load_latest()
    assert found is not None
    step, state = found
    assert step == 9 and state["step"] == 9
    resumed.restore(state)
    for _ in range(step, TOTAL_STEPS):
        resumed.step()

    for (k, a), (k2, b) in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        assert k == k2
        assert torch.equal(a, b), k
    assert_same_state(clone(straight.opt.state_dict()), clone(resumed.opt.state_dict()))
    assert straight.sched.state_dict() == resumed.sched.state_dict()
    assert torch.equal(straight.data.get_state(), resumed.data.get_state())
    assert torch.equal(straight_rng, torch.get_rng_state())  # dropout drew the same numbers
    # And the check can fail: one step less differs.
    short = Run(optimizer, init_seed=7, data_seed=99)
    short.restore(Checkpointer(tmp_path).load(6))
    for _ in range(6, TOTAL_STEPS - 1):
        short.step()
    assert not all(
        torch.equal(a, b)
        for a, b in zip(straight.model.parameters(), short.model.parameters(), strict=True)
    )


# --- Crash consistency -------------------------------------------------------------------------

CRASH_TRIALS = int(os.environ.get("ZEROCKPT_CHECKPOINTER_CRASH_TRIALS", "20"))
CRASH_SEED = int(os.environ.get("ZEROCKPT_CHECKPOINTER_CRASH_SEED", "0"))
KEEP = 2
# The child's progress in shared memory: the step it is saving, the last step whose save
# (with `latest` and retention) has completed.
SAVING, DONE = 0, 1


def crash_state(step: int) -> dict[str, Any]:
    """0.5 to 2 MiB (changing with the step), every element `step`."""
    return {
        "model": {
            "w": torch.full((1 << 17,), float(step)),
            "v": torch.full(((1 + step % 4) << 16,), step, dtype=torch.int32),
        },
        "optim": [torch.full((64, 33), float(step), dtype=torch.float64).t()],
        "step": step,
        "tag": f"step {step}",
    }


def crash_child(directory: str, start: int, durable: bool, shared: Any) -> None:
    """Saves steps start, start + 1, ... (two in three in the background) until killed."""
    ckpt = Checkpointer(directory, keep_last=KEEP, durable=durable)
    state = crash_state(start)
    step = start
    while True:
        shared[SAVING] = step
        ckpt.save(step, state, async_save=step % 3 != 0)
        # The next step's state, partly changed in place while the save may still be writing.
        state["model"]["w"].fill_(step + 1)
        state["optim"][0].fill_(step + 1)
        state["model"]["v"] = torch.full(((1 + (step + 1) % 4) << 16,), step + 1, dtype=torch.int32)
        state["step"], state["tag"] = step + 1, f"step {step + 1}"
        ckpt.wait()
        shared[DONE] = step
        step += 1


@pytest.fixture(scope="module")
def ctx() -> multiprocessing.context.ForkServerContext:
    return forkserver_context(__name__)


@contextlib.contextmanager
def crash_process(
    ctx: multiprocessing.context.ForkServerContext,
    directory: Path,
    start: int,
    durable: bool,
    shared: Any,
) -> Iterator[multiprocessing.process.BaseProcess]:
    shared[SAVING] = shared[DONE] = -1
    child = ctx.Process(
        target=crash_child, args=(str(directory), start, durable, shared), daemon=True
    )
    child.start()
    try:
        yield child
    finally:
        if child.exitcode is None:
            child.kill()  # SIGKILL
            child.join()
        child.close()


def test_sigkill_during_checkpointer_saves(
    tmp_path: Path, ctx: multiprocessing.context.ForkServerContext
) -> None:
    rng = random.Random(CRASH_SEED)
    shared = multiprocessing.sharedctypes.RawArray("d", 2)
    outcomes: collections.Counter[str] = collections.Counter()
    start = 0
    for trial in range(CRASH_TRIALS):
        durable = trial % 4 == 3
        with crash_process(ctx, tmp_path, start, durable, shared) as child:
            pid = child.pid
            deadline = time.monotonic() + 60
            while shared[DONE] < start:  # its first save is complete
                assert child.is_alive(), f"the child died (exit code {child.exitcode})"
                assert time.monotonic() < deadline, "the child made no progress"
                time.sleep(0.0005)
            # Saves take a few ms: kills land inside one (writing, updating `latest`,
            # removing old files) or between two.
            time.sleep(0.0 if rng.random() < 0.15 else rng.uniform(0.0, 0.03))
            assert child.is_alive(), f"the child failed (exit code {child.exitcode})"
            child.kill()
            child.join()
        saving, done = int(shared[SAVING]), int(shared[DONE])
        assert start <= done <= saving

        # At most the killed save's own temporary file (of its checkpoint or of `latest`); any
        # of an earlier child was removed by this child's first save.
        left = temp_leftovers(tmp_path)
        assert len(left) <= 1, left
        for leftover in left:
            m = TEMP_NAME_RE.match(leftover)
            assert m is not None, leftover
            assert int(m["pid"]) == pid and m["dest"] in (POINTER, name(saving)), leftover

        ckpt = Checkpointer(tmp_path, keep_last=KEEP)
        with no_warnings():  # nothing is ever damaged, and `latest` names an existing file
            found = ckpt.load_latest()
        assert found is not None
        step, state = found
        check_filled(state, step)
        assert done <= step <= saving, (done, step, saving)
        steps = ckpt.steps()
        assert step in steps and steps[-1] <= saving
        assert len(steps) <= KEEP + 1, steps  # one more only between commit and removal
        for s in steps:
            assert zerockpt.verify(ckpt.path(s)).ok, s
        outcomes["newest: the save in progress" if step == saving else "newest: an older one"] += 1
        outcomes[f"{len(steps)} checkpoints"] += 1
        outcomes["temporary file left" if left else "no temporary file"] += 1
        start = saving + 1

        if trial % 2 == 0:
            # The next save cleans up: temporary files, checkpoints beyond keep_last.
            ckpt.save(start, crash_state(start))
            assert temp_leftovers(tmp_path) == []
            assert ckpt.steps() == [steps[-1], start]
            assert pointer(tmp_path).strip() == name(start)
            with no_warnings():
                found = ckpt.load_latest()
            assert found is not None and found[0] == start
            check_filled(found[1], start)
            start += 1
    print(f"\n{CRASH_TRIALS} kills: {dict(outcomes)}")


# --- Retention never removes the last loadable checkpoint (issue 18, point 2) ---


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_retention_waits_for_the_committed_file_to_check(tmp_path: Path, async_save: bool) -> None:
    """Reading the new file back fails: `latest` and older checkpoints stay as they were."""
    ckpt = two_checkpoints(tmp_path, durable=False)
    before = snapshot(tmp_path)
    # The save writes only; the check reads its header.
    error = save_3_with_eio(ckpt, "read", 0, async_save)
    assert error.filename == str(ckpt.path(3))
    assert ckpt.steps() == [1, 2, 3] and pointer(tmp_path).strip() == name(2)
    assert {k: v for k, v in snapshot(tmp_path).items() if k != name(3)} == before


@pytest.mark.parametrize("error", [RuntimeError("boom"), MemoryError(), KeyError("k")])
def test_load_latest_skips_a_checkpoint_that_fails_for_any_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    ckpt = three_checkpoints(tmp_path)
    real_load = zerockpt.checkpoint.load

    def load(path: Any, **kwargs: Any) -> Any:
        if Path(path) == ckpt.path(3):
            raise error
        return real_load(path, **kwargs)

    monkeypatch.setattr(zerockpt.checkpoint, "load", load)
    with pytest.warns(UserWarning, match=f"skipping checkpoint .*{type(error).__name__}") as rec:
        found = ckpt.load_latest()
    assert len(rec) == 1 and str(ckpt.path(3)) in str(rec[0].message)
    assert found is not None and found[0] == 2
    check_filled(found[1], 2)


def test_load_latest_lets_ctrl_c_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = three_checkpoints(tmp_path)

    def load(path: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(zerockpt.checkpoint, "load", load)
    with pytest.raises(KeyboardInterrupt):
        ckpt.load_latest()


# --- Memory and disk are freed at once, without the garbage collector (point 5) ---


@contextlib.contextmanager
def gc_disabled() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def mapped_files() -> list[str]:
    with open("/proc/self/maps", encoding="utf-8") as f:
        return [line.split(maxsplit=5)[5].strip() for line in f if len(line.split()) == 6]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
@pytest.mark.parametrize("kwargs", [{}, {"verify": True}, {"mmap": False}], ids=str)
def test_loaded_state_is_freed_without_gc(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    path = tmp_path / "s.safetensors"
    zerockpt.save({"model": {"w": torch.ones(1 << 20)}, "opt": [torch.zeros(3), 7]}, path)
    with gc_disabled():
        state = zerockpt.load(path, **kwargs)
        gone = weakref.ref(state["model"]["w"])
        del state
        assert gone() is None  # no reference cycle keeps it
        assert str(path) not in mapped_files()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
def test_a_removed_checkpoint_releases_its_disk_space_without_gc(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=1, durable=False)
    ckpt.save(1, filled(1, numel=1 << 20))
    with gc_disabled():
        found = ckpt.load_latest()
        assert found is not None
        assert str(ckpt.path(1)) in mapped_files()
        del found
        ckpt.save(2, filled(2, numel=1 << 20))  # removes step 1
        assert ckpt.steps() == [2]
        # No mapping of the removed file survives, so its blocks are free.
        assert not [m for m in mapped_files() if m.startswith(str(ckpt.path(1)))]
