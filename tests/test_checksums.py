"""Per-tensor CRC-32C: the checksum itself, what save stores, and what verify/load detect.

Oracles: a pure-Python bitwise CRC-32C (checked against the RFC 3720 vectors) for the function
itself; for files, the header parsed with json/struct here and each tensor's bytes checksummed
independently (Python, or the portable table implementation once it has been checked against
Python), and torch for the tensors' logical bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import struct
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch as st
import torch
import zerockpt
from conftest import (
    DTYPES,
    assert_bitwise_equal,
    assert_dicts_bitwise_equal,
    craft,
    random_tensor,
    raw_bytes,
    read_header,
)
from safetensors import safe_open
from torch import nn
from zerockpt import _C, ChecksumError, FormatError

KEY = "zerockpt.crc32c"
MiB = 1 << 20
CHUNK = 8 * MiB  # the writer's and verifier's piece size (io_engine.h kChunkBytes)

# ---------------------------------------------------------------------------------------------
# Reference CRC-32C (Castagnoli, reflected polynomial 0x82F63B78, init and final xor ~0).

POLY = 0x82F63B78


def crc32c_bitwise(data: bytes, crc: int = 0) -> int:
    """One bit at a time, straight from the definition."""
    r = crc ^ 0xFFFFFFFF
    for b in data:
        r ^= b
        for _ in range(8):
            r = (r >> 1) ^ (POLY & -(r & 1))
    return r ^ 0xFFFFFFFF


def crc32c_prefixes(data: bytes) -> list[int]:
    """crc32c_bitwise(data[:n]) for every n in 0..len(data), in one pass."""
    out = [0]
    r = 0xFFFFFFFF
    for b in data:
        r ^= b
        for _ in range(8):
            r = (r >> 1) ^ (POLY & -(r & 1))
        out.append(r ^ 0xFFFFFFFF)
    return out


def _byte_table() -> list[int]:
    table = []
    for b in range(256):
        r = b
        for _ in range(8):
            r = (r >> 1) ^ (POLY & -(r & 1))
        table.append(r)
    return table


TABLE = _byte_table()


def crc32c_table(data: bytes, crc: int = 0) -> int:
    """Byte at a time with a 256-entry table (checked against the bitwise one below)."""
    r = crc ^ 0xFFFFFFFF
    t = TABLE
    for b in data:
        r = t[(r ^ b) & 0xFF] ^ (r >> 8)
    return r ^ 0xFFFFFFFF


def ref_crc(data: bytes) -> int:
    """Reference CRC for file contents: Python up to 1 MiB, else the portable C++ table code
    (checked against Python on megabytes in test_portable_matches_python_on_megabytes)."""
    if len(data) <= MiB:
        return crc32c_table(data)
    return _C._crc32c(data, portable=True)


def hw(data: bytes, crc: int = 0) -> int:
    return _C._crc32c(data, crc)


def portable(data: bytes, crc: int = 0) -> int:
    return _C._crc32c(data, crc, portable=True)


IMPLS = {"hardware": hw, "portable": portable}
impl_param = pytest.mark.parametrize("impl", list(IMPLS), ids=list(IMPLS))

RFC3720 = [
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (b"123456789", 0xE3069283),
    (b"", 0),
]


def _rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# ---------------------------------------------------------------------------------------------
# 1. The function


def test_backend_is_named() -> None:
    assert _C.CRC32C_BACKEND in ("sse4.2", "armv8-crc", "portable")
    assert _C.CHECKSUM_KEY == KEY


@pytest.mark.parametrize(("data", "expected"), RFC3720, ids=lambda v: f"{v!r}"[:20])
def test_known_vectors(data: bytes, expected: int) -> None:
    assert crc32c_bitwise(data) == expected
    assert crc32c_table(data) == expected
    assert hw(data) == expected
    assert portable(data) == expected


def test_table_reference_matches_bitwise() -> None:
    data = _rand(4099, 1)
    assert crc32c_prefixes(data)[-1] == crc32c_bitwise(data)
    for n in (0, 1, 7, 8, 9, 100, 1000, 4099):
        assert crc32c_table(data[:n]) == crc32c_bitwise(data[:n])
        assert crc32c_table(data[n:], crc32c_table(data[:n])) == crc32c_bitwise(data)


# Both 3-way block sizes of the hardware loop (3 * 256 and 3 * 8192 bytes) and their multiples.
BOUNDARY_LENGTHS = sorted(
    {n + d for n in (3 * 256, 6 * 256, 3 * 8192, 6 * 8192) for d in (-9, -8, -1, 0, 1, 7, 8)}
    | {24575, 24576, 24577, 767, 768, 769}
)


@impl_param
def test_every_length_matches_bitwise_reference(impl: str) -> None:
    f = IMPLS[impl]
    data = _rand(6 * 8192 + 64, 2)
    prefix_crcs = crc32c_prefixes(data)
    lengths = [
        *range(5001),
        *BOUNDARY_LENGTHS,
        *random.Random(3).sample(range(5001, len(data)), 200),
    ]
    bad = [n for n in lengths if f(data[:n]) != prefix_crcs[n]]
    assert bad == []


@impl_param
def test_start_offsets_and_continuation(impl: str) -> None:
    # A bytes object's buffer always has the same alignment (slices are copies), so start
    # *addresses* are varied through files below (test_misaligned_*); here every split point
    # continues a CRC at each phase relative to 8-byte words and the 3-way blocks.
    f = IMPLS[impl]
    data = _rand(3 * 8192 * 2 + 40, 4)
    whole = crc32c_bitwise(data)
    prefix_crcs = crc32c_prefixes(data)
    splits = [*range(16), *(n + d for n in (768, 24576, 24576 + 768) for d in range(-3, 17))]
    for k in splits:
        head = f(data[:k])
        assert head == prefix_crcs[k], k
        assert f(data[k:], head) == whole, k
        assert f(data[k:], prefix_crcs[k]) == whole, k
    # Suffixes starting at offsets 0..15 against the reference (their own CRCs, from 0).
    for k in range(16):
        assert f(data[k : k + 30000]) == crc32c_table(data[k : k + 30000]), k
    # Continuation in many pieces.
    rng = random.Random(5)
    cuts = sorted(rng.sample(range(1, len(data)), 40))
    crc = 0
    for lo, hi in zip([0, *cuts], [*cuts, len(data)], strict=True):
        crc = f(data[lo:hi], crc)
    assert crc == whole


def test_hardware_and_portable_agree_on_random_buffers() -> None:
    rng = random.Random(6)
    for _ in range(300):
        n = rng.randrange(0, 70000)
        data = rng.randbytes(n)
        seed = rng.getrandbits(32)
        assert hw(data, seed) == portable(data, seed), n


def test_portable_matches_python_on_megabytes() -> None:
    data = _rand(3 * MiB + 13, 7)
    expected = crc32c_table(data)
    assert portable(data) == expected
    assert hw(data) == expected


def test_combine() -> None:
    rng = random.Random(8)
    data = _rand(3 * 8192 * 2 + 99, 9)
    for _ in range(60):
        k = rng.randrange(0, len(data) + 1)
        a, b = data[:k], data[k:]
        assert _C._crc32c_combine(hw(a), hw(b), len(b)) == crc32c_table(data)
    # Edge lengths: empty halves.
    assert _C._crc32c_combine(hw(data), 0, 0) == hw(data)
    assert _C._crc32c_combine(0, hw(data), len(data)) == hw(data)
    # A long run (the writer combines 8 MiB pieces): 20 MiB of zeros after some bytes.
    zeros = bytes(20 * MiB + 3)
    assert _C._crc32c_combine(hw(data), hw(zeros), len(zeros)) == hw(data + zeros)
    # Associativity over three pieces.
    a, b, c = data[:100], data[100:30000], data[30000:]
    ab = _C._crc32c_combine(hw(a), hw(b), len(b))
    bc = _C._crc32c_combine(hw(b), hw(c), len(c))
    assert _C._crc32c_combine(ab, hw(c), len(c)) == _C._crc32c_combine(hw(a), bc, len(b) + len(c))


GF2_P = 0x11EDC6F41  # x^32 + the Castagnoli polynomial, not reflected


def _rev32(v: int) -> int:
    return int(f"{v:032b}"[::-1], 2)


def _mulmod(a: int, b: int) -> int:
    r = 0
    while b:
        if b & 1:
            r ^= a
        b >>= 1
        a <<= 1
        if a >> 32:
            a ^= GF2_P
    return r


def combine_reference(crc_a: int, crc_b: int, len_b: int) -> int:
    """crc(A + B) = crc(A) * x^(8 len_b) + crc(B) mod P (the ~0 pre/post conditioning cancels
    in the sum), with polynomials as Python ints (bit i = coefficient of x^i)."""
    power, base, e = 1, 2, 8 * len_b
    while e:
        if e & 1:
            power = _mulmod(power, base)
        base = _mulmod(base, base)
        e >>= 1
    return _rev32(_mulmod(_rev32(crc_a), power)) ^ crc_b


def test_combine_reference_is_sound() -> None:
    data = _rand(5000, 13)
    for k in (0, 1, 999, 4999, 5000):
        a, b = data[:k], data[k:]
        assert combine_reference(crc32c_table(a), crc32c_table(b), len(b)) == crc32c_table(data)


COMBINE_LENGTHS = [0, 1, 7, 8, 4096, CHUNK, CHUNK + 1, (1 << 32) + 7, (1 << 40) + 3, (1 << 61) - 1]


@pytest.mark.parametrize("len_b", COMBINE_LENGTHS)
def test_combine_any_length(len_b: int) -> None:
    rng = random.Random(len_b)
    for _ in range(5):
        a, b = rng.getrandbits(32), rng.getrandbits(32)
        assert _C._crc32c_combine(a, b, len_b) == combine_reference(a, b, len_b)


@pytest.mark.parametrize("len_b", [1 << 61, (1 << 64) - 1])
def test_combine_lengths_of_2_pow_61_and_more(len_b: int) -> None:
    a, b = 0x12345678, 0x9ABCDEF0
    assert _C._crc32c_combine(a, b, len_b) == combine_reference(a, b, len_b)


# ---------------------------------------------------------------------------------------------
# File helpers


@dataclasses.dataclass
class Entry:
    name: str
    begin: int  # in the data region
    end: int


@dataclasses.dataclass
class Parsed:
    data_start: int
    header: dict[str, Any]
    metadata: dict[str, str]
    entries: list[Entry]  # header order
    data: bytes

    def by_offsets(self) -> list[Entry]:
        return sorted(self.entries, key=lambda e: (e.begin, e.end))  # stable

    def entry(self, name: str) -> Entry:
        return next(e for e in self.entries if e.name == name)

    def bytes_of(self, name: str) -> bytes:
        e = self.entry(name)
        return self.data[e.begin : e.end]

    def stored_crcs(self) -> dict[str, int]:
        text = self.metadata[KEY]
        order = self.by_offsets()
        assert len(text) == 8 * len(order)
        return {e.name: int(text[8 * i : 8 * i + 8], 16) for i, e in enumerate(order)}


def parse(path: Path) -> Parsed:
    n, header, _ = read_header(path)
    data = path.read_bytes()[8 + n :]
    metadata = header.get("__metadata__") or {}
    entries = [
        Entry(k, v["data_offsets"][0], v["data_offsets"][1])
        for k, v in header.items()
        if k != "__metadata__"
    ]
    return Parsed(8 + n, header, metadata, entries, data)


def expected_checksum_text(p: Parsed) -> str:
    return "".join(f"{ref_crc(p.data[e.begin : e.end]):08x}" for e in p.by_offsets())


def assert_checksums_correct(path: Path, tensors: dict[str, torch.Tensor] | None = None) -> Parsed:
    """The stored string is the CRC of each entry's file bytes in data-offset order, and (when
    given the saved tensors) of each tensor's logical bytes as torch sees them."""
    p = parse(path)
    text = p.metadata[KEY]
    assert re.fullmatch(r"[0-9a-f]*", text), text
    assert text == expected_checksum_text(p)
    if tensors is not None:
        stored = p.stored_crcs()
        for name, crc in stored.items():
            assert crc == ref_crc(raw_bytes(tensors[name])), name
    return p


