"""The ``zerockpt`` command line: inspect, convert and verify checkpoints.

::

    zerockpt inspect PATH [--json] [--verify]
    zerockpt convert SRC DST [--max-shard-size SIZE] [--force] [--progress | --no-progress]
    zerockpt verify PATH [--json] [--require-checksums]
    zerockpt bench ...            (provided by zerockpt.bench)

``PATH`` is a zerockpt or safetensors file, a Hugging Face sharded directory (or its
``model.safetensors.index.json``), a directory written by :class:`zerockpt.dcp.Writer`, or, with
``--trust``, one written by torch's own ``torch.distributed.checkpoint`` ``FileSystemWriter``
(``.metadata`` + ``*.distcp``; its metadata is a pickle, so it is read only when trusted).
``convert`` also reads and writes ``torch.save`` checkpoints (``.pt``, ``.pth``, ``.bin``),
loaded with ``torch.load(weights_only=True)``: nothing is ever unpickled beyond plain data.

Exit status: 0 when everything is fine, 1 when a command fails (a bad or corrupted checkpoint, a
missing file, a destination that exists), 2 for a bad command line. Failures print one line,
``zerockpt: error: <message>``, on stderr; ``--debug`` raises the exception instead (traceback).
Any other exception is a bug in zerockpt: its traceback is printed, with a request to report it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NoReturn, TextIO

import torch

import zerockpt
from zerockpt import _C, _progress, _torchfile, sharded
from zerockpt.structure import STRUCTURE_KEY

__all__ = ["build_parser", "main"]

PROG = "zerockpt"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
"""Destination names written with ``torch.save``; any other name gets a zerockpt file."""

_DCP_METADATA = ".metadata.json"  # zerockpt.dcp.METADATA_FILE, without importing DCP eagerly
_NATIVE_DCP_METADATA = ".metadata"  # torch's FileSystemWriter (pickled)
_NATIVE_DCP_SUFFIX = ".distcp"
_NATIVE_DCP_FORMAT = "torch.distributed.checkpoint"  # zerockpt.dcp.NATIVE_FORMAT
_DCP_RANK_FILE_RE = re.compile(r"__[0-9]+_[0-9]+\.safetensors")
_DCP_OWN_KEY = "zerockpt.dcp"  # marks a rank file written by zerockpt.dcp.Writer
_PROGRESS_AUTO_BYTES = 1e9  # without --progress/--no-progress: show it for larger sources


class CommandError(Exception):
    """A failure that the command line reports as one line (exit status 1)."""


class UsageError(ValueError):
    """A bad command line or option, of any command, ``bench`` included (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise :class:`UsageError` instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ---------------------------------------------------------------------------------------------
# Small helpers


def human_bytes(n: int) -> str:
    """A byte count in binary units for people: ``"512 B"``, ``"1.5 KiB"``, ``"3.0 GiB"``.

    Args:
        n: A number of bytes (non-negative).

    Returns:
        The count with one decimal in the largest unit that keeps it at least 1.
    """
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.1f} {unit}"


def _dtype_name(dtype: torch.dtype | None, format_dtype: str) -> str:
    """The torch dtype's name (``float32``), or the file's name when torch has no such dtype."""
    return format_dtype if dtype is None else str(dtype).removeprefix("torch.")


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _count(n: int, noun: str, plural: str | None = None) -> str:
    """``"1 tensor"``, ``"3 tensors"``."""
    return f"{n} {noun}" if n == 1 else f"{n} {plural or noun + 's'}"


