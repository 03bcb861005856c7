"""zerockpt.lightning: Lightning CheckpointIO plugins, through real Trainer runs on the CPU.

The oracle is Lightning itself: a run stopped at a zerockpt checkpoint and resumed with
``ckpt_path=`` must end bitwise where an uninterrupted run ends (parameters, optimizer and
scheduler state).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")
safetensors = pytest.importorskip("safetensors")

import zerockpt  # noqa: E402
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO  # noqa: E402
from lightning.fabric.utilities.data import AttributeDict  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from zerockpt.lightning import AsyncZerockptCheckpointIO, ZerockptCheckpointIO  # noqa: E402

PLUGINS = [ZerockptCheckpointIO, AsyncZerockptCheckpointIO]
STEPS_PER_EPOCH = 4
TOTAL_STEPS = 3 * STEPS_PER_EPOCH

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning"
)


def module_class(base: type) -> type:
    """A tiny regression LightningModule deriving from ``base`` (either Lightning's)."""

    class Tiny(base):  # type: ignore[misc, valid-type]
        def __init__(self, lr: float = 0.05, hidden: int = 16, cfg: Any = None) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(8, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)
            )

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
            return [optimizer], [{"scheduler": scheduler, "interval": "step"}]

    return Tiny


Tiny = module_class(pl.LightningModule)


def loader() -> torch.utils.data.DataLoader[Any]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8 * STEPS_PER_EPOCH, 8, generator=generator)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(8 * STEPS_PER_EPOCH, 1, generator=generator)
    dataset = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=False, num_workers=0)


def make_trainer(root: Path, max_steps: int, module: Any = pl, **kwargs: Any) -> Any:
    kwargs.setdefault("enable_checkpointing", bool(kwargs.get("callbacks")))
    return module.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        deterministic=True,
        default_root_dir=str(root),
        **kwargs,
    )


def snapshot(trainer: Any, model: Any) -> dict[str, Any]:
    """Parameters, optimizer and scheduler state, cloned."""
    state = {
        "model": model.state_dict(),
        "optim": trainer.optimizers[0].state_dict(),
        "sched": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        "global_step": trainer.global_step,
    }
    return _clone(state)


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: _clone(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_clone(item) for item in value)
    return value


