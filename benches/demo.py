"""Demo: save and load GPT-2 small with zerockpt, torch and safetensors; check and time them.

Run as ``python benches/demo.py [--scale S] [--runs N]`` (``make demo``). Exits non-zero if any
loaded tensor differs from the original by a single bit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import zerockpt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import (
    gpt2_small_module,
    safetensors_view,
    total_nbytes,
    unique_tensors,
)

StateDict = dict[str, torch.Tensor]
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Saver:
    """One way of writing a checkpoint file."""

    name: str
    save: Callable[[StateDict, Path], None]
    durable: bool


@dataclass(frozen=True)
class Row:
    """A table row: a saver's file read back by one loader."""

    name: str
    saver: str
    load: Callable[[Path], StateDict]
    lazy: bool  # returns views of a mapping before reading the bytes
    keeps_tied: bool  # tied names come back (safetensors files hold one of them)


def _torch_save(sd: StateDict, path: Path) -> None:
    torch.save(sd, path)


def _safetensors_save(sd: StateDict, path: Path) -> None:
    # save_file refuses tensors sharing memory: drop the tied duplicate name (a cheap dict walk).
    safetensors.torch.save_file(safetensors_view(sd), path)


SAVERS = [
    Saver("zerockpt", lambda sd, p: zerockpt.save(sd, p), durable=True),
    Saver("zerockpt durable=False", lambda sd, p: zerockpt.save(sd, p, durable=False), False),
    Saver("torch.save", _torch_save, durable=False),
    Saver("safetensors", _safetensors_save, durable=False),
]

ROWS = [
    Row("zerockpt save / load", "zerockpt", zerockpt.load, lazy=True, keeps_tied=True),
    Row(
        "zerockpt durable=False / mmap=False",
        "zerockpt durable=False",
        lambda p: zerockpt.load(p, mmap=False),
        lazy=False,
        keeps_tied=True,
    ),
    Row("torch.save / torch.load", "torch.save", torch.load, lazy=False, keeps_tied=True),
    Row(
        "torch.save / torch.load(mmap=True)",
        "torch.save",
        lambda p: torch.load(p, mmap=True),
        lazy=True,
        keeps_tied=True,
    ),
    Row(
        "safetensors save_file / load_file",
        "safetensors",
        safetensors.torch.load_file,
        lazy=True,
        keeps_tied=False,
    ),
]


def _best_of(
    runs: int, fn: Callable[[], object], before: Callable[[], None] | None = None
) -> float:
    """The shortest wall time of ``runs`` calls of ``fn`` after one untimed warm-up call.

    ``before`` runs untimed ahead of every call.
    """
    best = float("inf")
    for i in range(runs + 1):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        if i > 0:
            best = min(best, time.perf_counter() - start)
    return best


def _touch(sd: StateDict) -> int:
    """Reads every byte of every distinct tensor (one uint8 max per tensor)."""
    return max(int(t.reshape(-1).view(torch.uint8).max()) for t in unique_tensors(sd))


def _read_through(path: Path) -> None:
    buf = bytearray(16 << 20)
    with path.open("rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _mismatches(loaded: StateDict, src: StateDict, keeps_tied: bool) -> list[str]:
    """What differs between ``loaded`` and ``src``: names, dtypes, shapes, bits, ties."""
    expected = list(src) if keeps_tied else list(safetensors_view(src))
    problems = []
    if sorted(loaded) != sorted(expected):
        missing = sorted(set(expected) - set(loaded))
        extra = sorted(set(loaded) - set(expected))
        problems.append(f"names differ: missing {missing[:3]}, unexpected {extra[:3]}")
    for name in expected:
        if name not in loaded:
            continue
        a, b = loaded[name], src[name]
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"{name}: {a.dtype}{list(a.shape)} != {b.dtype}{list(b.shape)}")
        elif not torch.equal(_bits(a), _bits(b)):
            problems.append(f"{name}: bytes differ")
    tied = ("lm_head.weight", "wte.weight")
    if (
        keeps_tied
        and all(name in loaded for name in tied)
        and loaded[tied[0]].data_ptr() != loaded[tied[1]].data_ptr()
    ):
        problems.append("lm_head.weight no longer shares memory with wte.weight")
    return problems


def _secs(t: float) -> str:
    return f"{t:.6f}" if t < 0.01 else f"{t:.3f}"


