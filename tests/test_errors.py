"""Bad input gets a clear exception naming the file and the key or offset, never a crash."""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
import zerockpt
from conftest import craft, temp_leftovers
from zerockpt import FormatError


def f32(shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


def expect_format_error(path: Path, *words: str) -> FormatError:
    for loader in (
        lambda: zerockpt.load(path),
        lambda: zerockpt.load(path, mmap=False),
        lambda: zerockpt.open(path),
    ):
        with pytest.raises(FormatError) as info:
            loader()
        message = str(info.value)
        assert str(path) in message
        for word in words:
            assert word in message, f"{word!r} not in {message!r}"
    return info.value


def test_format_error_is_a_value_error() -> None:
    assert issubclass(FormatError, ValueError)
    assert FormatError.__module__ == "zerockpt"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError) as info:
        zerockpt.load(path)
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == str(path)
    with pytest.raises(FileNotFoundError):
        zerockpt.open(path)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError) as info:
        zerockpt.load(tmp_path)
    assert info.value.filename == str(tmp_path)
    with pytest.raises(IsADirectoryError) as info:
        zerockpt.save({"a": torch.ones(1)}, tmp_path)
    assert info.value.filename == str(tmp_path)


def test_not_a_regular_file() -> None:
    with pytest.raises(FormatError, match="not a regular file"):
        zerockpt.load("/dev/null")


def test_empty_and_tiny_files(tmp_path: Path) -> None:
    for size in (0, 7):
        path = tmp_path / f"s{size}.safetensors"
        path.write_bytes(b"\0" * size)
        expect_format_error(path, f"file is {size} bytes", "too small")


def test_truncated_header(tmp_path: Path) -> None:
    body = json.dumps({"a": f32([1], 0, 4)}).encode()
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body[:10])
    expect_format_error(path, f"header length {len(body)}", "runs past the end")


def test_header_length_beyond_file(tmp_path: Path) -> None:
    path = craft(tmp_path / "h.safetensors", {}, length=1_000_000)
    expect_format_error(path, "header length 1000000", "runs past the end")


@pytest.mark.parametrize("length", [100_000_001, 2**63, 2**64 - 1])
def test_header_over_100_mb_or_absurd(tmp_path: Path, length: int) -> None:
    path = craft(tmp_path / "big.safetensors", {}, length=length)
    expect_format_error(path, f"header length {length}", "exceeds")


