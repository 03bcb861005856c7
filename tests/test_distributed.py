"""Training where it happens: FSDP2 through zerockpt.dcp, and DistributedCheckpointer.

Multi-process on CPU with gloo (ranks fork from a forkserver that has imported torch):

- FSDP2 (``fully_shard``) on 2 ranks trains a small MLP with AdamW; ``get_state_dict`` plus
  ``dcp.save`` through ``zerockpt.dcp.Writer`` checkpoint it after k steps. Fresh processes
  load it (``dcp.load`` through ``Reader``, ``set_state_dict``) on 1 rank (an unsharded model),
  2 ranks (resuming: N - k more steps end bitwise equal, parameters and optimizer state, to N
  uninterrupted steps) and 3 ranks (uneven shards, one empty).
- DistributedCheckpointer on 2 ranks: sync and async saves (the snapshot taken when save
  returns), ``latest`` and retention; fresh processes resume from it, agreeing across ranks
  when the newest step is incomplete, corrupt, or refused by one rank only; a full disk on one
  rank fails the save on every rank; SIGKILL of a rank in the middle of writing its file (sync
  and async) leaves the previous step loadable on every rank, and the next save cleans up
  after the killed one.

Single process (no process group): the checkpointer's layout, pointer, retention, skipping and
errors.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import zerockpt
import zerockpt.dcp
from conftest import assert_bitwise_equal, forkserver_context, read_header, temp_leftovers
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

N_STEPS = 5  # the uninterrupted run
K_STEPS = 2  # the checkpointed run stops here; the resumed one trains N - K more
DIM = (8, 16, 4)  # 16 rows over 3 ranks: 6, 6, 4; 4 rows: 2, 2, 0


# --- the training job: a small MLP, AdamW, fixed per-rank batches ---------------------------


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM[0], DIM[1]), nn.Tanh(), nn.Linear(DIM[1], DIM[2]))


def _shard(model: nn.Module, world_size: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _job(world_size: int, seed: int, *, sharded: bool = True) -> tuple[nn.Module, Any]:
    model = _model(seed)
    if sharded:
        _shard(model, world_size)
    return model, torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)


def _train(model: nn.Module, optim: Any, steps: range, rank: int) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(1000 * step + rank)
        x, y = torch.randn(4, DIM[0], generator=g), torch.randn(4, DIM[2], generator=g)
        optim.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optim.step()


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, list):
        return _flat(dict(enumerate(tree)), prefix)
    return {prefix[:-1]: tree}


def _full(model: nn.Module, optim: Any) -> dict[str, Any]:
    """Parameters and optimizer state as full tensors (gathered from the shards), by FQN."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.tensor import DTensor

    msd, osd = get_state_dict(model, optim)
    out = {}
    for k, v in _flat({"model": msd, "optim": osd}).items():
        if isinstance(v, DTensor):
            v = v.full_tensor()
        out[k] = v.detach().clone() if isinstance(v, torch.Tensor) else v
    return out


def _app_state(model: nn.Module, optim: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optim)
    return {"model": msd, "optim": osd}


def _set_app_state(model: nn.Module, optim: Any, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])


# --- phases: what each rank runs --------------------------------------------------------------


def _phase_fsdp_train(rank: int, world_size: int, root: Path) -> dict[str, Any]:
    """N uninterrupted steps; separately, K steps and a DCP checkpoint through the Writer."""
    model, optim = _job(world_size, seed=0)
    _train(model, optim, range(N_STEPS), rank)
    uninterrupted = _full(model, optim)
    model, optim = _job(world_size, seed=0)
    _train(model, optim, range(K_STEPS), rank)
    dcp.save(_app_state(model, optim), storage_writer=zerockpt.dcp.Writer(root / "fsdp"))
    return {"uninterrupted": uninterrupted, "saved": _full(model, optim)}


def _load_fsdp(world_size: int, root: Path, *, sharded: bool) -> tuple[nn.Module, Any]:
    model, optim = _job(world_size, seed=123, sharded=sharded)  # other values than saved
    state = _app_state(model, optim)
    dcp.load(state, storage_reader=zerockpt.dcp.Reader(root / "fsdp", verify=True))
    _set_app_state(model, optim, state)
    return model, optim


