"""What people leaving torch.save / torch.load try first: map_location and weights_only,
torch.save files given to zerockpt's loaders, zerockpt.dcp without importing it, saving into a
directory that is not there, Checkpointer loads on a device and without creating anything."""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import accel
import pytest
import torch
import zerockpt
from conftest import assert_same_state
from torch import nn
from zerockpt import _C, Checkpointer, FormatError, cli

# --- map_location and weights_only --------------------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    state = {"model": nn.Linear(3, 2).state_dict(), "step": 3, "rng": torch.get_rng_state()}
    path = tmp_path / "ckpt.safetensors"
    zerockpt.save(state, path)
    return path, state


@pytest.mark.parametrize("where", ["cpu", torch.device("cpu")])
def test_map_location_is_device(saved: tuple[Path, dict[str, Any]], where: Any) -> None:
    path, state = saved
    assert_same_state(state, zerockpt.load(path, map_location=where))
    assert_same_state(state, zerockpt.load(path, map_location=where, mmap=False))
    # Given both, they must agree (torch.device compares them).
    assert_same_state(state, zerockpt.load(path, device=torch.device("cpu"), map_location=where))


@pytest.mark.parametrize(
    "where",
    [
        {"cuda:0": "cpu"},
        lambda storage, location: storage,
        0,
        None.__class__,
    ],
)
def test_map_location_takes_only_one_device(saved: tuple[Path, dict[str, Any]], where: Any) -> None:
    with pytest.raises(TypeError, match=r"only a str or torch\.device") as info:
        zerockpt.load(saved[0], map_location=where)
    assert "records no device to remap from" in str(info.value)


def test_map_location_and_device_that_disagree(saved: tuple[Path, dict[str, Any]]) -> None:
    with pytest.raises(ValueError, match="disagree"):
        zerockpt.load(saved[0], device="cpu", map_location="meta")
    with pytest.raises(ValueError, match="meta"):  # map_location alone: as device="meta"
        zerockpt.load(saved[0], map_location="meta")


def test_weights_only(saved: tuple[Path, dict[str, Any]]) -> None:
    path, state = saved
    assert_same_state(state, zerockpt.load(path, weights_only=True))
    with pytest.raises(ValueError, match="never unpickles") as info:
        zerockpt.load(path, weights_only=False)
    assert "zerockpt convert" in str(info.value)
    with pytest.raises(TypeError, match="weights_only must be a bool"):
        zerockpt.load(path, weights_only="yes")  # type: ignore[arg-type]


# --- torch.save files given to the loaders -----------------------------------------------------


