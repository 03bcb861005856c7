"""zerockpt.dcp: torch.distributed.checkpoint storage (Writer / Reader) on zerockpt files.

Multi-process resharding on CPU with gloo: world size 2 saves DTensors (Shard(0), Shard(1),
uneven, Replicate), plain tensors and nested optimizer-like state; world sizes 1 (plain full
targets), 2 and 3 (DTensors sharded differently) load it back, bitwise equal to the source, which
every process regenerates from seeds. Single process (no_dist): save/load/async_save round
trips, checkpoint_id, interop of the rank files with safetensors and zerockpt.load, completeness
(the metadata is committed last; a failed save leaves no metadata), hostile metadata
(FormatError naming the file), checksums, views of one storage, and reads that do not read
whole files.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import logging
import os
import pickle
import re
import socket
import time
import types
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
import zerockpt
import zerockpt.dcp
from conftest import (
    assert_bitwise_equal,
    forkserver_context,
    random_tensor,
    read_header,
    temp_leftovers,
)
from torch.distributed.checkpoint.api import CheckpointException

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

C = zerockpt._C


# --- the source state: deterministic, regenerated from seeds in every process ----------------

# fqn: (shape, dtype, seed, placement when world size 2 saves, placement when 2 or 3 load).
# "S0"/"S1": Shard(0)/Shard(1), "R": Replicate, None: a plain tensor.
SPECS: dict[str, tuple[tuple[int, ...], torch.dtype, int, str | None, str | None]] = {
    "model.rows": ((7, 5), torch.float32, 1, "S0", "S1"),  # 7 rows: 4+3, then 3+3+1
    "model.cols": ((4, 7), torch.float64, 2, "S1", "S0"),
    "model.rep": ((5, 3), torch.bfloat16, 3, "R", "S0"),
    "model.bias": ((7,), torch.float16, 4, "S0", "R"),
    "model.ids": ((3, 2), torch.int64, 5, None, None),
    "model.mask": ((9,), torch.bool, 6, None, None),
    "model.table": ((6, 4), torch.int32, 7, None, "S0"),  # plain when saved, a DTensor loaded
    "optim.state.w.exp_avg": ((7, 5), torch.float32, 8, "S0", "S1"),
    "optim.state.w.exp_avg_sq": ((7, 5), torch.float32, 9, "S1", "S0"),
    "optim.state.w.step": ((), torch.float32, 10, None, None),
}

# Non-tensor leaves (DCP pickles them into byte items) and placeholders to load them into.
VALUES = {
    "step": 7,
    "tag": "run-7 \N{GREEK SMALL LETTER ALPHA}",
    "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "name": "adam", "params": ["w"]}],
}
PLACEHOLDERS = {
    "step": 0,
    "tag": "",
    "param_groups": [{"lr": 0.0, "betas": (0.0, 0.0), "name": "", "params": []}],
}


def source_tensors() -> dict[str, torch.Tensor]:
    """The full tensors (random bit patterns: NaN payloads, negative zeros and all)."""
    return {
        fqn: random_tensor(shape, dtype, seed) for fqn, (shape, dtype, seed, _, _) in SPECS.items()
    }


def _set(tree: dict[str, Any], fqn: str, value: Any) -> None:
    *parents, leaf = fqn.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _get(tree: dict[str, Any], fqn: str) -> Any:
    for p in fqn.split("."):
        tree = tree[p]
    return tree


def nested_state(tensors: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """{"model": {...}, "optim": {"state": {"w": {...}}, "param_groups": [...]}, "step", "tag"}."""
    state: dict[str, Any] = {}
    for fqn, t in tensors.items():
        _set(state, fqn, t)
    state["optim"]["param_groups"] = copy.deepcopy(values["param_groups"])
    state["step"] = values["step"]
    state["tag"] = values["tag"]
    return state


def state_values(state: dict[str, Any]) -> dict[str, Any]:
    return {
        "step": state["step"],
        "tag": state["tag"],
        "param_groups": state["optim"]["param_groups"],
    }


def expected_local(full: torch.Tensor, placement: str, rank: int, world_size: int) -> torch.Tensor:
    """The shard of `full` a rank holds: torch.chunk semantics (7 over 3: 3, 3, 1)."""
    if placement == "R":
        return full
    dim = int(placement[1])
    pieces = torch.chunk(full, world_size, dim=dim)
    if rank < len(pieces):
        return pieces[rank]
    shape = list(full.shape)
    shape[dim] = 0
    return full.new_empty(shape)


# --- process groups --------------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    """n distinct free ports (bound at the same time, so the kernel cannot hand one out twice)."""
    with contextlib.ExitStack() as stack:
        socks = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)
        ]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _placements(name: str) -> list[Any]:
    from torch.distributed.tensor import Replicate, Shard

    return [Replicate()] if name == "R" else [Shard(int(name[1]))]


def _make_targets(world_size: int, *, source: bool) -> dict[str, Any]:
    """The state a rank passes to dcp.save (source) or dcp.load (zeros, placeholders)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,)) if world_size > 1 else None
    full = source_tensors()
    tensors: dict[str, Any] = {}
    for fqn, (_, _, _, save_placement, load_placement) in SPECS.items():
        t = full[fqn] if source else torch.zeros_like(full[fqn])
        placement = save_placement if source else load_placement
        if mesh is None or placement is None:
            tensors[fqn] = t
        else:
            tensors[fqn] = distribute_tensor(t, mesh, _placements(placement))
    return nested_state(tensors, VALUES if source else PLACEHOLDERS)