def _phase_fsdp_resume(rank: int, world_size: int, root: Path) -> dict[str, Any]:
    model, optim = _load_fsdp(world_size, root, sharded=True)
    loaded = _full(model, optim)
    _train(model, optim, range(K_STEPS, N_STEPS), rank)
    return {"loaded": loaded, "resumed": _full(model, optim)}


def _phase_fsdp_load(rank: int, world_size: int, root: Path) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    model, optim = _load_fsdp(world_size, root, sharded=world_size > 1)
    local = {
        n: p.to_local().shape if isinstance(p, DTensor) else p.shape
        for n, p in model.named_parameters()
    }
    return {"loaded": _full(model, optim), "local_shapes": local}


class _AppState:
    """A DCP Stateful: model and optimizer through get_state_dict / set_state_dict."""

    def __init__(self, model: nn.Module, optim: Any) -> None:
        self.model, self.optim = model, optim

    def state_dict(self) -> dict[str, Any]:
        return _app_state(self.model, self.optim)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _set_app_state(self.model, self.optim, state)


def _phase_ckpt_train(rank: int, world_size: int, root: Path) -> dict[str, Any]:
    """Steps 1-4 saved (1, 2 sync; 3, 4 async, training on while they write), keep_last=2."""
    model, optim = _job(world_size, seed=0)
    seen: dict[int, Any] = {}
    full: dict[int, Any] = {}
    with zerockpt.DistributedCheckpointer(root / "ckpts", keep_last=2) as ckpt:
        assert ckpt.load_latest({"app": _AppState(model, optim)}) is None
        for step in range(1, 5):
            _train(model, optim, range(step - 1, step), rank)
            full[step] = _full(model, optim)
            state = {"app": _AppState(model, optim), "meta": {"step": torch.tensor(step)}}
            ckpt.save(step, state, async_save=step > 2)
            if step > 2:
                # The snapshot is taken: changing the parameters now does not reach the files.
                with torch.no_grad():
                    kept = [p.detach().clone() for p in model.parameters()]
                    for p in model.parameters():
                        p.add_(1.0)
                    ckpt.wait()
                    for p, k in zip(model.parameters(), kept, strict=True):
                        p.copy_(k)
            seen[step] = (ckpt.steps(), ckpt.latest_step())
    return {"full": full, "seen": seen}


class _Guard:
    """A DCP Stateful holding the saved step; on one rank, it refuses to load one step (as an
    application's own check might): DCP does not see that failure, which is this rank's only."""

    def __init__(self, refuse: int | None) -> None:
        self.step = torch.tensor(-1)
        self.refuse = refuse

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["step"]) == self.refuse:
            raise ValueError(f"this rank refuses step {self.refuse}")
        self.step = state["step"]


def _phase_ckpt_resume(rank: int, world_size: int, root: Path) -> dict[str, Any]:
    """load_latest from each prepared copy of the checkpoints; what each rank got."""
    out = {}
    for variant in sorted(os.listdir(root / "variants")):
        model, optim = _job(world_size, seed=123)
        guard = _Guard(4 if variant == "refused" and rank == 1 else None)
        ckpt = zerockpt.DistributedCheckpointer(root / "variants" / variant)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step = ckpt.load_latest({"app": _AppState(model, optim), "meta": guard})
        out[variant] = {
            "step": step,
            "meta": int(guard.step),
            "full": _full(model, optim),
            "warnings": [str(w.message) for w in caught if "zerockpt" in str(w.message)],
        }
    return out


_BALLAST = 1 << 22  # float32 elements per rank: 16 MiB, written in more than one system call


