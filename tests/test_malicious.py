"""The malicious corpus (tests/corpus/malicious) against every entry point.

Each file goes through zerockpt.open (keys, metadata, info), TensorFile.get_tensor (mapped and
read), zerockpt.load (mapped and read), zerockpt.load_state_dict and zerockpt.verify, in this
process. Each must end as EXPECTED says: FormatError (or TypeError for a dtype torch lacks)
naming the file, or the right result for the valid-but-odd files. Never a crash, a hang (10 s
watchdog) or a peak memory growth beyond max(16 MiB, 8 x the file size). Library bugs are
strict xfails (the right outcome is what is checked), and files known to crash the interpreter
run in a forked child.

The corpus is written by tests/corpus/make_malicious.py; a new file there needs an entry here.
"""

from __future__ import annotations

import faulthandler
import importlib.util
import math
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import zerockpt
from torch import nn
from zerockpt import FormatError

CORPUS = Path(__file__).parent / "corpus" / "malicious"
GENERATOR = Path(__file__).parent / "corpus" / "make_malicious.py"
FILES = sorted(p.name for p in CORPUS.glob("*.safetensors"))
OPS = ("open", "get_tensor", "load_mmap", "load_read", "load_state_dict", "verify")
MiB = 1 << 20

# A hang in C++ never returns to the interpreter, so a signal-based timeout could not fire:
# the thread method dumps every stack and ends the run instead.
pytestmark = pytest.mark.timeout(10, method="thread")


# --- expectations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Raises:
    """The op raises `exc` whose message holds `words` (and the path, for our own errors)."""

    exc: type[BaseException]
    words: tuple[str, ...] = ()


@dataclass(frozen=True)
class Opens:
    """zerockpt.open succeeds (the header is valid) with these keys."""

    keys: tuple[str, ...]


@dataclass(frozen=True)
class Loads:
    """The op succeeds with these tensors (aliases: name -> stored name it shares)."""

    tensors: Callable[[], dict[str, torch.Tensor]]
    aliases: dict[str, str] = field(default_factory=dict)
    state_dict_metadata: dict[str, Any] | None = None


@dataclass(frozen=True)
class Verifies:
    """zerockpt.verify returns: whether the file stores checksums, and the tensors failing."""

    has_checksums: bool = False
    failed: tuple[str, ...] = ()


UNCHECKED = Verifies()  # a valid header without checksums: verify has nothing to check

Outcome = Raises | Opens | Loads | Verifies


class ModelA(nn.Module):
    """The default target of load_state_dict: one parameter named like the corpus' tensor."""

    def __init__(self, a: torch.Tensor | None = None, buffer: bool = False) -> None:
        super().__init__()
        a = torch.zeros(1) if a is None else a
        if buffer:
            self.register_buffer("a", a)
        else:
            self.a = nn.Parameter(a)


@dataclass(frozen=True)
class Expect:
    outcomes: dict[str, Outcome]
    model: Callable[[], nn.Module] = ModelA
    # op -> reason: a library bug; the op is checked against the right outcome as a strict xfail.
    bugs: dict[str, str] = field(default_factory=dict)
    rss_limit: int | None = None  # bytes, instead of max(16 MiB, 8 x file size)
    # Known to crash the interpreter: each op runs in a forked child, so the run goes on.
    crashes: bool = False


def one(value: float = 1.0) -> torch.Tensor:
    return torch.tensor([value])


def rejected(*words: str) -> Expect:
    return Expect({op: Raises(FormatError, words) for op in OPS})


def valid(
    tensors: Callable[[], dict[str, torch.Tensor]],
    *,
    model: Callable[[], nn.Module] = ModelA,
    aliases: dict[str, str] | None = None,
    state_dict_metadata: dict[str, Any] | None = None,
    rss_limit: int | None = None,
    verify: Outcome = UNCHECKED,
) -> Expect:
    loads = Loads(tensors, aliases or {}, state_dict_metadata)
    outcomes: dict[str, Outcome] = {op: loads for op in OPS}
    outcomes["verify"] = verify
    return Expect(outcomes, model=model, rss_limit=rss_limit)


