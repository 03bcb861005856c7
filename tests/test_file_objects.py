"""save/load through binary file objects, and save_bytes/load_bytes, against torch and
safetensors as oracles: BytesIO, real files (at a position, mapped from the descriptor), pipes
and other streams, interop both ways with safetensors.torch.save/load, and bad input.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import json
import os
import pickle
import random
import struct
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import accel
import pytest
import safetensors.torch
import torch
import zerockpt
from conftest import (
    assert_bitwise_equal,
    assert_dicts_bitwise_equal,
    assert_same_state,
    mixed_state,
    random_tensor,
)
from torch import nn
from zerockpt import _C


def small_state() -> dict[str, torch.Tensor]:
    """Every dtype torch and the format share, 0-d, empty, strided, conj/neg, and a tie."""
    state: dict[str, torch.Tensor] = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(7).bfloat16(),
        "f16": torch.randn(2, 2).half(),
        "f64": torch.randn(4, dtype=torch.float64),
        "c64": torch.randn(3, dtype=torch.complex64),
        "conj": torch.randn(5, dtype=torch.complex64).conj(),
        "neg": torch.randn(4, dtype=torch.complex64).conj().imag,
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "strided": torch.arange(24, dtype=torch.int32).reshape(4, 6).t(),
    }
    for i, dtype in enumerate(
        [
            torch.uint8,
            torch.int8,
            torch.int16,
            torch.uint16,
            torch.uint32,
            torch.int64,
            torch.uint64,
            torch.float8_e4m3fn,
            torch.float8_e5m2,
            torch.float8_e4m3fnuz,
            torch.float8_e5m2fnuz,
            torch.float8_e8m0fnu,
        ]
    ):
        state[str(dtype).removeprefix("torch.")] = random_tensor((3, 4), dtype, seed=i)
    state["tied"] = state["f32"]
    return state


def contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What safetensors.torch.save takes: contiguous, conj/neg resolved, no shared memory."""
    return {k: v.resolve_conj().resolve_neg().contiguous().clone() for k, v in state.items()}


def interop_state() -> dict[str, torch.Tensor]:
    """small_state() less the dtypes safetensors 0.8 does not name (F8_E8M0)."""
    return {k: v for k, v in small_state().items() if v.dtype != torch.float8_e8m0fnu}


def assert_loaded(loaded: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    assert_dicts_bitwise_equal(loaded, state)
    if "tied" in state:
        assert loaded["tied"] is loaded["f32"]


# --- bytes ------------------------------------------------------------------------------------


def test_save_bytes_is_the_file_save_writes(tmp_path: Path) -> None:
    state = small_state()
    zerockpt.save(state, tmp_path / "m.safetensors", metadata={"k": "v"})
    assert zerockpt.save_bytes(state, {"k": "v"}) == (tmp_path / "m.safetensors").read_bytes()
    stream = io.BytesIO()
    zerockpt.save(state, stream, metadata={"k": "v"})
    assert stream.getvalue() == (tmp_path / "m.safetensors").read_bytes()


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_load_bytes_round_trip(wrap: Any) -> None:
    state = small_state()
    data = zerockpt.save_bytes(state)
    assert_loaded(zerockpt.load_bytes(wrap(data)), state)
    assert_loaded(zerockpt.load_bytes(wrap(data), verify=True), state)


def test_load_bytes_owns_its_memory() -> None:
    state = {"w": torch.arange(1000, dtype=torch.float32)}
    data = bytearray(zerockpt.save_bytes(state))
    loaded = zerockpt.load_bytes(data)
    data[:] = bytes(len(data))
    del data
    assert_bitwise_equal(loaded["w"], state["w"])
    loaded["w"].add_(1)  # writable, and private
    assert torch.equal(loaded["w"], state["w"] + 1)


def test_safetensors_reads_save_bytes() -> None:
    state = interop_state()
    data = zerockpt.save_bytes(state, metadata={"format": "pt", "note": "x"})
    theirs = safetensors.torch.load(data)
    stored = contiguous(state)
    del stored["tied"]  # stored once, as an alias zerockpt resolves
    assert_dicts_bitwise_equal(dict(sorted(theirs.items())), dict(sorted(stored.items())))
    (n,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8 : 8 + n])["__metadata__"]
    assert metadata["format"] == "pt" and metadata["note"] == "x"


