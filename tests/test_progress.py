"""Progress bars: save, load, verify and load_state_dict with progress=True.

The C++ calls count the bytes they write, read or check into a ``_C.Progress``; the work runs
on the caller's thread and a helper thread draws tqdm on stderr. Checked here: the counts are
exact (tied weights once, header excluded), results and torch's thread-local state (grad mode,
dispatch and function modes, the current stream) are the same with and without a bar, a
cancelled counter stops a call with KeyboardInterrupt and commits nothing, and no bar is ever
drawn by default. Ctrl-C itself: test_interrupt.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import zerockpt
from conftest import DispatchLog, assert_bitwise_equal, random_tensor, temp_leftovers
from torch import nn
from torch.overrides import TorchFunctionMode
from zerockpt import _C, _progress
from zerockpt._args import load_options, save_options


def _state() -> dict[str, torch.Tensor]:
    shared = random_tensor((300, 40), torch.float32, 1)
    return {
        "a": random_tensor((1000, 33), torch.float32, 2),
        "b": random_tensor((77,), torch.bfloat16, 3),
        "tied": shared,
        "tied_again": shared,  # stored once
        "strided": random_tensor((40, 60), torch.int16, 4).t(),
        "empty": torch.empty(0, 3),
    }


def _data_bytes(state: dict[str, torch.Tensor]) -> int:
    return _progress.unique_nbytes(state.values())


def test_unique_nbytes_counts_a_view_once() -> None:
    state = _state()
    expected = sum(t.numel() * t.element_size() for k, t in state.items() if k != "tied_again")
    assert _data_bytes(state) == expected
    base = torch.zeros(10)
    # Different views of one storage are different bytes to write.
    assert _progress.unique_nbytes([base[:5], base[5:]]) == 40


def test_counter_counts_every_byte_written_read_and_checked(tmp_path: Path) -> None:
    state = _state()
    path = str(tmp_path / "x.safetensors")
    saved = _C.Progress()
    _C.save(state, path, save_options(threads=2), None, saved)
    assert saved.total == saved.done == _data_bytes(state)

    read = _C.Progress()
    tensors, _, _ = _C.load(path, load_options(mmap=False, threads=2), read)
    assert read.total == read.done == _data_bytes(state)
    for name, t in state.items():
        assert_bitwise_equal(tensors[name], t)

    checked = _C.Progress()
    assert _C._File(path).verify(2, True, checked) == (True, [])
    assert checked.total == checked.done == _data_bytes(state)

    mapped = _C.Progress()
    _C.load(path, load_options(threads=2), mapped)  # nothing to read up front: done at once
    assert mapped.total == mapped.done == _data_bytes(state)


def test_fixed_total_is_kept(tmp_path: Path) -> None:
    counter = _C.Progress(12345)
    _C.save(
        {"w": torch.ones(10)},
        str(tmp_path / "w"),
        save_options(durable=False, threads=1),
        None,
        counter,
    )
    assert (counter.total, counter.done) == (12345, 40)


def test_load_state_dict_counts_file_bytes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32), nn.Linear(32, 8).half())
    path = tmp_path / "m.safetensors"
    zerockpt.save(model, path)
    fresh = nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32), nn.Linear(32, 8))  # fp32 last
    counter = _C.Progress()
    file = _C._File(str(path))
    result = _C.load_state_dict(fresh, None, None, False, file, load_options(threads=2), counter)
    assert result == ([], [], [])
    stored = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    assert counter.done == counter.total == stored
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a.float(), b)


def test_cancelled_counter_stops_a_save_and_commits_nothing(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    zerockpt.save({"old": torch.ones(3)}, path)
    before = path.read_bytes()
    counter = _C.Progress()
    counter.cancel()
    with pytest.raises(KeyboardInterrupt, match="cancelled while writing"):
        _C.save(_state(), str(path), save_options(threads=2), None, counter)
    assert path.read_bytes() == before
    assert temp_leftovers(tmp_path) == []


def test_cancelled_counter_stops_reads_and_checks(tmp_path: Path) -> None:
    path = str(tmp_path / "x.safetensors")
    zerockpt.save(_state(), path)
    counter = _C.Progress()
    counter.cancel()
    with pytest.raises(KeyboardInterrupt, match="cancelled while reading"):
        _C.load(path, load_options(mmap=False, threads=2), counter)
    with pytest.raises(KeyboardInterrupt, match="cancelled while checking"):
        _C._File(path).verify(2, False, counter)


def test_cancel_between_modules_of_a_load_state_dict() -> None:
    """Cancelled by the first child's hook: the second child is left as it was."""
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).state_dict()
    target = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    untouched = target[1].weight.detach().clone()
    counter = _C.Progress()

    def cancel_after_first(module: nn.Module, *args: Any) -> None:
        counter.cancel()

    target[0].register_load_state_dict_post_hook(cancel_after_first)
    with pytest.raises(KeyboardInterrupt, match="cancelled"):
        _C.load_state_dict(target, source, None, False, None, load_options(threads=1), counter)
    assert torch.equal(target[0].weight, source["0.weight"])
    assert torch.equal(target[1].weight, untouched)