def tensors_fail(
    exc: type[BaseException], *words: str, load_state_dict: Outcome | None = None, **kw: Any
) -> Expect:
    """A valid header whose tensor cannot be made: open works, taking the tensor raises."""
    fails = Raises(exc, words)
    outcomes: dict[str, Outcome] = {op: fails for op in OPS}
    outcomes["open"] = Opens(("a",))
    outcomes["verify"] = UNCHECKED
    if load_state_dict is not None:
        outcomes["load_state_dict"] = load_state_dict
    return Expect(outcomes, **kw)


def state_dict_metadata_rejected(*words: str, bugs: dict[str, str] | None = None) -> Expect:
    """Bad zerockpt.state_dict_metadata: only load and load_state_dict decode it."""
    fails = Raises(FormatError, ("'zerockpt.state_dict_metadata' is not valid", *words))
    outcomes: dict[str, Outcome] = {op: fails for op in OPS}
    outcomes["open"] = Opens(("a",))
    outcomes["get_tensor"] = Loads(lambda: {"a": one()})
    outcomes["verify"] = UNCHECKED
    return Expect(outcomes, bugs=bugs or {})


def only_a() -> dict[str, torch.Tensor]:
    return {"a": one()}


def bad_checksums(*words: str) -> Expect:
    """Malformed zerockpt.crc32c: only verify decodes it; the rest loads unverified."""
    return valid(only_a, verify=Raises(FormatError, ("metadata 'zerockpt.crc32c'", *words)))


ALIAS = "invalid alias table"
NOT_OBJECT = "not an object of objects"
HUGE = 2**31

