"""Step-numbered checkpoint directories: file names, the ``latest`` pointer, retention.

Shared by :class:`zerockpt.Checkpointer` (one file per step) and
``zerockpt.distributed.DistributedCheckpointer`` (one DCP directory per step).
"""

from __future__ import annotations

import re

from zerockpt._smallfile import MAX_POINTER_BYTES, read_small_file

_STEP_NAME = re.compile(r"step_([0-9]+)(.*)", re.DOTALL)
_FILE_SUFFIX = ".safetensors"


def step_of(name: str, suffix: str = _FILE_SUFFIX) -> int | None:
    """The step of a checkpoint name, exactly as :func:`file_name` spells it with ``suffix``."""
    match = _STEP_NAME.fullmatch(name)
    if match is None or match.group(2) != suffix:
        return None
    step = int(match.group(1))
    return step if name == file_name(step, suffix) else None


def file_name(step: int, suffix: str = _FILE_SUFFIX) -> str:
    return f"step_{step:08d}{suffix}"


def pointer_step(pointer: str, suffix: str = _FILE_SUFFIX) -> int | None:
    """The step the pointer file names, or None if it is missing, unreadable or malformed."""
    try:
        text = read_small_file(pointer, MAX_POINTER_BYTES, "pointer").decode("utf-8").strip()
    except (OSError, ValueError):  # FormatError, UnicodeDecodeError: not a pointer
        return None
    return step_of(text, suffix)


def check_keep_last(keep_last: int | None) -> None:
    if keep_last is not None and (
        not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1
    ):
        raise ValueError(f"keep_last must be a positive int or None, got {keep_last!r}")


def retired(steps: list[int], step: int, keep_last: int | None) -> list[int]:
    """Steps to delete once ``step`` is saved: all but the keep_last - 1 highest others."""
    if keep_last is None:
        return []
    others = sorted((s for s in steps if s != step), reverse=True)
    return others[keep_last - 1 :]


def check_step(step: int) -> int:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    return step
