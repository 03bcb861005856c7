"""The package's layering rules, read from its source with ``ast``.

Helpers that several modules share live in private modules of their own (``_args``,
``_state``, ``_parallel``, ``_progress``...), imported as modules or by their public names;
no module reaches into another module's underscore names (STYLE.md, "Do this / not that" 7).
The extension ``_C`` is exempt: it is the binding, and its underscore names are its private
classes and testing aids.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import zerockpt

PACKAGE_DIR = Path(zerockpt.__file__).resolve().parent
MODULES = sorted(PACKAGE_DIR.glob("*.py"))
EXEMPT = {"_C"}  # the binding's own private names (_File, _PendingSave, testing aids)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _package_module(node: ast.ImportFrom) -> str | None:
    """The zerockpt module an absolute or relative ``from ... import`` reads from."""
    if node.level:
        return node.module or ""
    if node.module == "zerockpt":
        return ""
    if node.module and node.module.startswith("zerockpt."):
        return node.module.removeprefix("zerockpt.")
    return None


def private_imports(source: str, filename: str) -> list[str]:
    """Underscore names that ``source`` takes from another zerockpt module.

    ``from zerockpt import _args`` (a private module) is fine; ``from zerockpt.sharded import
    _helper`` is not, nor is ``sharded._helper`` where ``sharded`` is an imported zerockpt
    module.
    """
    tree = ast.parse(source, filename)
    found: list[str] = []
    modules: set[str] = set()  # local names bound to zerockpt modules
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            origin = _package_module(node)
            if origin is None:
                continue
            for alias in node.names:
                local = alias.asname or alias.name
                if origin == "":  # from zerockpt import X: X is a module (or a re-export)
                    if (PACKAGE_DIR / f"{alias.name}.py").exists():
                        modules.add(local)
                    elif _private(alias.name) and alias.name not in EXEMPT:
                        found.append(f"{filename}:{node.lineno}: from zerockpt import {alias.name}")
                elif _private(alias.name) and origin.split(".")[0] not in EXEMPT:
                    found.append(
                        f"{filename}:{node.lineno}: from zerockpt.{origin} import {alias.name}"
                    )
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("zerockpt.") and alias.asname:
                    modules.add(alias.asname)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules - EXEMPT
            and _private(node.attr)
        ):
            found.append(f"{filename}:{node.lineno}: {node.value.id}.{node.attr}")
        elif (  # zerockpt.<module>._name, e.g. zerockpt.sharded._helper
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "zerockpt"
            and node.value.attr not in EXEMPT
            and _private(node.attr)
        ):
            found.append(f"{filename}:{node.lineno}: zerockpt.{node.value.attr}.{node.attr}")
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_module_uses_another_modules_private_names(path: Path) -> None:
    assert private_imports(path.read_text(encoding="utf-8"), path.name) == []


@pytest.mark.parametrize(
    "source",
    [
        "from zerockpt.serialization import _fspath\n",
        "from .sharded import _names\n",
        "from zerockpt import sharded\nsharded._names([])\n",
        "import zerockpt\nzerockpt.serialization._DTYPES\n",
        "import zerockpt.sharded as sh\nsh._STAGING_SUFFIX\n",
    ],
)
def test_the_check_finds_private_names(source: str) -> None:
    """The checker itself: each of these reaches into another module's private names."""
    assert private_imports(source, "example.py") != []


@pytest.mark.parametrize(
    "source",
    [
        "from zerockpt import _args\n_args.fspath('x')\n",
        "from zerockpt._parallel import run_parallel\n",
        "from zerockpt import _C\n_C._File\n",
        "from zerockpt.sharded import INDEX_NAME\n",
    ],
)
def test_the_check_allows_private_modules_and_public_names(source: str) -> None:
    assert private_imports(source, "example.py") == []
