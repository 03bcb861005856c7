"""zerockpt.transformers: a Trainer whose whole checkpoint zerockpt writes, resumed bitwise.

The oracle is the Trainer itself: an uninterrupted run of N steps against a fresh Trainer that
resumes from a zerockpt checkpoint folder and trains to N (tiny GPT-2 built from a config,
dropout on, shuffled data, CPU, nothing downloaded).
"""

from __future__ import annotations

import json
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

transformers = pytest.importorskip("transformers")
import zerockpt.transformers as zt  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"
STOCK_PICKLES = {"optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth", "training_args.bin"}


pytestmark = pytest.mark.usefixtures("hide_the_test_accelerator")


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int = 8, length: int = 8) -> None:
        self.data = torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i], "labels": self.data[i]}


def tiny_gpt2() -> Any:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64,
        n_positions=8,
        n_embd=16,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def arguments(out: Path, **overrides: Any) -> Any:
    # 8 samples in batches of 2: 4 steps an epoch; checkpoints at 2 (mid-epoch) and 4 (its end).
    settings: dict[str, Any] = {
        "max_steps": 6,
        "save_steps": 2,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "seed": 0,
        "use_cpu": True,
        "report_to": [],
        "dataloader_num_workers": 0,
        "logging_strategy": "no",
        "disable_tqdm": True,  # (transformers 5 always saves the model as safetensors)
    }
    settings.update(overrides)
    return transformers.TrainingArguments(str(out), **settings)


def trainer(out: Path, cls: Any = None, **overrides: Any) -> Any:
    cls = zt.ZerockptTrainer if cls is None else cls
    return cls(model=tiny_gpt2(), args=arguments(out, **overrides), train_dataset=Tokens())


def same_state(a: Any, b: Any) -> None:
    """Parameters and optimizer state bitwise equal."""
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for k in oa["state"]:
        for name, value in oa["state"][k].items():
            assert torch.equal(value, ob["state"][k][name]), (k, name)
    assert a.lr_scheduler.state_dict() == b.lr_scheduler.state_dict()


def differs(a: Any, b: Any) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return any(not torch.equal(sa[n], sb[n]) for n in sa)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("uninterrupted")
    t = trainer(out)
    t.train()
    return t, out