def _bar_lines(err: str) -> list[str]:
    return [line for line in err.replace("\r", "\n").splitlines() if line.strip()]


def test_save_and_load_draw_a_bar_and_give_the_same_results(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    state = _state()
    zerockpt.save(state, tmp_path / "plain.safetensors")
    assert capfd.readouterr().err == ""  # never a bar by default
    zerockpt.save(state, tmp_path / "bar.safetensors", progress=True)
    err = capfd.readouterr().err
    assert "Saving bar.safetensors" in err and "100%" in _bar_lines(err)[-1]
    assert (tmp_path / "bar.safetensors").read_bytes()[8:200] != b""
    plain = zerockpt.load(tmp_path / "plain.safetensors", mmap=False)
    loaded = zerockpt.load(tmp_path / "bar.safetensors", mmap=False, verify=True, progress=True)
    err = capfd.readouterr().err
    assert "Loading bar.safetensors" in err and "100%" in _bar_lines(err)[-1]
    assert list(loaded) == list(plain)
    for name in plain:
        assert_bitwise_equal(loaded[name], plain[name])
    assert loaded["tied"] is loaded["tied_again"]


def test_sharded_save_load_and_verify_with_bars(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    state = _state()
    directory = tmp_path / "ck"
    zerockpt.save(state, directory, max_shard_size="40KB", progress=True)
    err = capfd.readouterr().err
    assert "Saving ck" in err and "100%" in _bar_lines(err)[-1]
    assert len(list(directory.glob("model-*.safetensors"))) > 1
    loaded = zerockpt.load(directory, mmap=False, progress=True)
    for name, t in state.items():
        assert_bitwise_equal(loaded[name], t)
    assert "Loading ck" in capfd.readouterr().err
    result = zerockpt.verify(directory, progress=True)
    assert result.ok and result.has_checksums
    assert "Verifying" in capfd.readouterr().err


@pytest.mark.parametrize("sharded", [False, True])
def test_load_state_dict_with_a_bar(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], sharded: bool
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    path = tmp_path / ("ck" if sharded else "m.safetensors")
    zerockpt.save(model, path, **({"max_shard_size": "10KB"} if sharded else {}))
    fresh = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    result = zerockpt.load_state_dict(fresh, path, progress=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert_bitwise_equal(b, a)
    err = capfd.readouterr().err
    assert f"Loading {path.name}" in err and "100%" in _bar_lines(err)[-1]


def test_errors_raise_on_the_callers_thread(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        zerockpt.load(tmp_path / "missing.safetensors", progress=True)
    assert info.value.filename == str(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"tensor 'm' is on meta"):
        zerockpt.save({"m": torch.empty(3, device="meta")}, tmp_path / "m", progress=True)
    assert temp_leftovers(tmp_path) == []


def test_without_tqdm_the_error_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install tqdm \(or zerockpt\[progress\]\)"):
        zerockpt.save({"w": torch.ones(2)}, tmp_path / "w", progress=True)
    assert not (tmp_path / "w").exists()
    zerockpt.save({"w": torch.ones(2)}, tmp_path / "w")  # no bar asked: no tqdm needed


def test_the_work_runs_on_the_callers_thread_while_a_helper_draws(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    caller = threading.get_ident()
    drawn = threading.Event()
    original = _progress._draw

    def draw(bar: Any, done: int, total: int) -> None:
        if threading.get_ident() != caller:  # the final 100% is drawn by the caller
            drawn.set()
        original(bar, done, total)

    def work(counter: _C.Progress) -> int:
        assert drawn.wait(10)  # the helper draws while this thread is busy
        return threading.get_ident()

    monkeypatch.setattr(_progress, "_draw", draw)
    assert _progress.run(True, "Working", work) == caller
    assert "Working" in capfd.readouterr().err
    assert not [t for t in threading.enumerate() if t.name == "zerockpt-progress"]


class _FunctionLog(TorchFunctionMode):
    """Records the torch functions that reach it (only those called on its thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.functions: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.functions.append(getattr(func, "__qualname__", str(func)))
        return func(*args, **(kwargs or {}))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8).half())


def _fresh_with_hook(seen: list[tuple[bool, int]]) -> nn.Module:
    """A float32 model whose modules' pre-hooks record the grad mode and thread they run with."""
    fresh = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))

    def hook(*args: Any) -> None:
        seen.append((torch.is_grad_enabled(), threading.get_ident()))

    for module in fresh.modules():
        module.register_load_state_dict_pre_hook(hook)
    return fresh


_OPERATIONS: dict[str, Callable[[Path, bool], Any]] = {
    "save": lambda d, p: zerockpt.save(_model(), d / f"s{p}", progress=p),
    "sharded save": lambda d, p: zerockpt.save(
        _model(), d / f"sh{p}", max_shard_size="10KB", progress=p
    ),
    "load": lambda d, p: zerockpt.load(d / "m.safetensors", mmap=False, progress=p),
    "verify": lambda d, p: zerockpt.verify(d / "m.safetensors", progress=p).ok,
    # Under a mode, load_state_dict runs torch's own code, so the mode sees torch's ops.
    "load_state_dict": lambda d, p: zerockpt.load_state_dict(
        nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)), d / "m.safetensors", progress=p
    ),
}


@pytest.mark.parametrize("operation", list(_OPERATIONS))
def test_a_bar_changes_nothing_under_dispatch_and_function_modes(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], operation: str
) -> None:
    """Under no_grad and dispatch and function modes, progress=True runs the same ops on the
    caller's thread (where the modes see them) as progress=False."""
    zerockpt.save(_model(), tmp_path / "m.safetensors")
    observed = []
    for progress in (False, True):
        with torch.no_grad(), DispatchLog() as dispatch, _FunctionLog() as functions:
            result = _OPERATIONS[operation](tmp_path, progress)
        observed.append((dispatch.ops, functions.functions, result))
    (ops, functions, result), (bar_ops, bar_functions, bar_result) = observed
    assert bar_ops == ops
    assert bar_functions == functions
    if operation.startswith("load"):
        assert "aten.copy_.default" in ops or "aten.empty.memory_format" in ops
    if operation == "load":
        assert list(bar_result) == list(result)
        for name in result:
            assert_bitwise_equal(bar_result[name], result[name])
    else:
        assert bar_result == result
    capfd.readouterr()


