"""``zerockpt bench``: zerockpt beside torch.save/torch.load and safetensors, on this machine.

Builds a GPT-style state dict of the requested size in memory (random weights, nothing is
downloaded), then for each method saves it to a new file, loads it back (the call alone, and
the call followed by reading every byte), checks that every loaded tensor equals the original
bit for bit, and prints a table of seconds, GB/s, the ratio to zerockpt and the peak memory of
each operation::

    zerockpt bench --params 350M --dtype bf16 --runs 3 --plot bench.png

``add_arguments`` and ``run`` are what the ``zerockpt`` command line uses; :func:`main` runs the
benchmark on its own (``python -m zerockpt.bench``).

Exit status: 0, 1 if a loaded tensor differs from the original or a file cannot be written or
read, 2 for a usage error (a bad option, not enough memory or disk, matplotlib missing).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TextIO

import torch

import zerockpt
from zerockpt.benchtools import (
    GPT2_POSITIONS,
    GPT2_VOCAB,
    TIED,
    ModelConfig,
    StateDict,
    bits,
    build_state_dict,
    fsync_file,
    read_every_byte,
    read_through,
    unique_tensors,
)
from zerockpt.cli import CommandError, UsageError

MIN_PARAMS = 1_000_000
MAX_PARAMS = 1_000_000_000_000

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

# Operations, in table order.
SAVE = "save"
LOAD = "load"
LOAD_READ = "load + read"
OPERATIONS = (SAVE, LOAD, LOAD_READ)
REFERENCE = "zerockpt"
# Share of the CPU time taken by other processes above which the timings are called noisy.
BUSY_WARNING = 0.1

_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_PARAMS_RE = re.compile(
    r"(?P<number>[0-9][0-9_]*(?:\.[0-9]*)?(?:e[+-]?[0-9]+)?)(?P<suffix>[kmbgt]?)"
)


# --- The model: GPT-2-shaped tensors ----------------------------------------------------------


# Sizes of the GPT-2 / GPT-3 families that the usual names refer to.
PRESETS: dict[int, ModelConfig] = {
    125_000_000: ModelConfig(GPT2_VOCAB, GPT2_POSITIONS, 768, 12),
    350_000_000: ModelConfig(GPT2_VOCAB, GPT2_POSITIONS, 1024, 24),
    1_300_000_000: ModelConfig(GPT2_VOCAB, GPT2_POSITIONS, 2048, 24),
}


def parse_params(text: str) -> int:
    """Parses a parameter count: ``125M``, ``1.3B``, ``50m``, ``2e6``, ``1000000``, ``7_000K``.

    Suffixes (any case): K = 10^3, M = 10^6, B or G = 10^9, T = 10^12.

    Args:
        text: The count as typed.

    Returns:
        The count, rounded to a whole number of parameters.

    Raises:
        ValueError: ``text`` is not such a count, or it is outside [1M, 1T].
    """
    match = _PARAMS_RE.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(
            f"expected a parameter count such as 125M, 350M, 1.3B, 2e6 or 5000000, got {text!r}"
        )
    try:
        value = Decimal(match["number"].replace("_", "")) * _SUFFIXES[match["suffix"].upper()]
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a number of parameters") from None
    if not MIN_PARAMS <= value <= MAX_PARAMS:
        raise ValueError(f"{text!r}: the number of parameters must be between 1M and 1T")
    return int(value.to_integral_value())


def model_config(n_params: int) -> ModelConfig:
    """A GPT-2-style shape with about ``n_params`` parameters (tied embeddings counted once).

    125M, 350M and 1.3B are GPT-2 small (768 wide, 12 layers), GPT-2 medium (1024, 24) and
    GPT-3 XL (2048, 24). Other sizes get a width (a multiple of 64) and a depth about
    width / 64, as those models have; GPT-2's 50,257-token vocabulary while its embedding stays
    below 60% of the parameters, else a smaller vocabulary that makes up the count, so that
    small sizes such as ``2M`` build in a moment. Allocates nothing.

    Args:
        n_params: The number of parameters wanted, at least :data:`MIN_PARAMS`.

    Returns:
        The shape; its ``n_params`` is within a few percent of ``n_params``.

    Raises:
        ValueError: ``n_params`` is below :data:`MIN_PARAMS`.
    """
    if n_params < MIN_PARAMS:
        raise ValueError(f"at least {MIN_PARAMS:,} parameters, got {n_params:,}")
    if n_params in PRESETS:
        return PRESETS[n_params]
    # Transformer blocks (12 d^2 each) hold ~70% of the parameters at depth d / 64.
    d = max(64, 64 * round((0.7 * n_params * 64 / 12) ** (1 / 3) / 64))
    block = 12 * d * d + 13 * d
    fixed = GPT2_POSITIONS * d + 2 * d  # position embedding, final layer norm
    if GPT2_VOCAB * d <= 0.6 * n_params:
        n_layer = max(1, round((n_params - fixed - GPT2_VOCAB * d) / block))
        return ModelConfig(GPT2_VOCAB, GPT2_POSITIONS, d, n_layer)
    vocab = round(0.3 * n_params / d)
    n_layer = max(1, round((n_params - fixed - vocab * d) / block))
    vocab = min(GPT2_VOCAB, max(256, round((n_params - fixed - n_layer * block) / d)))
    return ModelConfig(vocab, GPT2_POSITIONS, d, n_layer)


# --- Methods --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One way of writing a file and reading it back."""

    name: str
    suffix: str
    save: Callable[[StateDict, Path, bool], None]  # (state dict, path, fsync)
    load: Callable[[Path], StateDict]  # lazy: maps the file, reads at most headers
    keeps_tied: bool  # the file keeps both names of a tied tensor, as one tensor
    describe: str  # the calls, for the footer


