"""The README's quickstart runs as written, and every row of its switching tables runs against
the call it replaces."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import inspect
import io
import math
import os
import re
import shlex
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zerockpt
import zerockpt.cli

README = Path(__file__).resolve().parent.parent / "README.md"


def test_quickstart_runs(tmp_path: Path) -> None:
    text = README.read_text()
    section = re.search(r"## Quickstart\n(.*?)\n## ", text, re.S)
    assert section, "README has no quickstart section"
    blocks = re.findall(r"```python\n(.*?)```", section.group(1), re.S)
    assert len(blocks) >= 2, "README's quickstart has fewer code blocks than expected"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    namespace: dict[str, object] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for block in blocks:  # one session: later blocks use earlier names
                if '"cuda' in block and not torch.cuda.is_available():
                    continue  # the GPU example (the CUDA tests cover what it does)
                exec(compile(block, str(README), "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert (tmp_path / "model.safetensors").exists()


# --- "Switching from safetensors" and "Switching from torch.save": every row runs ---------------
#
# Each table row pairs a call of the old library with zerockpt's. The rows are read from the
# README; each is run as written (Python: the value of an expression, or the names a statement
# binds; a `zerockpt ...` cell: the command line) against the old call on the same data, by the
# check registered under its zerockpt cell. A row without a check, or a check without a row,
# fails.

TABLES = ("Switching from safetensors", "Switching from torch.save")
_CELL = re.compile(r"`([^`]+)`")


@dataclasses.dataclass(frozen=True)
class Row:
    table: str
    old: str
    new: str


def table_rows() -> list[Row]:
    text = README.read_text()
    rows: list[Row] = []
    for title in TABLES:
        section = re.search(rf"## {re.escape(title)}\n(.*?)\n## ", text, re.S)
        assert section, f"README has no section {title!r}"
        lines = [line for line in section.group(1).splitlines() if line.startswith("|")]
        assert len(lines) > 2, f"{title}: no table"
        for line in lines[2:]:  # after the header and its separator
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            codes = [_CELL.fullmatch(c) for c in cells]
            assert len(cells) == 2 and all(codes), f"{title}: not two code cells: {line}"
            rows.append(Row(title, codes[0].group(1), codes[1].group(1)))  # type: ignore[union-attr]
    return rows


def _model(seed: int = 0, *, tied: bool = True) -> torch.nn.Module:
    """A small model with tied weights (embedding and output head) and a BatchNorm buffer."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Embedding(10, 4),
        torch.nn.Linear(4, 4),
        torch.nn.BatchNorm1d(4),
        torch.nn.Linear(4, 10, bias=False),
    )
    if tied:
        model[3].weight = model[0].weight
    model[2].running_mean.uniform_()
    return model


def _state(model: torch.nn.Module) -> dict[str, Any]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([1, 2, 3])).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optim": optimizer.state_dict(), "step": 7}


def _extras() -> dict[str, Any]:
    return {
        "mean": np.arange(6, dtype=np.float32).reshape(2, 3),
        "count": np.int64(3),
        "dtype": torch.bfloat16,
        "shape": torch.Size([2, 3]),
        "seen": {1, 2, 3},
        "frozen": frozenset({"a"}),
        "raw": b"\x00\x01zerockpt",
        "args": argparse.Namespace(lr=0.1, name="run"),
        "order": collections.OrderedDict([("b", 1), ("a", 2)]),
        "counts": collections.defaultdict(int, {"x": 2}),
    }


def names(**extra: Any) -> dict[str, Any]:
    """The names the tables use, fresh for each cell (see the README's text above them)."""
    import safetensors.torch as st
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    model = _model()
    torch.manual_seed(1)
    tensors = {"w": torch.randn(4, 3), "b": torch.arange(5, dtype=torch.int64)}
    namespace: dict[str, Any] = {
        "argparse": argparse,
        "io": io,
        "np": np,
        "os": os,
        "torch": torch,
        "zerockpt": zerockpt,
        "tensors": tensors,
        "data": st.save(tensors),
        "model": model,
        "state": _state(_model()),
        "extras": _extras(),
        "buffer": io.BytesIO(),
        "step": 7,
        "dcp_to_torch_save": dcp_to_torch_save,
    }
    for name in ("save_file", "load_file", "save", "load", "safe_open", "save_model", "load_model"):
        namespace[name] = getattr(st, name)
    namespace.update(extra)
    return namespace


