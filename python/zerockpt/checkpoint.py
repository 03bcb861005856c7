"""Training checkpoints: save_async (snapshot now, write in the background) and Checkpointer."""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from zerockpt import _C, _args, _destination, _state, _steps
from zerockpt._args import PathLike
from zerockpt._state import SaveInput
from zerockpt.serialization import load

# How long one wait on the C++ side may block before Python gets a chance to handle signals
# (KeyboardInterrupt) and check the timeout.
_WAIT_SLICE = 0.1


class PendingSave:
    """A save running in the background, from :func:`save_async` or :meth:`Checkpointer.save`.

    Like :class:`concurrent.futures.Future`: :meth:`done` polls, :meth:`result` waits and raises
    the save's error, :meth:`exception` waits and returns it. An error nobody asked for is
    printed on stderr when the interpreter exits.

    Args:
        handle: The C++ save in flight, or None for a save that completed before this was
            created.
        path: The destination file.

    Example:
        >>> pending = zerockpt.save_async({"w": torch.ones(2)}, "model.safetensors")
        >>> pending.result()
        >>> pending.done(), pending.path
        (True, 'model.safetensors')
    """

    def __init__(self, handle: _C._PendingSave | None, path: str) -> None:
        self._handle = handle  # None: a save that completed before this was created
        self._path = path
        self._settled = handle is None
        self._error: BaseException | None = None

    @property
    def path(self) -> str:
        """The destination file."""
        return self._path

    def done(self) -> bool:
        """Tells whether the save has finished, without blocking.

        Returns:
            True once the file is written (or the save failed).

        Example:
            >>> pending = zerockpt.save_async({"w": torch.ones(2)}, "model.safetensors")
            >>> pending.result()
            >>> pending.done()
            True
        """
        return self._handle is None or self._handle.done()

    def result(self, timeout: float | None = None) -> None:
        """Waits until the file is written (and durable, if asked for).

        Args:
            timeout: Seconds to wait at most; None waits as long as it takes.

        Raises:
            TimeoutError: The save is still running after ``timeout`` seconds.
            OSError: The file could not be written (errno and filename set); nothing was left at
                the destination, and a file already there is unchanged.

        Example:
            >>> zerockpt.save_async({"w": torch.ones(2)}, "model.safetensors").result(timeout=60)
        """
        error = self.exception(timeout)
        if error is not None:
            raise error

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Waits like :meth:`result`, and returns the save's error instead of raising it.

        Args:
            timeout: Seconds to wait at most; None waits as long as it takes.

        Returns:
            The error that failed the save (e.g. an ``OSError``), or None if it succeeded.

        Raises:
            TimeoutError: The save is still running after ``timeout`` seconds.

        Example:
            >>> pending = zerockpt.save_async({"w": torch.ones(2)}, "model.safetensors")
            >>> pending.exception() is None  # the save succeeded
            True
        """
        self._wait(timeout)
        self._settle()
        _forget(self)
        return self._error

    def _wait(self, timeout: float | None) -> None:
        if self._handle is None:
            return
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            remaining = _WAIT_SLICE if deadline is None else deadline - time.monotonic()
            if self._handle.wait(max(0.0, min(_WAIT_SLICE, remaining))):
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"zerockpt: the save to {self._path} is still running")

    def _settle(self) -> None:
        """Records the finished save's error (the handle raises it, translated to Python)."""
        if self._settled or self._handle is None:
            return
        try:
            self._handle.result()
        except Exception as e:  # kept, to be raised by result()
            self._error = e
        self._settled = True

    def __repr__(self) -> str:
        if not self.done():
            state = "running"
        else:
            self._settle()
            state = "done" if self._error is None else f"failed: {self._error!r}"
        return f"<zerockpt.PendingSave {self._path!r} ({state})>"


# Saves whose outcome nobody has asked for yet; failures among them are reported at exit.
_unobserved: set[PendingSave] = set()
_unobserved_lock = threading.Lock()
# The last save started: the next one waits for it in Python, so Ctrl-C can interrupt.
_last: PendingSave | None = None