EXPECTED: dict[str, Expect] = {
    # zerockpt.aliases
    "alias_cycle": rejected("alias 'b' refers to 'c', which the file does not hold"),
    "alias_deep_nesting_100k": rejected(ALIAS, "expected a name"),
    "alias_duplicate_name": rejected("alias 'b' is a duplicate name"),
    "alias_entry_empty": rejected(ALIAS, "expected a name"),
    "alias_entry_too_long": rejected(ALIAS, "expected ']'"),
    "alias_first_position_past_stored": rejected("alias 'b0' has an invalid position"),
    "alias_lone_surrogate": rejected(ALIAS, "unpaired surrogate"),
    "alias_missing_target": rejected("alias 'b' refers to 'nope'"),
    "alias_nul_name": valid(lambda: {"a": one(), "b\0": one()}, aliases={"b\0": "a"}),
    "alias_object": rejected(ALIAS, "expected a list"),
    "alias_position_2pow64": rejected(ALIAS, "does not fit in 64 bits"),
    "alias_position_float": rejected(ALIAS, "fraction"),
    "alias_position_huge": rejected("alias 'b' has an invalid position 18446744073709551615"),
    "alias_position_negative": rejected(ALIAS, "negative"),
    "alias_positions_decreasing": rejected("alias 'b' has an invalid position 0"),
    "alias_positions_equal": rejected("alias 'c' has an invalid position 1"),
    "alias_shadows_stored_tensor": rejected("alias 'a' is a duplicate name"),
    "alias_to_alias": rejected("alias 'c' refers to 'b'"),
    "alias_to_itself": rejected("alias 'b' refers to 'b'"),
    "alias_trailing_data": rejected(ALIAS, "unexpected data after the list"),
    "alias_wrong_types": rejected(ALIAS, "expected a target name"),
    # zerockpt.crc32c
    "crc_huge": bad_checksums("has 65536 characters; 1 tensors need 8"),
    "crc_mismatch": valid(only_a, verify=Verifies(True, ("a",))),
    "crc_not_hex": bad_checksums("not lowercase hex digits (at character 0)"),
    "crc_nul_escape": bad_checksums("not lowercase hex digits (at character 7)"),
    "crc_sign": bad_checksums("not lowercase hex digits (at character 0)"),
    "crc_too_long": bad_checksums("has 9 characters; 1 tensors need 8"),
    "crc_too_short": bad_checksums("has 4 characters; 1 tensors need 8"),
    "crc_uppercase": bad_checksums("not lowercase hex digits (at character 0)"),
    "crc_valid": valid(only_a, verify=Verifies(True)),
    "crc_without_tensors": valid(
        dict, verify=Raises(FormatError, ("has 8 characters; 0 tensors need 0",))
    ),
    "crc_zero_size_ties": valid(
        lambda: {"z0": torch.empty(0), "a": one(), "z1": torch.empty(0)},
        verify=Verifies(True),
    ),
    # dtypes
    "dtype_f4_odd_elements": rejected("'a': F4 tensor of this shape is not a whole number"),
    "dtype_f6_no_torch_equivalent": tensors_fail(TypeError, "'a' has dtype F6_E2M3"),
    "dtype_huge_string": rejected("'a': unknown dtype 'F32F32", "...'"),
    "dtype_lowercase": rejected("unknown dtype 'f32'"),
    "dtype_with_nul_suffix": rejected("unknown dtype 'F32\\x00'"),
    # duplicates
    "dup_metadata_object": rejected("duplicate key '__metadata__'"),
    "dup_tensor_key": rejected("duplicate tensor 'a'"),
    "dup_tensor_key_via_escape": rejected("duplicate tensor 'a'"),
    # escapes and UTF-8
    "escape_high_surrogate_then_letter": rejected("unpaired surrogate escape"),
    "escape_lone_high_surrogate_in_metadata": rejected("unpaired surrogate escape"),
    "escape_lone_low_surrogate_in_name": rejected("unpaired surrogate escape"),
    "utf8_above_max_code_point": rejected("not valid UTF-8 (byte 11)"),
    "utf8_encoded_surrogate_in_name": rejected("not valid UTF-8 (byte 11)"),
    "utf8_invalid_byte_in_metadata_key": rejected("not valid UTF-8 (byte 27)"),
    "utf8_invalid_byte_in_metadata_value": rejected("not valid UTF-8 (byte 31)"),
    "utf8_overlong_nul_in_name": rejected("not valid UTF-8 (byte 11)"),
    "utf8_overlong_slash_in_name": rejected("not valid UTF-8 (byte 11)"),
    "utf8_truncated_sequence_at_end": rejected("not valid UTF-8 (byte 62)"),
    # JSON
    "json_bom": rejected("byte 8", "header must be a JSON object"),
    "json_deep_arrays_100k": rejected("nested too deeply"),
    "json_deep_objects_25k": rejected("nested too deeply"),
    "json_deep_unterminated_100k": rejected("nested too deeply"),
    "json_empty_object": valid(dict),
    "json_invalid_escape": rejected("invalid escape"),
    "json_nan_literal": rejected("header must be a JSON object"),
    "json_nul_padding": rejected("unexpected data after the header object"),
    "json_null": rejected("header must be a JSON object"),
    "json_raw_newline_in_name": rejected("control character in string"),
    "json_truncated_unicode_escape": rejected("truncated \\u escape"),
    "json_two_objects": rejected("unexpected data after the header object"),
    "json_whitespace_padding": valid(only_a),
    # the length prefix
    "len_2pow63": rejected("header length 9223372036854775808 exceeds"),
    "len_2pow64_minus1": rejected("header length 18446744073709551615 exceeds"),
    "len_2pow64_minus8": rejected("header length 18446744073709551608 exceeds"),
    "len_equals_file_size": rejected("header length 12 runs past the end of the 12-byte file"),
    "len_one": rejected("header length 1 is too small"),
    "len_past_eof_by_one": rejected("header length 3 runs past the end of the 10-byte file"),
    "len_prefix_truncated": rejected("file is 5 bytes, too small"),
    "len_zero": rejected("header length 0 is too small"),
    # 65,536 tensors: each costs ~0.7 KiB of torch and Python objects against ~55 header bytes.
    "many_tensors_65536": valid(
        lambda: {f"{i:x}": torch.empty(0, dtype=torch.uint8) for i in range(65_536)},
        model=lambda: ModelA(torch.zeros(0, dtype=torch.uint8), buffer=True),
        rss_limit=96 * MiB,
    ),
    # __metadata__
    "metadata_bool_value": rejected("__metadata__ value for 'format' is not a string"),
    "metadata_is_array": rejected("__metadata__ must be an object of strings"),
    "metadata_is_string": rejected("__metadata__ must be an object of strings"),
    "metadata_nested_object": rejected("__metadata__ value for 'k' is not a string"),
    "metadata_null": valid(only_a),
    "metadata_null_value": rejected("__metadata__ value for 'k' is not a string"),
    "metadata_number_value": rejected("__metadata__ value for 'k' is not a string"),
    # names
    "name_empty": valid(lambda: {"": one()}),
    "name_with_nul_escape": valid(lambda: {"a\0b": one(), "a\0": one()}),
    "names_unicode_normalization_equal": valid(lambda: {"\u00e9": one(), "e\u0301": one(2.0)}),
    # data_offsets
    "offsets_1e400": rejected("expected an integer, got a fraction or exponent"),
    "offsets_2pow63": rejected("'a': data_offsets [9223372036854775804, 9223372036854775808]"),
    "offsets_beyond_file": rejected("'a': data_offsets [4, 8] run past the end of the data"),
    "offsets_bools": rejected("expected a non-negative integer"),
    "offsets_float": rejected("expected an integer, got a fraction or exponent"),
    "offsets_hole_at_start": rejected("hole in the data region: bytes [0, 4)"),
    "offsets_identical": rejected("tensor 'b' at data offset 0 overlaps tensor 'a'"),
    "offsets_infinity": rejected("expected a non-negative integer"),
    "offsets_nan": rejected("expected a non-negative integer"),
    "offsets_near_2pow64": rejected("run past the end of the data"),
    "offsets_negative": rejected("got a negative number"),
    "offsets_nested": rejected("expected a non-negative integer"),
    "offsets_null": rejected("'a': data_offsets is not a list"),
    "offsets_overlap_partial": rejected("tensor 'b' at data offset 4 overlaps tensor 'a'"),
    "offsets_strings": rejected("expected a non-negative integer"),
    "offsets_zero_size_inside_another": rejected("tensor 'z' at data offset 4 overlaps"),
    "offsets_zero_size_shared": valid(
        lambda: {"z0": torch.empty(0), "a": one(), "z1": torch.empty(0, 3)}
    ),
    # zerockpt.state_dict_metadata
    "sdm_array": state_dict_metadata_rejected(NOT_OBJECT),
    "sdm_deep_arrays_100k": state_dict_metadata_rejected("recursion"),
    "sdm_deep_in_value_100k": state_dict_metadata_rejected("recursion"),
    # The file's _metadata turns assign on: as torch does for such a state dict, the parameter
    # is replaced (here by a view of the file's private mapping) instead of copied into.
    "sdm_forces_assign": valid(
        only_a, state_dict_metadata={"": {"version": 1, "assign_to_params_buffers": True}}
    ),
    "sdm_huge_integer": state_dict_metadata_rejected("digits"),
    "sdm_infinity": state_dict_metadata_rejected("Infinity is not JSON"),
    "sdm_lone_surrogate_key": valid(
        only_a, state_dict_metadata={"\ud800": {"version": 1}, "": {"version": 1}}
    ),
    "sdm_nan": state_dict_metadata_rejected("NaN is not JSON"),
    "sdm_not_json": state_dict_metadata_rejected(),
    "sdm_number": state_dict_metadata_rejected(NOT_OBJECT),
    "sdm_values_not_objects": state_dict_metadata_rejected(NOT_OBJECT),
    "sdm_version_1e400": valid(only_a, state_dict_metadata={"": {"version": math.inf}}),
    # shapes
    "shape_bool": rejected("expected a non-negative integer"),
    "shape_dim_2pow64": rejected("integer does not fit in 64 bits"),
    "shape_exponent_1e400": rejected("expected an integer, got a fraction or exponent"),
    "shape_float": rejected("expected an integer, got a fraction or exponent"),
    "shape_huge_tiny_file": rejected("'a': data_offsets [0, 4398046511104] run past the end"),
    "shape_nan": rejected("expected a non-negative integer"),
    "shape_negative_zero": rejected("got a negative number"),
    "shape_nested_list": rejected("expected a non-negative integer"),
    "shape_object": rejected("'a': shape is not a list of integers"),
    "shape_product_overflows_int64": rejected("'a': shape is too large (byte size overflows)"),
    "shape_product_overflows_uint64": rejected("'a': shape is too large (byte size overflows)"),
    "shape_product_wraps_to_4": rejected("'a': shape is too large (byte size overflows)"),
    "shape_rank_1000000": rejected("'a': shape has more than 1024 dimensions"),
    "shape_rank_1024": valid(
        lambda: {"a": torch.ones([1] * 1024)}, model=lambda: ModelA(torch.zeros([1] * 1024))
    ),
    "shape_string": rejected("expected a non-negative integer"),
    # zero-element tensors with extreme dimensions
    "zero_elements_dim_2pow64_minus1": tensors_fail(
        FormatError, "'a': shape [0, 18446744073709551615] does not fit torch's int64"
    ),
    "zero_elements_huge_dims_before_zero": rejected("'a': shape is too large"),
    "zero_elements_large_dims": valid(
        lambda: {"a": torch.empty(0, HUGE, HUGE)},
        model=lambda: ModelA(torch.empty(0, HUGE, HUGE)),
    ),
    "zero_elements_strides_overflow": tensors_fail(
        FormatError, "'a': shape [0, 4611686018427387904, 4611686018427387904] does not fit"
    ),
}


