"""Full disks and failing devices: ENOSPC, EFBIG and EIO from the system calls of a save or load.

A failing save raises OSError with the errno and the destination as its filename, leaves the
file already at the destination as it was, byte for byte, removes its temporary file, and gives
back every descriptor, thread and staging buffer it took; the next save then succeeds. Errors
come from fault injection (zerockpt._C._inject_fault: every system call of one kind fails
after the first `after`), from a real tmpfs that is too small (root only), and from a real
RLIMIT_FSIZE (EFBIG).
"""

from __future__ import annotations

import errno
import functools
import os
import resource
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import zerockpt
from conftest import assert_dicts_bitwise_equal, settled, temp_leftovers
from torch import nn

C = zerockpt._C


@pytest.fixture(autouse=True)
def no_faults_left() -> Iterator[None]:
    """A failing test must not leave faults armed for the next one."""
    C._clear_faults()
    yield
    C._clear_faults()


def resources() -> dict[str, int]:
    """What a failed call must give back: descriptors, OS threads, Python threads, staging."""
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "tasks": len(os.listdir("/proc/self/task")),
        "threads": threading.active_count(),
        "staging buffers": C._staging_stats()[0],
    }


def os_error(call: Any) -> OSError:
    """The OSError that call() raises, its traceback dropped: frames in a traceback keep what
    they referenced (open files...) alive, which would count as leaks."""
    try:
        call()
    except OSError as e:
        e.__traceback__ = None
        return e
    raise AssertionError("no OSError was raised")


def small_tensors(seed: int) -> dict[str, torch.Tensor]:
    """~1 MiB in one 8 MiB chunk: contiguous tensors and a transposed one (staged)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(256, 512, generator=g),
        "t": torch.randn(64, 1024, generator=g, dtype=torch.float64).t(),
        "c": torch.arange(1000 + seed),
    }


def large_tensors(seed: int) -> dict[str, torch.Tensor]:
    """~38 MiB: five 8 MiB chunks, for several writer threads at once."""
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(6 << 20, generator=g),
        "t": torch.randn(1024, 1536, generator=g, dtype=torch.float64).t(),
        "b": torch.randn(1000, generator=g).half(),
    }


# Save options and the tensors written by each kind of save.
MODES: dict[str, dict[str, Any]] = {
    "buffered": {"durable": False, "direct_io": False},
    "durable": {"durable": True, "direct_io": False},
    "direct": {"durable": True, "direct_io": True},
    "large": {"durable": False, "direct_io": False, "threads": 4},
    "large-direct": {"durable": True, "direct_io": True, "threads": 4},
}
DURABLE_MODES = [m for m, kw in MODES.items() if kw["durable"]]


@functools.cache
def new_tensors(mode: str) -> dict[str, torch.Tensor]:
    """The tensors a test saves in `mode` (made once: the tests only read them)."""
    return large_tensors(1) if mode.startswith("large") else small_tensors(1)


def assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(loaded) == list(expected)
    for k, v in expected.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k


OLD = {"old": torch.arange(100.0), "v": torch.tensor(1)}

# How many calls of a kind one save makes, for the faults that strike a save after the first
# one: rename and fallocate once, fsync the file and then its directory (durable saves only).
CALLS_PER_SAVE = {"rename": 1, "fallocate": 1, "fsync": 2}

# (op, errno, when): "first" fails the first call of the kind; "later" lets some pass first:
# a few writes (data chunks) of the failing save, or all such calls of one complete save.
FAULTS = [
    ("write", errno.ENOSPC, "first"),
    ("write", errno.EIO, "first"),
    ("write", errno.EFBIG, "first"),
    ("write", errno.ENOSPC, "later"),
    ("write", errno.EIO, "later"),
    ("fallocate", errno.ENOSPC, "first"),
    ("fallocate", errno.EFBIG, "first"),
    ("fallocate", errno.EIO, "first"),
    ("fallocate", errno.ENOSPC, "later"),
    ("rename", errno.EIO, "first"),
    ("rename", errno.ENOSPC, "first"),
    ("rename", errno.EIO, "later"),
    ("fsync", errno.EIO, "first"),
    ("fsync", errno.ENOSPC, "first"),
    ("fsync", errno.EIO, "later"),
]
# The errno makes no difference to the code paths: large saves get the first one listed only.
FIRST_ERRNO = {(op, when): err for op, err, when in reversed(FAULTS)}
CASES = [
    pytest.param(op, err, when, mode, id=f"{op}-{errno.errorcode[err]}-{when}-{mode}")
    for op, err, when in FAULTS
    for mode in (DURABLE_MODES if op == "fsync" else MODES)
    if not mode.startswith("large") or FIRST_ERRNO[op, when] == err
]


@pytest.fixture(scope="module", autouse=True)
def warm_up(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One save of every kind first, so thread pools and staging memory that persist by design
    (torch's, the staging pool's) exist before any test counts resources."""
    directory = tmp_path_factory.mktemp("warm-up")
    for mode, kw in MODES.items():
        zerockpt.save(new_tensors(mode), directory / f"{mode}.safetensors", **kw)
        zerockpt.load(directory / f"{mode}.safetensors", mmap=False)


