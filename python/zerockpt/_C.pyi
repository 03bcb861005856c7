"""Type stubs for zerockpt's private extension module. Use the zerockpt package instead."""

from collections.abc import Callable, Mapping
from typing import Any

import torch

FORMAT_VERSION: str
RESERVED_PREFIX: str
STATE_DICT_METADATA_KEY: str
CHECKSUM_KEY: str
CRC32C_BACKEND: str
CHUNK_BYTES: int
DEFAULT_STAGING_BYTES: int

class FormatError(ValueError): ...
class ChecksumError(FormatError): ...

def save(
    tensors: dict[str, torch.Tensor],
    path: str,
    metadata: dict[str, str] | None,
    durable: bool,
    direct_io: bool | None,
    threads: int,
    own_metadata: dict[str, str] | None = None,
    checksums: bool = True,
    progress: Progress | None = None,
    staging_bytes: int = 0,
) -> None: ...
def check_savable(tensors: dict[str, torch.Tensor]) -> None: ...
def check_destination(path: str) -> str: ...
def replace_file(staged: str, path: str) -> None: ...
def save_async(
    tensors: dict[str, torch.Tensor],
    path: str,
    metadata: dict[str, str] | None,
    durable: bool,
    direct_io: bool | None,
    threads: int,
    own_metadata: dict[str, str] | None = None,
    checksums: bool = True,
    write_files: list[tuple[str, str]] = ...,
    remove_files: list[str] = ...,
) -> _PendingSave: ...
def after_commit(
    write_files: list[tuple[str, str]],
    remove_files: list[str],
    durable: bool,
    check_file: str = "",
) -> None: ...
def wait_async_saves() -> None: ...
def snapshot_stats() -> tuple[int, int, bool, bool]: ...
def release_snapshot_buffer() -> None: ...
def load(
    path: str,
    mmap: bool,
    threads: int,
    verify: bool = False,
    progress: Progress | None = None,
    device: torch.device | None = None,
    staging_bytes: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, str], bool]: ...
def _crc32c(data: bytes, crc: int = 0, portable: bool = False) -> int: ...
def _crc32c_combine(crc_a: int, crc_b: int, len_b: int) -> int: ...
def _inject_fault(op: str, errno: int, after: int = 0) -> None: ...
def _clear_faults() -> None: ...
def _delay_chunks(seconds: float) -> None: ...
def _staging_stats() -> tuple[int, int, int]: ...
def _stage_host_tensors(on: bool) -> None: ...
def _staging_host_tensors() -> bool: ...
def _device_staging_stats() -> dict[str, Any]: ...
def _remove_stale_temp_files(directory: str) -> int: ...
def default_threads() -> int: ...
def state_dict(module: torch.nn.Module, destination: Any, prefix: str, keep_vars: bool) -> Any: ...
def load_state_dict(
    module: torch.nn.Module,
    source: Mapping[str, Any] | None,
    metadata: Any,
    assign: Any,
    file: _File | None,
    threads: int,
    progress: Progress | None = None,
    staging_bytes: int = 0,
) -> tuple[list[str], list[str], list[str]] | None: ...

class Progress:
    def __init__(self, total: int = 0) -> None: ...
    @property
    def total(self) -> int: ...
    @property
    def done(self) -> int: ...
    @property
    def cancelled(self) -> bool: ...
    def cancel(self) -> None: ...

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
    def verify(
        self, threads: int, raise_on_failure: bool, progress: Progress | None = None
    ) -> tuple[bool, list[str]]: ...

class _PendingSave:
    @property
    def path(self) -> str: ...
    def done(self) -> bool: ...
    def wait(self, timeout: float | None) -> bool: ...
    def result(self) -> None: ...

def load_fd(
    fd: int,
    base: int,
    name: str,
    exact_size: bool,
    mmap: bool,
    threads: int,
    verify: bool,
    progress: Progress | None,
    device: torch.device | None,
    staging_bytes: int,
) -> tuple[dict[str, torch.Tensor], dict[str, str], bool, int]: ...
def save_fd(
    tensors: dict[str, torch.Tensor],
    fd: int,
    base: int,
    name: str,
    metadata: Mapping[str, str] | None,
    threads: int,
    own_metadata: dict[str, str] | None,
    checksums: bool,
    progress: Progress | None,
    staging_bytes: int,
) -> int: ...
def save_stream(
    tensors: dict[str, torch.Tensor],
    write: Callable[[memoryview], int | None],
    rewrite_prefix: Callable[[bytes], None] | None,
    name: str,
    metadata: Mapping[str, str] | None,
    own_metadata: dict[str, str] | None,
    checksums: bool,
    progress: Progress | None,
    staging_bytes: int,
) -> int: ...
def save_bytes(
    tensors: dict[str, torch.Tensor],
    metadata: Mapping[str, str] | None,
    threads: int,
    own_metadata: dict[str, str] | None,
    checksums: bool,
    progress: Progress | None,
    staging_bytes: int,
) -> bytes: ...
def header_length(prefix: bytes, name: str) -> int: ...
def image_size(head: bytes, name: str) -> int: ...
