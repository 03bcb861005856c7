"""What real training checkpoints hold, stored without pickle and given back with the same type
and value: numpy arrays and RNG states, torch.dtype/Size/device, sets, bytes, argparse.Namespace,
OrderedDict and defaultdict; and `zerockpt convert` of Hugging Face Trainer and Lightning files,
checked against torch.load of the same file."""

from __future__ import annotations

import argparse
import json
import math
import random
import struct
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zerockpt
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from zerockpt import FormatError, cli
from zerockpt.structure import flatten, unflatten

NUMERIC_DTYPES = [
    np.bool_,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
    np.complex64,
    np.complex128,
]


def assert_same_value(a: Any, b: Any) -> None:
    """Same type all the way down (containers, keys, leaves), same values: tensors and numpy
    values bitwise, floats down to NaN and the sign of zero, defaultdict factories."""
    assert type(a) is type(b), (type(a), type(b), a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    elif isinstance(a, np.ndarray | np.generic):
        assert a.dtype == b.dtype and np.shape(a) == np.shape(b)
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    elif isinstance(a, dict):
        assert [(type(k), k) for k in a] == [(type(k), k) for k in b]
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None)
        if isinstance(a, defaultdict):
            assert a.default_factory is b.default_factory
        for k in a:
            assert_same_value(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_value(x, y)
    elif isinstance(a, argparse.Namespace):
        assert_same_value(vars(a), vars(b))
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b
        if isinstance(a, float):
            assert math.copysign(1.0, a) == math.copysign(1.0, b)


def round_trip(tmp_path: Path, obj: Any, **load: Any) -> Any:
    path = tmp_path / "state.safetensors"
    zerockpt.save(obj, path)
    return zerockpt.load(path, **load)


def arrays_of(dtype: Any) -> dict[str, np.ndarray]:
    """Arrays of one dtype in every layout: 0-d, empty, n-d, non-contiguous, reversed,
    Fortran order, read-only, unaligned, and the other byte order."""
    rng = np.random.default_rng(0)
    base = (rng.standard_normal((4, 6)) * 100).astype(dtype)
    if np.dtype(dtype).kind == "c":
        base = base + 1j * base[::-1]
    frozen = base.copy()
    frozen.flags.writeable = False
    buffer = np.zeros(base.nbytes + 1, dtype=np.uint8)
    unaligned = buffer[1:].view(base.dtype).reshape(base.shape)
    unaligned[...] = base
    return {
        "scalar0d": np.array(base[1, 2]),
        "empty": np.zeros((0, 3), dtype=dtype),
        "matrix": base,
        "strided": base[:, ::2],
        "transposed": base.T,
        "reversed": base[::-1, ::-1],
        "fortran": np.asfortranarray(base),
        "readonly": frozen,
        "unaligned": unaligned,
        "swapped": base.astype(base.dtype.newbyteorder("S")),
    }


@pytest.mark.parametrize("dtype", NUMERIC_DTYPES, ids=lambda d: np.dtype(d).name)
def test_numpy_arrays_of_every_numeric_dtype(tmp_path: Path, dtype: Any) -> None:
    state = {"arrays": arrays_of(dtype), "scalar": np.asarray(arrays_of(dtype)["matrix"])[0, 0]}
    for mmap in (True, False):
        loaded = round_trip(tmp_path, state, mmap=mmap, verify=True)
        assert_same_value(state, loaded)
        for name, array in state["arrays"].items():
            assert np.array_equal(array, loaded["arrays"][name], equal_nan=True), name
    # Stored as tensors (readable by any safetensors reader), named by their path.
    with zerockpt.open(tmp_path / "state.safetensors") as f:
        assert "arrays/matrix" in f and "scalar" in f


def test_numpy_scalars_keep_their_type(tmp_path: Path) -> None:
    scalars = [np.dtype(d).type(3) for d in NUMERIC_DTYPES] + [np.float64("nan"), np.float32(-0.0)]
    loaded = round_trip(tmp_path, {"s": scalars})
    assert_same_value({"s": scalars}, loaded)
    assert [type(x) for x in loaded["s"]] == [type(x) for x in scalars]


def test_numpy_strings_are_stored_as_the_str_and_bytes_they_are(tmp_path: Path) -> None:
    loaded = round_trip(tmp_path, {"s": np.str_("label"), "b": np.bytes_(b"raw")})
    assert_same_value({"s": "label", "b": b"raw"}, loaded)


def test_numpy_arrays_are_snapshots(tmp_path: Path) -> None:
    array = np.arange(8, dtype=np.float32)
    pending = zerockpt.save_async({"a": array}, tmp_path / "a.safetensors")
    array += 100  # after the call: not in the file
    pending.result()
    assert np.array_equal(zerockpt.load(tmp_path / "a.safetensors")["a"], np.arange(8.0))
    # Loaded arrays are independent of the file (a private mapping).
    loaded = zerockpt.load(tmp_path / "a.safetensors")["a"]
    loaded[0] = -1
    assert zerockpt.load(tmp_path / "a.safetensors")["a"][0] == 0


def test_numpy_rng_state_resumes_the_stream(tmp_path: Path) -> None:
    np.random.seed(1234)
    np.random.standard_normal(3)  # leaves a cached gaussian in the state
    state = {"numpy": np.random.get_state(), "generator": np.random.default_rng(5).bit_generator}
    state["generator"] = state["generator"].state  # a dict with 128-bit ints
    expected = np.random.standard_normal(10)
    loaded = round_trip(tmp_path, state)
    assert_same_value(state, loaded)
    np.random.seed(0)
    np.random.set_state(loaded["numpy"])
    assert np.array_equal(np.random.standard_normal(10), expected)
    generator = np.random.default_rng()
    generator.bit_generator.state = loaded["generator"]
    assert np.array_equal(generator.random(4), np.random.default_rng(5).random(4))


def test_python_rng_state_resumes_the_stream(tmp_path: Path) -> None:
    random.seed(99)
    state = random.getstate()
    expected = [random.random() for _ in range(5)]
    loaded = round_trip(tmp_path, {"python": state})["python"]
    assert_same_value(state, loaded)
    random.setstate(loaded)
    assert [random.random() for _ in range(5)] == expected


def test_torch_values(tmp_path: Path) -> None:
    dtypes = sorted(
        {v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str
    )  # every dtype torch has, float8, quantized and complex128 included
    state = {
        "dtypes": dtypes,
        "sizes": [torch.Size([]), torch.Size([0]), torch.Size([2, 3, 4])],
        "devices": [torch.device("cpu"), torch.device("cuda", 1), torch.device("meta")],
        "by_dtype": {str(torch.float32): torch.float32},
    }
    assert_same_value(state, round_trip(tmp_path, state))


def test_sets_bytes_and_namespaces(tmp_path: Path) -> None:
    args = argparse.Namespace(
        lr=3e-4,
        betas=(0.9, 0.95),
        name="run",
        layers=[1, 2],
        resume=None,
        nested=argparse.Namespace(flag=True),
        dtype=torch.bfloat16,
        weight=torch.ones(2),
    )
    state = {
        "set": {1, "two", (3, 4), frozenset({5}), None, 2.5, b"b"},
        "empty_set": set(),
        "frozen": frozenset({"a", "b"}),
        "bytes": b"\x00\xff" * 1000,
        "empty_bytes": b"",
        "bytearray": bytearray(b"mutable"),
        "args": args,
        "empty_args": argparse.Namespace(),
    }
    loaded = round_trip(tmp_path, state)
    assert_same_value(state, loaded)
    assert loaded["set"] == state["set"]


def test_ordered_and_default_dicts(tmp_path: Path) -> None:
    state: dict[str, Any] = {
        "ordered": OrderedDict([("b", 1), ("a", 2)]),
        "plain": {"b": 1, "a": 2},
        "lists": defaultdict(list, {"x": [1], 3: [2]}),
        "counts": defaultdict(int, {"a": 2}),
        "nested": defaultdict(dict, {"k": {"v": torch.ones(1)}}),
        "sets": defaultdict(set),
        "none": defaultdict(None, {"a": 1}),
    }
    loaded = round_trip(tmp_path, state)
    assert_same_value(state, loaded)
    loaded["lists"]["new"].append(1)  # the factory works
    loaded["counts"]["new"] += 1
    assert loaded["lists"]["new"] == [1] and loaded["counts"]["new"] == 1


class Custom:
    pass


@pytest.mark.parametrize(
    ("obj", "words"),
    [
        ({"d": defaultdict(lambda: 0)}, r"obj\['d'\] is a defaultdict whose default_factory"),
        ({"d": [defaultdict(Custom)]}, r"obj\['d'\]\[0\] is a defaultdict whose default_factory"),
        ({"o": np.array([1, "a"], dtype=object)}, r"obj\['o'\] is a numpy array of dtype object"),
        ({"s": np.zeros(2, dtype=[("a", "<i4")])}, r"obj\['s'\] is a numpy array of dtype \["),
        ({"u": np.array(["text"])}, r"obj\['u'\] is a numpy array of dtype <U4"),
        ({"t": np.array(["2020-01-01"], dtype="M8[D]")}, r"obj\['t'\] is a numpy array"),
        ({"g": np.zeros(2, dtype=np.longdouble)}, r"obj\['g'\] is a numpy array of dtype float128"),
        ({"m": np.ma.masked_array([1, 2])}, r"obj\['m'\] is a numpy.ma.MaskedArray"),
        ({"c": [1j]}, r"obj\['c'\]\[0\] is a builtins.complex"),
        (
            {"n": argparse.Namespace(f=Custom())},
            r"obj\['n'\]\['f'\] is a test_real_contents.Custom",
        ),
        ({"s": {Custom()}}, r"obj\['s'\]\[0\] is a test_real_contents.Custom"),
        ({"f": print}, r"obj\['f'\] is a builtins.builtin_function_or_method"),
        ({"r": range(3)}, r"obj\['r'\] is a builtins.range"),
        ({"v": memoryview(b"x")}, r"obj\['v'\] is a builtins.memoryview"),
    ],
)
def test_anything_else_is_a_type_error_naming_its_path(
    tmp_path: Path, obj: Any, words: str
) -> None:
    path = tmp_path / "bad.safetensors"
    with pytest.raises(TypeError, match=words):
        zerockpt.save(obj, path)
    with pytest.raises(TypeError, match=words):
        zerockpt.save_async(obj, path)
    assert list(tmp_path.iterdir()) == []


def rewrite_structure(path: Path, structure: Any) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["zerockpt.structure"] = json.dumps({"version": 1, "root": structure})
    header["__metadata__"].pop("zerockpt.crc32c")
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data[8 + n :])


@pytest.mark.parametrize(
    ("node", "words"),
    [
        ({"numpy": "f", "dtype": "|O", "shape": [2]}, "bad numpy dtype"),
        ({"numpy": "f", "dtype": "V8", "shape": [2]}, "bad numpy dtype"),
        ({"numpy": "f", "dtype": "not a dtype", "shape": [2]}, "bad numpy dtype"),
        ({"numpy": "f", "dtype": "<f4", "shape": [3]}, "not the numpy float32 \\[3\\]"),
        ({"numpy": "f", "dtype": "<i4", "shape": [2]}, "not the numpy int32"),
        ({"numpy": "f", "dtype": "<c16", "shape": [2]}, "not the numpy complex128"),
        ({"numpy": "f", "dtype": "<f4", "shape": [-2]}, "bad numpy shape"),
        ({"numpy": "f", "dtype": "<f4"}, "unexpected node"),
        ({"numpy": "f", "dtype": "<f4", "shape": [2], "scalar": True}, "numpy scalar with a shape"),
        ({"numpy": "missing", "dtype": "<f4", "shape": [2]}, "'missing' is not in the file"),
        ({"bytes": "f"}, "not 1-d uint8"),
        ({"bytes": 3}, "unexpected node"),
        ({"dtype": "__class__"}, "unexpected node"),
        ({"dtype": "Tensor"}, "unexpected node"),
        ({"size": [1, -1]}, "unexpected node"),
        ({"size": [1.5]}, "unexpected node"),
        ({"device": "no such device"}, "unexpected node"),
        ({"set": [{"list": []}]}, "not hashable"),
        ({"set": list(range(0, 20 * (2**61 - 1), 2**61 - 1))}, "share a hash"),
        ({"frozenset": [{"dict": []}]}, "not hashable"),
        ({"namespace": [[1, 2]]}, "not a string"),
        ({"namespace": [["a"]]}, "bad dict item"),
        ({"dict": [], "default": "eval"}, "not a builtin type"),
        ({"dict": [], "default": "list", "ordered": True}, "unexpected node"),
    ],
)
def test_crafted_nodes_are_format_errors(tmp_path: Path, node: Any, words: str) -> None:
    path = tmp_path / "s.safetensors"
    zerockpt.save({"f": torch.ones(2)}, path)
    rewrite_structure(path, node)
    with pytest.raises(FormatError, match=words) as info:
        zerockpt.load(path)
    assert str(path) in str(info.value)


_LEAVES = st.one_of(
    st.none(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.binary(max_size=20),
    st.sampled_from([torch.float32, torch.int8, torch.bool, torch.complex128]),
    st.lists(st.integers(0, 5), max_size=3).map(torch.Size),
    st.sampled_from(NUMERIC_DTYPES).flatmap(
        lambda d: st.lists(st.integers(0, 3), max_size=3).map(lambda shape: np.ones(shape, dtype=d))
    ),
    st.sampled_from(NUMERIC_DTYPES).map(lambda d: np.dtype(d).type(1)),
    st.frozensets(st.integers(-5, 5) | st.text(max_size=3), max_size=4),
)


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    keys = st.text(max_size=4) | st.integers(-3, 3)
    return st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(keys, children, max_size=3),
        st.dictionaries(keys, children, max_size=3).map(lambda d: defaultdict(list, d)),
        st.dictionaries(st.text(max_size=4), children, max_size=3).map(
            lambda d: argparse.Namespace(**d)
        ),
        st.sets(st.integers(-5, 5) | st.text(max_size=3), max_size=4),
    )


@settings(max_examples=80, deadline=None)
@given(state=st.recursive(_LEAVES, _containers, max_leaves=10).map(lambda x: {"x": x}))
def test_any_mix_round_trips(state: Any) -> None:
    tensors, text = flatten(state)
    assert_same_value(state, unflatten(tensors, text, "planned"))


# --- zerockpt convert of the files real trainers write ------------------------------------------


def tiny_training() -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    import transformers

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, 2, 10)
    for _ in range(3):
        model(torch.randn(3, 4)).square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def convert_and_compare(path: Path) -> Any:
    """Converts ``path`` with the CLI; what zerockpt.load gives back equals torch.load's."""
    out = path.with_name(path.name + ".safetensors")
    assert cli.main(["convert", str(path), str(out)]) == 0
    expected = torch.load(path, weights_only=False)
    loaded = zerockpt.load(out)
    assert_same_value(expected, loaded)
    return loaded


