"""Sharded checkpoints in the Hugging Face layout: save(..., max_shard_size=...), and load, open
and load_state_dict of a directory or index file (from zerockpt or any writer)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import zerockpt
from conftest import assert_bitwise_equal, random_tensor, temp_leftovers
from torch import nn
from zerockpt import _C, FormatError
from zerockpt.sharded import INDEX_NAME, SHARD_NAME_RE, parse_size, shard_name


def _state(n: int = 6, numel: int = 250, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` float32 tensors of ``numel`` elements (1000 bytes each), plus odd dtypes and views."""
    out = {f"layer.{i}.weight": random_tensor((numel,), torch.float32, seed + i) for i in range(n)}
    out["mask"] = random_tensor((3, 5), torch.bool, seed + 100)
    out["half"] = random_tensor((7,), torch.bfloat16, seed + 101)
    out["strided"] = random_tensor((6, 8), torch.int16, seed + 102).t()[::2]  # not contiguous
    out["empty"] = torch.empty(0, 4)
    return out


def _index(directory: Path) -> dict[str, Any]:
    return json.loads((directory / INDEX_NAME).read_text())  # type: ignore[no-any-return]


def _shards(directory: Path) -> list[str]:
    return sorted(p for p in os.listdir(directory) if SHARD_NAME_RE.fullmatch(p))


def _stored_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(loaded) == list(expected)
    for name, tensor in expected.items():
        assert_bitwise_equal(loaded[name], tensor)


def _no_leftovers(directory: Path) -> None:
    assert temp_leftovers(directory) == []
    assert [p for p in os.listdir(directory) if p.endswith(".zerockpt-staging")] == []


# --- max_shard_size ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (1, 1),
        (12345, 12345),
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("10KB", 10_000),
        ("2TB", 2 * 10**12),
        ("10GiB", 10 * 2**30),
        ("3MiB", 3 * 2**20),
        ("1KiB", 1024),
        ("5gib", 5 * 2**30),
        ("1.5GB", 1_500_000_000),
        (" 2 MB ", 2_000_000),
        ("100B", 100),
    ],
)
def test_parse_size(size: int | str, expected: int) -> None:
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["", "GB", "5", "5 G", "5XB", "-1GB", "1e3MB", "5Gb", "5gb", "0B"])
def test_parse_size_rejects(size: str) -> None:
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size(size)


@pytest.mark.parametrize("size", [0, -5])
def test_parse_size_rejects_non_positive(size: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        parse_size(size)


@pytest.mark.parametrize("size", [True, 1.5, None, b"5GB"])
def test_parse_size_rejects_types(size: Any) -> None:
    with pytest.raises(TypeError, match="max_shard_size"):
        parse_size(size)


def test_save_rejects_bad_max_shard_size_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_shard_size"):
        zerockpt.save(_state(), tmp_path / "ck", max_shard_size="lots")
    assert not (tmp_path / "ck").exists()


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "shards"),
    [("1GB", 1), (4000, 2), (3000, 3), (2000, 4), (1000, 7), (1, 10)],
)
def test_round_trip(tmp_path: Path, limit: int | str, shards: int) -> None:
    state = _state()
    directory = tmp_path / "ck"
    zerockpt.save(state, directory, max_shard_size=limit)
    names = [shard_name(k, shards) for k in range(1, shards + 1)]
    assert sorted(os.listdir(directory)) == [*names, INDEX_NAME]
    _no_leftovers(directory)
    # Greedy in saved order: each shard stays within the limit unless it holds one tensor.
    index = _index(directory)
    assert list(index["weight_map"]) == list(state)
    order = [index["weight_map"][n] for n in state]
    assert order == sorted(order)
    for name in names:
        held = [n for n, s in index["weight_map"].items() if s == name]
        size = sum(_stored_bytes(state[n]) for n in held)
        assert len(held) == 1 or size <= parse_size(limit)
    # zerockpt (directory, index file, eager) and torch's own view of the bytes agree.
    for source in (directory, directory / INDEX_NAME, str(directory)):
        _assert_same(zerockpt.load(source), state)
    _assert_same(zerockpt.load(directory, mmap=False, threads=3), state)
    _assert_same(zerockpt.load(directory, verify=True), state)
    with zerockpt.open(directory) as f:
        assert f.keys() == list(state)
        for name, tensor in state.items():
            assert_bitwise_equal(f[name], tensor)


