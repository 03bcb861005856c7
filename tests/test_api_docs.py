"""The public API is typed and documented, and the extension's stub matches the extension.

Public: every name in ``zerockpt.__all__`` and ``zerockpt.dcp.__all__``. Docstrings follow the
Google style the package uses (``Args:``, ``Returns:``, ``Raises:`` sections, entries as
``name: text``); these tests read them with :mod:`inspect` and hold them to the signatures, so a
parameter added, renamed or removed without its documentation fails here.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import doctest
import importlib
import importlib.util
import inspect
import re
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import zerockpt
import zerockpt.dcp
from zerockpt import _C

PACKAGE_DIR = Path(zerockpt.__file__).resolve().parent
PUBLIC_MODULES: dict[str, types.ModuleType] = {
    "zerockpt": zerockpt,
    "zerockpt.dcp": zerockpt.dcp,
    "zerockpt.distributed": importlib.import_module("zerockpt.distributed"),
}
# The integrations, where their library (an optional extra) is installed.
for _name, _library in (
    ("zerockpt.lightning", "lightning"),
    ("zerockpt.transformers", "transformers"),
    ("zerockpt.accelerate", "accelerate"),
):
    if importlib.util.find_spec(_library) is not None:
        PUBLIC_MODULES[_name] = importlib.import_module(_name)
# Public functions that raise nothing of their own, so have no Raises: section (and must not).
RAISES_NOTHING = {
    # Waits for the save in flight and frees memory; that save's error stays with its
    # PendingSave.
    "zerockpt.release_snapshot_buffer",
}

_SECTION = re.compile(
    r"(Args|Arguments|Attributes|Returns|Yields|Raises|Examples?|Notes?|Warnings?):[ \t]*"
)
_ARG_ENTRY = re.compile(r"(\*{0,2}[A-Za-z_]\w*)(?: \([^)]*\))?:(?:\s|$)")
_RAISES_ENTRY = re.compile(r"([A-Za-z_][\w.]*(?:, [A-Za-z_][\w.]*)*):(?:\s|$)")


# --- docstring parsing --------------------------------------------------------------------------


def _sections(doc: str, where: str) -> dict[str, list[str]]:
    """The Google-style sections of ``doc``: header -> its (indented) lines."""
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for line in inspect.cleandoc(doc).splitlines():
        match = _SECTION.fullmatch(line)
        if match:
            current = match.group(1)
            assert current not in sections, f"{where}: two {current}: sections"
            sections[current] = []
        elif current is not None:
            if line.strip() and not line[0].isspace():
                current = None  # text back at the left margin ends the section
            else:
                sections[current].append(line)
    return sections


def _entries(lines: list[str], pattern: re.Pattern[str], section: str, where: str) -> list[str]:
    """The names of a section's entries: its lines at the section's own indentation."""
    body = [line for line in lines if line.strip()]
    assert body, f"{where}: empty {section}: section"
    indent = min(len(line) - len(line.lstrip()) for line in body)
    names = []
    for line in body:
        if len(line) - len(line.lstrip()) == indent:
            match = pattern.match(line.strip())
            assert match, f"{where}: {section}: entry {line.strip()!r} is not 'name: text'"
            names.append(match.group(1))
    return names


def _documented_params(sections: dict[str, list[str]], section: str, where: str) -> list[str]:
    if section not in sections:
        return []
    names = _entries(sections[section], _ARG_ENTRY, section, where)
    duplicated = {n for n in names if names.count(n) > 1}
    assert not duplicated, f"{where}: {section}: documents {sorted(duplicated)} twice"
    return names


def _resolve_exception(name: str) -> object:
    """The class a Raises: entry names: a builtin, a zerockpt name, or a dotted path."""
    if hasattr(builtins, name):
        return getattr(builtins, name)
    if hasattr(zerockpt, name):
        return getattr(zerockpt, name)
    module, _, attr = name.rpartition(".")
    if module:
        return getattr(importlib.import_module(module), attr, None)
    return None


def _check_raises(sections: dict[str, list[str]], where: str) -> None:
    for entry in _entries(sections["Raises"], _RAISES_ENTRY, "Raises", where):
        for name in entry.split(", "):
            cls = _resolve_exception(name)
            assert isinstance(cls, type) and issubclass(cls, BaseException), (
                f"{where}: Raises: {name!r} is not an exception class"
            )


def _own_doc(obj: Any) -> str:
    """The docstring written for ``obj`` itself (not inherited, not a dataclass's default)."""
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else obj.__doc__
    if not isinstance(doc, str) or not doc.strip():
        return ""
    if (
        isinstance(obj, type)
        and dataclasses.is_dataclass(obj)
        and doc.startswith(f"{obj.__name__}(")
    ):
        return ""  # the signature dataclasses put there when there is no docstring
    return doc


def _check_summary(doc: str, where: str) -> None:
    assert doc, f"{where}: no docstring"
    summary = inspect.cleandoc(doc).splitlines()[0]
    assert summary.strip() and summary.rstrip().endswith("."), (
        f"{where}: the docstring's first line should be a one-line summary ending in '.': "
        f"{summary!r}"
    )


# --- what is public -----------------------------------------------------------------------------


def _public_objects() -> Iterator[tuple[str, Any]]:
    for module_name, module in PUBLIC_MODULES.items():
        for name in module.__all__:
            yield f"{module_name}.{name}", getattr(module, name)


def _callables(cls: type) -> Iterator[tuple[str, Any]]:
    """Public methods and properties defined in ``cls`` itself: ``(name, member)``."""
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(member, property | classmethod | staticmethod) or inspect.isfunction(member):
            yield name, member


PUBLIC_FUNCTIONS = [(n, o) for n, o in _public_objects() if inspect.isfunction(o)]
PUBLIC_CLASSES = [
    (n, o) for n, o in _public_objects() if isinstance(o, type) and not issubclass(o, BaseException)
]
PUBLIC_EXCEPTIONS = [
    (n, o) for n, o in _public_objects() if isinstance(o, type) and issubclass(o, BaseException)
]
PUBLIC_METHODS = [
    (f"{n}.{name}", cls, name, member)
    for n, cls in PUBLIC_CLASSES
    for name, member in _callables(cls)
]


def _is_protocol_hook(cls: type, name: str) -> bool:
    """Whether ``name`` overrides a method of a torch base class (e.g. DCP's StorageWriter).

    Such hooks are called by torch, not by users: they need a docstring saying what they do,
    but not the Args/Returns sections of methods users call.
    """
    return any(
        name in vars(base) for base in cls.__mro__[1:] if base.__module__.startswith("torch")
    )


def _check_annotations(func: Callable[..., Any], where: str, *, method: bool) -> None:
    signature = inspect.signature(func, eval_str=True)  # raises if an annotation does not resolve
    params = list(signature.parameters.values())
    if method:
        params = params[1:]  # self or cls
    missing = [p.name for p in params if p.annotation is inspect.Parameter.empty]
    assert not missing, f"{where}: parameters {missing} are not annotated"
    assert signature.return_annotation is not inspect.Signature.empty, (
        f"{where}: the return type is not annotated"
    )


def _param_names(func: Callable[..., Any], *, method: bool) -> list[str]:
    params = list(inspect.signature(func).parameters.values())
    if method:
        params = params[1:]
    stars: dict[inspect._ParameterKind, str] = {
        inspect.Parameter.VAR_POSITIONAL: "*",
        inspect.Parameter.VAR_KEYWORD: "**",
    }
    return [stars.get(p.kind, "") + p.name for p in params]


def _returns_none(func: Callable[..., Any]) -> bool:
    return inspect.signature(func, eval_str=True).return_annotation in (None, type(None))


def _check_callable(
    func: Callable[..., Any], where: str, *, method: bool, raises: bool | None
) -> None:
    """Docstring with Args naming every parameter, Returns unless it returns None, Raises if
    ``raises`` (forbidden if False, optional if None); every annotation present."""
    _check_annotations(func, where, method=method)
    doc = _own_doc(func)
    _check_summary(doc, where)
    sections = _sections(doc, where)
    params = _param_names(func, method=method)
    documented = _documented_params(sections, "Args", where)
    if params:
        assert "Args" in sections, f"{where}: no Args: section for {params}"
    missing = [p for p in params if p not in documented]
    assert not missing, f"{where}: Args: does not document {missing}"
    stale = [d for d in documented if d not in params]
    assert not stale, f"{where}: Args: documents {stale}, which are not parameters"
    if _returns_none(func):
        assert "Returns" not in sections, f"{where}: returns None but has a Returns: section"
    else:
        assert "Returns" in sections, f"{where}: no Returns: section"
        assert any(line.strip() for line in sections["Returns"]), f"{where}: empty Returns:"
    if raises is True:
        assert "Raises" in sections, f"{where}: no Raises: section"
    elif raises is False:
        assert "Raises" not in sections, f"{where}: raises nothing, but has a Raises: section"
    if "Raises" in sections:
        _check_raises(sections, where)


# --- the public surface -------------------------------------------------------------------------


@pytest.mark.parametrize("module_name", list(PUBLIC_MODULES))
def test_all_names_exist_once(module_name: str) -> None:
    module = PUBLIC_MODULES[module_name]
    names = list(module.__all__)
    assert len(names) == len(set(names)), f"{module_name}.__all__ has duplicates"
    missing = [n for n in names if not hasattr(module, n)]
    assert not missing, f"{module_name}.__all__ names {missing}, which it does not define"


def test_package_exports_every_public_function_and_class() -> None:
    """Nothing zerockpt defines and exposes at the top level escapes ``__all__`` (and these
    checks)."""
    exposed = {
        name
        for name, obj in vars(zerockpt).items()
        if not name.startswith("_")
        and (inspect.isfunction(obj) or isinstance(obj, type))
        and getattr(obj, "__module__", "").partition(".")[0] == "zerockpt"
    }
    assert exposed - set(zerockpt.__all__) == set()


def test_dcp_all_lists_exactly_what_dcp_defines() -> None:
    """``zerockpt.dcp.__all__``: every public function, class and constant defined in dcp.py,
    and none of the names it imports (from torch or elsewhere)."""
    tree = ast.parse(Path(zerockpt.dcp.__file__).read_text(encoding="utf-8"))
    defined: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            defined.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined.add(node.target.id)
    public = {n for n in defined if not n.startswith("_")}
    assert set(zerockpt.dcp.__all__) == public
    for name in zerockpt.dcp.__all__:
        obj = getattr(zerockpt.dcp, name)
        if inspect.isfunction(obj) or isinstance(obj, type):
            assert obj.__module__ == "zerockpt.dcp", f"zerockpt.dcp.{name} is {obj.__module__}'s"


def test_public_surface_is_covered() -> None:
    """The lists these tests walk are the API (guards against a collection bug that checks
    nothing)."""
    functions = {n for n, _ in PUBLIC_FUNCTIONS}
    classes = {n for n, _ in PUBLIC_CLASSES}
    assert {"zerockpt.save", "zerockpt.load", "zerockpt.dcp.to_file"} <= functions
    assert {"zerockpt.Checkpointer", "zerockpt.dcp.Writer", "zerockpt.dcp.Reader"} <= classes
    assert {n for n, _ in PUBLIC_EXCEPTIONS} == {"zerockpt.FormatError", "zerockpt.ChecksumError"}
    assert functions >= RAISES_NOTHING
    assert len(PUBLIC_METHODS) > 30


# --- functions ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("where", "func"), PUBLIC_FUNCTIONS, ids=[n for n, _ in PUBLIC_FUNCTIONS])
def test_function_documented_and_typed(where: str, func: Callable[..., Any]) -> None:
    """Args naming every parameter, Returns unless it returns None, Raises, full annotations."""
    _check_callable(func, where, method=False, raises=where not in RAISES_NOTHING)


# --- classes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("where", "cls"), PUBLIC_EXCEPTIONS, ids=[n for n, _ in PUBLIC_EXCEPTIONS])
def test_exception_documented(where: str, cls: type) -> None:
    _check_summary(_own_doc(cls), where)


@pytest.mark.parametrize(("where", "cls"), PUBLIC_CLASSES, ids=[n for n, _ in PUBLIC_CLASSES])
def test_class_documented_and_typed(where: str, cls: type) -> None:
    """A class docstring; every constructor parameter documented (Args: of the class or its
    ``__init__``; for a dataclass, whose parameters are its fields, Attributes:) and annotated."""
    doc = _own_doc(cls)
    _check_summary(doc, where)
    init = vars(cls).get("__init__")
    params = _param_names(cls, method=False)
    constructor = next(k for k in cls.__mro__ if "__init__" in vars(k))
    if constructor.__module__.partition(".")[0] != "zerockpt":
        params = []  # another library's constructor (transformers.Trainer's), documented there
    if init is not None:
        _check_annotations(init, f"{where}.__init__", method=True)
    if dataclasses.is_dataclass(cls):
        section = "Attributes"
        documented = _documented_params(_sections(doc, where), section, where)
    else:
        section = "Args"
        documented = _documented_params(_sections(doc, where), section, where)
        if init is not None and _own_doc(init):
            assert not documented, f"{where}: Args: in both the class and __init__ docstrings"
            documented = _documented_params(_sections(_own_doc(init), where), section, where)
    missing = [p for p in params if p not in documented]
    assert not missing, f"{where}: {section}: does not document constructor parameters {missing}"
    stale = [d for d in documented if d not in params]
    assert not stale, f"{where}: {section}: documents {stale}, which are not parameters"


@pytest.mark.parametrize(
    ("where", "cls", "name", "member"),
    PUBLIC_METHODS,
    ids=[w for w, *_ in PUBLIC_METHODS],
)
def test_method_documented_and_typed(where: str, cls: type, name: str, member: Any) -> None:
    """Each public method and property the class defines: docstring and annotations; methods
    users call also Args naming each parameter and Returns unless they return None. Overrides
    of torch's hooks (DCP's StorageWriter/StorageReader protocol) need only the docstring."""
    if isinstance(member, property):
        assert member.fget is not None
        _check_annotations(member.fget, where, method=True)
        _check_summary(_own_doc(member.fget), where)
        return
    func = member.__func__ if isinstance(member, classmethod | staticmethod) else member
    is_method = not isinstance(member, staticmethod)
    if _is_protocol_hook(cls, name):
        _check_annotations(func, where, method=is_method)
        _check_summary(_own_doc(func), where)
        return
    _check_callable(func, where, method=is_method, raises=None)


# --- typing files -------------------------------------------------------------------------------


def test_py_typed_marker() -> None:
    assert (PACKAGE_DIR / "py.typed").is_file()


def _stub() -> ast.Module:
    return ast.parse((PACKAGE_DIR / "_C.pyi").read_text(encoding="utf-8"))


def _stub_names(body: list[ast.stmt]) -> dict[str, ast.stmt]:
    """Names a stub body defines (functions, classes, variables), without its imports."""
    names: dict[str, ast.stmt] = {}
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
        elif isinstance(node, ast.Assign):
            names.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
    return names


def _is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def test_stub_declares_exactly_the_extension_attributes() -> None:
    """``_C.pyi`` and the compiled ``zerockpt._C`` name the same attributes (private testing
    aids included, dunders excluded)."""
    runtime = {n for n in dir(_C) if not _is_dunder(n)}
    stub = {n for n in _stub_names(_stub().body) if not _is_dunder(n)}
    assert sorted(runtime - stub) == [], "in zerockpt._C but not in _C.pyi"
    assert sorted(stub - runtime) == [], "in _C.pyi but not in zerockpt._C"


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _runtime_params(obj: Any) -> list[tuple[str, bool]]:
    """``(name, has_default)`` of a pybind11 function, from the signature in its docstring."""
    first = (obj.__doc__ or "").splitlines()[0]
    match = re.match(r"\w+\((.*)\) ->", first)
    assert match, f"no pybind11 signature in {first!r}"
    params = []
    for part in _split_top_level(match.group(1)):
        name = re.match(r"\w+", part)
        assert name, part
        params.append((name.group(0), "=" in part))
    return [p for p in params if p[0] != "self"]


def _stub_params(node: ast.FunctionDef) -> list[tuple[str, bool]]:
    args = [*node.args.posonlyargs, *node.args.args]
    defaults = [False] * (len(args) - len(node.args.defaults)) + [True] * len(node.args.defaults)
    params = list(zip((a.arg for a in args), defaults, strict=True))
    params += [
        (a.arg, d is not None)
        for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults, strict=True)
    ]
    return [p for p in params if p[0] != "self"]