def assert_bitwise_equal(actual: Any, expected: Any, where: str = "") -> None:
    assert type(actual) is type(expected), where
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert torch.equal(
            actual.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)
        ), where
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), where
        for key in expected:
            assert_bitwise_equal(actual[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_bitwise_equal(a, e, f"{where}/{index}")
    else:
        assert actual == expected, where


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    model = Tiny()
    trainer = make_trainer(tmp_path_factory.mktemp("straight"), TOTAL_STEPS)
    trainer.fit(model, loader())
    return snapshot(trainer, model)


@pytest.mark.parametrize("plugin_class", PLUGINS, ids=lambda c: c.__name__)
def test_resume_is_bitwise_identical(
    plugin_class: type, uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    # Missing parent directories: the plugin creates them.
    dirpath = tmp_path / "runs" / "a" / "b"
    pl.seed_everything(0, verbose=False)
    model = Tiny()
    first = make_trainer(
        tmp_path,
        STEPS_PER_EPOCH,
        plugins=[plugin_class()],
        # Saved after the epoch's last batch: Lightning's own TorchCheckpointIO resumes
        # bitwise from there (from an epoch-end save it does not, in Lightning 2.6).
        callbacks=[
            ModelCheckpoint(dirpath=dirpath, filename="stop", every_n_train_steps=STEPS_PER_EPOCH)
        ],
    )
    first.fit(model, loader())
    stop = dirpath / "stop.ckpt"
    assert stop.is_file()
    # A safetensors file (no pickle): safetensors opens it, torch.load's pickle path cannot.
    with safetensors.safe_open(str(stop), framework="pt") as opened:
        assert "state_dict/net.0.weight" in set(opened.keys())
    saved = zerockpt.load(stop)
    assert saved["global_step"] == STEPS_PER_EPOCH
    assert saved["hyper_parameters"] == {"lr": 0.05, "hidden": 16, "cfg": None}
    assert isinstance(saved["optimizer_states"][0]["state"][0]["exp_avg"], torch.Tensor)

    # Another initialisation, so that only the checkpoint can make the runs agree.
    pl.seed_everything(123, verbose=False)
    resumed_model = Tiny()
    second = make_trainer(tmp_path, TOTAL_STEPS, plugins=[plugin_class()])
    second.fit(resumed_model, loader(), ckpt_path=str(stop))
    assert_bitwise_equal(snapshot(second, resumed_model), uninterrupted)


@pytest.mark.parametrize("plugin_class", PLUGINS, ids=lambda c: c.__name__)
def test_model_checkpoint_top_k_and_last_remove_through_plugin(
    plugin_class: type, tmp_path: Path
) -> None:
    removed: list[str] = []

    class Spy(plugin_class):  # type: ignore[misc, valid-type]
        def remove_checkpoint(self, path: Any) -> None:
            removed.append(os.fspath(path))
            super().remove_checkpoint(path)

    dirpath = tmp_path / "ckpts"
    callback = ModelCheckpoint(
        dirpath=dirpath,
        filename="{step}",
        monitor="train_loss",
        every_n_train_steps=1,
        save_top_k=2,
        save_last=True,
    )
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path, 8, plugins=[Spy()], callbacks=[callback])
    trainer.fit(Tiny(), loader())

    files = sorted(p.name for p in dirpath.iterdir())
    assert "last.ckpt" in files
    assert sorted(Path(p).name for p in callback.best_k_models) == sorted(
        f for f in files if f != "last.ckpt"
    )
    assert len(callback.best_k_models) == 2
    assert len(removed) >= 6 - 2  # 8 saves, 2 kept (last.ckpt is rewritten in place)
    for path in removed:
        if Path(path).name != "last.ckpt":
            assert not os.path.exists(path), path
    for name in files:
        with safetensors.safe_open(str(dirpath / name), framework="pt") as opened:
            assert opened.metadata() is not None
        assert zerockpt.load(dirpath / name)["state_dict"].keys() == Tiny().state_dict().keys()
    last = zerockpt.load(dirpath / "last.ckpt")
    assert last["global_step"] == 8


def test_pytorch_lightning_trainer_accepts_the_plugins(tmp_path: Path) -> None:
    ptl = pytest.importorskip("pytorch_lightning")
    for plugin_class in PLUGINS:
        plugin = plugin_class()
        assert isinstance(plugin, CheckpointIO)
        assert isinstance(plugin, ptl.plugins.io.CheckpointIO)

    model_class = module_class(ptl.LightningModule)
    dirpath = tmp_path / "ptl"
    ptl.seed_everything(0, verbose=False)
    trainer = make_trainer(
        tmp_path,
        2,
        module=ptl,
        plugins=[AsyncZerockptCheckpointIO()],
        callbacks=[ptl.callbacks.ModelCheckpoint(dirpath=dirpath, filename="two")],
    )
    model = model_class()
    trainer.fit(model, loader())
    loaded = zerockpt.load(dirpath / "two.ckpt")
    assert loaded["global_step"] == 2
    for name, value in model.state_dict().items():
        assert torch.equal(loaded["state_dict"][name], value)


@pytest.mark.parametrize("plugin_class", PLUGINS, ids=lambda c: c.__name__)
def test_save_load_roundtrip_with_hyperparameters(plugin_class: type, tmp_path: Path) -> None:
    plugin = plugin_class()
    checkpoint = {
        "state_dict": {"w": torch.arange(6.0).reshape(2, 3)},
        "hyper_parameters": {
            "cfg": AttributeDict(depth=2, inner=AttributeDict(width=[1, 2])),
            "layers": [AttributeDict(kind="conv"), {"plain": True}],
            "pair": (AttributeDict(a=1), 2),
            "dtype": torch.bfloat16,
        },
        "hparams_name": "kwargs",
        "datamodule_hyper_parameters": AttributeDict(batch_size=8),
        "epoch": 3,
    }
    path = tmp_path / "deep" / "missing" / "dirs" / "x.ckpt"
    plugin.save_checkpoint(checkpoint, path)
    loaded = plugin.load_checkpoint(path)
    plugin.teardown()
    hparams = loaded["hyper_parameters"]
    assert type(hparams) is dict  # Lightning stores dict(module.hparams)
    assert isinstance(hparams["cfg"], AttributeDict)
    assert isinstance(hparams["cfg"].inner, AttributeDict)
    assert hparams["cfg"] == {"depth": 2, "inner": {"width": [1, 2]}}
    assert isinstance(hparams["layers"][0], AttributeDict)
    assert type(hparams["layers"][1]) is dict
    assert hparams["pair"] == ({"a": 1}, 2)
    assert hparams["dtype"] is torch.bfloat16
    assert isinstance(loaded["datamodule_hyper_parameters"], AttributeDict)
    assert loaded["datamodule_hyper_parameters"].batch_size == 8
    assert torch.equal(loaded["state_dict"]["w"], checkpoint["state_dict"]["w"])
    assert loaded["epoch"] == 3


@pytest.mark.parametrize("plugin_class", PLUGINS, ids=lambda c: c.__name__)
def test_unstorable_hyperparameter_is_a_clear_type_error(
    plugin_class: type, tmp_path: Path
) -> None:
    plugin = plugin_class()
    checkpoint = {"state_dict": {}, "hyper_parameters": {"data_dir": Path("/data")}}
    with pytest.raises(TypeError, match=r"hyper_parameters.*data_dir.*save_hyperparameters"):
        plugin.save_checkpoint(checkpoint, tmp_path / "x.ckpt")
    # What Lightning stores for omegaconf hyperparameters: their type.
    checkpoint = {"state_dict": {}, "hyper_parameters": {"a": 1}, "hparams_type": AttributeDict}
    with pytest.raises(TypeError, match=r"hparams_type.*omegaconf.*as a dict"):
        plugin.save_checkpoint(checkpoint, tmp_path / "x.ckpt")
    # Other unstorable values: zerockpt's own message.
    with pytest.raises(TypeError, match=r"obj\['callbacks'\]") as raised:
        plugin.save_checkpoint({"callbacks": {"x": object()}}, tmp_path / "x.ckpt")
    assert "save_hyperparameters" not in str(raised.value)
    plugin.teardown()
    assert not (tmp_path / "x.ckpt").exists()


def test_load_arguments_as_zerockpt_load(tmp_path: Path) -> None:
    plugin = ZerockptCheckpointIO()
    path = tmp_path / "x.ckpt"
    plugin.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)
    for kwargs in ({}, {"map_location": "cpu"}, {"map_location": torch.device("cpu")}):
        for weights_only in (None, True):
            loaded = plugin.load_checkpoint(path, weights_only=weights_only, **kwargs)
            assert torch.equal(loaded["state_dict"]["w"], torch.ones(2))
    with pytest.raises(ValueError, match="weights_only=False"):
        plugin.load_checkpoint(path, weights_only=False)
    with pytest.raises(TypeError, match="map_location"):
        plugin.load_checkpoint(path, map_location=lambda storage, loc: storage)
    with pytest.raises(FileNotFoundError):
        plugin.load_checkpoint(tmp_path / "missing.ckpt")


def test_storage_options_and_paths(tmp_path: Path) -> None:
    plugin = ZerockptCheckpointIO()
    path = tmp_path / "x.ckpt"
    plugin.save_checkpoint({"a": torch.ones(1)}, path, storage_options={"durable": False})
    plugin.save_checkpoint({"a": torch.ones(1)}, str(path), storage_options={"checksums": False})
    assert zerockpt.verify(path).ok
    with pytest.raises(TypeError, match=r"unknown option.*bogus"):
        plugin.save_checkpoint({"a": torch.ones(1)}, path, storage_options={"bogus": 1})
    with pytest.raises(TypeError, match="storage_options must be a mapping"):
        plugin.save_checkpoint({"a": torch.ones(1)}, path, storage_options=3)
    with pytest.raises(ValueError, match="local files only"):
        plugin.save_checkpoint({"a": torch.ones(1)}, "s3://bucket/x.ckpt")
    plugin.remove_checkpoint(path)
    assert not path.exists()
    plugin.remove_checkpoint(path)  # missing: nothing to do, as Lightning's own plugin


def test_async_waits_and_raises_a_failed_save(tmp_path: Path) -> None:
    plugin = AsyncZerockptCheckpointIO()
    weights = torch.zeros(1000)
    path = tmp_path / "a.ckpt"
    plugin.save_checkpoint({"w": weights}, path)
    weights.add_(1)  # after the snapshot: the file keeps the values at the call
    plugin.teardown()
    assert torch.equal(zerockpt.load(path)["w"], torch.zeros(1000))

    # A destination that is a directory fails in the background write.
    occupied = tmp_path / "occupied"
    (occupied / "inside").mkdir(parents=True)
    plugin.save_checkpoint({"w": weights}, occupied)
    with pytest.raises(IsADirectoryError):
        plugin.teardown()
    plugin.teardown()  # the error is raised once

    plugin.save_checkpoint({"w": weights}, occupied)
    with pytest.raises(IsADirectoryError):
        plugin.save_checkpoint({"w": weights}, path)  # the previous save's error
    plugin.save_checkpoint({"w": weights}, path)
    # load and remove wait for the save in flight.
    assert torch.equal(plugin.load_checkpoint(path)["w"], weights)
    plugin.save_checkpoint({"w": weights * 2}, path)
    plugin.remove_checkpoint(path)
    assert not path.exists()
    plugin.teardown()


def test_trainer_save_checkpoint_goes_through_plugin(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    model = Tiny(cfg={"note": "x"})
    trainer = make_trainer(tmp_path, 2, plugins=[ZerockptCheckpointIO()])
    trainer.fit(model, loader())
    path = tmp_path / "manual" / "m.ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.save_checkpoint(path)
    loaded = zerockpt.load(path)
    assert loaded["hyper_parameters"]["cfg"] == {"note": "x"}
    restored = Tiny(**loaded["hyper_parameters"])
    restored.load_state_dict(loaded["state_dict"])
    for name, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value)


def test_readme_lightning_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = Path(__file__).resolve().parent.parent / "README.md"
    section = re.search(r"## Lightning\n(.*?)\n## ", readme.read_text(), re.S)
    assert section, "README has no Lightning section"
    blocks = re.findall(r"```python\n(.*?)```", section.group(1), re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], str(readme), "exec"), namespace)
    last = tmp_path / "runs" / "regressor" / "last.ckpt"
    assert zerockpt.load(last)["global_step"] == 16


