"""Save benchmarks: zerockpt against torch.save, safetensors and raw pwrite limits.

Every round writes a new file: the setup deletes the previous one and flushes the page cache's
dirty data (``os.sync``) so that no round pays for another's writeback.
"""

from __future__ import annotations

import io
import mmap
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import zerockpt
from pytest_benchmark.fixture import BenchmarkFixture
from zerockpt.benchtools import fsync_file, total_nbytes, unique_tensors

SaveFn = Callable[[dict[str, torch.Tensor], Path], None]

BLOCK = 4096  # O_DIRECT alignment of offsets, lengths and buffers
BOUNCE = 8 << 20  # bytes per O_DIRECT staging buffer


def _torch_save_fsync(sd: dict[str, torch.Tensor], path: Path) -> None:
    torch.save(sd, path)
    fsync_file(path)


def _safetensors_save_fsync(sd: dict[str, torch.Tensor], path: Path) -> None:
    safetensors.torch.save_file(sd, path)
    fsync_file(path)


SAVE_METHODS: dict[str, SaveFn] = {
    "torch.save": lambda sd, p: torch.save(sd, p),
    "torch.save+fsync": _torch_save_fsync,
    "safetensors.save_file": lambda sd, p: safetensors.torch.save_file(sd, p),
    "safetensors.save_file+fsync": _safetensors_save_fsync,
    "zerockpt durable=False": lambda sd, p: zerockpt.save(sd, p, durable=False),
    "zerockpt durable=True": lambda sd, p: zerockpt.save(sd, p, durable=True),
    "zerockpt durable=False direct_io=True": lambda sd, p: zerockpt.save(
        sd, p, durable=False, direct_io=True
    ),
    # What the per-tensor CRC-32C costs: the same saves without it.
    "zerockpt durable=False checksums=False": lambda sd, p: zerockpt.save(
        sd, p, durable=False, checksums=False
    ),
    "zerockpt durable=True checksums=False": lambda sd, p: zerockpt.save(
        sd, p, durable=True, checksums=False
    ),
}


def _fresh_file_setup(path: Path) -> Callable[[], None]:
    """A pedantic ``setup``: removes ``path`` and writes back all dirty pages (untimed)."""

    def setup() -> None:
        path.unlink(missing_ok=True)
        os.sync()

    return setup


def _record(benchmark: BenchmarkFixture, nbytes: int) -> None:
    """Stores the bytes written and, when timings were taken, GB/s at the best round."""
    benchmark.extra_info["bytes"] = nbytes
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.min > 0:
        benchmark.extra_info["GB/s"] = round(nbytes / stats.stats.min / 1e9, 3)


@pytest.mark.parametrize("method", list(SAVE_METHODS))
@pytest.mark.parametrize("dataset", ["gpt2", "small"])
def test_save(
    benchmark: BenchmarkFixture,
    datasets: dict[str, dict[str, torch.Tensor]],
    bench_dir: Path,
    rounds: dict[str, int],
    dataset: str,
    method: str,
) -> None:
    """One writer saving one input to a new file."""
    sd = datasets[dataset]
    # safetensors refuses tied tensors: give it the dict without the duplicate names.
    arg = unique_tensors(sd) if method.startswith("safetensors") else sd
    path = bench_dir / "out.bin"
    save = SAVE_METHODS[method]
    benchmark.group = f"save {dataset}"
    benchmark.pedantic(
        save,
        args=(arg, path),
        setup=_fresh_file_setup(path),
        rounds=rounds[dataset],
        warmup_rounds=1,
        iterations=1,
    )
    _record(benchmark, total_nbytes(sd))
    assert path.stat().st_size >= total_nbytes(sd)


# --- in memory: bytes out, no file -------------------------------------------------------------

SAVE_BYTES_METHODS: dict[str, Callable[[dict[str, torch.Tensor]], bytes]] = {
    "safetensors.torch.save": lambda sd: safetensors.torch.save(sd),
    "zerockpt.save_bytes": lambda sd: zerockpt.save_bytes(sd),
    "zerockpt.save_bytes checksums=False": lambda sd: zerockpt.save_bytes(sd, checksums=False),
    "torch.save BytesIO": lambda sd: _torch_save_bytes(sd),
}


def _torch_save_bytes(sd: dict[str, torch.Tensor]) -> bytes:
    out = io.BytesIO()
    torch.save(sd, out)
    return out.getvalue()


@pytest.mark.parametrize("method", list(SAVE_BYTES_METHODS))
@pytest.mark.parametrize("dataset", ["gpt2", "small"])
def test_save_bytes(
    benchmark: BenchmarkFixture,
    datasets: dict[str, dict[str, torch.Tensor]],
    rounds: dict[str, int],
    dataset: str,
    method: str,
) -> None:
    """One serializer turning one input into the bytes of a file, in memory."""
    sd = datasets[dataset]
    arg = unique_tensors(sd) if method.startswith("safetensors") else sd
    benchmark.group = f"save bytes {dataset}"
    data = benchmark.pedantic(
        SAVE_BYTES_METHODS[method], args=(arg,), rounds=rounds[dataset], warmup_rounds=1
    )
    _record(benchmark, total_nbytes(sd))
    assert len(data) >= total_nbytes(sd)