def _torch_files(directory: Path) -> Iterator[tuple[Path, str]]:
    """torch.save files in each format and protocol, under the names people give them."""
    state = {"w": torch.arange(6.0).view(2, 3), "step": 3}
    for name in ("model.pt", "pytorch_model.bin", "model.pth", "renamed.safetensors", "noext"):
        torch.save(state, directory / name)
        yield directory / name, "a zip archive holding data.pkl"
    for protocol in (2, 3, 4, 5):
        path = directory / f"legacy{protocol}.pt"
        torch.save(state, path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
        yield path, "the legacy pickle format"


def _entry_points(path: Path) -> list[Callable[[], object]]:
    return [
        lambda: zerockpt.load(path),
        lambda: zerockpt.load(path, mmap=False, verify=True),
        lambda: zerockpt.load(path, map_location="cpu", weights_only=True),
        lambda: zerockpt.open(path),
        lambda: zerockpt.verify(path),
        lambda: zerockpt.load_state_dict(nn.Linear(3, 2), path),
    ]


def test_torch_save_files_say_what_they_are_and_how_to_convert(tmp_path: Path) -> None:
    for path, form in _torch_files(tmp_path):
        for load in _entry_points(path):
            with pytest.raises(FormatError) as info:
                load()
            message = str(info.value)
            assert message.startswith(f"{path}: a torch.save checkpoint ({form})"), message
            assert "header length" not in message and "zerockpt convert" in message
        # The CLI recognises the same files: one recogniser for both.
        assert cli.checkpoint_kind(str(path)) == ("torch", str(path))


def test_the_suggested_conversion_works(tmp_path: Path) -> None:
    state = {"w": torch.arange(6.0).view(2, 3), "opt": {"step": 3, "betas": (0.9, 0.99)}}
    for name in ("model.pt", "model.safetensors"):  # a torch.save file under either name
        path = tmp_path / name
        torch.save(state, path)
        with pytest.raises(FormatError) as info:
            zerockpt.load(path)
        command = str(info.value).split("'zerockpt convert ")[1].split("'")[0].split(" ")
        assert command[0] == str(path) and command[1] != str(path)
        assert cli.main(["convert", *command]) == 0
        assert_same_state(state, zerockpt.load(command[1]))


def test_a_torch_save_shard_is_named(tmp_path: Path) -> None:
    directory = tmp_path / "sharded"
    zerockpt.save({"a": torch.ones(4), "b": torch.zeros(4)}, directory, max_shard_size=16)
    shard = sorted(directory.glob("model-*.safetensors"))[0]
    torch.save({"a": torch.ones(4)}, shard)
    for load in (lambda: zerockpt.load(directory), lambda: zerockpt.open(directory)):
        with pytest.raises(FormatError, match=r"a torch\.save checkpoint") as info:
            load()
        assert str(shard) in str(info.value)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_other_pickle_formats_are_named_too(tmp_path: Path) -> None:
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps({"w": [1, 2]}, protocol=4))
    script = torch.jit.script(nn.Linear(2, 2))
    torch.jit.save(script, str(tmp_path / "scripted.pt"))
    with zipfile.ZipFile(tmp_path / "any.zip", "w") as archive:
        archive.writestr("readme.txt", "hello")
    expected = {
        "raw.pkl": "a Python pickle",
        "scripted.pt": "a TorchScript archive (torch.jit.save)",
        "any.zip": "a zip archive",
    }
    for name, what in expected.items():
        path = tmp_path / name
        with pytest.raises(FormatError) as info:
            zerockpt.load(path)
        message = str(info.value)
        assert message.startswith(f"{path}: {what}, not a safetensors file"), message
        assert "convert" not in message  # torch.load(weights_only=True) cannot read these
        assert cli.checkpoint_kind(str(path))[0] == "file"


