"""zerockpt.accelerate: Accelerator.save_state / load_state's state, in zerockpt files.

Oracles: the state at the save (parameters, optimizer, scheduler, registered objects, the
generators' next draws), and an uninterrupted training run against one resumed from the folder.
"""

from __future__ import annotations

import copy
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zerockpt
from torch import nn

accelerate = pytest.importorskip("accelerate")
import zerockpt.accelerate as za  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"


pytestmark = pytest.mark.usefixtures("hide_the_test_accelerator")


class Counter:
    """An object registered for checkpointing: nested state with tensors and Python values."""

    def __init__(self) -> None:
        self.seen = 0
        self.history = torch.zeros(3)
        self.tags = {"name": "run", "ratio": 0.5, "dims": (1, 2)}

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "history": self.history.clone(), "tags": dict(self.tags)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = state["seen"]
        self.history = state["history"].clone()
        self.tags = dict(state["tags"])


def build(seed: int = 0, seedable: bool = False) -> tuple[Any, nn.Module, Any, Any, Any, Counter]:
    torch.manual_seed(seed)
    config = accelerate.DataLoaderConfiguration(use_seedable_sampler=seedable)
    accelerator = accelerate.Accelerator(cpu=True, dataloader_config=config)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    g = torch.Generator().manual_seed(7)
    data = torch.utils.data.TensorDataset(
        torch.randn(24, 4, generator=g), torch.randn(24, 1, generator=g)
    )
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    model, optimizer, scheduler, loader = accelerator.prepare(model, optimizer, scheduler, loader)
    counter = Counter()
    accelerator.register_for_checkpointing(counter)
    return accelerator, model, optimizer, scheduler, loader, counter


def train_epoch(
    accelerator: Any,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    loader: Any,
    counter: Counter,
) -> None:
    model.train()
    for x, y in loader:
        loss = nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        counter.seen += 1
        counter.history += loss.detach()
        accelerator.step += 1


def snapshot(model: nn.Module, optimizer: Any, scheduler: Any, counter: Counter) -> dict[str, Any]:
    # Copies: a state dict's tensors are the live ones, which training changes in place.
    return copy.deepcopy(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "counter": counter.state_dict(),
        }
    )


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Equal structure and values; tensors bitwise (dtype, shape and bytes)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert type(a) is type(b) and a == b, where


def draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(5)