def _kill_during_write(directory: Path) -> None:
    """Arms this process to SIGKILL itself in the middle of writing its next rank file.

    Every write system call after the first one fails with EINTR, which the writer retries:
    the write stalls, its temporary file partly written (and locked), until a watcher sees that
    file, and rank 0's new file committed (so that rank 0's save has not already removed the
    temporary file as a dead writer's), and kills the process."""
    rank0 = directory / "__0_0.safetensors"

    def inode() -> int | None:
        try:
            return rank0.stat().st_ino
        except FileNotFoundError:
            return None

    old = inode()

    def watch() -> None:
        while not (directory.is_dir() and temp_leftovers(directory) and inode() not in (None, old)):
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()
    zerockpt._C._inject_fault("write", errno.EINTR, 1)


def _ballast(world_size: int, fill: float) -> Any:
    """A DTensor of which each rank holds (and writes) _BALLAST elements."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world_size,))
    return DTensor.from_local(torch.full((_BALLAST,), fill), mesh, [Shard(0)])


def _phase_ckpt_kill(rank: int, world_size: int, root: Path, *, async_save: bool) -> dict[str, Any]:
    """Step 1 saved; rank 1 is SIGKILLed in the middle of step 2's save; rank 0 reports."""
    model, optim = _job(world_size, seed=0)
    ckpt = zerockpt.DistributedCheckpointer(root / "kill", keep_last=1)
    _train(model, optim, range(1), rank)
    ckpt.save(1, {"app": _AppState(model, optim), "ballast": _ballast(world_size, 1.0)})
    saved = _full(model, optim)
    _train(model, optim, range(1, 2), rank)
    # First, rank 1's disk is full: every rank raises, and latest stays.
    if rank == 1:
        zerockpt._C._inject_fault("write", errno.ENOSPC, 0)
    try:
        ckpt.save(2, {"app": _AppState(model, optim)}, async_save=async_save)
        ckpt.wait()
        full_disk = None
    except BaseException as e:  # CheckpointException
        full_disk = f"{type(e).__name__}: {e}"
    zerockpt._C._clear_faults()
    full_disk_after = (ckpt.steps(), ckpt.latest_step())
    # Then rank 1 is killed in the middle of writing its file.
    if rank == 1:
        _kill_during_write(ckpt.path(2))
    state = {"app": _AppState(model, optim), "ballast": _ballast(world_size, 2.0)}
    try:
        ckpt.save(2, state, async_save=async_save)
        ckpt.wait()  # an async save's error: the background save's on every rank still alive
        error = None
    except BaseException as e:  # CheckpointException or gloo's error: a peer is gone
        error = f"{type(e).__name__}: {e}"
    return {"saved": saved, "error": error, "full_disk": full_disk, "after": full_disk_after}


def _phase_ckpt_after_kill(rank: int, world_size: int, root: Path) -> dict[str, Any]:
    """Fresh ranks resume from the killed job's checkpoints, then save step 2 again."""
    model, optim = _job(world_size, seed=123)
    ckpt = zerockpt.DistributedCheckpointer(root / "kill", keep_last=1)
    ballast = _ballast(world_size, 0.0)
    state = {"app": _AppState(model, optim), "ballast": ballast}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = ckpt.load_latest(state)
    report = {
        "step": step,
        "full": _full(model, optim),
        "ballast": bool(torch.all(ballast.to_local() == 1.0)),
        "warnings": [str(w.message) for w in caught if "zerockpt" in str(w.message)],
    }
    ckpt.save(2, state)
    report["after"] = (ckpt.steps(), ckpt.latest_step())
    return report


PHASES: dict[str, Callable[[int, int, Path], dict[str, Any]]] = {
    "fsdp_train": _phase_fsdp_train,
    "fsdp_resume": _phase_fsdp_resume,
    "fsdp_load": _phase_fsdp_load,
    "ckpt_train": _phase_ckpt_train,
    "ckpt_resume": _phase_ckpt_resume,
    "ckpt_kill_sync": functools.partial(_phase_ckpt_kill, async_save=False),
    "ckpt_kill_async": functools.partial(_phase_ckpt_kill, async_save=True),
    "ckpt_after_kill": _phase_ckpt_after_kill,
}


# --- running ranks -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, phase: str, root: str, out: str) -> None:
    import logging

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        report = PHASES[phase](rank, world_size, Path(root))
    except BaseException as e:
        report = {"failed": f"{type(e).__name__}: {e}"}
    torch.save(report, Path(out) / f"{phase}-{rank}.pt")
    # Not destroy_process_group: after a peer was killed it may wait for it. The report is out.
    os._exit(0)