def run(code: str, namespace: dict[str, Any] | None = None) -> Any:
    """Runs one cell: the value of an expression, else the namespace the statements bind."""
    if code.startswith("zerockpt "):
        status = zerockpt.cli.main(shlex.split(code)[1:])
        assert status == 0, code
        return None
    namespace = names() if namespace is None else namespace
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            compiled = compile(code, "README.md", "eval")
        except SyntaxError:
            exec(compile(code, "README.md", "exec"), namespace)
            return namespace
        return eval(compiled, namespace)


def assert_same(a: Any, b: Any) -> None:
    """Same type, structure and values: tensors bitwise (dtype, shape), numpy arrays exactly,
    mappings in order with their ``_metadata`` and ``default_factory``."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert [(type(k), k) for k in a] == [(type(k), k) for k in b]
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None)
        assert getattr(a, "default_factory", None) == getattr(b, "default_factory", None)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, argparse.Namespace):
        assert_same(vars(a), vars(b))
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


CHECKS: dict[str, Callable[[Row], None]] = {}


def check(*new: str) -> Callable[[Callable[[Row], None]], Callable[[Row], None]]:
    """Registers a check for the rows whose zerockpt cell is one of ``new``."""

    def register(fn: Callable[[Row], None]) -> Callable[[Row], None]:
        for code in new:
            assert code not in CHECKS, code
            CHECKS[code] = fn
        return fn

    return register


def in_dir(name: str, fn: Callable[[], Any]) -> Any:
    os.makedirs(name, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(name)
    try:
        return fn()
    finally:
        os.chdir(cwd)


# --- safetensors rows ---


def _by_name(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors sorted by name: safetensors orders them its own way; what they hold is compared."""
    return dict(sorted(tensors.items()))


def _safetensors_file(**kwargs: Any) -> None:
    import safetensors.torch as st

    st.save_file(names()["tensors"], "model.safetensors", **kwargs)


@check('zerockpt.save(tensors, "model.safetensors")')
def _save_file(row: Row) -> None:
    from safetensors.torch import load_file

    in_dir("old", lambda: run(row.old))
    in_dir("new", lambda: run(row.new))
    expected = _by_name(names()["tensors"])
    assert_same(_by_name(load_file("old/model.safetensors")), expected)
    assert_same(_by_name(load_file("new/model.safetensors")), expected)  # safetensors reads it
    assert_same(_by_name(zerockpt.load("old/model.safetensors")), expected)


@check('zerockpt.save(tensors, "model.safetensors", metadata={"step": "7"})')
def _save_file_metadata(row: Row) -> None:
    from safetensors.torch import safe_open

    in_dir("old", lambda: run(row.old))
    in_dir("new", lambda: run(row.new))
    for side in ("old", "new"):
        with safe_open(f"{side}/model.safetensors", framework="pt") as f:
            assert f.metadata()["step"] == "7"


@check(
    'zerockpt.load("model.safetensors")',
    'with zerockpt.open("model.safetensors") as f: names, w = list(f.keys()), f.get_tensor("w")',
    'with zerockpt.open("model.safetensors") as f: part = f.get_slice("w"); shape, dtype, rows '
    "= part.get_shape(), part.get_dtype(), part[1:3]",
)
def _read_a_safetensors_file(row: Row) -> None:
    _safetensors_file()
    old, new = run(row.old), run(row.new)
    if isinstance(old, dict) and "torch" in old:  # statements: compare the names they bound
        bound = [k for k in ("names", "w", "shape", "dtype", "rows") if k in old]
        assert bound
        old, new = {k: old[k] for k in bound}, {k: new[k] for k in bound}
    else:
        old, new = _by_name(old), _by_name(new)
    assert_same(new, old)


@check('with zerockpt.open("model.safetensors") as f: meta = f.metadata()')
def _metadata(row: Row) -> None:
    _safetensors_file(metadata={"step": "7", "note": "x"})
    assert run(row.new)["meta"] == run(row.old)["meta"] == {"step": "7", "note": "x"}


@check("zerockpt.save_bytes(tensors)")
def _save_bytes(row: Row) -> None:
    from safetensors.torch import load

    old, new = run(row.old), run(row.new)
    assert isinstance(new, bytes)
    expected = _by_name(names()["tensors"])
    assert_same(_by_name(load(new)), expected)  # safetensors reads zerockpt's bytes
    assert_same(_by_name(zerockpt.load_bytes(old)), expected)  # and zerockpt safetensors'


@check("zerockpt.load_bytes(data)")
def _load_bytes(row: Row) -> None:
    assert_same(_by_name(run(row.new)), _by_name(run(row.old)))


