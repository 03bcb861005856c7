"""A failing save never leaves a partial file at the destination nor harms the old one."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import zerockpt
from conftest import temp_leftovers

# Runs a save in a child whose file-size limit is 1 MiB: the kernel fails the write with EFBIG
# part-way through, as a full disk or quota would.
CHILD = textwrap.dedent(
    """
    import errno, resource, signal, sys, torch, zerockpt
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    path, durable, direct, size = sys.argv[1], sys.argv[2] == "1", sys.argv[3], int(sys.argv[4])
    direct_io = None if direct == "auto" else direct == "1"
    try:
        zerockpt.save({"x": torch.ones(size // 4), "t": torch.ones(9, 7).t()}, path,
                      durable=durable, direct_io=direct_io)
    except OSError as e:
        print(e.errno, e.filename, sep="\\n")
        sys.exit(0)
    sys.exit("save did not fail")
    """
)


@pytest.mark.parametrize(
    ("durable", "direct", "size"),
    [("0", "0", 4 << 20), ("1", "auto", 80 << 20), ("1", "1", 4 << 20), ("0", "0", 600 << 10)],
    ids=["buffered", "auto-direct", "direct", "header-fits"],
)
def test_failing_write_keeps_old_file(tmp_path: Path, durable: str, direct: str, size: int) -> None:
    path = tmp_path / "ckpt.safetensors"
    old = {"old": torch.arange(10.0)}
    zerockpt.save(old, path)
    before = path.read_bytes()
    if size < (1 << 20) - 8192:
        size = 2 << 20  # make sure the limit is crossed
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), durable, direct, str(size)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    err, filename = result.stdout.split("\n")[:2]
    assert int(err) == errno.EFBIG
    assert filename == str(path)
    assert path.read_bytes() == before
    assert temp_leftovers(tmp_path) == []
    assert torch.equal(zerockpt.load(path)["old"], torch.arange(10.0))


def test_validation_failure_touches_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.safetensors"
    zerockpt.save({"old": torch.ones(3)}, path)
    before = path.read_bytes()
    x = torch.randn(4, 4)
    with pytest.raises(ValueError):
        zerockpt.save({"a": x, "b": x[1:]}, path)
    with pytest.raises(TypeError):
        zerockpt.save({"a": torch.ones(2, dtype=torch.complex128)}, path)
    assert path.read_bytes() == before
    assert temp_leftovers(tmp_path) == []


def test_temp_file_lives_beside_destination_and_is_recognisable(tmp_path: Path) -> None:
    # While a save runs its data goes to ".<name>.<pid>.<token>.zerockpt-tmp" in the same
    # directory (so the final rename is atomic). Seen from another thread mid-save.
    import threading

    path = tmp_path / "big.safetensors"
    seen: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.update(temp_leftovers(tmp_path))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(3):
            zerockpt.save({"x": torch.ones(30 << 20)}, path, durable=False, direct_io=False)
    finally:
        done.set()
        watcher.join()
    assert seen, "no temporary file was observed"
    for name in seen:
        assert name.startswith(".big.safetensors.") and name.endswith(".zerockpt-tmp")
    assert temp_leftovers(tmp_path) == []