def expect_failed_save(
    path: Path, tensors: dict[str, torch.Tensor], err: int, before: bytes | None, **kw: Any
) -> OSError:
    """Asserts the save fails with `err` naming `path`, changes nothing and leaks nothing."""
    baseline = settled(resources)
    error = os_error(lambda: zerockpt.save(tensors, path, **kw))
    assert error.errno == err, error
    assert error.filename == str(path)
    if before is None:
        assert not path.exists()
    else:
        assert path.read_bytes() == before
    assert temp_leftovers(path.parent) == []
    assert settled(resources, baseline) == baseline
    return error


@pytest.mark.parametrize(("op", "err", "when", "mode"), CASES)
def test_save_fault(tmp_path: Path, op: str, err: int, when: str, mode: str) -> None:
    path = tmp_path / "ckpt.safetensors"
    kw = MODES[mode]
    tensors = new_tensors(mode)
    if when == "later" and op in CALLS_PER_SAVE:
        # The save of the old file makes these calls unharmed; the next save fails.
        C._inject_fault(op, err, after=CALLS_PER_SAVE[op])
        zerockpt.save(OLD, path, **kw)
    else:
        zerockpt.save(OLD, path, **kw)
        # A later write: a data chunk of a large file while other threads write theirs, the
        # header (rewritten with its checksums after the data) of a one-chunk direct file.
        after = 0 if when == "first" else 3 if mode.startswith("large") else 1
        C._inject_fault(op, err, after=after)
    expect_failed_save(path, tensors, err, path.read_bytes(), **kw)

    C._clear_faults()
    zerockpt.save(tensors, path, **kw)
    assert_same(zerockpt.load(path, verify=True), tensors)
    assert temp_leftovers(tmp_path) == []


