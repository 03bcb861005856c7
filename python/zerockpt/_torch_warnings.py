"""The warnings of ``zerockpt.load_state_dict``, emitted as torch's ``load_state_dict`` emits them.

Same category and text, and the same origin: torch's ``torch/nn/modules/module.py`` at the line
that warns there (the ``param.copy_`` of ``Module._load_from_state_dict`` for copy warnings, the
``_load_from_state_dict`` call of ``Module.load_state_dict`` for the meta no-op, which torch
warns with ``stacklevel=2``), with that module's warning registry. So a filter written for
torch's warnings (by message, category or ``module="torch.nn.modules.module"``) applies, and
the "default" action shows each once.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch.nn.modules.batchnorm as _batchnorm
import torch.nn.modules.module as _torch_module
from torch import nn


@functools.cache
def _line(function: Callable[..., Any], needle: str) -> int:
    """The line of ``function``'s source holding ``needle`` (its first line if none does)."""
    try:
        lines, first = inspect.getsourcelines(function)
    except (OSError, TypeError):  # no source shipped: the function's first line
        return int(function.__code__.co_firstlineno)
    return next((first + i for i, text in enumerate(lines) if needle in text), first)


def warn_as_torch(message: str, category: type[Warning], site: str) -> None:
    """Emits ``message`` as torch's ``load_state_dict`` emits it at ``site``.

    Args:
        message: The warning's text.
        category: Its category (``UserWarning`` or ``DeprecationWarning``).
        site: ``"copy"`` (torch's ``param.copy_(input_param)``), ``"meta"`` (the no-op copy
            into a meta parameter) or ``"norm_meta"`` (the same, where a norm layer's
            ``_load_from_state_dict`` called Module's: torch warns from its ``super()`` call).

    Raises:
        Warning: When a filter turns the warning into an error, as torch's would be.
    """
    where: Any = _torch_module
    if site == "meta":
        lineno = _line(nn.Module.load_state_dict, "._load_from_state_dict(")
    elif site == "norm_meta":
        where = _batchnorm
        lineno = _line(_batchnorm._NormBase._load_from_state_dict, "super()._load_from_state_dict(")
    else:
        lineno = _line(nn.Module._load_from_state_dict, "param.copy_(input_param)")
    namespace = vars(where)
    warnings.warn_explicit(
        message,
        category,
        str(where.__file__),
        lineno,
        module=where.__name__,
        registry=namespace.setdefault("__warningregistry__", {}),
        module_globals=namespace,
    )