def _names(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def _one_line(text: str) -> str:
    """A message on one line: whitespace runs (newlines included) collapsed to one space."""
    return " ".join(text.split())


def _printable(text: str) -> str:
    """``text`` safe for a terminal: every character it could act on is shown escaped.

    Controls (C0, DEL, C1 such as ESC and CSI), format characters (bidi overrides), line and
    paragraph separators, surrogates and unassigned code points become Python's ``\\x``,
    ``\\u`` or ``\\U`` escapes; a backslash is doubled, so the escaping is unambiguous.
    """
    if text.isprintable() and "\\" not in text:
        return text
    return "".join("\\\\" if c == "\\" else c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _emit(line: str, out: TextIO) -> None:
    """Prints one line of names or metadata read from a file, escaped (:func:`_printable`)."""
    print(_printable(line), file=out)


@contextlib.contextmanager
def _escaped_warnings() -> Iterator[None]:
    """Warnings shown while a command runs (which may quote names from a file) are escaped."""

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        text = warnings.formatwarning(message, category, filename, lineno, line)
        stream = file or sys.stderr
        for part in text.rstrip("\n").split("\n"):
            _emit(part, stream)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _describe(error: BaseException) -> str:
    """The one-line message printed for an error the command line expects."""
    if isinstance(error, OSError) and error.strerror:
        where = [str(f) for f in (error.filename, error.filename2) if f is not None]
        text = f"{' -> '.join(where)}: {error.strerror}" if where else error.strerror
        return _one_line(text)
    return _one_line(str(error)) or type(error).__name__


@contextlib.contextmanager
def _refused_data() -> Iterator[None]:
    """Runs a zerockpt call on the data of the user's checkpoint: the TypeError or ValueError
    it raises for data it cannot store or represent (an object that is not a tensor, a dtype
    torch lacks, overlapping views) is that checkpoint's fault, reported as one line."""
    try:
        yield
    except (TypeError, ValueError) as e:
        if isinstance(e, zerockpt.FormatError | UsageError):
            raise
        raise CommandError(_one_line(str(e)) or type(e).__name__) from e


def _error_line(message: str, stream: TextIO | None = None) -> None:
    _emit(f"{PROG}: error: {message}", stream or sys.stderr)


def _disk_bytes(path: str) -> int:
    """Bytes on disk of a file, or of the regular files directly in a directory."""
    if not os.path.isdir(path):
        return os.path.getsize(path)
    total = 0
    with os.scandir(path) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.is_file():
                    total += entry.stat().st_size
    return total


def _walk_tensors(obj: object) -> Iterator[torch.Tensor]:
    """Every tensor leaf of nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _walk_tensors(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _walk_tensors(value)


def _tensor_stats(obj: object) -> tuple[int, int]:
    """(tensors, bytes) of nested state; a tensor found at several places counts once."""
    seen: set[int] = set()
    count = nbytes = 0
    for t in _walk_tensors(obj):
        if id(t) in seen:
            continue
        seen.add(id(t))
        count += 1
        nbytes += t.numel() * t.element_size()
    return count, nbytes


# ---------------------------------------------------------------------------------------------
# What a path names


def checkpoint_kind(path: str) -> tuple[str, str]:
    """What kind of checkpoint ``path`` names, and the path to read it from.

    Args:
        path: A zerockpt/safetensors file; a sharded directory or its index file (a name ending
            in ``.json``); a DCP checkpoint directory (zerockpt.dcp's or torch's own layout) or
            its ``.metadata.json`` / ``.metadata``; a
            directory holding ``model.safetensors``; or a ``torch.save`` file.

    Returns:
        ``(kind, path)``: kind is ``"file"``, ``"sharded"``, ``"dcp"`` or ``"torch"``; path is
        the file, index or checkpoint directory to read.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CommandError: ``path`` is a directory that holds no checkpoint.
    """
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, _DCP_METADATA)):
            return "dcp", path
        if os.path.exists(os.path.join(path, sharded.INDEX_NAME)):
            return "sharded", path
        if os.path.exists(os.path.join(path, sharded.SINGLE_FILE_NAME)):
            return "file", os.path.join(path, sharded.SINGLE_FILE_NAME)
        if os.path.exists(os.path.join(path, _NATIVE_DCP_METADATA)):
            return "dcp", path  # torch's own layout: zerockpt.dcp tells it apart
        if any(
            _DCP_RANK_FILE_RE.fullmatch(name) or name.endswith(_NATIVE_DCP_SUFFIX)
            for name in os.listdir(path)
        ):
            return "dcp", path  # without its metadata: reading it says it is incomplete
        raise CommandError(
            f"{path}: a directory that holds no checkpoint (neither {sharded.INDEX_NAME}, "
            f"{_DCP_METADATA}, {_NATIVE_DCP_METADATA} nor {sharded.SINGLE_FILE_NAME})"
        )
    if os.path.basename(path) in (_DCP_METADATA, _NATIVE_DCP_METADATA):
        return "dcp", os.path.dirname(path) or "."
    if path.endswith(".json"):
        return "sharded", path
    if not os.path.exists(path):
        raise FileNotFoundError(2, "No such file or directory", path)
    if _torchfile.is_torch_save(_torchfile.pickled_kind(path)):
        return "torch", path
    return "file", path


# ---------------------------------------------------------------------------------------------
# inspect


def _structure_summary(text: str) -> str:
    """A few words on a ``zerockpt.structure`` value: the top-level keys or container."""
    try:
        root = json.loads(text).get("root")
    except (ValueError, AttributeError, RecursionError):
        return "nested training state (structure not readable)"
    if isinstance(root, dict) and isinstance(root.get("dict"), list):
        keys = [repr(item[0]) for item in root["dict"] if isinstance(item, list) and item]
        return f"nested training state, top level: {_names(keys, 8)}"
    if isinstance(root, dict) and len(root) == 1:
        kind = next(iter(root))
        if isinstance(root[kind], list):
            return f"nested training state, top level: a {kind} of {len(root[kind])}"
    return "nested training state"


def _own_summary(own: Mapping[str, str], aliases: int) -> dict[str, Any]:
    """zerockpt's own metadata (``zerockpt.*`` keys) summarized for the report."""
    summary: dict[str, Any] = {
        "version": own.get("zerockpt.version"),
        "nested_state": STRUCTURE_KEY in own,
        "state_dict_metadata": _C.STATE_DICT_METADATA_KEY in own,
        "aliases": aliases,
        "dcp_rank_file": _DCP_OWN_KEY in own,
    }
    if STRUCTURE_KEY in own:
        summary["structure"] = _structure_summary(own[STRUCTURE_KEY])
    if sharded.CHECKPOINT_ID_KEY in own:
        summary["checkpoint_id"] = own[sharded.CHECKPOINT_ID_KEY]
    return summary


def _file_report(path: str, kind: str) -> tuple[dict[str, Any], Callable[[], tuple[str, ...]]]:
    """The report of a file or sharded directory, and a function that verifies it."""
    with zerockpt.open(path) as f:
        header = f.metadata()
        files = list(f.files)
        index = f.index
        tensors: list[dict[str, Any]] = []
        total = aliases = 0
        for name in f:
            info = f.info(name)
            entry: dict[str, Any] = {
                "name": name,
                "dtype": _dtype_name(info.dtype, info.format_dtype),
                "shape": list(info.shape),
                "nbytes": info.nbytes,
            }
            if kind == "sharded":
                entry["file"] = os.path.basename(f.file_of(name))
            if info.alias_of is not None:
                entry["alias_of"] = info.alias_of
                aliases += 1
            else:
                total += info.nbytes
            tensors.append(entry)
    own = {k: v for k, v in header.items() if k.startswith(_C.RESERVED_PREFIX)}
    if index is not None:  # the structure and _metadata of sharded state live in the index
        own.update({k: v for k, v in index["metadata"].items() if k.startswith(_C.RESERVED_PREFIX)})
    # Every shard must store checksums (the first one's header is already read).
    stored = bool(files) and all(
        _C.CHECKSUM_KEY in (header if i == 0 else _header_metadata(file))
        for i, file in enumerate(files)
    )
    report: dict[str, Any] = {
        "path": path,
        "kind": kind,
        "files": files,
        "file_bytes": sum(os.path.getsize(file) for file in files),
        "tensors": tensors,
        "total_bytes": total,
        "metadata": {k: v for k, v in header.items() if not k.startswith(_C.RESERVED_PREFIX)},
        "zerockpt": _own_summary(own, aliases),
        "checksums": {"stored": stored, "verified": None, "failed": []},
    }

    def verify() -> tuple[str, ...]:
        return zerockpt.verify(path).failed

    return report, verify


def _header_metadata(file: str) -> dict[str, str]:
    with zerockpt.open(file) as f:
        return f.metadata()


def _dcp_report(
    directory: str, trusted: bool
) -> tuple[dict[str, Any], Callable[[], tuple[str, ...]]]:
    """The report of a DCP checkpoint directory, and a function that verifies it."""
    import zerockpt.dcp

    def verify() -> tuple[str, ...]:
        return zerockpt.dcp.verify(directory, trusted=trusted).failed

    return zerockpt.dcp.describe(directory, trusted=trusted), verify


def _print_table(rows: list[list[str]], header: list[str], out: TextIO) -> None:
    rows = [[_printable(c) for c in row] for row in rows]  # escaped first: widths as shown
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    widths[0] = min(widths[0], max(60, len(header[0])))
    for row in [header, *rows]:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=True)]
        print("  ".join([*cells, row[-1]]).rstrip(), file=out)


