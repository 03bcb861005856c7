"""Crash safety: a save killed by SIGKILL at any moment leaves the old or the new checkpoint.

A child process saves checkpoint versions in a loop to one destination and is killed at random
moments: while it writes, fsyncs or renames, and between saves. After every kill the destination
must hold a complete checkpoint (it verifies, and every tensor holds its metadata version) that
is the one before the interrupted save or the interrupted save's own, never older than what was
seen before. A killed save may leave its temporary file behind: its name says what it is, and
the next save to the directory removes it (its writer's lock died with the writer).

Children are forked from a forkserver that has already imported torch and zerockpt, so a trial
costs a fork and a save rather than a Python start-up (ZEROCKPT_CRASH_TRIALS sets how many:
50 in make test, 200 in make test-long;
ZEROCKPT_CRASH_SEED the kill timings). Run with -s to see what the kills found.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import multiprocessing
import multiprocessing.sharedctypes
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import zerockpt
from conftest import TEMP_NAME_RE, forkserver_context, temp_leftovers

TRIALS = int(os.environ.get("ZEROCKPT_CRASH_TRIALS", "50"))  # make test-long: 200
SEED = int(os.environ.get("ZEROCKPT_CRASH_SEED", "0"))
NAME = "ckpt.safetensors"

# (durable, direct_io) of the save of version v: KINDS[v % len(KINDS)]. Mostly buffered saves,
# some fsynced, some through O_DIRECT.
KINDS = [(False, False)] * 4 + [(True, False), (False, True), (True, True)]
KIND_NAMES = {1: "buffered", 2: "direct", 3: "durable", 4: "durable+direct"}

# The child's progress, in shared memory: STATE is v * 8 + kind while saving version v (kind
# 1 + direct_io + 2 * durable), v * 8 once that save returned; SECONDS is how long it took.
STATE, SECONDS = 0, 1


def make_tensors(version: int, mib: int | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint whose every element is `version`: 2 to 8 MiB (changing with the version)."""
    size = (mib if mib is not None else 2 + (version * 5) % 7) << 20
    return {
        "w": torch.full((size // 2 // 4,), float(version)),
        "ids": torch.full((size // 4 // 4,), version, dtype=torch.int32),
        # Not contiguous: written through staging buffers rather than straight from memory.
        "t": torch.full((64, size // 4 // 8 // 64), float(version), dtype=torch.float64).t(),
    }


def saver(directory: str, start: int, shared: Any, mib: int | None, kind: Any) -> None:
    """The child: saves versions start, start + 1, ... until it is killed."""
    path = os.path.join(directory, NAME)
    version = start
    while True:
        durable, direct_io = KINDS[version % len(KINDS)] if kind is None else kind
        tensors = make_tensors(version, mib)
        shared[STATE] = version * 8 + 1 + int(direct_io) + 2 * int(durable)
        t0 = time.perf_counter()
        zerockpt.save(
            tensors,
            path,
            metadata={"version": str(version)},
            durable=durable,
            direct_io=direct_io,
        )
        shared[SECONDS] = time.perf_counter() - t0
        shared[STATE] = version * 8
        version += 1


def check_checkpoint(path: Path, mib: int | None = None) -> int:
    """Asserts `path` is a complete, consistent checkpoint; returns its version."""
    result = zerockpt.verify(path)
    assert result.has_checksums and result.ok, result
    with zerockpt.open(path) as f:
        version = int(f.metadata()["version"])
    loaded = zerockpt.load(path)
    expected = make_tensors(version, mib)
    assert list(loaded) == list(expected)
    for k in expected:
        assert torch.equal(loaded[k], expected[k]), (version, k)
    return version


def classify_leftover(path: Path) -> str:
    """'complete' if the temporary file already is the whole checkpoint (killed while syncing,
    truncating or renaming), 'partial' if the kill came while it was being written."""
    try:
        result = zerockpt.verify(path)
    except (zerockpt.FormatError, OSError):
        return "partial"
    return "complete" if result.has_checksums and result.ok else "partial"


@pytest.fixture(scope="module")
def ctx() -> multiprocessing.context.ForkServerContext:
    return forkserver_context(__name__)


@contextlib.contextmanager
def saver_process(
    ctx: multiprocessing.context.ForkServerContext,
    directory: Path,
    start: int,
    shared: Any,
    mib: int | None = None,
    kind: tuple[bool, bool] | None = None,
) -> Iterator[multiprocessing.process.BaseProcess]:
    """A child running saver(), killed on the way out if the test has not killed it."""
    shared[STATE] = -1
    child = ctx.Process(target=saver, args=(str(directory), start, shared, mib, kind), daemon=True)
    child.start()
    try:
        yield child
    finally:
        kill(child)
        child.close()


def wait_for(child: multiprocessing.process.BaseProcess, shared: Any, until: Any) -> None:
    deadline = time.monotonic() + 120
    while not until(int(shared[STATE])):
        assert child.is_alive(), f"the saver died on its own (exit code {child.exitcode})"
        assert time.monotonic() < deadline, "the saver made no progress"
        time.sleep(0.0002)


def kill(child: multiprocessing.process.BaseProcess) -> None:
    if child.exitcode is None:
        child.kill()  # SIGKILL
        child.join()


def locked(path: Path) -> bool:
    """Whether another open file holds an flock on `path` (False if it is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases our lock, if we got it
    return False


def check_leftovers(directory: Path, pid: int) -> list[str]:
    """The temporary files after a kill: at most the killed save's own, named recognisably."""
    left = temp_leftovers(directory)
    assert len(left) <= 1, left
    for name in left:
        m = TEMP_NAME_RE.match(name)
        assert m is not None, name
        assert m["dest"] == NAME and int(m["pid"]) == pid, name
    return left


def test_sigkill_at_random_moments_leaves_old_or_new_checkpoint(
    tmp_path: Path, ctx: multiprocessing.context.ForkServerContext
) -> None:
    rng = random.Random(SEED)
    path = tmp_path / NAME
    shared = multiprocessing.sharedctypes.RawArray("d", 2)
    outcomes: collections.Counter[str] = collections.Counter()
    leftovers: collections.Counter[str] = collections.Counter()
    killed_in: collections.Counter[str] = collections.Counter()
    seen = -1  # the version the destination held after the last kill
    pending: list[str] = []  # leftovers the next child's first save must remove
    cleaned_live = 0  # files of the live child taken by this process's cleaning
    t_start = time.perf_counter()
    for trial in range(TRIALS):
        start = seen + 1
        with saver_process(ctx, tmp_path, start, shared) as child:
            pid = child.pid
            # Its first save done, it is saving the next version (or making its tensors).
            wait_for(child, shared, lambda s: s >= 0 and s % 8 == 0)
            # Saves take ~5-40 ms here: kills land in every part of one, or between two.
            delay = 0.0 if rng.random() < 0.1 else rng.uniform(0.0, 0.05)
            if trial % 2:
                time.sleep(delay)
            else:
                # Meanwhile this process cleans the directory, as every save does first. It
                # never takes a file its writer has locked (the child would fail its rename and
                # exit); it may take one created but not yet locked, and then the writer starts
                # over under a new name (AtomicFile's retry): counted, not an error.
                deadline = time.perf_counter() + delay
                while time.perf_counter() < deadline:
                    cleaned_live += zerockpt._C._remove_stale_temp_files(str(tmp_path))
                    time.sleep(0.0005)
            assert child.is_alive(), f"the saver failed (exit code {child.exitcode})"
            kill(child)
        state = int(shared[STATE])
        version, kind = divmod(state, 8)

        found = check_checkpoint(path)
        assert found >= seen, f"the destination went back from version {seen} to {found}"
        assert found >= start  # the child's first save had returned
        if kind == 0:  # between saves: the last one returned
            assert found == version, (found, version)
            outcomes["between saves: last saved"] += 1
        else:
            killed_in[KIND_NAMES[kind]] += 1
            assert found in (version - 1, version), (found, version)
            outcomes["mid-save: old" if found == version - 1 else "mid-save: new"] += 1
        seen = found

        present = set(os.listdir(tmp_path))
        assert not present & set(pending), f"the child's first save left stale {pending}"
        left = check_leftovers(tmp_path, pid)
        if left:
            # Only a save that had not renamed its file yet leaves it.
            assert kind != 0 and found == version - 1, (left, state, found)
            leftovers[f"{classify_leftover(tmp_path / left[0])} ({KIND_NAMES[kind]})"] += 1
        else:
            leftovers["none"] += 1
        if trial % 2 == 0:
            # Any save to the directory removes them (the next child's first save, otherwise).
            zerockpt.save({"probe": torch.zeros(3)}, tmp_path / "probe.safetensors", durable=False)
            assert temp_leftovers(tmp_path) == []
            pending = []
        else:
            pending = left  # for the next child's first save
    elapsed = time.perf_counter() - t_start
    assert zerockpt._C._remove_stale_temp_files(str(tmp_path)) == len(pending)
    assert temp_leftovers(tmp_path) == []
    check_checkpoint(path)

    print(
        f"\n{TRIALS} kills in {elapsed:.1f} s ({1000 * elapsed / max(TRIALS, 1):.0f} ms/trial), "
        f"seed {SEED}, last version {seen}"
    )
    print(f"  destination after the kill: {dict(outcomes)}")
    print(f"  leftover temporary file: {dict(leftovers)}")
    print(f"  save in progress at the kill: {dict(killed_in)}")
    print(f"  just-created files of the live saver removed by concurrent cleaning: {cleaned_live}")
    if TRIALS >= 50:
        # The kills really land inside saves, and also after some complete.
        assert outcomes["mid-save: old"] >= 1, outcomes
        assert outcomes["mid-save: new"] + outcomes["between saves: last saved"] >= 1, outcomes
        assert sum(n for k, n in leftovers.items() if k != "none") >= 1, leftovers


@pytest.mark.slow
@pytest.mark.parametrize(
    ("durable", "direct_io"), [(False, False), (True, True)], ids=["buffered", "direct-durable"]
)
def test_sigkill_during_large_save(
    tmp_path: Path, ctx: multiprocessing.context.ForkServerContext, durable: bool, direct_io: bool
) -> None:
    mib = 200
    path = tmp_path / NAME
    shared = multiprocessing.sharedctypes.RawArray("d", 2)
    seen = -1
    # Killed as soon as the save's temporary file is seen (surely mid-save: writing 200 MiB
    # takes far longer than the kill), then half a save's time after that.
    for fraction in (0.0, 0.5):
        start = seen + 1
        with saver_process(ctx, tmp_path, start, shared, mib, (durable, direct_io)) as child:
            pid = child.pid
            # Two large saves complete (the second's time known: the first one pays for page
            # faults), then the temporary file of a later one.
            wait_for(child, shared, lambda s, start=start: s >= (start + 2) * 8)
            duration = float(shared[SECONDS])
            deadline = time.monotonic() + 60
            while not ((live := check_leftovers(tmp_path, pid)) and locked(tmp_path / live[0])):
                assert time.monotonic() < deadline, "no locked temporary file was seen"
            # A live writer's temporary file is never taken for a dead one's.
            assert zerockpt._C._remove_stale_temp_files(str(tmp_path)) == 0
            assert temp_leftovers(tmp_path) == live
            time.sleep(fraction * duration)
            kill(child)
        version, kind = divmod(int(shared[STATE]), 8)

        found = check_checkpoint(path, mib)
        assert found >= max(seen, start)
        assert found in (version - 1, version) if kind else found == version
        seen = found
        left = check_leftovers(tmp_path, pid)
        if fraction == 0.0:
            assert left == live and kind != 0 and found == version - 1
        if left:
            assert kind != 0 and found == version - 1
            assert (tmp_path / left[0]).stat().st_size > 0
        assert zerockpt._C._remove_stale_temp_files(str(tmp_path)) == len(left)
        assert temp_leftovers(tmp_path) == []
        print(
            f"\nlarge save ({mib} MiB, durable={durable}, direct_io={direct_io}) took "
            f"{duration:.2f} s; killed {fraction * duration:.2f} s after its temporary file "
            f"appeared: destination holds version {found} (save of {version} "
            f"{'in progress' if kind else 'done'}), leftovers {left}"
        )


def test_destination_with_the_longest_legal_name(tmp_path: Path) -> None:
    path = tmp_path / ("x" * (255 - len(".safetensors")) + ".safetensors")
    path.write_bytes(b"")  # the name is legal (NAME_MAX is 255)
    path.unlink()
    zerockpt.save({"x": torch.ones(3)}, path)
    assert torch.equal(zerockpt.load(path)["x"], torch.ones(3))
    assert temp_leftovers(tmp_path) == []