# --- running one entry point ----------------------------------------------------------------


def run_open(path: Path, model: nn.Module) -> Any:
    with zerockpt.open(path) as f:
        keys = f.keys()
        return keys, {k: f.info(k) for k in keys}, f.metadata()


def run_get_tensor(path: Path, model: nn.Module) -> Any:
    with zerockpt.open(path) as f:
        keys = f.keys()
        return keys, {k: (f.get_tensor(k), f.get_tensor(k, mmap=False)) for k in keys}


def run_load_state_dict(path: Path, model: nn.Module) -> Any:
    return zerockpt.load_state_dict(model, path, strict=False)


RUN: dict[str, Callable[[Path, nn.Module], Any]] = {
    "open": run_open,
    "get_tensor": run_get_tensor,
    "load_mmap": lambda path, model: zerockpt.load(path, mmap=True),
    "load_read": lambda path, model: zerockpt.load(path, mmap=False),
    "load_state_dict": run_load_state_dict,
    "verify": lambda path, model: zerockpt.verify(path),
}


def _status(field: str) -> int:
    """A /proc/self/status memory figure, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def peak_rss_growth(work: Callable[[], Any]) -> tuple[Any, BaseException | None, int]:
    """Runs `work`; returns its result or exception and the peak RSS growth while it ran.

    The kernel's high-water mark (VmHWM) is reset to the current RSS first (clear_refs 5, as
    tests/test_memory.py does in its children); where that is not allowed, the RSS after the
    call is used instead (a weaker bound).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        peak_field = "VmHWM"
    except OSError:
        peak_field = "VmRSS"
    before = _status("VmRSS")
    result: Any = None
    error: BaseException | None = None
    try:
        result = work()
    except Exception as e:
        error = e
    return result, error, _status(peak_field) - before