def _ratio(value: float, ref: float) -> str:
    r = value / ref if ref > 0 else float("inf")
    return f"{r:.2f}x" if r < 100 else f"{r:.0f}x"


def main(argv: list[str] | None = None) -> int:
    """Runs the demo; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="model size (0, 1]")
    parser.add_argument("--runs", type=int, default=3, help="runs per method (best is kept)")
    parser.add_argument(
        "--dir", type=Path, default=ROOT / "build", help="where the temporary directory goes"
    )
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model = gpt2_small_module(args.scale)
    sd: StateDict = dict(model.state_dict())
    build_s = time.perf_counter() - start
    nbytes = total_nbytes(sd)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"GPT-2 small (scale {args.scale:g}): {n_params / 1e6:.1f}M parameters, "
        f"{nbytes / 1e6:.1f} MB fp32, {len(sd)} names (lm_head.weight tied to wte.weight), "
        f"built in {build_s:.1f} s"
    )
    print(
        f"torch {torch.__version__}, safetensors {safetensors.__version__}, "
        f"zerockpt {zerockpt.__version__}, {os.cpu_count()} CPUs"
    )

    args.dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="zerockpt-demo-", dir=args.dir))
    try:
        return _run(sd, nbytes, tmp, args.runs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(sd: StateDict, nbytes: int, tmp: Path, runs: int) -> int:
    paths = {s.name: tmp / f"{s.name.replace(' ', '_').replace('=', '-')}.bin" for s in SAVERS}

    # Saves: every run writes a new file; dirty pages from earlier runs are flushed untimed.
    save_s: dict[str, float] = {}
    for s in SAVERS:
        path = paths[s.name]

        def fresh(path: Path = path) -> None:
            path.unlink(missing_ok=True)
            os.sync()

        save_s[s.name] = _best_of(runs, lambda s=s, path=path: s.save(sd, path), fresh)

    # Loads from a warm page cache: every file is flushed, then read once, before timing.
    os.sync()
    for path in paths.values():
        _read_through(path)
    load_s: dict[str, float] = {}
    touch_s: dict[str, float] = {}
    failed = False
    for row in ROWS:
        path = paths[row.saver]
        load_s[row.name] = _best_of(runs, lambda row=row, path=path: row.load(path))
        touch_s[row.name] = _best_of(runs, lambda row=row, path=path: _touch(row.load(path)))
        problems = _mismatches(row.load(path), sd, row.keeps_tied)
        for problem in problems:
            print(f"MISMATCH {row.name}: {problem}", file=sys.stderr)
        failed = failed or bool(problems)

    # zerockpt rows are the references: same durability for saves, same laziness for loads.
    ref_save = {True: save_s["zerockpt"], False: save_s["zerockpt durable=False"]}
    ref_load = {True: load_s[ROWS[0].name], False: load_s[ROWS[1].name]}
    ref_touch = touch_s[ROWS[0].name]
    saver = {s.name: s for s in SAVERS}

    header = ("method", "save s", "save GB/s", "save x", "load s", "load x", "touch s", "touch x")
    lines = []
    for row in ROWS:
        s = saver[row.saver]
        t = save_s[s.name]
        lines.append(
            (
                row.name,
                _secs(t),
                f"{nbytes / t / 1e9:.2f}",
                _ratio(t, ref_save[s.durable]),
                _secs(load_s[row.name]),
                _ratio(load_s[row.name], ref_load[row.lazy]),
                _secs(touch_s[row.name]),
                _ratio(touch_s[row.name], ref_touch),
            )
        )
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    print()
    for r in [header, *lines]:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    print()
    print(
        f"Best of {runs} runs each after a warm-up run, in a temporary directory on the "
        f"project's disk ({tmp.parent})."
    )
    print("save: a new file every run. zerockpt durable=True fsyncs (O_DIRECT for >= 64 MiB);")
    print("  torch.save and safetensors do not fsync, so their save x compares them with")
    print("  zerockpt durable=False. x = times slower than zerockpt (1.00x = zerockpt).")
    print("load: warm page cache (every file was read once before timing). mmap loads return")
    print("  before reading bytes: load x compares lazy loaders with zerockpt.load (mmap) and")
    print("  eager ones with zerockpt.load(mmap=False).")
    print("touch: load, then read every tensor byte (a uint8 max per tensor); all compared with")
    print("  zerockpt.load (mmap) + touch.")
    print("bitwise check: " + ("FAILED" if failed else "every loaded tensor equals the original"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