def no_torch_load(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("torch.load was called")


def test_save_mutate_load_restores_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    accelerator, model, optimizer, scheduler, loader, counter = build()
    train_epoch(accelerator, model, optimizer, scheduler, loader, counter)
    za.save_state(accelerator, tmp_path / "ckpt")
    saved = snapshot(model, optimizer, scheduler, counter)
    saved_step = accelerator.step
    expected_draws = draws()

    train_epoch(accelerator, model, optimizer, scheduler, loader, counter)  # mutate all of it
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    assert saved_step != accelerator.step

    monkeypatch.setattr(torch, "load", no_torch_load)
    za.load_state(accelerator, tmp_path / "ckpt")
    assert_same(saved, snapshot(model, optimizer, scheduler, counter))
    assert accelerator.step == saved_step
    got = draws()
    assert got[:2] == expected_draws[:2] and torch.equal(got[2], expected_draws[2])


def test_files_are_zerockpt(tmp_path: Path) -> None:
    accelerator, model, optimizer, scheduler, loader, counter = build()
    train_epoch(accelerator, model, optimizer, scheduler, loader, counter)
    assert za.save_state(accelerator, tmp_path) == str(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [
        "custom_checkpoint_0.safetensors",
        "dataloader.safetensors",
        "model.safetensors",
        "optimizer.safetensors",
        "random_states_0.safetensors",
        "scheduler.safetensors",
    ]
    for name in os.listdir(tmp_path):
        assert zerockpt.verify(tmp_path / name).ok
    # The model file is plain safetensors, as accelerate's: its own loader reads it.
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "model.safetensors")
    for name, value in model.state_dict().items():
        assert torch.equal(weights[name], value)


@pytest.mark.parametrize("seedable", [False, True], ids=["random-sampler", "seedable-sampler"])
def test_resume_training_is_bitwise(tmp_path: Path, seedable: bool) -> None:
    """3 epochs straight vs. 1 epoch, save, fresh objects, load, 2 epochs (dropout, shuffling).

    A seedable sampler shuffles by its seed and the data loader's epoch count, which the
    folder keeps (accelerate's own save_state keeps neither).
    """
    full = build(seedable=seedable)
    train_epoch(*full)
    za.save_state(full[0], tmp_path / "ckpt")
    position = zerockpt.load(tmp_path / "ckpt" / "dataloader.safetensors")
    assert position == (
        {"iteration": 1, "epoch": 1, "initial_seed": 0} if seedable else {"iteration": 1}
    )
    train_epoch(*full)
    train_epoch(*full)

    # Other initial weights and seed: everything must come from the folder.
    resumed = build(seed=1, seedable=seedable)
    if seedable:
        resumed[4].get_sampler().initial_seed = 99
    za.load_state(resumed[0], tmp_path / "ckpt")
    train_epoch(*resumed)
    train_epoch(*resumed)
    _, model, optimizer, scheduler, _, counter = full
    _, model2, optimizer2, scheduler2, _, counter2 = resumed
    assert_same(
        snapshot(model, optimizer, scheduler, counter),
        snapshot(model2, optimizer2, scheduler2, counter2),
    )
    assert full[0].step == resumed[0].step

    # Control: the generators matter (dropout masks, shuffling); without them, another run.
    os.remove(tmp_path / "ckpt" / "random_states_0.safetensors")
    other = build(seedable=seedable)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        za.load_state(other[0], tmp_path / "ckpt")
    train_epoch(*other)
    train_epoch(*other)
    assert not torch.equal(other[1].state_dict()["3.weight"], model.state_dict()["3.weight"])


def test_hooks_run_as_in_accelerate(tmp_path: Path) -> None:
    accelerator, model, *_ = build()
    calls: list[tuple[str, Any]] = []

    def save_hook(
        models: list[nn.Module], weights: list[dict[str, torch.Tensor]], folder: str
    ) -> None:
        calls.append(("save", (models[0] is model, sorted(weights[0]), folder)))

    def load_hook(models: list[nn.Module], folder: str) -> None:
        calls.append(("load", (models[0] is model, folder)))
        models.clear()  # the hook loads the model itself: zerockpt must then skip it

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    za.save_state(accelerator, tmp_path)
    os.remove(tmp_path / "model.safetensors")
    za.load_state(accelerator, tmp_path)
    assert calls == [
        ("save", (True, sorted(model.state_dict()), str(tmp_path))),
        ("load", (True, str(tmp_path))),
    ]


def test_scaler_round_trip(tmp_path: Path) -> None:
    accelerator, *_ = build()
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0, growth_interval=5)
    scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    accelerator.scaler = scaler
    za.save_state(accelerator, tmp_path)
    expected = scaler.state_dict()
    scaler.update(new_scale=2.0)
    za.load_state(accelerator, tmp_path)
    assert accelerator.scaler.state_dict() == expected


def test_mismatches_are_clear_errors(tmp_path: Path) -> None:
    accelerator, *_ = build()
    za.save_state(accelerator, tmp_path)
    accelerator.register_for_checkpointing(Counter())
    with pytest.raises(ValueError, match=r"1 custom checkpoints .* 2 objects are registered"):
        za.load_state(accelerator, tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        za.load_state(accelerator, tmp_path / "absent")
    accelerator._custom_objects.pop()
    os.remove(tmp_path / "optimizer.safetensors")
    with pytest.raises(FileNotFoundError, match=r"optimizer\.safetensors is missing"):
        za.load_state(accelerator, tmp_path)


def test_unstorable_custom_state_names_it(tmp_path: Path) -> None:
    accelerator, *_ = build()

    class Odd:
        def state_dict(self) -> dict[str, Any]:
            return {"fn": print}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            pass

    accelerator.register_for_checkpointing(Odd())
    with pytest.raises(TypeError, match="fn"):
        za.save_state(accelerator, tmp_path)
    assert not (tmp_path / "custom_checkpoint_1.safetensors").exists()


def test_not_an_accelerator(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"needs an accelerate\.Accelerator"):
        za.save_state(object(), tmp_path)


def test_accelerator_attributes_still_exist() -> None:
    accelerator = accelerate.Accelerator(cpu=True)
    for name in za.ACCELERATOR_ATTRIBUTES:
        assert hasattr(accelerator, name), name


def test_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    section = re.search(
        r"## Hugging Face Trainer and Accelerate\n(.*?)\n## ", README.read_text(), re.S
    )
    assert section, "README has no Hugging Face section"
    block = next(
        b for b in re.findall(r"```python\n(.*?)```", section.group(1), re.S) if "Accelerator" in b
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch, "load", no_torch_load)
    exec(compile(block, str(README), "exec"), {})
    assert (tmp_path / "ckpt" / "optimizer.safetensors").is_file()