def _is_property(node: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "property" for d in node.decorator_list)


def _stub_functions() -> Iterator[tuple[str, ast.FunctionDef, Any]]:
    """Each function and method of the stub, with the runtime object it describes."""
    for name, node in _stub_names(_stub().body).items():
        if isinstance(node, ast.FunctionDef):
            yield name, node, getattr(_C, name)
        elif isinstance(node, ast.ClassDef):
            cls = getattr(_C, name)
            for member, sub in _stub_names(node.body).items():
                if isinstance(sub, ast.FunctionDef):
                    yield f"{name}.{member}", sub, vars(cls)[member]


def test_stub_classes_declare_exactly_the_extension_members() -> None:
    """Each class of the stub names the same public members as the compiled class, with
    properties as properties."""
    for name, node in _stub_names(_stub().body).items():
        if not isinstance(node, ast.ClassDef):
            continue
        cls = getattr(_C, name)
        runtime = {n for n in vars(cls) if not n.startswith("_")}
        members = _stub_names(node.body)
        stub = {n for n in members if not n.startswith("_")}
        assert runtime == stub, f"_C.{name}: extension has {sorted(runtime)}, stub {sorted(stub)}"
        for member in stub:
            sub = members[member]
            if isinstance(sub, ast.FunctionDef):
                assert _is_property(sub) == isinstance(vars(cls)[member], property), (
                    f"_C.{name}.{member}: property in one, not in the other"
                )