def no_torch_load(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("torch.load was called")


@pytest.mark.parametrize("step", [2, 4], ids=["mid-epoch", "epoch-end"])
def test_resume_is_bitwise(
    uninterrupted: Any, tmp_path: Path, step: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    full, out = uninterrupted
    checkpoint = out / f"checkpoint-{step}"
    monkeypatch.setattr(torch, "load", no_torch_load)
    resumed = trainer(tmp_path)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6
    same_state(full, resumed)


def test_checkpoint_files_are_zerockpt_and_json(uninterrupted: Any) -> None:
    _, out = uninterrupted
    for step in (2, 4, 6):
        folder = out / f"checkpoint-{step}"
        names = set(os.listdir(folder))
        assert not names & STOCK_PICKLES, names
        assert {
            "model.safetensors",
            zt.OPTIMIZER_NAME,
            zt.SCHEDULER_NAME,
            zt.RNG_STATE_NAME,
            "trainer_state.json",
            zt.TRAINING_ARGS_NAME,
        } <= names
        for name in names:
            path = folder / name
            if name.endswith(".json"):
                json.loads(path.read_text())
            else:  # a safetensors file: the header parses, every checksum holds
                assert name.endswith(".safetensors"), name
                with zerockpt.open(path) as f:
                    if name != "model.safetensors":
                        assert f.verify().ok
        args = json.loads((folder / zt.TRAINING_ARGS_NAME).read_text())
        assert args["max_steps"] == 6 and args["seed"] == 0


def test_checkpoint_contents_are_the_trainers_state(uninterrupted: Any) -> None:
    """The files hold what the stock Trainer would pickle, each value with its type."""
    full, out = uninterrupted
    folder = out / "checkpoint-6"
    optimizer = zerockpt.load(folder / zt.OPTIMIZER_NAME)
    expected = full.optimizer.state_dict()
    assert optimizer["param_groups"] == expected["param_groups"]
    for k, state in expected["state"].items():
        for name, value in state.items():
            assert torch.equal(optimizer["state"][k][name], value)
    assert zerockpt.load(folder / zt.SCHEDULER_NAME) == full.lr_scheduler.state_dict()
    rng = zerockpt.load(folder / zt.RNG_STATE_NAME)
    assert type(rng["python"]) is tuple and type(rng["python"][1]) is tuple
    assert rng["numpy"][0] == "MT19937" and isinstance(rng["numpy"][1], np.ndarray)
    assert rng["cpu"].dtype == torch.uint8


@pytest.mark.parametrize("missing", [zt.RNG_STATE_NAME, zt.OPTIMIZER_NAME])
def test_each_file_matters(uninterrupted: Any, tmp_path: Path, missing: str) -> None:
    """Control: without the RNG (or optimizer) file, the resumed run is not the same run."""
    full, out = uninterrupted
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    for name in os.listdir(out / "checkpoint-2"):
        if name != missing:
            (checkpoint / name).write_bytes((out / "checkpoint-2" / name).read_bytes())
    resumed = trainer(tmp_path / "out")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert differs(full, resumed)


def test_rng_state_round_trip(tmp_path: Path) -> None:
    t = trainer(tmp_path)
    t._save_rng_state(str(tmp_path / "ckpt"))
    expected = (random.random(), np.random.rand(), torch.rand(4))
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    t._load_rng_state(str(tmp_path / "ckpt"))
    got = (random.random(), np.random.rand(), torch.rand(4))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_scaler_round_trip(tmp_path: Path) -> None:
    t = trainer(tmp_path)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    t.accelerator.scaler = scaler
    t._save_scaler(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / zt.SCALER_NAME).is_file()
    other = trainer(tmp_path)
    other.accelerator.scaler = torch.amp.GradScaler("cpu")
    other._load_scaler(str(tmp_path / "ckpt"))
    assert other.accelerator.scaler.state_dict() == scaler.state_dict()
    other.accelerator.scaler = None
    with pytest.raises(ValueError, match="no scaler"):
        other._load_scaler(str(tmp_path / "ckpt"))


def test_stock_checkpoint_still_resumes(uninterrupted: Any, tmp_path: Path) -> None:
    """A folder the stock Trainer wrote resumes through the stock code, bitwise.

    The stock run itself is the same run as the zerockpt one: only the files differ.
    """
    full, _ = uninterrupted
    stock = trainer(tmp_path / "stock", cls=transformers.Trainer)
    stock.train()
    same_state(full, stock)
    folder = tmp_path / "stock" / "checkpoint-2"
    assert {"optimizer.pt", "rng_state.pth"} <= set(os.listdir(folder))
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(folder))
    same_state(full, resumed)


def test_save_model_writes_json_arguments(tmp_path: Path) -> None:
    t = trainer(tmp_path, max_steps=1, save_strategy="no")
    t.train()
    t.save_model(str(tmp_path / "final"))
    names = set(os.listdir(tmp_path / "final"))
    assert zt.TRAINING_ARGS_NAME in names and "training_args.bin" not in names
    assert not any(n.startswith(".zerockpt-") for n in names)


def test_mixin_on_a_subclass(tmp_path: Path) -> None:
    class Custom(zt.ZerockptTrainerMixin, transformers.Trainer):  # type: ignore[misc]
        pass

    t = trainer(tmp_path, cls=Custom, max_steps=2)
    t.train()
    assert zt.OPTIMIZER_NAME in os.listdir(tmp_path / "checkpoint-2")


def test_hooked_methods_exist_with_their_signatures() -> None:
    zt.check_trainer(transformers.Trainer)
    for name, params in zt.HOOKED_METHODS.items():
        method = getattr(transformers.Trainer, name)
        assert tuple(__import__("inspect").signature(method).parameters) == params, name


def test_check_refuses_a_trainer_without_the_hooks() -> None:
    class Renamed(transformers.Trainer):  # type: ignore[misc]
        _save_rng_state = None  # as if a release had removed it

    with pytest.raises(ImportError, match=r"_save_rng_state.*transformers>=5,<6"):

        class Broken(zt.ZerockptTrainerMixin, Renamed):  # type: ignore[misc]
            pass

    class Changed(transformers.Trainer):  # type: ignore[misc]
        def _load_rng_state(self, checkpoint: Any, strict: bool) -> None:
            pass

    with pytest.raises(ImportError, match=r"_load_rng_state: it takes"):
        zt.check_trainer(Changed)

    with pytest.raises(ImportError, match="has no such method"):

        class Alone(zt.ZerockptTrainerMixin):
            pass


def test_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    section = re.search(
        r"## Hugging Face Trainer and Accelerate\n(.*?)\n## ", README.read_text(), re.S
    )
    assert section, "README has no Hugging Face section"
    block = next(
        b for b in re.findall(r"```python\n(.*?)```", section.group(1), re.S) if "Trainer" in b
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch, "load", no_torch_load)
    namespace: dict[str, object] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(block, str(README), "exec"), namespace)
    names = set(os.listdir(tmp_path / "run" / "checkpoint-2"))
    assert zt.OPTIMIZER_NAME in names and not names & STOCK_PICKLES
    assert namespace["trainer"].state.global_step == 4  # type: ignore[attr-defined]


def test_bad_files_are_clear_errors(tmp_path: Path) -> None:
    t = trainer(tmp_path)
    t.create_optimizer_and_scheduler(num_training_steps=6)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    zerockpt.save({"x": torch.ones(1)}, folder / zt.RNG_STATE_NAME)
    with pytest.raises(ValueError, match=r"rng_state\.safetensors has no 'python'"):
        t._load_rng_state(str(folder))
    t._save_optimizer_and_scheduler(str(folder))
    data = (folder / zt.OPTIMIZER_NAME).read_bytes()
    (folder / zt.OPTIMIZER_NAME).write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(zerockpt.FormatError, match=r"optimizer\.safetensors"):
        t._load_optimizer_and_scheduler(str(folder))