def test_convert_hugging_face_trainer_checkpoint(tmp_path: Path) -> None:
    _, optimizer, scheduler = tiny_training()
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    # As transformers.Trainer._save_rng_state and _save_optimizer_and_scheduler write them.
    np.random.seed(7)
    random.seed(7)
    torch.manual_seed(7)
    rng_states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.random.get_rng_state(),
        "cuda": [torch.random.get_rng_state()],  # get_rng_state_all(): one per GPU
    }
    torch.save(rng_states, folder / "rng_state.pth")
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    torch.save(torch.amp.GradScaler("cpu").state_dict(), folder / "scaler.pt")
    draws = (random.random(), np.random.standard_normal(2), torch.rand(2))

    rng = convert_and_compare(folder / "rng_state.pth")
    optim = convert_and_compare(folder / "optimizer.pt")
    sched = convert_and_compare(folder / "scheduler.pt")
    convert_and_compare(folder / "scaler.pt")

    # What Trainer does on resume works from the converted files.
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.random.set_rng_state(rng["cpu"])
    again = (random.random(), np.random.standard_normal(2), torch.rand(2))
    assert again[0] == draws[0] and np.array_equal(again[1], draws[1])
    assert torch.equal(again[2], draws[2])
    _, fresh_optimizer, fresh_scheduler = tiny_training()
    fresh_optimizer.load_state_dict(optim)
    fresh_scheduler.load_state_dict(sched)
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()


