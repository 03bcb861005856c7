"""The device staging pipeline: save from and load to accelerator memory through a bounded pool
of pinned chunk buffers.

Without a GPU, the same code runs for CPU tensors while ``_C._stage_host_tensors(True)`` is on
(plain page-aligned buffers, synchronous copies): chunking, pool accounting, ordering and the
error paths are tested here on the CPU, with torch (and an unstaged save) as the oracle. The
real pipeline, with asynchronous copies on device streams, is tested in test_device.py.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import zerockpt
from conftest import (
    Net,
    assert_bitwise_equal,
    assert_dicts_bitwise_equal,
    filled,
    mixed_state,
    temp_leftovers,
)
from zerockpt import _C
from zerockpt._args import save_options

CHUNK = _C.CHUNK_BYTES
MiB = 1 << 20


@pytest.fixture
def staged() -> Iterator[None]:
    """CPU tensors take the staged paths for the duration of the test."""
    _C._stage_host_tensors(True)
    try:
        yield
    finally:
        _C._stage_host_tensors(False)


def stats() -> dict[str, Any]:
    return _C._device_staging_stats()


def file_chunks_with_tensors(path: Path) -> list[int]:
    """Offsets of the CHUNK-sized file chunks that hold tensor bytes, from the header."""
    f = _C._File(str(path))
    chunks: set[int] = set()
    names: list[str] = f.keys()
    for name in names:
        _, _, begin, end, alias_of = f.info(name)
        if alias_of is not None or begin == end:
            continue
        first, last = f.data_start + begin, f.data_start + end - 1
        chunks.update(range(first // CHUNK, last // CHUNK + 1))
    return [k * CHUNK for k in sorted(chunks)]


def stored_bytes(path: Path) -> int:
    f = _C._File(str(path))
    names: list[str] = f.keys()
    infos = [f.info(name) for name in names]
    return sum(end - begin for _, _, begin, end, alias_of in infos if alias_of is None)


# ---------------------------------------------------------------------------------------------
# Save: chunks staged ahead of the writers, same bytes as an unstaged save.


@pytest.mark.parametrize("direct_io", [False, True], ids=["buffered", "direct"])
@pytest.mark.parametrize("staging_mib", [8, 16, 256])
@pytest.mark.parametrize("checksums", [True, False], ids=["crc", "nocrc"])
def test_staged_save_writes_the_same_file(
    tmp_path: Path, direct_io: bool, staging_mib: int, checksums: bool
) -> None:
    state = mixed_state()
    plain = tmp_path / "plain.safetensors"
    zerockpt.save(state, plain, direct_io=direct_io, checksums=checksums)
    _C._stage_host_tensors(True)
    try:
        out = tmp_path / "staged.safetensors"
        zerockpt.save(
            state, out, direct_io=direct_io, checksums=checksums, staging_bytes=staging_mib * MiB
        )
    finally:
        _C._stage_host_tensors(False)
    assert out.read_bytes() == plain.read_bytes()
    s = stats()
    # Bounded pool: no more buffers than asked for, never more held than it has.
    assert 1 <= s["buffers"] <= staging_mib * MiB // CHUNK
    assert 1 <= s["max_in_use"] <= s["buffers"] and s["in_use"] == 0
    assert not s["pinned"]
    # Every chunk with tensor bytes went through the pool once, in file order.
    assert s["order"] == file_chunks_with_tensors(out)
    assert s["chunks"] == len(s["order"])
    assert s["bytes"] == stored_bytes(out)
    loaded = zerockpt.load(out)
    for k, v in state.items():
        assert_bitwise_equal(loaded[k], v)
    assert loaded["tied"] is loaded["w"]


def test_small_saves_take_only_the_buffers_they_need(tmp_path: Path, staged: None) -> None:
    zerockpt.save({"a": torch.ones(10), "b": torch.zeros(3, 3)}, tmp_path / "s.safetensors")
    s = stats()
    assert s["chunks"] == 1 and s["buffers"] <= 3  # not the 32 of a default 256 MiB pool
    assert s["copies"] == 2 and s["bytes"] == 4 * 10 + 4 * 9


def test_one_buffer_with_many_threads_still_completes(tmp_path: Path, staged: None) -> None:
    # Writers wait for the only buffer in turn: the pipeline degrades to serial, never deadlocks.
    state = {f"t{i}": torch.full((3 * MiB // 4,), float(i)) for i in range(12)}  # 36 MiB
    zerockpt.save(state, tmp_path / "one.safetensors", staging_bytes=CHUNK, threads=4)
    s = stats()
    assert s["buffers"] == 1 and s["max_in_use"] == 1 and s["chunks"] == 5
    loaded = zerockpt.load(tmp_path / "one.safetensors")
    _C._stage_host_tensors(False)
    assert_dicts_bitwise_equal(zerockpt.load(tmp_path / "one.safetensors"), state)
    assert_dicts_bitwise_equal(loaded, state)


def test_staged_and_host_sources_share_chunks(tmp_path: Path) -> None:
    # A state whose small tensors sit in the same chunk as parts of big ones: the staged bytes
    # and the header share the buffer the writer sends.
    state = {"a": torch.randn(10), "b": torch.randn(3 * MiB), "c": torch.arange(7)}
    zerockpt.save(state, tmp_path / "plain.safetensors", direct_io=True)
    with_staging(lambda: zerockpt.save(state, tmp_path / "st.safetensors", direct_io=True))
    assert (tmp_path / "st.safetensors").read_bytes() == (
        tmp_path / "plain.safetensors"
    ).read_bytes()


def with_staging(fn: Any) -> Any:
    _C._stage_host_tensors(True)
    try:
        return fn()
    finally:
        _C._stage_host_tensors(False)


def test_sharded_and_nested_saves_are_staged(tmp_path: Path, staged: None) -> None:
    state = {"model": mixed_state(1_000_000), "step": 3, "lr": [0.1, torch.tensor(2.0)]}
    zerockpt.save(state, tmp_path / "nested.safetensors", staging_bytes=16 * MiB)
    assert stats()["chunks"] >= 1
    zerockpt.save(state["model"], tmp_path / "shards", max_shard_size="10MB")
    _C._stage_host_tensors(False)
    nested = zerockpt.load(tmp_path / "nested.safetensors")
    assert nested["step"] == 3 and nested["lr"][0] == 0.1
    assert_bitwise_equal(nested["lr"][1], state["lr"][1])
    for source in (nested["model"], zerockpt.load(tmp_path / "shards")):
        for k, v in state["model"].items():
            assert_bitwise_equal(source[k], v)


def test_concurrent_staged_saves_use_separate_pools(tmp_path: Path, staged: None) -> None:
    states = [{"x": torch.full((5 * MiB,), float(i))} for i in range(3)]
    errors: list[BaseException] = []

    def save(i: int) -> None:
        try:
            zerockpt.save(states[i], tmp_path / f"{i}.safetensors", staging_bytes=16 * MiB)
        except BaseException as e:  # re-raised below
            errors.append(e)

    threads = [threading.Thread(target=save, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    _C._stage_host_tensors(False)
    for i in range(3):
        assert_dicts_bitwise_equal(zerockpt.load(tmp_path / f"{i}.safetensors"), states[i])


# ---------------------------------------------------------------------------------------------
# Save errors: nothing at the destination, every buffer back, the next save works.


@pytest.mark.parametrize("direct_io", [False, True], ids=["buffered", "direct"])
@pytest.mark.parametrize("after", [0, 1, 3])
def test_write_failure_mid_pipeline(
    tmp_path: Path, staged: None, direct_io: bool, after: int
) -> None:
    state = mixed_state()
    path = tmp_path / "x.safetensors"
    zerockpt.save({"old": torch.ones(2)}, path)
    _C._inject_fault("write", errno.EIO, after=after)
    try:
        with pytest.raises(OSError) as info:
            zerockpt.save(state, path, staging_bytes=16 * MiB, direct_io=direct_io, threads=2)
    finally:
        _C._clear_faults()
    assert info.value.errno == errno.EIO and info.value.filename == str(path)
    s = stats()
    assert s["in_use"] == 0 and s["max_in_use"] <= s["buffers"]
    assert temp_leftovers(tmp_path) == []
    _C._stage_host_tensors(False)
    assert list(zerockpt.load(path)) == ["old"]  # the earlier file survives
    _C._stage_host_tensors(True)
    zerockpt.save(state, path, staging_bytes=16 * MiB)
    assert zerockpt.load(path)["big"].equal(state["big"])


def test_cancelled_save_commits_nothing(tmp_path: Path, staged: None) -> None:
    progress = _C.Progress()
    progress.cancel()
    with pytest.raises(KeyboardInterrupt):
        _C.save(mixed_state(), str(tmp_path / "c"), save_options(threads=2), None, progress)
    assert not (tmp_path / "c").exists() and temp_leftovers(tmp_path) == []


def test_cancel_while_staging_stops_the_producer(tmp_path: Path, staged: None) -> None:
    # Cancelled from another thread while chunks move through a one-buffer pool: whenever the
    # request lands, the save stops with KeyboardInterrupt (or has already committed), and the
    # producer thread is joined with every buffer back.
    state = {f"t{i}": torch.full((MiB,), float(i)) for i in range(40)}  # 160 MiB
    progress = _C.Progress()
    timer = threading.Timer(0.05, progress.cancel)
    timer.start()
    try:
        options = save_options(durable=False, threads=2, staging_bytes=CHUNK)
        _C.save(state, str(tmp_path / "c"), options, None, progress)
        committed = True
    except KeyboardInterrupt:
        committed = False
    timer.join()
    assert stats()["in_use"] == 0 and temp_leftovers(tmp_path) == []
    assert (tmp_path / "c").exists() == committed


# ---------------------------------------------------------------------------------------------
# Load: preads into pool buffers, then copies into the targets.


@pytest.mark.parametrize("staging_mib", [8, 24])
def test_staged_load_matches_the_file(tmp_path: Path, staged: None, staging_mib: int) -> None:
    state = mixed_state()
    path = tmp_path / "m.safetensors"
    _C._stage_host_tensors(False)
    zerockpt.save(state, path)
    _C._stage_host_tensors(True)
    loaded = zerockpt.load(path, staging_bytes=staging_mib * MiB, threads=3)
    assert list(loaded) == list(state)
    for k, v in state.items():
        assert_bitwise_equal(loaded[k], v)
    assert loaded["tied"] is loaded["w"]
    s = stats()
    assert s["in_use"] == 0 and 1 <= s["max_in_use"] <= s["buffers"] <= staging_mib * MiB // CHUNK
    assert s["bytes"] == stored_bytes(path)
    # Each batch filled once (threads take them in any order).
    assert len(set(s["order"])) == len(s["order"]) == s["chunks"]
    assert s["copies"] >= len([k for k, v in state.items() if v.numel() and k != "tied"])
    # Batches pack small tensors together: far fewer buffers filled than tensors copied.
    assert s["chunks"] < s["copies"]


def test_staged_load_verifies_checksums(tmp_path: Path, staged: None) -> None:
    path = tmp_path / "v.safetensors"
    zerockpt.save({"a": torch.arange(1000.0), "b": torch.ones(10)}, path)
    assert zerockpt.load(path, verify=True)["a"].equal(torch.arange(1000.0))
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # inside "b"
    path.write_bytes(bytes(raw))
    with pytest.raises(zerockpt.ChecksumError, match="'b'"):
        zerockpt.load(path, verify=True)


def test_staged_load_of_a_sharded_checkpoint(tmp_path: Path, staged: None) -> None:
    state = mixed_state(2_000_000)
    _C._stage_host_tensors(False)
    zerockpt.save(state, tmp_path / "shards", max_shard_size="5MB")
    _C._stage_host_tensors(True)
    loaded = zerockpt.load(tmp_path / "shards", staging_bytes=8 * MiB)
    for k, v in state.items():
        assert_bitwise_equal(loaded[k], v)


@pytest.mark.parametrize("after", [0, 2])
def test_read_failure_mid_load(tmp_path: Path, staged: None, after: int) -> None:
    path = tmp_path / "r.safetensors"
    zerockpt.save(mixed_state(), path)
    _C._inject_fault("read", errno.EIO, after=after)
    try:
        with pytest.raises(OSError) as info:
            zerockpt.load(path, staging_bytes=8 * MiB, threads=2)
    finally:
        _C._clear_faults()
    assert info.value.errno == errno.EIO and info.value.filename == str(path)
    assert stats()["in_use"] == 0
    assert zerockpt.load(path)["big"].numel() == 5_000_000  # works again


# ---------------------------------------------------------------------------------------------
# load_state_dict into existing tensors through the pool (torch's own load is the oracle).


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_staged_load_state_dict_into_existing_tensors(
    tmp_path: Path, staged: None, dtype: torch.dtype
) -> None:
    source = filled(Net(), 1)
    path = tmp_path / "net.safetensors"
    zerockpt.save(source, path)
    model = filled(Net(), 2).to(dtype)
    expected = filled(Net(), 2).to(dtype)
    expected.load_state_dict(source.state_dict())  # torch converts the same way
    pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    versions = {k: v._version for k, v in model.state_dict().items()}
    result = zerockpt.load_state_dict(model, path, staging_bytes=8 * MiB)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for k, v in expected.state_dict().items():
        got = model.state_dict()[k]
        assert_bitwise_equal(got, v)
        assert got.data_ptr() == pointers[k]  # written in place
        assert got._version == versions[k] + 1  # once, as copy_ bumps it
    s = stats()
    assert s["in_use"] == 0 and s["buffers"] == 1 and s["bytes"] == stored_bytes(path)
    assert model.a.weight.requires_grad and model.a.weight.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_staged_load_state_dict_from_mapped_tensors(
    tmp_path: Path, staged: None, dtype: torch.dtype
) -> None:
    # A dict of a file's mapped tensors (a loaded file, or a sharded checkpoint's shards) goes
    # through the pool too, never straight from pageable memory into device parameters.
    source = filled(Net(), 1)
    _C._stage_host_tensors(False)
    zerockpt.save(source, tmp_path / "net.safetensors")
    zerockpt.save(source, tmp_path / "shards", max_shard_size="5MB")
    mapped = zerockpt.load(tmp_path / "net.safetensors")
    _C._stage_host_tensors(True)
    expected = filled(Net(), 2).to(dtype)
    expected.load_state_dict(source.state_dict())
    for src in (mapped, tmp_path / "shards"):
        model = filled(Net(), 2).to(dtype)
        versions = {k: v._version for k, v in model.state_dict().items()}
        zerockpt.load_state_dict(model, src, staging_bytes=8 * MiB)
        s = stats()
        # The last copy through the pool: norm.bias, 100 stored f32 values.
        assert s["in_use"] == 0 and s["chunks"] == 1 and s["bytes"] == 400
        for k, v in expected.state_dict().items():
            assert_bitwise_equal(model.state_dict()[k], v)
            assert model.state_dict()[k]._version == versions[k] + 1
    # A state dict loaded into its own module overlaps itself: copy_ handles that one.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    zerockpt.load_state_dict(model, model.state_dict())
    assert_dicts_bitwise_equal(dict(model.state_dict()), before)
