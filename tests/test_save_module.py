"""zerockpt.save(module): the module's state dict (by the C++ walk) and its _metadata."""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import safetensors.torch
import torch
import zerockpt
from conftest import torch_load_reads_safetensors
from torch import nn


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    model[0].register_buffer("scratch", torch.zeros(3), persistent=False)
    return model


def test_save_module_writes_its_state_dict(tmp_path: Path) -> None:
    model = _model()
    path = tmp_path / "m.safetensors"
    zerockpt.save(model, path)
    expected = model.state_dict()
    assert list(zerockpt.load(path)) == list(expected)  # other readers order by offset
    readers = [zerockpt.load, safetensors.torch.load_file]
    if torch_load_reads_safetensors(tmp_path):
        readers.append(torch.load)
    for loaded in (read(path) for read in readers):
        assert set(loaded) == set(expected)
        for key, value in expected.items():
            assert torch.equal(loaded[key], value), key


def test_save_module_keeps_metadata(tmp_path: Path) -> None:
    model = _model()
    path = tmp_path / "m.safetensors"
    zerockpt.save(model, path)
    loaded = zerockpt.load(path)
    assert isinstance(loaded, OrderedDict)
    assert loaded._metadata == model.state_dict()._metadata  # type: ignore[attr-defined]
    assert list(loaded._metadata) == list(model.state_dict()._metadata)  # type: ignore[attr-defined]
    stored = zerockpt.open(path).metadata()[zerockpt._C.STATE_DICT_METADATA_KEY]
    assert json.loads(stored)["1"] == {"version": nn.BatchNorm1d._version}


def test_plain_dict_has_no_metadata(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    zerockpt.save(dict(_model().state_dict()), path)
    loaded = zerockpt.load(path)
    assert type(loaded) is dict
    assert zerockpt._C.STATE_DICT_METADATA_KEY not in zerockpt.open(path).metadata()


def test_state_dict_metadata_that_is_not_json_is_skipped_with_a_warning(tmp_path: Path) -> None:
    sd = _model().state_dict()
    sd._metadata[""]["odd"] = object()  # type: ignore[attr-defined]
    path = tmp_path / "m.safetensors"
    with pytest.warns(UserWarning, match="_metadata cannot be stored as JSON"):
        zerockpt.save(sd, path)
    assert type(zerockpt.load(path)) is dict


def test_tied_parameters_are_saved_once_and_loaded_tied(tmp_path: Path) -> None:
    model = nn.Module()
    model.embed = nn.Embedding(10, 4)
    model.head = nn.Linear(4, 10, bias=False)
    model.head.weight = model.embed.weight
    path = tmp_path / "m.safetensors"
    zerockpt.save(model, path)
    loaded = zerockpt.load(path)
    assert list(loaded) == ["embed.weight", "head.weight"]
    assert loaded["embed.weight"] is loaded["head.weight"]


def test_load_state_dict_from_saved_module_uses_metadata(tmp_path: Path) -> None:
    # BatchNorm (version 2) fills num_batches_tracked only for old versions: with the stored
    # _metadata the key is reported missing, exactly as with the in-memory state dict.
    model = _model()
    sd = model.state_dict()
    del sd["1.num_batches_tracked"]
    path = tmp_path / "m.safetensors"
    zerockpt.save(sd, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = _model().load_state_dict(sd, strict=False)
        got = zerockpt.load_state_dict(_model(), path, strict=False)
    assert got == expected
    assert got.missing_keys == ["1.num_batches_tracked"]
