"""Step-numbered DCP checkpoints for multi-process training: DistributedCheckpointer.

Every rank calls the same methods in the same order (run under ``torchrun``, or in one process
without a process group, as here); ``latest`` names the newest step every rank committed.

Example:
    >>> from zerockpt.distributed import DistributedCheckpointer
    >>> with DistributedCheckpointer("checkpoints", keep_last=1) as ckpt:
    ...     ckpt.save(1, {"w": torch.ones(2)})
    ...     ckpt.save(2, {"w": torch.full((2,), 2.0)})
    ...     ckpt.steps()
    [2]
"""

from __future__ import annotations

import errno
import os
import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import async_save as dcp_async_save
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from zerockpt import _C, _args, _steps
from zerockpt._args import PathLike
from zerockpt.dcp import METADATA_FILE, Reader, Writer

__all__ = ["DistributedCheckpointer"]

# A step's checkpoint is a directory named like a Checkpointer's file, without the suffix.
_DIR_SUFFIX = ""

# What a failed save or load raises: DCP reports a failure of any rank as CheckpointException
# (a BaseException) on every rank.
_FAILURES = (Exception, CheckpointException)


class DistributedCheckpointer:
    """Step-numbered DCP checkpoints in one directory, saved and loaded by every rank together.

    :meth:`save` writes ``step_<step>/`` through :class:`zerockpt.dcp.Writer`; then rank 0 points
    the file ``latest`` at it and removes steps beyond ``keep_last``. :meth:`load_latest` resumes
    every rank from the same newest complete step; an incomplete step (no ``.metadata.json``) is
    never loaded. Every method but :attr:`directory`, :meth:`path`, :meth:`steps` and
    :meth:`latest_step` is collective (the constructor too): every rank calls it, in the same
    order, with the same step. Without an initialized process group it works in one process. The
    error of a failed save is raised on every rank by the next :meth:`save`, :meth:`wait` or
    :meth:`close`. One group should own the directory. The commit order: docs/design.md.

    Args:
        directory: Where the checkpoints go (on a file system every rank sees); created if
            missing.
        keep_last: How many complete checkpoints to keep (the one just saved and the
            highest-numbered others); None keeps all.
        durable: fsync every file (and ``latest``) before a checkpoint counts as saved.
        checksums: Store CRC-32C checksums, which loads verify.
        threads: Writer and reader threads per rank; None: the default.
        process_group: The ranks that save together, with a CPU backend (gloo). None: a new
            gloo group of all ranks, which keeps checkpoint collectives apart from training's.

    Raises:
        TypeError: ``directory`` is not a str or ``os.PathLike``.
        ValueError: ``keep_last`` or ``threads`` is neither a positive int nor None.
        OSError: The directory cannot be created.

    Example:
        >>> ckpt = zerockpt.DistributedCheckpointer("checkpoints", keep_last=2)
        >>> state = {"w": torch.ones(2)}  # tensors, DTensors or DCP Stateful objects
        >>> ckpt.save(1, state)
        >>> _ = state["w"].zero_()
        >>> ckpt.load_latest(state), state["w"]
        (1, tensor([1., 1.]))
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
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        _steps.check_keep_last(keep_last)
        self._directory = Path(_args.fspath(directory))
        self._keep_last = keep_last
        self._durable = bool(durable)
        self._checksums = bool(checksums)
        _args.threads(threads)  # checked here; Writer and Reader take it as given
        self._threads = threads
        self._distributed = dist.is_available() and dist.is_initialized()
        self._group: dist.ProcessGroup | None = None
        if self._distributed:
            self._group = process_group or dist.new_group(backend="gloo")
        self._rank = dist.get_rank(self._group) if self._distributed else 0
        self._pending: Future[BaseException | None] | None = None
        error = self._on_rank0(lambda: self._directory.mkdir(parents=True, exist_ok=True))
        self._agree(error, "create the directory")

    @property
    def directory(self) -> Path:
        """The directory the checkpoints go to."""
        return self._directory

    def path(self, step: int) -> Path:
        """Names the directory of the checkpoint for a step (which need not exist).

        Args:
            step: A non-negative int.

        Returns:
            ``directory / "step_<step>"``, the step zero-padded to 8 digits.

        Raises:
            ValueError: ``step`` is not a non-negative int.

        Example:
            >>> zerockpt.DistributedCheckpointer("checkpoints").path(1000).name
            'step_00001000'
        """
        return self._directory / _steps.file_name(_steps.check_step(step), _DIR_SUFFIX)

    def steps(self) -> list[int]:
        """Lists the steps that have a complete checkpoint, as this process sees the directory.

        Returns:
            The steps, ascending, whose directory holds ``.metadata.json``.

        Raises:
            OSError: The directory cannot be read.

        Example:
            >>> ckpt = zerockpt.DistributedCheckpointer("checkpoints")
            >>> for step in (10, 20):
            ...     ckpt.save(step, {"w": torch.ones(2)})
            >>> ckpt.steps()
            [10, 20]
        """
        return [s for s in self._step_dirs() if self._complete(s)]

    def latest_step(self) -> int | None:
        """Reads which step the ``latest`` file names.

        Returns:
            That step, or None if ``latest`` is missing, unreadable or malformed, or names a
            checkpoint that is not complete.

        Example:
            >>> ckpt = zerockpt.DistributedCheckpointer("checkpoints")
            >>> ckpt.save(7, {"w": torch.ones(2)})
            >>> ckpt.latest_step()
            7
        """
        step = _steps.pointer_step(str(self._directory / self.POINTER), _DIR_SUFFIX)
        return step if step is not None and self._complete(step) else None

    def save(self, step: int, state: dict[str, Any], *, async_save: bool = False) -> None:
        """Saves ``state`` as the step's checkpoint (collective), then points ``latest`` at it.

        Args:
            step: A non-negative int, the same on every rank; saving a step again replaces its
                checkpoint (which is incomplete while the save runs).
            state: What ``dcp.save`` takes: a dict of tensors, DTensors (e.g. from
                ``torch.distributed.checkpoint.state_dict.get_state_dict``), nested dicts,
                lists and other values, or DCP ``Stateful`` objects.
            async_save: Return once the state is copied to CPU memory (``dcp.async_save``);
                the files, ``latest`` and retention are written in the background.

        Raises:
            torch.distributed.checkpoint.api.CheckpointException: The save failed on some
                rank (raised on every rank).
            OSError: Rank 0 could not write ``latest`` or remove old steps (raised on every
                rank; the checkpoint itself is complete), or the previous background save
                failed (then this one was not started).
            ValueError: ``step`` is not a non-negative int.

        Example:
            >>> ckpt = zerockpt.DistributedCheckpointer("checkpoints")
            >>> ckpt.save(1, {"w": torch.ones(2)}, async_save=True)
            >>> ckpt.wait()  # raises on every rank if the save failed
            >>> ckpt.steps()
            [1]
        """
        path = self.path(step)
        self.wait()
        writer = Writer(
            path, durable=self._durable, checksums=self._checksums, threads=self._threads
        )
        kwargs: dict[str, Any] = {"process_group": self._group, "no_dist": not self._distributed}
        if not async_save:
            dcp_save(state, storage_writer=writer, **kwargs)
            self._agree(self._commit(step), f"commit step {step}")
            return
        response = dcp_async_save(state, storage_writer=writer, **kwargs)
        saving = response if isinstance(response, Future) else response.upload_completion
        pending: Future[BaseException | None] = Future()

        def committed(future: Future[Any]) -> None:  # on DCP's thread, once the save is done
            error = future.exception()
            pending.set_result(error if error is not None else self._commit(step))

        self._pending = pending
        saving.add_done_callback(committed)

    def wait(self) -> None:
        """Waits for the background save, if any (collective); raises its error on every rank.

        Example:
            >>> ckpt = zerockpt.DistributedCheckpointer("checkpoints")
            >>> ckpt.save(1, {"w": torch.ones(2)}, async_save=True)
            >>> ckpt.wait()
        """
        pending, self._pending = self._pending, None
        if pending is not None:
            self._agree(pending.result(), "save in the background")

    def load(self, step: int, state: dict[str, Any], *, verify: bool = True) -> None:
        """Loads the checkpoint of one step into ``state`` in place, as ``dcp.load`` does.

        Any rank count may load it (DCP reshards).

        Args:
            step: The step to load, the same on every rank.
            state: What ``dcp.load`` takes: tensors and DTensors to load into, or ``Stateful``s.
            verify: Check the CRC-32C of every file a rank reads from before copying from it.

        Raises:
            torch.distributed.checkpoint.api.CheckpointException: The load failed on some
                rank (raised on every rank), e.g. the checkpoint is incomplete or corrupt (the
                message names the file).
            ValueError: ``step`` is not a non-negative int.

        Example:
            >>> ckpt = zerockpt.DistributedCheckpointer("checkpoints")
            >>> ckpt.save(3, {"w": torch.ones(2)})
            >>> state = {"w": torch.zeros(2)}
            >>> ckpt.load(3, state)
            >>> state["w"]
            tensor([1., 1.])
        """
        reader = Reader(self.path(step), verify=verify, threads=self._threads)
        dcp_load(
            state, storage_reader=reader, process_group=self._group, no_dist=not self._distributed
        )

    def load_latest(self, state: dict[str, Any], *, verify: bool = True) -> int | None:
        """Loads the newest checkpoint that loads, on every rank alike, to resume training from.

        Rank 0 picks the order: the complete step ``latest`` names, then the other complete
        ones from the highest down; incomplete ones are never tried. A step that fails to load
        on any rank is skipped on every rank, with a warning naming it and the error. A
        background save is waited for first; its error is left for the next :meth:`save`,
        :meth:`wait` or :meth:`close`.

        Args:
            state: What ``dcp.load`` takes; loaded in place. After a skipped step, some of it
                may hold that step's values until an older one loads over them.
            verify: Check the CRC-32C of every file a rank reads from before copying from it.

        Returns:
            The step loaded (the same on every rank), or None if none loads.

        Raises:
            OSError: Rank 0 cannot read the directory (raised on every rank).

        Example:
            >>> ckpt = zerockpt.DistributedCheckpointer("checkpoints")
            >>> state = {"w": torch.zeros(2)}
            >>> ckpt.load_latest(state) is None  # nothing saved yet
            True
        """
        if self._pending is not None:
            self._pending.result()  # its error stays for the next save() or wait()
        order: list[int] = []
        notes: list[str] = []
        error = self._on_rank0(lambda: order.extend(self._candidates(notes)))
        order, notes = self._share((order, notes))
        self._agree(error, "list the checkpoints")
        for note in notes:
            warnings.warn(note, stacklevel=2)
        for step in order:
            try:
                self.load(step, state, verify=verify)
                error = None
            except _FAILURES as e:  # skipped below, on every rank alike
                error = e
            outcomes = self._gather(None if error is None else _describe(error, self._rank))
            failed = [o for o in outcomes if o is not None]
            if not failed:
                return step
            warnings.warn(
                f"zerockpt.DistributedCheckpointer: skipping checkpoint {self.path(step)}: "
                f"{failed[0]}",
                stacklevel=2,
            )
        return None

    def close(self) -> None:
        """Waits for the background save, if any (collective), raising its error.

        Example:
            >>> with zerockpt.DistributedCheckpointer("checkpoints") as ckpt:  # close() on leaving
            ...     ckpt.save(1, {"w": torch.ones(2)}, async_save=True)
        """
        self.wait()

    def __enter__(self) -> DistributedCheckpointer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:  # do not mask the exception in flight, nor call collectives: just let it finish
            pending, self._pending = self._pending, None
            if pending is not None:
                pending.result()

    def __repr__(self) -> str:
        return f"DistributedCheckpointer({str(self._directory)!r}, keep_last={self._keep_last})"

    def _step_dirs(self) -> list[int]:
        """Every step directory, complete or not, ascending."""
        found = []
        for entry in os.scandir(self._directory):
            step = _steps.step_of(entry.name, _DIR_SUFFIX)
            if step is not None and entry.is_dir(follow_symlinks=False):
                found.append(step)
        return sorted(found)

    def _complete(self, step: int) -> bool:
        return (self.path(step) / METADATA_FILE).is_file()

    def _candidates(self, notes: list[str]) -> list[int]:
        """Rank 0: the steps to try, in order; ``notes`` gets a warning for each one left out."""
        complete = self.steps()
        order = sorted(complete, reverse=True)
        pointer = self._directory / self.POINTER
        pointed = _steps.pointer_step(str(pointer), _DIR_SUFFIX)
        if pointed in complete:
            order.remove(pointed)
            order.insert(0, pointed)
        elif pointed is not None:
            notes.append(
                f"zerockpt.DistributedCheckpointer: {pointer} names step {pointed}, whose "
                f"checkpoint {self.path(pointed)} is not complete (no {METADATA_FILE})"
            )
        for step in self._step_dirs():
            if step not in complete and (not order or step > order[0]) and step != pointed:
                notes.append(
                    f"zerockpt.DistributedCheckpointer: skipping {self.path(step)}: incomplete "
                    f"(no {METADATA_FILE}; a save failed or was killed)"
                )
        return order

    def _commit(self, step: int) -> BaseException | None:
        """Rank 0, once every rank's files and the metadata are committed: points ``latest`` at
        ``step``, then removes older checkpoints beyond ``keep_last`` and incomplete ones below
        ``step``. Returns the error instead of raising it (the caller shares it)."""

        def commit() -> None:
            pointer = str(self._directory / self.POINTER)
            name = _steps.file_name(step, _DIR_SUFFIX)
            _C.after_commit([(pointer, name + "\n")], [], self._durable)
            complete = self.steps()
            stale = [s for s in self._step_dirs() if s < step and s not in complete]
            for old in sorted(_steps.retired(complete, step, self._keep_last) + stale):
                self._remove(old)

        return self._on_rank0(commit)

    def _remove(self, step: int) -> None:
        """Removes a step's directory: its metadata first, so that it is never seen complete
        with files missing."""
        path = self.path(step)
        (path / METADATA_FILE).unlink(missing_ok=True)
        shutil.rmtree(path)

    def _on_rank0(self, action: Callable[[], Any]) -> BaseException | None:
        """Runs ``action`` on rank 0 only; returns its error (to be shared) instead of raising."""
        return _attempt(action) if self._rank == 0 else None

    def _gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (plain data: it is pickled)."""
        if not self._distributed:
            return [value]
        out: list[Any] = [None] * dist.get_world_size(self._group)
        dist.all_gather_object(out, value, group=self._group)
        return out

    def _share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        return self._gather(value)[0]

    def _agree(self, error: BaseException | None, what: str) -> None:
        """Raises ``error`` here, and on the other ranks an OSError naming it: every rank of the
        group raises if any failed."""
        summary = None
        if error is not None:
            code = getattr(error, "errno", None) if isinstance(error, OSError) else None
            file = getattr(error, "filename", None) if isinstance(error, OSError) else None
            summary = (
                code,
                None if file is None else str(file),
                f"{type(error).__name__}: {error}",
            )
        try:
            outcomes = self._gather(summary)
        except _FAILURES:
            if error is not None:  # the failure itself, not that of telling the others (gone?)
                raise error from None
            raise
        if error is not None:
            raise error
        for rank, outcome in enumerate(outcomes):
            if outcome is not None:
                code, file, why = outcome
                raise OSError(
                    code or errno.EIO,
                    f"zerockpt.DistributedCheckpointer: rank {rank} could not {what}: {why}",
                    file,
                )


def _describe(error: BaseException, rank: int) -> str:
    """One line per failed rank: ``rank <r>: <type>: <message>`` (DCP's own report of a
    CheckpointException also holds each rank's traceback)."""
    if isinstance(error, CheckpointException):
        failures = [(r, e) for r, (e, _) in error.failures.items()]
    else:
        failures = [(rank, error)]
    return "; ".join(f"rank {r}: {type(e).__name__}: {e}" for r, e in failures)


def _attempt(action: Callable[[], Any]) -> BaseException | None:
    """Runs ``action``; returns its error instead of raising it (to be shared with the ranks)."""
    try:
        action()
    except _FAILURES as e:
        return e
    return None