def _print_inspect(report: dict[str, Any], out: TextIO) -> None:
    kind = report["kind"]
    titles = {"file": "safetensors file", "sharded": "sharded checkpoint", "dcp": "DCP checkpoint"}
    native = report.get("format") == _NATIVE_DCP_FORMAT
    if native:
        titles["dcp"] = "torch DCP checkpoint (FileSystemWriter)"
    files = report["files"]
    where = "" if kind == "file" else f", {len(files)} files"
    _emit(
        f"{report['path']}: {titles[kind]} ({human_bytes(report['file_bytes'])} on disk{where})",
        out,
    )
    tensors = report["tensors"]
    header = ["NAME", "DTYPE", "SHAPE", "SIZE"]
    if kind == "sharded":
        header.append("FILE")
    if kind == "dcp":
        header.append("CHUNKS")
    rows = []
    for t in tensors:
        size = f"-> {t['alias_of']}" if "alias_of" in t else human_bytes(t["nbytes"])
        row = [t["name"], t["dtype"], _shape_text(t["shape"]), size]
        if kind == "sharded":
            row.append(t["file"])
        if kind == "dcp":
            row.append(str(t["chunks"]))
        rows.append(row)
    if rows:
        print(file=out)
        _print_table(rows, header, out)
        print(file=out)
    own = report["zerockpt"]
    aliases = own.get("aliases", 0)
    counted = _count(len(tensors), "tensor")
    if aliases:
        counted += f" ({len(tensors) - aliases} stored, {_count(aliases, 'alias', 'aliases')})"
    _emit(
        f"total: {counted}, {human_bytes(report['total_bytes'])} ({report['total_bytes']} bytes)",
        out,
    )
    if kind == "dcp":
        items = report["items"]
        if items:
            _emit(f"non-tensor items: {len(items)}", out)
            width = max(len(i["name"]) for i in items)
            for i in items:
                value = i.get("repr", "(not decoded)")
                if len(value) > 70:
                    value = value[:67] + "..."
                _emit(f"  {i['name'].ljust(width)}  {value}", out)
        _emit(
            f"{'torch.distributed.checkpoint' if native else 'zerockpt.dcp'}: DCP metadata "
            f"version {own['dcp_version']}, {own['rank_files']} rank files",
            out,
        )
    else:
        metadata = report["metadata"]
        if metadata:
            print("metadata:", file=out)
            for key, value in metadata.items():
                shown = value if len(value) <= 70 else value[:67] + "..."
                _emit(f"  {key}: {shown}", out)
        else:
            print("metadata: none", file=out)
        _emit(f"zerockpt: {_own_text(own)}", out)
        if aliases:
            print("aliases (tied tensors, stored once):", file=out)
            for t in tensors:
                if "alias_of" in t:
                    _emit(f"  {t['name']} -> {t['alias_of']}", out)
    _emit(f"checksums: {_checksum_text(report['checksums'])}", out)


