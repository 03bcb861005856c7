"""scikit-build-core metadata provider: the wheel requires the torch minor it was compiled against.

The extension links libtorch's C++ ABI, which changes between torch minor releases, so a wheel
built against torch 2.13.x declares ``torch==2.13.*``. Without an importable torch (an sdist,
or an isolated build that will then fail at CMake with a clear message) it declares the range
of torch versions the source supports.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MIN_TORCH = (2, 11)


def dynamic_metadata(field: str, settings: Mapping[str, Any] | None = None) -> list[str]:
    if field != "dependencies":
        raise RuntimeError(f"torch_requirement provides 'dependencies', not {field!r}")
    try:
        import torch
    except ImportError:
        return [f"torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}"]
    major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if (major, minor) < MIN_TORCH:
        raise RuntimeError(
            f"zerockpt needs torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}; the installed torch is "
            f"{torch.__version__}"
        )
    return [f"torch=={major}.{minor}.*"]