def test_convert_lightning_checkpoint(tmp_path: Path) -> None:
    model, optimizer, scheduler = tiny_training()
    hparams = {
        "lr": 5e-5,
        "layers": [4, 8, 2],
        "args": argparse.Namespace(batch_size=32, precision="bf16-mixed", seed=None),
    }
    # The dict Lightning's Trainer.save_checkpoint writes (_checkpoint_connector.dump_checkpoint).
    checkpoint = {
        "epoch": 2,
        "global_step": 30,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": model.state_dict(),
        "loops": {
            "fit_loop": {
                "state_dict": {},
                "epoch_loop.state_dict": {"_batches_that_stepped": 30},
                "epoch_loop.batch_progress": {
                    "total": {"ready": 30, "completed": 30, "started": 30, "processed": 30},
                    "current": {"ready": 10, "completed": 10, "started": 10, "processed": 10},
                    "is_last_batch": True,
                },
            },
            "validate_loop": {"state_dict": {}},
        },
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {
                "monitor": "val_loss",
                "best_model_score": torch.tensor(0.25),
                "best_model_path": "/runs/epoch=1.ckpt",
                "current_score": torch.tensor(0.3),
                "best_k_models": {"/runs/epoch=1.ckpt": torch.tensor(0.25)},
                "kth_value": torch.tensor(float("inf")),
                "dirpath": "/runs",
                "last_model_path": "",
            },
            "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}": {
                "wait_count": 1,
                "stopped_epoch": 0,
                "best_score": torch.tensor(0.25),
                "patience": 3,
            },
        },
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [scheduler.state_dict()],
        "hparams_name": "kwargs",
        "hyper_parameters": hparams,
        "datamodule_hyper_parameters": argparse.Namespace(data_dir="/data", workers=4),
    }
    torch.save(checkpoint, tmp_path / "epoch=2-step=30.ckpt")
    loaded = convert_and_compare(tmp_path / "epoch=2-step=30.ckpt")
    fresh = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    fresh.load_state_dict(loaded["state_dict"])
    assert loaded["hyper_parameters"]["args"].batch_size == 32


def test_convert_legacy_format_with_numpy(tmp_path: Path) -> None:
    state = {"numpy": np.random.get_state(), "args": argparse.Namespace(lr=0.1), "f": np.float32(2)}
    torch.save(state, tmp_path / "rng_state.pth", _use_new_zipfile_serialization=False)
    convert_and_compare(tmp_path / "rng_state.pth")


def test_convert_refuses_what_it_cannot_store(tmp_path: Path, capsys: Any) -> None:
    torch.save({"w": torch.ones(1), "x": np.array([None], dtype=object)}, tmp_path / "o.pt")
    assert cli.main(["convert", str(tmp_path / "o.pt"), str(tmp_path / "o.safetensors")]) == 1
    assert "obj['x'] is a numpy array of dtype object" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()
