"""The device pipeline on real device streams: save, load(device=...), load_state_dict,
save_async and the DCP Writer with accelerator tensors, bitwise against the source.

Each test runs on every device type of ``accel.DEVICE_TYPES`` that is here: "zpu", the test
accelerator (tests/accel: every queued copy runs on a stream worker after a random delay, freed
memory is poisoned), and "cuda"; each skips cleanly where its device is missing. Producers and
consumers on busy or side streams are built by the tests themselves.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import accel
import pytest
import torch
import torch.distributed.checkpoint as dcp
import zerockpt
import zerockpt.dcp
from conftest import (
    Net,
    assert_bitwise_equal,
    assert_dicts_bitwise_equal,
    filled,
    mixed_state,
    settled,
)
from torch import nn
from zerockpt import _C
from zerockpt._args import save_options

pytestmark = pytest.mark.device

CHUNK = _C.CHUNK_BYTES
MiB = 1 << 20


@pytest.fixture(params=accel.DEVICE_TYPES)
def device(request: pytest.FixtureRequest) -> Iterator[torch.device]:
    """Device 0 of each device type; zpu with random delays unless ZPU_DELAY_US sets them, and
    no queued work that touched device memory after its owner freed it (zpu checks each)."""
    reason = accel.why_not(request.param)
    if reason is not None:
        pytest.skip(reason)
    zpu = request.param == "zpu"
    if zpu and "ZPU_DELAY_US" not in os.environ:
        accel.set_delay(0, 100)
    violations = accel.violations() if zpu else 0
    yield torch.device(request.param, 0)
    for index in range(2 if zpu else 1):
        accel.synchronize(torch.device(request.param, index))
    if zpu:
        assert accel.violations() == violations, "device memory used after it was freed"


def second_device(device: torch.device) -> torch.device:
    count = torch.cuda.device_count() if device.type == "cuda" else 2
    return torch.device(device.type, 1 if count > 1 else 0)


def stats() -> dict[str, Any]:
    return _C._device_staging_stats()


def device_state(device: torch.device) -> dict[str, torch.Tensor]:
    """mixed_state on `device` (views made there), a tensor on a second device, a CPU one."""
    state = {k: v.to(device) for k, v in mixed_state().items() if k not in ("tied", "cx", "neg")}
    source = mixed_state()
    state["wt"] = source["wt"].t().contiguous().to(device).t()  # strided on the device
    state["cx"] = source["cx"].resolve_conj().conj().to(device).conj()  # a conj view there
    state["neg"] = torch.randn(64, dtype=torch.complex64).to(device).conj().imag  # a neg view
    assert state["cx"].is_conj() and state["neg"].is_neg() and not state["wt"].is_contiguous()
    state["tied"] = state["w"]
    state["other"] = torch.arange(70_000.0).to(second_device(device))
    state["cpu_side"] = torch.arange(1000.0)
    return state


def on_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: v.cpu() for k, v in state.items()}
    out["tied"] = out["w"]
    return out


# ---------------------------------------------------------------------------------------------
# Save


@pytest.mark.parametrize("direct_io", [False, True], ids=["buffered", "direct"])
def test_save_of_mixed_state_writes_what_the_cpu_copy_writes(
    tmp_path: Path, device: torch.device, direct_io: bool
) -> None:
    state = device_state(device)
    expected = on_cpu(state)
    zerockpt.save(state, tmp_path / "dev.safetensors", direct_io=direct_io, staging_bytes=16 * MiB)
    s = stats()
    assert s["pinned"] and s["in_use"] == 0 and s["max_in_use"] <= s["buffers"] <= 2
    zerockpt.save(expected, tmp_path / "cpu.safetensors", direct_io=direct_io)
    written = (tmp_path / "dev.safetensors").read_bytes()
    assert written == (tmp_path / "cpu.safetensors").read_bytes()
    from safetensors.torch import load_file

    other = load_file(tmp_path / "dev.safetensors")
    for k, v in expected.items():
        if k != "tied":
            assert_bitwise_equal(other[k], v.resolve_conj().resolve_neg())


@pytest.mark.parametrize("side_stream", [False, True], ids=["current", "side"])
def test_save_waits_for_a_busy_producer_stream(
    tmp_path: Path, device: torch.device, side_stream: bool
) -> None:
    x = torch.zeros(24 * MiB // 4).to(device)
    y = torch.arange(24 * MiB // 4, dtype=torch.float32).to(device)
    z = torch.zeros(1000, dtype=torch.int64).to(second_device(device))
    stream = accel.new_stream(device) if side_stream else torch.accelerator.current_stream(device)
    with accel.on_stream(stream):
        accel.sleep_on_current_stream(device, 200)  # still queued when save starts
        x.copy_(y)  # device to device, after the sleep
        z.fill_(7)
        zerockpt.save({"x": x, "z": z}, tmp_path / "x.safetensors", staging_bytes=8 * MiB)
        loaded = zerockpt.load(tmp_path / "x.safetensors")
    assert_bitwise_equal(loaded["x"], y.cpu())
    assert bool((loaded["z"] == 7).all())


def test_save_of_a_tensor_freed_right_after(tmp_path: Path, device: torch.device) -> None:
    # The strided tensor's dense copy is made and freed inside save: its memory must outlive
    # every copy that reads it.
    source = torch.randn(2048, 1024)
    t = source.t().contiguous().to(device).t()
    accel.sleep_on_current_stream(device, 50)
    zerockpt.save({"t": t}, tmp_path / "t.safetensors", staging_bytes=8 * MiB)
    del t
    assert_bitwise_equal(zerockpt.load(tmp_path / "t.safetensors")["t"], source)


def test_save_async_snapshots_device_tensors(tmp_path: Path, device: torch.device) -> None:
    torch.manual_seed(0)
    w = torch.randn(1024, 1024).to(device)
    h = torch.randn(512, 256).bfloat16().to(device)
    c = torch.randn(64, 32, dtype=torch.complex64).to(device)
    cpu = torch.randn(300, 7)
    w2 = torch.randn(1024, 1024)
    expected = {
        "w": w2.clone(),  # queued behind a sleep, not yet run, at the call
        "h.t": h.cpu().t(),
        "c.conj": c.cpu().conj().resolve_conj(),
        "cpu.t": cpu.t().clone(),
        "other": torch.arange(5000.0),
        "tied.a": w2.clone(),
        "tied.b": w2.clone(),
    }
    other = torch.arange(5000.0).to(second_device(device))
    w2_dev = w2.to(device)
    accel.sleep_on_current_stream(device, 100)
    w.copy_(w2_dev)  # queued on the current stream: the snapshot must come after it
    state = {
        "w": w,
        "h.t": h.t(),
        "c.conj": c.conj(),
        "cpu.t": cpu.t(),
        "other": other,
        "tied.a": w,
        "tied.b": w,
    }
    pending = zerockpt.save_async(state, tmp_path / "dev.safetensors")
    assert _C.snapshot_stats()[2] is True  # pinned
    # Changed right after the call, on another stream that waits for nothing: the snapshot
    # is already taken.
    with accel.on_stream(accel.new_stream(device)):
        w.fill_(-1)
        h.fill_(0)
        c.fill_(0)
    other.fill_(0)
    cpu.zero_()
    pending.result()
    loaded = zerockpt.load(tmp_path / "dev.safetensors", verify=True)
    assert_dicts_bitwise_equal(loaded, expected)
    zerockpt.release_snapshot_buffer()


def test_dcp_writer_with_device_items(tmp_path: Path, device: torch.device) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.Linear(1024, 64))
    source = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(device)
    accel.sleep_on_current_stream(device, 50)
    state = {"model": model.state_dict(), "step": torch.tensor(3)}
    dcp.save(state, storage_writer=zerockpt.dcp.Writer(tmp_path / "ckpt"), no_dist=True)
    # Load into CPU tensors and into device tensors.
    cpu_target = {"model": {k: torch.zeros_like(v) for k, v in source.items()}}
    cpu_target["step"] = torch.tensor(0)  # type: ignore[assignment]
    dcp.load(cpu_target, storage_reader=zerockpt.dcp.Reader(tmp_path / "ckpt"), no_dist=True)
    assert_dicts_bitwise_equal(cpu_target["model"], source)
    assert int(cpu_target["step"]) == 3  # type: ignore[call-overload]
    dev_target = {"model": {k: torch.zeros_like(v).to(device) for k, v in source.items()}}
    dcp.load(dev_target, storage_reader=zerockpt.dcp.Reader(tmp_path / "ckpt"), no_dist=True)
    assert_dicts_bitwise_equal({k: v.cpu() for k, v in dev_target["model"].items()}, source)


@pytest.mark.parametrize("how", ["write-error", "cancel"])
def test_failed_save_is_done_with_the_tensors_when_it_returns(
    tmp_path: Path, device: torch.device, how: str
) -> None:
    # The caller may free its tensors once save has raised: no copy may still read them.
    path = tmp_path / "x.safetensors"
    state = {f"t{i}": torch.full((MiB,), float(i)).to(device) for i in range(12)}
    progress = _C.Progress()
    accel.sleep_on_current_stream(device, 100)  # the side stream's copies wait for this
    if how == "cancel":
        progress.cancel()
    else:
        _C._inject_fault("write", errno.EIO, after=0)
    try:
        with pytest.raises(KeyboardInterrupt if how == "cancel" else OSError):
            _C.save(
                state,
                str(path),
                save_options(durable=False, threads=2, staging_bytes=16 * MiB),
                None,
                progress,
            )
    finally:
        _C._clear_faults()
    del state  # freed on the current stream, reusable there at once
    assert stats()["in_use"] == 0 and not path.exists()


# ---------------------------------------------------------------------------------------------
# Load


def test_load_to_device_is_ready_on_a_side_stream(tmp_path: Path, device: torch.device) -> None:
    state = mixed_state()
    path = tmp_path / "m.safetensors"
    zerockpt.save(state, path)
    stream = accel.new_stream(device)
    with accel.on_stream(stream):
        accel.sleep_on_current_stream(device, 50)
        loaded = zerockpt.load(path, device=device, staging_bytes=8 * MiB)
        copies = {k: v.cpu() for k, v in loaded.items()}  # on the same stream, no sync
    assert stats()["pinned"]
    for k, v in state.items():
        assert loaded[k].device == device
        assert_bitwise_equal(copies[k], v)
    assert loaded["tied"] is loaded["w"]


def test_load_to_another_device_with_verify(tmp_path: Path, device: torch.device) -> None:
    state = mixed_state()
    zerockpt.save(state, tmp_path / "m.safetensors")
    other = second_device(device)
    verified = zerockpt.load(tmp_path / "m.safetensors", device=other, verify=True)
    assert verified["big"].device == other
    assert_dicts_bitwise_equal({k: v.cpu() for k, v in verified.items()}, state)


def test_sharded_load_to_device(tmp_path: Path, device: torch.device) -> None:
    state = mixed_state()
    zerockpt.save(state, tmp_path / "shards", max_shard_size="8MB")
    assert len(list((tmp_path / "shards").glob("*.safetensors"))) > 1
    loaded = zerockpt.load(tmp_path / "shards", device=device, staging_bytes=8 * MiB)
    assert all(v.device == device for v in loaded.values())
    assert_dicts_bitwise_equal({k: v.cpu() for k, v in loaded.items()}, state)


def big_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(4)])  # 67 MB in f32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_state_dict_in_place_without_a_second_copy(
    tmp_path: Path, device: torch.device, dtype: torch.dtype
) -> None:
    path = tmp_path / "big.safetensors"
    zerockpt.save(big_model(), path)
    model = big_model().to(device, dtype)
    expected = big_model().to(dtype)
    pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    # Queued work that overwrites every parameter: the load must land after it.
    accel.sleep_on_current_stream(device, 100)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0)
    accel.reset_peak_memory_stats(device)
    before = accel.memory_allocated(device)
    zerockpt.load_state_dict(model, path, threads=2, staging_bytes=16 * MiB)
    extra = accel.max_memory_allocated(device) - before
    model_bytes = sum(v.nbytes for v in model.state_dict().values())
    # Conversions use a chunk-sized temporary per reader thread on the device, never a
    # model-sized copy; same-dtype loads none at all.
    assert extra <= (0 if dtype == torch.float32 else 2 * CHUNK)
    assert model_bytes > 4 * CHUNK
    for k, v in expected.state_dict().items():
        got = model.state_dict()[k]
        assert got.data_ptr() == pointers[k]
        assert_bitwise_equal(got.cpu(), v)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_load_state_dict_consumed_on_a_side_stream(
    tmp_path: Path, device: torch.device, dtype: torch.dtype
) -> None:
    source = filled(Net(), 1)
    zerockpt.save(source, tmp_path / "net.safetensors")
    model = filled(Net(), 2).to(device, dtype)
    stream = accel.new_stream(device)
    with accel.on_stream(stream):
        zerockpt.load_state_dict(model, tmp_path / "net.safetensors", staging_bytes=8 * MiB)
        got = {k: v.cpu() for k, v in model.state_dict().items()}  # same stream, no sync
    for k, v in source.state_dict().items():
        assert_bitwise_equal(got[k], v.to(dtype) if v.is_floating_point() else v)


@pytest.mark.parametrize("sharded", [False, True], ids=["file", "shards"])
def test_load_state_dict_into_a_mixed_device_model(
    tmp_path: Path, device: torch.device, sharded: bool
) -> None:
    source = filled(Net(), 1)
    src = tmp_path / ("shards" if sharded else "net.safetensors")
    zerockpt.save(source, src, **({"max_shard_size": "5MB"} if sharded else {}))
    model = filled(Net(), 2)
    model.a.to(device)  # the rest stays on the CPU
    model.b.to(second_device(device))
    zerockpt.load_state_dict(model, src)
    for k, v in source.state_dict().items():
        assert_bitwise_equal(model.state_dict()[k].cpu(), v)


@pytest.mark.parametrize("fail_at", [1, 2, 5])
def test_failed_load_state_dict_writes_no_foreign_bytes(
    tmp_path: Path, device: torch.device, fail_at: int
) -> None:
    # A device allocation fails in the middle of the first batch (the conversion temporary of
    # a slab), with copies from the batch's buffer already queued behind a slow kernel, while
    # the other reader thread waits for that buffer: every parameter ends up either untouched
    # or loaded, never with bytes of another batch.
    if device.type != "zpu":
        pytest.skip("needs allocation failures injected by the test accelerator")

    def layers(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(*[nn.Linear(512, 512) for _ in range(12)])  # 12 x 1 MiB: 2 batches

    source = layers(1)
    zerockpt.save(source, tmp_path / "net.safetensors")
    model = layers(2).to(device, torch.bfloat16)
    old = {k: v.cpu() for k, v in model.state_dict().items()}
    accel.sleep_on_current_stream(device, 100)
    torch.ops.zpu.fail_allocation(fail_at)
    try:
        with pytest.raises(torch.OutOfMemoryError):
            zerockpt.load_state_dict(
                model, tmp_path / "net.safetensors", threads=2, staging_bytes=8 * MiB
            )
    finally:
        torch.ops.zpu.fail_allocation(-1)
    got = {k: v.cpu() for k, v in model.state_dict().items()}
    for k, v in source.state_dict().items():
        new = (v.to(torch.bfloat16) if v.is_floating_point() else v).reshape(-1)
        # Dense targets are cut into slabs of one chunk of stored bytes each.
        per = CHUNK // v.element_size()
        for at in range(0, new.numel(), per):
            piece = got[k].reshape(-1)[at : at + per]
            was = old[k].reshape(-1)[at : at + per]
            assert torch.equal(piece, was) or torch.equal(piece, new[at : at + per]), (k, at)


def test_load_state_dict_from_a_loaded_host_dict(tmp_path: Path, device: torch.device) -> None:
    source = filled(Net(), 3)
    zerockpt.save(source, tmp_path / "shards", max_shard_size="5MB")
    model = filled(Net(), 4).to(device)
    with accel.on_stream(accel.new_stream(device)):
        zerockpt.load_state_dict(model, zerockpt.load(tmp_path / "shards"))  # mapped tensors
        got = {k: v.cpu() for k, v in model.state_dict().items()}
    assert_dicts_bitwise_equal(got, dict(source.state_dict()))


# ---------------------------------------------------------------------------------------------
# The test accelerator itself: asynchronous, and hostile to late readers.


@pytest.fixture
def zpu() -> torch.device:
    reason = accel.why_not("zpu")
    if reason is not None:
        pytest.skip(reason)
    return torch.device("zpu", 0)


def test_zpu_copies_and_events_are_asynchronous(zpu: torch.device) -> None:
    x = torch.arange(1000.0).to(zpu)
    host = torch.zeros(1000, pin_memory=True)
    assert host.is_pinned()
    accel.sleep_on_current_stream(zpu, 200)
    host.copy_(x, non_blocking=True)
    event = torch.Event(device=zpu)
    event.record(torch.accelerator.current_stream(zpu))
    assert not event.query() and bool((host == 0).all())  # still queued behind the sleep
    event.synchronize()
    assert event.query()
    assert_bitwise_equal(host, torch.arange(1000.0))


def test_zpu_stream_waits_block(zpu: torch.device) -> None:
    x = torch.zeros(1000).to(zpu)
    side = accel.new_stream(zpu)
    with accel.on_stream(side):
        accel.sleep_on_current_stream(zpu, 150)
        x.fill_(1)
        done = torch.Event(device=zpu)
        done.record(side)
    current = torch.accelerator.current_stream(zpu)
    current.wait_event(done)
    assert_bitwise_equal(x.cpu(), torch.ones(1000))  # the blocking copy ran after the wait


def test_zpu_poisons_freed_pinned_memory_after_its_copies(zpu: torch.device) -> None:
    x = torch.arange(4096.0).to(zpu)
    before = torch.ops.zpu.pinned_blocks()
    host = torch.empty(4096, pin_memory=True)
    address, nbytes = host.data_ptr(), host.nbytes
    accel.sleep_on_current_stream(zpu, 100)
    host.copy_(x, non_blocking=True)
    del host  # freed with its copy still queued: kept until the copy has run
    assert torch.ops.zpu.pinned_blocks() == before + 1
    accel.synchronize(zpu)
    # Released once the copy has run (with torch 2.11's synchronize, a moment after it returns).
    assert settled(torch.ops.zpu.pinned_blocks, before, limit=5) == before
    # Poisoned, not the copied values (the backend holds freed memory back from reuse).
    assert ctypes.string_at(address, nbytes) == b"\xa5" * nbytes