def _own_text(own: Mapping[str, Any]) -> str:
    if own["version"] is None:
        return "no zerockpt metadata (written by another safetensors writer)"
    parts = [f"format version {own['version']}"]
    if own["nested_state"]:
        parts.append(own["structure"])
    if own["state_dict_metadata"]:
        parts.append("state dict _metadata (module versions) stored")
    if own["dcp_rank_file"]:
        parts.append("a rank file of a zerockpt.dcp checkpoint")
    return "; ".join(parts)


def _checksum_text(checksums: Mapping[str, Any]) -> str:
    if not checksums["stored"]:
        return "none stored (nothing to verify)"
    verified = checksums["verified"]
    if verified is None:
        return "CRC-32C stored (not checked; use --verify)"
    if verified:
        return "CRC-32C stored, verified: every tensor matches"
    failed = checksums["failed"]
    return f"CRC-32C stored, verification FAILED for {len(failed)}: {_names(failed)}"


def _cmd_inspect(args: argparse.Namespace) -> int:
    kind, path = checkpoint_kind(args.path)
    if kind == "torch":
        raise CommandError(
            f"{args.path}: a torch.save checkpoint, not safetensors (convert it with "
            f"'{PROG} convert {args.path} OUT.safetensors')"
        )
    report, verify = _dcp_report(path, args.trust) if kind == "dcp" else _file_report(path, kind)
    report["path"] = args.path
    if args.verify and report["checksums"]["stored"]:
        failed = list(verify())
        report["checksums"]["verified"] = not failed
        report["checksums"]["failed"] = failed
    if args.json:
        json.dump(report, sys.stdout, indent=2, allow_nan=False)
        print()
    else:
        _print_inspect(report, sys.stdout)
    return EXIT_FAILURE if report["checksums"]["failed"] else EXIT_OK


# ---------------------------------------------------------------------------------------------
# verify