def _forget(pending: PendingSave) -> None:
    with _unobserved_lock:
        _unobserved.discard(pending)


def _track(pending: PendingSave) -> PendingSave:
    global _last
    with _unobserved_lock:
        for old in [p for p in _unobserved if p.done()]:
            old._settle()
            if old._error is None:
                _unobserved.discard(old)
        _unobserved.add(pending)
        _last = pending
    return pending


def _start(
    flat: _state.Flat,
    path: str,
    options: _C.SaveOptions,
    own: dict[str, str],
    write_files: list[tuple[str, str]],
    remove_files: list[str],
) -> PendingSave:
    previous = _last
    if previous is not None:
        previous._wait(None)  # the C++ side would wait too, but without seeing Ctrl-C
    handle = _C.save_async(flat, path, options, own, write_files, remove_files)
    return _track(PendingSave(handle, path))


def save_async(
    obj: SaveInput,
    path: PathLike,
    *,
    metadata: Mapping[str, str] | None = None,
    durable: bool = True,
    direct_io: bool | None = None,
    threads: int | None = None,
    checksums: bool = True,
    makedirs: bool = False,
) -> PendingSave:
    """Saves like :func:`save`, blocking only while the tensors are copied.

    The tensors are copied into a snapshot buffer that is kept for the next save (see
    :func:`release_snapshot_buffer`); a background thread then writes the file. The caller may
    change the tensors as soon as this returns. One save runs at a time per process: a second
    call first waits for the one in flight. Interpreter exit waits for it too. Unlike
    :func:`save`, it takes no ``progress`` or ``staging_bytes``: it returns before the bytes are
    written, and the snapshot is one buffer. See docs/design.md, "Asynchronous saves".

    Args:
        obj: What :func:`save` takes: names to tensors, a module, or nested training state, on
            any device.
        path: The destination file; its directory must exist, unless ``makedirs``.
        metadata: Extra ``str -> str`` header entries, as for :func:`save`.
        durable: fsync the file and its directory before the save counts as done.
        direct_io: Force O_DIRECT on or off; None chooses by size.
        threads: Threads that copy, checksum and write; None: the default.
        checksums: Store each tensor's CRC-32C, as for :func:`save`.
        makedirs: Create the missing directories above ``path`` (before returning).

    Returns:
        A :class:`PendingSave`; its ``result()`` raises the error of a failed write.

    Raises:
        TypeError, ValueError: As :func:`save`, for input that cannot be stored; raised here,
            before anything is copied.
        FileNotFoundError: The directory to write into does not exist (``filename`` is that
            directory) and ``makedirs`` is false; raised here.
        MemoryError: The snapshot buffer cannot be allocated.

    Example:
        >>> weights = {"w": torch.ones(2)}
        >>> pending = zerockpt.save_async(weights, "model.safetensors")
        >>> weights["w"].add_(1)  # safe: the snapshot is already taken
        tensor([2., 2.])
        >>> pending.result()  # raises if the write failed
        >>> zerockpt.load("model.safetensors")["w"]
        tensor([1., 1.])
    """
    flat, metadata, own = _state.prepare_save(obj, metadata)
    where = _args.fspath(path)
    _destination.make_parent(where, makedirs=bool(makedirs), durable=bool(durable))
    options = _args.save_options(
        metadata=metadata,
        durable=durable,
        direct_io=direct_io,
        threads=_args.threads(threads),
        checksums=checksums,
    )
    return _start(flat, where, options, own, [], [])


def release_snapshot_buffer() -> None:
    """Waits for the save in flight, then frees the buffer :func:`save_async` keeps for reuse.

    The next ``save_async`` allocates a new one. This raises nothing: the error of a failed save
    stays with its :class:`PendingSave`.

    Example:
        >>> zerockpt.save_async({"w": torch.ones(2)}, "model.safetensors").result()
        >>> zerockpt.release_snapshot_buffer()
    """
    previous = _last
    if previous is not None:
        previous._wait(None)  # the C++ side would wait too, but without seeing Ctrl-C
    _C.release_snapshot_buffer()