@pytest.mark.parametrize("mode", ["buffered", "direct", "large"])
def test_save_fault_without_a_previous_file(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "ckpt.safetensors"
    C._inject_fault("write", errno.ENOSPC)
    expect_failed_save(path, new_tensors(mode), errno.ENOSPC, None, **MODES[mode])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("mode", DURABLE_MODES)
def test_directory_fsync_failure_comes_after_the_rename(tmp_path: Path, mode: str) -> None:
    # fsync of the file passes, the rename is done, then fsync of the directory fails: the new
    # file is in place (there is no undoing a rename) but not known to be durable. The save
    # still reports the error, naming the destination, and leaks nothing.
    path = tmp_path / "ckpt.safetensors"
    kw = MODES[mode]
    tensors = new_tensors(mode)
    zerockpt.save(OLD, path, **kw)
    C._inject_fault("fsync", errno.EIO, after=1)
    baseline = settled(resources)
    error = os_error(lambda: zerockpt.save(tensors, path, **kw))
    assert error.errno == errno.EIO
    assert error.filename == str(path)
    assert "directory" in str(error)
    assert temp_leftovers(tmp_path) == []
    assert settled(resources, baseline) == baseline
    C._clear_faults()
    assert zerockpt.verify(path).ok
    assert_same(zerockpt.load(path), tensors)


def test_fault_injection_is_process_wide_and_cleared(tmp_path: Path) -> None:
    # Faults of one kind do not touch the others, and clearing disarms them.
    path = tmp_path / "ckpt.safetensors"
    C._inject_fault("read", errno.EIO)
    zerockpt.save(OLD, path, durable=True)  # writes, fsyncs, renames: unaffected
    with pytest.raises(OSError):
        zerockpt.load(path)
    C._clear_faults()
    assert_dicts_bitwise_equal(zerockpt.load(path), OLD)
    with pytest.raises(ValueError, match="unknown fault operation"):
        C._inject_fault("unlink", errno.EIO)


# --- Reads -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("reads") / "ckpt.safetensors"
    tensors = large_tensors(2)
    zerockpt.save(tensors, path, durable=False)
    return path, tensors


def read_one(path: Path) -> torch.Tensor:
    with zerockpt.open(path) as f:
        return f.get_tensor("w", mmap=False)


# (name, call, read calls to let pass): 0 fails reading the header, 2 (the size, then the
# JSON) fails the first read of tensor bytes, where the loader reads them with pread.
READERS = [
    ("load", lambda p: zerockpt.load(p), 0),
    ("load-nommap", lambda p: zerockpt.load(p, mmap=False, threads=4), 0),
    ("load-nommap", lambda p: zerockpt.load(p, mmap=False, threads=4), 2),
    ("load-verify-nommap", lambda p: zerockpt.load(p, mmap=False, verify=True), 2),
    ("verify", lambda p: zerockpt.verify(p), 0),
    ("open", lambda p: zerockpt.open(p), 0),
    ("get_tensor-nommap", lambda p: read_one(p), 2),
]


@pytest.mark.parametrize(
    ("call", "after"),
    [pytest.param(call, after, id=f"{name}-after{after}") for name, call, after in READERS],
)
def test_read_fault(saved: tuple[Path, dict[str, torch.Tensor]], call: Any, after: int) -> None:
    path, tensors = saved
    baseline = settled(resources)
    C._inject_fault("read", errno.EIO, after=after)
    error = os_error(lambda: call(path))
    assert error.errno == errno.EIO
    assert error.filename == str(path)
    assert settled(resources, baseline) == baseline
    C._clear_faults()
    assert_same(zerockpt.load(path, mmap=False, verify=True), tensors)


class Net(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.a = nn.Linear(1024, 2048, dtype=dtype)  # 8 MiB of float32 weights
        self.b = nn.Linear(2048, 1024, dtype=dtype)


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "net.safetensors"
    torch.manual_seed(3)
    zerockpt.save(Net(), path)
    return path


@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["same-dtype", "converted"])
def test_load_state_dict_read_fault_before_any_copy(
    model_file: Path, verify: bool, dtype: torch.dtype
) -> None:
    # The file is opened and its header validated before the module is touched: a failure
    # there leaves the module exactly as it was.
    torch.manual_seed(4)
    model = Net(dtype)
    before = state_copy(model)
    baseline = settled(resources)
    C._inject_fault("read", errno.EIO)
    error = os_error(lambda: zerockpt.load_state_dict(model, model_file, verify=verify))
    assert error.errno == errno.EIO
    assert error.filename == str(model_file)
    assert settled(resources, baseline) == baseline
    assert_dicts_bitwise_equal(state_copy(model), before)
    C._clear_faults()
    zerockpt.load_state_dict(model, model_file, verify=verify)
    expected = zerockpt.load(model_file)
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k].to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["same-dtype", "converted"])
def test_load_state_dict_read_fault_while_copying(model_file: Path, dtype: torch.dtype) -> None:
    # Tensor bytes are read straight into the parameters (in parallel, through staging when
    # converted): a read error there is raised as OSError naming the file, after joining every
    # reader and returning every staging buffer. The module may then be partly loaded (the
    # docstring promises nothing more); a retry loads it whole.
    model = Net(dtype)
    baseline = settled(resources)
    C._inject_fault("read", errno.EIO, after=3)  # the header, one chunk, then failures
    error = os_error(lambda: zerockpt.load_state_dict(model, model_file, threads=4))
    assert error.errno == errno.EIO
    assert error.filename == str(model_file)
    assert settled(resources, baseline) == baseline
    C._clear_faults()
    zerockpt.load_state_dict(model, model_file, threads=4)
    expected = zerockpt.load(model_file)
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k].to(dtype))


