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
``AttributeDict`` values come back as ``AttributeDict``, and omegaconf ``DictConfig`` /
``ListConfig`` values (kept unresolved, interpolations included) as omegaconf containers.

``LightningModule.load_from_checkpoint`` reads with ``torch.load``, which cannot read these
files: :func:`load_from_checkpoint` does the same from a zerockpt checkpoint. ``trainer.fit``,
``validate``, ``test`` and ``predict`` with ``ckpt_path=`` read through the plugin.

Example:
    >>> import lightning.pytorch as pl
    >>> from zerockpt.lightning import ZerockptCheckpointIO, load_from_checkpoint
    >>> class Regressor(pl.LightningModule):
    ...     def __init__(self, width: int = 4) -> None:
    ...         super().__init__()
    ...         self.save_hyperparameters()
    ...         self.net = torch.nn.Linear(width, 1)
    ...     def training_step(self, batch, batch_idx):
    ...         return self.net(batch[0]).square().mean()
    ...     def configure_optimizers(self):
    ...         return torch.optim.SGD(self.parameters(), lr=0.1)
    >>> data = torch.utils.data.TensorDataset(torch.randn(8, 3))
    >>> trainer = pl.Trainer(max_steps=2, plugins=[ZerockptCheckpointIO()], logger=False,
    ...                      enable_progress_bar=False, enable_model_summary=False)
    >>> trainer.fit(Regressor(width=3), torch.utils.data.DataLoader(data, batch_size=4))
    >>> trainer.save_checkpoint("model.ckpt")
    >>> load_from_checkpoint(Regressor, "model.ckpt").hparams.width
    3
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from zerockpt import checkpoint as _checkpoint
from zerockpt import serialization as _serialization

__all__ = ["AsyncZerockptCheckpointIO", "ZerockptCheckpointIO", "load_from_checkpoint"]

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
# Header metadata entry: JSON {"paths": key paths of the omegaconf containers in the
# hyperparameters, stored as plain dicts and lists; "hparams_type": the name of the omegaconf
# class Lightning recorded as the hyperparameters' type, stored as that name}.
_OMEGACONF_KEY = "zerockpt_lightning.omegaconf"
_OMEGACONF_TYPES = ("DictConfig", "ListConfig")
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


def _replace_at_paths(
    checkpoint: dict[str, Any], paths: list[Any], convert: Callable[[Any], Any]
) -> None:
    """Replaces the value at each of ``paths`` (lists of keys and indices into ``checkpoint``)
    by ``convert(value)`` unless that is None, innermost first; paths that do not lead to a
    value in a dict or list are left alone (a tuple cannot be changed in place)."""
    for path in sorted((p for p in paths if isinstance(p, list) and p), key=len, reverse=True):
        parent: Any = checkpoint
        for key in path[:-1]:
            try:
                parent = parent[key]
            except (KeyError, IndexError, TypeError):
                parent = None
                break
        if not isinstance(parent, dict | list):
            continue
        try:
            value = parent[path[-1]]
        except (KeyError, IndexError, TypeError):
            continue
        replacement = convert(value)
        if replacement is not None:
            parent[path[-1]] = replacement


def _restore_attribute_dicts(checkpoint: dict[str, Any], paths: object) -> None:
    """Turns the plain dicts at ``paths`` (from :func:`_attribute_dict_paths`) back into
    AttributeDicts, innermost first; paths that do not lead to a dict are left alone."""
    if not _ATTRIBUTE_DICTS or not isinstance(paths, list):
        return
    attribute_dict = _ATTRIBUTE_DICTS[0]
    _replace_at_paths(checkpoint, paths, lambda v: attribute_dict(v) if type(v) is dict else None)


def _omegaconf_container() -> type | None:
    """omegaconf's Container class if omegaconf is imported (no container exists otherwise)."""
    module = sys.modules.get("omegaconf")
    container = getattr(module, "Container", None)
    return container if isinstance(container, type) else None


