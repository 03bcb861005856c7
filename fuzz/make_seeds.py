"""Writes the fuzzer's seed corpus, fuzz/seeds/: small valid safetensors files.

Plain struct + json (no torch), so the seeds are byte-for-byte reproducible:
``python3 fuzz/make_seeds.py`` rewrites them. Each stays under a few KB; the fuzzer's working
corpus (build/fuzz/corpus) grows from them.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

SEEDS = Path(__file__).resolve().parent / "seeds"

# Bits per element, as csrc/core/dtype.cpp.
DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}

Tensor = tuple[str, str, list[int]]  # name, dtype, shape


def nbytes(dtype: str, shape: list[int]) -> int:
    bits = DTYPE_BITS[dtype]
    for d in shape:
        bits *= d
    assert bits % 8 == 0, (dtype, shape)
    return bits // 8


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as csrc/core/crc32c.cpp."""
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def data_bytes(size: int) -> bytes:
    return bytes(i % 251 for i in range(size))


def checksums(tensors: list[Tensor], corrupt: int | None = None) -> str:
    """The zerockpt.crc32c value for `tensors` laid out in order (as safetensors() does)."""
    data = data_bytes(sum(nbytes(dtype, shape) for _, dtype, shape in tensors))
    digits, offset = [], 0
    for i, (_, dtype, shape) in enumerate(tensors):
        size = nbytes(dtype, shape)
        crc = crc32c(data[offset : offset + size]) ^ (1 if i == corrupt else 0)
        digits.append(f"{crc:08x}")
        offset += size
    return "".join(digits)


def safetensors(
    tensors: list[Tensor],
    metadata: dict[str, str] | None = None,
    align: int = 0,
    raw_json: str | None = None,
) -> bytes:
    """A file holding `tensors` in order; data bytes are a counter so reads can be checked."""
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape in tensors:
        size = nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = (
        raw_json if raw_json is not None else json.dumps(header, separators=(",", ":"))
    ).encode()
    if align:  # as zerockpt's writer: spaces up to an aligned data region
        text += b" " * (-(8 + len(text)) % align)
    data = data_bytes(offset)
    return struct.pack("<Q", len(text)) + text + data


def seeds() -> dict[str, bytes]:
    mixed = [
        (f"layer{i}.{kind}", dtype, shape)
        for i, (kind, dtype, shape) in enumerate(
            [
                ("weight", "F32", [3, 2]),
                ("bias", "F16", [3]),
                ("scale", "BF16", []),
                ("mask", "BOOL", [4]),
                ("ids", "I64", [2]),
                ("q", "F8_E4M3", [2, 2]),
                ("q2", "F8_E5M2FNUZ", [1]),
                ("packed", "F4", [2, 2]),
                ("packed6", "F6_E2M3", [4]),
                ("packed6b", "F6_E3M2", [2, 4]),
                ("c", "C64", [1]),
                ("u", "U32", [1, 1, 1]),
            ]
            * 3
        )
    ]
    summed = [("w", "F64", [2]), ("e", "U8", [0]), ("x", "I32", [3]), ("y", "U8", [5])]
    return {
        "single_f32.safetensors": safetensors([("weight", "F32", [2, 2])]),
        "empty_object.safetensors": safetensors([]),
        "empty_tensors.safetensors": safetensors(
            [("a", "F32", [0]), ("b", "I8", [3, 0]), ("c", "BF16", [0, 0, 0])]
        ),
        "many_tensors.safetensors": safetensors(mixed),
        "aliases.safetensors": safetensors(
            [("embed.weight", "F32", [2, 3]), ("norm", "F16", [3])],
            {
                "format": "pt",
                "zerockpt.version": "1",
                "zerockpt.aliases": json.dumps([["lm_head.weight", "embed.weight", 2]]),
            },
        ),
        # The layout zerockpt writes: metadata first, header padded to a 4096-byte boundary.
        "zerockpt_layout.safetensors": safetensors(
            [("w", "F64", [2]), ("x", "I32", [3]), ("y", "U8", [5])],
            {"format": "pt", "zerockpt.version": "1", "zerockpt.aliases": "[]"},
            align=4096,
        ),
        # Per-tensor CRC-32C (zerockpt.crc32c), right and with one tensor's value wrong.
        "checksums.safetensors": safetensors(
            summed, {"format": "pt", "zerockpt.crc32c": checksums(summed)}
        ),
        "checksums_mismatch.safetensors": safetensors(
            summed, {"zerockpt.crc32c": checksums(summed, corrupt=2)}
        ),
        # Escapes, null metadata and fields other writers add (skipped by the parser).
        "json_features.safetensors": safetensors(
            [("a", "F32", [1]), ("b", "U16", [2])],
            raw_json=(
                '{ "__metadata__" : null,\n'
                ' "\\u00e9\\ud83d\\ude00\\"a\\\\\\/\\n" : {"dtype":"U8","shape":[0],'
                '"data_offsets":[0,0]},\n'
                ' "a" : {"extra":{"k":[1,-2.5e+3,true,false,null,"s"]},"dtype":"F32",'
                '"shape":[1],"data_offsets":[0,4]},\n'
                ' "b" : {"data_offsets":[4,8],"shape":[2],"dtype":"U16"} }'
            ),
        ),
    }


def main() -> None:
    SEEDS.mkdir(exist_ok=True)
    for name, data in seeds().items():
        (SEEDS / name).write_bytes(data)
        print(f"{SEEDS.name}/{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