def _cmd_verify(args: argparse.Namespace) -> int:
    kind, path = checkpoint_kind(args.path)
    if kind == "torch":
        raise CommandError(
            f"{args.path}: a torch.save checkpoint, which stores no zerockpt checksums"
        )
    if kind == "dcp":
        from zerockpt import dcp

        result = dcp.verify(path, trusted=args.trust)
    else:
        result = zerockpt.verify(path)
    has_checksums, failed, checked = result.has_checksums, result.failed, result.tensors
    ok = not failed and (has_checksums or not args.require_checksums)
    if args.json:
        document = {
            "path": args.path,
            "kind": kind,
            "ok": ok,
            "tensors": checked,
            "checksums": {
                "stored": has_checksums,
                "verified": (not failed) if has_checksums else None,
                "failed": list(failed),
            },
        }
        json.dump(document, sys.stdout, indent=2)
        print()
    elif failed:
        _emit(
            f"{args.path}: FAILED: {len(failed)} of {_count(checked, 'tensor')} do not match their "
            "CRC-32C checksum:",
            sys.stdout,
        )
        for name in failed:
            _emit(f"  {name}", sys.stdout)
    elif not has_checksums:
        what = "" if ok else " (--require-checksums: FAILED)"
        _emit(
            f"{args.path}: structure OK, {_count(checked, 'tensor')}; no checksums stored, so "
            f"their bytes were not checked{what}",
            sys.stdout,
        )
    else:
        _emit(f"{args.path}: OK: {_count(checked, 'tensor')}, checksums match", sys.stdout)
    return EXIT_OK if ok else EXIT_FAILURE


# ---------------------------------------------------------------------------------------------
# convert


def _load_torch(path: str) -> Any:
    """``torch.load`` of a ``torch.save`` file: weights only, mapped when the format allows."""
    with open(path, "rb") as f:
        zipped = f.read(4) == _torchfile.ZIP_MAGIC  # only the zip format can be mapped
    try:
        with torch.serialization.safe_globals(_torchfile.data_globals(path)):
            if path.endswith(".safetensors"):
                # A torch.save file under this name: torch.load would read the path as
                # safetensors, so it gets the open file (which cannot be mapped).
                with open(path, "rb") as f:
                    return torch.load(f, weights_only=True, map_location="cpu")
            return torch.load(path, weights_only=True, mmap=zipped, map_location="cpu")
    except Exception as e:
        # torch.load reports a file it cannot read with pickle's UnpicklingError (an object
        # weights_only refuses; this package never imports pickle), RuntimeError (a bad zip
        # archive), EOFError and more: any of them means this file cannot be converted.
        # --debug shows the original exception as the cause.
        text = str(e)
        _, marker, after = text.partition("WeightsUnpickler error:")
        if marker:
            # The reason follows the marker, on its line or (newer torch) on the next ones.
            detail = next((line.strip() for line in after.splitlines() if line.strip()), "")
            detail = detail.split(". ")[0]
            raise CommandError(
                f"{path}: torch.load(weights_only=True) refuses it ({detail}); zerockpt converts "
                "only checkpoints of tensors and plain Python data"
            ) from e
        raise CommandError(
            f"{path}: torch.load failed: {_one_line(text) or type(e).__name__}"
        ) from e


def _torch_save(obj: object, destination: str) -> None:
    """``torch.save`` to a temporary file beside ``destination``, fsynced, then renamed over it.

    ``destination`` thus never holds a partial file, and tensors mapped from a file being
    replaced (converting a file onto itself) stay valid. The destination is checked and
    replaced by the rules of ``zerockpt.save`` (through symbolic links, mode, owner and group).
    """
    directory = os.path.dirname(_C.check_destination(destination)) or "."
    try:
        fd, temporary = tempfile.mkstemp(
            dir=directory, prefix=f".{os.path.basename(destination)}.", suffix=".tmp"
        )
    except OSError as e:  # name the destination, as zerockpt.save does
        why = f"cannot create a temporary file in {directory}: {e.strerror}"
        raise type(e)(e.errno, why, destination) from None
    try:
        try:
            mode = os.stat(destination).st_mode & 0o7777
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        _C.replace_file(temporary, destination)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _destination_kind(args: argparse.Namespace) -> str:
    if args.dst.endswith(TORCH_SUFFIXES):
        if args.max_shard_size is not None:
            raise UsageError(
                f"--max-shard-size writes a sharded directory, but {args.dst} names a torch.save "
                f"file ({', '.join(TORCH_SUFFIXES)})"
            )
        return "torch"
    return "sharded" if args.max_shard_size is not None else "file"


