"""torch's own DCP layout (FileSystemWriter: ``.metadata`` + ``*.distcp``): inspect, verify and
convert it, only when trusted (its metadata is a pickle). The oracle is torch itself:
``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` + ``torch.load`` of the same
checkpoint, compared tensor by tensor (bitwise, dtype, shape) and value by value."""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import time
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
import zerockpt
import zerockpt.cli
import zerockpt.dcp
from conftest import assert_same_state, forkserver_context
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def training_state() -> dict[str, Any]:
    """Model and optimizer state of several dtypes, a 0-d and an empty tensor, plain values."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    model(torch.randn(5, 6)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "half": torch.randn(4, 4).to(torch.bfloat16),
        "ints": torch.arange(10, dtype=torch.int64).reshape(2, 5),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.empty(0, 3),
        "extra": {"step": 11, "tag": "run-a", "lr": 1e-3, "none": None, "pair": (1, 2.0)},
        "history": [0.5, 0.25],
    }


def save_native(state: dict[str, Any], path: Path, **writer: Any) -> Path:
    """``dcp.save`` with torch's FileSystemWriter, in one process without a process group.

    Without copy-ahead unless ``writer`` says otherwise: once the suite's test accelerator is
    registered, torch's overlapping loader asks it for a stream, which it does not have. (The
    two-rank test saves with ``checkpoint_id=`` alone, in processes without it.)
    """
    writer = {"per_thread_copy_ahead": 0, **writer}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=FileSystemWriter(path, **writer), no_dist=True)
    return path


def oracle(checkpoint: Path, tmp_path: Path) -> Any:
    """What torch's own conversion gives for ``checkpoint``."""
    ref = tmp_path / "oracle.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(checkpoint, ref)
    return torch.load(ref, weights_only=False)


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    status = zerockpt.cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_native(training_state(), tmp_path_factory.mktemp("native") / "ckpt")


@pytest.fixture(scope="module")
def expected(native: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return oracle(native, tmp_path_factory.mktemp("oracle"))


def test_the_checkpoint_is_torchs_native_layout(native: Path) -> None:
    names = sorted(os.listdir(native))
    assert ".metadata" in names and any(n.endswith(".distcp") for n in names)
    assert not (native / zerockpt.dcp.METADATA_FILE).exists()


# --- Python: trusted=True ---------------------------------------------------------------------


@pytest.mark.parametrize("max_shard_size", [None, "300B"])
def test_to_file_equals_torchs_conversion(
    native: Path, expected: Any, tmp_path: Path, max_shard_size: str | None
) -> None:
    dest = tmp_path / ("shards" if max_shard_size else "out.safetensors")
    zerockpt.dcp.to_file(native, dest, max_shard_size=max_shard_size, trusted=True)
    if max_shard_size:
        assert (dest / "model.safetensors.index.json").exists()
        assert len(list(dest.glob("model-*-of-*.safetensors"))) > 1
    out = zerockpt.load(dest, verify=True)
    assert_same_state(out, expected)
    # Nested state is stored as zerockpt.save stores the oracle's state.
    zerockpt.save(expected, tmp_path / "direct.safetensors")
    with zerockpt.open(dest) as f, zerockpt.open(tmp_path / "direct.safetensors") as g:
        assert f.keys() == g.keys()
        own = "zerockpt.structure"
        if f.index is None:
            assert f.metadata()[own] == g.metadata()[own]
        else:
            assert f.index["metadata"][own] == g.metadata()[own]


@pytest.mark.parametrize(
    "writer",
    [
        {"single_file_per_rank": False},  # one .distcp file per item
        {"thread_count": 3},  # several files per rank
        {"sync_files": False},
    ],
)
def test_to_file_reads_every_writer_layout(tmp_path: Path, writer: dict[str, Any]) -> None:
    ckpt = save_native(training_state(), tmp_path / "ckpt", **writer)
    zerockpt.dcp.to_file(ckpt, tmp_path / "out.safetensors", trusted=True)
    assert_same_state(zerockpt.load(tmp_path / "out.safetensors"), oracle(ckpt, tmp_path))


def test_describe_and_verify(native: Path, expected: Any) -> None:
    report = zerockpt.dcp.describe(native, trusted=True)
    assert report["kind"] == "dcp" and report["format"] == zerockpt.dcp.NATIVE_FORMAT
    assert report["checksums"]["stored"] is False
    tensors = {t["name"]: t for t in report["tensors"]}
    weight = expected["model"]["0.weight"]
    assert tensors["model.0.weight"]["shape"] == list(weight.shape)
    assert tensors["model.0.weight"]["dtype"] == "float32"
    assert tensors["half"]["dtype"] == "bfloat16"
    assert tensors["ints"]["nbytes"] == 80
    items = {i["name"]: i for i in report["items"]}
    assert items["extra.step"]["value"] == 11 and items["extra.tag"]["value"] == "run-a"
    assert items["extra.pair"]["repr"] == "(1, 2.0)"
    json.dumps(report, allow_nan=False)
    result = zerockpt.dcp.verify(native, trusted=True)
    assert (
        result.ok
        and not result.has_checksums
        and result.tensors == len(report["tensors"]) + len(report["items"])
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda src, dst: zerockpt.dcp.to_file(src, dst),
        lambda src, dst: zerockpt.dcp.describe(src),
        lambda src, dst: zerockpt.dcp.verify(src),
    ],
    ids=["to_file", "describe", "verify"],
)
def test_untrusted_is_refused_naming_the_format(
    native: Path, tmp_path: Path, call: Callable[[Path, Path], object]
) -> None:
    with pytest.raises(zerockpt.FormatError) as info:
        call(native, tmp_path / "out.safetensors")
    message = str(info.value)
    assert str(native) in message and "native DCP format" in message
    assert "pickle" in message and "trusted=True" in message and "--trust" in message
    assert not (tmp_path / "out.safetensors").exists()