def test_tensor_larger_than_the_limit_gets_its_own_shard(tmp_path: Path) -> None:
    state = {
        "a": torch.arange(10, dtype=torch.float32),  # 40 bytes
        "big": torch.arange(100, dtype=torch.float64),  # 800 bytes
        "b": torch.arange(10, dtype=torch.int32),  # 40 bytes
        "c": torch.arange(5, dtype=torch.int64),  # 40 bytes
    }
    directory = tmp_path / "ck"
    zerockpt.save(state, directory, max_shard_size=100)
    weight_map = _index(directory)["weight_map"]
    assert weight_map == {
        "a": shard_name(1, 3),
        "big": shard_name(2, 3),
        "b": shard_name(3, 3),
        "c": shard_name(3, 3),
    }
    _assert_same(zerockpt.load(directory), state)


def test_index_is_what_transformers_reads(tmp_path: Path) -> None:
    state = {k: v for k, v in _state().items() if k != "strided"}
    directory = tmp_path / "ck"
    zerockpt.save(state, directory, max_shard_size=2500, metadata={"note": "hi"})
    index = _index(directory)
    assert set(index) == {"metadata", "weight_map"}
    assert isinstance(index["metadata"]["total_size"], int)
    assert index["metadata"]["total_size"] == sum(_stored_bytes(t) for t in state.values())
    weight_map = index["weight_map"]
    assert all(isinstance(v, str) and SHARD_NAME_RE.fullmatch(v) for v in weight_map.values())
    # Each shard, read by safetensors itself, holds exactly what weight_map assigns to it.
    seen: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        loaded = safetensors.torch.load_file(directory / shard)
        assert set(loaded) == {n for n, s in weight_map.items() if s == shard}
        with safetensors.safe_open(directory / shard, "pt") as f:
            assert f.metadata()["format"] == "pt"
            assert f.metadata()["note"] == "hi"
        seen.update(loaded)
    _assert_same({n: seen[n] for n in state}, state)


