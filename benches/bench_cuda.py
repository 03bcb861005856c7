"""CUDA checkpoints: zerockpt against torch.save/torch.load and safetensors, and the raw limits.

A state dict shaped like a transformer's weights (blocks of [3d, d], [d, d], [4d, d] and
[d, 4d] matrices plus norm vectors; d = 4096, or 1024 under 1 GB) is generated on the GPU
with ``torch.randn`` (bf16 by default), saved from the CUDA tensors and loaded back to the GPU
by each method. One checkpoint file is on disk at a time.

- Saves are durable: ``zerockpt.save`` (durable=True) fsyncs the file and its directory;
  ``torch.save`` and safetensors' ``save_file`` are followed by an ``os.fsync`` of the file.
  Each round writes a new file, after ``os.sync`` (untimed).
- Loads are cold: before each round the file (already fsynced) has its page-cache pages
  dropped with ``posix_fadvise(POSIX_FADV_DONTNEED)``; the script also reports warm loads.
  Every loaded state dict (and the module ``load_state_dict`` filled) is checked once with
  ``torch.equal`` against the source.
- raw pinned D2H / H2D: the same bytes copied between the GPU tensors and one reused 256 MiB
  pinned host buffer, in 256 MiB copies on one stream, then ``torch.cuda.synchronize``.
- raw write: O_DIRECT ``pwrite`` of the same number of (random) bytes in 8 MiB pieces from a
  page-aligned buffer by the I/O threads, then ``fsync`` (buffered if O_DIRECT is refused).
- raw read: buffered parallel ``pread`` of that file into 8 MiB buffers, cold as above.

Every timing ends with ``torch.cuda.synchronize()``.

As benchmarks (skipped without a GPU; ``ZEROCKPT_BENCH_CUDA_GB`` sets the size, default 4)::

    pytest benches/bench_cuda.py

As a script, printing a Markdown table::

    python benches/bench_cuda.py --gb 4 [--dtype bf16] [--dir PATH] [--rounds 3] [--json OUT]

Columns: ``s`` is the best of the rounds; ``GB/s`` is bytes / s (1 GB = 1e9 bytes); ``of
limit`` is the row's GB/s over the raw limit's, the slower of pinned D2H and raw write for
saves, of pinned H2D and cold raw read for loads; ``÷ zerockpt`` is s over zerockpt.save's
(saves) or zerockpt.load's (loads) s: for torch and safetensors, zerockpt's speedup. Targets:
zerockpt >= 0.8 of the limit, torch.save and safetensors.load_file >= 3x zerockpt's time.
``warm s`` (script only): the same load with the file in the page cache. torch.load runs with
``weights_only=True``, with and without ``mmap=True``.
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch
import zerockpt
from conftest import SMOKE, report_ratio
from pytest_benchmark.fixture import BenchmarkFixture
from torch import nn
from zerockpt.benchtools import fsync_file

COPY_CHUNK = 256 << 20  # bytes per raw pinned copy (and the pinned buffer's size)
IO_CHUNK = 8 << 20  # bytes per raw pwrite / pread
BLOCK = 4096  # O_DIRECT alignment
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_GB = 0.064 if SMOKE else float(os.environ.get("ZEROCKPT_BENCH_CUDA_GB", "4"))
THREADS = min(os.cpu_count() or 1, 8)  # zerockpt's default
ROUNDS = 3
DEVICE = "cuda"
_TMP_ROOT = Path(__file__).resolve().parent.parent / "build" / "bench-tmp"


def _param(dtype: torch.dtype, *shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device=DEVICE, dtype=dtype), requires_grad=False)


def make_model(d: int, n: int, dtype: torch.dtype) -> nn.Module:
    """``n`` transformer blocks of width ``d`` and a final norm, uninitialised on the GPU."""
    shapes = {"attn_norm": [d], "qkv": [3 * d, d], "proj": [d, d]}
    shapes |= {"mlp_norm": [d], "up": [4 * d, d], "down": [d, 4 * d]}
    model, blocks = nn.Module(), nn.ModuleList(nn.Module() for _ in range(n))
    for block in blocks:
        for name, shape in shapes.items():
            block.register_parameter(name, _param(dtype, *shape))
    model.add_module("blocks", blocks)
    model.register_parameter("norm", _param(dtype, d))
    return model


def _byte_chunks(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """uint8 views of the tensors' bytes, at most COPY_CHUNK each."""
    flats = [t.detach().reshape(-1).view(torch.uint8) for t in tensors]
    return [f[i : i + COPY_CHUNK] for f in flats for i in range(0, f.numel(), COPY_CHUNK)]