def test_stub_signatures_match_the_extension() -> None:
    """Parameter names, order and which have defaults agree (callers pass some by keyword)."""
    for where, node, obj in _stub_functions():
        if _is_property(node):
            continue
        assert _stub_params(node) == _runtime_params(obj), f"_C.{where}"


# --- examples -----------------------------------------------------------------------------------

# Every public function, class and method users call (not properties, not torch's protocol
# hooks) shows one use in an Example: section, which runs here as a doctest in an empty
# directory, so it cannot go stale; module docstrings' examples run too.
EXAMPLE_OBJECTS = [
    *PUBLIC_FUNCTIONS,
    *PUBLIC_CLASSES,
    *[(f"{name} (module)", module) for name, module in PUBLIC_MODULES.items()],
    *[
        (where, member)
        for where, cls, name, member in PUBLIC_METHODS
        if not isinstance(member, property) and not _is_protocol_hook(cls, name)
    ],
]


@pytest.mark.parametrize(("where", "obj"), EXAMPLE_OBJECTS, ids=[n for n, _ in EXAMPLE_OBJECTS])
def test_docstring_example_runs(
    where: str,
    obj: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    if where.startswith(("zerockpt.transformers", "zerockpt.accelerate")):
        request.getfixturevalue("hide_the_test_accelerator")
    if isinstance(obj, classmethod | staticmethod):
        obj = obj.__func__
    doc = _own_doc(obj) if not isinstance(obj, types.ModuleType) else (obj.__doc__ or "")
    if not isinstance(obj, types.ModuleType):
        sections = _sections(doc, where)
        assert "Example" in sections, f"{where}: no Example: section"
        assert ">>>" in "\n".join(sections["Example"]), f"{where}: Example: has no >>> lines"
    examples = doctest.DocTestParser().get_examples(doc)
    assert examples, f"{where}: no example"
    monkeypatch.chdir(tmp_path)
    test = doctest.DocTest(
        examples,
        {"torch": torch, "zerockpt": zerockpt},
        name=where,
        filename=None,
        lineno=0,
        docstring=doc,
    )
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. DCP's "assuming the intent is ... single process"
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