# --- A real full file system -------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs, mounted for the test (root only); skipped where that is not possible."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot run mount: {e}")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip() or result.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=30)


def mib_tensors(mib: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = int(mib * (1 << 20)) // 4
    return {"x": torch.randn(n, generator=g), "t": torch.randn(16, 64, generator=g).t()}


def free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


@pytest.mark.parametrize("mode", ["buffered", "durable", "direct", "large", "large-direct"])
@pytest.mark.parametrize("fallocate", [True, False], ids=["fallocate", "no-fallocate"])
@pytest.mark.parametrize("replace", [False, True], ids=["new-file", "replace"])
def test_real_full_file_system(small_fs: Path, mode: str, fallocate: bool, replace: bool) -> None:
    # 10 MiB fit in the 24 MiB file system, 20 more (three 8 MiB chunks: with threads=4 several
    # writers at once) do not.
    first = small_fs / "first.safetensors"
    kept = mib_tensors(10, seed=1)
    zerockpt.save(kept, first, **MODES[mode])
    before = first.read_bytes()
    free = free_bytes(small_fs)
    path = first if replace else small_fs / "second.safetensors"
    if not fallocate:
        # As on file systems without fallocate: no reservation, the writes themselves fail.
        C._inject_fault("fallocate", errno.EOPNOTSUPP)
    error = expect_failed_save(
        path, mib_tensors(20, seed=2), errno.ENOSPC, before if replace else None, **MODES[mode]
    )
    C._clear_faults()
    # The reservation fails, or without one a write does.
    assert ("cannot reserve" if fallocate else "write") in str(error), error
    assert first.read_bytes() == before
    assert_dicts_bitwise_equal(zerockpt.load(first, verify=True), kept)
    assert free_bytes(small_fs) == free  # the temporary file's blocks are given back
    assert sorted(os.listdir(small_fs)) == ["first.safetensors"]
    # What fits still saves.
    small = mib_tensors(1, seed=3)
    zerockpt.save(small, path, **MODES[mode])
    assert_dicts_bitwise_equal(zerockpt.load(path, verify=True), small)


# --- A real file-size limit (EFBIG) ------------------------------------------------------------
# tests/test_atomic.py saves past RLIMIT_FSIZE in a child process; here the limit is set in this
# process for one save, so that what the failed save leaves behind can be counted, and with the
# reservation skipped too, so that the writes themselves (several threads) hit the limit.


@pytest.mark.parametrize("mode", ["buffered", "direct", "large", "large-direct"])
@pytest.mark.parametrize("fallocate", [True, False], ids=["fallocate", "no-fallocate"])
def test_file_size_limit(tmp_path: Path, mode: str, fallocate: bool) -> None:
    path = tmp_path / "ckpt.safetensors"
    zerockpt.save(OLD, path)
    before = path.read_bytes()
    tensors = new_tensors(mode) if mode.startswith("large") else mib_tensors(4, seed=1)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if not fallocate:
        C._inject_fault("fallocate", errno.EOPNOTSUPP)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
        error = expect_failed_save(path, tensors, errno.EFBIG, before, **MODES[mode])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    C._clear_faults()
    assert ("cannot reserve" if fallocate else "write") in str(error), error
    zerockpt.save(tensors, path, **MODES[mode])
    assert_same(zerockpt.load(path, verify=True), tensors)