def _check_destination(dst: str, kind: str, force: bool) -> bool:
    """Refuses an existing destination unless ``force``; nothing is removed here.

    Returns:
        True when a sharded checkpoint must replace a file at ``dst`` (``--force``): it is then
        written beside it and swapped in only once complete (:func:`_swap_in_directory`).
    """
    if not os.path.lexists(dst):
        return False
    if os.path.isdir(dst):
        if kind != "sharded":
            raise CommandError(
                f"{dst}: is a directory (give --max-shard-size to write a sharded checkpoint "
                "into it)"
            )
        if not os.listdir(dst):
            return False  # an empty directory receives the shards
    if not force:
        raise CommandError(f"{dst}: already exists (use --force to overwrite it)")
    return kind == "sharded" and not os.path.isdir(dst)


def _swap_in_directory(staged: str, dst: str) -> None:
    """Renames the complete directory ``staged`` to ``dst``, where a file stands (--force).

    The file is renamed aside first and removed last: it is gone only once the new checkpoint
    is in place, and put back if the swap fails.
    """
    directory = os.path.dirname(os.path.abspath(dst))
    aside = os.path.join(
        directory, f".{os.path.basename(dst)}.{os.getpid()}.{os.urandom(8).hex()}.zerockpt-old"
    )
    os.rename(dst, aside)
    try:
        os.rename(staged, dst)
    except BaseException:
        os.rename(aside, dst)
        raise
    os.unlink(aside)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cmd_convert(args: argparse.Namespace) -> int:
    dst_kind = _destination_kind(args)
    src_kind, src = checkpoint_kind(args.src)
    if src_kind == "torch" and dst_kind == "torch":
        raise UsageError(
            f"{args.src} and {args.dst} are both torch.save checkpoints: convert to or from "
            "zerockpt (a DST not ending in .pt, .pth or .bin gets a zerockpt file)"
        )
    swap = _check_destination(args.dst, dst_kind, args.force)
    # A sharded checkpoint named by its index: count the shards beside it.
    source_bytes = _disk_bytes(
        (os.path.dirname(src) or ".") if src_kind == "sharded" and not os.path.isdir(src) else src
    )
    show = (
        args.progress
        if args.progress is not None
        else sys.stderr.isatty() and source_bytes > _PROGRESS_AUTO_BYTES
    )
    if show:
        try:
            _progress.tqdm_class()
        except ImportError as e:  # the bar needs tqdm: say what to install, in one line
            raise CommandError(str(e)) from e
    start = time.perf_counter()
    # A file that a sharded checkpoint replaces stays until the new one is complete.
    target = (
        tempfile.mkdtemp(
            dir=os.path.dirname(os.path.abspath(args.dst)),
            prefix=f".{os.path.basename(args.dst)}.",
            suffix=".zerockpt-convert",
        )
        if swap
        else args.dst
    )
    try:
        if src_kind == "dcp":
            with _refused_data():
                count, nbytes = _convert_dcp(
                    src, target, dst_kind, args.max_shard_size, show, args.trust
                )
        else:
            with _refused_data():
                state = (
                    _load_torch(src) if src_kind == "torch" else zerockpt.load(src, progress=show)
                )
            count, nbytes = _tensor_stats(state)
            if dst_kind == "torch":
                _torch_save(state, target)
            else:
                with _refused_data():
                    zerockpt.save(state, target, max_shard_size=args.max_shard_size, progress=show)
            del state
        if swap:
            _swap_in_directory(target, args.dst)
    finally:
        if swap:
            shutil.rmtree(target, ignore_errors=True)  # gone already once swapped in
    elapsed = time.perf_counter() - start
    print(
        f"{args.src} -> {args.dst}: {_count(count, 'tensor')}, {human_bytes(nbytes)} "
        f"({nbytes} bytes) in {elapsed:.2f} s"
    )
    return EXIT_OK


