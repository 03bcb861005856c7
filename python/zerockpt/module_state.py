"""state_dict / load_state_dict for nn.Module trees, walked by the C++ core.

Both return exactly what torch's ``nn.Module.state_dict()`` and ``load_state_dict()`` return
(keys, order, ``_metadata``, detached values, errors, warnings), many times faster on models with
many modules. Modules whose state-dict behaviour is customised in Python are handed to torch's
own code at the point where torch would call it.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from zerockpt import _C, _args, _progress, _state, _torchfile, sharded
from zerockpt._args import PathLike
from zerockpt.serialization import load
from zerockpt.structure import STRUCTURE_KEY

_STATE_DICT_POSITIONAL_WARNING = (
    "Positional args are being deprecated, use kwargs instead. Refer to "
    "https://pytorch.org/docs/main/generated/torch.nn.Module.html#torch.nn.Module.state_dict"
    " for details."
)


def _torch_function_mode_active() -> bool:
    return bool(torch._C._is_torch_function_mode_enabled())


def state_dict(
    module: nn.Module,
    *args: Any,
    destination: Any = None,
    prefix: str = "",
    keep_vars: bool = False,
) -> Any:
    """Returns what ``module.state_dict(...)`` returns, computed by a C++ walk of the module tree.

    The same keys in the same order (per module: parameters, persistent buffers,
    ``_extra_state``, then children depth-first), the same ``_metadata`` attribute, the same
    detached tensors (sharing storage and version counter with the parameters) unless
    ``keep_vars``. Hooks, overridden ``state_dict``/``_save_to_state_dict``/``get_extra_state``,
    lazy and quantized modules run torch's own code where torch would run it.

    Args:
        module: Any ``torch.nn.Module``.
        *args: Deprecated positional ``destination, prefix, keep_vars``, as torch accepts them
            (with torch's FutureWarning).
        destination: A mapping to fill and return; default a new ``OrderedDict`` with
            ``_metadata``.
        prefix: Prepended to every key.
        keep_vars: Return the parameters and buffers themselves instead of detached tensors.

    Returns:
        ``destination``, or the new ``OrderedDict`` (or what a legacy private post-hook of
        ``module`` returned, as in torch).

    Raises:
        TypeError: ``destination`` is not a mutable mapping or ``prefix`` is not a str (torch's
            error for them, with its text).
        AttributeError: ``module`` is not an ``nn.Module`` (torch's error for it).
        Exception: Whatever a hook or an overridden ``state_dict``, ``_save_to_state_dict`` or
            ``get_extra_state`` raises, as torch propagates it.
    """
    if len(args) > 0:
        warnings.warn(_STATE_DICT_POSITIONAL_WARNING, FutureWarning, stacklevel=2)
        if destination is None:
            destination = args[0]
        if len(args) > 1 and prefix == "":
            prefix = args[1]
        if len(args) > 2 and keep_vars is False:
            keep_vars = args[2]
    if (
        not isinstance(module, nn.Module)
        or not isinstance(prefix, str)
        or _torch_function_mode_active()
    ):
        # Torch's own behaviour for unusual input (its errors included).
        return nn.Module.state_dict(
            module, destination=destination, prefix=prefix, keep_vars=keep_vars
        )
    if destination is None:
        destination = OrderedDict()
        destination._metadata = OrderedDict()
    return _C.state_dict(module, destination, prefix, keep_vars)


def _loads_with_torch(module: nn.Module) -> bool:
    """Whether torch's own load_state_dict must run for the whole call."""
    return (
        type(module).load_state_dict is not nn.Module.load_state_dict
        or "load_state_dict" in module.__dict__
        or torch.__future__.get_swap_module_params_on_conversion()
        or _torch_function_mode_active()
        # Files are read into parameters without copy_: let a dispatch mode see torch's ops.
        or torch.utils._python_dispatch._get_current_dispatch_mode() is not None
    )


def _load_sharded(
    index: sharded.ShardIndex, threads: int | None, verify: bool
) -> Mapping[str, Any]:
    """The state dict a sharded checkpoint describes (views of the shards' mappings)."""
    tensors, unchecked = sharded.load_shards(
        index, mmap=True, threads=_args.threads(threads), verify=bool(verify)
    )
    if verify and unchecked:
        sharded.warn_unverified(index, unchecked, stacklevel=4)  # the caller of load_state_dict
    own = index.own_metadata()
    if STRUCTURE_KEY in own:  # nested training state: its flat names, as from a single file
        return tensors
    out: Mapping[str, Any] = _state.rebuild(tensors, own, index.path)
    return out


def _open_source(
    source: Mapping[str, Any] | PathLike, threads: int | None, verify: bool
) -> tuple[_C._File | None, Mapping[str, Any] | None, Any]:
    """What ``load_state_dict`` reads ``source`` from, validated (and with ``verify``, checked)
    before the module is touched: an open file or a mapping, and the state dict's
    ``_metadata`` (None if it has none)."""
    if isinstance(source, str | os.PathLike):
        target = sharded.resolve(_args.fspath(source))
        if isinstance(target, sharded.ShardIndex):
            mapping = _load_sharded(target, threads, verify)
            return None, mapping, getattr(mapping, "_metadata", None)
        with _torchfile.explained(target):
            file = _C._File(target)
        if verify:
            has_checksums, _ = file.verify(_args.threads(threads), True)
            if not has_checksums:
                _state.warn_unverified(file.path, stacklevel=4)  # the caller of load_state_dict
        stored = file.metadata().get(_C.STATE_DICT_METADATA_KEY)
        metadata = None if stored is None else _state.decode_state_dict_metadata(stored, file.path)
        return file, None, metadata
    if isinstance(source, Mapping):
        if verify:
            raise ValueError("verify=True needs a file to check: source is a mapping of tensors")
        return None, source, getattr(source, "_metadata", None)
    raise TypeError(f"Expected state_dict to be dict-like, got {type(source)}.")


def _progress_bar(
    source: Mapping[str, Any] | PathLike,
    file: _C._File | None,
    mapping: Mapping[str, Any] | None,
) -> tuple[int, str]:
    """The bytes a load from ``file`` (or else ``mapping``) moves, and the bar's label."""
    if file is not None:
        return _progress.stored_bytes(file), _progress.label("Loading", file.path)
    assert mapping is not None
    total = _progress.unique_nbytes(v for v in mapping.values() if isinstance(v, torch.Tensor))
    if isinstance(source, str | os.PathLike):
        return total, _progress.label("Loading", source)
    return total, "Loading state dict"


def load_state_dict(
    module: nn.Module,
    source: Mapping[str, Any] | PathLike,
    strict: bool = True,
    assign: bool = False,
    *,
    threads: int | None = None,
    verify: bool = False,
    progress: bool = False,
    staging_bytes: int | None = None,
) -> _IncompatibleKeys:
    """Loads a state dict or a file into ``module``, as ``module.load_state_dict`` does.

    The result, the errors (and their text), the warnings, the effect of ``_metadata`` and of
    ``assign``, hooks and overridden ``_load_from_state_dict`` are torch's; the walk is done in
    C++ and groups keys by module once (torch's loader filters the whole dict for every child).

    From a path (a zerockpt or any safetensors file), no state dict is built: each tensor's
    bytes are read straight into the existing parameter or buffer by parallel preads with the
    GIL released (converted chunk by chunk when dtypes differ), so the extra memory stays a
    few staging chunks whatever the model size. The file is opened and validated before the
    module is touched. Parameters on a GPU (or any accelerator) are filled in place through a
    bounded pool of pinned buffers: reader threads pread into them while asynchronous copies
    to the device drain earlier ones on the current stream (dtypes are converted on the
    device), with no second copy of the model on the device and never a copy from pageable
    memory; they are ready on the current stream when this returns.

    From a sharded checkpoint (a directory holding ``model.safetensors.index.json``, or the
    index file; see :func:`zerockpt.load`), the index is validated and every shard is opened
    (and, with ``verify``, checked) in parallel before the module is touched; the tensors are
    then loaded as from the state dict the index describes (zero-copy views of the shards'
    mappings, in the index's order, with the ``_metadata`` that ``save`` stored in the index),
    so missing and unexpected keys, errors and hooks are exactly torch's for the whole
    checkpoint. Accelerator parameters take such mapped tensors (as any dense CPU tensors of a
    mapping given as ``source``) through the same pinned pool, one tensor at a time.

    Args:
        module: The module to load into.
        source: A mapping of names to tensors (e.g. a state dict); the path of a file; or a
            sharded checkpoint's directory or index file.
        strict: Raise if keys are missing or unexpected (size mismatches always raise).
        assign: Assign the checkpoint's tensors to the module instead of copying into the
            existing ones (for a file: zero-copy views of its mapping), keeping each
            Parameter's ``requires_grad``.
        threads: Reader threads for a file; default ``min(cpu_count, 8)``.
        verify: For a file, check every tensor's bytes against the CRC-32C stored when it was
            saved before the module is touched (a file without checksums loads unchecked, with
            a warning).
        progress: Show a progress bar of the bytes loaded into the module (needs tqdm:
            ``zerockpt[progress]``). Either way, Ctrl-C stops the load between chunks,
            leaving the module partly loaded, as an interrupted ``module.load_state_dict``
            does. No bar is drawn
            where torch's own loader must run (an overridden ``load_state_dict``, active
            function or dispatch modes).
        staging_bytes: For a file, pinned host memory for copying into accelerator tensors,
            in 8 MiB chunks; default 256 MiB (less for smaller files).

    Returns:
        ``NamedTuple`` with ``missing_keys`` and ``unexpected_keys``, as torch returns.

    Raises:
        RuntimeError: Torch's "Error(s) in loading state_dict for ..." with the same text.
        TypeError: ``module`` is not an ``nn.Module``, ``source`` is neither a mapping nor a
            path, or a file tensor's dtype has no torch equivalent.
        ValueError: ``verify=True`` with a mapping (there is no file to check), ``threads``
            is not a positive int, or ``staging_bytes`` is under 8 MiB.
        FormatError: The file is not valid safetensors, or an index is malformed or does not
            match its shards (nothing is loaded).
        ChecksumError: With ``verify``, tensors fail their checksum (nothing is loaded).
        OSError: The file or a shard cannot be opened or read (errno and filename set).
        ImportError: ``progress=True`` and tqdm is not installed.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module)}")
    staging = _args.staging_bytes(staging_bytes)
    file, mapping, metadata = _open_source(source, threads, verify)
    if _loads_with_torch(module):
        if mapping is None:
            assert file is not None
            mapping = load(file.path)
        return cast(
            _IncompatibleKeys, module.load_state_dict(mapping, strict=strict, assign=assign)
        )
    if mapping is not None and type(mapping) not in (dict, OrderedDict):
        copied: OrderedDict[str, Any] = OrderedDict(mapping)
        if metadata is not None:
            copied._metadata = metadata  # type: ignore[attr-defined]
        mapping = copied
    total, description = _progress_bar(source, file, mapping) if progress else (0, "")
    source_mapping = mapping
    options = _args.load_options(threads=_args.threads(threads), staging_bytes=staging)
    result = _progress.run(
        progress,
        description,
        lambda counter: _C.load_state_dict(
            module, source_mapping, metadata, assign, file, options, counter
        ),
        total=total,
    )
    if result is None:  # keys that are not str: torch's code reports them its own way
        assert mapping is not None
        return cast(
            _IncompatibleKeys,
            nn.Module.load_state_dict(module, mapping, strict=strict, assign=assign),
        )
    missing_keys, unexpected_keys, error_msgs = result

    def utf8(texts: list[str]) -> list[bytes]:  # keys may hold lone surrogates
        return [t.encode("utf-8", "surrogatepass") if isinstance(t, str) else t for t in texts]

    message = _C.load_state_dict_message(
        module.__class__.__name__.encode("utf-8", "surrogatepass"),
        utf8(missing_keys),
        utf8(unexpected_keys),
        utf8(error_msgs),
        strict,
    )
    if message:
        raise RuntimeError(message.decode("utf-8", "surrogatepass"))
    return _IncompatibleKeys(missing_keys, unexpected_keys)
