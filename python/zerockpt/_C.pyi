"""Type stubs for zerockpt's private extension module. Use the zerockpt package instead."""

from collections.abc import Mapping
from typing import Any

import torch

FORMAT_VERSION: str
RESERVED_PREFIX: str
STATE_DICT_METADATA_KEY: str

class FormatError(ValueError): ...

def save(
    tensors: dict[str, torch.Tensor],
    path: str,
    metadata: dict[str, str] | None,
    durable: bool,
    direct_io: bool | None,
    threads: int,
    state_dict_metadata: str | None = None,
) -> None: ...
def load(
    path: str, mmap: bool, threads: int
) -> tuple[dict[str, torch.Tensor], str | None]: ...
def default_threads() -> int: ...
def state_dict(
    module: torch.nn.Module, destination: Any, prefix: str, keep_vars: bool
) -> Any: ...
def load_state_dict(
    module: torch.nn.Module,
    source: Mapping[str, Any] | None,
    metadata: Any,
    assign: bool,
    file: _File | None,
    threads: int,
) -> tuple[list[str], list[str], list[str]] | None: ...

class _File:
    def __init__(self, path: str) -> None: ...
    @property
    def path(self) -> str: ...
    @property
    def file_size(self) -> int: ...
    @property
    def data_start(self) -> int: ...
    def keys(self) -> list[str]: ...
    def metadata(self) -> dict[str, str]: ...
    def info(self, name: str) -> tuple[str, list[int], int, int, str | None]: ...
    def get_tensor(self, name: str, mmap: bool = True) -> torch.Tensor: ...