def _finish_pending_saves() -> None:
    """At interpreter exit: lets the save in flight finish; reports failures never asked for."""
    _C.wait_async_saves()
    with _unobserved_lock:
        pending = list(_unobserved)
        _unobserved.clear()
    for p in pending:
        p._wait(None)
        p._settle()
        if p._error is not None:
            print(
                f"zerockpt: the background save to {p.path} failed, and its result was never "
                f"asked for: {p._error!r}",
                file=sys.stderr,
            )


def _forget_parent_saves() -> None:
    """In a forked child: the parent's saves are the parent's (their writer is not here)."""
    global _last, _unobserved_lock
    _last = None
    _unobserved.clear()
    _unobserved_lock = threading.Lock()  # in case the fork caught another thread holding it


atexit.register(_finish_pending_saves)
os.register_at_fork(after_in_child=_forget_parent_saves)


def _check_device(device: str | torch.device | int | None) -> None:
    """Raises for a device that is malformed, the meta device, or one that is not available."""
    if device is None:
        return
    dev = torch.device(device)
    if dev.type == "meta":
        raise ValueError("device='meta' holds no data: use torch.device('meta') modules instead")
    if dev.type != "cpu":
        torch.empty(0, device=dev)  # RuntimeError (or AssertionError) where it cannot be used