def test_transformers_from_pretrained_reads_our_shards(tmp_path: Path) -> None:
    """A tiny GPT-2 (tied embeddings) saved by zerockpt in shards loads with from_pretrained."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=500,
        n_positions=32,
        eos_token_id=0,
        bos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    config.save_pretrained(tmp_path)
    zerockpt.save(model, tmp_path, max_shard_size="60KB")
    assert len(_shards(tmp_path)) > 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert_bitwise_equal(b, a), name
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_tied_tensors_share_a_shard_and_stay_tied(tmp_path: Path) -> None:
    embed = torch.randn(40, 8)  # 1280 bytes
    state = {
        "embed.weight": embed,
        "block.0": torch.randn(300),
        "block.1": torch.randn(300),
        "head.weight": embed,  # tied: saved last, but kept in embed.weight's shard
    }
    directory = tmp_path / "ck"
    # Different views whose memory overlaps: refused, as a single file's save refuses them.
    for view in (embed[3], embed.view(-1)[300:]):
        with pytest.raises(ValueError, match="overlaps"):
            zerockpt.save({**state, "view": view}, directory, max_shard_size=1300)
        _no_leftovers(directory)
        assert os.listdir(directory) == []
    zerockpt.save(state, directory, max_shard_size=1300)
    weight_map = _index(directory)["weight_map"]
    assert list(weight_map) == list(state)
    assert weight_map["head.weight"] == weight_map["embed.weight"] == shard_name(1, 3)
    loaded = zerockpt.load(directory)
    assert loaded["head.weight"] is loaded["embed.weight"]
    _assert_same(loaded, state)
    # Stored once: total_size counts the tied tensor once.
    assert _index(directory)["metadata"]["total_size"] == 1280 + 1200 + 1200
    with zerockpt.open(directory) as f:
        assert f.info("head.weight").alias_of == "embed.weight"


def test_disjoint_views_of_one_storage_may_split(tmp_path: Path) -> None:
    flat = torch.randn(600)
    state = {"first": flat[:300], "second": flat[300:]}
    zerockpt.save(state, tmp_path, max_shard_size=1200)
    assert len(_shards(tmp_path)) == 2
    _assert_same(zerockpt.load(tmp_path), state)


def test_module_and_nested_state(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Linear(32, 4))
    zerockpt.save(model, tmp_path / "m", max_shard_size=1000)
    loaded = zerockpt.load(tmp_path / "m")
    assert isinstance(loaded, OrderedDict)
    assert loaded._metadata == model.state_dict()._metadata  # type: ignore[attr-defined]
    _assert_same(loaded, dict(model.state_dict()))

    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 16)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optim": optimizer.state_dict(), "step": 7}
    zerockpt.save(state, tmp_path / "n", max_shard_size="2KB")
    assert len(_shards(tmp_path / "n")) > 2
    back: Any = zerockpt.load(tmp_path / "n", verify=True)
    assert back["step"] == 7
    assert back["optim"]["param_groups"] == optimizer.state_dict()["param_groups"]
    for k, v in optimizer.state_dict()["state"][0].items():
        assert_bitwise_equal(back["optim"]["state"][0][k], v)
    _assert_same(dict(back["model"]), dict(model.state_dict()))


def test_empty_state(tmp_path: Path) -> None:
    zerockpt.save({}, tmp_path, max_shard_size="1GB")
    assert _index(tmp_path)["weight_map"] == {}
    assert zerockpt.load(tmp_path) == {}
    zerockpt.save({"step": 3}, tmp_path, max_shard_size="1GB")
    assert zerockpt.load(tmp_path) == {"step": 3}


def test_existing_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    zerockpt.save({"a": torch.ones(2)}, path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="existing file"):
        zerockpt.save({"a": torch.zeros(2)}, path, max_shard_size="1GB")
    assert path.read_bytes() == before


def test_creates_missing_parents(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b" / "ck"
    zerockpt.save({"a": torch.ones(2)}, directory, max_shard_size="1GB")
    assert torch.equal(zerockpt.load(directory)["a"], torch.ones(2))


def test_directory_with_a_single_model_safetensors(tmp_path: Path) -> None:
    state = _state()
    zerockpt.save(state, tmp_path / "model.safetensors")
    _assert_same(zerockpt.load(tmp_path), state)
    with zerockpt.open(tmp_path) as f:
        assert f.index is None and f.files == (str(tmp_path / "model.safetensors"),)
    # An index wins over model.safetensors, as zerockpt writes it; the save warns, since
    # Hugging Face loaders would read model.safetensors.
    other = _state(seed=7)
    with pytest.warns(UserWarning, match="Hugging Face loaders read instead"):
        zerockpt.save(other, tmp_path, max_shard_size=3000)
    _assert_same(zerockpt.load(tmp_path), other)


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError, match=re.escape(INDEX_NAME)) as e:
        zerockpt.load(tmp_path)
    assert e.value.filename == str(tmp_path)


# --- open ---------------------------------------------------------------------------------------


def test_open(tmp_path: Path) -> None:
    state = _state()
    zerockpt.save(state, tmp_path, max_shard_size=2500, metadata={"step": "10"})
    with zerockpt.open(tmp_path / INDEX_NAME) as f:
        assert f.path == str(tmp_path / INDEX_NAME)
        assert len(f) == len(state) and list(f) == list(state)
        assert "layer.0.weight" in f and "nope" not in f and object() not in f
        assert f.files == tuple(str(tmp_path / s) for s in _shards(tmp_path))
        assert f.metadata()["step"] == "10"
        index = f.index
        assert index is not None and index["weight_map"] == _index(tmp_path)["weight_map"]
        info = f.info("half")
        assert info.dtype == torch.bfloat16 and info.shape == (7,) and info.nbytes == 14
        assert f.file_of("layer.5.weight") == str(tmp_path / index["weight_map"]["layer.5.weight"])
        assert_bitwise_equal(f.get_tensor("strided", mmap=False), state["strided"])
        with pytest.raises(KeyError):
            f.info("nope")
        with pytest.raises(KeyError):
            f.get_tensor("nope")
        result = f.verify()
        assert result.ok and result.has_checksums and result.tensors == len(state)
        assert "shards" in repr(f)
    with pytest.raises(ValueError, match="closed"):
        f.keys() and f.metadata()


# --- load_state_dict ----------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Linear(32, 16))
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight  # tied


def _net(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net()


def _equal_models(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("assign", [False, True])
def test_load_state_dict(tmp_path: Path, assign: bool) -> None:
    source = _net(0)
    zerockpt.save(source, tmp_path, max_shard_size=2000)
    assert len(_shards(tmp_path)) > 2
    target = _net(1)
    result = zerockpt.load_state_dict(target, tmp_path, assign=assign, verify=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert _equal_models(source, target)
    # Still tied: the same Parameter, or with assign (as torch does) two sharing the memory.
    assert target.head.weight.data_ptr() == target.embed.weight.data_ptr()
    assert (target.head.weight is target.embed.weight) is not assign


def _expect_same_outcome(directory: Path, state: dict[str, torch.Tensor], strict: bool) -> None:
    """zerockpt.load_state_dict(dir) behaves as torch's load_state_dict of the same state dict."""
    ours, theirs = _net(1), _net(1)
    try:
        expected: Any = theirs.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        with pytest.raises(RuntimeError) as got:
            zerockpt.load_state_dict(ours, directory, strict=strict)
        assert str(got.value) == str(e)
    else:
        assert zerockpt.load_state_dict(ours, directory, strict=strict) == expected
    assert _equal_models(ours, theirs)