def test_load_bytes_reads_safetensors_save() -> None:
    state = contiguous(interop_state())
    del state["tied"]
    data = safetensors.torch.save(state, metadata={"note": "y"})
    ours = zerockpt.load_bytes(data)
    theirs = safetensors.torch.load(data)
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        assert_bitwise_equal(ours[k], theirs[k])
        assert_bitwise_equal(ours[k], state[k])
    (n,) = struct.unpack("<Q", data[:8])
    assert json.loads(data[8 : 8 + n])["__metadata__"] == {"note": "y"}
    with pytest.warns(UserWarning, match="no checksums"):
        zerockpt.load_bytes(data, verify=True)


def test_nested_state_and_modules_through_bytes() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(2, 3)).sum().backward()
    opt.step()
    state = {"model": net.state_dict(), "optim": opt.state_dict(), "step": 3, "rng": [None, 1.5]}
    assert_same_state(zerockpt.load_bytes(zerockpt.save_bytes(state)), state)
    loaded = zerockpt.load_bytes(zerockpt.save_bytes(net))
    assert isinstance(loaded, OrderedDict)
    assert loaded._metadata == net.state_dict()._metadata  # type: ignore[attr-defined]
    assert_dicts_bitwise_equal(dict(loaded), dict(net.state_dict()))


def test_bytes_are_not_paths() -> None:
    with pytest.raises(TypeError, match="load_bytes"):
        zerockpt.load(zerockpt.save_bytes({"w": torch.ones(1)}))
    with pytest.raises(TypeError, match="save_bytes"):
        zerockpt.save({"w": torch.ones(1)}, b"m.safetensors")
    with pytest.raises(TypeError, match="bytes, bytearray or memoryview"):
        zerockpt.load_bytes("m.safetensors")  # type: ignore[arg-type]


# --- BytesIO and real files, at their position ---------------------------------------------


def test_bytesio_at_a_position_between_other_data() -> None:
    a, b = small_state(), {"x": torch.randn(10), "y": torch.arange(3)}
    stream = io.BytesIO()
    stream.write(b"head")
    zerockpt.save(a, stream)
    middle = stream.tell()
    zerockpt.save(b, stream, checksums=False)
    stream.write(b"tail")
    stream.seek(4)
    assert_loaded(zerockpt.load(stream, verify=True), a)
    assert stream.tell() == middle
    assert_dicts_bitwise_equal(zerockpt.load(stream), b)
    assert stream.read() == b"tail"


@pytest.mark.parametrize("mmap", [True, False])
def test_real_file_at_a_position(tmp_path: Path, mmap: bool) -> None:
    a, b = small_state(), {"x": torch.randn(10)}
    path = tmp_path / "two"
    with open(path, "wb") as f:
        f.write(b"prefix!")
        zerockpt.save(a, f)
        zerockpt.save(b, f)
        f.write(b"end")
    with open(path, "rb") as f:
        assert f.read(7) == b"prefix!"
        assert_loaded(zerockpt.load(f, mmap=mmap, verify=True), a)
        assert_dicts_bitwise_equal(zerockpt.load(f, mmap=mmap), b)
        assert f.read() == b"end"
    # Each image is the file zerockpt.save writes for a path.
    zerockpt.save(a, tmp_path / "a.safetensors")
    image = (tmp_path / "a.safetensors").read_bytes()
    assert path.read_bytes()[7 : 7 + len(image)] == image


def test_unbuffered_and_read_write_files(tmp_path: Path) -> None:
    state = small_state()
    path = tmp_path / "m"
    with open(path, "wb", buffering=0) as f:
        zerockpt.save(state, f)
    with open(path, "r+b") as f:
        assert_loaded(zerockpt.load(f), state)
        f.seek(0)
        zerockpt.save({"z": torch.ones(2)}, f)  # overwrite in place
    with open(path, "rb", buffering=0) as f:
        assert_dicts_bitwise_equal(zerockpt.load(f), {"z": torch.ones(2)})


def test_open_file_is_mapped_from_its_descriptor(tmp_path: Path) -> None:
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc/self/maps")
    path = tmp_path / "m.safetensors"
    zerockpt.save({"w": torch.randn(1 << 16)}, path)
    with open(path, "rb") as f:
        path.unlink()  # a load that reopened the name would fail now
        w = zerockpt.load(f)["w"]
    address = w.data_ptr()
    mapped = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= address < hi:
                mapped.append(line)
    assert mapped and str(path) in mapped[0] and "(deleted)" in mapped[0], mapped
    w.add_(1)  # private mapping: writable


