"""Hostile files cannot make parsing quadratic through hash collisions.

The tests build real collisions: tensor names with one libstdc++ ``std::hash<std::string>``
value (unseeded MurmurHash, inverted block by block), and int keys with one Python hash (equal
mod 2**61 - 1). Each hostile file is timed against a file of the same size without collisions,
in the same process; a quadratic parser would be tens of times slower, so the bound is generous.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import zerockpt
from conftest import craft
from torch import nn
from zerockpt import FormatError
from zerockpt.structure import MAX_SHARED_HASH

MASK = (1 << 64) - 1
MUL = (0xC6A4A793 << 32) + 0x5BD1E995  # libstdc++ _Hash_bytes, 64-bit
SEED = 0xC70F6907  # the seed std::hash<std::string> passes


def _inverse(a: int) -> int:
    x = a
    for _ in range(6):  # Newton: each step doubles the correct low bits
        x = (x * (2 - a * x)) & MASK
    return x


def murmur(data: bytes) -> int:
    """libstdc++'s std::_Hash_bytes(data, len, SEED) on a 64-bit target."""

    def shift_mix(v: int) -> int:
        return v ^ (v >> 47)

    h = (SEED ^ (len(data) * MUL)) & MASK
    whole = len(data) & ~7
    for i in range(0, whole, 8):
        block = (shift_mix((int.from_bytes(data[i : i + 8], "little") * MUL) & MASK) * MUL) & MASK
        h = ((h ^ block) * MUL) & MASK
    if len(data) & 7:
        h = ((h ^ int.from_bytes(data[whole:], "little")) * MUL) & MASK
    return shift_mix((shift_mix(h) * MUL) & MASK)


def _halves(count: int, start: int, target: int, rng: np.random.Generator) -> list[bytes]:
    """16-byte ASCII strings (no '.', no NUL) taking the hash state from ``start`` to ``target``.

    The first 8 bytes are random; the second are solved for by inverting the block mix, and
    kept when they are ASCII (about 1 in 290).
    """
    mul, inv = np.uint64(MUL), np.uint64(_inverse(MUL))
    shift = np.uint64(47)
    out: list[bytes] = []
    with np.errstate(over="ignore"):
        while len(out) < count:
            first = rng.integers(ord("a"), ord("z") + 1, size=(1 << 18, 8), dtype=np.uint8)
            m = first.view("<u8")[:, 0] * mul
            state = (np.uint64(start) ^ ((m ^ (m >> shift)) * mul)) * mul
            y = ((np.uint64(target) * inv) ^ state) * inv  # the mixed second block, unmixed
            second = ((y ^ (y >> shift)) * inv).view(np.uint8).reshape(-1, 8)
            ok = np.all((second >= 1) & (second < 0x80) & (second != ord(".")), axis=1)
            out += [a.tobytes() + b.tobytes() for a, b in zip(first[ok], second[ok], strict=True)]
    return out[:count]


def colliding_names(side: int) -> list[str]:
    """side**2 distinct 32-byte names with one std::hash: prefixes that reach one hash state
    times suffixes that go from it to another, so any prefix + suffix collides."""
    rng = np.random.default_rng(0)
    start = (SEED ^ (32 * MUL)) & MASK
    middle, end = 0x0123456789ABCDEF, 0x0FEDCBA987654321
    prefixes = _halves(side, start, middle, rng)
    suffixes = _halves(side, middle, end, rng)
    return [(p + s).decode() for p in prefixes for s in suffixes]


