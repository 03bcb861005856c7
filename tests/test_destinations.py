"""What a save may replace: regular files the process may write, keeping their mode, owner and
group; never a directory, FIFO, socket or device; through symbolic links to their target.

Every save path commits through the one C++ implementation (core/file.h check_destination and
replace_destination): save, sharded save, save_async, Checkpointer, the DCP Writer and the CLI.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import zerockpt
from conftest import temp_leftovers
from torch.distributed.checkpoint.api import CheckpointException
from zerockpt import cli
from zerockpt.dcp import Writer

ROOT = os.geteuid() == 0
NOBODY = 65534
STATE = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(3)}


def _save(path: Path) -> None:
    zerockpt.save(STATE, path)


def _save_async(path: Path) -> None:
    zerockpt.save_async(STATE, path).result()


def _save_nested(path: Path) -> None:
    zerockpt.save({"model": STATE, "step": 3}, path)


def _convert_to_torch(path: Path) -> None:
    source = path.parent / "source.safetensors"
    zerockpt.save(STATE, source)
    cli.main(["--debug", "convert", str(source), str(path.with_suffix(".pt")), "--force"])


# Savers that write one file at `path` (the CLI writes `path` with a .pt suffix).
FILE_SAVERS: dict[str, Callable[[Path], None]] = {
    "save": _save,
    "save_async": _save_async,
    "nested": _save_nested,
}


@pytest.fixture
def unix_socket(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "x.safetensors"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    yield path
    s.close()


def _kind(path: Path) -> int:
    return stat.S_IFMT(os.lstat(path).st_mode)


@pytest.mark.parametrize("saver", FILE_SAVERS)
@pytest.mark.parametrize("node", ["fifo", "chardev"])
def test_special_files_are_never_replaced(tmp_path: Path, saver: str, node: str) -> None:
    path = tmp_path / "x.safetensors"
    if node == "fifo":
        os.mkfifo(path)
        words = "is a FIFO"
    else:
        if not ROOT:
            pytest.skip("creating a device node needs root")
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # what /dev/null is
        words = "is a character device"
    kind = _kind(path)
    with pytest.raises(OSError, match=words) as info:
        FILE_SAVERS[saver](path)
    assert info.value.errno == errno.EINVAL and info.value.filename == str(path)
    assert _kind(path) == kind
    assert temp_leftovers(tmp_path) == []


def test_sockets_and_directories_are_never_replaced(unix_socket: Path) -> None:
    with pytest.raises(OSError, match="is a socket") as info:
        zerockpt.save(STATE, unix_socket)
    assert info.value.errno == errno.EINVAL
    assert stat.S_ISSOCK(os.lstat(unix_socket).st_mode)
    directory = unix_socket.parent / "d.safetensors"
    directory.mkdir()
    with pytest.raises(IsADirectoryError):
        zerockpt.save(STATE, directory)
    assert directory.is_dir()


def test_sharded_save_checks_every_destination_before_replacing_any(tmp_path: Path) -> None:
    directory = tmp_path / "sharded"
    zerockpt.save(STATE, directory, max_shard_size=48)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    shards = sorted(n for n in before if n.endswith(".safetensors"))
    last = directory / shards[-1]
    last.unlink()
    os.mkfifo(last)
    with pytest.raises(OSError, match="is a FIFO"):
        zerockpt.save({k: v + 1 for k, v in STATE.items()}, directory, max_shard_size=48)
    assert stat.S_ISFIFO(os.lstat(last).st_mode)
    for name, content in before.items():
        if name != last.name:
            assert (directory / name).read_bytes() == content  # nothing replaced


def test_cli_convert_never_replaces_a_fifo(tmp_path: Path) -> None:
    destination = tmp_path / "x.pt"
    os.mkfifo(destination)
    with pytest.raises(OSError, match="is a FIFO"):
        _convert_to_torch(tmp_path / "x.safetensors")
    assert stat.S_ISFIFO(os.lstat(destination).st_mode)


def test_dcp_writer_never_replaces_a_fifo(tmp_path: Path) -> None:
    directory = tmp_path / "dcp"
    dcp.save(STATE, storage_writer=Writer(directory))
    rank_file = next(p for p in directory.iterdir() if p.suffix == ".safetensors")
    rank_file.unlink()
    os.mkfifo(rank_file)
    with pytest.raises(CheckpointException, match="is a FIFO"):
        dcp.save(STATE, storage_writer=Writer(directory))
    assert stat.S_ISFIFO(os.lstat(rank_file).st_mode)


@pytest.mark.skipif(not ROOT, reason="giving files to another user needs root")
@pytest.mark.parametrize("saver", [*FILE_SAVERS, "sharded", "checkpointer", "cli"])
def test_replaced_files_keep_mode_owner_and_group(tmp_path: Path, saver: str) -> None:
    if saver == "sharded":
        zerockpt.save(STATE, tmp_path / "d", max_shard_size=48)
        path = next((tmp_path / "d").glob("*.safetensors"))
    elif saver == "checkpointer":
        ckpt = zerockpt.Checkpointer(tmp_path / "c")
        ckpt.save(1, STATE)
        path = next((tmp_path / "c").rglob("step_*.safetensors"))
    elif saver == "cli":
        path = tmp_path / "x.pt"
        path.write_bytes(b"old")
    else:
        path = tmp_path / "x.safetensors"
        path.write_bytes(b"old")
    os.chown(path, NOBODY, NOBODY)
    os.chmod(path, 0o640)
    before = path.read_bytes()
    if saver == "sharded":
        zerockpt.save({k: v + 1 for k, v in STATE.items()}, tmp_path / "d", max_shard_size=48)
    elif saver == "checkpointer":
        ckpt.save(1, {k: v + 1 for k, v in STATE.items()})
    elif saver == "cli":
        _convert_to_torch(tmp_path / "x.safetensors")
    else:
        FILE_SAVERS[saver](path)
    st = os.stat(path)
    assert path.read_bytes() != before  # replaced
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o640)


@pytest.mark.parametrize("saver", FILE_SAVERS)
@pytest.mark.parametrize("relative", [True, False])
def test_saving_through_a_symlink_replaces_its_target(
    tmp_path: Path, saver: str, relative: bool
) -> None:
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "model.safetensors"
    target.write_bytes(b"old")
    os.chmod(target, 0o604)
    link = tmp_path / "latest.safetensors"
    link.symlink_to(Path("real/model.safetensors") if relative else target)
    FILE_SAVERS[saver](link)
    assert link.is_symlink() and os.readlink(link) == str(
        Path("real/model.safetensors") if relative else target
    )
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o604
    loaded = zerockpt.load(target)
    expected = zerockpt.load(link)
    assert str(loaded) == str(expected)
    assert temp_leftovers(tmp_path) == [] and temp_leftovers(tmp_path / "real") == []


def test_a_dangling_symlink_gets_its_target_created(tmp_path: Path) -> None:
    link = tmp_path / "x.safetensors"
    link.symlink_to("made.safetensors")
    zerockpt.save(STATE, link)
    assert link.is_symlink()
    torch.testing.assert_close(zerockpt.load(tmp_path / "made.safetensors")["w"], STATE["w"])


def test_a_symlink_loop_is_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(OSError) as info:
        zerockpt.save(STATE, a)
    assert info.value.errno == errno.ELOOP and info.value.filename == str(a)
    assert a.is_symlink() and b.is_symlink()


def _refused(what: str, save: Callable[[], object], path: str) -> str:
    before = Path(path).read_bytes()
    try:
        save()
    except PermissionError as e:
        assert os.path.dirname(e.filename) == os.path.dirname(path), (what, e.filename)
    except RuntimeError as e:  # torch.save's own error for it
        assert what == "torch.save" and "Permission denied" in str(e), (what, e)
    else:
        raise AssertionError(f"{what} replaced a write-protected file")
    assert Path(path).read_bytes() == before, what
    return what


def _as_nobody(directory: str) -> list[str]:
    """The checks, run in a child process as nobody (no capabilities, no groups)."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    assert os.geteuid() == NOBODY
    state = {"w": torch.ones(3)}
    p = os.path.join(directory, "x.safetensors")
    index = os.path.join(directory, "sharded", "model.safetensors.index.json")
    pt = os.path.join(directory, "x.pt")
    source = os.path.join(directory, "src.safetensors")
    return [
        _refused("torch.save", lambda: torch.save(state, p), p),
        _refused("save", lambda: zerockpt.save(state, p), p),
        _refused("save_async", lambda: zerockpt.save_async(state, p).result(), p),
        _refused("nested", lambda: zerockpt.save({"m": state, "step": 1}, p), p),
        _refused(
            "sharded",
            lambda: zerockpt.save(state, os.path.dirname(index), max_shard_size=8),
            index,
        ),
        _refused("cli", lambda: cli.main(["--debug", "convert", source, pt, "--force"]), pt),
    ]