def test_append_mode_file(tmp_path: Path) -> None:
    state = small_state()
    path = tmp_path / "log"
    path.write_bytes(b"0123")
    with open(path, "ab") as f:
        zerockpt.save(state, f)
    with open(path, "rb") as f:
        f.seek(4)
        assert_loaded(zerockpt.load(f, verify=True), state)


# --- streams -----------------------------------------------------------------------------------


class WriteOnly:
    """A minimal writer: write() only; optionally takes at most `limit` bytes per call."""

    def __init__(self, limit: int | None = None, returns: bool = True) -> None:
        self.chunks: list[bytes] = []
        self.limit = limit
        self.returns = returns

    def write(self, data: Any) -> int | None:
        view = memoryview(data)
        if self.limit is not None:
            view = view[: self.limit]
        self.chunks.append(bytes(view))
        return len(view) if self.returns else None


class ReadOnly:
    """A minimal reader: read(n) only, at most `limit` bytes per call."""

    def __init__(self, data: bytes, limit: int = 1 << 30) -> None:
        self.data, self.pos, self.limit = data, 0, limit

    def read(self, n: int = -1) -> bytes:
        n = len(self.data) - self.pos if n < 0 else min(n, self.limit)
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out


@pytest.mark.parametrize(("limit", "returns"), [(None, True), (None, False), (1000, True)])
@pytest.mark.parametrize("checksums", [True, False])
def test_write_only_streams(limit: int | None, returns: bool, checksums: bool) -> None:
    state = small_state()
    sink = WriteOnly(limit, returns)
    zerockpt.save(state, sink, checksums=checksums)
    data = b"".join(sink.chunks)
    assert data == zerockpt.save_bytes(state, checksums=checksums)
    source = ReadOnly(data + b"more", limit=333)
    assert_loaded(zerockpt.load(source, verify=checksums), state)
    assert source.read() == b"more"


def test_pipes_both_ways() -> None:
    state = mixed_state(300_000)
    r, w = os.pipe()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            with open(w, "wb") as out:
                zerockpt.save(state, out)
                out.write(b"after")
        except BaseException as e:  # reported by the test
            errors.append(e)

    thread = threading.Thread(target=writer)
    thread.start()
    with open(r, "rb") as source:
        loaded = zerockpt.load(source, verify=True)
        assert source.read() == b"after"
    thread.join()
    assert not errors
    assert_dicts_bitwise_equal(loaded, state)
    assert loaded["tied"] is loaded["w"]


def test_gzip_file_is_a_stream_not_its_descriptor(tmp_path: Path) -> None:
    state = small_state()
    with gzip.open(tmp_path / "m.gz", "wb") as f:
        zerockpt.save(state, f)
    assert gzip.decompress((tmp_path / "m.gz").read_bytes()) == zerockpt.save_bytes(state)
    with gzip.open(tmp_path / "m.gz", "rb") as f:
        assert_loaded(zerockpt.load(f, verify=True), state)


def test_large_multichunk_state_through_streams() -> None:
    state = mixed_state()
    stream = io.BytesIO()
    zerockpt.save(state, stream)
    assert stream.getvalue() == zerockpt.save_bytes(state)
    sink = WriteOnly()
    zerockpt.save(state, sink)
    assert b"".join(sink.chunks) == stream.getvalue()
    stream.seek(0)
    assert_dicts_bitwise_equal(zerockpt.load(stream, mmap=False, verify=True), state)


# --- misuse and errors -------------------------------------------------------------------------


def test_closed_text_and_wrong_direction_objects(tmp_path: Path) -> None:
    state = {"w": torch.ones(2)}
    closed = io.BytesIO()
    closed.close()
    with pytest.raises(ValueError, match="closed"):
        zerockpt.save(state, closed)
    with pytest.raises(ValueError, match="closed"):
        zerockpt.load(closed)
    with pytest.raises(TypeError, match="text-mode"):
        zerockpt.save(state, io.StringIO())
    with open(tmp_path / "t", "w") as text, pytest.raises(TypeError, match="'wb'"):
        zerockpt.save(state, text)
    (tmp_path / "r").write_bytes(zerockpt.save_bytes(state))
    with open(tmp_path / "r", "rb") as f, pytest.raises(ValueError, match="not writable"):
        zerockpt.save(state, f)
    with open(tmp_path / "w", "wb") as f, pytest.raises(ValueError, match="not readable"):
        zerockpt.load(f)
    with pytest.raises(ValueError, match="not readable"):
        zerockpt.load(WriteOnly())  # type: ignore[arg-type]


