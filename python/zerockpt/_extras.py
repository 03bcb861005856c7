"""Imports of the optional extras' libraries (accelerate, transformers), with an ImportError
that names the extra to install when one is missing."""

from __future__ import annotations

import importlib
from typing import Any


def import_extra(name: str, *, user: str, requirement: str, extra: str) -> Any:
    """The real library module ``name`` (never a zerockpt module of the same name).

    Args:
        name: The library's module, e.g. ``"accelerate.utils"``.
        user: The zerockpt module that needs it, named in the error.
        requirement: The supported versions, e.g. ``"accelerate>=1.0,<2"``.
        extra: The zerockpt extra that installs it, e.g. ``"accelerate"``.

    Raises:
        ImportError: ``name`` cannot be imported; the message says what to install.
    """
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(
            f"{user} needs {requirement!r} ({e}); install it with `pip install zerockpt[{extra}]`"
        ) from e