# --- raw limits: the same tensor bytes, concatenated, written without any format -------------


def _byte_arrays(sd: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """Flat uint8 numpy views of each distinct tensor's bytes (no copy for contiguous ones)."""
    return [t.contiguous().view(-1).view(torch.uint8).numpy() for t in unique_tensors(sd).values()]


def _pieces(arrays: list[np.ndarray], lo: int, hi: int) -> list[tuple[int, np.ndarray]]:
    """(offset, bytes) pieces of the concatenation of ``arrays`` that cover ``[lo, hi)``."""
    out: list[tuple[int, np.ndarray]] = []
    start = 0
    for a in arrays:
        end = start + a.size
        if end > lo and start < hi:
            a_lo, a_hi = max(lo, start), min(hi, end)
            out.append((a_lo, a[a_lo - start : a_hi - start]))
        start = end
        if start >= hi:
            break
    return out


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        n = os.pwrite(fd, buf, offset)
        buf, offset = buf[n:], offset + n


def _raw_parallel_pwrite(
    arrays: list[np.ndarray], pool: ThreadPoolExecutor, threads: int, preallocate: bool = False
) -> Callable[[Path], None]:
    """Buffered pwrite of each thread's contiguous share of the bytes (no fsync).

    With ``preallocate`` the file's blocks are reserved first (fallocate), as zerockpt does.
    """
    total = sum(a.size for a in arrays)
    bounds = [(k * total // threads) // BLOCK * BLOCK for k in range(threads)] + [total]
    shares = [_pieces(arrays, bounds[k], bounds[k + 1]) for k in range(threads)]
    shares = [[(off, memoryview(a)) for off, a in share] for share in shares]

    def write_share(fd: int, share: list[tuple[int, memoryview]]) -> None:
        for off, mv in share:
            _pwrite_all(fd, mv, off)

    def run(path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if preallocate:
                os.posix_fallocate(fd, 0, total)
            list(pool.map(lambda s: write_share(fd, s), shares))
        finally:
            os.close(fd)

    return run


def _raw_direct_pwrite(
    arrays: list[np.ndarray], pool: ThreadPoolExecutor, threads: int
) -> Callable[[Path], None]:
    """O_DIRECT pwrite through page-aligned bounce buffers, then ftruncate and fsync."""
    total = sum(a.size for a in arrays)
    n_chunks = -(-total // BOUNCE)
    chunks = [
        (c * BOUNCE, _pieces(arrays, c * BOUNCE, min(total, (c + 1) * BOUNCE)))
        for c in range(n_chunks)
    ]
    shares = [
        chunks[k * n_chunks // threads : (k + 1) * n_chunks // threads] for k in range(threads)
    ]
    bounce = [mmap.mmap(-1, BOUNCE) for _ in range(threads)]  # page-aligned

    def write_share(fd: int, k: int) -> None:
        buf = np.frombuffer(bounce[k], dtype=np.uint8)
        view = memoryview(bounce[k])
        for chunk_off, pieces in shares[k]:
            n = 0
            for off, a in pieces:
                np.copyto(buf[off - chunk_off : off - chunk_off + a.size], a)
                n = off - chunk_off + a.size
            padded = -(-n // BLOCK) * BLOCK
            buf[n:padded] = 0  # the last block is padded, then cut by ftruncate
            _pwrite_all(fd, view[:padded], chunk_off)

    def run(path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            list(pool.map(lambda k: write_share(fd, k), range(threads)))
            os.ftruncate(fd, total)
            os.fsync(fd)
        finally:
            os.close(fd)

    return run


RAW_METHODS = {
    "raw parallel pwrite": _raw_parallel_pwrite,
    "raw parallel pwrite, fallocate first": lambda a, p, t: _raw_parallel_pwrite(a, p, t, True),
    "raw O_DIRECT pwrite+fsync": _raw_direct_pwrite,
}


@pytest.mark.parametrize("method", list(RAW_METHODS))
def test_save_raw_gpt2(
    benchmark: BenchmarkFixture,
    gpt2_sd: dict[str, torch.Tensor],
    bench_dir: Path,
    rounds: dict[str, int],
    method: str,
) -> None:
    """Upper bounds for the GPT-2 save: the tensor bytes alone, by os.cpu_count() threads."""
    arrays = _byte_arrays(gpt2_sd)
    path = bench_dir / "out.bin"
    benchmark.group = "save gpt2"
    threads = os.cpu_count() or 1
    with ThreadPoolExecutor(threads) as pool:
        benchmark.pedantic(
            RAW_METHODS[method](arrays, pool, threads),
            args=(path,),
            setup=_fresh_file_setup(path),
            rounds=rounds["gpt2"],
            warmup_rounds=1,
            iterations=1,
        )
    nbytes = total_nbytes(gpt2_sd)
    _record(benchmark, nbytes)
    with path.open("rb") as f:  # the bytes really are the tensors' bytes, in order
        assert f.read(arrays[0].size) == arrays[0].tobytes()
        f.seek(nbytes - arrays[-1].size)
        assert f.read() == arrays[-1].tobytes()