@pytest.mark.parametrize("source", ["file", "dict"])
def test_a_bar_keeps_no_grad_for_load_state_dict_hooks(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], source: str
) -> None:
    """zerockpt's own walk runs the modules' hooks on the caller's thread, under its grad mode."""
    zerockpt.save(_model(), tmp_path / "m.safetensors")
    loaded = []
    for progress in (False, True):
        seen: list[tuple[bool, int]] = []
        fresh = _fresh_with_hook(seen)
        with torch.no_grad():
            result = zerockpt.load_state_dict(
                fresh,
                tmp_path / "m.safetensors" if source == "file" else _model().state_dict(),
                progress=progress,
            )
        assert result.missing_keys == [] and result.unexpected_keys == []
        assert seen == [(False, threading.get_ident())] * 3  # the root and both children
        loaded.append(fresh.state_dict())
    for name, t in _model().state_dict().items():
        assert_bitwise_equal(loaded[0][name], t.float())
        assert_bitwise_equal(loaded[1][name], t.float())
    assert "Loading" in capfd.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_bar_keeps_the_current_cuda_stream(tmp_path: Path) -> None:
    zerockpt.save(_model(), tmp_path / "m.safetensors")
    stream = torch.cuda.Stream()
    for progress in (False, True):
        target = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)).cuda()
        streams: list[torch.cuda.Stream] = []
        target.register_load_state_dict_pre_hook(
            lambda *args, streams=streams: streams.append(torch.cuda.current_stream())
        )
        with torch.cuda.stream(stream):
            zerockpt.load_state_dict(target, tmp_path / "m.safetensors", progress=progress)
            loaded = zerockpt.load(tmp_path / "m.safetensors", device="cuda", progress=progress)
        stream.synchronize()
        assert streams and all(s == stream for s in streams)
        for name, t in _model().state_dict().items():
            assert torch.equal(target.state_dict()[name], t.float().cuda())
            assert torch.equal(loaded[name], t.cuda())


def test_run_returns_the_work_result_and_reraises_its_error() -> None:
    # A counter either way: it also cancels calls on other threads (_parallel.run_parallel).
    assert _progress.run(False, "x", lambda counter: isinstance(counter, _C.Progress)) is True
    assert _progress.run(True, "x", lambda counter: isinstance(counter, _C.Progress)) is True

    def fail(counter: _C.Progress | None) -> None:
        raise OSError(5, "boom", "/some/file")

    with pytest.raises(OSError, match="boom") as info:
        _progress.run(True, "x", fail)
    assert info.value.filename == "/some/file"