@pytest.mark.skipif(not ROOT, reason="needs root to become another user")
def test_write_protected_files_are_refused_like_torch_save() -> None:
    """As a user without CAP_DAC_OVERRIDE (nobody), in a directory that user may write."""
    directory = tempfile.mkdtemp(prefix="zerockpt-dest-")
    try:
        os.chmod(directory, 0o777)
        zerockpt.save({"w": torch.zeros(3)}, os.path.join(directory, "src.safetensors"))
        zerockpt.save({"w": torch.zeros(3)}, os.path.join(directory, "sharded"), max_shard_size=8)
        for name in ["x.safetensors", "x.pt"]:
            Path(directory, name).write_bytes(b"precious")
        for root, dirs, files in os.walk(directory):
            for d in dirs:
                os.chown(os.path.join(root, d), NOBODY, NOBODY)
                os.chmod(os.path.join(root, d), 0o777)
            for f in files:
                os.chown(os.path.join(root, f), NOBODY, NOBODY)
                os.chmod(os.path.join(root, f), 0o444)
        os.chmod(os.path.join(directory, "src.safetensors"), 0o644)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report, then leave without running the parent's cleanup
            code = 1
            try:
                os.close(read)
                os.write(write, "\n".join(_as_nobody(directory)).encode())
                code = 0
            except BaseException as e:
                os.write(write, f"FAILED {type(e).__name__}: {e}".encode())
            finally:
                os._exit(code)
        os.close(write)
        with os.fdopen(read) as f:
            report = f.read()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, report
        assert report.split("\n") == [
            "torch.save",
            "save",
            "save_async",
            "nested",
            "sharded",
            "cli",
        ]
    finally:
        subprocess.run(["rm", "-rf", directory], check=True)