def run_ranks(
    phase: str, world_size: int, root: Path, timeout: float = 240
) -> tuple[list[int | None], list[dict[str, Any] | None]]:
    """Runs ``phase`` on ``world_size`` ranks (gloo on 127.0.0.1); their exit codes and reports
    (None for a rank that wrote none)."""
    ctx = forkserver_context("test_distributed")
    out = root / f"reports-{phase}"
    out.mkdir(exist_ok=True)
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, phase, str(root), str(out)))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    if any(p.is_alive() for p in procs):
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        pytest.fail(f"{phase} (world size {world_size}) ran past {timeout} s")
    reports = []
    for r in range(world_size):
        f = out / f"{phase}-{r}.pt"
        reports.append(torch.load(f, weights_only=False) if f.exists() else None)
    return [p.exitcode for p in procs], reports


def run_ok(phase: str, world_size: int, root: Path) -> list[dict[str, Any]]:
    codes, reports = run_ranks(phase, world_size, root)
    for r, report in enumerate(reports):
        assert report is not None, f"{phase}: rank {r} exited with {codes[r]} and no report"
        assert "failed" not in report, f"{phase}: rank {r}: {report['failed']}"
    return reports  # type: ignore[return-value]


def assert_same_full(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert_bitwise_equal(a[k], b[k])
        else:
            assert a[k] == b[k], k


# --- point 3: FSDP2 through zerockpt.dcp -------------------------------------------------------


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fsdp")
    return {"root": root, "train": run_ok("fsdp_train", 2, root)}


def test_fsdp2_checkpoint_is_one_file_per_rank(fsdp: dict[str, Any]) -> None:
    names = sorted(os.listdir(fsdp["root"] / "fsdp"))
    assert names == [".metadata.json", "__0_0.safetensors", "__1_0.safetensors"]
    saved = fsdp["train"][0]["saved"]
    assert any(k.startswith("optim.state.") and k.endswith("exp_avg_sq") for k in saved)
    for report in fsdp["train"][1:]:  # every rank gathered the same full state
        assert_same_full(report["saved"], saved)


def test_fsdp2_resume_on_2_ranks_is_bitwise_uninterrupted(fsdp: dict[str, Any]) -> None:
    resumed = run_ok("fsdp_resume", 2, fsdp["root"])
    for rank in range(2):
        assert_same_full(resumed[rank]["loaded"], fsdp["train"][rank]["saved"])
        assert_same_full(resumed[rank]["resumed"], fsdp["train"][rank]["uninterrupted"])
    # Not vacuous: the resumed steps changed what was loaded.
    w = "model.0.weight"
    assert not torch.equal(resumed[0]["resumed"][w], resumed[0]["loaded"][w])


@pytest.mark.parametrize("world_size", [1, 3])
def test_fsdp2_checkpoint_loads_on_other_rank_counts(fsdp: dict[str, Any], world_size: int) -> None:
    reports = run_ok("fsdp_load", world_size, fsdp["root"])
    for report in reports:
        assert_same_full(report["loaded"], fsdp["train"][0]["saved"])
    if world_size == 3:  # uneven shards: 16 rows as 6, 6, 4; 4 rows as 2, 2, 0
        assert [r["local_shapes"]["0.weight"][0] for r in reports] == [6, 6, 4]
        assert [r["local_shapes"]["2.weight"][0] for r in reports] == [2, 2, 0]
    else:
        assert reports[0]["local_shapes"]["0.weight"] == (DIM[1], DIM[0])


# --- point 4: DistributedCheckpointer on 2 ranks -------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ckpt")
    return {"root": root, "reports": run_ok("ckpt_train", 2, root)}


def test_saves_point_latest_and_keep_the_last_two(trained: dict[str, Any]) -> None:
    for report in trained["reports"]:
        assert report["seen"] == {1: ([1], 1), 2: ([1, 2], 2), 3: ([2, 3], 3), 4: ([3, 4], 4)}
    directory = trained["root"] / "ckpts"
    assert sorted(os.listdir(directory)) == ["latest", "step_00000003", "step_00000004"]
    assert (directory / "latest").read_text() == "step_00000004\n"
    for step in (3, 4):
        names = sorted(os.listdir(directory / f"step_{step:08d}"))
        assert names == [".metadata.json", "__0_0.safetensors", "__1_0.safetensors"]


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_resume_agrees_across_ranks(trained: dict[str, Any], tmp_path: Path) -> None:
    """Fresh ranks: the newest step; past an incomplete one (latest naming it); past a corrupt
    one; past one that only rank 1 fails to load (both ranks skip it); nothing in an empty
    directory."""
    src = trained["root"] / "ckpts"
    variants = tmp_path / "variants"
    _copy(src, variants / "intact")
    incomplete = _copy(src, variants / "incomplete")
    (incomplete / "step_00000004" / ".metadata.json").unlink()
    corrupt = _copy(src, variants / "corrupt")
    # A data byte of rank 1's shard of a weight (only a verified read notices). Every rank
    # that reads from the file fails: rank 1, and rank 0 for items DCP deduplicated into it.
    rank1 = corrupt / "step_00000004" / "__1_0.safetensors"
    n, header, _ = read_header(rank1)
    name = f"app.model.0.weight@{DIM[1] // 2},0"
    raw = bytearray(rank1.read_bytes())
    raw[8 + n + header[name]["data_offsets"][0]] ^= 0x01
    rank1.write_bytes(bytes(raw))
    _copy(src, variants / "refused")
    (variants / "empty").mkdir()
    reports = run_ok("ckpt_resume", 2, tmp_path)
    full = trained["reports"][0]["full"]
    for report in reports:
        assert report["intact"]["step"] == 4 and not report["intact"]["warnings"]
        assert_same_full(report["intact"]["full"], full[4])
        assert report["incomplete"]["step"] == 3
        assert_same_full(report["incomplete"]["full"], full[3])
        assert any("not complete" in w for w in report["incomplete"]["warnings"])
        assert report["corrupt"]["step"] == 3
        assert_same_full(report["corrupt"]["full"], full[3])
        [skipped] = report["corrupt"]["warnings"]
        assert "step_00000004" in skipped and "rank 1: ChecksumError" in skipped
        assert report["refused"]["step"] == 3 and report["refused"]["meta"] == 3
        assert_same_full(report["refused"]["full"], full[3])
        [skipped] = report["refused"]["warnings"]
        assert "step_00000004: rank 1: ValueError: this rank refuses step 4" in skipped
        assert "rank 0" not in skipped
        assert report["empty"]["step"] is None
        assert report["intact"]["meta"] == 4


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_of_a_rank_mid_save_keeps_the_previous_step(tmp_path: Path, mode: str) -> None:
    codes, reports = run_ranks(f"ckpt_kill_{mode}", 2, tmp_path)
    assert codes[1] == -signal.SIGKILL and reports[1] is None
    assert reports[0] is not None and "failed" not in reports[0]
    assert reports[0]["error"] is not None, "rank 0's save survived the loss of rank 1"
    # Before, rank 1's full disk failed step 2 on both ranks (rank 1 died later: its report is
    # gone, but rank 0 raised rank 1's error).
    assert reports[0]["full_disk"].startswith("CheckpointException")
    assert "No space left on device" in reports[0]["full_disk"]
    assert reports[0]["after"] == ([1], 1)
    directory = tmp_path / "kill"
    assert (directory / "latest").read_text() == "step_00000001\n"
    assert (directory / "step_00000001" / ".metadata.json").is_file()
    step2 = directory / "step_00000002"
    assert not (step2 / ".metadata.json").exists()
    # Rank 1 died writing its file: its temporary file is left, and no metadata.
    assert not (step2 / "__1_0.safetensors").exists()
    assert any(n.startswith(".__1_0.safetensors.") for n in temp_leftovers(step2))

    after = run_ok("ckpt_after_kill", 2, tmp_path)
    for report in after:
        assert report["step"] == 1
        assert_same_full(report["full"], reports[0]["saved"])
        assert report["ballast"]
        [note] = report["warnings"]  # no checkpoint failed to load; the killed one is noted
        assert "step_00000002: incomplete" in note
        assert report["after"] == ([2], 2)
    assert sorted(os.listdir(directory)) == ["latest", "step_00000002"]
    assert temp_leftovers(step2) == []
    assert sorted(os.listdir(step2)) == [".metadata.json", "__0_0.safetensors", "__1_0.safetensors"]


# --- single process: layout, pointer, retention, errors -----------------------------------------


def _tensors(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3, 2), value), "b": torch.arange(4) + int(value)}