def _empty_tensors_file(path: Path, names: list[str]) -> Path:
    header = {n: {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for n in names}
    return craft(path, header)


def _best_time(fn: Callable[[], object], rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


SIDE = 160  # 25,600 names (534x slower at 65,536 with std::hash)


@pytest.fixture(scope="module")
def hostile_names() -> list[str]:
    names = colliding_names(SIDE)
    assert len(set(names)) == SIDE * SIDE
    hashes = {murmur(n.encode()) for n in names[:: SIDE + 1]}
    assert len(hashes) == 1  # what libstdc++ computes for all of them
    return names


def test_colliding_names_parse_in_linear_time(tmp_path: Path, hostile_names: list[str]) -> None:
    hostile = _empty_tensors_file(tmp_path / "hostile.safetensors", hostile_names)
    # The same names reversed: the same bytes and file size, without the collisions.
    plain_names = [n[::-1] for n in hostile_names]
    plain = _empty_tensors_file(tmp_path / "plain.safetensors", plain_names)
    assert hostile.stat().st_size == plain.stat().st_size
    assert len({murmur(n.encode()) for n in plain_names[:1000]}) == 1000

    def parse(path: Path) -> Callable[[], object]:
        return lambda: len(zerockpt.open(path).keys())

    assert parse(hostile)() == len(hostile_names)
    ratio = _best_time(parse(hostile)) / _best_time(parse(plain))
    assert ratio < 5, f"colliding names parse {ratio:.1f}x slower"


def test_colliding_duplicate_is_still_found(tmp_path: Path, hostile_names: list[str]) -> None:
    names = hostile_names[:1000]
    body = ",".join(
        f'{json.dumps(n)}:{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
        for n in [*names, names[500]]
    )
    path = craft(tmp_path / "dup.safetensors", None, raw_header=("{" + body + "}").encode())
    with pytest.raises(FormatError, match="duplicate tensor"):
        zerockpt.open(path)


def test_colliding_module_prefixes_load_in_linear_time(
    tmp_path: Path, hostile_names: list[str]
) -> None:
    """load_state_dict groups keys by their first component: the colliding part here."""
    count = len(hostile_names) // 4
    hostile = _empty_tensors_file(
        tmp_path / "h.safetensors", [n + ".w" for n in hostile_names[:count]]
    )
    plain = _empty_tensors_file(
        tmp_path / "p.safetensors", [n[::-1] + ".w" for n in hostile_names[:count]]
    )
    model = nn.Linear(2, 2)

    def load(path: Path) -> Callable[[], object]:
        return lambda: zerockpt.load_state_dict(model, path, strict=False)

    assert len(load(hostile)().unexpected_keys) == count
    ratio = _best_time(load(hostile)) / _best_time(load(plain))
    assert ratio < 5, f"colliding prefixes load {ratio:.1f}x slower"


def _structure_file(path: Path, keys: list[int]) -> Path:
    root = {"dict": [[k, i] for i, k in enumerate(keys)]}
    structure = json.dumps({"version": 1, "root": root})
    meta = {"format": "pt", "zerockpt.version": "1", "zerockpt.structure": structure}
    return craft(path, {"__metadata__": meta})


P = 2**61 - 1  # hash(k) == k mod P for Python ints


def test_int_keys_with_one_python_hash_are_refused_quickly(tmp_path: Path) -> None:
    count = 20_000
    hostile_keys = [i * P for i in range(1, count + 1)]
    assert len({hash(k) for k in hostile_keys}) == 1
    plain_keys = [i * (P + 1) for i in range(1, count + 1)]  # as long, all hashes distinct
    hostile = _structure_file(tmp_path / "h.safetensors", hostile_keys)
    plain = _structure_file(tmp_path / "p.safetensors", plain_keys)

    def attempt() -> None:
        with pytest.raises(FormatError, match=f"more than {MAX_SHARED_HASH} int keys"):
            zerockpt.load(hostile)

    loaded = zerockpt.load(plain)
    assert list(loaded) == plain_keys
    ratio = _best_time(attempt) / _best_time(lambda: zerockpt.load(plain))
    assert ratio < 5, f"colliding int keys take {ratio:.1f}x longer"


def test_a_few_int_keys_sharing_a_hash_still_round_trip(tmp_path: Path) -> None:
    keys = [-1, -2] + [i * P for i in range(1, MAX_SHARED_HASH)]  # hash(-1) == hash(-2) too
    state = {"d": {k: torch.tensor(float(i)) for i, k in enumerate(keys)}, "ok": 1}
    zerockpt.save(state, tmp_path / "ok.safetensors")
    loaded = zerockpt.load(tmp_path / "ok.safetensors")
    assert list(loaded["d"]) == keys
    assert [float(v) for v in loaded["d"].values()] == [float(i) for i in range(len(keys))]


def test_saving_a_dict_crowded_on_one_int_hash_is_refused(tmp_path: Path) -> None:
    crowded = {i * P: i for i in range(MAX_SHARED_HASH + 1)}  # 0 and the multiples of P
    with pytest.raises(ValueError, match=f"more than {MAX_SHARED_HASH} int keys with the hash"):
        zerockpt.save({"d": crowded}, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
