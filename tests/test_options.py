"""One options object crosses the binding: the public C++ header's SaveOptions and LoadOptions,
bound as ``_C.SaveOptions``/``_C.LoadOptions`` and built only by ``zerockpt._args``."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
import zerockpt
from zerockpt import _C, _args

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "include" / "zerockpt" / "zerockpt.h"


def _header_fields(struct: str) -> list[str]:
    """The member names of ``struct`` in the public C++ header, in order."""
    text = HEADER.read_text(encoding="utf-8")
    body = re.search(r"struct " + struct + r" \{(.*?)\n\};", text, re.S)
    assert body, struct
    code = "\n".join(line.split("//")[0] for line in body.group(1).splitlines())
    # Each member is "type name;" or "type name = default;".
    return [stmt.split("=")[0].split()[-1] for stmt in code.split(";") if stmt.strip()]


def _attributes(cls: type) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_")}


@pytest.mark.skipif(not HEADER.exists(), reason="needs the source tree")
@pytest.mark.parametrize("cls", [_C.SaveOptions, _C.LoadOptions], ids=lambda c: c.__name__)
def test_binding_has_exactly_the_header_fields(cls: type) -> None:
    fields = _header_fields(cls.__name__)
    assert fields, "no fields parsed"
    assert _attributes(cls) == set(fields)


def test_defaults_are_the_headers() -> None:
    save = _C.SaveOptions()
    assert (save.durable, save.direct_io, save.threads, save.checksums) == (True, None, 0, True)
    assert (save.metadata, save.staging_bytes) == ({}, 0)
    load = _C.LoadOptions()
    assert (load.mmap, load.threads, load.verify, load.staging_bytes) == (True, 0, False, 0)
    assert load.device == torch.device("cpu")


def test_builders_set_every_field() -> None:
    save = _args.save_options(
        metadata={"k": "v"},
        durable=False,
        direct_io=True,
        threads=3,
        checksums=False,
        staging_bytes=16 << 20,
    )
    assert (save.metadata, save.durable, save.direct_io) == ({"k": "v"}, False, True)
    assert (save.threads, save.checksums, save.staging_bytes) == (3, False, 16 << 20)
    load = _args.load_options(
        mmap=False, threads=2, verify=True, device=torch.device("meta"), staging_bytes=1 << 24
    )
    assert (load.mmap, load.threads, load.verify) == (False, 2, True)
    assert (load.device, load.staging_bytes) == (torch.device("meta"), 1 << 24)


@pytest.mark.parametrize(
    ("metadata", "words"),
    [
        ({"a": 1}, "metadata must map str to str, got 'a': 1"),
        ({1: "a"}, "metadata must map str to str, got 1: 'a'"),
        ([("a", "b")], "metadata must be a dict of str to str or None, got list"),
        ("text", "metadata must be a dict of str to str or None, got str"),
    ],
)
def test_metadata_is_checked_when_the_options_are_built(metadata: object, words: str) -> None:
    with pytest.raises(TypeError, match=re.escape(words)):
        _args.save_options(metadata=metadata)  # type: ignore[arg-type]


def test_public_functions_take_the_options_they_cross_with() -> None:
    """Every option of the C++ structs is a keyword of the functions that build them, except
    save_async's (documented) progress and staging_bytes."""
    save_fields = set(_header_fields("SaveOptions")) if HEADER.exists() else set()
    load_fields = set(_header_fields("LoadOptions")) if HEADER.exists() else set()
    save = set(inspect.signature(zerockpt.save).parameters)
    save_async = set(inspect.signature(zerockpt.save_async).parameters)
    load = set(inspect.signature(zerockpt.load).parameters)
    assert save_fields <= save
    assert save_fields - {"staging_bytes"} <= save_async
    assert "staging_bytes" in (zerockpt.save_async.__doc__ or "")
    assert load_fields <= load


def test_save_with_options_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    zerockpt.save({"w": torch.arange(6.0)}, path, metadata={"k": "v"}, durable=False, threads=2)
    with zerockpt.open(path) as f:
        assert f.metadata()["k"] == "v"
    assert torch.equal(zerockpt.load(path, mmap=False, threads=1)["w"], torch.arange(6.0))
