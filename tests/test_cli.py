"""The zerockpt command line: inspect, convert, verify; exit codes, output, errors.

Most tests call ``zerockpt.cli.main`` in-process; a few run ``python -m zerockpt`` to check the
entry point, exit statuses and tracebacks as a shell sees them.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import types
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
import zerockpt
import zerockpt.dcp
from conftest import assert_bitwise_equal, random_tensor
from zerockpt import cli

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


# ---------------------------------------------------------------------------------------------
# Helpers


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    """``zerockpt.cli.main(argv)`` in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def training_state(seed: int = 0) -> dict[str, Any]:
    """A model's state dict, its Adam state after one step, and plain training values."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3)
    )
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 6)).sum().backward()
    optim.step()
    return {
        "model": model.state_dict(),
        "optim": optim.state_dict(),
        "step": 11,
        "epoch": 2,
        "tag": "run-a",
        "rng": torch.get_rng_state(),
    }


def assert_trees_bitwise_equal(a: object, b: object, where: str = "obj") -> None:
    """Same containers (types, key order and types, _metadata), leaves and tensor bits."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert_bitwise_equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict)
        assert list(a) == list(b), where
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), where
        for key in a:
            assert_trees_bitwise_equal(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple)
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_trees_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def flip_data_byte(path: Path, name: str) -> None:
    """Flips one bit in the stored bytes of tensor ``name`` (a corruption on disk)."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8 : 8 + n])[name]["data_offsets"]
    assert end > begin
    raw[8 + n + begin] ^= 0x01
    path.write_bytes(bytes(raw))


def save_dcp(state: dict[str, Any], path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=zerockpt.dcp.Writer(path), no_dist=True)


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


@pytest.fixture
def flat() -> dict[str, torch.Tensor]:
    """Tensors of several dtypes, with a tied pair (``head.weight`` is ``embed.weight``)."""
    embed = random_tensor((10, 4), torch.float32, seed=1)
    return {
        "embed.weight": embed,
        "block.w": random_tensor((4, 4), torch.bfloat16, seed=2),
        "block.mask": random_tensor((3,), torch.bool, seed=3),
        "count": torch.tensor(5, dtype=torch.int64),
        "head.weight": embed,
    }


# ---------------------------------------------------------------------------------------------
# The entry point


@pytest.fixture(scope="module")
def shells(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The real-process runs of `python -m zerockpt` that the tests below check, started all at
    once so that their interpreters' start-ups (importing torch) overlap."""
    tmp = tmp_path_factory.mktemp("shells")
    missing = tmp / "missing.safetensors"
    flipped = tmp / "m.safetensors"
    zerockpt.save({"a": torch.arange(6.0), "b": torch.ones(3, dtype=torch.int32)}, flipped)
    flip_data_byte(flipped, "b")
    commands = {
        "help": ["--help"],
        "missing": ["verify", missing],
        "missing-debug": ["--debug", "verify", missing],
        "flipped": ["verify", flipped],
    }
    started = {
        name: subprocess.Popen(
            [sys.executable, "-m", "zerockpt", *[str(a) for a in argv]],
            cwd=tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, argv in commands.items()
    }
    runs: dict[str, Any] = {"missing-path": missing}
    for name, proc in started.items():
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        runs[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return runs


def test_python_m_zerockpt_help(shells: dict[str, Any]) -> None:
    proc = shells["help"]
    assert proc.returncode == 0, proc.stderr
    for command in ("inspect", "convert", "verify", "bench"):
        assert command in proc.stdout
    assert proc.stderr == ""


@pytest.mark.parametrize("command", ["inspect", "convert", "verify"])
def test_subcommand_help(capsys: pytest.CaptureFixture[str], command: str) -> None:
    status, out, _ = run_cli(capsys, command, "--help")
    assert status == 0
    assert f"usage: zerockpt {command}" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_cli(capsys, "--version")
    assert status == 0 and out.strip() == f"zerockpt {zerockpt.__version__}"


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        ([], "required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["inspect"], "required: PATH"),
        (["inspect", "x", "--bogus"], "unrecognized arguments: --bogus"),
        (["convert", "a.pt", "b", "--max-shard-size", "5Gb"], "bits"),
        (["convert", "a.pt", "b", "--max-shard-size", "lots"], "not a size"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], words: str
) -> None:
    status, out, err = run_cli(capsys, *argv)
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("zerockpt: error: ")
    assert words in err


# ---------------------------------------------------------------------------------------------
# inspect


def test_inspect_file_human(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flat: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "model.safetensors"
    zerockpt.save(flat, path, metadata={"step": "1000", "arch": "toy"})
    status, out, err = run_cli(capsys, "inspect", path)
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith(f"{path}: safetensors file")
    row = next(line.split() for line in lines if line.startswith("block.w "))
    assert row == ["block.w", "bfloat16", "[4,", "4]", "32", "B"]
    assert any(line.split()[:2] == ["count", "int64"] and "[]" in line for line in lines)
    assert "head.weight -> embed.weight" in out  # the alias, in the table and the list
    assert "total: 5 tensors (4 stored, 1 alias), 203 B (203 bytes)" in out
    assert "  step: 1000" in out and "  arch: toy" in out
    assert "zerockpt: format version 1" in out
    assert "checksums: CRC-32C stored (not checked; use --verify)" in out


def test_inspect_file_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flat: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "model.safetensors"
    zerockpt.save(flat, path, metadata={"step": "1000"})
    status, out, _ = run_cli(capsys, "inspect", "--json", path)
    assert status == 0
    doc = json.loads(out)
    assert doc["path"] == str(path) and doc["kind"] == "file"
    assert doc["files"] == [str(path)]
    assert [t["name"] for t in doc["tensors"]] == list(flat)
    for entry in doc["tensors"]:
        t = flat[entry["name"]]
        assert entry["dtype"] == dtype_name(t)
        assert entry["shape"] == list(t.shape)
        assert entry["nbytes"] == t.numel() * t.element_size()
        assert "file" not in entry
    aliases = {e["name"]: e["alias_of"] for e in doc["tensors"] if "alias_of" in e}
    assert aliases == {"head.weight": "embed.weight"}
    stored = [t for name, t in flat.items() if name != "head.weight"]
    assert doc["total_bytes"] == sum(t.numel() * t.element_size() for t in stored)
    assert doc["metadata"] == {"format": "pt", "step": "1000"}
    assert doc["zerockpt"]["version"] == "1" and doc["zerockpt"]["aliases"] == 1
    assert doc["zerockpt"]["nested_state"] is False
    assert doc["checksums"] == {"stored": True, "verified": None, "failed": []}


def test_inspect_nested_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = training_state()
    path = tmp_path / "ckpt.safetensors"
    zerockpt.save(state, path)
    status, out, _ = run_cli(capsys, "inspect", path)
    assert status == 0
    assert "nested training state, top level: 'model', 'optim', 'step', 'epoch', 'tag'" in out
    assert "optim/state/0/exp_avg" in out
    status, out, _ = run_cli(capsys, "inspect", "--json", path)
    doc = json.loads(out)
    assert doc["zerockpt"]["nested_state"] is True
    names = {t["name"] for t in doc["tensors"]}
    assert {"model/0.weight", "optim/state/0/exp_avg", "rng"} <= names


def test_inspect_without_checksums(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flat: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "plain.safetensors"
    zerockpt.save(flat, path, checksums=False)
    status, out, _ = run_cli(capsys, "inspect", "--verify", path)
    assert status == 0
    assert "checksums: none stored" in out
    status, out, _ = run_cli(capsys, "inspect", "--json", "--verify", path)
    assert json.loads(out)["checksums"] == {"stored": False, "verified": None, "failed": []}


def test_inspect_file_from_safetensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "st.safetensors"
    tensors = {"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.float16)}
    safetensors_torch.save_file(tensors, str(path), metadata={"k": "v"})
    status, out, _ = run_cli(capsys, "inspect", path)
    assert status == 0
    assert "no zerockpt metadata" in out and "checksums: none stored" in out
    status, out, _ = run_cli(capsys, "inspect", "--json", path)
    doc = json.loads(out)
    assert doc["metadata"] == {"k": "v"} and doc["zerockpt"]["version"] is None
    assert {t["name"]: t["shape"] for t in doc["tensors"]} == {"a": [2, 3], "b": [4]}


def test_inspect_verify_finds_a_flipped_byte(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flat: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "model.safetensors"
    zerockpt.save(flat, path)
    status, out, _ = run_cli(capsys, "inspect", "--verify", path)
    assert status == 0 and "verified: every tensor matches" in out
    flip_data_byte(path, "block.w")
    status, out, _ = run_cli(capsys, "inspect", "--verify", path)
    assert status == 1
    assert "verification FAILED for 1: block.w" in out
    status, out, _ = run_cli(capsys, "inspect", "--verify", "--json", path)
    assert status == 1
    assert json.loads(out)["checksums"] == {
        "stored": True,
        "verified": False,
        "failed": ["block.w"],
    }


def test_inspect_sharded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = training_state()
    ckpt = tmp_path / "sharded"
    zerockpt.save(state, ckpt, max_shard_size=300, metadata={"arch": "toy"})
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    for target in (ckpt, ckpt / "model.safetensors.index.json"):
        status, out, _ = run_cli(capsys, "inspect", "--json", target)
        assert status == 0
        doc = json.loads(out)
        assert doc["kind"] == "sharded" and doc["path"] == str(target)
        assert [os.path.basename(f) for f in doc["files"]] == shards
        assert {t["name"]: t["file"] for t in doc["tensors"]} == index["weight_map"]
        assert doc["total_bytes"] == index["metadata"]["total_size"]
        assert doc["metadata"] == {"format": "pt", "arch": "toy"}
        assert doc["zerockpt"]["nested_state"] is True
        assert doc["checksums"]["stored"] is True
    status, out, _ = run_cli(capsys, "inspect", ckpt)
    assert status == 0
    assert "sharded checkpoint" in out and f"{len(shards)} files" in out
    assert shards[-1] in out  # the FILE column


def test_inspect_dcp(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = training_state()
    save_dcp(state, tmp_path / "ckpt")
    status, out, _ = run_cli(capsys, "inspect", "--json", tmp_path / "ckpt")
    assert status == 0
    doc = json.loads(out)
    assert doc["kind"] == "dcp"
    by_name = {t["name"]: t for t in doc["tensors"]}
    for name, t in state["model"].items():
        entry = by_name[f"model.{name}"]
        assert entry["dtype"] == dtype_name(t) and entry["shape"] == list(t.shape)
        assert entry["nbytes"] == t.numel() * t.element_size()
        assert entry["chunks"] == 1 and entry["files"] == ["__0_0.safetensors"]
    assert by_name["optim.state.0.exp_avg"]["shape"] == list(state["model"]["0.weight"].shape)
    assert doc["total_bytes"] == sum(t["nbytes"] for t in doc["tensors"])
    items = {i["name"]: i for i in doc["items"]}
    assert items["step"]["value"] == 11 and items["tag"]["value"] == "run-a"
    assert items["optim.param_groups.0.lr"]["value"] == 1e-3
    assert doc["checksums"]["stored"] is True
    # The metadata file names the checkpoint too; the human form lists values.
    status, out, _ = run_cli(capsys, "inspect", tmp_path / "ckpt" / ".metadata.json")
    assert status == 0
    assert "DCP checkpoint" in out and "model.0.weight" in out
    assert any(line.split() == ["tag", "'run-a'"] for line in out.splitlines())


def test_inspect_rejects_a_torch_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "m.pt")
    status, out, err = run_cli(capsys, "inspect", tmp_path / "m.pt")
    assert status == 1 and out == ""
    assert err.count("\n") == 1 and "torch.save checkpoint" in err and "convert" in err


def test_inspect_directory_without_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run_cli(capsys, "inspect", tmp_path)
    assert status == 1 and "holds no checkpoint" in err and err.count("\n") == 1


def test_inspect_incomplete_dcp(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_dcp(training_state(), tmp_path / "ckpt")
    (tmp_path / "ckpt" / zerockpt.dcp.METADATA_FILE).unlink()
    status, _, err = run_cli(capsys, "inspect", tmp_path / "ckpt")
    assert status == 1 and "not a complete zerockpt.dcp checkpoint" in err


# ---------------------------------------------------------------------------------------------
# verify


def test_verify_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flat: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "model.safetensors"
    zerockpt.save(flat, path)
    status, out, err = run_cli(capsys, "verify", path)
    assert status == 0 and err == ""
    assert out == f"{path}: OK: 4 tensors, checksums match\n"
    status, out, _ = run_cli(capsys, "verify", "--json", path)
    assert status == 0
    assert json.loads(out) == {
        "path": str(path),
        "kind": "file",
        "ok": True,
        "tensors": 4,
        "checksums": {"stored": True, "verified": True, "failed": []},
    }

    flip_data_byte(path, "embed.weight")
    flip_data_byte(path, "count")
    assert zerockpt.verify(path).failed == ("embed.weight", "count")  # the oracle
    status, out, _ = run_cli(capsys, "verify", path)
    assert status == 1
    assert "FAILED: 2 of 4 tensors" in out
    assert "  embed.weight\n" in out and "  count\n" in out
    status, out, _ = run_cli(capsys, "verify", "--json", path)
    assert status == 1
    doc = json.loads(out)
    assert doc["ok"] is False
    assert doc["checksums"] == {
        "stored": True,
        "verified": False,
        "failed": ["embed.weight", "count"],
    }


def test_verify_without_checksums(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flat: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "plain.safetensors"
    zerockpt.save(flat, path, checksums=False)
    status, out, _ = run_cli(capsys, "verify", path)
    assert status == 0 and "no checksums stored" in out
    status, out, _ = run_cli(capsys, "verify", "--require-checksums", path)
    assert status == 1 and "--require-checksums" in out
    status, out, _ = run_cli(capsys, "verify", "--json", "--require-checksums", path)
    doc = json.loads(out)
    assert status == 1 and doc["ok"] is False
    assert doc["checksums"] == {"stored": False, "verified": None, "failed": []}


def test_verify_sharded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "sharded"
    zerockpt.save(training_state(), ckpt, max_shard_size=300)
    weight_map = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    status, out, _ = run_cli(capsys, "verify", ckpt)
    assert status == 0 and "OK" in out
    flip_data_byte(ckpt / weight_map["optim/state/1/exp_avg"], "optim/state/1/exp_avg")
    status, out, _ = run_cli(capsys, "verify", ckpt / "model.safetensors.index.json")
    assert status == 1 and "  optim/state/1/exp_avg\n" in out


def test_verify_dcp(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_dcp(training_state(), tmp_path / "ckpt")
    status, out, _ = run_cli(capsys, "verify", tmp_path / "ckpt")
    assert status == 0 and "OK" in out
    flip_data_byte(tmp_path / "ckpt" / "__0_0.safetensors", "model.2.weight")
    status, out, _ = run_cli(capsys, "verify", tmp_path / "ckpt")
    assert status == 1 and "  model.2.weight\n" in out
    status, out, _ = run_cli(capsys, "verify", "--json", tmp_path / "ckpt")
    doc = json.loads(out)
    assert doc["kind"] == "dcp" and doc["checksums"]["failed"] == ["model.2.weight"]


def test_verify_dcp_missing_rank_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_dcp(training_state(), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "__0_0.safetensors").unlink()
    status, out, err = run_cli(capsys, "verify", tmp_path / "ckpt")
    assert status == 1 and out == ""
    assert err.startswith(f"zerockpt: error: {tmp_path / 'ckpt' / '__0_0.safetensors'}: ")
    assert err.endswith("No such file or directory\n") and err.count("\n") == 1


def test_verify_truncated_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flat: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "model.safetensors"
    zerockpt.save(flat, path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 8)
    status, out, err = run_cli(capsys, "verify", path)
    assert status == 1 and out == ""
    assert err.startswith("zerockpt: error: ") and err.count("\n") == 1
    assert str(path) in err


# ---------------------------------------------------------------------------------------------
# convert


def test_convert_round_trip_through_zerockpt_is_bitwise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = training_state()
    torch.save(state, tmp_path / "orig.pt")
    source = torch.load(tmp_path / "orig.pt", weights_only=True)  # the oracle

    status, out, err = run_cli(capsys, "convert", tmp_path / "orig.pt", tmp_path / "z.safetensors")
    assert status == 0 and err == ""
    tensors = sum(1 for _ in cli._walk_tensors(state))
    assert out.startswith(f"{tmp_path / 'orig.pt'} -> {tmp_path / 'z.safetensors'}: {tensors} ")
    assert out.rstrip().endswith(" s")
    assert_trees_bitwise_equal(zerockpt.load(tmp_path / "z.safetensors", verify=True), source)

    status, _, _ = run_cli(capsys, "convert", tmp_path / "z.safetensors", tmp_path / "back.pth")
    assert status == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert_trees_bitwise_equal(back, source)
    assert type(back["model"]) is OrderedDict
    assert back["model"]._metadata == source["model"]._metadata
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary files


def test_convert_flat_state_dict_with_tied_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flat: dict[str, torch.Tensor]
) -> None:
    torch.save(flat, tmp_path / "m.bin")
    assert run_cli(capsys, "convert", tmp_path / "m.bin", tmp_path / "m.safetensors")[0] == 0
    loaded = zerockpt.load(tmp_path / "m.safetensors")
    assert_trees_bitwise_equal(loaded, flat)
    assert loaded["head.weight"] is loaded["embed.weight"]
    assert run_cli(capsys, "convert", tmp_path / "m.safetensors", tmp_path / "back.pt")[0] == 0
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert_trees_bitwise_equal(back, flat)
    assert back["head.weight"].data_ptr() == back["embed.weight"].data_ptr()


def test_convert_to_sharded_and_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = training_state()
    torch.save(state, tmp_path / "orig.pt")
    status, _, _ = run_cli(
        capsys, "convert", tmp_path / "orig.pt", tmp_path / "shards", "--max-shard-size", "500B"
    )
    assert status == 0
    shards = sorted(p.name for p in (tmp_path / "shards").glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    assert_trees_bitwise_equal(zerockpt.load(tmp_path / "shards", verify=True), state)
    assert run_cli(capsys, "verify", tmp_path / "shards")[0] == 0
    status, _, _ = run_cli(capsys, "convert", tmp_path / "shards", tmp_path / "back.pt")
    assert status == 0
    assert_trees_bitwise_equal(torch.load(tmp_path / "back.pt", weights_only=True), state)
    # Resharded in place: the mapped source shards stay valid while they are replaced.
    status, _, _ = run_cli(
        capsys,
        "convert",
        tmp_path / "shards",
        tmp_path / "shards",
        "--max-shard-size",
        "1MB",
        "--force",
    )
    assert status == 0
    assert sorted(p.name for p in (tmp_path / "shards").glob("model-*")) == [
        "model-00001-of-00001.safetensors"
    ]
    assert_trees_bitwise_equal(zerockpt.load(tmp_path / "shards", verify=True), state)


@pytest.mark.parametrize("destination", ["out.pt", "out.safetensors", "out_shards"])
def test_convert_dcp(tmp_path: Path, capsys: pytest.CaptureFixture[str], destination: str) -> None:
    state = training_state()
    save_dcp(state, tmp_path / "ckpt")
    zerockpt.dcp.to_file(tmp_path / "ckpt", tmp_path / "ref.safetensors")
    expected = zerockpt.load(tmp_path / "ref.safetensors")  # the oracle
    assert list(expected["model"]) == list(state["model"])  # DCP keeps values, not OrderedDict
    for name, t in state["model"].items():
        assert_bitwise_equal(expected["model"][name], t)

    extra = ["--max-shard-size", "1KB"] if destination == "out_shards" else []
    dst = tmp_path / destination
    status, out, err = run_cli(capsys, "convert", tmp_path / "ckpt", dst, *extra)
    assert status == 0 and err == ""
    assert f"-> {dst}: " in out
    if destination == "out.pt":
        got = torch.load(dst, weights_only=True)
    else:
        got = zerockpt.load(dst, verify=True)
    assert_trees_bitwise_equal(got, expected)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_convert_refuses_to_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = training_state()
    torch.save(state, tmp_path / "orig.pt")
    dst = tmp_path / "z.safetensors"
    dst.write_bytes(b"precious")
    status, out, err = run_cli(capsys, "convert", tmp_path / "orig.pt", dst)
    assert status == 1 and out == ""
    assert err == f"zerockpt: error: {dst}: already exists (use --force to overwrite it)\n"
    assert dst.read_bytes() == b"precious"

    status, _, _ = run_cli(capsys, "convert", tmp_path / "orig.pt", dst, "--force")
    assert status == 0
    assert_trees_bitwise_equal(zerockpt.load(dst), state)

    # A torch.save destination, and a sharded one (a non-empty directory).
    torch.save({"old": torch.ones(1)}, tmp_path / "back.pt")
    status, _, err = run_cli(capsys, "convert", dst, tmp_path / "back.pt")
    assert status == 1 and "--force" in err
    assert list(torch.load(tmp_path / "back.pt", weights_only=True)) == ["old"]
    assert run_cli(capsys, "convert", dst, tmp_path / "back.pt", "--force")[0] == 0
    assert_trees_bitwise_equal(torch.load(tmp_path / "back.pt", weights_only=True), state)

    (tmp_path / "shards").mkdir()
    assert run_cli(capsys, "convert", dst, tmp_path / "shards", "--max-shard-size", "1KB")[0] == 0
    status, _, err = run_cli(capsys, "convert", dst, tmp_path / "shards", "--max-shard-size", "1KB")
    assert status == 1 and "--force" in err


def test_convert_destination_conflicts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flat: dict[str, torch.Tensor]
) -> None:
    zerockpt.save(flat, tmp_path / "m.safetensors")
    torch.save(flat, tmp_path / "m.pt")
    (tmp_path / "dir").mkdir()
    status, _, err = run_cli(capsys, "convert", tmp_path / "m.safetensors", tmp_path / "dir")
    assert status == 1 and "is a directory" in err
    status, _, err = run_cli(
        capsys, "convert", tmp_path / "m.safetensors", tmp_path / "x.pt", "--max-shard-size", "1KB"
    )
    assert status == 2 and "names a torch.save file" in err
    status, _, err = run_cli(capsys, "convert", tmp_path / "m.pt", tmp_path / "y.pth")
    assert status == 2 and "both torch.save checkpoints" in err
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "y.pth").exists()


def test_convert_refuses_pickled_objects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.save({"w": torch.ones(2), "when": OrderedDict, "x": Path("a")}, tmp_path / "bad.pt")
    status, out, err = run_cli(capsys, "convert", tmp_path / "bad.pt", tmp_path / "out.safetensors")
    assert status == 1 and out == ""
    assert err.count("\n") == 1
    assert "weights_only=True" in err and "Unsupported global" in err
    assert not (tmp_path / "out.safetensors").exists()


def test_convert_reports_unsaveable_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # torch.load(weights_only=True) reads a float key; zerockpt stores only str and int keys.
    torch.save({"lrs": {0.5: torch.ones(1)}}, tmp_path / "keys.pt")
    status, _, err = run_cli(capsys, "convert", tmp_path / "keys.pt", tmp_path / "o.safetensors")
    assert status == 1 and err.count("\n") == 1
    assert "obj['lrs']" in err and "key 0.5 of type float" in err


def test_convert_legacy_torch_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = training_state()
    torch.save(state, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    status, _, err = run_cli(capsys, "convert", tmp_path / "old.pt", tmp_path / "o.safetensors")
    assert status == 0, err
    assert_trees_bitwise_equal(zerockpt.load(tmp_path / "o.safetensors"), state)


@pytest.mark.parametrize("name", ["out.safetensors", "out.pt"])
def test_convert_into_a_missing_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flat: dict[str, torch.Tensor], name: str
) -> None:
    zerockpt.save(flat, tmp_path / "m.safetensors")
    torch.save(flat, tmp_path / "m.pth")
    src = tmp_path / ("m.safetensors" if name.endswith(".pt") else "m.pth")
    dst = tmp_path / "nowhere" / name
    status, out, err = run_cli(capsys, "convert", src, dst)
    assert status == 1 and out == ""
    # torch.save names the file; zerockpt.save names the directory that is missing.
    missing = dst if name.endswith(".pt") else dst.parent
    assert err.startswith(f"zerockpt: error: {missing}: ") and err.count("\n") == 1
    assert "No such file or directory" in err


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (5 << 30, "5.0 GiB")],
)
def test_human_bytes(n: int, text: str) -> None:
    assert cli.human_bytes(n) == text


@pytest.mark.parametrize(("flag", "expected"), [("--progress", True), ("--no-progress", None)])
def test_convert_progress_flags(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    flat: dict[str, torch.Tensor],
    flag: str,
    expected: bool | None,
) -> None:
    calls: list[dict[str, Any]] = []
    real_save = zerockpt.save

    def save(obj: Any, path: Any, *, progress: bool = False, **kwargs: Any) -> None:
        calls.append({"progress": progress} if progress else {})
        real_save(obj, path, **kwargs)

    monkeypatch.setattr(zerockpt, "save", save)
    torch.save(flat, tmp_path / "m.pt")
    status, _, err = run_cli(capsys, "convert", tmp_path / "m.pt", tmp_path / "m.safetensors", flag)
    assert status == 0, err
    assert calls == [{"progress": True} if expected else {}]


def test_convert_no_progress_by_default_when_not_a_terminal(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    flat: dict[str, torch.Tensor],
) -> None:
    seen: list[bool] = []
    real_save = zerockpt.save

    def save(obj: Any, path: Any, *, progress: bool = False, **kwargs: Any) -> None:
        seen.append(progress)
        real_save(obj, path, **kwargs)

    monkeypatch.setattr(zerockpt, "save", save)
    monkeypatch.setattr(cli, "_PROGRESS_AUTO_BYTES", 0)  # any source counts as large
    torch.save(flat, tmp_path / "m.pt")
    assert run_cli(capsys, "convert", tmp_path / "m.pt", tmp_path / "m.safetensors")[0] == 0
    assert seen == [False]  # stderr is captured, not a terminal


@pytest.mark.parametrize(("threshold", "expected"), [(0, True), (10**12, False)])
def test_convert_progress_on_a_terminal_for_large_checkpoints(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    flat: dict[str, torch.Tensor],
    threshold: int,
    expected: bool,
) -> None:
    """On a terminal the bar is drawn (by the real save) only above the size threshold."""
    monkeypatch.setattr(cli, "_PROGRESS_AUTO_BYTES", threshold)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    torch.save(flat, tmp_path / "m.pt")
    status, _, err = run_cli(capsys, "convert", tmp_path / "m.pt", tmp_path / "m.safetensors")
    assert status == 0, err
    assert ("Saving m.safetensors" in err) == expected
    loaded = zerockpt.load(tmp_path / "m.safetensors")
    for name, t in flat.items():
        assert torch.equal(loaded[name], t)


def test_convert_dcp_with_progress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "dcp"
    state = {"w": torch.arange(12.0).view(3, 4), "step": 3}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=zerockpt.dcp.Writer(src), no_dist=True)
    status, _, err = run_cli(capsys, "convert", src, tmp_path / "out.safetensors", "--progress")
    assert status == 0, err
    assert "Saving out.safetensors" in err
    out = zerockpt.load(tmp_path / "out.safetensors")
    assert torch.equal(out["w"], state["w"]) and out["step"] == 3


# ---------------------------------------------------------------------------------------------
# Errors


def test_missing_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("inspect", "verify"):
        status, out, err = run_cli(capsys, command, tmp_path / "nope.safetensors")
        assert status == 1 and out == ""
        missing = tmp_path / "nope.safetensors"
        assert err == f"zerockpt: error: {missing}: No such file or directory\n"
    status, _, err = run_cli(capsys, "convert", tmp_path / "nope.pt", tmp_path / "o.safetensors")
    assert status == 1 and "No such file or directory" in err


def test_format_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", 10) + b"{not json}")
    status, out, err = run_cli(capsys, "inspect", tmp_path / "bad.safetensors")
    assert status == 1 and out == ""
    assert err.startswith("zerockpt: error: ") and err.count("\n") == 1
    assert "bad.safetensors" in err
    with pytest.raises(zerockpt.FormatError):
        cli.main(["--debug", "inspect", str(tmp_path / "bad.safetensors")])
    with pytest.raises(zerockpt.FormatError):  # --debug after the command works too
        cli.main(["verify", str(tmp_path / "bad.safetensors"), "--debug"])


@pytest.mark.parametrize(
    "error",
    [RuntimeError("internal state"), KeyError("k"), TypeError("bad call"), ValueError("v")],
    ids=lambda e: type(e).__name__,
)
def test_an_internal_error_prints_its_traceback_and_asks_for_a_report(
    error: Exception,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An exception that is not the user's doing (here injected into the command's own code)
    is a bug: not one user-error line, but the traceback and a request to report it."""
    path = tmp_path / "m.safetensors"
    zerockpt.save({"w": torch.ones(2)}, path)

    def broken(*args: Any) -> Any:
        raise error

    monkeypatch.setattr(cli, "checkpoint_kind", broken)
    for command in ("inspect", "verify"):
        status, out, err = run_cli(capsys, command, path)
        assert status == 1 and out == ""
        lines = err.splitlines()
        assert lines[0] == "Traceback (most recent call last):"
        assert any(line.startswith(type(error).__name__) for line in lines), err
        assert lines[-1] == f"zerockpt: error: {cli.BUG_REPORT}"
        assert "bug in zerockpt" in lines[-1] and "report" in lines[-1]
        with pytest.raises(type(error)):
            cli.main(["--debug", command, str(path)])


def test_a_user_mistake_is_one_line_not_a_bug_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """User mistakes (a missing file, a corrupted one, an existing destination, state that
    cannot be stored) print one line and exit nonzero, without a traceback."""
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", 10) + b"{not json}")
    (tmp_path / "exists.safetensors").write_bytes(b"")
    torch.save({"w": torch.ones(2)}, tmp_path / "m.pt")
    torch.save({"z": complex(1, 2)}, tmp_path / "size.pt")  # a Python complex: not storable
    for argv in (
        ["inspect", tmp_path / "missing.safetensors"],
        ["verify", tmp_path / "bad.safetensors"],
        ["convert", tmp_path / "m.pt", tmp_path / "exists.safetensors"],
        ["convert", tmp_path / "size.pt", tmp_path / "out.safetensors"],
    ):
        status, out, err = run_cli(capsys, *argv)
        assert status == 1 and out == "", argv
        assert err.startswith("zerockpt: error: ") and err.count("\n") == 1, (argv, err)
        assert "Traceback" not in err and cli.BUG_REPORT not in err
    assert not (tmp_path / "out.safetensors").exists()


def test_errors_from_a_shell(shells: dict[str, Any]) -> None:
    missing = shells["missing-path"]
    proc = shells["missing"]
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == f"zerockpt: error: {missing}: No such file or directory\n"

    proc = shells["missing-debug"]
    assert proc.returncode == 1
    assert proc.stderr.startswith("Traceback (most recent call last):")
    assert "FileNotFoundError" in proc.stderr


def test_verify_exit_status_from_a_shell(shells: dict[str, Any]) -> None:
    proc = shells["flipped"]
    assert proc.returncode == 1 and "  b\n" in proc.stdout and proc.stderr == ""


# ---------------------------------------------------------------------------------------------
# bench (zerockpt.bench provides it)


def test_bench_is_dispatched_to_zerockpt_bench(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = types.ModuleType("zerockpt.bench")
    seen: list[Any] = []

    def add_arguments(parser: Any) -> None:
        parser.add_argument("--runs", type=int, default=3)

    def run(args: Any) -> int:
        seen.append((args.runs, args.debug))
        return 7

    fake.add_arguments = add_arguments  # type: ignore[attr-defined]
    fake.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "zerockpt.bench", fake)
    assert run_cli(capsys, "bench", "--runs", "2")[0] == 7
    assert run_cli(capsys, "--debug", "bench")[0] == 7
    assert seen == [(2, False), (3, True)]
    status, _, err = run_cli(capsys, "bench", "--nope")
    assert status == 2 and "unrecognized arguments: --nope" in err


def test_bench_unavailable_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "zerockpt.bench", None)  # import fails
    status, out, err = run_cli(capsys, "bench", "--runs", "1")
    assert status == 1 and out == ""
    assert err.startswith("zerockpt: error: the bench subcommand is not available")
    assert err.count("\n") == 1
    # The other commands do not import it.
    assert run_cli(capsys, "--help")[0] == 0


# --- convert --force keeps the destination until the new one is complete (issue 18, point 8) ---


def test_convert_force_to_shards_over_a_file_keeps_it_when_the_source_is_corrupt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flat: dict[str, torch.Tensor]
) -> None:
    dst = tmp_path / "out"
    zerockpt.save(flat, dst)  # a file where the sharded directory goes
    before = dst.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10) + b'{"a": 1}  ')  # a corrupt source
    status, out, err = run_cli(capsys, "convert", bad, dst, "--max-shard-size", "1KB", "--force")
    assert status == 1 and out == "" and str(bad) in err
    assert dst.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "out"]
    # A good source replaces the file by the directory, once complete.
    src = tmp_path / "src.safetensors"
    zerockpt.save(flat, src)
    status, _, _ = run_cli(capsys, "convert", src, dst, "--max-shard-size", "1KB", "--force")
    assert status == 0 and dst.is_dir()
    assert_trees_bitwise_equal(zerockpt.load(dst, verify=True), flat)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["bad.safetensors", "out", "src.safetensors"]


# --- inspect never writes terminal escape sequences (issue 18, point 8) ---

HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x9b31m\u202eevil\nname\u2028\\x1b"


def assert_terminal_safe(text: str) -> None:
    lines = text.split("\n")
    assert all(line.isprintable() for line in lines), [ln for ln in lines if not ln.isprintable()]


def test_inspect_escapes_names_and_metadata(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "hostile.safetensors"
    t = torch.arange(3.0)
    zerockpt.save({HOSTILE: t, "plain": t}, path, metadata={HOSTILE: HOSTILE})
    status, out, err = run_cli(capsys, "inspect", path)
    assert status == 0 and err == ""
    assert_terminal_safe(out)
    # Shown escaped, as Python writes them; a literal backslash is doubled (unambiguous).
    shown = "\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\u202eevil\\nname\\u2028\\\\x1b"
    assert shown in out and "plain" in out
    status, out, _ = run_cli(capsys, "inspect", path, "--json")
    assert status == 0
    assert out.isascii() and all(c == "\n" or c.isprintable() for c in out)
    report = json.loads(out)
    assert HOSTILE in [t["name"] for t in report["tensors"]]
    assert report["metadata"][HOSTILE] == HOSTILE


def test_error_lines_are_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "dup.safetensors"
    body = json.dumps(
        {
            f"{HOSTILE}\u009b": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
            "x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        }
    ).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0")
    status, out, err = run_cli(capsys, "inspect", path)
    assert status == 1 and out == ""
    assert "zerockpt: error:" in err and str(path) in err
    assert_terminal_safe(err.rstrip("\n"))


def test_warnings_during_a_command_are_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.safetensors"
    zerockpt.save({"w": torch.ones(2)}, path)
    real = cli._file_report

    def report(*args: Any) -> Any:
        warnings.warn(f"shard {HOSTILE} has no checksums", UserWarning, stacklevel=1)
        return real(*args)

    monkeypatch.setattr(cli, "_file_report", report)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        status, _, err = run_cli(capsys, "inspect", path)
    assert status == 0 and "has no checksums" in err and "\\x1b]0;pwned" in err
    assert_terminal_safe(err.rstrip("\n"))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_never_hangs_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import signal

    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)

    def hung(signum: int, frame: Any) -> None:
        raise TimeoutError("the command hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        for command in ("inspect", "verify"):
            status, out, err = run_cli(capsys, command, fifo)
            assert status == 1 and out == "" and "not a regular file" in err
        status, _, err = run_cli(capsys, "convert", fifo, tmp_path / "out.safetensors")
        assert status == 1 and "not a regular file" in err
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