def test_invalid_utf8(tmp_path: Path) -> None:
    body = b'{"a\xff":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    path = craft(tmp_path / "u.safetensors", None, b"\0" * 4, raw_header=body)
    expect_format_error(path, "not valid UTF-8", "byte 11")


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"a" 1}', ["invalid header JSON at byte 13", "expected ':'"]),
        (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}', ["invalid header JSON"]),
        (b"[]", ["must be a JSON object"]),
        (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}} x', ["unexpected data"]),
        (b'{"a":{"dtype":"F32","shape":[01],"data_offsets":[0,4]}}', ["leading zero"]),
        (b'{"a\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', ["surrogate"]),
        (
            b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":'
            + b"[" * 100
            + b"]" * 100
            + b"}}",
            ["nested too deeply"],
        ),
    ],
    ids=["syntax", "unterminated", "not-object", "trailing", "leading-zero", "surrogate", "deep"],
)
def test_invalid_json(tmp_path: Path, body: bytes, words: list[str]) -> None:
    path = craft(tmp_path / "j.safetensors", None, b"\0" * 4, raw_header=body)
    expect_format_error(path, *words)


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        (5, ["'a'", "not a JSON object"]),
        ({"dtype": 5, "shape": [1], "data_offsets": [0, 4]}, ["'a'", "dtype is not a string"]),
        ({"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}, ["'a'", "shape is not a list"]),
        ({"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}, ["fraction"]),
        ({"dtype": "F32", "shape": [1e0], "data_offsets": [0, 4]}, ["fraction or exponent"]),
        ({"dtype": "F32", "shape": [None], "data_offsets": [0, 4]}, ["non-negative integer"]),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, ["negative"]),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0]}, ["'a'", "2 entries"]),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}, ["'a'", "2 entries"]),
        ({"dtype": "F32", "shape": [1], "data_offsets": "0"}, ["'a'", "not a list"]),
        ({"shape": [1], "data_offsets": [0, 4]}, ["'a'", "missing 'dtype'"]),
        ({"dtype": "F32", "data_offsets": [0, 4]}, ["'a'", "missing 'shape'"]),
        ({"dtype": "F32", "shape": [1]}, ["'a'", "missing 'data_offsets'"]),
        ({"dtype": "F128", "shape": [1], "data_offsets": [0, 4]}, ["'a'", "unknown dtype 'F128'"]),
        ({"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}, ["negative"]),
        ({"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}, ["'a'", "end before begin"]),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0, 2**64]}, ["64 bits"]),
    ],
)
def test_wrong_types_in_tensor_entries(tmp_path: Path, entry: Any, words: list[str]) -> None:
    path = craft(tmp_path / "w.safetensors", {"a": entry}, b"\0" * 4)
    expect_format_error(path, *words)


@pytest.mark.parametrize(
    ("metadata", "words"),
    [
        ({"k": 5}, ["__metadata__ value for 'k' is not a string"]),
        ([], ["__metadata__ must be an object"]),
        ("x", ["__metadata__ must be an object"]),
        ({"k": {"nested": "x"}}, ["not a string"]),
    ],
)
def test_bad_metadata(tmp_path: Path, metadata: Any, words: list[str]) -> None:
    path = craft(
        tmp_path / "m.safetensors", {"__metadata__": metadata, "a": f32([1], 0, 4)}, b"\0" * 4
    )
    expect_format_error(path, *words)


def test_duplicate_keys(tmp_path: Path) -> None:
    entry = b'{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    body = b'{"a":' + entry + b',"a":' + entry + b"}"
    path = craft(tmp_path / "d.safetensors", None, b"\0" * 4, raw_header=body)
    expect_format_error(path, "duplicate tensor 'a'")
    body = b'{"__metadata__":{"k":"1","k":"2"},"a":' + entry + b"}"
    path = craft(tmp_path / "dm.safetensors", None, b"\0" * 4, raw_header=body)
    expect_format_error(path, "duplicate __metadata__ key 'k'")
    body = b'{"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    path = craft(tmp_path / "df.safetensors", None, b"\0" * 4, raw_header=body)
    expect_format_error(path, "duplicate field 'dtype'")


def test_overlapping_offsets(tmp_path: Path) -> None:
    header = {"a": f32([2], 0, 8), "b": f32([2], 4, 12)}
    path = craft(tmp_path / "o.safetensors", header, b"\0" * 12)
    expect_format_error(path, "'b'", "data offset 4", "overlaps tensor 'a'")


def test_out_of_range_offsets(tmp_path: Path) -> None:
    path = craft(tmp_path / "r.safetensors", {"a": f32([250], 0, 1000)}, b"\0" * 40)
    expect_format_error(path, "'a'", "[0, 1000]", "past the end of the data (40 bytes")


def test_truncated_data(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    zerockpt.save({"a": torch.ones(1000)}, path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1)
    expect_format_error(path, "'a'", "past the end of the data")


def test_holes(tmp_path: Path) -> None:
    path = craft(
        tmp_path / "h.safetensors", {"a": f32([1], 0, 4), "b": f32([1], 8, 12)}, b"\0" * 12
    )
    expect_format_error(path, "hole", "[4, 8)", "'b'")
    path = craft(tmp_path / "t.safetensors", {"a": f32([1], 0, 4)}, b"\0" * 9)
    expect_format_error(path, "hole", "[4, 9) at the end")


def test_shape_and_offsets_disagree(tmp_path: Path) -> None:
    path = craft(tmp_path / "s.safetensors", {"a": f32([3], 0, 8)}, b"\0" * 8)
    expect_format_error(path, "'a'", "need 12 bytes", "hold 8")


@pytest.mark.parametrize("shape", [[2**40, 2**40], [2**63, 4], [2**64 - 1, 2]])
def test_shape_overflow(tmp_path: Path, shape: list[int]) -> None:
    path = craft(tmp_path / "x.safetensors", {"a": f32(shape, 0, 4)}, b"\0" * 4)
    expect_format_error(path, "'a'", "overflows")


def test_huge_dimension_with_zero_elements(tmp_path: Path) -> None:
    # Valid safetensors (zero bytes), but torch sizes are int64: refused when made a tensor.
    path = craft(tmp_path / "z.safetensors", {"a": f32([0, 2**63], 0, 0)})
    for mmap in (True, False):
        with pytest.raises(
            FormatError, match=r"'a': shape \[0, 9223372036854775808\] does not fit torch's int64"
        ):
            zerockpt.load(path, mmap=mmap)
    with zerockpt.open(path) as f, pytest.raises(FormatError, match="does not fit torch's int64"):
        f["a"]


def test_too_many_dimensions(tmp_path: Path) -> None:
    path = craft(tmp_path / "r.safetensors", {"a": f32([1] * 2000, 0, 4)}, b"\0" * 4)
    expect_format_error(path, "more than 1024 dimensions")


def test_dtype_without_torch_equivalent(tmp_path: Path) -> None:
    for dtype in ("F6_E2M3", "F6_E3M2"):
        path = craft(
            tmp_path / "f6.safetensors",
            {"a": {"dtype": dtype, "shape": [4], "data_offsets": [0, 3]}},
            b"\0\0\0",
        )
        with zerockpt.open(path) as f:  # the header is valid: it can be inspected
            assert f.info("a").format_dtype == dtype and f.info("a").dtype is None
            with pytest.raises(TypeError, match=f"'a' has dtype {dtype}"):
                f["a"]
        with pytest.raises(TypeError, match=f"'a' has dtype {dtype}"):
            zerockpt.load(path)


def test_crafted_alias_table(tmp_path: Path) -> None:
    base = {"a": f32([1], 0, 4)}
    for table, words in [
        ("not json", ["invalid alias table"]),
        ('[["b","zz",0]]', ["alias 'b' refers to 'zz'"]),
        ('[["a","a",0]]', ["duplicate name"]),
        ('[["b","a",5]]', ["invalid position"]),
        ('{"b":"a"}', ["invalid alias table"]),
    ]:
        header = {"__metadata__": {"zerockpt.aliases": table}, **base}
        path = craft(tmp_path / "al.safetensors", header, b"\0" * 4)
        expect_format_error(path, *words)


def test_save_argument_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    with pytest.raises(TypeError, match=r"obj\['w'\]\[1\] is a builtins.object"):
        zerockpt.save({"w": [1.0, object()]}, path)
    with pytest.raises(TypeError, match=r"obj has a key \(1, 2\) of type tuple"):
        zerockpt.save({(1, 2): torch.ones(1)}, path)  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="got set"):
        zerockpt.save({torch.ones(1)}, path)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'s' has layout Sparse"):
        zerockpt.save({"s": torch.eye(3).to_sparse()}, path)
    with pytest.raises(ValueError, match="'m' is on meta, which holds no data"):
        zerockpt.save({"m": torch.empty(3, device="meta")}, path)
    with pytest.raises(ValueError, match="reserved"):
        zerockpt.save({"a": torch.ones(1)}, path, metadata={"zerockpt.version": "9"})
    with pytest.raises(TypeError, match="metadata must map str to str"):
        zerockpt.save({"a": torch.ones(1)}, path, metadata={"k": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="threads"):
        zerockpt.save({"a": torch.ones(1)}, path, threads=0)
    with pytest.raises(FileNotFoundError) as info:
        zerockpt.save({"a": torch.ones(1)}, tmp_path / "no" / "dir.safetensors")
    assert info.value.filename == str(tmp_path / "no")  # the directory that is missing
    assert not path.exists() and temp_leftovers(tmp_path) == []


def test_load_device_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    zerockpt.save({"a": torch.ones(1)}, path)
    with pytest.raises(ValueError, match="device='meta' holds no data"):
        zerockpt.load(path, device="meta")
    with pytest.raises(RuntimeError):
        zerockpt.load(path, device="nonsense")
    for bad in (1 << 20, True, 1.5e9, -1):
        with pytest.raises(ValueError, match="staging_bytes must be an int of at least 8388608"):
            zerockpt.load(path, staging_bytes=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="staging_bytes"):
            zerockpt.save({"a": torch.ones(1)}, path, staging_bytes=bad)  # type: ignore[arg-type]


def test_no_descriptor_leaks_on_errors(tmp_path: Path) -> None:
    bad = craft(tmp_path / "bad.safetensors", {"a": f32([3], 0, 8)}, b"\0" * 8)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        with pytest.raises(FormatError):
            zerockpt.load(bad)
        with pytest.raises(OSError):
            zerockpt.save({"a": torch.ones(1)}, tmp_path / "missing" / "x")
    assert len(os.listdir("/proc/self/fd")) == before
