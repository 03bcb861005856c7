"""Ctrl-C: a real SIGINT during a save, load, verify or load_state_dict, with or without a bar.

The work runs on the caller's thread and checks for signals between chunks, so SIGINT stops it
within a chunk: nothing is committed, no temporary file is left, the destination keeps its
previous content, and the exception propagates (a KeyboardInterrupt; the CLI exits 130 with
one line). ``_C._delay_chunks`` slows every chunk, so the signal lands mid-call; it is sent once
the call's counter shows bytes moving. In this process the handler raises ``_Interrupted``
(a late KeyboardInterrupt would stop pytest itself); child processes keep Python's default
handler and show that the process never aborts ("terminate called", SIGABRT).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import zerockpt
import zerockpt.dcp
from conftest import temp_leftovers
from torch import nn
from zerockpt import _C
from zerockpt._args import save_options

DELAY = 0.05  # seconds per chunk
CHUNKS = 6  # of 8 MiB in each call's data: the signal comes after the first
CHILD_DELAY = 0.5  # seconds per chunk in the child processes (they start under load)


class _Interrupted(Exception):
    """What this module's SIGINT handler raises."""


@functools.cache
def _big() -> dict[str, torch.Tensor]:
    return {
        "w": torch.full(((CHUNKS - 1) * _C.CHUNK_BYTES // 4,), 1.5),
        "b": torch.arange(_C.CHUNK_BYTES // 8, dtype=torch.int64),
    }


def _old(path: Path, **kwargs: Any) -> Path:
    """A previous checkpoint at ``path``, which an interrupted save must leave as it was."""
    zerockpt.save({"old": torch.ones(3)}, path, **kwargs)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Checkpoints of CHUNKS chunks to load: a file, shards and a DCP checkpoint."""
    import torch.distributed.checkpoint as dcp

    directory = tmp_path_factory.mktemp("sources")
    zerockpt.save(_big(), directory / "x.safetensors", durable=False)
    zerockpt.save(_big(), directory / "sharded", max_shard_size="20MiB", durable=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming ... a single process"
        dcp.save(_big(), storage_writer=zerockpt.dcp.Writer(directory / "dcp"), no_dist=True)
    yield directory
    _big.cache_clear()


@contextlib.contextmanager
def _sigint_once_bytes_move(
    monkeypatch: pytest.MonkeyPatch, under_way: bool = False
) -> Iterator[list[_C.Progress]]:
    """Sends the main thread SIGINT once a counter made inside the block is part-way (with
    ``under_way``, as soon as its call expects bytes); yields the counters. Chunks are slowed
    meanwhile."""
    counters: list[_C.Progress] = []
    make = _C.Progress

    def recording(total: int = 0) -> _C.Progress:
        counters.append(make(total))
        return counters[-1]

    monkeypatch.setattr(_C, "Progress", recording)
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.005):
            if any((under_way or c.done > 0) and c.done < c.total for c in counters):
                signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
                return

    watcher = threading.Thread(target=watch)
    with _sigint_raises_interrupted():
        watcher.start()
        _C._delay_chunks(DELAY)
        try:
            yield counters
        finally:
            _C._delay_chunks(0)
            stop.set()
            watcher.join()


@contextlib.contextmanager
def _sigint_raises_interrupted() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise _Interrupted("SIGINT")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _files(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (temporary ones included) and its bytes."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for name, t in _big().items():
            self.register_buffer(name, torch.zeros_like(t))


# Each call gets the sources, a directory holding previous checkpoints, and progress.
_CALLS: dict[str, Callable[[Path, Path, bool], Any]] = {
    "save": lambda src, out, p: zerockpt.save(_big(), out / "x.safetensors", threads=2, progress=p),
    "sharded save": lambda src, out, p: zerockpt.save(
        _big(), out / "sharded", max_shard_size="20MiB", threads=2, progress=p
    ),
    "load": lambda src, out, p: zerockpt.load(
        src / "x.safetensors", mmap=False, threads=2, progress=p
    ),
    "sharded load": lambda src, out, p: zerockpt.load(
        src / "sharded", mmap=False, threads=2, progress=p
    ),
    "verify": lambda src, out, p: zerockpt.verify(src / "x.safetensors", threads=1, progress=p),
    "load_state_dict": lambda src, out, p: zerockpt.load_state_dict(
        _Model(), src / "x.safetensors", threads=2, progress=p
    ),
    "dcp.to_file": lambda src, out, p: zerockpt.dcp.to_file(
        src / "dcp", out / "x.safetensors", progress=p
    ),
}


@pytest.mark.parametrize("progress", [True, False], ids=["bar", "no bar"])
@pytest.mark.parametrize("call", list(_CALLS))
def test_sigint_stops_the_call_within_a_chunk_and_commits_nothing(
    tmp_path: Path,
    sources: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    call: str,
    progress: bool,
) -> None:
    _old(tmp_path / "x.safetensors")
    _old(tmp_path / "sharded", max_shard_size="1MB")
    before = _files(tmp_path)
    # dcp.to_file's save uses every core: on a large machine its chunks all go in one round.
    unpinned = call == "dcp.to_file"
    with (
        _sigint_once_bytes_move(monkeypatch, under_way=unpinned) as counters,
        pytest.raises(_Interrupted),
    ):
        _CALLS[call](sources, tmp_path, progress)
    if not unpinned:
        assert counters and 0 < counters[-1].done < counters[-1].total  # stopped part-way
    assert _files(tmp_path) == before  # no temporary file either
    assert temp_leftovers(sources) == []
    assert not [t for t in threading.enumerate() if t.name.startswith("zerockpt-")]
    capfd.readouterr()


# The number of openat(2), for seeing that a thread is blocked in it.
_OPENAT = {"x86_64": 257, "aarch64": 56}.get(os.uname().machine)


def _wait_until_blocked_in_openat(native_id: int, timeout: float = 60.0) -> None:
    """Waits until the thread sits in one openat call (same arguments) for 0.3 s: blocked,
    not passing through one of its many short opens."""
    path = f"/proc/self/task/{native_id}/syscall"
    deadline = time.monotonic() + timeout
    since, seen = 0.0, ""
    while time.monotonic() < deadline:
        with open(path) as f:
            state = f.read()
        if state.split(" ", 1)[0] != str(_OPENAT) or state != seen:
            since, seen = time.monotonic(), state
        elif time.monotonic() - since > 0.3:
            return
        time.sleep(0.01)
    raise AssertionError("the commit never blocked in open")


def _open_writer_end(fifo: str, done: threading.Event) -> None:
    """Opens the FIFO for writing once a reader has it open (never blocking), then closes it."""
    while not done.is_set():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            return
        except OSError:  # ENXIO: no reader yet
            time.sleep(0.01)


@pytest.mark.skipif(
    _OPENAT is None or not os.path.exists("/proc/self/task"), reason="needs Linux /proc syscalls"
)
def test_sigint_during_the_commit_of_a_sharded_save_waits_for_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopping between the shards' renames would leave new shards under the old index: the
    commit is one C++ call, and a SIGINT that reaches the main thread inside it (here while it
    opens the first staged shard, made a FIFO so that the open blocks) is handled once the index
    is in place too."""
    directory = tmp_path / "sharded"
    old = {f"t{i}": torch.full((1000,), float(i)) for i in range(3)}
    new = {name: -t for name, t in old.items()}
    zerockpt.save(old, directory, max_shard_size="4KB")
    main = threading.main_thread()
    main_native_id = threading.get_native_id()
    after_commit = zerockpt._C.after_commit  # writes the index, just before the commit
    helpers: list[threading.Thread] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def release(fifo: str, real: str, writer_end: str) -> None:
        try:
            _wait_until_blocked_in_openat(main_native_id)
            signal.pthread_kill(main.ident or 0, signal.SIGINT)  # inside the commit
            os.rename(real, fifo)  # the real shard back under its staged name
        except BaseException as e:  # reported by the test's thread
            errors.append(e)
        _open_writer_end(writer_end, done)  # lets the blocked open return

    def stage_then_block(*args: Any) -> None:
        after_commit(*args)
        staging = os.path.dirname(args[0][0][0])
        first = os.path.join(staging, sorted(os.listdir(staging))[0])  # the first renamed
        assert os.path.basename(first).startswith("model-00001-")
        os.rename(first, first + ".real")
        os.mkfifo(first)
        writer_end = str(tmp_path / "fifo")
        os.link(first, writer_end)
        helper = threading.Thread(target=release, args=(first, first + ".real", writer_end))
        helper.start()
        helpers.append(helper)

    monkeypatch.setattr(zerockpt._C, "after_commit", stage_then_block)
    try:
        with _sigint_raises_interrupted(), pytest.raises(_Interrupted):
            zerockpt.save(new, directory, max_shard_size="4KB")
    finally:
        done.set()
        for helper in helpers:
            helper.join()
    monkeypatch.undo()
    assert not errors, errors
    assert len(helpers) == 1
    loaded = zerockpt.load(directory)  # all new: the index and every shard
    assert list(loaded) == list(new)
    for name, t in new.items():
        assert torch.equal(loaded[name], t)
    assert sorted(os.listdir(directory)) == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
    ]


@pytest.mark.parametrize("wait", ["result", "wait"])
def test_sigint_interrupts_a_wait_for_save_async_and_the_save_goes_on(
    tmp_path: Path, wait: str
) -> None:
    """The C++ handle's waits (zerockpt.dcp waits on one directly) raise at Ctrl-C, while the
    save is still running, rather than when it ends."""
    path = tmp_path / "a.safetensors"
    state = {"w": torch.full((CHUNKS * _C.CHUNK_BYTES // 4,), 2.0)}
    _C._delay_chunks(DELAY)  # the background write: CHUNKS slowed chunks on one thread
    try:
        handle = _C.save_async(state, str(path), save_options(threads=1))
        done_soon_after: list[bool] = []

        def interrupt() -> None:
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
            time.sleep(2 * DELAY)
            done_soon_after.append(handle.done())

        timer = threading.Timer(DELAY / 2, interrupt)
        done_when_raised = None
        with _sigint_raises_interrupted():
            timer.start()
            try:
                if wait == "result":
                    handle.result()
                else:
                    handle.wait(None)
                timer.join()  # a signal that came after the wait is handled here
            except _Interrupted:
                done_when_raised = handle.done()
            timer.join()
        assert done_when_raised is not None
        if done_soon_after[0]:
            pytest.skip("the save ended soon after the signal: too soon to tell")
        assert not done_when_raised  # the wait raised while the save went on
        assert handle.wait(None)
        handle.result()
    finally:
        _C._delay_chunks(0)
    assert torch.equal(zerockpt.load(path)["w"], state["w"])


# A child process: slows chunks, waits for a line on stdin, then runs the command given as
# argv[1:] (a save, or the CLI) with Python's default SIGINT handler, printing "flowing" once
# a call is under way (its bytes expected, not all done: whatever the number of threads, the
# slowed chunks leave the parent time to send its signals: CHILD_DELAY per chunk, seconds of
# work in all, of which an interrupted call only finishes the chunks in flight).
_CHILD = """
import sys, threading, time
import torch, zerockpt
from zerockpt import _C

counters, make = [], _C.Progress
def recording(total=0):
    counters.append(make(total))
    return counters[-1]
_C.Progress = recording

def watch():
    while not any(0 < c.total and c.done < c.total for c in counters):
        time.sleep(0.005)
    print("flowing", flush=True)
threading.Thread(target=watch, daemon=True).start()

_C._delay_chunks(%(delay)r)
sys.stdin.readline()  # the parent's go
if sys.argv[1] == "save":
    data = {"w": torch.full((11 << 21,), 1.0), "b": torch.arange(1 << 20)}  # 12 chunks
    zerockpt.save(data, sys.argv[2], threads=2, progress=True)
else:
    from zerockpt import cli
    sys.exit(cli.main(sys.argv[1:]))
"""


def _start_child(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD % {"delay": CHILD_DELAY}, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _interrupt(child: subprocess.Popen[bytes], signals: int) -> tuple[int, str]:
    """Lets ``child`` start its work and sends it ``signals`` SIGINTs, 50 ms apart, once its
    bytes flow; returns its exit status and stderr (decoded, carriage returns kept)."""
    try:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(b"go\n")
        child.stdin.flush()
        line = child.stdout.readline()
        for k in range(signals):
            if k:
                time.sleep(0.05)
            child.send_signal(signal.SIGINT)
        _, err_bytes = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    err = err_bytes.decode(errors="replace")
    assert line == b"flowing\n", err
    return child.returncode, err


def test_ctrl_c_in_a_real_process_never_aborts(tmp_path: Path, sources: Path) -> None:
    """Python's own handler: a save with a bar, Ctrl-C twice, raises KeyboardInterrupt (the old
    design let the interpreter exit while a daemon thread still wrote: "terminate called
    without an active exception", SIGABRT); `zerockpt convert --progress` exits 130 with one
    line. Both destinations keep their previous checkpoints."""
    save_dest = _old(tmp_path / "saved.safetensors")
    convert_dest = _old(tmp_path / "converted.safetensors")
    before = _files(tmp_path)
    # Started together: their start-ups (importing torch) overlap.
    saving = _start_child(["save", str(save_dest)])
    converting = _start_child(
        ["convert", str(sources / "x.safetensors"), str(convert_dest), "--force", "--progress"]
    )

    status, err = _interrupt(saving, signals=2)
    assert status in (1, -signal.SIGINT), err  # Python re-raises SIGINT to exit by it
    assert "terminate called" not in err
    assert err.rstrip().splitlines()[-1] == "KeyboardInterrupt", err

    status, err = _interrupt(converting, signals=1)
    assert status == 130, err
    # What a terminal shows: each line as its last carriage return leaves it. The source's
    # completed "Loading" bar stays; the interrupted "Saving" bar is cleared.
    shown = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]
    messages = [line for line in shown if line.strip() and not line.startswith("Loading")]
    assert messages == ["zerockpt: error: interrupted"], err

    assert _files(tmp_path) == before
