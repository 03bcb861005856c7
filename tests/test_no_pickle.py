"""zerockpt never unpickles: pickled checkpoints are refused as not safetensors, without running
their payload, and nothing pickle-based runs while a normal file is read."""

from __future__ import annotations

import _pickle
import ast
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._utils
import torch._weights_only_unpickler
import torch.serialization
import zerockpt
from conftest import assert_bitwise_equal
from torch import nn
from zerockpt import FormatError

PACKAGE = Path(zerockpt.__file__).resolve().parent
SOURCES = Path(__file__).resolve().parent.parent / "python" / "zerockpt"


class Payload:
    """Unpickling this calls os.mkdir(sentinel): the stand-in for arbitrary code execution."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (os.mkdir, (str(self.sentinel),))


def evil_state_dict(sentinel: Path) -> dict[str, Any]:
    return {"weight": torch.ones(2, 2), "bias": torch.zeros(2), "evil": Payload(sentinel)}


def write_malicious(kind: str, directory: Path, sentinel: Path) -> Path:
    """A checkpoint whose unpickling creates `sentinel`, in one of the pickle-based formats."""
    obj = evil_state_dict(sentinel)
    if kind == "torch-zip":
        path = directory / "evil.pt"
        torch.save(obj, path)
    elif kind == "torch-zip-renamed":
        path = directory / "evil.safetensors"
        torch.save(obj, path)
    elif kind == "torch-legacy":
        path = directory / "legacy.safetensors"
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    elif kind == "raw-pickle":
        path = directory / "raw.safetensors"
        path.write_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    elif kind == "raw-pickle-protocol-0":
        path = directory / "raw0.bin"
        path.write_bytes(pickle.dumps(Payload(sentinel), protocol=0))
    else:
        raise AssertionError(kind)
    return path


KINDS = ["torch-zip", "torch-zip-renamed", "torch-legacy", "raw-pickle", "raw-pickle-protocol-0"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_payload_is_live(tmp_path: Path, kind: str) -> None:
    """Control: each file really runs its payload when unpickled, so the test below is not
    vacuous."""
    sentinel = tmp_path / "pwned"
    path = write_malicious(kind, tmp_path, sentinel)
    with path.open("rb") as f:
        if kind.startswith("torch"):
            torch.load(f, weights_only=False)
        else:
            pickle.load(f)
    assert sentinel.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_pickled_checkpoints_are_refused_without_running_them(tmp_path: Path, kind: str) -> None:
    sentinel = tmp_path / "pwned"
    path = write_malicious(kind, tmp_path, sentinel)
    model = nn.Linear(2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loaders: list[Callable[[], object]] = [
        lambda: zerockpt.load(path),
        lambda: zerockpt.load(path, mmap=False),
        lambda: zerockpt.load(path, verify=True),
        lambda: zerockpt.open(path),
        lambda: zerockpt.verify(path),
        lambda: zerockpt.load_state_dict(model, path),
        lambda: zerockpt.load_state_dict(model, path, strict=False, assign=True),
    ]
    for load in loaders:
        with pytest.raises(FormatError) as info:
            load()
        assert str(path) in str(info.value)
    assert not sentinel.exists()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _refuse(name: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"{name} was called while reading a safetensors file")

    return refuse


# Every entry point into unpickling (Python's, torch's and torch's weights-only unpickler) and
# the functions that rebuild tensors and parameters from a pickle. (Not marshal: the import
# system itself uses it to read .pyc files.)
UNPICKLING: list[tuple[Any, str]] = [
    (pickle, "load"),
    (pickle, "loads"),
    (pickle, "Unpickler"),
    (pickle, "_Unpickler"),
    (pickle, "_load"),
    (pickle, "_loads"),
    (_pickle, "load"),
    (_pickle, "loads"),
    (_pickle, "Unpickler"),
    (torch, "load"),
    (torch.serialization, "load"),
    (torch.serialization, "_load"),
    (torch.serialization, "_legacy_load"),
    (torch._weights_only_unpickler, "load"),
    (torch._weights_only_unpickler, "Unpickler"),
    (torch._utils, "_rebuild_tensor"),
    (torch._utils, "_rebuild_tensor_v2"),
    (torch._utils, "_rebuild_parameter"),
    (torch.Tensor, "__setstate__"),
]


class Model(nn.Module):
    """Parameters, buffers, a BatchNorm (whose _load_from_state_dict reads _metadata versions)
    and tied weights (stored once, as an alias)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.block = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_nothing_pickle_based_runs_while_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    source = Model()
    source.get_buffer("block.1.running_mean").uniform_()
    path = tmp_path / "model.safetensors"
    zerockpt.save(source, path)
    expected = source.state_dict()

    for owner, name in UNPICKLING:
        assert hasattr(owner, name), f"{owner.__name__}.{name} no longer exists"
        monkeypatch.setattr(owner, name, _refuse(f"{owner.__name__}.{name}"))

    for mmap in (True, False):
        loaded = zerockpt.load(path, mmap=mmap, verify=True)
        assert list(loaded) == list(expected)
        for k, v in expected.items():
            assert_bitwise_equal(loaded[k], v)
        assert loaded["head.weight"] is loaded["embed.weight"]
        assert dict(loaded._metadata) == dict(expected._metadata)  # type: ignore[attr-defined]
    with zerockpt.open(path) as f:
        assert f.keys() == list(expected)
        assert "zerockpt.version" in f.metadata()
        for k, v in expected.items():
            assert_bitwise_equal(f.get_tensor(k), v)
            assert_bitwise_equal(f.get_tensor(k, mmap=False), v)
    assert zerockpt.verify(path).ok
    for assign in (False, True):
        target = Model()
        result = zerockpt.load_state_dict(target, path, assign=assign, verify=True)
        assert result.missing_keys == [] and result.unexpected_keys == []
        for k, v in target.state_dict().items():
            assert_bitwise_equal(v, expected[k])
    # Also from a mapping (the dict load() returned), through torch's own loop.
    target = Model()
    zerockpt.load_state_dict(target, zerockpt.load(path))
    for k, v in target.state_dict().items():
        assert_bitwise_equal(v, expected[k])
    monkeypatch.undo()