def _local(t: Any) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _load_and_report(state: dict[str, Any], reader: zerockpt.dcp.Reader) -> dict[str, Any]:
    """Loads into `state`, then reports what each rank got (full tensors gathered)."""
    from torch.distributed.tensor import DTensor

    before = {fqn: _local(_get(state, fqn)).data_ptr() for fqn in SPECS}
    dcp.load(state, storage_reader=reader)
    report: dict[str, Any] = {"full": {}, "local": {}, "placement": {}, "in_place": {}}
    for fqn in SPECS:
        t = _get(state, fqn)
        local = _local(t)
        report["in_place"][fqn] = local.numel() == 0 or local.data_ptr() == before[fqn]
        report["local"][fqn] = local.clone()
        if isinstance(t, DTensor):
            report["placement"][fqn] = str(t.placements)
            report["full"][fqn] = t.full_tensor().clone()
        else:
            report["placement"][fqn] = None
            report["full"][fqn] = t.clone()
    report["values"] = state_values(state)
    return report


def _phase_save2(rank: int, world_size: int, root: Path) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dcp.save(
        _make_targets(world_size, source=True), storage_writer=zerockpt.dcp.Writer(root / "main")
    )
    pending = dcp.async_save(
        _make_targets(world_size, source=True), storage_writer=zerockpt.dcp.Writer(root / "async")
    )
    pending.result()
    # A DTensor "y" (rank 1 holds the chunk at offset 2) and, on rank 1 only, a plain "y@2".
    mesh = init_device_mesh("cpu", (world_size,))
    collide: dict[str, Any] = {"y": distribute_tensor(torch.arange(4.0), mesh, [Shard(0)])}
    if rank == 1:
        collide["y@2"] = torch.tensor([100.0, 200.0])
    dcp.save(collide, storage_writer=zerockpt.dcp.Writer(root / "collide"))
    dist.barrier()
    return {
        "main": _load_and_report(
            _make_targets(world_size, source=False), zerockpt.dcp.Reader(root / "main")
        ),
        "async": _load_and_report(
            _make_targets(world_size, source=False),
            zerockpt.dcp.Reader(root / "async", verify=True),
        ),
    }


def _phase_load1(rank: int, world_size: int, root: Path) -> dict[str, Any]:
    out = {
        "main": _load_and_report(_make_targets(1, source=False), zerockpt.dcp.Reader(root / "main"))
    }
    collide = {"y": torch.zeros(4), "y@2": torch.zeros(2)}
    try:
        dcp.load(collide, storage_reader=zerockpt.dcp.Reader(root / "collide"))
        out["collide"] = collide
    except BaseException as e:  # CheckpointException is a BaseException
        out["collide"] = f"{type(e).__name__}: {e}"
    return out


def _phase_load3(rank: int, world_size: int, root: Path) -> dict[str, Any]:
    return {
        "main": _load_and_report(
            _make_targets(world_size, source=False), zerockpt.dcp.Reader(root / "main")
        )
    }


PHASES: dict[str, Callable[[int, int, Path], dict[str, Any]]] = {
    "save2": _phase_save2,
    "load1": _phase_load1,
    "load3": _phase_load3,
}


