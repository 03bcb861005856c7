"""Writes the malicious safetensors corpus into tests/corpus/malicious/ (and its README.md).

Every file attacks one thing a reader must get right: the length prefix, the JSON parser, the
UTF-8 checks, shapes, offsets, dtypes, and zerockpt's own metadata (the alias table and the
state dict's ``_metadata``). The output is a pure function of this script: rerunning it writes
identical bytes, and tests/test_malicious.py checks that the checked-in files are up to date.

    .venv/bin/python tests/corpus/make_malicious.py [OUTPUT_DIR]

The expected outcome column of the README is documentation; the authoritative per-file, per-
entry-point expectations live in tests/test_malicious.py (EXPECTED).
"""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "malicious"
SUFFIX = ".safetensors"

ONE_F32 = struct.pack("<f", 1.0)  # the 4 data bytes of the well-formed tensor "a"
A = b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'  # that tensor's header entry


@dataclass(frozen=True)
class Case:
    name: str
    attack: str
    outcome: str
    content: bytes


def frame(body: bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    """8-byte little-endian header length (the real one unless given), header, data."""
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def obj(*entries: bytes) -> bytes:
    return b"{" + b",".join(entries) + b"}"


def entry(name: bytes, dtype: bytes, shape: bytes, offsets: bytes) -> bytes:
    """A tensor entry from raw JSON fragments (so they can be anything, valid or not)."""
    return (
        b'"' + name + b'":{"dtype":' + dtype + b',"shape":' + shape + b',"data_offsets":' + offsets
    ) + b"}"


def f32(name: bytes, shape: bytes, offsets: bytes) -> bytes:
    return entry(name, b'"F32"', shape, offsets)


def with_metadata(key: str, value: str, *tensors: bytes) -> bytes:
    """A header whose __metadata__ maps `key` to the string `value` (JSON-escaped)."""
    meta = b'"__metadata__":{' + json.dumps(key).encode() + b":" + json.dumps(value).encode() + b"}"
    return obj(meta, *(tensors or (A,)))


def aliases(table: str) -> bytes:
    """A valid file holding "a" whose zerockpt.aliases metadata is `table`."""
    return frame(with_metadata("zerockpt.aliases", table), ONE_F32)


def state_dict_metadata(value: str, *tensors: bytes) -> bytes:
    """A valid file holding "a" whose zerockpt.state_dict_metadata is `value`."""
    return frame(with_metadata("zerockpt.state_dict_metadata", value, *tensors), ONE_F32)


def checksums(value: str, *tensors: bytes) -> bytes:
    """A valid file holding "a" (or `tensors`) whose zerockpt.crc32c is `value`."""
    return frame(with_metadata("zerockpt.crc32c", value, *tensors), ONE_F32)


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum zerockpt stores per tensor."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def cases() -> list[Case]:
    out: list[Case] = []

    def add(name: str, attack: str, outcome: str, content: bytes) -> None:
        out.append(Case(name, attack, outcome, content))

    rejected = "FormatError"
    loads = "loads"

    # --- the 8-byte length prefix -----------------------------------------------------------
    add("len_prefix_truncated", "5-byte file: not even a length prefix", rejected, b"\x02\0\0\0\0")
    add("len_zero", "header length 0", rejected, frame(b"", length=0) + b"{}")
    add("len_one", "header length 1 ('{')", rejected, frame(b"{"))
    add(
        "len_2pow63", "header length 2^63 (negative as int64)", rejected, frame(b"{}", length=2**63)
    )
    add(
        "len_2pow64_minus1",
        "header length 2^64-1 (8 + n wraps to 7)",
        rejected,
        frame(b"{}", length=2**64 - 1),
    )
    add(
        "len_2pow64_minus8",
        "header length 2^64-8 (8 + n wraps to 0)",
        rejected,
        frame(b"{}", length=2**64 - 8),
    )
    add(
        "len_equals_file_size",
        "header length equal to the whole file size",
        rejected,
        frame(b"{}  ", length=12),
    )
    add(
        "len_past_eof_by_one",
        "header length one byte longer than the rest of the file",
        rejected,
        frame(b"{}", length=3),
    )

    # --- JSON syntax and framing of the header ----------------------------------------------
    add(
        "json_deep_arrays_100k",
        "100,000 nested '[' in an ignored tensor field (recursion bomb)",
        rejected,
        frame(obj(A[:-1] + b',"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), ONE_F32),
    )
    add(
        "json_deep_objects_25k",
        '25,000 nested {"": objects in an ignored tensor field',
        rejected,
        frame(obj(A[:-1] + b',"x":' + b'{"":' * 25_000 + b"0" + b"}" * 25_000 + b"}"), ONE_F32),
    )
    add(
        "json_deep_unterminated_100k",
        "100,000 '[' and no closing bracket, no data",
        rejected,
        frame(b'{"a":{"x":' + b"[" * 100_000),
    )
    add(
        "json_bom",
        "UTF-8 byte order mark before the JSON",
        rejected,
        frame(b"\xef\xbb\xbf" + obj(A), ONE_F32),
    )
    add(
        "json_two_objects",
        "a second JSON object after the header object",
        rejected,
        frame(obj(A) + b"{}", ONE_F32),
    )
    add(
        "json_nul_padding",
        "header padded with NUL bytes instead of spaces",
        rejected,
        frame(obj(A) + b"\0" * 64, ONE_F32),
    )
    add(
        "json_whitespace_padding",
        "header padded with tabs, CR and LF (JSON whitespace): valid",
        loads,
        frame(b"\n\t " + obj(A) + b"\r\n\t" * 20, ONE_F32),
    )
    add(
        "json_empty_object",
        "header {} and no data: a valid file without tensors",
        loads,
        frame(b"{}"),
    )
    add("json_null", "header is JSON null", rejected, frame(b"null"))
    add("json_nan_literal", "header is the non-JSON literal NaN", rejected, frame(b"NaN"))
    add(
        "json_raw_newline_in_name",
        "unescaped control character (LF) inside a tensor name",
        rejected,
        frame(obj(f32(b"a\nb", b"[1]", b"[0,4]")), ONE_F32),
    )
    add(
        "json_invalid_escape",
        "invalid escape \\x41 in a tensor name",
        rejected,
        frame(obj(f32(b"a\\x41", b"[1]", b"[0,4]")), ONE_F32),
    )
    add(
        "json_truncated_unicode_escape",
        "\\u escape cut short by the end of the header",
        rejected,
        frame(b'{"a\\u00'),
    )

    # --- UTF-8 ------------------------------------------------------------------------------
    add(
        "utf8_invalid_byte_in_metadata_key",
        "byte 0xFF in a __metadata__ key",
        rejected,
        frame(obj(b'"__metadata__":{"k\xff":"v"}', A), ONE_F32),
    )
    add(
        "utf8_invalid_byte_in_metadata_value",
        "byte 0xFE in a __metadata__ value",
        rejected,
        frame(obj(b'"__metadata__":{"k":"v\xfe"}', A), ONE_F32),
    )
    add(
        "utf8_overlong_slash_in_name",
        "overlong 2-byte encoding of '/' (C0 AF) in a tensor name",
        rejected,
        frame(obj(f32(b"a\xc0\xafb", b"[1]", b"[0,4]")), ONE_F32),
    )
    add(
        "utf8_overlong_nul_in_name",
        "overlong encoding of NUL (C0 80, 'modified UTF-8') in a tensor name",
        rejected,
        frame(obj(f32(b"a\xc0\x80", b"[1]", b"[0,4]")), ONE_F32),
    )
    add(
        "utf8_encoded_surrogate_in_name",
        "UTF-8-encoded surrogate U+D800 (ED A0 80, CESU-8) in a tensor name",
        rejected,
        frame(obj(f32(b"a\xed\xa0\x80", b"[1]", b"[0,4]")), ONE_F32),
    )
    add(
        "utf8_above_max_code_point",
        "code point above U+10FFFF (F4 90 80 80) in a tensor name",
        rejected,
        frame(obj(f32(b"a\xf4\x90\x80\x80", b"[1]", b"[0,4]")), ONE_F32),
    )
    add(
        "utf8_truncated_sequence_at_end",
        "header ends in the middle of a multi-byte sequence",
        rejected,
        frame(obj(A) + b"\xe2\x82", ONE_F32),
    )
    add(
        "escape_lone_high_surrogate_in_metadata",
        "lone surrogate escape \\ud800 in a __metadata__ value",
        rejected,
        frame(obj(b'"__metadata__":{"k":"\\ud800"}', A), ONE_F32),
    )
    add(
        "escape_lone_low_surrogate_in_name",
        "lone low surrogate escape \\udc00 in a tensor name",
        rejected,
        frame(obj(f32(b"a\\udc00", b"[1]", b"[0,4]")), ONE_F32),
    )
    add(
        "escape_high_surrogate_then_letter",
        "high surrogate escape followed by a non-surrogate escape (\\ud800\\u0041)",
        rejected,
        frame(obj(f32(b"\\ud800\\u0041", b"[1]", b"[0,4]")), ONE_F32),
    )
    add(
        "name_with_nul_escape",
        "tensor names with NUL bytes (\\u0000) inside and at the end: valid",
        loads,
        frame(
            obj(f32(b"a\\u0000b", b"[1]", b"[0,4]"), f32(b"a\\u0000", b"[1]", b"[4,8]")),
            ONE_F32 * 2,
        ),
    )
    add(
        "names_unicode_normalization_equal",
        "two tensors whose names are NFC/NFD-equal (U+00E9 vs e U+0301): distinct, valid",
        loads,
        frame(
            obj(
                f32("\u00e9".encode(), b"[1]", b"[0,4]"), f32("e\u0301".encode(), b"[1]", b"[4,8]")
            ),
            ONE_F32 + struct.pack("<f", 2.0),
        ),
    )
    add(
        "name_empty",
        'a tensor named "" (the empty string): valid',
        loads,
        frame(obj(f32(b"", b"[1]", b"[0,4]")), ONE_F32),
    )

    # --- duplicate keys -------------------------------------------------------------------------
    add("dup_tensor_key", "the same tensor name twice", rejected, frame(obj(A, A), ONE_F32))
    add(
        "dup_tensor_key_via_escape",
        'duplicate tensor name spelled "a" and "\\u0061"',
        rejected,
        frame(obj(A, f32(b"\\u0061", b"[0]", b"[4,4]")), ONE_F32),
    )
    add(
        "dup_metadata_object",
        "two __metadata__ objects (the second would override the first)",
        rejected,
        frame(obj(b'"__metadata__":{"k":"1"}', A, b'"__metadata__":{"k":"2"}'), ONE_F32),
    )

    # --- __metadata__ that is not a string map ------------------------------------------------
    for name, value, what in [
        ("metadata_is_array", b'["k","v"]', "an array"),
        ("metadata_is_string", b'"k=v"', "a string"),
        ("metadata_number_value", b'{"k":1e400}', "a map with a number value (1e400)"),
        ("metadata_nested_object", b'{"k":{"k":{"k":"v"}}}', "a map with a nested object value"),
        ("metadata_null_value", b'{"k":null}', "a map with a null value"),
        ("metadata_bool_value", b'{"format":true}', "a map with a bool value"),
    ]:
        add(
            name,
            f"__metadata__ is {what}",
            rejected,
            frame(obj(b'"__metadata__":' + value, A), ONE_F32),
        )
    add(
        "metadata_null",
        "__metadata__ is null (how safetensors writes 'no metadata'): valid",
        loads,
        frame(obj(b'"__metadata__":null', A), ONE_F32),
    )

    # --- shapes -------------------------------------------------------------------------------
    for name, shape, what in [
        ("shape_float", b"[1.5]", "a fractional dimension"),
        ("shape_exponent_1e400", b"[1e400]", "a dimension 1e400 (infinite as a double)"),
        ("shape_nan", b"[NaN]", "a NaN dimension (not JSON)"),
        ("shape_negative_zero", b"[-0]", "a dimension -0"),
        ("shape_bool", b"[true]", "a bool dimension"),
        ("shape_string", b'["1"]', "a string dimension"),
        ("shape_nested_list", b"[[1]]", "a nested list as a dimension"),
        ("shape_object", b'{"0":1}', "an object instead of a list"),
        ("shape_dim_2pow64", b"[18446744073709551616]", "a dimension 2^64 (overflows uint64)"),
    ]:
        add(name, f"shape with {what}", rejected, frame(obj(f32(b"a", shape, b"[0,4]")), ONE_F32))
    add(
        "shape_product_overflows_uint64",
        "F32 [2^32, 2^32]: bytes (2^66) overflow uint64, offsets claim 4 bytes",
        rejected,
        frame(obj(f32(b"a", b"[4294967296,4294967296]", b"[0,4]")), ONE_F32),
    )
    add(
        "shape_product_wraps_to_4",
        "U8 [2^62+1, 4]: 2^64+4 bytes, which a wrapping uint64 product counts as 4",
        rejected,
        frame(obj(entry(b"a", b'"U8"', b"[4611686018427387905,4]", b"[0,4]")), ONE_F32),
    )
    add(
        "shape_product_overflows_int64",
        "U8 [2^31, 2^31, 2]: 2^63 elements, past int64 (and the byte count in bits past uint64)",
        rejected,
        frame(obj(entry(b"a", b'"U8"', b"[2147483648,2147483648,2]", b"[0,4]")), ONE_F32),
    )
    add(
        "shape_huge_tiny_file",
        "F32 [2^20, 2^20] with matching offsets [0, 2^42] in a 4-byte data region",
        rejected,
        frame(obj(f32(b"a", b"[1048576,1048576]", b"[0,4398046511104]")), ONE_F32),
    )
    add(
        "shape_rank_1000000",
        "a shape with 1,000,000 dimensions",
        rejected,
        frame(obj(f32(b"a", b"[" + b",".join([b"1"] * 1_000_000) + b"]", b"[0,4]")), ONE_F32),
    )
    add(
        "shape_rank_1024",
        "a shape with exactly 1024 dimensions of 1 (the most allowed): valid",
        loads,
        frame(obj(f32(b"a", b"[" + b",".join([b"1"] * 1024) + b"]", b"[0,4]")), ONE_F32),
    )
    add(
        "zero_elements_dim_2pow64_minus1",
        "F32 [0, 2^64-1]: zero bytes, but a dimension torch cannot hold",
        "open: loads; tensors: FormatError",
        frame(obj(f32(b"a", b"[0,18446744073709551615]", b"[0,0]"))),
    )
    add(
        "zero_elements_strides_overflow",
        "F32 [0, 2^62, 2^62]: zero bytes, each dimension fits int64, but strides overflow",
        "open: loads; tensors: FormatError",
        frame(obj(f32(b"a", b"[0,4611686018427387904,4611686018427387904]", b"[0,0]"))),
    )
    add(
        "zero_elements_huge_dims_before_zero",
        "F32 [2^62, 2^62, 0]: zero elements, but the byte count overflows before the 0",
        rejected,
        frame(obj(f32(b"a", b"[4611686018427387904,4611686018427387904,0]", b"[0,0]"))),
    )
    add(
        "zero_elements_large_dims",
        "F32 [0, 2^31, 2^31]: zero elements with large dimensions torch can hold: valid",
        loads,
        frame(obj(f32(b"a", b"[0,2147483648,2147483648]", b"[0,0]"))),
    )
    add(
        "many_tensors_65536",
        "65,536 zero-size tensors in a 3.5 MB header: valid",
        loads,
        frame(obj(*(entry(b"%x" % i, b'"U8"', b"[0]", b"[0,0]") for i in range(65_536)))),
    )

    # --- data_offsets -------------------------------------------------------------------------
    for name, offsets, what in [
        ("offsets_negative", b"[-4,0]", "a negative begin"),
        ("offsets_float", b"[0.0,4.0]", "floats"),
        ("offsets_1e400", b"[0,1e400]", "1e400 as the end"),
        ("offsets_nan", b"[NaN,NaN]", "NaN (not JSON)"),
        ("offsets_infinity", b"[0,Infinity]", "Infinity (not JSON)"),
        ("offsets_strings", b'["0","4"]', "strings"),
        ("offsets_bools", b"[false,true]", "bools"),
        ("offsets_nested", b"[[0],[4]]", "nested lists"),
        ("offsets_null", b"null", "null"),
    ]:
        add(
            name,
            f"data_offsets with {what}",
            rejected,
            frame(obj(f32(b"a", b"[1]", offsets)), ONE_F32),
        )
    add(
        "offsets_near_2pow64",
        "data_offsets [2^64-5, 2^64-1]: consistent size, far beyond the file (wraps if added)",
        rejected,
        frame(obj(f32(b"a", b"[1]", b"[18446744073709551611,18446744073709551615]")), ONE_F32),
    )
    add(
        "offsets_2pow63",
        "data_offsets [2^63-4, 2^63]: past int64 and the file",
        rejected,
        frame(obj(f32(b"a", b"[1]", b"[9223372036854775804,9223372036854775808]")), ONE_F32),
    )
    add(
        "offsets_beyond_file",
        "data_offsets [4, 8] in a 4-byte data region",
        rejected,
        frame(obj(f32(b"a", b"[1]", b"[4,8]")), ONE_F32),
    )
    add(
        "offsets_identical",
        "two tensors with the same data_offsets (aliased bytes)",
        rejected,
        frame(obj(A, f32(b"b", b"[1]", b"[0,4]")), ONE_F32),
    )
    add(
        "offsets_overlap_partial",
        "F32 [2] tensors at [0,8] and [4,12]",
        rejected,
        frame(obj(f32(b"a", b"[2]", b"[0,8]"), f32(b"b", b"[2]", b"[4,12]")), ONE_F32 * 3),
    )
    add(
        "offsets_zero_size_inside_another",
        "a zero-size tensor at [4,4] inside a tensor at [0,8]",
        rejected,
        frame(obj(f32(b"a", b"[2]", b"[0,8]"), f32(b"z", b"[0]", b"[4,4]")), ONE_F32 * 2),
    )
    add(
        "offsets_zero_size_shared",
        "zero-size tensors sharing offset 0 with each other and with 'a': valid",
        loads,
        frame(obj(f32(b"z0", b"[0]", b"[0,0]"), A, f32(b"z1", b"[0,3]", b"[0,0]")), ONE_F32),
    )
    add(
        "offsets_hole_at_start",
        "the only tensor at [4,8]: bytes [0,4) belong to no tensor",
        rejected,
        frame(obj(f32(b"a", b"[1]", b"[4,8]")), ONE_F32 * 2),
    )

    # --- dtypes -------------------------------------------------------------------------------
    add(
        "dtype_huge_string",
        "a 64 KiB dtype string",
        rejected,
        frame(obj(entry(b"a", b'"' + b"F32" * 21_845 + b'"', b"[1]", b"[0,4]")), ONE_F32),
    )
    add(
        "dtype_with_nul_suffix",
        'dtype "F32\\u0000" (equal to F32 as a C string)',
        rejected,
        frame(obj(entry(b"a", b'"F32\\u0000"', b"[1]", b"[0,4]")), ONE_F32),
    )
    add(
        "dtype_lowercase",
        'dtype "f32"',
        rejected,
        frame(obj(entry(b"a", b'"f32"', b"[1]", b"[0,4]")), ONE_F32),
    )
    add(
        "dtype_f4_odd_elements",
        "F4 (4-bit) with 3 elements: not a whole number of bytes",
        rejected,
        frame(obj(entry(b"a", b'"F4"', b"[3]", b"[0,2]")), ONE_F32[:2]),
    )
    add(
        "dtype_f6_no_torch_equivalent",
        "F6_E2M3 [4] (3 bytes): valid header, no torch dtype",
        "open: loads; tensors: TypeError",
        frame(obj(entry(b"a", b'"F6_E2M3"', b"[4]", b"[0,3]")), ONE_F32[:3]),
    )

    # --- zerockpt.aliases ---------------------------------------------------------------------
    for name, table, what in [
        ("alias_to_alias", '[["b","a",1],["c","b",2]]', "an alias whose target is another alias"),
        ("alias_to_itself", '[["b","b",1]]', "an alias whose target is itself"),
        ("alias_cycle", '[["b","c",1],["c","b",2]]', "two aliases pointing at each other"),
        ("alias_position_huge", '[["b","a",18446744073709551615]]', "position 2^64-1"),
        ("alias_position_2pow64", '[["b","a",18446744073709551616]]', "position 2^64"),
        ("alias_position_negative", '[["b","a",-1]]', "position -1"),
        ("alias_position_float", '[["b","a",1.0]]', "position 1.0"),
        ("alias_positions_decreasing", '[["c","a",1],["b","a",0]]', "positions out of order"),
        ("alias_positions_equal", '[["b","a",1],["c","a",1]]', "two aliases at one position"),
        (
            "alias_first_position_past_stored",
            "[" + ",".join(f'["b{i}","a",{100 if i == 0 else i}]' for i in range(100)) + "]",
            "100 aliases of the 1 stored tensor, the first at position 100 (in range, but 99 "
            "stored tensors would have to come before it)",
        ),
        ("alias_shadows_stored_tensor", '[["a","a",1]]', "an alias named like the stored tensor"),
        ("alias_duplicate_name", '[["b","a",1],["b","a",2]]', "the same alias name twice"),
        ("alias_missing_target", '[["b","nope",1]]', "a target the file does not hold"),
        ("alias_wrong_types", '[["b",1,1]]', "a number as the target"),
        ("alias_entry_too_long", '[["b","a",1,1]]', "an entry with 4 items"),
        ("alias_entry_empty", "[[]]", "an empty entry"),
        ("alias_object", '{"b":"a"}', "an object instead of a list"),
        ("alias_trailing_data", '[["b","a",1]] []', "data after the list"),
        ("alias_deep_nesting_100k", "[" * 100_000 + "]" * 100_000, "100,000 nested lists"),
        ("alias_lone_surrogate", '[["\\ud800","a",1]]', "a lone surrogate escape as a name"),
    ]:
        add(name, f"zerockpt.aliases with {what}", rejected, aliases(table))
    add(
        "alias_nul_name",
        'zerockpt.aliases naming an alias "b\\u0000" of "a": valid',
        loads,
        aliases('[["b\\u0000","a",1]]'),
    )

    # --- zerockpt.crc32c (decoded only by verify) ------------------------------------------------
    good = f"{crc32c(ONE_F32):08x}"
    add(
        "crc_valid",
        f"zerockpt.crc32c holding the right CRC-32C of 'a' ({good}): valid",
        loads,
        checksums(good),
    )
    add(
        "crc_mismatch",
        "zerockpt.crc32c with a wrong checksum for 'a' (bytes corrupted after writing)",
        "loads unverified; verify: fails 'a'",
        checksums(f"{crc32c(ONE_F32) ^ 1:08x}"),
    )
    add(
        "crc_zero_size_ties",
        "zerockpt.crc32c for zero-size tensors tied at one offset with 'a': valid",
        loads,
        checksums(
            "00000000" + good + "00000000",
            f32(b"z0", b"[0]", b"[0,0]"),
            A,
            f32(b"z1", b"[0]", b"[4,4]"),
        ),
    )
    for name, digits, what in [
        ("crc_too_short", good[:4], "4 hex digits for 1 tensor"),
        ("crc_too_long", good + "0", "9 hex digits for 1 tensor"),
        ("crc_huge", "0" * 65_536, "64 Ki hex digits for 1 tensor"),
        ("crc_uppercase", good.upper(), "uppercase hex digits"),
        ("crc_not_hex", "zzzzzzzz", "non-hex characters"),
        ("crc_nul_escape", good[:7] + "\0", "an escaped NUL (\\u0000) as the last digit"),
        ("crc_sign", "-" + good[1:], "a minus sign as a digit"),
    ]:
        add(
            name,
            f"zerockpt.crc32c with {what}",
            "loads unverified; verify: FormatError",
            checksums(digits),
        )
    add(
        "crc_without_tensors",
        "zerockpt.crc32c holding a checksum in a file without tensors",
        "loads; verify: FormatError",
        frame(obj(b'"__metadata__":{"zerockpt.crc32c":"00000000"}')),
    )

    # --- zerockpt.state_dict_metadata (decoded only by load / load_state_dict) ------------------
    later = "open: loads; load, load_state_dict: FormatError"
    for name, text, what in [
        ("sdm_not_json", "{", "text that is not JSON"),
        ("sdm_array", "[1,2]", "a list instead of an object"),
        ("sdm_number", "5", "a number instead of an object"),
        ("sdm_values_not_objects", '{"":1}', "an object of numbers"),
        ("sdm_huge_integer", '{"":{"version":' + "9" * 5_000 + "}}", "a 5000-digit version"),
        ("sdm_deep_arrays_100k", "[" * 100_000 + "]" * 100_000, "100,000 nested lists"),
        (
            "sdm_deep_in_value_100k",
            '{"":{"x":' + "[" * 100_000 + "]" * 100_000 + "}}",
            "100,000 nested lists inside a module's entry",
        ),
        ("sdm_nan", '{"":{"version":NaN}}', "NaN (not JSON) as a version"),
        ("sdm_infinity", '{"":{"version":-Infinity}}', "-Infinity (not JSON) as a version"),
    ]:
        add(name, f"zerockpt.state_dict_metadata with {what}", later, state_dict_metadata(text))
    add(
        "sdm_version_1e400",
        "zerockpt.state_dict_metadata with version 1e400 (valid JSON, inf as a float)",
        loads,
        state_dict_metadata('{"":{"version":1e400}}'),
    )
    add(
        "sdm_lone_surrogate_key",
        "zerockpt.state_dict_metadata with a lone surrogate escape as a module prefix",
        loads,
        state_dict_metadata('{"\\ud800":{"version":1},"":{"version":1}}'),
    )
    add(
        "sdm_forces_assign",
        "zerockpt.state_dict_metadata setting assign_to_params_buffers for the root module",
        loads,
        state_dict_metadata('{"":{"version":1,"assign_to_params_buffers":true}}'),
    )
    return out


def build() -> dict[str, bytes]:
    """File name -> content for every case, plus the README and a .gitattributes."""
    all_cases = cases()
    names = [c.name for c in all_cases]
    assert len(set(names)) == len(names), "duplicate case names"
    files = {c.name + SUFFIX: c.content for c in all_cases}
    files["README.md"] = readme(all_cases).encode()
    files[".gitattributes"] = b"*.safetensors binary\n"  # never diffed, merged or re-encoded
    return files


def readme(all_cases: list[Case]) -> str:
    lines = [
        "# Malicious safetensors corpus",
        "",
        "Generated by `tests/corpus/make_malicious.py` (do not edit by hand; rerun it: the",
        "output is deterministic). `tests/test_malicious.py` feeds every file to `zerockpt.open`",
        "(and `get_tensor`), `zerockpt.load` (mapped and read), `zerockpt.load_state_dict` and",
        "`zerockpt.verify`, and checks the outcome, the time taken and the peak memory; its",
        "`EXPECTED` table is the authoritative per-entry-point expectation (including the",
        "library bugs it tracks as strict xfails).",
        "",
        "*FormatError* means every entry point raises `zerockpt.FormatError` naming the file;",
        "*loads* means the file is valid (if odd) and loads correctly.",
        "",
        "| file | attack | expected outcome |",
        "| --- | --- | --- |",
    ]
    for c in all_cases:
        attack = c.attack.replace("|", "\\|")
        lines.append(f"| `{c.name}{SUFFIX}` | {attack} | {c.outcome} |")
    return "\n".join(lines) + "\n"


def write(out_dir: Path) -> list[Path]:
    """Writes the corpus into `out_dir`, removing stale corpus files; returns the files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = build()
    for old in out_dir.glob("*" + SUFFIX):
        if old.name not in files:
            old.unlink()
    written = []
    for name, content in sorted(files.items()):
        path = out_dir / name
        if not path.exists() or path.read_bytes() != content:
            path.write_bytes(content)
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    paths = write(target)
    print(f"{len(paths)} files in {target}")