def test_broken_safetensors_keep_their_own_message(tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    zerockpt.save({"a": torch.ones(4)}, path)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(FormatError) as info:
        zerockpt.load(path)
    assert "torch.save" not in str(info.value) and "pickle" not in str(info.value)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises((FormatError, OSError)) as raised:  # never waits on the FIFO
        zerockpt.load(fifo)
    assert "torch.save" not in str(raised.value)


# --- zerockpt.dcp without importing it ----------------------------------------------------------


def test_dcp_is_a_lazy_attribute() -> None:
    code = (
        "import sys, zerockpt\n"
        "assert 'torch.distributed.checkpoint' not in sys.modules, 'imported by import zerockpt'\n"
        "assert 'zerockpt.dcp' not in sys.modules\n"
        "assert 'dcp' in dir(zerockpt)\n"
        "writer, reader = zerockpt.dcp.Writer, zerockpt.dcp.Reader\n"
        "import zerockpt.dcp\n"
        "assert zerockpt.dcp.Writer is writer\n"
        "try:\n"
        "    zerockpt.no_such_thing\n"
        "except AttributeError as e:\n"
        "    assert 'no_such_thing' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# --- Saving where the directory is missing ------------------------------------------------------


def test_a_missing_directory_is_named(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "exp" / "ckpt.safetensors"
    for save in (zerockpt.save, zerockpt.save_async):
        with pytest.raises(FileNotFoundError) as info:
            save({"a": torch.ones(2)}, path)
        assert info.value.errno == errno.ENOENT
        assert info.value.filename == str(path.parent)
        assert "makedirs=True" in str(info.value)
    assert os.listdir(tmp_path) == []


def test_makedirs_creates_it_durably(tmp_path: Path) -> None:
    """Each new directory's entry is fsynced into its parent (the file's own directory is
    fsynced by the save itself): an fsync failing at the first or second of those names that
    parent, and fails the save with nothing written."""
    state = {"w": torch.arange(4.0), "step": 1}
    for after, parent in ((0, tmp_path), (1, tmp_path / "a")):
        _C._inject_fault("fsync", errno.EIO, after=after)
        try:
            with pytest.raises(OSError, match=f"fsync of directory {re.escape(str(parent))} "):
                zerockpt.save(state, tmp_path / "a" / "b" / "c.safetensors", makedirs=True)
        finally:
            _C._clear_faults()
        shutil.rmtree(tmp_path / "a")
    path = tmp_path / "a" / "b" / "c.safetensors"
    zerockpt.save(state, path, makedirs=True)
    assert_same_state(state, zerockpt.load(path))
    # Without durability nothing is fsynced: the injected failure never fires.
    _C._inject_fault("fsync", errno.EIO)
    try:
        zerockpt.save(state, tmp_path / "x" / "y.safetensors", makedirs=True, durable=False)
    finally:
        _C._clear_faults()
    assert_same_state(state, zerockpt.load(tmp_path / "x" / "y.safetensors"))
    pending = zerockpt.save_async(state, tmp_path / "p" / "q" / "r.safetensors", makedirs=True)
    pending.result()
    assert_same_state(state, zerockpt.load(tmp_path / "p" / "q" / "r.safetensors"))
    # Already there: nothing to create, nothing else changes.
    zerockpt.save(state, path, makedirs=True)


def test_makedirs_through_a_file_fails_cleanly(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises((FileExistsError, NotADirectoryError)):
        zerockpt.save(
            {"a": torch.ones(1)}, tmp_path / "file" / "sub" / "c.safetensors", makedirs=True
        )
    with pytest.raises(NotADirectoryError):  # without makedirs the writer names it
        zerockpt.save({"a": torch.ones(1)}, tmp_path / "file" / "c.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_sharded_save_creates_its_directory(tmp_path: Path) -> None:
    state = {"a": torch.ones(4), "b": torch.zeros(4)}
    for makedirs in (False, True):
        directory = tmp_path / str(makedirs) / "deep" / "sharded"
        zerockpt.save(state, directory, max_shard_size=16, makedirs=makedirs)
        assert_same_state(state, zerockpt.load(directory))


# --- Checkpointer: device=, and no directory made by loading ------------------------------------


def test_checkpointer_loads_create_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "runs" / "exp"
    ckpt = Checkpointer(directory, keep_last=2)
    assert ckpt.steps() == [] and ckpt.latest_step() is None
    assert ckpt.load_latest() is None and ckpt.load_latest(device="cpu") is None
    with pytest.raises(FileNotFoundError):
        ckpt.load(3)
    assert os.listdir(tmp_path) == []
    ckpt.save(3, {"w": torch.ones(2)})
    assert sorted(os.listdir(directory)) == ["latest", "step_00000003.safetensors"]


def test_checkpointer_load_device(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    state = {"w": torch.arange(4.0), "step": 7}
    ckpt.save(7, state)
    for device in ("cpu", torch.device("cpu"), None):
        assert_same_state(state, ckpt.load(7, device=device))
        found = ckpt.load_latest(device=device)
        assert found is not None and found[0] == 7
        assert_same_state(state, found[1])
    # A device that cannot take the tensors raises, rather than skipping every checkpoint.
    with pytest.raises(ValueError, match="meta"):
        ckpt.load_latest(device="meta")
    with pytest.raises(RuntimeError):
        ckpt.load_latest(device="not_a_device")


@pytest.mark.device
@pytest.mark.parametrize("device_type", accel.DEVICE_TYPES)
def test_map_location_and_checkpointer_on_a_device(tmp_path: Path, device_type: str) -> None:
    reason = accel.why_not(device_type)
    if reason is not None:
        pytest.skip(reason)
    device = torch.device(device_type, 0)
    import numpy as np

    state = {"w": torch.arange(4.0), "n": np.arange(3, dtype=np.int16), "b": b"xyz"}
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, state)
    loaded = [
        zerockpt.load(ckpt.path(1), map_location=device),
        zerockpt.load(ckpt.path(1), map_location=str(device)),
        ckpt.load(1, device=device),
        ckpt.load_latest(device=device)[1],  # type: ignore[index]
    ]
    for got in loaded:
        assert got["w"].device == device and torch.equal(got["w"].cpu(), state["w"])
        # numpy arrays and bytes live in host memory, whatever the device.
        assert type(got["n"]) is np.ndarray and got["n"].dtype == np.int16
        assert np.array_equal(got["n"], state["n"]) and got["b"] == b"xyz"
    accel.synchronize(device)