def _zerockpt_save(sd: StateDict, path: Path, fsync: bool) -> None:
    zerockpt.save(sd, path, durable=fsync)


def _zerockpt_load(path: Path) -> StateDict:
    loaded: StateDict = zerockpt.load(path)
    return loaded


def _torch_save(sd: StateDict, path: Path, fsync: bool) -> None:
    torch.save(sd, path)
    if fsync:
        fsync_file(path, directory=True)


def _torch_load(path: Path) -> StateDict:
    loaded: StateDict = torch.load(path, mmap=True, weights_only=True)
    return loaded


def _safetensors_method() -> Method | None:
    """The safetensors method, or None if the package is not installed."""
    if importlib.util.find_spec("safetensors") is None:
        return None
    from safetensors.torch import load_file, save_file

    def save(sd: StateDict, path: Path, fsync: bool) -> None:
        # save_file refuses tensors sharing memory; drop the tied names as save_model does.
        save_file(unique_tensors(sd), path)
        if fsync:
            fsync_file(path, directory=True)

    def load(path: Path) -> StateDict:
        return load_file(path)

    return Method(
        "safetensors",
        ".safetensors",
        save,
        load,
        keeps_tied=False,
        describe="safetensors.torch save_file / load_file",
    )


def methods() -> tuple[list[Method], list[str]]:
    """The methods to compare, zerockpt first, and notes about those that are missing.

    Returns:
        (methods, notes): safetensors is left out, with a note, if it is not installed.
    """
    found = [
        Method(
            "zerockpt",
            ".safetensors",
            _zerockpt_save,
            _zerockpt_load,
            keeps_tied=True,
            describe="zerockpt.save / zerockpt.load (mmap=True)",
        ),
        Method(
            "torch",
            ".pt",  # torch.load hands *.safetensors to the safetensors package
            _torch_save,
            _torch_load,
            keeps_tied=True,
            describe="torch.save / torch.load(mmap=True, weights_only=True)",
        ),
    ]
    notes = []
    st = _safetensors_method()
    if st is None:
        notes.append("safetensors is not installed: skipped (pip install safetensors)")
    else:
        found.append(st)
    return found, notes


# --- Measuring -------------------------------------------------------------------------------