@pytest.mark.parametrize("strict", [True, False])
def test_load_state_dict_errors_are_torchs(tmp_path: Path, strict: bool) -> None:
    state = dict(_net(0).state_dict())
    del state["body.0.bias"], state["body.2.weight"]  # missing
    state["body.9.weight"] = torch.ones(3)  # unexpected, in a shard of their own
    state["extra"] = torch.ones(300)
    zerockpt.save(state, tmp_path / "a", max_shard_size=1500)
    assert len(_shards(tmp_path / "a")) > 2
    _expect_same_outcome(tmp_path / "a", state, strict)

    state = dict(_net(0).state_dict())
    state["body.0.weight"] = torch.ones(5, 5)  # size mismatch
    state["body.2.bias"] = torch.ones(3)
    zerockpt.save(state, tmp_path / "b", max_shard_size=1500)
    _expect_same_outcome(tmp_path / "b", state, strict)


def test_load_state_dict_from_transformers_style_checkpoint(tmp_path: Path) -> None:
    """Tied names absent (as transformers saves them); no _metadata; sorted weight_map."""
    source = _net(0)
    state = {k: v for k, v in source.state_dict().items() if k != "head.weight"}
    _write_hf_style(tmp_path, state, per_shard=3)
    target = _net(1)
    with pytest.raises(
        RuntimeError, match=re.escape('Missing key(s) in state_dict: "head.weight"')
    ):
        zerockpt.load_state_dict(target, tmp_path)
    target = _net(1)
    result = zerockpt.load_state_dict(target, tmp_path / INDEX_NAME, strict=False)
    assert result.missing_keys == ["head.weight"] and result.unexpected_keys == []
    assert _equal_models(source, target)


# --- other writers ------------------------------------------------------------------------------