@check('zerockpt.save(model, "model.safetensors")')
def _save_model(row: Row) -> None:
    from safetensors.torch import load_model

    in_dir("old", lambda: run(row.old))
    in_dir("new", lambda: run(row.new))
    expected = _model().state_dict()
    # Each file loads back through its own library; zerockpt's (tied weights stored once, as
    # an alias) through safetensors' too. (save_model drops the tied duplicates from its file,
    # which then holds less than model.state_dict(): load_model knows to tie them again.)
    for file, load in [
        ("old/model.safetensors", load_model),
        ("new/model.safetensors", zerockpt.load_state_dict),
        ("new/model.safetensors", load_model),
    ]:
        target = _fresh()
        load(target, file)
        assert_same(target.state_dict(), expected)


def _fresh(*, tied: bool = True) -> torch.nn.Module:
    """:func:`_model`'s architecture, initialised differently."""
    return _model(123, tied=tied)


@check('zerockpt.load_state_dict(model, "model.safetensors")')
def _load_model(row: Row) -> None:
    if row.table == "Switching from safetensors":
        from safetensors.torch import save_model

        # A file from save_model (a model without tied weights: with them, save_model leaves
        # the duplicates out), and one from zerockpt.save (tied weights as an alias).
        cases = [(False, lambda: save_model(_model(tied=False), "model.safetensors"))]
        cases.append((True, lambda: zerockpt.save(_model(), "model.safetensors")))
    else:
        torch.save(_model().state_dict(), "model.pt")
        cases = [(True, lambda: zerockpt.save(_model().state_dict(), "model.safetensors"))]
    for tied, write in cases:
        write()
        old_model, new_model = _fresh(tied=tied), _fresh(tied=tied)
        old = run(row.old, names(model=old_model))
        new = run(row.new, names(model=new_model))
        if row.table == "Switching from torch.save":
            assert_same(tuple(new), tuple(old))  # the same _IncompatibleKeys
        assert_same(new_model.state_dict(), old_model.state_dict())
        assert_same(new_model.state_dict(), _model(tied=tied).state_dict())


@check("from zerockpt.safetensors import load_file, safe_open, save_file")
def _compat_module(row: Row) -> None:
    import safetensors.torch as st
    import zerockpt.safetensors

    old, new = run(row.old), run(row.new)
    tensors = names()["tensors"]
    new["save_file"](tensors, "new.safetensors")
    old["save_file"](tensors, "old.safetensors")
    for load_file in (old["load_file"], new["load_file"]):
        for file in ("old.safetensors", "new.safetensors"):
            assert_same(_by_name(load_file(file)), _by_name(tensors))
    with new["safe_open"]("old.safetensors", framework="pt") as f:
        assert_same(f.get_tensor("w"), tensors["w"])
    functions = ("save_file", "load_file", "save", "load", "safe_open", "save_model", "load_model")
    for module in (zerockpt.safetensors, zerockpt.safetensors.torch):
        for name in functions:
            if name == "safe_open":
                continue  # a class in safetensors (a Rust type without a signature)
            ours = inspect.signature(getattr(module, name)).parameters
            theirs = inspect.signature(getattr(st, name)).parameters
            assert list(ours) == list(theirs), name
            assert [p.default for p in ours.values()] == [p.default for p in theirs.values()]


# --- torch rows ---


def _torch_and_zerockpt_files(
    obj: Any, old: str = "ckpt.pt", new: str = "ckpt.safetensors"
) -> None:
    torch.save(obj, old)
    zerockpt.save(obj, new)


def _loads(old: str, new: str) -> tuple[Any, Any]:
    return torch.load(old, weights_only=False), zerockpt.load(new)


@check("zerockpt.state_dict(model)")
def _state_dict(row: Row) -> None:
    model = _model()
    assert_same(run(row.new, names(model=model)), run(row.old, names(model=model)))


@check(
    'zerockpt.save(model.state_dict(), "model.safetensors")',
    'zerockpt.save(state, "ckpt.safetensors")',
    'zerockpt.save(extras, "extras.safetensors")',
    'with open("ckpt.safetensors", "wb") as f: zerockpt.save(state, f)',
    'zerockpt.save(state, "runs/1/ckpt.safetensors", makedirs=True)',
    'pending = zerockpt.save_async(state, "ckpt.safetensors"); pending.result()',
)
def _save(row: Row) -> None:
    """Both calls run; what torch.load reads back equals what zerockpt.load reads back."""
    old_file = re.findall(r'"([^"]+\.pt)"', row.old)[-1]
    new_file = re.findall(r'"([^"]+\.safetensors)"', row.new)[-1]
    run(row.new)  # first: the directory of a makedirs row does not exist yet
    run(row.old)
    old, new = _loads(old_file, new_file)
    assert_same(new, old)