def flipped(path: Path, file_offset: int, bit: int = 0, suffix: str = "") -> Path:
    """A copy of `path` with one bit flipped."""
    out = path.with_name(f"{path.stem}.flip{file_offset}.{bit}{suffix}.safetensors")
    shutil.copyfile(path, out)
    with open(out, "r+b") as f:
        f.seek(file_offset)
        (b,) = f.read(1)
        f.seek(file_offset)
        f.write(bytes([b ^ (1 << bit)]))
    return out


def rewrite_checksum_text(path: Path, edit: Callable[[str], str], out: Path) -> Path:
    """A copy of `path` whose checksum string is edit(string), keeping the header length by
    taking or giving back padding spaces."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    body = raw[8 : 8 + n]
    marker = f'"{KEY}":"'.encode()
    start = body.index(marker) + len(marker)
    end = body.index(b'"', start)
    value = edit(body[start:end].decode()).encode()
    new_body = body[:start] + value + body[end:]
    delta = len(new_body) - len(body)
    if delta > 0:
        assert new_body.endswith(b" " * delta), "no padding to absorb the longer string"
        new_body = new_body[: len(new_body) - delta]
    else:
        new_body += b" " * -delta
    assert len(new_body) == n
    out.write_bytes(raw[:8] + new_body + raw[8 + n :])
    return out


def checksum_error(path: Path, **kwargs: Any) -> str:
    with pytest.raises(ChecksumError) as info:
        zerockpt.load(path, verify=True, **kwargs)
    return str(info.value)


def assert_names_failure(message: str, path: Path, name: str) -> None:
    """The ChecksumError text names the file (`path`, the corrupt copy), the tensor, its byte
    range and both CRCs (the stored one, and the one of the bytes now in the file)."""
    p = parse(path)
    e = p.entry(name)
    assert str(path) in message
    assert f"'{name}' (bytes" in message, message
    assert f"bytes {p.data_start + e.begin}-{p.data_start + e.end}" in message, message
    stored = p.stored_crcs()[name]
    computed = ref_crc(p.data[e.begin : e.end])
    assert stored != computed
    assert f"stored {stored:08x}" in message, message
    assert f"computed {computed:08x}" in message, message


# ---------------------------------------------------------------------------------------------
# 2. What save stores


def test_all_dtypes_odd_sizes(tmp_path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for i, dtype in enumerate(DTYPES):
        tensors[f"{DTYPES[dtype]}.m"] = random_tensor((3, 5 + i), dtype, seed=i)
        tensors[f"{DTYPES[dtype]}.s"] = random_tensor((), dtype, seed=100 + i)
        tensors[f"{DTYPES[dtype]}.odd"] = random_tensor((7 + 2 * i,), dtype, seed=200 + i)
    path = tmp_path / "dtypes.safetensors"
    zerockpt.save(tensors, path, metadata={"note": "x"}, durable=False)
    p = assert_checksums_correct(path, tensors)
    assert p.metadata["note"] == "x"
    # The header order is not the data order (1-byte types are placed last), so the test
    # above checks the ordering convention, and 1-byte tensors start at odd offsets.
    assert [e.name for e in p.entries] != [e.name for e in p.by_offsets()]
    assert any(e.begin % 2 for e in p.entries)
    result = zerockpt.verify(path)
    assert result == zerockpt.VerifyResult(str(path), True, len(tensors), ())
    for mmap in (True, False):
        assert_dicts_bitwise_equal(zerockpt.load(path, mmap=mmap, verify=True), tensors)


def test_empty_tensors_and_empty_files(tmp_path: Path) -> None:
    tensors = {
        "a": torch.empty(0, 3),
        "w": torch.randn(4, 4),
        "b": torch.empty(0, dtype=torch.uint8),
        "c": torch.empty(2, 0, dtype=torch.float64),
        "v": torch.arange(5, dtype=torch.int16),
        "d": torch.empty(0, dtype=torch.float32),
    }
    path = tmp_path / "e.safetensors"
    zerockpt.save(tensors, path, durable=False)
    p = assert_checksums_correct(path, tensors)
    for name in "abcd":
        assert p.stored_crcs()[name] == 0
    assert zerockpt.verify(path).ok
    assert_dicts_bitwise_equal(zerockpt.load(path, verify=True), tensors)

    only_empty = tmp_path / "only_empty.safetensors"
    zerockpt.save({"x": torch.empty(0), "y": torch.empty(0, 5, dtype=torch.int8)}, only_empty)
    assert parse(only_empty).metadata[KEY] == "0" * 16
    assert zerockpt.verify(only_empty) == zerockpt.VerifyResult(str(only_empty), True, 2, ())
    assert zerockpt.load(only_empty, verify=True, mmap=False)["y"].shape == (0, 5)

    nothing = tmp_path / "nothing.safetensors"
    zerockpt.save({}, nothing)
    assert parse(nothing).metadata[KEY] == ""
    assert zerockpt.verify(nothing) == zerockpt.VerifyResult(str(nothing), True, 0, ())
    for mmap in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert zerockpt.load(nothing, verify=True, mmap=mmap) == {}


def test_tied_tensors_are_checksummed_once(tmp_path: Path) -> None:
    w = torch.randn(64, 8)
    tensors = {"wte": w, "h.0": torch.ones(3), "lm_head": w, "also": w.detach()}
    path = tmp_path / "tied.safetensors"
    zerockpt.save(tensors, path, durable=False)
    p = assert_checksums_correct(path, tensors)
    assert [e.name for e in p.entries] == ["wte", "h.0"]  # aliases are not header entries
    assert len(p.metadata[KEY]) == 16
    result = zerockpt.verify(path)
    assert result.tensors == 2 and result.ok
    loaded = zerockpt.load(path, verify=True)
    assert loaded["lm_head"] is loaded["wte"]
    # Corrupting the stored tensor names the stored name, not the aliases.
    bad = flipped(path, p.data_start + p.entry("wte").begin + 5)
    assert zerockpt.verify(bad).failed == ("wte",)
    message = checksum_error(bad)
    assert "'lm_head'" not in message and "'also'" not in message
    assert_names_failure(message, bad, "wte")


NON_CONTIGUOUS: dict[str, Callable[[], torch.Tensor]] = {
    "transposed": lambda: torch.randn(37, 53).t(),
    "expanded": lambda: torch.randn(1, 9).expand(12, 9),
    "permuted": lambda: torch.randn(3, 4, 5, 6).permute(2, 0, 3, 1),
    "stepped": lambda: torch.randn(100, dtype=torch.float64)[1::3],
    "offset_view": lambda: torch.randn(100)[37:61],
    "conj": lambda: torch.randn(5, 4, dtype=torch.complex64).conj(),
    "neg_bit": lambda: torch.randn(5, 4, dtype=torch.complex64).conj().imag,
    "channels_last": lambda: torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
    "bool_strided": lambda: (torch.randn(30, 7) > 0)[::2, 1:],
    "u8_transposed": lambda: random_tensor((33, 17), torch.uint8, seed=4).t(),
}


@pytest.mark.parametrize("direct_io", [False, True])
def test_strided_sources_through_staging(tmp_path: Path, direct_io: bool) -> None:
    torch.manual_seed(0)
    tensors = {k: make() for k, make in NON_CONTIGUOUS.items()}
    path = tmp_path / "nc.safetensors"
    zerockpt.save(tensors, path, durable=direct_io, direct_io=direct_io)
    assert_checksums_correct(path, tensors)
    assert zerockpt.verify(path).ok


def test_misaligned_sources_and_offsets(tmp_path: Path) -> None:
    # Contiguous uint8 views starting at every address offset 0..15 (the writer checksums
    # tensor memory in place), long enough for the 3-way blocks; their odd lengths also put
    # each one at an odd data offset, so verify reads the mapping at every alignment too.
    base = random_tensor((20 * 30000,), torch.uint8, seed=11)
    tensors = {f"v{k}": base[k * 30001 : k * 30001 + 3 * 8192 + 800 + k] for k in range(16)}
    addresses = {t.data_ptr() % 16 for t in tensors.values()}
    assert addresses == set(range(16))
    path = tmp_path / "mis.safetensors"
    zerockpt.save(tensors, path, durable=False)
    p = assert_checksums_correct(path, tensors)
    assert {(p.data_start + e.begin) % 8 for e in p.entries} == set(range(8))
    assert zerockpt.verify(path).ok
    for mmap in (True, False):
        zerockpt.load(path, verify=True, mmap=mmap)


@pytest.mark.parametrize("pad", range(16))
def test_reader_verifies_files_at_any_data_alignment(tmp_path: Path, pad: int) -> None:
    # A file written here (not by zerockpt) with checksums computed by the Python reference,
    # the header padded so the data region starts at every alignment, tensors in an order
    # other than the header's, an empty tensor tying with a non-empty one.
    data = _rand(2 * 24576 + 77, 12 + pad)
    specs = [
        ("b", "U8", [30000], 18000, 48000),
        ("e", "F32", [0], 18000, 18000),
        ("a", "U8", [18000], 0, 18000),
        ("c", "U8", [len(data) - 48000], 48000, len(data)),
    ]
    ranges = sorted((begin, end) for _, _, _, begin, end in specs)
    text = "".join(f"{crc32c_table(data[b:e]):08x}" for b, e in ranges)
    header: dict[str, Any] = {"__metadata__": {KEY: text}}
    for name, dtype, shape, begin, end in specs:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
    body = json.dumps(header).encode()
    body += b" " * ((pad - (8 + len(body))) % 16)
    path = craft(tmp_path / "c.safetensors", None, data, raw_header=body)
    assert (8 + len(body)) % 16 == pad
    assert zerockpt.verify(path) == zerockpt.VerifyResult(str(path), True, 4, ())
    for mmap in (True, False):
        assert raw_bytes(zerockpt.load(path, verify=True, mmap=mmap)["b"]) == data[18000:48000]
    # One wrong digit for "c" (last in data order) is reported for "c" alone.
    text_bad = text[:-1] + ("0" if text[-1] != "0" else "1")
    header["__metadata__"][KEY] = text_bad
    bad = craft(tmp_path / "bad.safetensors", header, data)
    assert zerockpt.verify(bad).failed == ("c",)
    with pytest.raises(ChecksumError, match="'c'"):
        zerockpt.load(bad, verify=True)


def test_big_tensors_across_chunks_all_write_paths_same_bytes(tmp_path: Path) -> None:
    # "big" starts mid-chunk and spans several 8 MiB chunks; "tail" (odd size) crosses a
    # chunk boundary at an odd data offset.
    tensors = {
        "a": random_tensor((3 * MiB // 4 + 7,), torch.float32, seed=21),
        "tail": random_tensor((5 * MiB + 13,), torch.uint8, seed=22),
        "big": random_tensor((20 * MiB // 4,), torch.float32, seed=23),
    }
    reference = tmp_path / "ref.safetensors"
    zerockpt.save(tensors, reference, durable=False, direct_io=False, threads=1)
    p = assert_checksums_correct(reference, tensors)
    big = p.entry("big")
    assert (p.data_start + big.begin) % CHUNK != 0 and big.end - big.begin > 2 * CHUNK
    expected = reference.read_bytes()
    variants = {
        "default": {},
        "threads3": {"threads": 3, "durable": False},
        "durable": {"durable": True, "direct_io": False},
        "direct": {"durable": True, "direct_io": True},
        "direct1": {"durable": False, "direct_io": True, "threads": 1},
    }
    for name, kwargs in variants.items():
        path = tmp_path / f"{name}.safetensors"
        zerockpt.save(tensors, path, **kwargs)
        assert path.read_bytes() == expected, name
    assert zerockpt.verify(reference, threads=1).ok
    assert zerockpt.verify(reference).ok


def test_checksums_false_stores_none_and_same_data(tmp_path: Path, sample: dict) -> None:
    with_sums = tmp_path / "with.safetensors"
    without = tmp_path / "without.safetensors"
    zerockpt.save(sample, with_sums, durable=False)
    zerockpt.save(sample, without, durable=False, checksums=False)
    a, b = parse(with_sums), parse(without)
    assert KEY in a.metadata and KEY not in b.metadata
    assert {k: v for k, v in a.metadata.items() if k != KEY} == b.metadata
    assert a.data == b.data
    assert {e.name: (e.begin, e.end) for e in a.entries} == {
        e.name: (e.begin, e.end) for e in b.entries
    }
    result = zerockpt.verify(without)
    assert result == zerockpt.VerifyResult(str(without), False, len(sample), ())
    assert result.ok
    with pytest.warns(UserWarning, match="stores no checksums"):
        loaded = zerockpt.load(without, verify=True)
    assert_dicts_bitwise_equal(loaded, sample)


def test_checksum_key_is_reserved(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        zerockpt.save({"a": torch.ones(1)}, tmp_path / "r.safetensors", metadata={KEY: ""})


def test_thousands_of_tensors_in_one_chunk(tmp_path: Path) -> None:
    # More segments per 8 MiB chunk than one pwritev takes (IOV_MAX 1024), some strided.
    base = random_tensor((3000, 6), torch.float32, seed=40)
    tensors = {f"r{i}": base[i, ::2] if i % 3 == 0 else base[i] for i in range(3000)}
    path = tmp_path / "many.safetensors"
    zerockpt.save(tensors, path, durable=False)
    assert_checksums_correct(path, tensors)
    assert zerockpt.verify(path).ok
    p = parse(path)
    bad = flipped(path, p.data_start + p.entry("r2999").begin + 1)
    assert zerockpt.verify(bad).failed == ("r2999",)


def test_key_carried_into_a_reordered_file_does_not_pass(tmp_path: Path) -> None:
    # Another writer that copies the metadata forward but lays the data out in another order
    # (safetensors sorts by alignment, then name): the stale checksums must not verify.
    ours = tmp_path / "ours.safetensors"
    zerockpt.save({"b": torch.randn(4), "a": torch.randn(4)}, ours, durable=False)
    with safe_open(ours, framework="pt") as f:
        meta = f.metadata()
    resaved = tmp_path / "resaved.safetensors"
    st.save_file(st.load_file(ours), resaved, metadata=meta)
    assert [e.name for e in parse(resaved).by_offsets()] == ["a", "b"]
    assert set(zerockpt.verify(resaved).failed) == {"a", "b"}
    with pytest.raises(ChecksumError):
        zerockpt.load(resaved, verify=True)


# ---------------------------------------------------------------------------------------------
# 3. Corruption


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.lin = nn.Linear(8, 5)
        self.bn = nn.BatchNorm1d(5)
        self.register_buffer("codes", torch.arange(11, dtype=torch.uint8))


def _net(seed: int) -> Net:
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():
        net.bn.running_mean.uniform_()
        net.bn.num_batches_tracked.fill_(seed + 3)
    return net


def _params(m: nn.Module) -> dict[str, bytes]:
    return {k: raw_bytes(v) for k, v in m.state_dict().items()}


@pytest.fixture
def net_file(tmp_path: Path) -> tuple[Path, Parsed]:
    path = tmp_path / "net.safetensors"
    zerockpt.save(_net(1), path, durable=False)
    return path, assert_checksums_correct(path, dict(_net(1).state_dict()))


def test_one_bit_in_each_tensor(net_file: tuple[Path, Parsed]) -> None:
    path, p = net_file
    good = zerockpt.load(path)
    target = _net(2)
    before = _params(target)
    names = [e.name for e in p.entries]
    assert len(names) == 9
    for i, e in enumerate(p.entries):
        offset = p.data_start + e.begin + (e.end - e.begin) // 2
        bad = flipped(path, offset, bit=i % 8)
        result = zerockpt.verify(bad)
        assert result == zerockpt.VerifyResult(str(bad), True, len(names), (e.name,))
        assert not result.ok
        for mmap in (True, False):
            assert_names_failure(checksum_error(bad, mmap=mmap), bad, e.name)
            with zerockpt.open(bad) as f:
                assert f.verify().failed == (e.name,)
        with pytest.raises(ChecksumError, match=re.escape(e.name)) as info:
            zerockpt.load_state_dict(target, bad, verify=True)
        assert str(bad) in str(info.value)
        assert _params(target) == before
        # Without verify nothing is checked: the flipped bit loads as is.
        for mmap in (True, False):
            loaded = zerockpt.load(bad, mmap=mmap)
            changed = [k for k in loaded if raw_bytes(loaded[k]) != raw_bytes(good[k])]
            assert changed == [e.name]
            diff = bytes(
                x ^ y
                for x, y in zip(raw_bytes(loaded[e.name]), raw_bytes(good[e.name]), strict=True)
            )
            assert sorted(set(diff)) == [0, 1 << (i % 8)] and diff.count(0) == len(diff) - 1
        zerockpt.load_state_dict(target, bad)  # loads, unchecked
        assert _params(target)[e.name] == raw_bytes(loaded[e.name])
        target = _net(2)
        assert _params(target) == before
    # The intact file loads into the module with verify.
    zerockpt.load_state_dict(target, path, verify=True)
    assert_dicts_bitwise_equal(dict(target.state_dict()), good)


def test_load_state_dict_verify_with_torch_path_and_assign(net_file: tuple[Path, Parsed]) -> None:
    path, p = net_file
    bad = flipped(path, p.data_start + p.entry("lin.weight").begin)

    class Custom(Net):  # an overridden load_state_dict: torch's own loader runs
        def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
            return super().load_state_dict(*args, **kwargs)

    for make in (_net, lambda seed: Custom()):
        target = make(2)
        before = _params(target)
        for assign in (False, True):
            with pytest.raises(ChecksumError, match=r"lin\.weight"):
                zerockpt.load_state_dict(target, bad, verify=True, assign=assign)
            assert _params(target) == before
        zerockpt.load_state_dict(target, path, verify=True, assign=True)
        assert _params(target) == _params(_net(1))


def test_big_tensor_bit_flips(tmp_path: Path) -> None:
    tensors = {
        "head": random_tensor((3 * MiB // 4 + 5,), torch.float32, seed=31),
        "big": random_tensor((20 * MiB // 4,), torch.float32, seed=32),
        "u8": random_tensor((1001,), torch.uint8, seed=33),
    }
    path = tmp_path / "big.safetensors"
    zerockpt.save(tensors, path, durable=False)
    p = assert_checksums_correct(path, tensors)
    big = p.entry("big")
    start, end = p.data_start + big.begin, p.data_start + big.end
    file_chunk = (start // CHUNK + 1) * CHUNK  # a writer chunk boundary inside "big"
    offsets = {
        "first": start,
        "verifier-piece-end": start + CHUNK - 1,
        "verifier-piece-start": start + CHUNK,
        "writer-chunk-end": file_chunk - 1,
        "writer-chunk-start": file_chunk,
        "middle": (start + end) // 2,
        "last": end - 1,
    }
    for where, offset in offsets.items():
        assert start <= offset < end, where
        bad = flipped(path, offset, bit=7)
        assert zerockpt.verify(bad).failed == ("big",), where
        assert zerockpt.verify(bad, threads=1).failed == ("big",), where
        for mmap in (True, False):
            assert_names_failure(checksum_error(bad, mmap=mmap), bad, "big")
        bad.unlink()


def test_several_corrupt_tensors_all_named(tmp_path: Path) -> None:
    tensors = {f"t{i}": random_tensor((50 + i,), torch.int16, seed=i) for i in range(8)}
    path = tmp_path / "s.safetensors"
    zerockpt.save(tensors, path, durable=False)
    p = parse(path)
    bad = path
    for name in ("t1", "t4", "t7"):
        bad = flipped(bad, p.data_start + p.entry(name).begin + 3, suffix=name)
    result = zerockpt.verify(bad)
    assert result.failed == ("t1", "t4", "t7") and not result.ok
    for mmap in (True, False):
        message = checksum_error(bad, mmap=mmap)
        assert "3 of 8 tensors" in message
        for name in ("t1", "t4", "t7"):
            assert_names_failure(message, bad, name)
        for name in ("t0", "t2", "t3", "t5", "t6"):
            assert f"'{name}'" not in message


def test_more_than_twenty_failures_are_summarised(tmp_path: Path) -> None:
    tensors = {f"w{i:02d}": random_tensor((16,), torch.float32, seed=i) for i in range(25)}
    path = tmp_path / "many.safetensors"
    zerockpt.save(tensors, path, durable=False)
    p = parse(path)
    raw = bytearray(path.read_bytes())
    for e in p.entries:
        raw[p.data_start + e.begin] ^= 0x10
    bad = tmp_path / "many_bad.safetensors"
    bad.write_bytes(bytes(raw))
    assert zerockpt.verify(bad).failed == tuple(tensors)
    message = checksum_error(bad)
    assert "25 of 25 tensors" in message
    assert message.endswith(" and 5 more"), message[-200:]
    listed = re.findall(r"'(w\d\d)' \(bytes", message)
    assert len(listed) == 20 and len(set(listed)) == 20


def test_stored_digits_corrupted_name_the_tensor_in_data_order(tmp_path: Path) -> None:
    tensors = {
        "u8": random_tensor((9,), torch.uint8, seed=1),
        "f64": random_tensor((3,), torch.float64, seed=2),
        "f16": random_tensor((5,), torch.float16, seed=3),
        "i32": random_tensor((4,), torch.int32, seed=4),
    }
    path = tmp_path / "d.safetensors"
    zerockpt.save(tensors, path, durable=False)
    p = parse(path)
    order = [e.name for e in p.by_offsets()]
    assert order == ["f64", "i32", "f16", "u8"]
    for k, name in enumerate(order):

        def bump(text: str, k: int = k) -> str:
            digit = text[8 * k + 3]
            new = "0123456789abcdef"[(int(digit, 16) + 1) % 16]
            return text[: 8 * k + 3] + new + text[8 * k + 4 :]

        bad = rewrite_checksum_text(path, bump, tmp_path / f"d{k}.safetensors")
        assert zerockpt.verify(bad).failed == (name,)
        with pytest.raises(ChecksumError, match=f"'{name}'"):
            zerockpt.load(bad, verify=True, mmap=k % 2 == 0)


MALFORMED = {
    "short": lambda t: t[:-1],
    "long": lambda t: t + "0",
    "one-entry-missing": lambda t: t[:-8],
    "empty": lambda t: "",
    "non-hex": lambda t: "g" + t[1:],
    "space": lambda t: t[:5] + " " + t[6:],
    "uppercase": lambda t: t.upper(),
    "0x-prefix": lambda t: "0x" + t[2:],
    "non-ascii": lambda t: "\u00e9" + t[2:],  # as many bytes as before, fewer characters
    "sign": lambda t: "-" + t[1:],
}


@pytest.mark.parametrize("how", list(MALFORMED))
def test_malformed_checksum_metadata(tmp_path: Path, how: str, sample: dict) -> None:
    path = tmp_path / "m.safetensors"
    zerockpt.save(sample, path, durable=False)
    text = parse(path).metadata[KEY]
    assert re.search("[a-f]", text)  # so that .upper() changes it
    bad = rewrite_checksum_text(path, MALFORMED[how], tmp_path / "bad.safetensors")
    assert parse(bad).metadata[KEY] != text
    key = re.escape(KEY)
    with pytest.raises(FormatError, match=key) as info:
        zerockpt.verify(bad)
    assert not isinstance(info.value, ChecksumError)
    assert str(bad) in str(info.value)
    with zerockpt.open(bad) as f:  # opening does not check it
        assert f.metadata()[KEY] == parse(bad).metadata[KEY]
        with pytest.raises(FormatError, match=key):
            f.verify()
    for mmap in (True, False):
        with pytest.raises(FormatError, match=key):
            zerockpt.load(bad, verify=True, mmap=mmap)
        assert_dicts_bitwise_equal(zerockpt.load(bad, mmap=mmap), sample)
    target = nn.Module()
    for name, t in sample.items():
        target.register_buffer(name.replace(".", "_"), torch.zeros_like(t))
    with pytest.raises(FormatError, match=key):
        zerockpt.load_state_dict(target, bad, verify=True, strict=False)


# ---------------------------------------------------------------------------------------------
# 4. Other writers and readers


def test_safetensors_files_have_no_checksums(tmp_path: Path, sample: dict) -> None:
    path = tmp_path / "st.safetensors"
    st.save_file({k: v.contiguous() for k, v in sample.items()}, path)
    assert KEY not in (parse(path).metadata or {})
    for mmap in (True, False):
        with pytest.warns(UserWarning, match=r"stores no checksums.*nothing was verified") as w:
            loaded = zerockpt.load(path, verify=True, mmap=mmap)
        assert str(path) in str(w[0].message)
        assert w[0].filename == __file__  # attributed to the caller
        assert_dicts_bitwise_equal(dict(sorted(loaded.items())), dict(sorted(sample.items())))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zerockpt.load(path)  # no warning without verify
        result = zerockpt.verify(path)  # nor from verify: it reports instead
    assert result == zerockpt.VerifyResult(str(path), False, len(sample), ())
    assert result.ok
    # With metadata but no checksum key.
    with_meta = tmp_path / "meta.safetensors"
    st.save_file({"x": torch.ones(3)}, with_meta, metadata={"format": "pt"})
    assert zerockpt.verify(with_meta).has_checksums is False
    # load_state_dict warns too, and loads.
    target = nn.Module()
    target.register_buffer("x", torch.zeros(3))
    with pytest.warns(UserWarning, match="stores no checksums"):
        zerockpt.load_state_dict(target, with_meta, verify=True)
    assert_bitwise_equal(target.x, torch.ones(3))


def test_safetensors_reads_our_checksummed_files(tmp_path: Path, sample: dict) -> None:
    path = tmp_path / "ours.safetensors"
    zerockpt.save(sample, path, metadata={"note": "n"})
    expected_text = parse(path).metadata[KEY]
    loaded = st.load_file(path)
    assert_dicts_bitwise_equal(dict(sorted(loaded.items())), dict(sorted(sample.items())))
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert meta[KEY] == expected_text
    assert meta["note"] == "n"


def test_mapping_source_with_verify_is_rejected(sample: dict) -> None:
    target = nn.Module()
    target.register_buffer("steps", torch.tensor(0))
    before = raw_bytes(target.steps)
    with pytest.raises(ValueError, match="verify"):
        zerockpt.load_state_dict(target, {"steps": torch.tensor(3)}, verify=True)
    assert raw_bytes(target.steps) == before


# ---------------------------------------------------------------------------------------------
# 5. API surface


def test_open_verify_and_result_fields(tmp_path: Path, sample: dict) -> None:
    path = tmp_path / "o.safetensors"
    w = torch.randn(3)
    zerockpt.save({**sample, "tied": sample["embed.weight"], "w": w}, path, durable=False)
    with zerockpt.open(path) as f:
        result = f.verify()
        assert result == f.verify(threads=1)
        assert len(f) == len(sample) + 2
    assert result.path == str(path)
    assert result.has_checksums is True
    assert result.tensors == len(sample) + 1  # the alias is not stored
    assert result.failed == ()
    assert result.ok is True
    assert zerockpt.verify(path) == result
    assert zerockpt.verify(str(path)) == result
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.ok = False  # type: ignore[misc]
    with pytest.raises(ValueError, match="closed"):
        f.verify()
    assert issubclass(ChecksumError, FormatError) and issubclass(FormatError, ValueError)
    assert zerockpt.ChecksumError is ChecksumError


@pytest.mark.parametrize("threads", [0, -1, True, 2.0, "2"])
def test_threads_argument_validated(tmp_path: Path, threads: Any) -> None:
    path = tmp_path / "t.safetensors"
    zerockpt.save({"a": torch.ones(2)}, path, durable=False)
    with pytest.raises(ValueError, match="threads"):
        zerockpt.verify(path, threads=threads)
    with zerockpt.open(path) as f, pytest.raises(ValueError, match="threads"):
        f.verify(threads=threads)
    with pytest.raises(ValueError, match="threads"):
        zerockpt.load(path, verify=True, threads=threads)
    target = nn.Module()
    target.register_buffer("a", torch.zeros(2))
    with pytest.raises(ValueError, match="threads"):
        zerockpt.load_state_dict(target, path, verify=True, threads=threads)
    assert_bitwise_equal(target.a, torch.zeros(2))


@pytest.mark.parametrize("threads", [1, 2, 7])
def test_thread_counts_agree(tmp_path: Path, threads: int) -> None:
    tensors = {f"p{i}": random_tensor((1000 + 37 * i,), torch.float32, seed=i) for i in range(30)}
    tensors["big"] = random_tensor((9 * MiB + 1,), torch.uint8, seed=99)
    path = tmp_path / "th.safetensors"
    zerockpt.save(tensors, path, durable=False, threads=threads)
    assert_checksums_correct(path, tensors)
    p = parse(path)
    bad = flipped(path, p.data_start + p.entry("big").end - 2)
    bad = flipped(bad, p.data_start + p.entry("p17").begin, suffix="p17")
    assert zerockpt.verify(path, threads=threads).ok
    assert set(zerockpt.verify(bad, threads=threads).failed) == {"big", "p17"}
    with pytest.raises(ChecksumError, match="2 of 31 tensors"):
        zerockpt.load(bad, verify=True, mmap=False, threads=threads)


def test_verify_path_type(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    zerockpt.save({"a": torch.ones(2)}, os.fspath(path), durable=False)
    with pytest.raises(TypeError, match="path"):
        zerockpt.verify(123)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "options",
    [{"durable": False}, {"durable": True, "direct_io": True}, {"durable": False, "threads": 1}],
    ids=["buffered", "direct", "one-thread"],
)
def test_tensor_mutated_during_save_gives_a_file_that_passes_its_checksums(
    tmp_path: Path, options: dict[str, Any]
) -> None:
    """Each CRC is computed from the bytes written, whatever another thread does meanwhile."""
    moving = torch.zeros(6 * MiB, dtype=torch.int32)  # 24 MiB: three chunks, every chunk raced
    state = {"still": torch.arange(1000, dtype=torch.int32), "moving": moving}
    stop = threading.Event()
    writes = [0]

    def mutate() -> None:
        while not stop.is_set():
            moving.add_(1)  # releases the GIL, like the save
            writes[0] += 1

    mutator = threading.Thread(target=mutate)
    mutator.start()
    try:
        for i in range(8):
            path = tmp_path / f"{i}.safetensors"
            zerockpt.save(state, path, **options)
            result = zerockpt.verify(path)
            assert result.has_checksums and result.ok, result.failed
    finally:
        stop.set()
        mutator.join()
    assert writes[0] > 0