def _plain_omegaconf(checkpoint: Mapping[str, Any]) -> tuple[Mapping[str, Any], str | None]:
    """``checkpoint`` with the omegaconf containers of its hyperparameters as plain dicts and
    lists (unresolved: interpolations stay strings), and the metadata to restore them; the
    caller's checkpoint is not changed."""
    container = _omegaconf_container()
    if container is None:
        return checkpoint, None
    to_container = sys.modules["omegaconf"].OmegaConf.to_container
    paths: list[list[str | int]] = []

    def plain(value: Any, path: list[str | int]) -> Any:
        if isinstance(value, container):
            paths.append(path)
            return to_container(value, resolve=False)
        if len(path) > _MAX_HPARAM_DEPTH:
            return value  # zerockpt.save reports structures nested too deeply
        if isinstance(value, dict | list):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            changed = {
                key: new
                for key, item in items
                if isinstance(key, str | int)
                and not isinstance(key, bool)
                and (new := plain(item, [*path, key])) is not item
            }
            if changed:
                value = copy.copy(value)  # keeps AttributeDict and other dict subclasses
                for key, new in changed.items():
                    value[key] = new
        elif type(value) is tuple:
            converted = tuple(plain(item, [*path, i]) for i, item in enumerate(value))
            if any(new is not old for new, old in zip(converted, value, strict=True)):
                value = converted
        return value

    result = dict(checkpoint)
    for key in _HPARAM_KEYS:
        if key in result:
            result[key] = plain(result[key], [key])
    hparams_type = result.get(_HPARAMS_TYPE_KEY)
    type_name = None
    if isinstance(hparams_type, type) and issubclass(hparams_type, container):
        type_name = hparams_type.__name__
        result[_HPARAMS_TYPE_KEY] = type_name
    if not paths and type_name is None:
        return checkpoint, None
    return result, json.dumps({"paths": paths, "hparams_type": type_name})


def _restore_omegaconf(checkpoint: dict[str, Any], entry: Any, where: str) -> None:
    """Turns the containers :func:`_plain_omegaconf` recorded back into omegaconf's; without
    omegaconf they stay plain dicts and lists (with a warning)."""
    if not isinstance(entry, dict):
        return
    try:
        omegaconf = importlib.import_module("omegaconf")
    except ImportError:
        warnings.warn(
            f"{where}: its hyperparameters were omegaconf containers, which load as plain dicts "
            "and lists since omegaconf is not installed",
            stacklevel=3,
        )
        return
    type_name = entry.get("hparams_type")
    if type_name in _OMEGACONF_TYPES and checkpoint.get(_HPARAMS_TYPE_KEY) == type_name:
        checkpoint[_HPARAMS_TYPE_KEY] = getattr(omegaconf, type_name)
    paths = entry.get("paths")
    if not isinstance(paths, list):
        return
    _replace_at_paths(
        checkpoint,
        paths,
        lambda v: omegaconf.OmegaConf.create(v) if type(v) in (dict, list) else None,
    )