def assert_tensors_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, t in want.items():
        g = got[name]
        assert (g.dtype, g.shape) == (t.dtype, t.shape), name
        assert t.numel() == 0 or torch.equal(g, t), name


def check_loaded(
    op: str, result: Any, expected: Loads, want: dict[str, torch.Tensor], model: nn.Module
) -> None:
    if op == "open":
        keys, infos, _ = result
        assert keys == list(want)
        for name, t in want.items():
            info = infos[name]
            assert (info.dtype, info.shape) == (t.dtype, tuple(t.shape)), name
            assert info.alias_of == expected.aliases.get(name), name
    elif op == "get_tensor":
        keys, pairs = result
        assert keys == list(want)
        assert_tensors_equal({k: p[0] for k, p in pairs.items()}, want)
        assert_tensors_equal({k: p[1] for k, p in pairs.items()}, want)
    elif op in ("load_mmap", "load_read"):
        assert_tensors_equal(result, want)
        for alias, target in expected.aliases.items():
            assert result[alias] is result[target]
        if expected.state_dict_metadata is None:
            assert not hasattr(result, "_metadata")
        else:
            assert dict(result._metadata) == expected.state_dict_metadata
    else:
        assert op == "load_state_dict"
        fresh = dict(model.state_dict())
        for name, t in fresh.items():
            if name in want:
                assert (t.dtype, t.shape) == (want[name].dtype, want[name].shape), name
                assert torch.equal(t, want[name]), name