class Payload:
    """Unpickling this creates a directory: the stand-in for arbitrary code execution."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (os.mkdir, (str(self.sentinel),))


def test_untrusted_metadata_is_never_unpickled(
    native: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "evil"
    ckpt.mkdir()
    (ckpt / "__0_0.distcp").write_bytes((native / "__0_0.distcp").read_bytes())
    sentinel = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(Payload(sentinel)))
    for command in ("inspect", "verify"):
        status, out, err = run_cli(capsys, command, ckpt)
        assert status == 1 and out == "" and "--trust" in err
    status, _, err = run_cli(capsys, "convert", ckpt, tmp_path / "out.safetensors")
    assert status == 1 and "native DCP format" in err
    assert not sentinel.exists() and not (tmp_path / "out.safetensors").exists()
    # Control: the payload is live, and --trust does read the pickle (then finds no metadata).
    status, _, err = run_cli(capsys, "inspect", "--trust", ckpt)
    assert sentinel.exists()
    assert status == 1 and f"{ckpt / '.metadata'}: not torch DCP metadata" in err


# --- the command line ---------------------------------------------------------------------------


def test_cli_inspect(native: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_cli(capsys, "inspect", native)
    assert status == 1 and out == "" and err.count("\n") == 1
    assert "torch's native DCP format" in err and "pickle" in err and "--trust" in err
    assert "holds no checkpoint" not in err
    status, out, _ = run_cli(capsys, "inspect", "--trust", "--json", native)
    assert status == 0
    report = zerockpt.dcp.describe(native, trusted=True)
    assert json.loads(out) == json.loads(json.dumps({**report, "path": str(native)}))
    status, out, _ = run_cli(capsys, "inspect", "--trust", native / ".metadata")
    assert status == 0 and "torch DCP checkpoint" in out and "model.0.weight" in out
    assert any(line.split() == ["extra.tag", "'run-a'"] for line in out.splitlines())
    status, out, _ = run_cli(capsys, "inspect", "--trust", "--verify", native)
    assert status == 0 and "none stored" in out


def test_cli_verify(native: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_cli(capsys, "verify", "--trust", native)
    assert status == 0 and "structure OK" in out
    status, _, _ = run_cli(capsys, "verify", "--trust", "--require-checksums", native)
    assert status == 1


@pytest.mark.parametrize("destination", ["out.safetensors", "shards", "out.pt"])
def test_cli_convert(
    native: Path,
    expected: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    destination: str,
) -> None:
    dst = tmp_path / destination
    extra = ["--max-shard-size", "300B"] if destination == "shards" else []
    status, _, err = run_cli(capsys, "convert", native, dst, *extra)
    assert status == 1 and "--trust" in err and not dst.exists()
    status, out, err = run_cli(capsys, "convert", "--trust", native, dst, *extra)
    assert status == 0 and f"{native} -> {dst}:" in out, err
    if destination == "out.pt":
        got = torch.load(dst, weights_only=True)
    else:
        got = zerockpt.load(dst, verify=True)
    assert_same_state(got, expected)


# --- incomplete, missing and corrupt files ----------------------------------------------------


def copy_of(native: Path, tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in os.listdir(native):
        (ckpt / name).write_bytes((native / name).read_bytes())
    return ckpt


def data_file(ckpt: Path) -> Path:
    (name,) = [n for n in os.listdir(ckpt) if n.endswith(".distcp")]
    return ckpt / name


def expect_failure(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *words: str
) -> None:
    """convert and inspect --trust fail with one line holding ``words``; nothing is written."""
    dst = tmp_path / "out.safetensors"
    for args in (["convert", "--trust", ckpt, dst], ["inspect", "--trust", ckpt]):
        status, out, err = run_cli(capsys, *args)
        assert status == 1 and out == "" and err.count("\n") == 1, err
        for word in words:
            assert word in err, (word, err)
    assert not dst.exists()
    assert [n for n in os.listdir(tmp_path) if n not in ("ckpt", "pwned")] == []


def test_missing_data_file(
    native: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = copy_of(native, tmp_path)
    file = data_file(ckpt)
    file.unlink()
    expect_failure(ckpt, tmp_path, capsys, str(file), "No such file or directory")
    with pytest.raises(FileNotFoundError) as info:
        zerockpt.dcp.to_file(ckpt, tmp_path / "out.safetensors", trusted=True)
    assert info.value.filename == str(file)


def test_truncated_data_file(
    native: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = copy_of(native, tmp_path)
    file = data_file(ckpt)
    os.truncate(file, file.stat().st_size - 100)
    expect_failure(ckpt, tmp_path, capsys, str(file), "truncated")


def test_corrupt_data_file(
    native: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = copy_of(native, tmp_path)
    file = data_file(ckpt)
    file.write_bytes(os.urandom(file.stat().st_size))  # same size, nothing torch can load
    dst = tmp_path / "out.safetensors"
    status, out, err = run_cli(capsys, "convert", "--trust", ckpt, dst)
    assert status == 1 and out == "" and err.count("\n") == 1
    assert f"zerockpt: error: {file}: cannot read " in err
    assert not dst.exists() and sorted(os.listdir(tmp_path)) == ["ckpt"]
    with pytest.raises(zerockpt.FormatError, match=str(file)):
        zerockpt.dcp.to_file(ckpt, dst, trusted=True)


@pytest.mark.parametrize("content", [b"", b"not a pickle", b"\x80\x04K\x07."])
def test_corrupt_metadata(
    native: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    ckpt = copy_of(native, tmp_path)
    (ckpt / ".metadata").write_bytes(content)
    expect_failure(ckpt, tmp_path, capsys, str(ckpt / ".metadata"), "not torch DCP metadata")


def test_data_files_without_metadata(
    native: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = copy_of(native, tmp_path)
    (ckpt / ".metadata").unlink()
    for trust in ([], ["--trust"]):
        status, _, err = run_cli(capsys, "inspect", *trust, ckpt)
        assert status == 1 and "not a complete torch DCP checkpoint" in err
    with pytest.raises(zerockpt.FormatError, match="not a complete torch DCP checkpoint"):
        zerockpt.dcp.to_file(ckpt, tmp_path / "out.safetensors")


def test_directory_without_checkpoint_names_both_layouts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run_cli(capsys, "inspect", tmp_path)
    assert status == 1 and "holds no checkpoint" in err and ".metadata nor" in err


def rewrite_metadata(ckpt: Path, change: Callable[[Any], None]) -> None:
    path = ckpt / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    change(metadata)
    path.write_bytes(pickle.dumps(metadata))


def _entry(metadata: Any, fqn: str) -> Any:
    return next(info for index, info in metadata.storage_data.items() if index.fqn == fqn)


def _shift_past_the_end(metadata: Any) -> None:
    info = _entry(metadata, "ints")
    info.offset += 10**6


def _escape(metadata: Any) -> None:
    _entry(metadata, "ints").relative_path = "../outside.distcp"


def _grow(metadata: Any) -> None:
    md = metadata.state_dict_metadata["ints"]
    md.size = torch.Size([4, 5])  # its one chunk now covers half of it


def _drop_storage(metadata: Any) -> None:
    index = next(i for i in metadata.storage_data if i.fqn == "ints")
    del metadata.storage_data[index]


def _short_chunk(metadata: Any) -> None:
    _entry(metadata, "ints").length = 16  # fewer bytes than the chunk's 80


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (_shift_past_the_end, ["__0_0.distcp", "'ints'", "truncated"]),
        (_escape, ["invalid file name '../outside.distcp'"]),
        (_grow, ["tensor 'ints'", "the chunks hold 10 elements, the tensor 20"]),
        (_drop_storage, ["tensor 'ints'", "no stored data for its chunk at [0, 0]"]),
        (_short_chunk, ["__0_0.distcp", "16 bytes stored for the chunk of 'ints'"]),
    ],
    ids=["past-the-end", "escape", "not-covered", "no-storage", "short-chunk"],
)
def test_metadata_that_does_not_match_the_files(
    native: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: Callable[[Any], None],
    words: list[str],
) -> None:
    ckpt = copy_of(native, tmp_path)
    rewrite_metadata(ckpt, change)
    expect_failure(ckpt, tmp_path, capsys, *words)


def test_zerockpt_reader_names_the_native_format(native: Path) -> None:
    with pytest.raises(zerockpt.FormatError, match=r"torch's native DCP format.*FileSystemReader"):
        zerockpt.dcp.Reader(native).read_metadata()


def test_safetensors_serialization_fails_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """FileSystemWriter's SAFETENSORS serialization, which torch's own reader (and so
    dcp_to_torch_save) cannot read either: one line naming the file and the item."""
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    ckpt = save_native(
        {"a": torch.arange(4.0)},
        tmp_path / "ckpt",
        serialization_format=SerializationFormat.SAFETENSORS,
    )
    with pytest.raises(CheckpointException):  # torch's own conversion fails too
        oracle(ckpt, tmp_path)
    dst = tmp_path / "out.safetensors"
    status, out, err = run_cli(capsys, "convert", "--trust", ckpt, dst)
    assert status == 1 and out == "" and err.count("\n") == 1
    assert f"{data_file(ckpt)}: cannot read 'a' " in err and not dst.exists()


# --- two ranks (gloo): sharded tensors ------------------------------------------------------


def sharded_source() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {
        "rows": torch.randn(7, 4),  # uneven Shard(0): 4 + 3 rows
        "cols": torch.arange(30, dtype=torch.int32).reshape(3, 10),  # Shard(1)
        "copy": torch.randn(5).to(torch.float16),  # Replicate: stored once
        "plain": torch.arange(6.0),  # a plain tensor, the same on both ranks
    }


def _worker(rank: int, world_size: int, port: int, root: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        full = sharded_source()
        state = {
            "model": {
                "rows": distribute_tensor(full["rows"], mesh, [Shard(0)]),
                "cols": distribute_tensor(full["cols"], mesh, [Shard(1)]),
                "copy": distribute_tensor(full["copy"], mesh, [Replicate()]),
                "plain": full["plain"],
            },
            "step": 5,
        }
        dcp.save(state, checkpoint_id=root)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_ranks_of_sharded_tensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    forkserver_context("test_dcp_native")
    ckpt = tmp_path / "ckpt"
    ctx = mp.start_processes(
        _worker,
        args=(2, _free_port(), str(ckpt)),
        nprocs=2,
        join=False,
        start_method="forkserver",
    )
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two-rank save ran past 120 s")
    assert sorted(n for n in os.listdir(ckpt) if n.endswith(".distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    expected = oracle(ckpt, tmp_path)
    full = sharded_source()
    for name, tensor in full.items():  # the oracle itself is right
        assert torch.equal(expected["model"][name], tensor)
    report = zerockpt.dcp.describe(ckpt, trusted=True)
    chunks = {t["name"]: t["chunks"] for t in report["tensors"]}
    assert chunks["model.rows"] == 2 and chunks["model.cols"] == 2
    for extra in ([], ["--max-shard-size", "200B"]):
        dst = tmp_path / ("shards" if extra else "out.safetensors")
        status, _, err = run_cli(capsys, "convert", "--trust", ckpt, dst, *extra)
        assert status == 0, err
        assert_same_state(zerockpt.load(dst, verify=True), expected)


def test_cli_help_documents_trust(capsys: pytest.CaptureFixture[str]) -> None:
    # In-process (test_cli.py runs `python -m zerockpt --help` itself in a real process).
    for command in ("inspect", "convert", "verify"):
        status, out, _ = run_cli(capsys, command, "--help")
        assert status == 0
        assert "--trust" in out and "pickle" in out
