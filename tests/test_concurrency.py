"""Concurrency: the GIL is released for all I/O, threads and processes saving and loading at
once each see whole files, and replacing a file never changes tensors mapped from it."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import zerockpt
from conftest import assert_bitwise_equal, assert_dicts_bitwise_equal, temp_leftovers
from torch import nn


def longest_pause_while(work: Callable[[], None]) -> tuple[float, float]:
    """Runs `work` in a thread; returns (its duration, the longest gap in this thread's ticks)."""
    done = threading.Event()
    span: list[float] = []

    def run() -> None:
        t0 = time.perf_counter()
        try:
            work()
        finally:
            span.append(time.perf_counter() - t0)
            done.set()

    ticks = [time.perf_counter()]
    worker = threading.Thread(target=run)
    worker.start()
    while not done.is_set():
        ticks.append(time.perf_counter())
        time.sleep(0.0005)
    worker.join()
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    return span[0], max(gaps, default=0.0)


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    return {f"w{i}": torch.randn(8 << 20) for i in range(12)}  # 384 MiB


@pytest.mark.parametrize("kind", ["save-buffered", "save-direct", "load-read"], ids=lambda k: k)
def test_gil_released_during_io(tmp_path: Path, tensors: dict, kind: str) -> None:
    path = tmp_path / "g.safetensors"
    zerockpt.save(tensors, path, durable=False)
    works = {
        "save-buffered": lambda: zerockpt.save(tensors, path, durable=False, direct_io=False),
        "save-direct": lambda: zerockpt.save(tensors, path, durable=True, direct_io=True),
        "load-read": lambda: zerockpt.load(path, mmap=False),
    }
    duration, pause = longest_pause_while(works[kind])
    # Holding the GIL through the I/O would stall this thread for the whole call.
    assert pause < 0.5 * duration, f"main thread stalled {pause:.3f}s of a {duration:.3f}s call"


def test_serialize_file_releases_the_gil(tmp_path: Path, tensors: dict) -> None:
    """zerockpt.safetensors.serialize_file (raw-pointer specs, safetensors' API): two threads
    write at once while this one keeps ticking, and each file holds the whole tensors. The
    smaller, always-on form of safetensors' own test_threadable (make test-long runs that one)."""
    from zerockpt.safetensors import TensorSpec, serialize_file

    chosen = {name: tensors[name] for name in ("w0", "w1")}  # 64 MiB, written twice at once
    specs = {
        name: TensorSpec(
            dtype="float32", shape=list(t.shape), data_ptr=t.data_ptr(), data_len=t.nbytes
        )
        for name, t in chosen.items()
    }
    paths = [tmp_path / f"s{i}.safetensors" for i in range(2)]

    def both() -> None:
        writers = [threading.Thread(target=serialize_file, args=(specs, p)) for p in paths]
        for w in writers:
            w.start()
        for w in writers:
            w.join()

    duration, pause = longest_pause_while(both)
    assert pause < 0.5 * duration, f"main thread stalled {pause:.3f}s of a {duration:.3f}s call"
    for path in paths:
        assert_dicts_bitwise_equal(zerockpt.load(path), chosen)


def test_threads_save_and_load_different_files_at_once(tmp_path: Path) -> None:
    results: dict[int, bool] = {}

    def job(i: int) -> None:
        data = {f"t{k}": torch.full((1000 + i,), float(i * 100 + k)) for k in range(20)}
        path = tmp_path / f"f{i}.safetensors"
        for _ in range(5):
            zerockpt.save(data, path, durable=False)
            loaded = zerockpt.load(path, mmap=bool(i % 2))
            results[i] = all(torch.equal(loaded[k], v) for k, v in data.items())

    threads = [threading.Thread(target=job, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: True for i in range(6)}


# --- many threads, every entry point, different files -------------------------------------------


def _buffers_module(tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A module with one buffer per name, shaped and typed like `tensors`, filled with -1."""
    module = nn.Module()
    for name, t in tensors.items():
        module.register_buffer(name, torch.full_like(t.contiguous(), -1))
    return module


def _thread_data(i: int, round_: int) -> dict[str, torch.Tensor]:
    """Distinct per thread and round: several dtypes, a strided view, tied names, size changes."""
    g = torch.Generator().manual_seed(1000 * i + round_)
    rows = 64 + 16 * ((i + round_) % 4)
    f32 = torch.randn(rows, 257, generator=g)
    return {
        "f32": f32,
        "bf16": torch.randn(33, rows, generator=g).bfloat16(),
        "i64": torch.randint(-(2**40), 2**40, (rows,), generator=g),
        "u8": torch.randint(0, 256, (rows * 3,), dtype=torch.uint8, generator=g),
        "strided": torch.randn(rows, 48, generator=g).t(),
        "tied": f32,  # stored once, as an alias of "f32"
        "scalar": torch.tensor(float(i * 100 + round_)),
    }


def _run_threads(target: Callable[[int], None], count: int) -> list[str]:
    """Runs target(0..count-1) in threads; returns the tracebacks of those that raised."""
    errors: list[str] = []

    def run(i: int) -> None:
        try:
            target(i)
        except BaseException:
            errors.append(f"thread {i}:\n{traceback.format_exc()}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_threads_mix_every_entry_point_on_different_files(tmp_path: Path) -> None:
    def job(i: int) -> None:
        path = tmp_path / f"f{i}.safetensors"
        for round_ in range(8):
            data = _thread_data(i, round_)
            zerockpt.save(data, path, durable=round_ % 4 == 0, threads=1 + round_ % 3)
            kind = (i + round_) % 6
            if kind in (0, 1):
                loaded = zerockpt.load(path, mmap=kind == 0, threads=1 + i % 2)
                assert_dicts_bitwise_equal(loaded, data)
                assert loaded["tied"] is loaded["f32"]
            elif kind == 2:
                with zerockpt.open(path) as f:
                    assert f.keys() == list(data)
                    for name, t in data.items():
                        assert_bitwise_equal(f.get_tensor(name, mmap=name != "u8"), t)
            elif kind in (3, 4):
                module = _buffers_module(data)
                result = zerockpt.load_state_dict(module, path, assign=kind == 4)
                assert result.missing_keys == [] and result.unexpected_keys == []
                for name, t in data.items():
                    assert_bitwise_equal(module.get_buffer(name), t)
            else:
                assert zerockpt.verify(path).ok
                assert_dicts_bitwise_equal(zerockpt.load(path, verify=True), data)

    assert _run_threads(job, 6) == []
    assert temp_leftovers(tmp_path) == []


# --- saving over a file whose mapping live tensors use ------------------------------------------


def _spans_of(path: Path) -> list[tuple[int, int]]:
    """Address ranges where this process maps `path` (also once it has been replaced)."""
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip().removesuffix(" (deleted)") == str(path):
                lo, hi = fields[0].split("-")
                spans.append((int(lo, 16), int(hi, 16)))
    return spans


def _is_mapped_view(t: torch.Tensor, spans: list[tuple[int, int]]) -> bool:
    return any(lo <= t.data_ptr() < hi for lo, hi in spans)


def test_saving_over_a_mapped_file_leaves_loaded_tensors_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "live.safetensors"
    # Each round replaces the file by one of another size (larger, smaller, empty, tiny).
    sizes = [50_000, 1_000_000, 10, 300_000, 0, 4096, 2_000_000, 1]
    alive: list[tuple[dict[str, torch.Tensor], list[torch.Tensor]]] = []
    for round_, n in enumerate(sizes):
        data = {
            "x": torch.arange(n, dtype=torch.float32) * (round_ + 1),
            "round": torch.tensor(round_),
            "m": torch.full((64, 64), float(round_), dtype=torch.float64),
        }
        zerockpt.save(data, path, durable=round_ % 3 == 0, direct_io=round_ % 2 == 0)
        loaded = zerockpt.load(path)
        with zerockpt.open(path) as f:
            lazy = [f["x"], f["m"]]
        module = _buffers_module(data)
        zerockpt.load_state_dict(module, path, assign=True)  # buffers become mapped views
        views = [*loaded.values(), *lazy, module.get_buffer("x"), module.get_buffer("m")]
        spans = _spans_of(path)
        assert all(_is_mapped_view(t, spans) for t in views if t.numel() > 0), "not mapped"
        alive.append((data, views))
        for old, old_views in alive:
            expected = [*old.values(), old["x"], old["m"], old["x"], old["m"]]
            for view, want in zip(old_views, expected, strict=True):
                assert_bitwise_equal(view, want)
    assert temp_leftovers(tmp_path) == []


# --- a save and loads of the same path at once ------------------------------------------------

# Two layouts a writer alternates between: they differ in names, sizes and header length, so a
# mixed read could not pass for either.
LAYOUTS: list[dict[str, tuple[tuple[int, ...], torch.dtype]]] = [
    {
        "w0": ((256, 256), torch.float32),
        "w1": ((128, 64), torch.float64),
        "step": ((), torch.int64),
    },
    {
        "w0": ((256, 256), torch.float32),
        "w1": ((128, 64), torch.float64),
        "step": ((), torch.int64),
        "extra": ((512, 300), torch.float32),
        "tail": ((7,), torch.int32),
    },
]


def _version(v: int) -> dict[str, torch.Tensor]:
    return {
        name: torch.full(shape, v, dtype=dtype) for name, (shape, dtype) in LAYOUTS[v % 2].items()
    }


def _whole_version(tensors: dict[str, torch.Tensor], metadata_version: str | None = None) -> int:
    """The version `tensors` hold, after checking they are one whole version of the file."""
    v = int(tensors["step"])
    assert list(tensors) == list(LAYOUTS[v % 2]), (v, list(tensors))
    for name, t in tensors.items():
        shape, dtype = LAYOUTS[v % 2][name]
        assert (tuple(t.shape), t.dtype) == (shape, dtype), name
        assert bool((t == v).all()), f"{name} is not all {v}: a mix of versions"
    if metadata_version is not None:
        assert metadata_version == str(v)
    return v


class _Writer(threading.Thread):
    """Saves version after version of `path` (alternating layouts) until stopped."""

    def __init__(self, path: Path, first: int, step: int = 1) -> None:
        super().__init__()
        self.path, self.version, self.step = path, first, step
        self.stop = threading.Event()
        self.saves = 0
        self.errors: list[str] = []

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.version += self.step
                v = self.version
                zerockpt.save(
                    _version(v),
                    self.path,
                    metadata={"version": str(v)},
                    durable=v % 16 == 0,
                    direct_io=v % 5 == 0,
                )
                self.saves += 1
        except BaseException:
            self.errors.append(traceback.format_exc())


def _read_once(path: Path, kind: int) -> int:
    """One read of `path` by entry point `kind`; returns the (whole) version it saw."""
    if kind == 0:
        return _whole_version(zerockpt.load(path))
    if kind == 1:
        return _whole_version(zerockpt.load(path, mmap=False))
    if kind == 2:
        with zerockpt.open(path) as f:
            names = f.keys()
            tensors = {k: f.get_tensor(k, mmap=k != "w1") for k in names}
            return _whole_version(tensors, f.metadata()["version"])
    if kind == 3:
        return _whole_version(zerockpt.load(path, verify=True, mmap=False))
    # load_state_dict into a module holding every name of both layouts, filled with -1 first.
    module = _buffers_module({**_version(0), **_version(1)})
    result = zerockpt.load_state_dict(module, path, strict=False)
    v = int(module.get_buffer("step"))
    missing = [name for name in LAYOUTS[1] if name not in LAYOUTS[v % 2]]
    assert result.missing_keys == missing and result.unexpected_keys == []
    return _whole_version({name: module.get_buffer(name) for name in LAYOUTS[v % 2]})


def test_reads_during_saves_of_the_same_path_see_whole_files(tmp_path: Path) -> None:
    path = tmp_path / "busy.safetensors"
    zerockpt.save(_version(1), path, metadata={"version": "1"})
    writer = _Writer(path, first=1)
    seen: dict[int, set[int]] = {kind: set() for kind in range(5)}

    def reader(i: int) -> None:
        deadline = time.monotonic() + 2.0
        kind = i
        while time.monotonic() < deadline:
            seen[kind % 5].add(_read_once(path, kind % 5))
            kind += 1

    writer.start()
    try:
        errors = _run_threads(reader, 3)
    finally:
        writer.stop.set()
        writer.join()
    assert errors == [] and writer.errors == []
    assert all(seen.values()), "an entry point never ran"
    versions = set().union(*seen.values())
    assert len(versions) > 2 and writer.saves > 2, "no save overlapped the reads"
    assert temp_leftovers(tmp_path) == []


def test_concurrent_savers_of_one_path_leave_one_whole_file(tmp_path: Path) -> None:
    # Three writers race on one path (their temporary files side by side, each cleaning up
    # stale ones): every read, and the file left at the end, is one whole version.
    path = tmp_path / "raced.safetensors"
    zerockpt.save(_version(1), path, metadata={"version": "1"})
    writers = [_Writer(path, first=w, step=3) for w in range(3)]
    for w in writers:
        w.start()
    versions: set[int] = set()
    deadline = time.monotonic() + 1.0
    try:
        kind = 0
        while time.monotonic() < deadline:
            versions.add(_read_once(path, kind % 5))
            kind += 1
    finally:
        for w in writers:
            w.stop.set()
        for w in writers:
            w.join()
    assert [e for w in writers for e in w.errors] == []
    assert len(versions) > 2
    with zerockpt.open(path) as f:
        final = _whole_version(dict(f.items()), f.metadata()["version"])
    assert final in {w.version for w in writers}
    assert zerockpt.verify(path).ok
    assert temp_leftovers(tmp_path) == []


# A reader in another process: loads and opens `path` for DURATION seconds, checking every read
# is one whole version; prints how many reads and versions it saw.
READER_CHILD = textwrap.dedent(
    """
    import json, sys, time, torch, zerockpt
    path, duration = sys.argv[1], float(sys.argv[2])

    def whole(tensors, version=None):
        v = int(tensors["step"])
        names = ["w0", "w1", "step"] + (["extra", "tail"] if v % 2 else [])
        assert list(tensors) == names, (v, list(tensors))
        for name, t in tensors.items():
            assert bool((t == v).all()), (name, v)
        assert version is None or version == str(v)
        return v

    whole(zerockpt.load(path))
    print("ready", flush=True)
    reads, versions, deadline = 0, set(), time.monotonic() + duration
    while time.monotonic() < deadline:
        kind = reads % 3
        if kind == 0:
            versions.add(whole(zerockpt.load(path)))
        elif kind == 1:
            versions.add(whole(zerockpt.load(path, mmap=False, verify=True)))
        else:
            with zerockpt.open(path) as f:
                versions.add(whole({k: f[k] for k in f.keys()}, f.metadata()["version"]))
        reads += 1
    print(json.dumps({"reads": reads, "versions": len(versions)}))
    """
)


def test_reader_process_during_saves_sees_whole_files(tmp_path: Path) -> None:
    path = tmp_path / "shared.safetensors"
    zerockpt.save(_version(1), path, metadata={"version": "1"})
    child = subprocess.Popen(
        [sys.executable, "-c", READER_CHILD, str(path), "1.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    writer = _Writer(path, first=1)
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            child.kill()
            pytest.fail(f"reader did not start: {child.communicate()[1][-3000:]}")
        writer.start()
        out, err = child.communicate(timeout=60)
    finally:
        writer.stop.set()
        if writer.is_alive():
            writer.join()
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err[-3000:]
    assert writer.errors == []
    report = json.loads(out.strip().splitlines()[-1])
    assert report["reads"] > 0 and report["versions"] > 1, report