# --- static check: the package source never unpickles ------------------------------------------

FORBIDDEN_MODULES = {"pickle", "_pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle"}
FORBIDDEN_MODULES |= {"joblib", "pickletools", "copyreg"}


def _dotted(node: ast.AST) -> str | None:
    """'a.b.c' for a Name/Attribute chain, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def unpickling_uses(source: str, filename: str = "<source>") -> list[str]:
    """Imports of pickle-like modules, and torch.load calls without weights_only=True."""
    tree = ast.parse(source, filename)
    problems: list[str] = []
    # Local names bound to torch.load (from torch import load as L; from torch.serialization ...).
    load_names = {"torch.load", "torch.serialization.load"}
    torch_aliases = {"torch"}
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in FORBIDDEN_MODULES:
                    problems.append(f"{where}: import {alias.name}")
                if alias.name == "torch" and alias.asname:
                    torch_aliases.add(alias.asname)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.split(".")[0] in FORBIDDEN_MODULES:
                problems.append(f"{where}: from {module} import ...")
            for alias in node.names:
                if module in ("torch", "torch.serialization") and alias.name == "load":
                    load_names.add(alias.asname or alias.name)
                if alias.name in FORBIDDEN_MODULES:
                    problems.append(f"{where}: from {module} import {alias.name}")
        elif isinstance(node, ast.Call):
            # __import__("pickle") / importlib.import_module("pickle")
            func = _dotted(node.func)
            if (
                func in ("__import__", "importlib.import_module", "import_module")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and str(node.args[0].value).split(".")[0] in FORBIDDEN_MODULES
            ):
                problems.append(f"{where}: {func}({node.args[0].value!r})")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = _dotted(node.func)
        if func is None:
            continue
        head, _, rest = func.partition(".")
        if head in torch_aliases:
            func = "torch." + rest if rest else "torch"
        if func in load_names:
            safe = any(
                k.arg == "weights_only"
                and isinstance(k.value, ast.Constant)
                and k.value.value is True
                for k in node.keywords
            )
            if not safe:
                problems.append(f"{filename}:{node.lineno}: {func}(...) without weights_only=True")
    return problems


def test_package_source_never_unpickles() -> None:
    files = sorted(SOURCES.glob("*.py"))
    assert len(files) >= 3
    problems = [p for f in files for p in unpickling_uses(f.read_text(), f.name)]
    assert problems == []


def test_installed_package_is_the_checked_source() -> None:
    # The static check is only worth something if it reads the code that runs.
    assert SOURCES.resolve() == PACKAGE or all(
        (PACKAGE / f.name).read_bytes() == f.read_bytes() for f in SOURCES.glob("*.py")
    )


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "import pickle as p",
        "import _pickle",
        "from pickle import loads",
        "import marshal",
        "import shelve",
        "from os import path\nimport dill",
        "__import__('pickle')",
        "import importlib\nimportlib.import_module('cloudpickle')",
        "import torch\ntorch.load('x')",
        "import torch\ntorch.load('x', weights_only=False)",
        "import torch as T\nT.load('x')",
        "from torch import load\nload('x')",
        "from torch import load as L\nL('x')",
        "import torch.serialization\ntorch.serialization.load('x')",
        "import torch\ntorch.load('x', **kwargs)",
    ],
)
def test_static_check_catches(snippet: str) -> None:
    assert unpickling_uses(snippet) != []


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load('x', weights_only=True)",
        "import json\njson.loads('1')",
        "import torch\ntorch.save({}, 'x')",
        "def load(x):\n    return x\nload(1)",
    ],
)
def test_static_check_allows(snippet: str) -> None:
    assert unpickling_uses(snippet) == []