def _write_hf_style(directory: Path, state: dict[str, torch.Tensor], per_shard: int) -> None:
    """Shards by safetensors.torch.save_file and an index exactly as transformers writes it."""
    names = list(state)
    groups = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map: dict[str, str] = {}
    for k, group in enumerate(groups, start=1):
        file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        part = {n: state[n].contiguous() for n in group}
        safetensors.torch.save_file(part, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file))
    total = sum(_stored_bytes(t) for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def test_reads_a_transformers_style_checkpoint(tmp_path: Path) -> None:
    state = _state()
    _write_hf_style(tmp_path, state, per_shard=4)
    expected = {n: state[n] for n in sorted(state)}  # weight_map order: sorted, as written
    _assert_same(zerockpt.load(tmp_path), expected)
    _assert_same(zerockpt.load(tmp_path / INDEX_NAME, mmap=False), expected)
    with pytest.warns(UserWarning, match="store no checksums"):
        _assert_same(zerockpt.load(tmp_path, verify=True), expected)
    with zerockpt.open(tmp_path) as f:
        assert f.keys() == list(expected)
        assert f.metadata() == {"format": "pt"}
        result = f.verify()
        assert result.ok and not result.has_checksums
    result = zerockpt.verify(tmp_path)
    assert result.ok and not result.has_checksums and result.tensors == len(state)


# --- integrity ----------------------------------------------------------------------------------


def _flip_byte(path: Path, name: str) -> None:
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    begin, _ = json.loads(raw[8 : 8 + n])[name]["data_offsets"]
    raw[8 + n + begin] ^= 0x01
    path.write_bytes(bytes(raw))


def test_verify_catches_a_flipped_byte(tmp_path: Path) -> None:
    source = _net(0)
    zerockpt.save(source, tmp_path, max_shard_size=2000)
    weight_map = _index(tmp_path)["weight_map"]
    shard = tmp_path / weight_map["body.2.weight"]
    assert shard.name != shard_name(1, len(_shards(tmp_path)))
    _flip_byte(shard, "body.2.weight")

    zerockpt.load(tmp_path)  # unchecked: loads
    with pytest.raises(zerockpt.ChecksumError, match=r"body\.2\.weight"):
        zerockpt.load(tmp_path, verify=True)
    result = zerockpt.verify(tmp_path)
    assert not result.ok and result.failed == ("body.2.weight",)
    target = _net(1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(zerockpt.ChecksumError, match=r"body\.2\.weight"):
        zerockpt.load_state_dict(target, tmp_path, verify=True)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_shard_from_another_save_is_detected(tmp_path: Path) -> None:
    zerockpt.save(_state(seed=1), tmp_path / "a", max_shard_size=3000)
    zerockpt.save(_state(seed=2), tmp_path / "b", max_shard_size=3000)
    shard = _shards(tmp_path / "a")[1]
    shutil.copy(tmp_path / "b" / shard, tmp_path / "a" / shard)
    with pytest.raises(zerockpt.FormatError, match="written by another save"):
        zerockpt.load(tmp_path / "a")
    with pytest.raises(zerockpt.FormatError, match="written by another save"):
        zerockpt.open(tmp_path / "a")


# --- re-saving and interrupted saves ------------------------------------------------------------


def test_resave_with_fewer_shards_removes_stale_ones(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model-notes.safetensors").write_bytes(b"x")  # not a shard name: kept
    zerockpt.save(_state(), tmp_path, max_shard_size=1000)
    assert len(_shards(tmp_path)) == 7
    state = _state(seed=5)
    zerockpt.save(state, tmp_path, max_shard_size=4000)
    assert _shards(tmp_path) == [shard_name(1, 2), shard_name(2, 2)]
    assert sorted(os.listdir(tmp_path)) == sorted(
        [shard_name(1, 2), shard_name(2, 2), INDEX_NAME, "config.json", "model-notes.safetensors"]
    )
    _assert_same(zerockpt.load(tmp_path), state)


def test_resave_keeps_file_modes(tmp_path: Path) -> None:
    zerockpt.save(_state(), tmp_path, max_shard_size=3000)
    for name in [*_shards(tmp_path), INDEX_NAME]:
        os.chmod(tmp_path / name, 0o640)
    zerockpt.save(_state(seed=3), tmp_path, max_shard_size=3000)
    for name in [*_shards(tmp_path), INDEX_NAME]:
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


@pytest.mark.parametrize("new_limit", [3000, 1000], ids=["same-shard-count", "more-shards"])
def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path: Path, new_limit: int) -> None:
    old = _state(seed=1)
    zerockpt.save(old, tmp_path, max_shard_size=3000)
    before = _snapshot(tmp_path)
    new = _state(seed=2)
    failures = 0
    for after in range(0, 200):
        _C._inject_fault("write", errno.ENOSPC, after=after)
        try:
            zerockpt.save(new, tmp_path, max_shard_size=new_limit)
        except OSError as e:
            assert e.errno == errno.ENOSPC
            assert e.filename is not None and ".zerockpt-staging" not in e.filename
            failures += 1
        else:
            break
        finally:
            _C._clear_faults()
        assert _snapshot(tmp_path) == before  # byte for byte, nothing added or removed
        _no_leftovers(tmp_path)
        _assert_same(zerockpt.load(tmp_path, verify=True), old)
    assert failures > 3  # faults hit several shards and the index
    _assert_same(zerockpt.load(tmp_path, verify=True), new)
    _no_leftovers(tmp_path)


def test_killed_save_leftovers_are_removed(tmp_path: Path) -> None:
    # What a save killed mid-way leaves: its staging directory, unlocked once it died.
    stale = tmp_path / f".{INDEX_NAME}.999999.0123456789abcdef.zerockpt-staging"
    stale.mkdir()
    (stale / shard_name(1, 2)).write_bytes(b"partial")
    zerockpt.save(_state(), tmp_path, max_shard_size=3000)
    assert not stale.exists()
    _no_leftovers(tmp_path)


# --- malformed indexes --------------------------------------------------------------------------


def _valid_checkpoint(directory: Path) -> dict[str, Any]:
    state = {"a": torch.ones(50), "b": torch.zeros(50), "c": torch.ones(100)}
    zerockpt.save(state, directory, max_shard_size=400)
    return _index(directory)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe{}", "not JSON"),
        (b"[]", "expected a JSON object"),
        (b"{}", "'weight_map' must be"),
        (b'{"weight_map": []}', "'weight_map' must be"),
        (b'{"weight_map": {"a": 1}}', "not a shard file name"),
        (b'{"weight_map": {"a": "../model-00001-of-00002.safetensors"}}', "not a plain file"),
        (b'{"weight_map": {"a": "sub/x.safetensors"}}', "not a plain file"),
        (b'{"weight_map": {"a": ".."}}', "not a plain file"),
        (b'{"weight_map": {"a": ""}}', "not a plain file"),
        (b'{"weight_map": {"a": "/etc/passwd"}}', "not a plain file"),
        (b'{"weight_map": {"a": "x", "a": "y"}}', "duplicate key"),
        (b'{"metadata": {"total_size": NaN}, "weight_map": {}}', "NaN is not JSON"),
        (b'{"metadata": [], "weight_map": {}}', "'metadata' must be"),
        (b'{"metadata": {"total_size": "7"}, "weight_map": {}}', "total_size"),
        (b'{"metadata": {"total_size": -1}, "weight_map": {}}', "total_size"),
        (b'{"metadata": {"zerockpt.structure": {}}, "weight_map": {}}', "must be a string"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
    ],
)
def test_malformed_index(tmp_path: Path, raw: bytes, match: str) -> None:
    (tmp_path / INDEX_NAME).write_bytes(raw)
    for call in (zerockpt.load, zerockpt.open, lambda p: zerockpt.load_state_dict(_net(0), p)):
        with pytest.raises(zerockpt.FormatError, match=match) as e:
            call(tmp_path)
        assert str(tmp_path / INDEX_NAME) in str(e.value)


def test_index_and_shards_disagree(tmp_path: Path) -> None:
    index = _valid_checkpoint(tmp_path)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 2

    def check(weight_map: dict[str, str], error: type[Exception], match: str) -> None:
        (tmp_path / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        for call in (zerockpt.load, zerockpt.open):
            with pytest.raises(error, match=match):
                call(tmp_path)
        model = nn.Linear(10, 10)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(error, match=match):
            zerockpt.load_state_dict(model, tmp_path)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    assert index["weight_map"] == {"a": files[0], "b": files[0], "c": files[1]}
    # A shard listed but missing: its name is in the error.
    check({"a": files[0], "b": files[0], "c": shard_name(9, 9)}, FileNotFoundError, "00009")
    # A tensor listed but absent from its shard.
    check({"a": files[0], "b": files[0], "c": files[1], "d": files[1]}, FormatError, "'d'")
    # A tensor in a shard but not in weight_map.
    check({"a": files[0], "c": files[1]}, FormatError, "holds 'b', which weight_map does not")
    # A tensor assigned to the wrong shard.
    check({"a": files[0], "b": files[1], "c": files[1]}, FormatError, "assigns 'b' to other shards")
    # A shard that is not safetensors.
    (tmp_path / files[1]).write_bytes(b"\x00" * 4)
    check({"a": files[0], "b": files[0], "c": files[1]}, FormatError, files[1])


def test_no_warnings_on_a_clean_round_trip(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zerockpt.save(_net(0), tmp_path, max_shard_size=2000)
        zerockpt.load(tmp_path, verify=True)
        zerockpt.load_state_dict(_net(1), tmp_path, verify=True)