def test_options_that_need_a_path() -> None:
    state = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match=r"max_shard_size.*path"):
        zerockpt.save(state, io.BytesIO(), max_shard_size="1MB")
    with pytest.raises(ValueError, match=r"direct_io.*path"):
        zerockpt.save(state, io.BytesIO(), direct_io=True)
    for options in ({"durable": True, "direct_io": False}, {"durable": False, "threads": 1}):
        stream = io.BytesIO()
        zerockpt.save(state, stream, **options)  # type: ignore[arg-type]
        assert stream.getvalue() == zerockpt.save_bytes(state)


def test_writer_errors_propagate() -> None:
    class Full:
        written = 0

        def write(self, data: Any) -> int:
            if self.written > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(memoryview(data))
            return len(memoryview(data))

    with pytest.raises(OSError) as info:
        zerockpt.save(mixed_state(100_000), Full())
    assert info.value.errno == errno.ENOSPC

    class Zero:
        def write(self, data: Any) -> int:
            return 0

    with pytest.raises(OSError, match="returned 0"):
        zerockpt.save({"w": torch.ones(2)}, Zero())


def test_writer_cannot_keep_the_memory() -> None:
    kept: list[memoryview] = []

    class Keeper:
        def write(self, data: memoryview) -> int:
            kept.append(data)
            return len(data)

    zerockpt.save({"w": torch.ones(4)}, Keeper(), checksums=False)
    with pytest.raises(ValueError, match="released"):
        bytes(kept[0])


def test_real_file_write_error(tmp_path: Path) -> None:
    with open(tmp_path / "m", "wb") as f:
        _C._inject_fault("write", errno.EIO)
        try:
            with pytest.raises(OSError) as info:
                zerockpt.save({"w": torch.ones(10)}, f)
        finally:
            _C._clear_faults()
    assert info.value.errno == errno.EIO and info.value.filename == str(tmp_path / "m")


def valid_file() -> bytes:
    return zerockpt.save_bytes({"a": torch.arange(6, dtype=torch.int16), "b": torch.ones(3)})


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "too small"),
        (b"\x01\x02", "too small"),
        (struct.pack("<Q", 2**63) + b"{}", "exceeds"),
        (struct.pack("<Q", 1000) + b"{}", "header length 1000"),
        (struct.pack("<Q", 5) + b"nope!", "<bytes>"),
        (struct.pack("<Q", 2) + b"{}" + b"x", "hole"),
    ],
)
def test_load_bytes_of_garbage(data: bytes, words: str) -> None:
    with pytest.raises(zerockpt.FormatError, match=words):
        zerockpt.load_bytes(data)
    if words != "hole":  # a stream may hold more after the file: it is not the file's
        with pytest.raises(zerockpt.FormatError):
            zerockpt.load(io.BytesIO(data))


def test_huge_header_length_from_a_stream_reads_nothing_more() -> None:
    source = ReadOnly(struct.pack("<Q", 2**40) + b"{" * 100)
    with pytest.raises(zerockpt.FormatError, match="exceeds"):
        zerockpt.load(source)
    assert source.pos == 8


def test_every_truncation_is_a_format_error() -> None:
    data = valid_file()
    for cut in range(len(data)):
        with pytest.raises(zerockpt.FormatError, match="<bytes>"):
            zerockpt.load_bytes(data[:cut])
        with pytest.raises(zerockpt.FormatError, match=r"offset|too few|truncated"):
            zerockpt.load(ReadOnly(data[:cut], limit=7))


def test_trailing_bytes_in_load_bytes() -> None:
    with pytest.raises(zerockpt.FormatError, match="belong to no tensor"):
        zerockpt.load_bytes(valid_file() + b"\0")


def test_random_corruption_never_crashes() -> None:
    data = valid_file()
    rng = random.Random(0)
    for _ in range(300):
        bad = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            bad[rng.randrange(len(bad))] = rng.randrange(256)
        # A dtype torch lacks is a TypeError; everything else a FormatError.
        with contextlib.suppress(zerockpt.FormatError, TypeError):
            zerockpt.load_bytes(bad, verify=True)


def test_checksum_error_names_the_tensor() -> None:
    data = bytearray(valid_file())
    data[-1] ^= 0xFF
    with pytest.raises(zerockpt.ChecksumError, match=r"1 of 2 tensors.*'a' \(bytes"):
        zerockpt.load_bytes(data, verify=True)