@check(
    'zerockpt.load("ckpt.safetensors")',
    'zerockpt.load("ckpt.safetensors", map_location="cpu")',
    'zerockpt.load("ckpt.safetensors", weights_only=True)',
    'zerockpt.load("ckpt.safetensors", mmap=True)',
)
def _load(row: Row) -> None:
    _torch_and_zerockpt_files(names()["state"])
    assert_same(run(row.new), run(row.old))
    if "weights_only" in row.new:  # the README says so below the table
        with pytest.raises(ValueError, match="weights_only"):
            zerockpt.load("ckpt.safetensors", weights_only=False)


@check('zerockpt.load_state_dict(model, "model.safetensors", strict=False)')
def _load_not_strict(row: Row) -> None:
    torch.save(_model().state_dict(), "model.pt")
    zerockpt.save(_model().state_dict(), "model.safetensors")

    def other() -> torch.nn.Module:  # one layer fewer, one more: missing and unexpected keys
        torch.manual_seed(5)
        return torch.nn.Sequential(
            torch.nn.Embedding(10, 4),
            torch.nn.Linear(4, 4),
            torch.nn.ReLU(),
            torch.nn.Linear(4, 10),
        )

    old_model, new_model = other(), other()
    old = run(row.old, names(model=old_model))
    new = run(row.new, names(model=new_model))
    assert old.missing_keys and old.unexpected_keys
    assert_same(tuple(new), tuple(old))
    assert_same(new_model.state_dict(), old_model.state_dict())


@check("zerockpt.save(state, buffer)")
def _save_to_buffer(row: Row) -> None:
    old, new = names(), names()
    run(row.old, old)
    run(row.new, new)
    old["buffer"].seek(0)
    new["buffer"].seek(0)
    assert_same(zerockpt.load(new["buffer"]), torch.load(old["buffer"], weights_only=False))


@check("zerockpt.load(buffer)")
def _load_from_buffer(row: Row) -> None:
    state = names()["state"]
    old_buffer, new_buffer = io.BytesIO(), io.BytesIO()
    torch.save(state, old_buffer)
    zerockpt.save(state, new_buffer)
    old_buffer.seek(0)
    new_buffer.seek(0)
    assert_same(run(row.new, names(buffer=new_buffer)), run(row.old, names(buffer=old_buffer)))


@check('zerockpt.Checkpointer("ckpts").save(step, state)')
def _checkpointer_save(row: Row) -> None:
    run(row.old)
    run(row.new)
    latest = zerockpt.Checkpointer("ckpts").load_latest()
    assert latest is not None and latest[0] == 7
    assert_same(latest[1], torch.load("ckpts/7.pt", weights_only=False))


@check('zerockpt.Checkpointer("ckpts").load_latest()')
def _checkpointer_load(row: Row) -> None:
    state = names()["state"]
    os.makedirs("ckpts")
    torch.save(state, "ckpts/7.pt")
    zerockpt.Checkpointer("ckpts").save(7, state)
    step, new = run(row.new)
    assert step == 7
    assert_same(new, run(row.old))


@check("zerockpt convert old.pt old.safetensors")
def _convert(row: Row) -> None:
    torch.save(names()["state"], "old.pt")
    with pytest.raises(zerockpt.FormatError, match="zerockpt convert"):
        zerockpt.load("old.pt")  # what the row replaces
    run(row.new)
    assert_same(zerockpt.load("old.safetensors"), run(row.old))


@check("zerockpt convert --trust dcp_dir model.safetensors")
def _convert_dcp(row: Row) -> None:
    import torch.distributed.checkpoint as dcp

    # No copy-ahead: once the suite's test accelerator is registered, torch's overlapping
    # loader asks it for a stream, which it does not have.
    writer = dcp.FileSystemWriter("dcp_dir", per_thread_copy_ahead=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(names()["state"], storage_writer=writer, no_dist=True)
    run(row.old)
    run(row.new)
    assert_same(zerockpt.load("model.safetensors"), torch.load("model.pt", weights_only=False))


def test_every_row_has_a_check() -> None:
    rows = table_rows()
    assert len(rows) >= 20
    news = [row.new for row in rows]
    cells = [(row.table, row.new) for row in rows]
    assert len(set(cells)) == len(cells), "two rows of a table with the same zerockpt call"
    assert sorted(set(news) - set(CHECKS)) == [], "rows without a check"
    assert sorted(set(CHECKS) - set(news)) == [], "checks without a row"


@pytest.mark.parametrize("row", table_rows(), ids=lambda row: row.new[:60])
def test_table_row(row: Row, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    CHECKS[row.new](row)