@pytest.mark.parametrize(
    ("name", "op"),
    [
        pytest.param(
            name,
            op,
            id=f"{name.removesuffix('.safetensors')}-{op}",
            marks=[pytest.mark.xfail(strict=True, reason=reason)]
            if (reason := EXPECTED.get(name.removesuffix(".safetensors"), Expect({})).bugs.get(op))
            else [],
        )
        for name in FILES
        for op in OPS
    ],
)
def test_corpus_file(name: str, op: str) -> None:
    if EXPECTED[name.removesuffix(".safetensors")].crashes:
        in_forked_child(lambda: check_corpus_file(name, op))
    else:
        check_corpus_file(name, op)


def check_corpus_file(name: str, op: str) -> None:
    path = CORPUS / name
    expect = EXPECTED[name.removesuffix(".safetensors")]
    outcome = expect.outcomes[op]
    model = expect.model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    want = outcome.tensors() if isinstance(outcome, Loads) else {}

    result, error, growth = peak_rss_growth(lambda: RUN[op](path, model))

    limit = expect.rss_limit or max(16 * MiB, 8 * path.stat().st_size)
    assert growth <= limit, f"peak RSS grew by {growth / MiB:.1f} MiB (limit {limit / MiB:.0f})"
    if isinstance(outcome, Raises):
        assert error is not None, f"{op} succeeded on {name}, expected {outcome.exc.__name__}"
        message = str(error)
        assert type(error) is outcome.exc, f"{type(error).__name__}: {message}"
        if outcome.exc is not RuntimeError:  # ours; RuntimeError is torch's own size mismatch
            assert str(path) in message
        for word in outcome.words:
            assert word in message, f"{word!r} not in {message!r}"
        assert len(message) < len(str(path)) + 1024, "unbounded error message"
        # Nothing was loaded into the model.
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
        return
    if error is not None:
        raise error
    if isinstance(outcome, Opens):
        assert result[0] == list(outcome.keys)
    elif isinstance(outcome, Verifies):
        assert (result.path, result.has_checksums) == (str(path), outcome.has_checksums)
        assert result.failed == outcome.failed
    else:
        check_loaded(op, result, outcome, want, model)


def in_forked_child(check: Callable[[], None]) -> None:
    """Runs `check` in a fork of this process: a crash there fails the test, not the run."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running any of pytest's cleanup
        faulthandler.disable()  # the signal is the report
        os.close(read_end)
        code = 0
        try:
            check()
        except BaseException:
            os.write(write_end, traceback.format_exc()[-8000:].encode())
            code = 1
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        pytest.fail(f"crashed with signal {os.WTERMSIG(status)}", pytrace=False)
    assert os.WEXITSTATUS(status) == 0, report


def test_every_corpus_file_has_an_expectation() -> None:
    stems = {name.removesuffix(".safetensors") for name in FILES}
    assert stems == set(EXPECTED)
    assert all(set(e.outcomes) == set(OPS) for e in EXPECTED.values())
    assert len(FILES) >= 40


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("make_malicious", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # for its dataclasses
    spec.loader.exec_module(module)
    return module


def test_corpus_is_what_the_generator_writes() -> None:
    """The checked-in files are up to date (rerun tests/corpus/make_malicious.py if not)."""
    files: dict[str, bytes] = _generator().build()
    on_disk = {p.name for p in CORPUS.iterdir()}
    assert on_disk == set(files)
    for name, content in files.items():
        assert (CORPUS / name).read_bytes() == content, f"{name} is stale"


def test_generator_is_deterministic_and_files_are_small(tmp_path: Path) -> None:
    generator = _generator()
    generator.write(tmp_path)
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    generator.write(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == first
    # Small except the two whose attack is their size (a rank-10^6 shape, 65,536 tensors).
    big = {n for n, b in first.items() if len(b) > 256 * 1024}
    assert big == {"shape_rank_1000000.safetensors", "many_tensors_65536.safetensors"}