# --- devices -----------------------------------------------------------------------------------


@pytest.fixture
def host_staging() -> Any:
    """CPU tensors take the device staging paths (the device pipeline without a device)."""
    _C._stage_host_tensors(True)
    yield
    _C._stage_host_tensors(False)


def test_staging_pipeline_through_bytes_and_streams(host_staging: None) -> None:
    state = mixed_state(3_000_000)
    data = zerockpt.save_bytes(state)
    _C._stage_host_tensors(False)
    assert data == zerockpt.save_bytes(state)
    _C._stage_host_tensors(True)
    assert_dicts_bitwise_equal(zerockpt.load_bytes(data, staging_bytes=8 << 20), state)
    sink = WriteOnly()
    zerockpt.save(state, sink)
    assert b"".join(sink.chunks) == data


@pytest.fixture(params=accel.DEVICE_TYPES)
def device(request: pytest.FixtureRequest) -> Any:
    """Device 0 of each device type that is here (zpu: random stream delays, and no queued
    work may touch device memory after it was freed)."""
    reason = accel.why_not(request.param)
    if reason is not None:
        pytest.skip(reason)
    zpu = request.param == "zpu"
    if zpu:
        accel.set_delay(0, 100)
    violations = accel.violations() if zpu else 0
    yield torch.device(request.param, 0)
    accel.synchronize(torch.device(request.param, 0))
    if zpu:
        assert accel.violations() == violations, "device memory used after it was freed"


@pytest.mark.device
def test_accelerator_through_bytes_and_file_objects(tmp_path: Path, device: torch.device) -> None:
    state = small_state()
    on_device = {k: v.to(device) for k, v in state.items()}
    on_device["tied"] = on_device["f32"]
    data = zerockpt.save_bytes(on_device)
    assert data == zerockpt.save_bytes(state)
    loaded = zerockpt.load_bytes(data, device=device, verify=True)
    assert all(t.device == device for t in loaded.values())
    assert loaded["tied"] is loaded["f32"]
    assert_dicts_bitwise_equal({k: v.cpu() for k, v in loaded.items()}, state)
    with open(tmp_path / "m", "wb") as f:
        f.write(b"xy")
        zerockpt.save(on_device, f)
    with open(tmp_path / "m", "rb") as f:
        f.seek(2)
        loaded = zerockpt.load(f, device=device)
    assert_dicts_bitwise_equal({k: v.cpu() for k, v in loaded.items()}, state)
    sink = WriteOnly()
    zerockpt.save(on_device, sink)
    assert b"".join(sink.chunks) == data
    stream = io.BytesIO(data)
    loaded = zerockpt.load(stream, device=device)
    assert_dicts_bitwise_equal({k: v.cpu() for k, v in loaded.items()}, state)


@pytest.mark.parametrize("kind", ["bytesio", "file"])
def test_in_one_stream_with_pickle_and_torch_save(tmp_path: Path, kind: str) -> None:
    """torch.save/torch.load write and read from the position (what follows a torch archive is
    not supported by torch.load); zerockpt does the same and also leaves the position just
    after its file, so it interleaves with pickle and precedes a torch archive."""
    a, b = small_state(), {"x": torch.randn(5), "y": torch.arange(4)}
    f: Any = io.BytesIO() if kind == "bytesio" else open(tmp_path / "mixed", "w+b")  # noqa: SIM115
    with f:
        pickle.dump({"epoch": 3}, f)
        zerockpt.save(a, f)
        pickle.dump("between", f)
        zerockpt.save(b, f, checksums=False)
        torch.save(b, f)
        f.seek(0)
        assert pickle.load(f) == {"epoch": 3}
        assert_loaded(zerockpt.load(f, verify=True), a)
        assert pickle.load(f) == "between"
        assert_dicts_bitwise_equal(zerockpt.load(f), b)
        assert_dicts_bitwise_equal(torch.load(f), b)


def test_progress_bar_with_file_objects(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    state = small_state()
    sink = WriteOnly()
    zerockpt.save(state, sink, progress=True)
    assert_loaded(zerockpt.load(ReadOnly(b"".join(sink.chunks)), progress=True), state)
    assert_loaded(
        zerockpt.load_bytes(zerockpt.save_bytes(state, progress=True), progress=True), state
    )
    assert "Saving <WriteOnly>" in capsys.readouterr().err