class Checkpointer:
    """Step-numbered checkpoints in one directory, for training loops.

    :meth:`save` writes ``step_<step>.safetensors``, checks that it reopens, then points the file
    ``latest`` at it and removes checkpoints beyond ``keep_last``; a save that fails removes
    nothing. :meth:`load_latest` resumes from the newest checkpoint that loads and verifies. One
    process should own a directory (in data-parallel training, rank 0). The error of a failed
    background save is raised by the next :meth:`save`, :meth:`wait` or :meth:`close`.

    Args:
        directory: Where the checkpoints go; created (with the directories above it) by the
            first :meth:`save` if missing. Loading never creates it.
        keep_last: How many checkpoints to keep (the newest one and the highest-numbered
            others); None keeps all.
        durable: fsync each checkpoint (and ``latest``) before it counts as saved.
        checksums: Store CRC-32C checksums, which :meth:`load_latest` verifies.
        threads: Threads for copying, checksumming and writing; None: the default.

    Raises:
        TypeError: ``directory`` is not a str or ``os.PathLike``.
        ValueError: ``keep_last`` or ``threads`` is neither a positive int nor None.

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> with zerockpt.Checkpointer("checkpoints", keep_last=2) as ckpt:
        ...     for step in range(3):
        ...         _ = ckpt.save(step, {"model": model.state_dict()}, async_save=True)
        >>> ckpt.steps()
        [1, 2]
        >>> step, state = ckpt.load_latest()
        >>> step, list(state["model"])
        (2, ['weight', 'bias'])
    """

    POINTER = "latest"

    def __init__(
        self,
        directory: PathLike,
        *,
        keep_last: int | None = None,
        durable: bool = True,
        checksums: bool = True,
        threads: int | None = None,
    ) -> None:
        _steps.check_keep_last(keep_last)
        self._directory = Path(_args.fspath(directory))
        self._keep_last = keep_last
        self._durable = bool(durable)
        self._checksums = bool(checksums)
        self._threads = _args.threads(threads)
        self._pending: PendingSave | None = None

    @property
    def directory(self) -> Path:
        """The directory the checkpoints go to."""
        return self._directory

    def path(self, step: int) -> Path:
        """Names the file of the checkpoint for a step (which need not exist).

        Args:
            step: A non-negative int.

        Returns:
            ``directory / "step_<step>.safetensors"``, the step zero-padded to 8 digits.

        Raises:
            ValueError: ``step`` is not a non-negative int.

        Example:
            >>> zerockpt.Checkpointer("checkpoints").path(1000).name
            'step_00001000.safetensors'
        """
        return self._directory / _steps.file_name(_steps.check_step(step))

    def steps(self) -> list[int]:
        """Lists the steps that have a checkpoint file in the directory.

        Returns:
            The steps, ascending, of the files named as :meth:`path` names them; none if the
            directory does not exist (yet).

        Raises:
            OSError: The directory cannot be read.

        Example:
            >>> ckpt = zerockpt.Checkpointer("checkpoints")
            >>> for step in (10, 20):
            ...     _ = ckpt.save(step, {"w": torch.ones(2)})
            >>> ckpt.steps()
            [10, 20]
        """
        found = []
        try:
            entries = list(os.scandir(self._directory))
        except FileNotFoundError:
            return []
        for entry in entries:
            step = _steps.step_of(entry.name)
            if step is not None and entry.is_file():
                found.append(step)
        return sorted(found)

    def latest_step(self) -> int | None:
        """Reads which step the ``latest`` file names.

        Returns:
            That step, or None if ``latest`` is missing, unreadable or malformed, or names a
            checkpoint whose file does not exist.

        Example:
            >>> ckpt = zerockpt.Checkpointer("checkpoints")
            >>> _ = ckpt.save(7, {"w": torch.ones(2)})
            >>> ckpt.latest_step()
            7
        """
        step = self._pointer_step()
        return step if step is not None and self.path(step).is_file() else None

    def save(
        self,
        step: int,
        state: SaveInput,
        *,
        async_save: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> PendingSave:
        """Saves ``state`` as the checkpoint for ``step``, then points ``latest`` at it.

        Args:
            step: A non-negative int; saving a step again replaces its checkpoint.
            state: What :func:`save` takes, e.g. ``{"model": ..., "optim": ..., "step": ...}``.
            async_save: Return once the state is snapshotted (see :func:`save_async`); ``latest``
                and retention are then updated in the background, after the checkpoint is complete.
            metadata: Extra ``str -> str`` header entries.

        Returns:
            A :class:`PendingSave`, already done unless ``async_save``.

        Raises:
            OSError: This save failed (the directory cannot be created, ...), or the previous
                background save did (then this one was not started).
            TypeError, ValueError: ``state`` cannot be stored (as for :func:`save`); also
                ValueError for a ``step`` that is not a non-negative int.

        Example:
            >>> ckpt = zerockpt.Checkpointer("checkpoints", keep_last=2)
            >>> pending = ckpt.save(1, {"w": torch.ones(2), "step": 1}, async_save=True)
            >>> pending.result()
            >>> ckpt.steps()
            [1]
        """
        path = self.path(step)
        self.wait()
        flat, meta, own = _state.prepare_save(state, metadata)
        _destination.make_parent(str(path), makedirs=True, durable=self._durable)
        options = _args.save_options(
            metadata=meta, durable=self._durable, threads=self._threads, checksums=self._checksums
        )
        write_files = [(str(self._directory / self.POINTER), path.name + "\n")]
        remove_files = [str(self.path(s)) for s in self._to_remove(step)]
        if async_save:
            self._pending = _start(flat, str(path), options, own, write_files, remove_files)
            return self._pending
        _C.save(flat, str(path), options, own)
        # `latest` and retention only once the committed file reopens and its header checks
        # (the structure was checked by the loader's decoder before the save).
        _C.after_commit(write_files, remove_files, self._durable, str(path))
        return PendingSave(None, str(path))

    def wait(self) -> None:
        """Waits for the background save, if any; raises its error (once).

        Raises:
            OSError: The background save failed (errno and filename set).

        Example:
            >>> ckpt = zerockpt.Checkpointer("checkpoints")
            >>> _ = ckpt.save(1, {"w": torch.ones(2)}, async_save=True)
            >>> ckpt.wait()  # raises if that save failed
        """
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def load(
        self,
        step: int,
        *,
        verify: bool = True,
        mmap: bool = True,
        device: str | torch.device | int | None = None,
    ) -> Any:
        """Loads the checkpoint of one step (see :func:`load`), checking its checksums.

        Args:
            step: The step to load.
            verify: Check every tensor against its stored CRC-32C first (a file without checksums
                loads unchecked, with a warning).
            mmap: Return zero-copy views of a private mapping of the file; False reads it into
                fresh memory.
            device: Where the tensors go, as for :func:`load`: the CPU (default) or an accelerator
                such as ``"cuda"``.

        Returns:
            The state as it was saved, as :func:`load` returns it.

        Raises:
            ValueError: ``step`` is not a non-negative int.
            FileNotFoundError: There is no checkpoint file for ``step``.
            ChecksumError: With ``verify``, tensors fail their checksum.
            FormatError: The file is not valid safetensors.
            OSError: The file cannot be opened or read (errno and filename set).
            TypeError: A stored dtype has no torch equivalent.

        Example:
            >>> ckpt = zerockpt.Checkpointer("checkpoints")
            >>> _ = ckpt.save(3, {"w": torch.ones(2), "step": 3})
            >>> ckpt.load(3)["step"]
            3
        """
        return load(self.path(step), verify=verify, mmap=mmap, device=device)

    def load_latest(
        self,
        *,
        verify: bool = True,
        mmap: bool = True,
        device: str | torch.device | int | None = None,
    ) -> tuple[int, Any] | None:
        """Loads the newest checkpoint that loads (and verifies), to resume training from.

        The one ``latest`` names is tried first, then the others from the highest step down. One
        whose load raises any ``Exception`` is skipped with a warning naming it and the error
        (``KeyboardInterrupt`` is not caught). A background save of this checkpointer is waited for
        first; its error is left for the next :meth:`save`, :meth:`wait` or :meth:`close`.

        Args:
            verify: Check each checkpoint against its stored CRC-32C before taking it.
            mmap: Return zero-copy views of a private mapping of the file; False reads it into
                fresh memory.
            device: Where the tensors go, as for :func:`load`: the CPU (default) or an accelerator
                such as ``"cuda"``.

        Returns:
            ``(step, state)`` of the checkpoint loaded, or None if there is none that loads (also
            when the directory does not exist).

        Raises:
            OSError: The directory cannot be read.
            ValueError, RuntimeError: ``device`` is not a device, or cannot be used (raised, not
                skipped over).

        Example:
            >>> ckpt = zerockpt.Checkpointer("checkpoints")
            >>> ckpt.load_latest() is None  # nothing saved yet
            True
            >>> _ = ckpt.save(5, {"w": torch.ones(2)})
            >>> ckpt.load_latest()
            (5, {'w': tensor([1., 1.])})
        """
        _check_device(device)  # a device that cannot be used is no reason to skip checkpoints
        pending = self._pending
        if pending is not None:
            pending._wait(None)  # its error stays for the next save() or wait()
        steps = self.steps()
        pointed = self._pointer_step()
        order = sorted(steps, reverse=True)
        if pointed is not None:
            if pointed in steps:
                order.remove(pointed)
                order.insert(0, pointed)
            else:
                warnings.warn(
                    f"zerockpt.Checkpointer: {self._directory / self.POINTER} names step "
                    f"{pointed}, whose checkpoint {self.path(pointed)} does not exist",
                    stacklevel=2,
                )
        for step in order:
            path = self.path(step)
            try:
                return step, load(path, verify=verify, mmap=mmap, device=device)
            except Exception as e:  # any failure: resuming from an older one beats stopping
                warnings.warn(
                    f"zerockpt.Checkpointer: skipping checkpoint {path}: {type(e).__name__}: {e}",
                    stacklevel=2,
                )
        return None

    def close(self) -> None:
        """Waits for the background save, if any (raising its error).

        Raises:
            OSError: The background save failed (errno and filename set).

        Example:
            >>> with zerockpt.Checkpointer("checkpoints") as ckpt:  # close() on leaving the block
            ...     _ = ckpt.save(1, {"w": torch.ones(2)}, async_save=True)
        """
        self.wait()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:  # do not mask the exception in flight; still let the save finish
            pending, self._pending = self._pending, None
            if pending is not None:
                pending._wait(None)

    def __repr__(self) -> str:
        return f"Checkpointer({str(self._directory)!r}, keep_last={self._keep_last})"

    def _pointer_step(self) -> int | None:
        return _steps.pointer_step(str(self._directory / self.POINTER))

    def _to_remove(self, step: int) -> list[int]:
        """Steps to delete once ``step`` is saved: all but the keep_last - 1 highest others."""
        return _steps.retired(self.steps(), step, self._keep_last)