def _worker(rank: int, world_size: int, port: int, phase: str, root: str, out: str) -> None:
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        report = PHASES[phase](rank, world_size, Path(root))
        torch.save(report, Path(out) / f"{phase}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def start_group(phase: str, world_size: int, root: Path, out: Path, port: int) -> Any:
    """Starts `phase` on `world_size` processes (gloo on 127.0.0.1). They fork from a server
    that has imported torch and zerockpt already: a rank starts in milliseconds instead of the
    seconds that a spawned interpreter takes to import them."""
    forkserver_context("test_dcp")
    return mp.start_processes(
        _worker,
        args=(world_size, port, phase, str(root), str(out)),
        nprocs=world_size,
        join=False,
        start_method="forkserver",
    )


def finish_group(
    ctx: Any, phase: str, world_size: int, out: Path, timeout: float = 120
) -> list[dict[str, Any]]:
    """Waits for a group from start_group; its ranks' reports."""
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{phase} (world size {world_size}) ran past {timeout} s")
    return [torch.load(out / f"{phase}-{r}.pt", weights_only=False) for r in range(world_size)]


def run_group(phase: str, world_size: int, root: Path, out: Path) -> list[dict[str, Any]]:
    """Runs `phase` on `world_size` processes; their reports."""
    (port,) = _free_ports(1)
    return finish_group(start_group(phase, world_size, root, out, port), phase, world_size, out)


@pytest.fixture(scope="module")
def distributed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """World size 2 saves (and loads back); then world sizes 1 and 3 load, at the same time
    (each group its own process group and port; they only read the checkpoints)."""
    root = tmp_path_factory.mktemp("dcp")
    out = tmp_path_factory.mktemp("reports")
    save2 = run_group("save2", 2, root, out)
    groups, ports = (("load1", 1), ("load3", 3)), _free_ports(2)
    loads = {
        (name, n): start_group(name, n, root, out, port)
        for (name, n), port in zip(groups, ports, strict=True)
    }
    return {
        "root": root,
        "save2": save2,
        **{name: finish_group(ctx, name, n, out) for (name, n), ctx in loads.items()},
    }


def check_report(report: dict[str, Any], rank: int, world_size: int, *, dtensors: bool) -> None:
    full = source_tensors()
    for fqn, (_, _, _, _, load_placement) in SPECS.items():
        assert_bitwise_equal(report["full"][fqn], full[fqn])
        assert report["in_place"][fqn], f"{fqn} was not loaded into the target's memory"
        placement = load_placement if dtensors else None
        if placement is None:
            assert report["placement"][fqn] is None
            assert_bitwise_equal(report["local"][fqn], full[fqn])
        else:
            kind = "Replicate()" if placement == "R" else f"Shard(dim={placement[1]})"
            assert report["placement"][fqn] == f"({kind},)", fqn
            expected = expected_local(full[fqn], placement, rank, world_size)
            assert_bitwise_equal(report["local"][fqn], expected)
    assert report["values"] == VALUES
    assert type(report["values"]["param_groups"][0]["betas"]) is tuple


# --- multi-process: save with world size 2, load with 1, 2 and 3 ----------------------------


def test_world_size_2_writes_one_file_per_rank(distributed: dict[str, Any]) -> None:
    directory = distributed["root"] / "main"
    assert sorted(os.listdir(directory)) == [
        ".metadata.json",
        "__0_0.safetensors",
        "__1_0.safetensors",
    ]
    meta = json.loads((directory / ".metadata.json").read_text())
    assert meta["format"] == "zerockpt.dcp"
    assert meta["state_dict_metadata"]["model.rows"]["size"] == [7, 5]
    # Each rank file holds that rank's shards, not the full tensor.
    full = source_tensors()
    files = [zerockpt.load(directory / f"__{r}_0.safetensors") for r in range(2)]
    rows = [t for f in files for name, t in f.items() if name.split("@")[0] == "model.rows"]
    assert sorted(t.shape[0] for t in rows) == [3, 4]
    assert_bitwise_equal(torch.cat(sorted(rows, key=lambda t: -t.shape[0])), full["model.rows"])
    cols = [t for f in files for name, t in f.items() if name.split("@")[0] == "model.cols"]
    assert sorted(t.shape[1] for t in cols) == [3, 4]
    assert_bitwise_equal(
        torch.cat(sorted(cols, key=lambda t: -t.shape[1]), dim=1), full["model.cols"]
    )


def test_load_world_size_1_into_plain_tensors(distributed: dict[str, Any]) -> None:
    (report,) = distributed["load1"]
    check_report(report["main"], 0, 1, dtensors=False)


@pytest.mark.parametrize("rank", [0, 1])
def test_load_world_size_2_resharded(distributed: dict[str, Any], rank: int) -> None:
    check_report(distributed["save2"][rank]["main"], rank, 2, dtensors=True)


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_load_world_size_3_resharded(distributed: dict[str, Any], rank: int) -> None:
    check_report(distributed["load3"][rank]["main"], rank, 3, dtensors=True)


@pytest.mark.parametrize("rank", [0, 1])
def test_async_save_world_size_2(distributed: dict[str, Any], rank: int) -> None:
    assert (distributed["root"] / "async" / ".metadata.json").is_file()
    check_report(distributed["save2"][rank]["async"], rank, 2, dtensors=True)


def test_fqn_with_at_sign_does_not_collide_with_a_chunk(distributed: dict[str, Any]) -> None:
    (report,) = distributed["load1"]
    collide = report["collide"]
    assert isinstance(collide, dict), collide
    assert_bitwise_equal(collide["y"], torch.arange(4.0))
    assert_bitwise_equal(collide["y@2"], torch.tensor([100.0, 200.0]))


@pytest.mark.parametrize("max_shard_size", [None, "200B"])
def test_to_file_assembles_the_two_rank_checkpoint(
    distributed: dict[str, Any], tmp_path: Path, max_shard_size: str | None
) -> None:
    """The DTensor chunks both ranks wrote become full tensors, bitwise the source."""
    dest = tmp_path / ("shards" if max_shard_size else "full.safetensors")
    zerockpt.dcp.to_file(distributed["root"] / "main", dest, max_shard_size=max_shard_size)
    if max_shard_size:
        assert len(list(dest.glob("model-*-of-*.safetensors"))) > 1
    out = zerockpt.load(dest, verify=True)
    full = source_tensors()
    for fqn in SPECS:
        assert_bitwise_equal(_get(out, fqn), full[fqn])
    assert state_values(out) == VALUES
    assert not [p for p in tmp_path.rglob("*") if "zerockpt-tmp" in p.name]


# --- single process (no_dist) ----------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_faults_left() -> Iterator[None]:
    C._clear_faults()
    yield
    C._clear_faults()


def save(state: dict[str, Any], path: Path, **kwargs: Any) -> None:
    dcp.save(state, storage_writer=zerockpt.dcp.Writer(path, **kwargs), no_dist=True)


def load(state: dict[str, Any], path: Path, **kwargs: Any) -> None:
    dcp.load(state, storage_reader=zerockpt.dcp.Reader(path, **kwargs), no_dist=True)


def _probe_metadata_errors() -> bool:
    """Whether this torch's dcp.load passes on what StorageReader.read_metadata raised. torch
    2.11 logs it and raises AssertionError("metadata is None") instead; later torch chains it."""

    class Failing(zerockpt.dcp.Reader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            raise zerockpt.FormatError("zerockpt-probe-message")

    try:
        dcp.load({}, storage_reader=Failing("."), no_dist=True)
    except CheckpointException as e:
        return "zerockpt-probe-message" in str(e)
    return False


DCP_PASSES_METADATA_ERRORS = _probe_metadata_errors()


def metadata_error(message: str) -> str:
    """What dcp.load's CheckpointException says when the Reader's read_metadata raised
    ``message`` (a regular expression), on this torch."""
    return message if DCP_PASSES_METADATA_ERRORS else "metadata is None"


def root_failure(info: pytest.ExceptionInfo[CheckpointException]) -> BaseException:
    """The exception a rank raised inside DCP, which wraps it in a CheckpointException."""
    (failure,) = info.value.failures.values()
    return failure[0]


def trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        model(torch.randn(4, 6)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()  # creates the state tensors to load into
    opt.zero_grad()
    return model, opt


def assert_state_equal(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert_bitwise_equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (a, b)
        for k in a:
            assert_state_equal(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_state_equal(x, y)
    else:
        assert type(a) is type(b) and a == b, (a, b)


def model_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": model.state_dict(), "optim": opt.state_dict(), "epoch": 3, "name": "run"}


def test_model_and_adam_round_trip(tmp_path: Path) -> None:
    model, opt = trained()
    source = copy.deepcopy(model_state(model, opt))
    save(model_state(model, opt), tmp_path / "ckpt")
    m2, o2 = fresh()
    target = model_state(m2, o2)
    target["epoch"], target["name"] = 0, ""
    pointers = {k: v.data_ptr() for k, v in target["model"].items()}
    load(target, tmp_path / "ckpt")
    assert_state_equal(target, source)
    assert {k: v.data_ptr() for k, v in target["model"].items()} == pointers  # loaded in place
    m2.load_state_dict(target["model"])
    o2.load_state_dict(target["optim"])
    assert o2.param_groups[0]["lr"] == 0.01
    x = torch.randn(3, 6)
    assert_bitwise_equal(m2(x), model(x))
    assert sorted(os.listdir(tmp_path / "ckpt")) == [".metadata.json", "__0_0.safetensors"]


def test_async_save_then_load(tmp_path: Path) -> None:
    model, opt = trained()
    source = copy.deepcopy(model_state(model, opt))
    future = dcp.async_save(
        model_state(model, opt), storage_writer=zerockpt.dcp.Writer(tmp_path / "a"), no_dist=True
    )
    future.result()
    assert not temp_leftovers(tmp_path / "a")
    target = model_state(*fresh())
    load(target, tmp_path / "a", verify=True)
    assert_state_equal(target, source)


def test_checkpoint_id_overrides_the_paths(tmp_path: Path) -> None:
    state = {"w": random_tensor((4, 3), torch.float32, 11), "n": 5}
    writer = zerockpt.dcp.Writer(tmp_path / "writer-path")
    dcp.save(state, checkpoint_id=tmp_path / "real", storage_writer=writer, no_dist=True)
    assert not (tmp_path / "writer-path").exists()
    assert sorted(os.listdir(tmp_path / "real")) == [".metadata.json", "__0_0.safetensors"]
    meta = json.loads((tmp_path / "real" / ".metadata.json").read_text())
    assert meta["storage_meta"]["checkpoint_id"] == str(tmp_path / "real")
    target = {"w": torch.zeros(4, 3), "n": 0}
    reader = zerockpt.dcp.Reader(tmp_path / "writer-path")
    dcp.load(target, checkpoint_id=str(tmp_path / "real"), storage_reader=reader, no_dist=True)
    assert_state_equal(target, state)


def test_rank_file_opens_with_safetensors_and_zerockpt(tmp_path: Path) -> None:
    model, opt = trained()
    save(model_state(model, opt), tmp_path / "c")
    path = tmp_path / "c" / "__0_0.safetensors"
    ours = zerockpt.load(path)
    theirs = safetensors.torch.load_file(path)
    assert list(ours) == list(theirs)
    for name in ours:
        assert_bitwise_equal(ours[name], theirs[name])
    for fqn, t in model.state_dict().items():
        assert_bitwise_equal(ours[f"model.{fqn}"], t)
    for i, s in opt.state_dict()["state"].items():
        assert_bitwise_equal(ours[f"optim.state.{i}.exp_avg"], s["exp_avg"])
        assert_bitwise_equal(ours[f"optim.state.{i}.step"], s["step"])
    with safetensors.safe_open(path, "pt") as f:
        assert "zerockpt.dcp" in (f.metadata() or {})


# --- completeness ----------------------------------------------------------------------------


def test_directory_without_metadata_is_not_a_complete_checkpoint(tmp_path: Path) -> None:
    state = {"w": torch.arange(6.0), "n": 1}
    save(state, tmp_path / "c")
    (tmp_path / "c" / ".metadata.json").unlink()
    assert (tmp_path / "c" / "__0_0.safetensors").is_file()
    with pytest.raises(zerockpt.FormatError, match="not a complete") as info:
        zerockpt.dcp.Reader(tmp_path / "c").read_metadata()
    assert str(tmp_path / "c") in str(info.value)
    # dcp.load wraps what the reader raised (its message kept) in a CheckpointException.
    with pytest.raises(CheckpointException, match=metadata_error("not a complete")):
        load({"w": torch.zeros(6), "n": 0}, tmp_path / "c")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointException, match=metadata_error("not a complete")):
        load({"w": torch.zeros(6)}, tmp_path / "empty")


def test_resave_replaces_the_checkpoint(tmp_path: Path) -> None:
    first = {
        "a": random_tensor((5,), torch.float32, 1),
        "b": random_tensor((3,), torch.int32, 2),
        "n": 1,
    }
    second = {
        "a": random_tensor((5,), torch.float32, 3),
        "c": random_tensor((2, 2), torch.float64, 4),
        "n": 2,
    }
    save(first, tmp_path / "c")
    save(second, tmp_path / "c")
    assert sorted(os.listdir(tmp_path / "c")) == [".metadata.json", "__0_0.safetensors"]
    meta = json.loads((tmp_path / "c" / ".metadata.json").read_text())
    assert sorted(meta["state_dict_metadata"]) == ["a", "c", "n"]
    target = {"a": torch.zeros(5), "c": torch.zeros(2, 2, dtype=torch.float64), "n": 0}
    load(target, tmp_path / "c", verify=True)
    assert_state_equal(target, second)
    assert sorted(zerockpt.load(tmp_path / "c" / "__0_0.safetensors")) == ["a", "c", "n"]
    with pytest.raises(CheckpointException, match="Missing key"):
        load({"b": torch.zeros(3, dtype=torch.int32)}, tmp_path / "c")


def test_failed_save_leaves_no_metadata_and_no_temp_files(tmp_path: Path) -> None:
    old = {"w": random_tensor((64,), torch.float32, 1), "n": 1}
    new = {"w": random_tensor((64,), torch.float32, 2), "n": 2}
    save(old, tmp_path / "c")
    C._inject_fault("write", errno.ENOSPC)
    try:
        with pytest.raises(CheckpointException) as info:
            save(new, tmp_path / "c")
    finally:
        C._clear_faults()
    failure = root_failure(info)
    assert isinstance(failure, OSError) and failure.errno == errno.ENOSPC, failure
    assert not (tmp_path / "c" / ".metadata.json").exists()
    assert not temp_leftovers(tmp_path / "c")
    with pytest.raises(CheckpointException, match=metadata_error("not a complete")):
        load({"w": torch.zeros(64), "n": 0}, tmp_path / "c")
    save(new, tmp_path / "c")  # the next save succeeds
    target = {"w": torch.zeros(64), "n": 0}
    load(target, tmp_path / "c")
    assert_state_equal(target, new)


def test_metadata_is_committed_after_every_rank_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When finish() runs, the rank files are complete and the old metadata is gone."""
    save({"w": torch.ones(3)}, tmp_path / "c")
    seen: list[Any] = []
    original = zerockpt.dcp.Writer.finish

    def finish(self: zerockpt.dcp.Writer, *args: Any, **kwargs: Any) -> None:
        directory = tmp_path / "c"
        seen.append(sorted(os.listdir(directory)))
        seen.append(zerockpt.load(directory / "__0_0.safetensors")["w"].clone())
        original(self, *args, **kwargs)

    monkeypatch.setattr(zerockpt.dcp.Writer, "finish", finish)
    save({"w": torch.full((3,), 2.0)}, tmp_path / "c")
    assert seen[0] == ["__0_0.safetensors"]
    assert_bitwise_equal(seen[1], torch.full((3,), 2.0))
    assert (tmp_path / "c" / ".metadata.json").is_file()


# --- hostile metadata ------------------------------------------------------------------------


@pytest.fixture
def small_ckpt(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    directory = tmp_path / "c"
    save({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4), "s": 7}, directory)
    return directory, json.loads((directory / ".metadata.json").read_text())


def small_target() -> dict[str, Any]:
    return {"a": torch.zeros(2, 3), "b": torch.zeros(4), "s": 0}


def _entry(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["state_dict_metadata"]["a"]


def _storage(doc: dict[str, Any], fqn: str) -> list[Any]:
    return next(e for e in doc["storage_data"] if e[0] == fqn)


def _assign(
    getter: Callable[[dict[str, Any]], Any], key: Any, value: Any
) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        getter(doc)[key] = value

    return mutate


HOSTILE_DOCS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "top level list": lambda doc: [doc],
    "no format tag": lambda doc: {k: v for k, v in doc.items() if k != "format"},
    "wrong format tag": _assign(lambda d: d, "format", "torch.dcp"),
    "wrong format_version": _assign(lambda d: d, "format_version", 2),
    "format_version as string": _assign(lambda d: d, "format_version", "1"),
    "state_dict_metadata a list": _assign(lambda d: d, "state_dict_metadata", []),
    "entry not an object": _assign(lambda d: d["state_dict_metadata"], "a", [1, 2]),
    "dtype os": _assign(_entry, "dtype", "os"),
    "dtype unknown": _assign(_entry, "dtype", "float128"),
    "dtype a number": _assign(_entry, "dtype", 5),
    "dtype missing": lambda doc: _entry(doc).pop("dtype"),
    "layout a dtype": _assign(_entry, "layout", "float32"),
    "memory_format a function": _assign(_entry, "memory_format", "load"),
    "negative size": _assign(_entry, "size", [-2, 3]),
    "size of floats": _assign(_entry, "size", [2.0, 3]),
    "size of bools": _assign(_entry, "size", [True, 3]),
    "size a string": _assign(_entry, "size", "2,3"),
    "chunk wrong arity": _assign(_entry, "chunks", [[[0, 0]]]),
    "chunk negative offset": _assign(_entry, "chunks", [[[-1, 0], [2, 3]]]),
    "chunk sizes null": _assign(_entry, "chunks", [[[0, 0], None]]),
    "chunks an object": _assign(_entry, "chunks", {"0": 1}),
    "storage_data an object": _assign(lambda d: d, "storage_data", {}),
    "storage_data entry too short": lambda doc: _storage(doc, "a").pop(),
    "storage_data entry too long": lambda doc: _storage(doc, "a").append("x"),
    "storage_data entry an object": _assign(lambda d: d["storage_data"], 0, {"fqn": "a"}),
    "storage_data index a string": _assign(lambda d: _storage(d, "a"), 2, "0"),
    "storage_data index a bool": _assign(lambda d: _storage(d, "a"), 2, True),
    "storage_data fqn a number": _assign(lambda d: _storage(d, "a"), 0, 1),
    "storage_data offset negative": _assign(lambda d: _storage(d, "a"), 1, [0, -1]),
    "storage_data file a number": _assign(lambda d: _storage(d, "a"), 3, 0),
    "storage_data name null": _assign(lambda d: _storage(d, "a"), 4, None),
    "planner_data garbage": _assign(lambda d: d, "planner_data", [[["x"]]]),
}

HOSTILE_TEXTS: dict[str, bytes] = {
    "empty": b"",
    "not JSON": b"{not json",
    "truncated": b'{"format": "zerockpt.dcp", "format_version": 1, "state_',
    "NaN": b'{"format": NaN}',
    "not UTF-8": b'{"format": "\xff\xfe"}',
    "deeply nested": b"[" * 100_000 + b"]" * 100_000,
    "a string": b'"zerockpt.dcp"',
}


def assert_format_error_names_file(directory: Path) -> zerockpt.FormatError:
    with pytest.raises(zerockpt.FormatError) as info:
        zerockpt.dcp.Reader(directory).read_metadata()
    assert str(directory / ".metadata.json") in str(info.value)
    # Through dcp.load the same message comes back, wrapped by DCP.
    with pytest.raises(CheckpointException, match=metadata_error(re.escape(str(info.value)))):
        load(small_target(), directory)
    return info.value


@pytest.mark.parametrize("case", list(HOSTILE_DOCS))
def test_hostile_metadata_document(small_ckpt: tuple[Path, dict[str, Any]], case: str) -> None:
    directory, doc = small_ckpt
    result = HOSTILE_DOCS[case](doc)
    doc = doc if result is None or not isinstance(result, dict | list) else result
    (directory / ".metadata.json").write_text(json.dumps(doc))
    assert_format_error_names_file(directory)


@pytest.mark.parametrize("case", list(HOSTILE_TEXTS))
def test_hostile_metadata_text(small_ckpt: tuple[Path, dict[str, Any]], case: str) -> None:
    directory, _ = small_ckpt
    (directory / ".metadata.json").write_bytes(HOSTILE_TEXTS[case])
    assert_format_error_names_file(directory)


@pytest.mark.parametrize("file", ["../x", "../c/__0_0.safetensors", "/etc/passwd", "", ".", ".."])
def test_storage_data_file_outside_the_checkpoint(
    small_ckpt: tuple[Path, dict[str, Any]], file: str
) -> None:
    directory, doc = small_ckpt
    (directory.parent / "x").write_bytes(b"secret")
    _storage(doc, "a")[3] = file
    (directory / ".metadata.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointException) as info:
        load(small_target(), directory)
    failure = root_failure(info)
    assert isinstance(failure, zerockpt.FormatError), failure
    assert "invalid file name" in str(failure)


def test_storage_data_file_that_is_not_a_tensor_file(
    small_ckpt: tuple[Path, dict[str, Any]],
) -> None:
    directory, doc = small_ckpt
    _storage(doc, "a")[3] = ".metadata.json"
    (directory / ".metadata.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointException) as info:
        load(small_target(), directory)
    failure = root_failure(info)
    assert isinstance(failure, zerockpt.FormatError), failure
    assert ".metadata.json" in str(failure)


@pytest.mark.parametrize(("fqn", "name"), [("a", "nope"), ("a", "b"), ("b", "s")])
def test_storage_data_name_not_matching_the_file(
    small_ckpt: tuple[Path, dict[str, Any]], fqn: str, name: str
) -> None:
    directory, doc = small_ckpt
    _storage(doc, fqn)[4] = name
    (directory / ".metadata.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointException) as info:
        load(small_target(), directory)
    failure = root_failure(info)
    assert isinstance(failure, zerockpt.FormatError), f"{type(failure).__name__}: {failure}"


HOSTILE_VALUES: list[Any] = [
    None,
    -1,
    1.5,
    True,
    "os",
    "",
    [],
    {},
    [[]],
    [None],
    [-1],
    [1.5],
    {"a": 1},
    "../x",
    5,
]


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if prefix:
        yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def test_metadata_mutations_raise_only_format_error(
    small_ckpt: tuple[Path, dict[str, Any]],
) -> None:
    """Every value in the document replaced by hostile ones: parsed, or FormatError naming it."""
    directory, doc = small_ckpt
    path = str(directory / ".metadata.json")
    tried = rejected = 0
    for where in _paths(doc):
        if where[:2] == ("storage_meta", "modules"):
            continue  # test_storage_meta_modules_not_a_list
        for value in HOSTILE_VALUES:
            mutated = copy.deepcopy(doc)
            node = mutated
            for key in where[:-1]:
                node = node[key]
            node[where[-1]] = value
            tried += 1
            try:
                zerockpt.dcp.decode_metadata(json.dumps(mutated), path)
            except zerockpt.FormatError as e:
                rejected += 1
                assert path in str(e)
            except Exception as e:
                pytest.fail(f"{where} = {value!r}: {type(e).__name__}: {e}")
    assert tried > 500 and rejected > tried // 3


def test_storage_meta_modules_not_a_list(small_ckpt: tuple[Path, dict[str, Any]]) -> None:
    directory, doc = small_ckpt
    doc["storage_meta"]["modules"] = 5
    (directory / ".metadata.json").write_text(json.dumps(doc))
    assert_format_error_names_file(directory)


def test_sizes_beyond_int64_are_rejected(small_ckpt: tuple[Path, dict[str, Any]]) -> None:
    directory, doc = small_ckpt
    _entry(doc)["size"] = [2**64, 3]
    (directory / ".metadata.json").write_text(json.dumps(doc))
    with pytest.raises(zerockpt.FormatError):
        zerockpt.dcp.Reader(directory).read_metadata()


# --- checksums -------------------------------------------------------------------------------


def test_verify_detects_a_flipped_data_byte(tmp_path: Path) -> None:
    source = {"w": random_tensor((256,), torch.float32, 5), "v": torch.arange(10), "n": 3}
    save(source, tmp_path / "c")
    path = tmp_path / "c" / "__0_0.safetensors"
    n, header, _ = read_header(path)
    start = 8 + n + header["w"]["data_offsets"][0] + 17
    raw = bytearray(path.read_bytes())
    raw[start] ^= 0x10
    path.write_bytes(bytes(raw))

    with pytest.raises(CheckpointException) as info:
        load(
            {"w": torch.zeros(256), "v": torch.zeros(10, dtype=torch.int64), "n": 0},
            tmp_path / "c",
            verify=True,
        )
    assert isinstance(root_failure(info), zerockpt.ChecksumError), root_failure(info)
    # Without verification the flipped byte comes through: the check is what caught it.
    target = {"w": torch.zeros(256), "v": torch.zeros(10, dtype=torch.int64), "n": 0}
    load(target, tmp_path / "c")
    got = target["w"].view(torch.uint8)
    want = source["w"].view(torch.uint8)
    assert (got != want).nonzero().flatten().tolist() == [17]
    assert_bitwise_equal(target["v"], source["v"])


def test_checksums_off_still_loads_with_verify(tmp_path: Path) -> None:
    source = {"w": random_tensor((8, 8), torch.bfloat16, 6)}
    save(source, tmp_path / "c", checksums=False, durable=False, threads=1)
    target = {"w": torch.zeros(8, 8, dtype=torch.bfloat16)}
    load(target, tmp_path / "c", verify=True, threads=1)
    assert_state_equal(target, source)


# --- views of one storage --------------------------------------------------------------------


def test_different_views_of_one_storage(tmp_path: Path) -> None:
    base = random_tensor((4, 6), torch.float32, 7)
    flat = base.view(-1)
    source = {
        "a": base,
        "b": base[1:3],  # a slice
        "c": flat[2:5],  # an overlapping slice at another offset
        "d": base.t(),  # non-contiguous
        "e": base[:, 1],  # strided
        "f": base.view(torch.int32),  # same bytes, another dtype
    }
    before = base.clone()
    save(source, tmp_path / "c")
    assert_bitwise_equal(base, before)
    target = {k: torch.zeros_like(v.contiguous()) for k, v in source.items()}
    load(target, tmp_path / "c", verify=True)
    for k, v in source.items():
        assert_bitwise_equal(target[k], v)


def test_tied_identical_tensors(tmp_path: Path) -> None:
    w = random_tensor((5, 3), torch.float16, 8)
    source = {
        "embed": w,
        "head": w,
        "again": w.view(5, 3),
        "other": random_tensor((2,), torch.float16, 9),
    }
    save(source, tmp_path / "c")
    target = {k: torch.zeros_like(v) for k, v in source.items()}
    load(target, tmp_path / "c", verify=True)
    for k, v in source.items():
        assert_bitwise_equal(target[k], v)
    assert target["embed"].data_ptr() != target["head"].data_ptr()  # the targets stay separate
    stored = zerockpt.load(tmp_path / "c" / "__0_0.safetensors")
    for k, v in source.items():
        assert_bitwise_equal(stored[k], v)


def test_tied_targets_load_once(tmp_path: Path) -> None:
    w = random_tensor((4,), torch.float32, 10)
    save({"embed": w, "head": w}, tmp_path / "c")
    shared = torch.zeros(4)
    target = {"embed": shared, "head": shared}
    load(target, tmp_path / "c")
    assert_bitwise_equal(shared, w)


# --- reads -----------------------------------------------------------------------------------


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io")
def test_load_of_one_item_does_not_read_the_whole_file(tmp_path: Path) -> None:
    big = torch.zeros(8 << 20, dtype=torch.float32)  # 32 MiB
    small = random_tensor((16,), torch.float64, 11)
    save({"big": big, "small": small}, tmp_path / "c", durable=False)
    size = (tmp_path / "c" / "__0_0.safetensors").stat().st_size
    assert size > 32 << 20
    target = {"small": torch.zeros(16, dtype=torch.float64)}
    before = _rchar()
    load(target, tmp_path / "c")
    read = _rchar() - before
    assert_bitwise_equal(target["small"], small)
    assert read < 4 << 20, f"loading 128 bytes read {read} bytes of a {size}-byte file"
    before = _rchar()  # the measure sees whole-file reads
    with open(tmp_path / "c" / "__0_0.safetensors", "rb") as f:
        f.read()
    assert _rchar() - before >= size


# --- non-tensor items and pickle (issue 18, point 10) ----------------------------------------


class Marker:
    """A pickled object that runs code when unpickled: it creates the file it names."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.touch, (self.path,))


def test_reader_refuses_items_weights_only_refuses(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    save({"w": torch.arange(3.0), "evil": Marker(marker), "n": [1, "x", 2.5]}, tmp_path / "c")
    target: dict[str, Any] = {"w": torch.zeros(3), "evil": None, "n": None}
    with pytest.raises(CheckpointException, match=r"'evil'.*weights_only=True.*allow_pickle"):
        load(target, tmp_path / "c")
    assert not marker.exists()
    # Plain data loads by default.
    plain: dict[str, Any] = {"w": torch.zeros(3), "n": None}
    load(plain, tmp_path / "c")
    assert plain["n"] == [1, "x", 2.5] and torch.equal(plain["w"], torch.arange(3.0))
    # The explicit opt-in unpickles as DCP's own reader does.
    load(target, tmp_path / "c", allow_pickle=True)
    assert marker.exists()


def test_reader_refusal_is_unpickling_error(tmp_path: Path) -> None:
    save({"evil": Marker(tmp_path / "unpickled")}, tmp_path / "c")
    reader = zerockpt.dcp.Reader(tmp_path / "c")
    reader.storage_data = reader.read_metadata().storage_data
    item = next(iter(reader.storage_data))
    raw = zerockpt.load(tmp_path / "c" / "__0_0.safetensors")["evil"].numpy().tobytes()
    with pytest.raises(pickle.UnpicklingError, match="evil") as info:
        reader._weights_only(raw, types.SimpleNamespace(storage_index=item))
    assert "__0_0.safetensors" in str(info.value)
    assert not (tmp_path / "unpickled").exists()


def test_reader_calls_corrupt_pickled_bytes_a_format_error(tmp_path: Path) -> None:
    save({"n": [1, 2]}, tmp_path / "c")
    reader = zerockpt.dcp.Reader(tmp_path / "c")
    reader.storage_data = reader.read_metadata().storage_data
    item = types.SimpleNamespace(storage_index=next(iter(reader.storage_data)))
    with pytest.raises(zerockpt.FormatError, match=r"item 'n': not a torch\.save pickle"):
        reader._weights_only(b"PK\x03\x04 not a zip", item)