def _convert_dcp(
    src: str, dst: str, dst_kind: str, max_shard_size: int | None, progress: bool, trusted: bool
) -> tuple[int, int]:
    """A DCP checkpoint -> ``dst``; returns (tensors, bytes) written."""
    import zerockpt.dcp

    if dst_kind != "torch":
        zerockpt.dcp.to_file(
            src, dst, max_shard_size=max_shard_size, progress=progress, trusted=trusted
        )
        with zerockpt.open(dst) as f:
            stored = [f.info(name) for name in f]
        kept = [info for info in stored if info.alias_of is None]
        return len(kept), sum(info.nbytes for info in kept)
    # to_file assembles the full state into a zerockpt file, loaded back mapped; the file is
    # removed at once (the mapping stays valid) and only the torch.save file remains.
    directory = os.path.dirname(os.path.abspath(dst))
    fd, scratch = tempfile.mkstemp(
        dir=directory, prefix=f".{os.path.basename(dst)}.", suffix=".safetensors.tmp"
    )
    os.close(fd)
    try:
        zerockpt.dcp.to_file(src, scratch, durable=False, progress=progress, trusted=trusted)
        state = zerockpt.load(scratch)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(scratch)
    _torch_save(state, dst)
    return _tensor_stats(state)


# ---------------------------------------------------------------------------------------------
# bench (zerockpt.bench)


