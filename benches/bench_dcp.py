"""torch.distributed.checkpoint with zerockpt's Writer/Reader against FileSystemWriter/Reader.

Two ranks on CPU (gloo) hold GPT-2 small as DTensors sharded by rows (~250 MB per rank). Two
worker processes are started once; each timed round tells both to save (or load) through one
storage, after a barrier, and takes the slower rank's time. Saves go to a fresh directory with
dirty pages flushed first (untimed); loads read a checkpoint written once, from a warm page
cache, into existing DTensors. The ratios are printed at the end of the session.

"disk floor" is no DCP at all: each rank writes its shard bytes from one page-aligned buffer with
O_DIRECT and fsyncs, which is as fast as a durable save can be on this disk. Where
FileSystemWriter takes less than twice that, no storage layer can be 2x faster than it.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from conftest import GPT2_SCALE, report_ratio
from pytest_benchmark.fixture import BenchmarkFixture

WORLD = 2
ROUNDS = 3
CHUNK = 8 << 20

_TIMES: dict[str, float] = {}


def _storage(kind: str, op: str, path: str) -> Any:
    """kind: "filesystem" or "zerockpt", with " durable=False" for saves without fsync."""
    import torch.distributed.checkpoint as dcp
    import zerockpt.dcp

    durable = not kind.endswith("durable=False")
    if kind.startswith("zerockpt"):
        if op == "save":
            return zerockpt.dcp.Writer(path, durable=durable)
        return zerockpt.dcp.Reader(path)
    if op == "save":
        return dcp.FileSystemWriter(path, sync_files=durable)
    return dcp.FileSystemReader(path)


_IMAGE: list[Any] = []


def floor_image(state: dict[str, Any]) -> Any:
    """This rank's shard bytes in one page-aligned buffer (built once, reused every round)."""
    import mmap

    if not _IMAGE:
        size = sum(t.to_local().nbytes for t in state.values())
        image = mmap.mmap(-1, (size + CHUNK - 1) // CHUNK * CHUNK)
        view = memoryview(image)
        offset = 0
        for t in state.values():
            local = t.to_local().contiguous().view(torch.uint8).reshape(-1).numpy()
            view[offset : offset + local.size] = local.data
            offset += local.size
        _IMAGE.append(view[: (offset + 4095) // 4096 * 4096])
    return _IMAGE[0]


def _write_direct(path: str, rank: int, image: Any) -> None:
    """The disk's floor for a durable save: O_DIRECT writes of the bytes, then fsync."""
    os.makedirs(path, exist_ok=True)
    fd = os.open(f"{path}/rank{rank}.bin", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        for offset in range(0, len(image), CHUNK):
            os.pwrite(fd, image[offset : offset + CHUNK], offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    dirfd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def _worker(rank: int, port: int, scale: float, commands: Any, results: Any) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from models import gpt2_small_state_dict
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    warnings.simplefilter("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)  # two ranks on two cores
    mesh = init_device_mesh("cpu", (WORLD,))
    full = gpt2_small_state_dict(scale)
    state = {name: distribute_tensor(t.clone(), mesh, [Shard(0)]) for name, t in full.items()}
    while True:
        command = commands[rank].get()
        if command is None:
            break
        kind, op, path = command
        dist.barrier()
        start = time.perf_counter()
        if kind == "disk floor":
            _write_direct(path, rank, floor_image(state))
        elif op == "save":
            dcp.save(state, storage_writer=_storage(kind, op, path))
        else:
            dcp.load(state, storage_reader=_storage(kind, op, path))
        dist.barrier()
        results.put(time.perf_counter() - start)
    dist.destroy_process_group()


class Ranks:
    """The two worker processes and their command queues."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        self.commands = [ctx.Queue() for _ in range(WORLD)]
        self.results = ctx.Queue()
        self.procs = [
            ctx.Process(target=_worker, args=(r, port, GPT2_SCALE, self.commands, self.results))
            for r in range(WORLD)
        ]
        for p in self.procs:
            p.start()

    def run(self, kind: str, op: str, path: Path) -> float:
        for q in self.commands:
            q.put((kind, op, str(path)))
        return max(self.results.get(timeout=600) for _ in range(WORLD))

    def close(self) -> None:
        for q in self.commands:
            q.put(None)
        for p in self.procs:
            p.join(timeout=60)


@pytest.fixture(scope="module")
def ranks() -> Iterator[Ranks]:
    r = Ranks()
    yield r
    r.close()


SAVE_KINDS = [
    "disk floor",
    "filesystem",
    "zerockpt",
    "filesystem durable=False",
    "zerockpt durable=False",
]


@pytest.mark.parametrize("kind", SAVE_KINDS)
def test_dcp_save(
    benchmark: BenchmarkFixture, ranks: Ranks, module_bench_dir: Path, kind: str
) -> None:
    path = module_bench_dir / f"save-{kind.replace(' ', '-')}"

    def setup() -> None:
        shutil.rmtree(path, ignore_errors=True)
        os.sync()

    durability = "no fsync" if kind.endswith("durable=False") else "fsync"
    # "disk floor": no DCP at all, each rank's bytes written with O_DIRECT and fsynced.
    benchmark.group = f"dcp.save ({durability}), {WORLD} ranks, GPT-2 sharded by rows"
    benchmark.pedantic(
        lambda: ranks.run(kind, "save", path), setup=setup, rounds=ROUNDS, warmup_rounds=1
    )
    if benchmark.enabled:
        _TIMES[f"save {kind}"] = benchmark.stats.stats.min
    assert any(path.iterdir())


@pytest.mark.parametrize("kind", ["filesystem", "zerockpt"])
def test_dcp_load(
    benchmark: BenchmarkFixture, ranks: Ranks, module_bench_dir: Path, kind: str
) -> None:
    path = module_bench_dir / f"load-{kind}"
    if not path.exists():
        ranks.run(kind, "save", path)
    benchmark.group = f"dcp.load, {WORLD} ranks, GPT-2 sharded by rows, warm cache"
    benchmark.pedantic(lambda: ranks.run(kind, "load", path), rounds=ROUNDS, warmup_rounds=1)
    if benchmark.enabled:
        _TIMES[f"load {kind}"] = benchmark.stats.stats.min


def test_report_dcp_ratios() -> None:
    """Prints the same-run ratios (not a timing)."""
    if not _TIMES:
        pytest.skip("timings disabled (--benchmark-disable) or not run")
    for op, suffix in (("save", ""), ("save", " durable=False"), ("load", "")):
        fs = _TIMES.get(f"{op} filesystem{suffix}")
        ours = _TIMES.get(f"{op} zerockpt{suffix}")
        if fs is not None and ours is not None:
            storage = "FileSystemWriter" if op == "save" else "FileSystemReader"
            report_ratio(f"dcp.{op}{suffix}: {storage} / zerockpt", fs / ours, "target >= 2")
    floor = _TIMES.get("save disk floor")
    if floor is not None and "save filesystem" in _TIMES and "save zerockpt" in _TIMES:
        # No storage layer can beat the floor: FileSystemWriter / floor bounds the save ratio.
        report_ratio("dcp.save: FileSystemWriter / disk floor", _TIMES["save filesystem"] / floor)
        report_ratio("dcp.save: disk floor / zerockpt", floor / _TIMES["save zerockpt"])
