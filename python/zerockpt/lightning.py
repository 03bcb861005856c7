"""Lightning checkpoints through zerockpt: ``Trainer(plugins=[ZerockptCheckpointIO()])``.

:class:`ZerockptCheckpointIO` and :class:`AsyncZerockptCheckpointIO` are Lightning
``CheckpointIO`` plugins. Every checkpoint the Trainer writes (``ModelCheckpoint``,
``trainer.save_checkpoint``) becomes a safetensors file written by zerockpt (parallel, atomic,
durable, checksummed, missing directories created), and ``trainer.fit(model, ckpt_path=...)``
resumes from one. Lightning's whole checkpoint is kept, without pickle: the model's state dict,
optimizer and scheduler states, loops, callbacks, precision state and hyperparameters, as
zerockpt's nested structure (tensors in the file, the rest as JSON in its header)::

    import lightning.pytorch as pl
    from zerockpt.lightning import AsyncZerockptCheckpointIO

    trainer = pl.Trainer(max_steps=1000, plugins=[AsyncZerockptCheckpointIO()])
    trainer.fit(model, datamodule)
    trainer.fit(model, datamodule, ckpt_path="last")  # resumes from the zerockpt file

The classes subclass the ``CheckpointIO`` of every Lightning distribution installed (the
``lightning`` package and the standalone ``pytorch_lightning`` / ``lightning_fabric``), so the
Trainer of either accepts them. Lightning is an optional dependency: ``pip install
zerockpt[lightning]``.

Hyperparameters must be values zerockpt stores (numbers, strings, None, containers of them,
tensors, numpy arrays, argparse.Namespace...): anything else raises TypeError naming it, as
``save_hyperparameters(ignore=[...])`` is the Lightning way to leave an object out. Nested
``AttributeDict`` values come back as ``AttributeDict``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from zerockpt import checkpoint as _checkpoint
from zerockpt import serialization as _serialization

__all__ = ["AsyncZerockptCheckpointIO", "ZerockptCheckpointIO"]

_EXTRA_HINT = "pip install zerockpt[lightning]"

# Where each Lightning distribution defines CheckpointIO and AttributeDict.
_CHECKPOINT_IO_MODULES = (
    "lightning.fabric.plugins.io.checkpoint_io",
    "lightning_fabric.plugins.io.checkpoint_io",
)
_ATTRIBUTE_DICT_MODULES = ("lightning.fabric.utilities.data", "lightning_fabric.utilities.data")

# The checkpoint entries Lightning fills from ``module.hparams`` / ``datamodule.hparams``.
_HPARAM_KEYS = ("hyper_parameters", "datamodule_hyper_parameters")
_HPARAMS_TYPE_KEY = "hparams_type"
# Header metadata entry: JSON list of the key paths of AttributeDicts in the hyperparameters.
_ATTRIBUTE_DICTS_KEY = "zerockpt_lightning.attribute_dicts"
_MAX_HPARAM_DEPTH = 64

# save() keywords a plugin (or a Trainer.save_checkpoint storage_options dict) may set.
_SAVE_OPTIONS = frozenset({"durable", "direct_io", "threads", "checksums"})


def _installed_modules(names: tuple[str, ...]) -> list[Any]:
    found = []
    for name in names:
        try:
            found.append(importlib.import_module(name))
        except ModuleNotFoundError as error:
            # Only "this distribution is not installed"; a broken install raises as it is.
            if error.name is None or not (name == error.name or name.startswith(error.name + ".")):
                raise
    return found


def _checkpoint_io_base() -> type:
    """A base class deriving from the CheckpointIO of every installed Lightning distribution."""
    bases = tuple(module.CheckpointIO for module in _installed_modules(_CHECKPOINT_IO_MODULES))
    if not bases:
        raise ImportError(
            "zerockpt.lightning needs Lightning (the 'lightning' or 'pytorch_lightning' "
            f"package), which is not installed: {_EXTRA_HINT}"
        )
    if len(bases) == 1:
        return bases[0]  # type: ignore[no-any-return]
    return type("_CheckpointIOBase", bases, {"__module__": __name__})


def _attribute_dict_types() -> tuple[type, ...]:
    return tuple(module.AttributeDict for module in _installed_modules(_ATTRIBUTE_DICT_MODULES))


if TYPE_CHECKING:
    _Base = object
else:
    _Base = _checkpoint_io_base()
_ATTRIBUTE_DICTS = _attribute_dict_types()


def _local_path(path: Any) -> str:
    where: str = os.fsdecode(os.fspath(path))
    if "://" in where and not where.startswith("file://"):
        raise ValueError(
            f"{where!r}: zerockpt's Lightning plugins write local files only (no fsspec URLs); "
            "use Lightning's TorchCheckpointIO for remote storage, or a local dirpath"
        )
    return where.removeprefix("file://")


def _attribute_dict_paths(checkpoint: Mapping[str, Any]) -> list[list[str | int]]:
    """Key paths of the AttributeDicts in the hyperparameter entries, outermost first."""
    found: list[list[str | int]] = []

    def walk(value: object, path: list[str | int]) -> None:
        if len(path) > _MAX_HPARAM_DEPTH:
            return  # zerockpt.save reports structures nested too deeply
        if isinstance(value, _ATTRIBUTE_DICTS):
            found.append(path)
        if isinstance(value, Mapping):
            for key, item in value.items():
                if isinstance(key, str | int) and not isinstance(key, bool):
                    walk(item, [*path, key])
        elif isinstance(value, list | tuple):
            for index, item in enumerate(value):
                walk(item, [*path, index])

    for key in _HPARAM_KEYS:
        if key in checkpoint:
            walk(checkpoint[key], [key])
    return found


def _restore_attribute_dicts(checkpoint: dict[str, Any], paths: object) -> None:
    """Turns the plain dicts at ``paths`` (from :func:`_attribute_dict_paths`) back into
    AttributeDicts, innermost first; paths that do not lead to a dict are left alone."""
    if not _ATTRIBUTE_DICTS or not isinstance(paths, list):
        return
    attribute_dict = _ATTRIBUTE_DICTS[0]
    for path in sorted((p for p in paths if isinstance(p, list) and p), key=len, reverse=True):
        parent: Any = checkpoint
        for key in path[:-1]:
            try:
                parent = parent[key]
            except (KeyError, IndexError, TypeError):
                parent = None
                break
        if not isinstance(parent, dict | list):
            continue  # a tuple cannot be changed in place: its dicts stay plain
        try:
            value = parent[path[-1]]
        except (KeyError, IndexError, TypeError):
            continue
        if type(value) is dict:
            parent[path[-1]] = attribute_dict(value)


def _explain_hparams(error: TypeError) -> TypeError:
    message = str(error)
    if message.startswith(f"obj[{_HPARAMS_TYPE_KEY!r}]"):
        return TypeError(
            f"{message}. Lightning records the type of omegaconf hyperparameters (DictConfig), "
            "which zerockpt does not store: pass the hyperparameters as a dict (e.g. "
            "OmegaConf.to_container(cfg)) to save_hyperparameters"
        )
    if not any(message.startswith(f"obj[{key!r}]") for key in _HPARAM_KEYS):
        return error
    return TypeError(
        f"{message}. Lightning stores the module's (or datamodule's) hyperparameters in the "
        "checkpoint: leave such an argument out with self.save_hyperparameters(ignore=[...]) "
        "or pass it as a storable value (e.g. a str for a path)"
    )


class ZerockptCheckpointIO(_Base):
    """A Lightning ``CheckpointIO`` that saves and loads checkpoints with zerockpt.

    ``save_checkpoint`` blocks until the file is written (and fsynced when ``durable``); see
    :class:`AsyncZerockptCheckpointIO` to return once the tensors are copied.

    Args:
        durable: fsync each checkpoint and its directory before the save counts as done.
        checksums: Store each tensor's CRC-32C (checked by ``verify``).
        threads: Writer (and reader) threads; default ``min(cpu_count, 8)``.
        direct_io: As :func:`zerockpt.save`: None chooses by size.
        mmap: Load checkpoints as memory-mapped (copy-on-write) tensors; False reads them
            into fresh memory.
        verify: Check the stored checksums when loading (ChecksumError on a mismatch).
    """

    def __init__(
        self,
        *,
        durable: bool = True,
        checksums: bool = True,
        threads: int | None = None,
        direct_io: bool | None = None,
        mmap: bool = True,
        verify: bool = False,
    ) -> None:
        super().__init__()
        self._save_options: dict[str, Any] = {
            "durable": durable,
            "checksums": checksums,
            "threads": threads,
            "direct_io": direct_io,
        }
        self._load_options: dict[str, Any] = {"mmap": mmap, "verify": verify, "threads": threads}

    def _save_arguments(
        self, checkpoint: Mapping[str, Any], path: Any, storage_options: Any
    ) -> tuple[str, dict[str, Any]]:
        options = dict(self._save_options)
        if storage_options is not None:
            if not isinstance(storage_options, Mapping):
                raise TypeError(
                    f"storage_options must be a mapping of zerockpt.save options "
                    f"({', '.join(sorted(_SAVE_OPTIONS))}), got {type(storage_options).__name__}"
                )
            unknown = sorted(str(key) for key in storage_options if key not in _SAVE_OPTIONS)
            if unknown:
                raise TypeError(
                    f"storage_options: unknown option(s) {', '.join(unknown)}; "
                    f"{type(self).__name__} takes {', '.join(sorted(_SAVE_OPTIONS))}"
                )
            options.update(storage_options)
        if not isinstance(checkpoint, Mapping):
            raise TypeError(f"checkpoint must be a dict, got {type(checkpoint).__name__}")
        paths = _attribute_dict_paths(checkpoint)
        if paths:
            options["metadata"] = {_ATTRIBUTE_DICTS_KEY: json.dumps(paths)}
        options["makedirs"] = True
        return _local_path(path), options

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Writes ``checkpoint`` to ``path`` as a safetensors file, creating missing directories.

        Args:
            checkpoint: Lightning's checkpoint dict.
            path: Destination file (local path).
            storage_options: None, or a mapping overriding this plugin's ``durable``,
                ``checksums``, ``threads`` or ``direct_io`` for this save.

        Raises:
            TypeError: A value cannot be stored (the message names its path) or bad
                ``storage_options``.
            ValueError: ``path`` is a remote URL.
            OSError: The file could not be written; an existing file at ``path`` is untouched.
        """
        where, options = self._save_arguments(checkpoint, path, storage_options)
        try:
            _serialization.save(checkpoint, where, **options)
        except TypeError as error:
            explained = _explain_hparams(error)
            if explained is error:
                raise
            raise explained from error

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Loads a checkpoint written by this plugin (or any zerockpt nested-state file).

        Args:
            path: The checkpoint file (the async plugin first waits for its save in flight).
            map_location: As :func:`zerockpt.load`: None (CPU), or a str or ``torch.device``
                every tensor goes to.
            weights_only: None or True (nothing is ever unpickled); False is refused.

        Returns:
            Lightning's checkpoint dict.

        Raises:
            FileNotFoundError: No file at ``path``.
            FormatError: The file is not a valid safetensors file (e.g. a ``torch.save``
                checkpoint; ``python -m zerockpt convert`` converts one).
        """
        self._wait_for(path)
        where = _local_path(path)
        loaded = _serialization.load(
            where, map_location=map_location, weights_only=weights_only, **self._load_options
        )
        if not isinstance(loaded, dict):
            raise TypeError(f"{where}: holds a {type(loaded).__name__}, not a checkpoint dict")
        with _serialization.open(where) as opened:
            paths = opened.metadata().get(_ATTRIBUTE_DICTS_KEY)
        if paths is not None:
            # A malformed entry only loses the AttributeDict types.
            with contextlib.suppress(ValueError):
                _restore_attribute_dicts(loaded, json.loads(paths))
        return loaded

    def remove_checkpoint(self, path: Any) -> None:
        """Removes the checkpoint at ``path`` (a file, link or directory); nothing if missing.

        Args:
            path: The checkpoint (the async plugin first waits for its save in flight).

        Raises:
            OSError: It could not be removed.
        """
        self._wait_for(path)
        where = _local_path(path)
        if os.path.islink(where) or os.path.isfile(where):
            os.remove(where)
        elif os.path.isdir(where):
            shutil.rmtree(where)

    def teardown(self) -> None:
        """Nothing to release for the blocking plugin."""

    def _wait_for(self, path: Any) -> None:
        """Waits for a save of this plugin still writing ``path`` (none for the blocking one)."""


class AsyncZerockptCheckpointIO(ZerockptCheckpointIO):
    """:class:`ZerockptCheckpointIO` that returns once the checkpoint's tensors are copied.

    As Lightning's ``AsyncCheckpointIO``: ``save_checkpoint`` takes a snapshot of the tensors
    (:func:`zerockpt.save_async`; into pinned memory for GPU tensors) and returns, so training
    goes on while a background thread writes the file. The next ``save_checkpoint`` and
    ``teardown`` (the end of ``fit``) first wait for the save in flight and raise its error if
    it failed; so do ``load_checkpoint`` and ``remove_checkpoint`` of the file being written.
    The file appears atomically, complete, once written.

    Args:
        durable: fsync each checkpoint and its directory before the save counts as done.
        checksums: Store each tensor's CRC-32C (checked by ``verify``).
        threads: Threads that copy, checksum and write (and read); default
            ``min(cpu_count, 8)``.
        direct_io: As :func:`zerockpt.save_async`: None chooses by size.
        mmap: Load checkpoints as memory-mapped (copy-on-write) tensors; False reads them
            into fresh memory.
        verify: Check the stored checksums when loading (ChecksumError on a mismatch).
    """

    def __init__(
        self,
        *,
        durable: bool = True,
        checksums: bool = True,
        threads: int | None = None,
        direct_io: bool | None = None,
        mmap: bool = True,
        verify: bool = False,
    ) -> None:
        super().__init__(
            durable=durable,
            checksums=checksums,
            threads=threads,
            direct_io=direct_io,
            mmap=mmap,
            verify=verify,
        )
        self._pending: _checkpoint.PendingSave | None = None

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Waits for the previous save (raising its error), then starts this one.

        Args:
            checkpoint: Lightning's checkpoint dict; its tensors are copied before this
                returns, so training may change them at once.
            path: Destination file (local path).
            storage_options: None, or a mapping overriding this plugin's ``durable``,
                ``checksums``, ``threads`` or ``direct_io`` for this save.

        Raises:
            TypeError: A value cannot be stored (the message names its path) or bad
                ``storage_options``.
            ValueError: ``path`` is a remote URL.
            OSError: The previous save failed (its error), or a directory above ``path``
                could not be created.
        """
        self.wait()
        where, options = self._save_arguments(checkpoint, path, storage_options)
        try:
            self._pending = _checkpoint.save_async(checkpoint, where, **options)
        except TypeError as error:
            explained = _explain_hparams(error)
            if explained is error:
                raise
            raise explained from error

    def wait(self) -> None:
        """Waits for the save in flight, if any, and raises its error if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def teardown(self) -> None:
        """Waits for the save in flight and raises its error if it failed."""
        self.wait()

    def _wait_for(self, path: Any) -> None:
        # Only a save to that file (or one a link at ``path`` points to): ModelCheckpoint
        # removes the previous checkpoint right after starting the next save, which must go on.
        pending = self._pending
        if pending is not None and os.path.realpath(_local_path(path)) == os.path.realpath(
            pending.path
        ):
            self.wait()