def test_async_remove_of_another_file_does_not_wait(tmp_path: Path) -> None:
    waits: list[str | None] = []

    class Spy(AsyncZerockptCheckpointIO):
        def wait(self) -> None:
            waits.append(None if self._pending is None else self._pending.path)
            super().wait()

    plugin = Spy()
    old, new = tmp_path / "old.ckpt", tmp_path / "new.ckpt"
    plugin.save_checkpoint({"w": torch.ones(3)}, old)
    plugin.save_checkpoint({"w": torch.ones(3)}, new)  # waits for old's save
    assert waits == [None, str(old)]
    plugin.remove_checkpoint(old)  # as ModelCheckpoint does right after starting new's save
    assert waits == [None, str(old)]
    assert not old.exists()
    (tmp_path / "link.ckpt").symlink_to(new)
    plugin.load_checkpoint(tmp_path / "link.ckpt")  # a link to the file being written
    assert waits == [None, str(old), str(new)]
    plugin.teardown()


# --- loading a module from a checkpoint, hyperparameters, Trainer.save_checkpoint options -------


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A Tiny fitted for 2 steps, saved by zerockpt's plugin and by Lightning's own."""
    root = tmp_path_factory.mktemp("fitted")
    pl.seed_everything(0, verbose=False)
    model = Tiny(lr=0.01, hidden=8, cfg={"note": "x", "sizes": [1, 2]})
    trainer = make_trainer(root, 2, plugins=[AsyncZerockptCheckpointIO()])
    trainer.fit(model, loader())
    paths = {"zerockpt": root / "z.ckpt", "torch": root / "t.ckpt"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.save_checkpoint(paths["zerockpt"])
        trainer.strategy.checkpoint_io.teardown()
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    torch.save(checkpoint, paths["torch"])  # what Lightning's TorchCheckpointIO writes
    return {"model": model, "trainer": trainer, **paths}


def test_load_from_checkpoint_matches_lightnings_own(fitted: dict[str, Any]) -> None:
    from zerockpt.lightning import load_from_checkpoint

    ours = load_from_checkpoint(Tiny, fitted["zerockpt"])
    theirs = Tiny.load_from_checkpoint(fitted["torch"], weights_only=False)
    assert type(ours) is Tiny
    assert (
        dict(ours.hparams)
        == dict(theirs.hparams)
        == {
            "lr": 0.01,
            "hidden": 8,
            "cfg": {"note": "x", "sizes": [1, 2]},
        }
    )
    assert_bitwise_equal(dict(ours.state_dict()), dict(theirs.state_dict()))
    assert_bitwise_equal(dict(ours.state_dict()), _clone(dict(fitted["model"].state_dict())))
    # Keyword arguments override the stored hyperparameters, as in Lightning.
    overridden = load_from_checkpoint(Tiny, fitted["zerockpt"], lr=0.5, map_location="cpu")
    assert overridden.hparams.lr == 0.5 and overridden.hparams.hidden == 8
    # strict: a module of another shape does not load.
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_from_checkpoint(Tiny, fitted["zerockpt"], hidden=4)


def test_load_from_checkpoint_errors(fitted: dict[str, Any], tmp_path: Path) -> None:
    from zerockpt.lightning import load_from_checkpoint

    with pytest.raises(zerockpt.FormatError):
        load_from_checkpoint(Tiny, fitted["torch"])  # a torch.save file: Lightning's own reads it
    with pytest.raises(FileNotFoundError):
        load_from_checkpoint(Tiny, tmp_path / "missing.ckpt")
    with pytest.raises(TypeError, match="LightningModule or LightningDataModule"):
        load_from_checkpoint(torch.nn.Linear, fitted["zerockpt"])


def test_load_from_checkpoint_datamodule_and_pytorch_lightning(tmp_path: Path) -> None:
    from zerockpt.lightning import load_from_checkpoint

    class Data(pl.LightningDataModule):
        def __init__(self, batch_size: int = 4) -> None:
            super().__init__()
            self.save_hyperparameters()

    path = tmp_path / "d.ckpt"
    ZerockptCheckpointIO().save_checkpoint(
        {
            "pytorch-lightning_version": pl.__version__,
            "state_dict": {},
            "datamodule_hyper_parameters": {"batch_size": 16},
            "hyper_parameters": {"batch_size": 16},
        },
        path,
    )
    data = load_from_checkpoint(Data, path)
    assert isinstance(data, Data) and data.hparams.batch_size == 16

    ptl = pytest.importorskip("pytorch_lightning")
    model_class = module_class(ptl.LightningModule)
    model = model_class(hidden=4)
    ZerockptCheckpointIO().save_checkpoint(
        {
            "pytorch-lightning_version": ptl.__version__,
            "state_dict": dict(model.state_dict()),
            "hyper_parameters": dict(model.hparams),
        },
        path,
    )
    loaded = load_from_checkpoint(model_class, path)
    assert isinstance(loaded, model_class) and loaded.hparams.hidden == 4
    assert_bitwise_equal(dict(loaded.state_dict()), _clone(dict(model.state_dict())))


@pytest.mark.parametrize("package", ["lightning.pytorch", "pytorch_lightning"])
def test_lightning_internals_used_by_load_from_checkpoint_exist(package: str) -> None:
    saving = pytest.importorskip(f"{package}.core.saving")
    assert callable(saving._load_state) and callable(saving._pl_migrate_checkpoint)
    assert list(inspect.signature(saving._load_state).parameters)[:3] == [
        "cls",
        "checkpoint",
        "strict",
    ]


def test_weights_only_and_storage_options_through_the_trainer(
    fitted: dict[str, Any], tmp_path: Path
) -> None:
    trainer = fitted["trainer"]
    path = tmp_path / "w.ckpt"
    trainer.save_checkpoint(path, weights_only=True, storage_options={"checksums": False})
    trainer.strategy.checkpoint_io.teardown()
    saved = zerockpt.load(path)
    expected = trainer._checkpoint_connector.dump_checkpoint(weights_only=True)
    assert sorted(saved) == sorted(expected)  # the keys Lightning's own plugin would write
    assert "optimizer_states" not in saved
    assert not zerockpt.verify(path).has_checksums
    with pytest.raises(TypeError, match=r"unknown option.*bogus"):
        trainer.save_checkpoint(path, storage_options={"bogus": True})


@pytest.mark.parametrize("plugin_class", PLUGINS, ids=lambda c: c.__name__)
def test_remove_missing_checkpoint_and_tmpfs(plugin_class: type, tmp_path: Path) -> None:
    plugin = plugin_class()
    plugin.remove_checkpoint(tmp_path / "never-written.ckpt")
    plugin.remove_checkpoint(tmp_path / "no" / "such" / "dir" / "x.ckpt")
    # A file system that refuses O_DIRECT (tmpfs): the write falls back to buffered I/O.
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        where = shm / f"zerockpt-test-{os.getpid()}-{plugin_class.__name__}.ckpt"
        try:
            plugin.save_checkpoint({"w": torch.arange(5000.0)}, where)
            assert torch.equal(plugin.load_checkpoint(where)["w"], torch.arange(5000.0))
            plugin.remove_checkpoint(where)
            assert not where.exists()
        finally:
            plugin.teardown()
            where.unlink(missing_ok=True)


needs_omegaconf = pytest.mark.skipif(
    importlib.util.find_spec("omegaconf") is None, reason="omegaconf is not installed"
)


@needs_omegaconf
@pytest.mark.parametrize("plugin_class", PLUGINS, ids=lambda c: c.__name__)
def test_omegaconf_hyperparameters_round_trip(plugin_class: type, tmp_path: Path) -> None:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    cfg = OmegaConf.create({"lr": 0.05, "hidden": 16, "alias": "${hidden}", "n": {"x": [1, 2]}})
    checkpoint = {
        "state_dict": {"w": torch.ones(2)},
        "hyper_parameters": cfg,
        "hparams_type": DictConfig,
        "hparams_name": "cfg",
        "datamodule_hyper_parameters": AttributeDict(
            inner=OmegaConf.create([1, {"a": "b"}]), plain=[OmegaConf.create({"k": 1})]
        ),
    }
    path = tmp_path / "c.ckpt"
    plugin = plugin_class()
    plugin.save_checkpoint(checkpoint, path)
    assert isinstance(checkpoint["hyper_parameters"], DictConfig)  # the caller's is unchanged
    loaded = plugin.load_checkpoint(path)
    plugin.teardown()
    hparams = loaded["hyper_parameters"]
    assert isinstance(hparams, DictConfig) and loaded["hparams_type"] is DictConfig
    assert OmegaConf.to_container(hparams) == OmegaConf.to_container(cfg)
    assert hparams.alias == 16  # the interpolation is kept, and resolves
    assert OmegaConf.to_container(hparams, resolve=False)["alias"] == "${hidden}"
    data = loaded["datamodule_hyper_parameters"]
    assert isinstance(data, AttributeDict)
    assert isinstance(data.inner, ListConfig) and data.inner[1].a == "b"
    assert isinstance(data.plain[0], DictConfig) and data.plain[0].k == 1
    # Without pickle: the file holds the values as JSON, the type by name.
    raw = zerockpt.load(path)
    assert raw["hparams_type"] == "DictConfig" and type(raw["hyper_parameters"]) is dict


@needs_omegaconf
def test_omegaconf_module_through_trainer_and_load_from_checkpoint(
    fitted: dict[str, Any], tmp_path: Path
) -> None:
    from omegaconf import DictConfig, OmegaConf
    from zerockpt.lightning import load_from_checkpoint

    class Configured(pl.LightningModule):
        def __init__(self, cfg: Any) -> None:
            super().__init__()
            self.save_hyperparameters(cfg)
            self.net = torch.nn.Linear(8, self.hparams.out)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    cfg = OmegaConf.create({"lr": 0.1, "out": 2, "name": "run-${out}"})
    dirpath = tmp_path / "ckpts"
    trainer = make_trainer(
        tmp_path,
        2,
        plugins=[ZerockptCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=dirpath, filename="c")],
    )
    model = Configured(cfg)
    trainer.fit(model, loader())
    torch_path = tmp_path / "t.ckpt"
    torch.save(trainer._checkpoint_connector.dump_checkpoint(), torch_path)
    ours = load_from_checkpoint(Configured, dirpath / "c.ckpt")
    theirs = Configured.load_from_checkpoint(torch_path, weights_only=False)
    assert isinstance(ours.hparams, DictConfig) and isinstance(theirs.hparams, DictConfig)
    assert OmegaConf.to_container(ours.hparams) == OmegaConf.to_container(theirs.hparams)
    assert ours.hparams.name == "run-2"
    assert_bitwise_equal(dict(ours.state_dict()), _clone(dict(model.state_dict())))


@needs_omegaconf
def test_omegaconf_unstorable_value_names_the_key(tmp_path: Path) -> None:
    import enum

    from omegaconf import OmegaConf

    class Mode(enum.Enum):
        FAST = 1

    checkpoint = {"hyper_parameters": {"cfg": OmegaConf.create({"mode": Mode.FAST})}}
    with pytest.raises(TypeError, match=r"hyper_parameters.*cfg.*mode"):
        ZerockptCheckpointIO().save_checkpoint(checkpoint, tmp_path / "x.ckpt")
    assert not (tmp_path / "x.ckpt").exists()