def test_single_process_save_load_and_retention(tmp_path: Path) -> None:
    ckpt = zerockpt.DistributedCheckpointer(tmp_path / "c", keep_last=2)
    assert ckpt.steps() == [] and ckpt.latest_step() is None
    for step in (5, 6, 7):
        ckpt.save(step, _tensors(step), async_save=step == 7)
    ckpt.wait()
    assert ckpt.steps() == [6, 7] and ckpt.latest_step() == 7
    assert ckpt.path(7) == tmp_path / "c" / "step_00000007"
    target = _tensors(0)
    assert ckpt.load_latest(target) == 7
    for k, v in _tensors(7).items():
        assert_bitwise_equal(target[k], v)
    ckpt.load(6, target)
    assert_bitwise_equal(target["w"], _tensors(6)["w"])
    ckpt.close()


def test_single_process_skips_incomplete_and_cleans_it_up(tmp_path: Path) -> None:
    ckpt = zerockpt.DistributedCheckpointer(tmp_path, keep_last=3)
    ckpt.save(1, _tensors(1))
    ckpt.save(2, _tensors(2))
    (ckpt.path(2) / zerockpt.dcp.METADATA_FILE).unlink()  # as a save killed before its commit
    ckpt.path(3).mkdir()  # a save killed before any file
    assert ckpt.steps() == [1] and ckpt.latest_step() is None
    target = _tensors(0)
    with pytest.warns(UserWarning) as caught:
        assert ckpt.load_latest(target) == 1
    text = " ".join(str(w.message) for w in caught)
    assert "step_00000002" in text and "step_00000003" in text
    assert_bitwise_equal(target["w"], _tensors(1)["w"])
    ckpt.save(4, _tensors(4))  # removes the incomplete steps below it, keeps complete ones
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000001", "step_00000004"]