class OtherCpu:
    """How much CPU time other processes took while the benchmark ran, on Linux.

    User time of all CPUs plus the time a hypervisor stole from them (``/proc/stat``: user,
    nice, steal) minus this process's own user time, as a fraction of the CPU time there was
    (wall time x CPUs). Kernel time is left out: much of it is the kernel writing this
    process's files back. Other work competing for the CPUs makes the timings noisy.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        """(busy seconds of all CPUs, this process's user seconds, wall clock), or None."""
        try:
            with open("/proc/stat") as f:
                fields = f.readline().split()
            ticks = os.sysconf("SC_CLK_TCK")
            user, nice, steal = int(fields[1]), int(fields[2]), int(fields[8])
        except (OSError, ValueError, IndexError, AttributeError):
            return None
        return (user + nice + steal) / ticks, os.times().user, time.monotonic()

    def fraction(self) -> float | None:
        """Others' share of the CPU time since this object was made (0 to 1), or None."""
        end = self._sample()
        cpus = os.cpu_count()
        if self._start is None or end is None or not cpus:
            return None
        wall = end[2] - self._start[2]
        if wall <= 0:
            return None
        others = (end[0] - self._start[0]) - (end[1] - self._start[1])
        return min(1.0, max(0.0, others / (wall * cpus)))


class PeakMemory:
    """The peak resident memory of this process over an interval, on Linux.

    ``reset()`` sets the kernel's high-water mark (VmHWM) to the current resident size by
    writing 5 to ``/proc/self/clear_refs``; ``peak_above_start()`` is VmHWM minus the resident
    size at the reset. Where that is not possible (not Linux), ``available`` is False and the
    peak is None.
    """

    def __init__(self) -> None:
        self._start = 0
        self.available = self._reset()

    @staticmethod
    def _status() -> dict[str, int]:
        values: dict[str, int] = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    values[key] = int(rest.split()[0]) * 1024  # kB
        return values

    def _reset(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._start = self._status()["VmRSS"]
        except (OSError, KeyError, ValueError):
            return False
        return True

    def reset(self) -> None:
        """Starts an interval."""
        if self.available:
            self.available = self._reset()

    def peak_above_start(self) -> int | None:
        """Bytes of the highest resident size since ``reset()`` above the size then, or None."""
        if not self.available:
            return None
        return max(0, self._status()["VmHWM"] - self._start)


def mismatches(loaded: StateDict, source: StateDict, keeps_tied: bool) -> list[str]:
    """What differs between ``loaded`` and ``source``: names, dtypes, shapes, bytes, ties.

    Args:
        loaded: What a method loaded.
        source: What was saved.
        keeps_tied: The method keeps the tied names (else they are expected to be missing).

    Returns:
        One line per difference; empty if the two are bitwise equal.
    """
    expected = list(source) if keeps_tied else list(unique_tensors(source))
    problems = []
    if set(loaded) != set(expected):
        missing = sorted(set(expected) - set(loaded))
        extra = sorted(set(loaded) - set(expected))
        problems.append(f"names differ: missing {missing[:3]}, unexpected {extra[:3]}")
    for name in expected:
        if name not in loaded:
            continue
        a, b = loaded[name], source[name]
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"{name}: {a.dtype}{list(a.shape)} != {b.dtype}{list(b.shape)}")
        elif not torch.equal(bits(a), bits(b)):
            problems.append(f"{name}: bytes differ")
    if keeps_tied:
        for alias, name in TIED.items():
            if (
                alias in loaded
                and name in loaded
                and loaded[alias].data_ptr() != loaded[name].data_ptr()
            ):
                problems.append(f"{alias} no longer shares memory with {name}")
    return problems


@dataclass
class Result:
    """The timings of one operation of one method."""

    method: str
    operation: str
    times: list[float] = field(default_factory=list)  # seconds, one per run
    peaks: list[int | None] = field(default_factory=list)  # bytes above the start, per run

    @property
    def seconds(self) -> float:
        """The best (shortest) run."""
        return min(self.times)

    @property
    def peak_bytes(self) -> int | None:
        """The highest peak of all runs, or None where it cannot be measured."""
        known = [p for p in self.peaks if p is not None]
        return max(known) if known and len(known) == len(self.peaks) else None


@dataclass(frozen=True)
class Settings:
    """What to run: the options of ``zerockpt bench``."""

    n_params: int
    dtype: str
    runs: int
    directory: Path | None
    fsync: bool
    cold: bool
    json: bool
    plot: Path | None


def bench_method(
    method: Method,
    source: StateDict,
    directory: Path,
    settings: Settings,
    report: Callable[[Result], None],
) -> tuple[list[Result], list[str]]:
    """Times one method's save, load and load + read, ``settings.runs`` times each.

    First one untimed save and load of a tiny file pays the first-call costs (imports,
    thread pools). Every save writes a new file (the previous one is removed and all dirty
    pages written back first, untimed). Loads are from a warm page cache (the file read once
    before) or, with ``settings.cold``, a cold one (its pages dropped before every load). The
    file is removed at the end.

    Args:
        method: What to run.
        source: The state dict to save.
        directory: Where the file goes.
        settings: Runs, fsync, cold.
        report: Called with each operation's result as soon as it is complete.

    Returns:
        (results for save, load and load + read; differences between the last load and
        ``source``, empty if none).

    Raises:
        OSError: A file could not be written or read.
    """
    path = directory / f"bench-{method.name}{method.suffix}"
    memory = PeakMemory()
    save = Result(method.name, SAVE)
    load = Result(method.name, LOAD)
    load_read = Result(method.name, LOAD_READ)
    problems: list[str] = []
    try:
        # Untimed: first-call costs (lazy imports, thread pools) on a file of a few bytes.
        method.save({"warm_up": torch.zeros(16)}, path, settings.fsync)
        read_every_byte(method.load(path))
        for _ in range(settings.runs):
            path.unlink(missing_ok=True)
            os.sync()
            memory.reset()
            start = time.perf_counter()
            method.save(source, path, settings.fsync)
            save.times.append(time.perf_counter() - start)
            save.peaks.append(memory.peak_above_start())
        report(save)

        if not settings.cold:
            os.sync()
            read_through(path)
        for run in range(settings.runs):
            gc.collect()
            if settings.cold:
                fsync_file(path, drop=True)
            memory.reset()
            start = time.perf_counter()
            loaded = method.load(path)
            loaded_s = time.perf_counter() - start
            load.peaks.append(memory.peak_above_start())  # outside both timed intervals
            start = time.perf_counter()
            read_every_byte(loaded)
            read_s = time.perf_counter() - start
            load_read.peaks.append(memory.peak_above_start())
            load.times.append(loaded_s)
            load_read.times.append(loaded_s + read_s)
            if run == settings.runs - 1:
                problems = mismatches(loaded, source, method.keeps_tied)
            del loaded
        report(load)
        report(load_read)
    finally:
        gc.collect()
        path.unlink(missing_ok=True)
    return [save, load, load_read], problems


# --- Reporting -------------------------------------------------------------------------------


def ratio(result: Result, results: Sequence[Result]) -> float | None:
    """``result``'s seconds divided by zerockpt's for the same operation (None without it)."""
    for ref in results:
        if ref.method == REFERENCE and ref.operation == result.operation:
            return result.seconds / ref.seconds if ref.seconds > 0 else math.inf
    return None


def _secs(t: float) -> str:
    if t < 0.01:
        return f"{t:.6f}"
    return f"{t:.4f}" if t < 1 else f"{t:.3f}"


def _ratio_text(result: Result, r: float | None) -> str:
    if r is None:
        return "-"
    if result.method == REFERENCE:
        return "1.00x (ref)"
    if r >= 1:
        return f"{r:.2f}x slower" if r < 100 else f"{r:.0f}x slower"
    if r == 0:
        return "faster"
    inverse = 1 / r
    return f"{inverse:.2f}x faster" if inverse < 100 else f"{inverse:.0f}x faster"


def _gbps(result: Result, nbytes: int) -> float | None:
    """GB/s of the bytes saved or read; None for a lazy load, which reads almost nothing."""
    if result.operation == LOAD or result.seconds <= 0:
        return None
    return nbytes / result.seconds / 1e9


def _peak_mb(result: Result) -> float | None:
    peak = result.peak_bytes
    return None if peak is None else peak / 1e6


def _progress_line(result: Result, nbytes: int) -> str:
    gbps = _gbps(result, nbytes)
    rate = f", {gbps:.2f} GB/s" if gbps is not None else ""
    runs = " ".join(_secs(t) for t in result.times)
    return (
        f"  {result.method:<12} {result.operation:<12} {_secs(result.seconds):>9} s{rate}"
        f"   (runs: {runs})"
    )


def table(results: Sequence[Result], nbytes: int) -> list[str]:
    """The table's lines: one row per method and operation, grouped by operation.

    Args:
        results: All results.
        nbytes: Tensor bytes of the model (for GB/s).

    Returns:
        Lines of aligned columns: method, operation, seconds, GB/s, vs zerockpt, peak MB.
    """
    header = ("method", "operation", "seconds", "GB/s", "vs zerockpt", "peak MB")
    rows = [header]
    for op in OPERATIONS:
        for res in results:
            if res.operation != op:
                continue
            gbps = _gbps(res, nbytes)
            peak = _peak_mb(res)
            rows.append(
                (
                    res.method,
                    res.operation,
                    _secs(res.seconds),
                    "-" if gbps is None else f"{gbps:.2f}",
                    _ratio_text(res, ratio(res, results)),
                    "n/a" if peak is None else f"{peak:,.0f}",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    left = (0, 1, 4)
    return [
        "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    ]


def footer(
    settings: Settings,
    found: Sequence[Method],
    directory: Path,
    memory_measured: bool,
    notes: Sequence[str],
    problems: Sequence[str],
) -> list[str]:
    """The lines under the table that say what was measured (wrapped to 92 columns)."""
    runs = f"{settings.runs} runs" if settings.runs > 1 else "1 run"
    paragraphs = [
        f"Best of {runs} each, in {directory} ({_fs_type(directory)}); files removed "
        "afterwards. Methods: " + "; ".join(m.describe for m in found) + ".",
    ]
    if settings.fsync:
        paragraphs.append(
            "save: a new file each run, made durable: zerockpt.save(durable=True) fsyncs the "
            "file and its directory (and writes atomically: temporary file + rename); "
            "torch.save and save_file are followed by os.fsync of the file and its directory, "
            "included in their time."
        )
    else:
        paragraphs.append(
            "save: a new file each run, not durable (--no-fsync): zerockpt.save(durable=False), "
            "torch.save and save_file return with the data in the page cache."
        )
    paragraphs += [
        "load: the load call alone; all three map the file and return before reading the "
        "tensor bytes (safetensors' load_file touches a page of each tensor, which is slow from "
        "a cold cache).",
        "load + read: the load, then every byte of every tensor read (a uint8 max per tensor): "
        "the number to compare. GB/s: tensor bytes (10^9) per second.",
    ]
    if settings.cold:
        paragraphs.append(
            "Cache: cold: the file's pages were dropped (posix_fadvise DONTNEED) before every load."
        )
    else:
        paragraphs.append("Cache: warm: each file was read once before its loads were timed.")
    if memory_measured:
        paragraphs.append(
            "peak MB: highest resident memory during the operation (VmHWM) minus resident "
            "memory before it; MB = 10^6 bytes. Pages of a mapped file count once read (they "
            "are the page cache, shared, not private copies), so every mapped load + read "
            "shows about the file's size."
        )
    else:
        paragraphs.append("peak MB: n/a (needs Linux's /proc/self/clear_refs).")
    if any(not m.keeps_tied for m in found):
        paragraphs.append(
            "safetensors refuses tied tensors: its file omits lm_head.weight (as save_model "
            "does); zerockpt and torch store it once, shared."
        )
    paragraphs += notes
    if problems:
        paragraphs.append(f"Bitwise check: FAILED ({len(problems)} differences, listed above).")
    else:
        paragraphs.append("Bitwise check: every loaded tensor equals the original.")
    return [line for p in paragraphs for line in textwrap.wrap(p, width=92, subsequent_indent="  ")]


def _fs_type(directory: Path) -> str:
    """The file system type of ``directory`` from /proc/self/mounts, or "unknown"."""
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return "file system unknown"
    target = str(directory.resolve())
    best, kind = "", "unknown"
    for fields in mounts:
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) > len(
            best
        ):
            best, kind = mount, fields[2]
    return kind


def to_json(
    config: ModelConfig,
    settings: Settings,
    nbytes: int,
    n_tensors: int,
    directory: Path,
    results: Sequence[Result],
    notes: Sequence[str],
    problems: Sequence[str],
    other_cpu: float | None,
) -> dict[str, Any]:
    """Everything measured, as JSON-serialisable values."""
    return {
        "model": {
            "requested_params": settings.n_params,
            "params": config.n_params,
            "d_model": config.d_model,
            "n_layer": config.n_layer,
            "vocab": config.vocab,
            "n_positions": config.n_positions,
            "dtype": settings.dtype,
            "bytes": nbytes,
            "tensors": n_tensors,
        },
        "settings": {
            "runs": settings.runs,
            "fsync": settings.fsync,
            "cold": settings.cold,
            "dir": str(directory),
            "file_system": _fs_type(directory),
        },
        "versions": _versions(),
        "results": [
            {
                "method": r.method,
                "operation": r.operation,
                "seconds": r.seconds,
                "runs_seconds": list(r.times),
                "gb_per_s": _gbps(r, nbytes),
                "ratio_to_zerockpt": ratio(r, results),
                "peak_mb": _peak_mb(r),
            }
            for r in results
        ],
        "notes": list(notes),
        "other_cpu_fraction": other_cpu,
        "verified": not problems,
        "mismatches": list(problems),
    }


def _versions() -> dict[str, str | None]:
    st: str | None = None
    if importlib.util.find_spec("safetensors") is not None:
        import safetensors

        st = safetensors.__version__
    return {
        "zerockpt": zerockpt.__version__,
        "torch": torch.__version__,
        "safetensors": st,
        "python": platform.python_version(),
        "cpus": str(os.cpu_count()),
    }


def plot(path: Path, results: Sequence[Result], title: str, nbytes: int) -> None:
    """Writes a bar chart of the save and load + read seconds of each method to ``path``.

    Args:
        path: The PNG (or any format matplotlib infers from the suffix) to write.
        results: The results.
        title: The figure's title.
        nbytes: Tensor bytes (for GB/s labels).

    Raises:
        ImportError: matplotlib is not installed.
        OSError: ``path`` cannot be written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = (SAVE, LOAD_READ)
    fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4), squeeze=False)
    colors = {"zerockpt": "tab:green", "torch": "tab:orange", "safetensors": "tab:blue"}
    for ax, op in zip(axes[0], ops, strict=True):
        rows = [r for r in results if r.operation == op]
        names = [r.method for r in rows]
        secs = [r.seconds for r in rows]
        bars = ax.bar(names, secs, color=[colors.get(n, "tab:gray") for n in names])
        labels = []
        for r in rows:
            gbps = _gbps(r, nbytes)
            labels.append(_secs(r.seconds) + (f" s\n{gbps:.2f} GB/s" if gbps else " s"))
        ax.bar_label(bars, labels=labels, fontsize=8)
        ax.set_title(op)
        ax.set_ylabel("seconds (lower is better)")
        ax.set_ylim(0, max(secs) * 1.3 if secs and max(secs) > 0 else 1)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- Command line -----------------------------------------------------------------------------


def _params_arg(text: str) -> int:
    try:
        return parse_params(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _runs_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"at least 1 run, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of ``zerockpt bench`` to ``parser``.

    Args:
        parser: The ``bench`` subcommand's parser (or a parser of its own, as :func:`main`).
    """
    parser.add_argument(
        "--params",
        type=_params_arg,
        default="125M",
        metavar="N",
        help="model size in parameters: 125M, 350M, 1.3B (GPT-2 small, medium, GPT-3 XL "
        "shapes) or any count such as 50M, 2e6, 1000000 (default: 125M)",
    )
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default="fp32", help="tensor dtype (default: fp32)"
    )
    parser.add_argument(
        "--runs",
        type=_runs_arg,
        default=3,
        metavar="N",
        help="runs of each operation; the best is reported (default: 3)",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="existing directory on the disk to measure; a temporary directory is made in it "
        "and removed afterwards (default: the current directory, else $TMPDIR)",
    )
    parser.add_argument(
        "--no-fsync",
        dest="fsync",
        action="store_false",
        help="compare saves without fsync (zerockpt durable=False); by default every method's "
        "file is fsynced, in the time",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="drop each file's pages from the page cache before every load "
        "(posix_fadvise DONTNEED); default: warm cache",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the results as JSON instead of a table"
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="PNG",
        help="also write a bar chart to this file (needs matplotlib: pip install 'zerockpt[plot]')",
    )


def _settings(args: argparse.Namespace) -> Settings:
    """The options in ``args``, checked.

    Raises:
        UsageError: An option is not valid (for a Namespace not made by the parser).
    """
    n_params = args.params
    if isinstance(n_params, str):  # a Namespace not made by the parser
        try:
            n_params = parse_params(n_params)
        except ValueError as e:
            raise UsageError(f"--params: {e}") from None
    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    if int(args.runs) < 1:
        raise UsageError(f"--runs must be at least 1, got {args.runs}")
    return Settings(
        n_params=int(n_params),
        dtype=str(args.dtype),
        runs=int(args.runs),
        directory=args.dir,
        fsync=bool(args.fsync),
        cold=bool(args.cold),
        json=bool(args.json),
        plot=args.plot,
    )


def _mem_available() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes, or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _check_resources(settings: Settings, nbytes: int) -> None:
    """Checks, before anything is built, that the options can be carried out.

    Raises:
        UsageError: ``--cold`` or ``--plot`` is not possible here, the model would not fit
            in the memory available, or ``--dir`` is not a directory.
    """
    if settings.cold and not hasattr(os, "posix_fadvise"):
        raise UsageError("--cold needs os.posix_fadvise, which this platform lacks")
    if settings.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise UsageError(
            "--plot needs matplotlib: pip install matplotlib (or pip install 'zerockpt[plot]')"
        )
    available = _mem_available()
    # The model, plus a loaded copy's mapped pages, plus slack.
    if available is not None and 2.2 * nbytes > available:
        raise UsageError(
            f"a {nbytes / 1e9:.1f} GB model needs about {2.2 * nbytes / 1e9:.1f} GB of memory, "
            f"{available / 1e9:.1f} GB is available: try a smaller --params or --dtype bf16"
        )
    if settings.directory is not None and not settings.directory.is_dir():
        raise UsageError(f"--dir {settings.directory}: not a directory")
    if settings.plot is not None and not settings.plot.absolute().parent.is_dir():
        raise UsageError(f"--plot {settings.plot}: its directory does not exist")


def _make_directory(settings: Settings, nbytes: int) -> Path:
    """Makes the temporary directory the files go to (the caller removes it).

    Raises:
        UsageError: No directory can be made, or its disk has too little free space.
    """
    candidates = [settings.directory] if settings.directory is not None else [Path.cwd(), None]
    error: OSError | None = None
    for parent in candidates:
        try:
            tmp = Path(tempfile.mkdtemp(prefix="zerockpt-bench-", dir=parent))
        except OSError as e:
            error = e
            continue
        free = shutil.disk_usage(tmp).free
        if free < 1.1 * nbytes + (64 << 20):
            shutil.rmtree(tmp, ignore_errors=True)
            raise UsageError(
                f"{tmp.parent} has {free / 1e9:.1f} GB free; the benchmark writes files of "
                f"{nbytes / 1e9:.1f} GB: choose another --dir"
            )
        return tmp
    raise UsageError(f"cannot make a temporary directory: {error}")


def _print(lines: Sequence[str], stream: TextIO) -> None:
    for line in lines:
        print(line, file=stream)
    stream.flush()


@dataclass
class Measured:
    """What :func:`measure` found, for the report."""

    found: list[Method]
    notes: list[str]
    results: list[Result]
    problems: list[str]  # "<method>: <difference>", empty if every load matched
    memory_measured: bool
    other_cpu: float | None


def _model(settings: Settings) -> tuple[ModelConfig, torch.dtype, int]:
    """The model the options ask for: its shape, dtype and tensor bytes.

    Raises:
        UsageError: The size is not one the benchmark builds.
    """
    try:
        config = model_config(settings.n_params)
    except ValueError as e:
        raise UsageError(f"--params: {e}") from None
    dtype = DTYPES[settings.dtype]
    return config, dtype, config.n_params * torch.empty((), dtype=dtype).element_size()


def _announce(title: str, build_s: float, directory: Path, settings: Settings, err: TextIO) -> None:
    """The lines on stderr that say what is about to be measured, and where."""
    v = _versions()
    _print(
        [
            f"zerockpt bench: {title} (lm_head.weight tied), built in {build_s:.1f} s",
            f"  zerockpt {v['zerockpt']}, torch {v['torch']}, safetensors "
            f"{v['safetensors'] or 'not installed'}, {v['cpus']} CPUs; files in "
            f"{directory} ({_fs_type(directory)}); "
            f"{'fsync' if settings.fsync else 'no fsync'}, "
            f"{'cold' if settings.cold else 'warm'} cache, best of {settings.runs}",
        ],
        err,
    )
    if _fs_type(directory) == "tmpfs":
        print("  warning: the directory is in memory (tmpfs), not on a disk", file=err)


def measure(
    source: StateDict, directory: Path, settings: Settings, nbytes: int, err: TextIO
) -> Measured:
    """Runs every method on ``source`` in ``directory``, printing each result as it comes.

    Raises:
        OSError: A file could not be written or read.
    """
    found, notes = methods()
    for note in notes:
        print(f"  note: {note}", file=err)
    results: list[Result] = []
    problems: list[str] = []
    memory_measured = PeakMemory().available
    other_cpu = OtherCpu()
    read_every_byte(source)  # untimed: starts torch's thread pool for the reads
    for method in found:
        method_results, method_problems = bench_method(
            method,
            source,
            directory,
            settings,
            lambda r: print(_progress_line(r, nbytes), file=err, flush=True),
        )
        results += method_results
        for problem in method_problems:
            print(f"  MISMATCH {method.name}: {problem}", file=err)
        problems += [f"{method.name}: {p}" for p in method_problems]
    busy = other_cpu.fraction()
    if busy is not None and busy > BUSY_WARNING:
        notes.append(
            f"Warning: other processes used {busy:.0%} of the CPU time during the run; "
            "the timings are noisy: run again on an idle machine."
        )
    return Measured(found, notes, results, problems, memory_measured, busy)


def _write_plot(settings: Settings, results: Sequence[Result], title: str, nbytes: int) -> None:
    """Writes ``--plot``.

    Raises:
        UsageError: matplotlib is missing.
        CommandError: The file cannot be written.
    """
    assert settings.plot is not None
    try:
        plot(settings.plot, results, title, nbytes)
    except ImportError:
        raise UsageError(
            "--plot needs matplotlib: pip install matplotlib (or pip install 'zerockpt[plot]')"
        ) from None
    except OSError as e:
        raise CommandError(f"cannot write the plot {settings.plot}: {e.strerror or e}") from e
    print(f"zerockpt bench: wrote {settings.plot}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark with the options :func:`add_arguments` defines.

    Progress (one line per result as it completes) goes to stderr; the table and its footer,
    or with ``--json`` one JSON object, to stdout. Errors are raised for the command line to
    report (``zerockpt.cli.main``: one line, or the traceback with ``--debug``).

    Args:
        args: Parsed options: params, dtype, runs, dir, fsync, cold, json, plot.

    Returns:
        The exit status: 0, or 1 if a loaded tensor differs from the original.

    Raises:
        UsageError: An option cannot be carried out (not enough memory or disk, matplotlib
            missing...).
        CommandError: The plot cannot be written.
        OSError: A file cannot be written or read.
    """
    err = sys.stderr
    settings = _settings(args)
    config, dtype, nbytes = _model(settings)
    _check_resources(settings, nbytes)
    directory = _make_directory(settings, nbytes)
    try:
        start = time.perf_counter()
        source = build_state_dict(config, dtype)
        build_s = time.perf_counter() - start
        n_tensors = len(source)
        title = (
            f"GPT-style {config.describe()}, {settings.dtype}, {nbytes / 1e6:,.1f} MB, "
            f"{n_tensors} tensors"
        )
        _announce(title, build_s, directory, settings, err)
        m = measure(source, directory, settings, nbytes, err)
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    if settings.json:
        document = to_json(
            config,
            settings,
            nbytes,
            n_tensors,
            directory.parent,
            m.results,
            m.notes,
            m.problems,
            m.other_cpu,
        )
        print(json.dumps(document, indent=2))
    else:
        lines = table(m.results, nbytes)
        foot = footer(settings, m.found, directory.parent, m.memory_measured, m.notes, m.problems)
        _print(["", title, "", *lines, "", *foot], sys.stdout)
    if settings.plot is not None:
        _write_plot(settings, m.results, title, nbytes)
    return 1 if m.problems else 0


def main(argv: list[str] | None = None) -> int:
    """Runs ``zerockpt bench`` with ``argv`` (default: the command line) through the
    ``zerockpt`` command line, so that its errors are reported the same way.

    Args:
        argv: Options as :func:`add_arguments` defines them.

    Returns:
        The exit status: 0; 1 if a loaded tensor differs from the original or a file cannot be
        written or read; 2 for a bad option (one line on stderr).
    """
    from zerockpt import cli

    return cli.main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