class Bench:
    """The source state dict, the module to load into, the buffers and the directory."""

    def __init__(self, gb: float, dtype: torch.dtype, directory: Path, threads: int) -> None:
        item = torch.empty((), dtype=dtype).element_size()
        self.d = 4096 if gb >= 1 else 1024
        self.n_blocks = max(1, round(gb * 1e9 / ((12 * self.d + 2) * self.d * item)))
        self.model = make_model(self.d, self.n_blocks, dtype)
        torch.manual_seed(0)
        self.sd = {
            k: torch.randn(v.shape, device=DEVICE, dtype=dtype)
            for k, v in self.model.state_dict().items()
        }
        self.nbytes = sum(t.nbytes for t in self.sd.values())
        self.n_tensors = len(self.sd)
        self.dir, self.threads = directory, threads
        self.pool = ThreadPoolExecutor(threads)
        self.pinned = torch.empty(min(COPY_CHUNK, self.nbytes), dtype=torch.uint8, pin_memory=True)
        self.src_chunks = _byte_chunks(self.sd.values())
        self.dst_chunks = _byte_chunks(self.model.parameters())
        self.noise = mmap.mmap(-1, 8 * IO_CHUNK)  # page-aligned
        self.noise.write(os.urandom(len(self.noise)))
        self.read_bufs = [memoryview(mmap.mmap(-1, IO_CHUNK)) for _ in range(threads)]
        self.direct = True
        torch.cuda.synchronize()

    def path(self, fmt: str | None) -> Path:
        return self.dir / f"ckpt.{fmt}"

    def close(self) -> None:
        self.pool.shutdown()
        for p in self.dir.glob("ckpt.*"):
            p.unlink()
        del self.sd, self.model, self.pinned, self.src_chunks, self.dst_chunks
        torch.cuda.empty_cache()

    def d2h(self, _: Path) -> None:
        for c in self.src_chunks:
            self.pinned[: c.numel()].copy_(c, non_blocking=True)

    def h2d(self, _: Path) -> None:
        for c in self.dst_chunks:
            c.copy_(self.pinned[: c.numel()], non_blocking=True)

    def _shares(self) -> list[range]:
        """Each I/O thread's contiguous run of IO_CHUNK indices."""
        n, t = -(-self.nbytes // IO_CHUNK), self.threads
        return [range(k * n // t, (k + 1) * n // t) for k in range(t)]

    def write_raw(self, path: Path) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            fd = os.open(path, flags | os.O_DIRECT, 0o644)
        except OSError:  # e.g. tmpfs: buffered writes
            self.direct = False
            fd = os.open(path, flags, 0o644)
        noise = memoryview(self.noise)

        def write(chunks: range) -> None:
            for c in chunks:
                off = c * IO_CHUNK
                src, n = (c % 8) * IO_CHUNK, min(IO_CHUNK, self.nbytes - off)
                buf = noise[src : src + -(-n // BLOCK) * BLOCK]  # whole blocks
                while len(buf):
                    n = os.pwrite(fd, buf, off)
                    buf, off = buf[n:], off + n

        try:
            list(self.pool.map(write, self._shares()))
            os.ftruncate(fd, self.nbytes)  # the last block was padded
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_raw(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)

        def read(k: int, chunks: range) -> None:
            off, end = chunks.start * IO_CHUNK, min(chunks.stop * IO_CHUNK, self.nbytes)
            while off < end:
                n = os.preadv(fd, [self.read_bufs[k][: min(IO_CHUNK, end - off)]], off)
                if n <= 0:
                    raise EOFError(f"{path}: short read at {off}")
                off += n

        try:
            list(self.pool.map(read, range(self.threads), self._shares()))
        finally:
            os.close(fd)

    def setup(self, row: Row, cold: bool = True) -> None:
        """Untimed, before each round: a fresh file for saves, a cold (or warm) one for loads."""
        path = self.path(row.fmt)
        for other in self.dir.glob("ckpt.*"):  # one checkpoint on disk at a time
            if other != path:
                other.unlink()
        if row.op == "save":
            path.unlink(missing_ok=True)
            os.sync()
        elif row.fmt is not None:
            if not path.exists():
                SAVES[row.fmt](self, path)
            if cold:
                fsync_file(path, drop=True)
        torch.cuda.synchronize()

    def call(self, row: Row) -> object:
        """One timed round."""
        out = row.run(self, self.path(row.fmt))
        torch.cuda.synchronize()
        return out

    def check(self, row: Row, out: object) -> None:
        """The loaded tensors (or the module's, for load_state_dict) equal the source's."""
        if row.op != "load" or row.fmt in (None, "raw"):
            return
        got = self.model.state_dict() if "load_state_dict" in row.name else out
        if not isinstance(got, dict) or set(got) != set(self.sd):
            raise RuntimeError(f"{row.name}: wrong names")
        for k, t in self.sd.items():
            if got[k].device != t.device or not torch.equal(got[k], t):
                raise RuntimeError(f"{row.name}: {k} differs from the source")


def _zerockpt_save(b: Bench, p: Path) -> None:
    zerockpt.save(b.sd, p, threads=b.threads)


def _zerockpt_load(b: Bench, p: Path) -> object:
    return zerockpt.load(p, device=DEVICE, threads=b.threads)


def _zerockpt_load_state_dict(b: Bench, p: Path) -> object:
    return zerockpt.load_state_dict(b.model, p, threads=b.threads)


def _torch_save(b: Bench, p: Path) -> None:
    torch.save(b.sd, p)
    fsync_file(p)


def _torch_load(b: Bench, p: Path) -> object:
    return torch.load(p, map_location=DEVICE, weights_only=True)


def _torch_load_mmap(b: Bench, p: Path) -> object:
    return torch.load(p, map_location=DEVICE, mmap=True, weights_only=True)


def _safetensors_save(b: Bench, p: Path) -> None:
    safetensors.torch.save_file(b.sd, p)
    fsync_file(p)


def _safetensors_load(b: Bench, p: Path) -> object:
    return safetensors.torch.load_file(p, device=DEVICE)


@dataclass(frozen=True)
class Row:
    name: str
    op: str  # "save" or "load"
    fmt: str | None  # the file it writes or reads; None: no file
    run: Callable[[Bench, Path], object]


# In the order they run: each format's loads read the file its save left.
ROWS = [
    Row("raw pinned D2H", "save", None, Bench.d2h),
    Row("raw pinned H2D", "load", None, Bench.h2d),
    Row("raw write, O_DIRECT+fsync", "save", "raw", Bench.write_raw),
    Row("raw read, pread", "load", "raw", Bench.read_raw),
    Row("zerockpt.save", "save", "zerockpt", _zerockpt_save),
    Row("zerockpt.load(cuda)", "load", "zerockpt", _zerockpt_load),
    Row("zerockpt.load_state_dict", "load", "zerockpt", _zerockpt_load_state_dict),
    Row("torch.save+fsync", "save", "torch", _torch_save),
    Row("torch.load(cuda, mmap)", "load", "torch", _torch_load_mmap),
    Row("torch.load(cuda)", "load", "torch", _torch_load),
    Row("safetensors.save_file+fsync", "save", "safetensors", _safetensors_save),
    Row("safetensors.load_file(cuda)", "load", "safetensors", _safetensors_load),
]
SAVES = {r.fmt: r.run for r in ROWS if r.op == "save" and r.fmt is not None}
REF = {"save": "zerockpt.save", "load": "zerockpt.load(cuda)"}
LIMIT = {"save": ("raw pinned D2H", ROWS[2].name), "load": ("raw pinned H2D", ROWS[3].name)}


def limit_s(times: dict[str, float], op: str) -> float:
    """The raw limit's seconds: the slower of the copy and the file I/O."""
    found = [times[name] for name in LIMIT[op] if name in times]
    return max(found) if len(found) == len(LIMIT[op]) else math.nan


def ratios(times: dict[str, float]) -> list[tuple[str, float, str]]:
    """(what, ratio, target) for the targets (NaN where a row did not run)."""

    def t(name: str) -> float:
        return times.get(name, math.nan)

    save, load = limit_s(times, "save"), limit_s(times, "load")
    z_save, z_load = t(REF["save"]), t(REF["load"])
    return [
        ("zerockpt.save: of the save limit", save / z_save, ">= 0.8"),
        ("torch.save+fsync / zerockpt.save", t("torch.save+fsync") / z_save, ">= 3"),
        ("zerockpt.load(cuda): of the load limit", load / z_load, ">= 0.8"),
        ("zerockpt.load_state_dict: of the load limit", load / t(ROWS[6].name), ">= 0.8"),
        (
            "safetensors.load_file(cuda) / zerockpt.load",
            t("safetensors.load_file(cuda)") / z_load,
            ">= 3",
        ),
        ("torch.load(cuda, mmap) / zerockpt.load", t("torch.load(cuda, mmap)") / z_load, ""),
    ]


# --- pytest-benchmark -------------------------------------------------------------------------

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
_TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def bench(module_bench_dir: Path) -> Iterator[Bench]:
    b = Bench(DEFAULT_GB, torch.bfloat16, module_bench_dir, THREADS)
    yield b
    b.close()


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_cuda(benchmark: BenchmarkFixture, bench: Bench, row: Row) -> None:
    """One method x operation on the GPU state dict (saves fsynced, loads cold)."""
    what = "save (fsync)" if row.op == "save" else "load to cuda (cold page cache)"
    benchmark.group = f"cuda {what}, {bench.nbytes / 1e9:.2f} GB bf16"
    benchmark.extra_info["bytes"] = bench.nbytes
    out = benchmark.pedantic(
        bench.call, args=(row,), setup=lambda: bench.setup(row), rounds=ROUNDS, warmup_rounds=1
    )
    bench.check(row, out)
    stats = getattr(benchmark, "stats", None)
    if benchmark.enabled and stats is not None:
        _TIMES[row.name] = stats.stats.min
        benchmark.extra_info["GB/s"] = round(bench.nbytes / _TIMES[row.name] / 1e9, 3)


def test_report_cuda_ratios() -> None:
    """Prints the same-run ratios against the targets (not a timing)."""
    if not _TIMES:
        pytest.skip("timings disabled (--benchmark-disable) or not run")
    for what, ratio, target in ratios(_TIMES):
        if not math.isnan(ratio):
            report_ratio(f"cuda {what}", ratio, f"target {target}" if target else "")


# --- script -----------------------------------------------------------------------------------


def time_row(b: Bench, row: Row, rounds: int, warmup: int, cold: bool = True) -> float:
    """The best of ``rounds`` timed rounds (after ``warmup``); checks the last cold one."""
    best = math.inf
    for i in range(warmup + rounds):
        b.setup(row, cold)
        start = time.perf_counter()
        out = b.call(row)
        elapsed = time.perf_counter() - start
        if i >= warmup:
            best = min(best, elapsed)
        if cold and i == warmup + rounds - 1:
            b.check(row, out)
        del out
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--gb", type=float, default=DEFAULT_GB, help="state dict size in GB")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--dir", type=Path, default=_TMP_ROOT, help="where to write the files")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="timed rounds per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per row first")
    parser.add_argument("--threads", type=int, default=THREADS, help="zerockpt and raw I/O")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda.py: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 1
    args.dir.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="zerockpt-cuda-", dir=args.dir))
    times: dict[str, float] = {}
    warm: dict[str, float] = {}
    b: Bench | None = None
    try:
        b = Bench(args.gb, DTYPES[args.dtype], directory, args.threads)
        free = shutil.disk_usage(directory).free
        if free < 1.1 * b.nbytes:
            print(f"bench_cuda.py: {free / 1e9:.1f} GB free in {args.dir}", file=sys.stderr)
            return 1
        for row in ROWS:
            times[row.name] = time_row(b, row, args.rounds, args.warmup)
            if row.op == "load" and row.fmt is not None:
                warm[row.name] = time_row(b, row, args.rounds, args.warmup, cold=False)
            print(f"{row.name}: {times[row.name]:.3f} s", file=sys.stderr)
    finally:
        if b is not None:
            b.close()
        shutil.rmtree(directory, ignore_errors=True)
    print_report(args, b, times, warm)
    return 0


def print_report(
    args: argparse.Namespace, b: Bench, times: dict[str, float], warm: dict[str, float]
) -> None:
    """The Markdown table, the ratios and the footnotes; the JSON file with ``--json``."""
    gpu = torch.cuda.get_device_name()
    print(
        f"# zerockpt on CUDA: {gpu} (CUDA {torch.version.cuda}), torch {torch.__version__}, "
        f"zerockpt {zerockpt.__version__}, {os.cpu_count()} CPUs, {args.threads} I/O threads\n"
    )
    print(
        f"{b.n_tensors} {args.dtype} tensors ({b.n_blocks} blocks, d={b.d}), {b.nbytes:,} bytes "
        f"({b.nbytes / 1e9:.2f} GB), files in {args.dir}; s = best of {args.rounds} rounds\n"
    )
    print("| method | op | s | GB/s | of limit | ÷ zerockpt | warm s |")
    print("|---|---|--:|--:|--:|--:|--:|")
    table = []
    for op in ("save", "load"):
        for row in (r for r in ROWS if r.op == op):
            s = times[row.name]
            entry = {
                "name": row.name,
                "op": op,
                "seconds": s,
                "GB/s": b.nbytes / s / 1e9,
                "of_limit": limit_s(times, op) / s,
                "vs_zerockpt": s / times[REF[op]],
                "warm_seconds": warm.get(row.name),
            }
            table.append(entry)
            w = f"{warm[row.name]:.3f}" if row.name in warm else ""
            print(
                f"| {row.name} | {op} | {s:.3f} | {entry['GB/s']:.2f} | {entry['of_limit']:.2f} "
                f"| {entry['vs_zerockpt']:.2f} | {w} |"
            )
    print()
    for what, ratio, target in ratios(times):
        print(f"- {what}: {ratio:.2f}" + (f" (target {target})" if target else ""))
    write = "O_DIRECT pwrite" if b.direct else "buffered pwrite (O_DIRECT refused)"
    print(
        "\nSaves fsync the file (zerockpt.save durable=True also fsyncs the directory; torch.save"
        " and save_file are followed by os.fsync). Loads are cold: the file's pages are dropped"
        " (POSIX_FADV_DONTNEED) before each round; warm s: the file in the page cache.\n"
        f"raw write: {write} + fsync by {args.threads} threads; raw read: buffered pread by"
        f" {args.threads} threads; raw D2H/H2D: {COPY_CHUNK >> 20} MiB copies to/from one pinned"
        " buffer. Limits: save = the slower of D2H and raw write; load = of H2D and raw read."
    )
    if args.json is not None:
        report: dict[str, object] = {"gpu": gpu, "cuda": torch.version.cuda, "rows": table}
        report |= {"torch": torch.__version__, "bytes": b.nbytes, "dtype": args.dtype}
        report["ratios"] = [
            {"what": w, "ratio": None if math.isnan(r) else r, "target": t}
            for w, r, t in ratios(times)
        ]
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