def test_single_process_load_of_missing_step_raises(tmp_path: Path) -> None:
    ckpt = zerockpt.DistributedCheckpointer(tmp_path)
    with pytest.raises(CheckpointException, match="metadata"):
        ckpt.load(3, _tensors(0))
    with pytest.raises(ValueError, match="step"):
        ckpt.path(-1)
    with pytest.raises(ValueError, match="keep_last"):
        zerockpt.DistributedCheckpointer(tmp_path, keep_last=0)


def test_single_process_failed_async_save_raises_on_next_save(tmp_path: Path) -> None:
    ckpt = zerockpt.DistributedCheckpointer(tmp_path)
    ckpt.save(1, _tensors(1))
    ckpt.path(2).write_text("not a directory")  # the step's directory cannot be made
    ckpt.save(2, _tensors(2), async_save=True)
    with pytest.raises(CheckpointException):
        ckpt.save(3, _tensors(3))
    assert ckpt.latest_step() == 1
    ckpt.path(2).unlink()
    ckpt.save(3, _tensors(3))
    assert ckpt.latest_step() == 3 and ckpt.steps() == [1, 3]


def test_pointer_to_a_step_that_is_not_a_directory_is_ignored(tmp_path: Path) -> None:
    ckpt = zerockpt.DistributedCheckpointer(tmp_path)
    ckpt.save(1, _tensors(1))
    (tmp_path / "latest").write_text("step_00000001.safetensors\n")  # a Checkpointer's name
    assert ckpt.latest_step() is None
    target = _tensors(0)
    assert ckpt.load_latest(target) == 1