def _explain_hparams(error: TypeError) -> TypeError:
    message = str(error)
    if message.startswith(f"obj[{_HPARAMS_TYPE_KEY!r}]"):
        return TypeError(
            f"{message}. Lightning records the type of hyperparameters that are not a dict; "
            "zerockpt stores omegaconf's DictConfig and ListConfig only: pass the "
            "hyperparameters as a dict to save_hyperparameters"
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

    Example:
        >>> import lightning.pytorch as pl
        >>> from zerockpt.lightning import ZerockptCheckpointIO
        >>> trainer = pl.Trainer(plugins=[ZerockptCheckpointIO()], logger=False)
        >>> type(trainer.strategy.checkpoint_io).__name__
        'ZerockptCheckpointIO'

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
    ) -> tuple[Mapping[str, Any], str, dict[str, Any]]:
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
        where = _local_path(path)
        checkpoint, omegaconf_entry = _plain_omegaconf(checkpoint)
        metadata = {}
        paths = _attribute_dict_paths(checkpoint)
        if paths:
            metadata[_ATTRIBUTE_DICTS_KEY] = json.dumps(paths)
        if omegaconf_entry is not None:
            metadata[_OMEGACONF_KEY] = omegaconf_entry
        if metadata:
            options["metadata"] = metadata
        options["makedirs"] = True
        return checkpoint, where, options

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

        Example:
            >>> from zerockpt.lightning import ZerockptCheckpointIO
            >>> plugin = ZerockptCheckpointIO()
            >>> plugin.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, "run/a.ckpt")
            >>> zerockpt.load("run/a.ckpt")["state_dict"]["w"]
            tensor([1., 1.])
        """
        to_save, where, options = self._save_arguments(checkpoint, path, storage_options)
        try:
            _serialization.save(to_save, where, **options)
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

        Example:
            >>> from zerockpt.lightning import ZerockptCheckpointIO
            >>> plugin = ZerockptCheckpointIO()
            >>> plugin.save_checkpoint({"epoch": 3, "state_dict": {"w": torch.ones(2)}}, "a.ckpt")
            >>> plugin.load_checkpoint("a.ckpt", map_location="cpu")["epoch"]
            3
        """
        self._wait_for(path)
        where = _local_path(path)
        loaded = _serialization.load(
            where, map_location=map_location, weights_only=weights_only, **self._load_options
        )
        if not isinstance(loaded, dict):
            raise TypeError(f"{where}: holds a {type(loaded).__name__}, not a checkpoint dict")
        with _serialization.open(where) as opened:
            metadata = opened.metadata()
        # A malformed entry only loses the AttributeDict or omegaconf types.
        paths = metadata.get(_ATTRIBUTE_DICTS_KEY)
        if paths is not None:
            with contextlib.suppress(ValueError):
                _restore_attribute_dicts(loaded, json.loads(paths))
        omegaconf_entry = metadata.get(_OMEGACONF_KEY)
        if omegaconf_entry is not None:
            with contextlib.suppress(ValueError):
                _restore_omegaconf(loaded, json.loads(omegaconf_entry), where)
        return loaded

    def remove_checkpoint(self, path: Any) -> None:
        """Removes the checkpoint at ``path`` (a file, link or directory); nothing if missing.

        Args:
            path: The checkpoint (the async plugin first waits for its save in flight).

        Raises:
            OSError: It could not be removed.

        Example:
            >>> import os
            >>> from zerockpt.lightning import ZerockptCheckpointIO
            >>> plugin = ZerockptCheckpointIO()
            >>> plugin.save_checkpoint({"epoch": 1}, "a.ckpt")
            >>> plugin.remove_checkpoint("a.ckpt")
            >>> os.path.exists("a.ckpt")
            False
            >>> plugin.remove_checkpoint("a.ckpt")  # missing: nothing to do
        """
        self._wait_for(path)
        where = _local_path(path)
        if os.path.islink(where) or os.path.isfile(where):
            os.remove(where)
        elif os.path.isdir(where):
            shutil.rmtree(where)

    def teardown(self) -> None:
        """Called by the Trainer at the end of ``fit``; the blocking plugin has nothing to release.

        Example:
            >>> from zerockpt.lightning import ZerockptCheckpointIO
            >>> ZerockptCheckpointIO().teardown()
        """

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

    The background write bypasses the page cache by default (``direct_io=True``): a training
    checkpoint is not read back soon, and filling the page cache costs kernel CPU time that
    the training threads need (see benches/bench_lightning.py).

    Example:
        >>> from zerockpt.lightning import AsyncZerockptCheckpointIO
        >>> plugin = AsyncZerockptCheckpointIO()
        >>> weights = torch.zeros(3)
        >>> plugin.save_checkpoint({"state_dict": {"w": weights}}, "a.ckpt")
        >>> weights.add_(1)  # training goes on: the checkpoint keeps the values at the call
        tensor([1., 1., 1.])
        >>> plugin.teardown()  # as the Trainer at the end of fit: waits for the write
        >>> zerockpt.load("a.ckpt")["state_dict"]["w"]
        tensor([0., 0., 0.])

    Args:
        durable: fsync each checkpoint and its directory before the save counts as done.
        checksums: Store each tensor's CRC-32C (checked by ``verify``).
        threads: Threads that copy, checksum and write (and read); default
            ``min(cpu_count, 8)``.
        direct_io: O_DIRECT for the file (True; buffered writes where the file system refuses
            it), buffered writes (False), or None to choose by size as
            :func:`zerockpt.save_async`.
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
        direct_io: bool | None = True,
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

        Example:
            >>> from zerockpt.lightning import AsyncZerockptCheckpointIO
            >>> plugin = AsyncZerockptCheckpointIO()
            >>> plugin.save_checkpoint({"step": 1, "w": torch.ones(2)}, "run/1.ckpt")
            >>> plugin.save_checkpoint({"step": 2, "w": torch.ones(2)}, "run/2.ckpt")  # waits
            >>> plugin.wait()
            >>> zerockpt.load("run/2.ckpt")["step"]
            2
        """
        self.wait()
        to_save, where, options = self._save_arguments(checkpoint, path, storage_options)
        try:
            self._pending = _checkpoint.save_async(to_save, where, **options)
        except TypeError as error:
            explained = _explain_hparams(error)
            if explained is error:
                raise
            raise explained from error

    def wait(self) -> None:
        """Waits for the save in flight, if any, and raises its error if it failed.

        Raises:
            OSError: The save failed (raised once: a second ``wait`` returns).

        Example:
            >>> from zerockpt.lightning import AsyncZerockptCheckpointIO
            >>> plugin = AsyncZerockptCheckpointIO()
            >>> plugin.save_checkpoint({"w": torch.ones(2)}, "a.ckpt")
            >>> plugin.wait()
            >>> zerockpt.load("a.ckpt")["w"]
            tensor([1., 1.])
        """
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def teardown(self) -> None:
        """Waits for the save in flight and raises its error if it failed (end of ``fit``).

        Raises:
            OSError: The save failed.

        Example:
            >>> from zerockpt.lightning import AsyncZerockptCheckpointIO
            >>> plugin = AsyncZerockptCheckpointIO()
            >>> plugin.save_checkpoint({"w": torch.ones(2)}, "a.ckpt")
            >>> plugin.teardown()
            >>> zerockpt.verify("a.ckpt").ok
            True
        """
        self.wait()

    def _wait_for(self, path: Any) -> None:
        # Only a save to that file (or one a link at ``path`` points to): ModelCheckpoint
        # removes the previous checkpoint right after starting the next save, which must go on.
        pending = self._pending
        if pending is not None and os.path.realpath(_local_path(path)) == os.path.realpath(
            pending.path
        ):
            self.wait()


def _saving_module(cls: type) -> Any:
    """The ``core.saving`` module of the Lightning distribution whose classes ``cls`` derives."""
    for package in ("lightning.pytorch", "pytorch_lightning"):
        for module in _installed_modules((package,)):
            bases = (module.LightningModule, module.LightningDataModule)
            if isinstance(cls, type) and issubclass(cls, bases):
                return importlib.import_module(f"{package}.core.saving")
    raise TypeError(
        f"load_from_checkpoint needs a LightningModule or LightningDataModule class, got {cls!r}"
    )


def load_from_checkpoint(
    cls: type,
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device | None = None,
    strict: bool | None = None,
    **kwargs: Any,
) -> Any:
    """``cls.load_from_checkpoint(path)`` for a checkpoint written by the zerockpt plugins.

    Lightning's own ``load_from_checkpoint`` reads with ``torch.load`` (pickle), which cannot
    read these files. This does what it does from a zerockpt file: builds ``cls`` from the
    stored hyperparameters (``kwargs`` override them), calls ``on_load_checkpoint``, loads the
    state dict and moves the module to its tensors' device. It calls Lightning functions that
    are not public API (``core.saving._load_state`` and ``_pl_migrate_checkpoint``), which the
    tests check. Nothing is unpickled.

    Args:
        cls: A ``LightningModule`` or ``LightningDataModule`` subclass (of ``lightning`` or
            ``pytorch_lightning``).
        path: A checkpoint written by :class:`ZerockptCheckpointIO` or
            :class:`AsyncZerockptCheckpointIO` (local path).
        map_location: As :func:`zerockpt.load`: None (CPU), or a str or ``torch.device``.
        strict: As Lightning's: whether the state dict's keys must match the module's (None:
            the module's ``strict_loading``).
        **kwargs: Arguments for ``cls``, overriding the stored hyperparameters.

    Returns:
        The new ``cls`` instance.

    Raises:
        TypeError: ``cls`` is not a Lightning module or data module class.
        FileNotFoundError: No file at ``path``.
        FormatError: Not a zerockpt checkpoint (e.g. a ``torch.save`` one: use
            ``cls.load_from_checkpoint``).
        RuntimeError: The state dict does not match the module (with ``strict``).

    Example:
        >>> import lightning.pytorch as pl
        >>> from zerockpt.lightning import ZerockptCheckpointIO, load_from_checkpoint
        >>> class Scale(pl.LightningModule):
        ...     def __init__(self, size: int = 2) -> None:
        ...         super().__init__()
        ...         self.save_hyperparameters()
        ...         self.weight = torch.nn.Parameter(torch.ones(size))
        ...     def training_step(self, batch, batch_idx):
        ...         return (self.weight * batch[0]).sum()
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.5)
        >>> data = torch.utils.data.TensorDataset(torch.ones(1, 3))
        >>> trainer = pl.Trainer(max_steps=1, plugins=[ZerockptCheckpointIO()], logger=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Scale(size=3), torch.utils.data.DataLoader(data))
        >>> trainer.save_checkpoint("scale.ckpt")
        >>> load_from_checkpoint(Scale, "scale.ckpt").weight.data
        tensor([0.5000, 0.5000, 0.5000])
    """
    saving = _saving_module(cls)
    checkpoint = ZerockptCheckpointIO().load_checkpoint(path, map_location=map_location)
    checkpoint = saving._pl_migrate_checkpoint(checkpoint, checkpoint_path=os.fspath(path))
    hparams_key = cls.CHECKPOINT_HYPER_PARAMS_KEY  # type: ignore[attr-defined]
    checkpoint.setdefault(hparams_key, {}).update(kwargs)
    package = importlib.import_module(saving.__name__.removesuffix(".core.saving"))
    if issubclass(cls, package.LightningDataModule):
        return saving._load_state(cls, checkpoint, **kwargs)
    module = saving._load_state(cls, checkpoint, strict=strict, **kwargs)
    state_dict = checkpoint.get("state_dict") or {}
    first = next((v for v in state_dict.values() if isinstance(v, torch.Tensor)), None)
    return module if first is None else module.to(first.device)