def _bench_unavailable(reason: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        raise CommandError(f"the bench subcommand is not available: {reason}")

    return run


def _add_bench_parser(subparsers: Any, configure: bool) -> None:
    """Adds ``bench``; with ``configure``, imports zerockpt.bench to set up its arguments.

    Only ``zerockpt bench ...`` imports that module, so the other commands neither pay for nor
    depend on it; if it is missing or incomplete, ``bench`` fails with one clear line.
    """
    help_text = "benchmark zerockpt against torch.save/torch.load and safetensors"
    parser = subparsers.add_parser(
        "bench", help=help_text, description=help_text, conflict_handler="resolve"
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="raise errors with their traceback",
    )
    if not configure:
        return
    try:
        bench = importlib.import_module("zerockpt.bench")
        add_arguments = bench.add_arguments
        run = bench.run
    except (ImportError, AttributeError) as e:
        parser.set_defaults(handler=_bench_unavailable(_one_line(str(e))), accepts_extra=True)
        return
    add_arguments(parser)
    parser.set_defaults(handler=run)


# ---------------------------------------------------------------------------------------------
# Parser and entry point


def _max_shard_size(text: str) -> int:
    try:
        return sharded.parse_size(text.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# Where the commands that read a checkpoint accept it.
_PATHS_HELP = (
    "PATH: a zerockpt/safetensors file, a sharded directory (model-0000k-of-0000n shards + "
    f"{sharded.INDEX_NAME}) or its index file, a zerockpt.dcp checkpoint directory, or (with "
    "--trust) a torch.distributed.checkpoint directory."
)


def _add_trust(sub: argparse.ArgumentParser) -> None:
    """Adds ``--trust``: read torch's native DCP layout, whose metadata is a pickle."""
    sub.add_argument(
        "--trust",
        action="store_true",
        help="read a checkpoint in torch's native DCP format (.metadata + *.distcp, from "
        "torch.distributed.checkpoint's FileSystemWriter), whose metadata is a pickle that "
        "can run code: only for checkpoints from a source you trust",
    )


def _add_command(
    subparsers: Any, name: str, help_text: str, description: str
) -> argparse.ArgumentParser:
    """A subcommand's parser, which also takes ``--debug`` after the command."""
    sub: argparse.ArgumentParser = subparsers.add_parser(
        name, help=help_text, description=description
    )
    # Accepted after the command too; SUPPRESS keeps a --debug given before it.
    sub.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="raise errors with their traceback",
    )
    return sub


def _add_inspect(subparsers: Any) -> None:
    """Adds ``inspect``."""
    inspect = _add_command(
        subparsers,
        "inspect",
        "show a checkpoint's tensors, metadata, aliases and checksums",
        "Show a checkpoint's tensors (name, dtype, shape, size), totals, metadata, tied tensors "
        "and whether checksums are stored. " + _PATHS_HELP,
    )
    inspect.add_argument("path", metavar="PATH")
    inspect.add_argument("--json", action="store_true", help="print one JSON document")
    inspect.add_argument(
        "--verify", action="store_true", help="also check every tensor's CRC-32C (exit 1 if bad)"
    )
    _add_trust(inspect)
    inspect.set_defaults(handler=_cmd_inspect)


def _add_convert(subparsers: Any) -> None:
    """Adds ``convert``."""
    convert = _add_command(
        subparsers,
        "convert",
        "convert between torch.save and zerockpt checkpoints",
        "Convert SRC to DST. SRC: a torch.save checkpoint (loaded with weights_only=True), a "
        "zerockpt/safetensors file, a sharded directory, a zerockpt.dcp directory or (with "
        "--trust) a torch.distributed.checkpoint directory. DST: a "
        "torch.save file when it ends in .pt, .pth or .bin; a sharded directory with "
        "--max-shard-size; else a zerockpt file. Nested training state (model, optimizer, "
        "step...) is kept.",
    )
    convert.add_argument("src", metavar="SRC")
    convert.add_argument("dst", metavar="DST")
    convert.add_argument(
        "--max-shard-size",
        type=_max_shard_size,
        metavar="SIZE",
        help="write a Hugging Face sharded directory with shards of at most SIZE (e.g. 5GB, "
        "500MB, 10GiB)",
    )
    convert.add_argument("--force", action="store_true", help="overwrite an existing DST")
    convert.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on stderr (default: when stderr is a terminal and SRC is "
        "larger than 1 GB)",
    )
    _add_trust(convert)
    convert.set_defaults(handler=_cmd_convert)


def _add_verify(subparsers: Any) -> None:
    """Adds ``verify``."""
    verify = _add_command(
        subparsers,
        "verify",
        "check a checkpoint's structure and CRC-32C checksums",
        "Check a checkpoint's structure and every tensor's CRC-32C checksum. Exit status 0 when "
        "everything matches (or no checksums are stored), 1 listing the tensors that fail. "
        + _PATHS_HELP,
    )
    verify.add_argument("path", metavar="PATH")
    verify.add_argument("--json", action="store_true", help="print one JSON document")
    verify.add_argument(
        "--require-checksums",
        action="store_true",
        help="fail (exit 1) when the checkpoint stores no checksums",
    )
    _add_trust(verify)
    verify.set_defaults(handler=_cmd_verify)


def build_parser(*, configure_bench: bool = False) -> argparse.ArgumentParser:
    """The ``zerockpt`` argument parser.

    Args:
        configure_bench: Import ``zerockpt.bench`` to set up the ``bench`` subcommand's own
            arguments (only needed to run it or show its help).

    Returns:
        The parser; parsed arguments carry ``handler(args) -> int`` and ``debug``.
    """
    parser = _Parser(
        prog=PROG,
        description="Inspect, convert and verify zerockpt / safetensors checkpoints.",
        epilog="Exit status: 0 fine, 1 failure (one line on stderr), 2 bad command line.",
    )
    parser.add_argument("--debug", action="store_true", help="raise errors with their traceback")
    parser.add_argument("--version", action="version", version=f"{PROG} {zerockpt.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    _add_inspect(subparsers)
    _add_convert(subparsers)
    _add_verify(subparsers)
    _add_bench_parser(subparsers, configure_bench)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named on a command line: its first argument not starting with '-'."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


# Errors reported as one line: the command line's own, zerockpt's (a bad or corrupted file;
# ChecksumError is a FormatError) and the system's. Anything else is a bug, see _report_bug.
_EXPECTED_ERRORS = (CommandError, zerockpt.FormatError, OSError)

BUG_REPORT = "this is a bug in zerockpt; please report it with the traceback above"


def _report_bug(error: BaseException) -> None:
    """Prints the traceback of an unexpected error (escaped, as it may quote names from a
    file), then asks for a report."""
    for chunk in traceback.format_exception(error):
        for line in chunk.rstrip("\n").split("\n"):
            _emit(line, sys.stderr)
    _error_line(BUG_REPORT)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line.

    Args:
        argv: The arguments, without the program name; default ``sys.argv[1:]``.

    Returns:
        The exit status: 0 fine, 1 failure (one line on stderr), 2 bad command line, 130
        interrupted (Ctrl-C).

    Raises:
        Exception: With ``--debug``, the error that made the command fail.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(configure_bench=_command_of(argv) == "bench")
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "accepts_extra", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except UsageError as e:
        _error_line(str(e))
        return EXIT_USAGE
    except SystemExit as e:  # --help and --version print and exit
        return e.code if isinstance(e.code, int) else EXIT_OK if e.code is None else EXIT_USAGE
    try:
        with _escaped_warnings():
            status: int = args.handler(args)
    except UsageError as e:
        if args.debug:
            raise
        _error_line(str(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        if args.debug:
            raise
        _error_line("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `zerockpt inspect big | head`: stop quietly
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    except _EXPECTED_ERRORS as e:
        if args.debug:
            raise
        _error_line(_describe(e))
        return EXIT_FAILURE
    except Exception as e:
        if args.debug:
            raise
        _report_bug(e)
        return EXIT_FAILURE
    return int(status)
