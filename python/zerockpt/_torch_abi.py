"""The compiled extension is tied to the torch it was built against: check before loading it.

Importing this module runs the check and loads ``zerockpt._C`` (zerockpt/__init__.py does).
"""

from __future__ import annotations

import importlib

import torch


def _minor(version: str) -> tuple[int, ...]:
    """``"2.13.0+cu130"`` -> ``(2, 13)``."""
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2])


_REBUILD = (
    "rebuild zerockpt against this torch from its source with "
    "pip install --no-build-isolation --no-deps --force-reinstall <zerockpt source dir>"
)


def _mismatch(built: str, running: str) -> ImportError:
    minor = ".".join(str(p) for p in _minor(built))
    return ImportError(
        f"zerockpt was compiled against torch {built}, but torch {running} is installed. "
        f"Its C++ extension is tied to the torch it was built with: install torch=={minor}.*, "
        f"or {_REBUILD}"
    )


def _link_failure(built: str | None, running: str, cause: ImportError) -> ImportError:
    detail = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    return ImportError(
        f"zerockpt's C++ extension (built against torch {built or 'unknown'}) does not load with "
        f"the installed torch {running} ({detail}). It is tied to the torch it was built with: "
        f"{_REBUILD}"
    )


def load_extension() -> None:
    """Imports ``zerockpt._C`` after checking that the running torch is the one it was built for.

    Raises:
        ImportError: the torch minor version differs from the build's, or the extension does not
            link against the running torch (naming both versions and how to rebuild).
    """
    try:
        built: str | None = importlib.import_module("zerockpt._build_info").TORCH_VERSION
    except ImportError:  # a source tree that was never built: the import below says so
        built = None
    running = str(torch.__version__)
    if built is not None and _minor(built) != _minor(running):
        raise _mismatch(built, running)
    try:
        importlib.import_module("zerockpt._C")
    except ModuleNotFoundError:  # never built: Python's own message says so
        raise
    except ImportError as exc:  # found but does not load: it does not link with this torch
        raise _link_failure(built, running, exc) from exc


load_extension()
