"""Hooks that change the module tree while zerockpt walks it: the same result or the same error
as torch's own state_dict() / load_state_dict() (oracle: torch on an identical model)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import zerockpt
from torch import nn


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)))


def _linear(i: int, o: int) -> nn.Linear:
    """Made inside hooks: the same weights for ours and torch's model."""
    with torch.random.fork_rng(devices=[]):  # the CPU generator only (whatever accelerator)
        torch.manual_seed(1)
        return nn.Linear(i, o)


# Each mutation installs hooks on a fresh model that change its tree during a walk.
Mutation = Callable[[nn.Module], None]


def _child_pre_hook_adds_to_parent(m: nn.Module) -> None:
    parent, child = m[1], m[1][0]
    child.register_state_dict_pre_hook(
        lambda mod, prefix, keep_vars: parent.add_module("extra", _linear(1, 1))
    )


def _child_post_hook_removes_sibling(m: nn.Module) -> None:
    parent, child = m[1], m[1][0]

    def hook(mod: nn.Module, sd: Any, prefix: str, local_metadata: Any) -> None:
        if "1" in parent._modules:
            del parent._modules["1"]

    child.register_state_dict_post_hook(hook)


def _own_pre_hook_adds_child_and_parameter(m: nn.Module) -> None:
    def hook(mod: nn.Module, prefix: str, keep_vars: bool) -> None:
        if not hasattr(mod, "late"):
            mod.add_module("late", _linear(1, 2))
            mod.register_parameter("scale", nn.Parameter(torch.full((2,), 3.0)))

    m[1].register_state_dict_pre_hook(hook)


def _own_pre_hook_removes_child_and_buffer(m: nn.Module) -> None:
    m[1].register_buffer("steps", torch.tensor(4))

    def hook(mod: nn.Module, prefix: str, keep_vars: bool) -> None:
        mod._modules.pop("0", None)
        mod._buffers.pop("steps", None)

    m[1].register_state_dict_pre_hook(hook)


def _post_hook_adds_buffer_to_parent(m: nn.Module) -> None:
    parent = m

    def hook(mod: nn.Module, sd: Any, prefix: str, local_metadata: Any) -> None:
        parent.register_buffer(f"b{len(parent._buffers)}", torch.ones(1))

    m[1][1].register_state_dict_post_hook(hook)


STATE_DICT_MUTATIONS: dict[str, Mutation] = {
    "child pre-hook adds to parent": _child_pre_hook_adds_to_parent,
    "child post-hook removes sibling": _child_post_hook_removes_sibling,
    "own pre-hook adds child and parameter": _own_pre_hook_adds_child_and_parameter,
    "own pre-hook removes child and buffer": _own_pre_hook_removes_child_and_buffer,
    "post-hook adds buffer to parent": _post_hook_adds_buffer_to_parent,
}


def _outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except Exception as e:  # compared with torch's, type and message
        return type(e).__name__, str(e)


def _same(ours: tuple[str, Any], theirs: tuple[str, Any]) -> None:
    assert ours[0] == theirs[0], (ours, theirs)
    if ours[0] != "ok":
        assert ours[1] == theirs[1]
        return
    a, b = ours[1], theirs[1]
    assert list(a) == list(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key])


@pytest.mark.parametrize("mutation", STATE_DICT_MUTATIONS)
def test_state_dict_hooks_that_change_the_tree(mutation: str) -> None:
    ours_model, theirs_model = _model(), _model()
    STATE_DICT_MUTATIONS[mutation](ours_model)
    STATE_DICT_MUTATIONS[mutation](theirs_model)
    ours = _outcome(lambda: zerockpt.state_dict(ours_model))
    theirs = _outcome(lambda: theirs_model.state_dict())
    _same(ours, theirs)
    if mutation.startswith("child"):
        assert theirs == ("RuntimeError", "dictionary changed size during iteration")
    # Both trees were changed the same way.
    assert [n for n, _ in ours_model.named_modules()] == [
        n for n, _ in theirs_model.named_modules()
    ]


def _load_child_pre_hook_adds_to_parent(m: nn.Module) -> None:
    parent = m[1]
    m[1][0].register_load_state_dict_pre_hook(
        lambda *args: parent.add_module("extra", _linear(1, 1))
    )


def _load_own_pre_hook_adds_child(m: nn.Module) -> None:
    def hook(mod: nn.Module, *args: Any) -> None:
        if not hasattr(mod, "late"):
            mod.add_module("late", _linear(1, 2))

    m[1].register_load_state_dict_pre_hook(hook)


def _load_post_hook_removes_sibling(m: nn.Module) -> None:
    parent = m[1]

    def hook(mod: nn.Module, incompatible: Any) -> None:
        parent._modules.pop("1", None)

    m[1][0].register_load_state_dict_post_hook(hook)


def _load_pre_hook_removes_own_parameter(m: nn.Module) -> None:
    def hook(mod: nn.Module, *args: Any) -> None:
        mod._parameters.pop("bias", None)

    m[0].register_load_state_dict_pre_hook(hook)


LOAD_MUTATIONS: dict[str, Mutation] = {
    "child pre-hook adds to parent": _load_child_pre_hook_adds_to_parent,
    "own pre-hook adds child": _load_own_pre_hook_adds_child,
    "child post-hook removes sibling": _load_post_hook_removes_sibling,
    "pre-hook removes own parameter": _load_pre_hook_removes_own_parameter,
}


@pytest.mark.parametrize("source", ["dict", "file"])
@pytest.mark.parametrize("mutation", LOAD_MUTATIONS)
def test_load_state_dict_hooks_that_change_the_tree(
    tmp_path: Any, mutation: str, source: str
) -> None:
    state = {k: v + 1 for k, v in _model().state_dict().items()}
    state["1.late.weight"] = torch.full((2, 1), 5.0)
    state["1.late.bias"] = torch.full((2,), 6.0)
    path = tmp_path / "m.safetensors"
    zerockpt.save(state, path)
    ours_model, theirs_model = _model(), _model()
    LOAD_MUTATIONS[mutation](ours_model)
    LOAD_MUTATIONS[mutation](theirs_model)

    def summary(result: Any, model: nn.Module) -> dict[str, Any]:
        out = {f"missing:{k}": torch.zeros(()) for k in result.missing_keys}
        out.update({f"unexpected:{k}": torch.zeros(()) for k in result.unexpected_keys})
        out.update(model.state_dict())
        return out

    ours = _outcome(
        lambda: summary(
            zerockpt.load_state_dict(
                ours_model, dict(state) if source == "dict" else path, strict=False
            ),
            ours_model,
        )
    )
    theirs = _outcome(
        lambda: summary(theirs_model.load_state_dict(dict(state), strict=False), theirs_model)
    )
    _same(ours, theirs)
    if "child" in mutation and mutation != "own pre-hook adds child":
        assert theirs == ("RuntimeError", "dictionary changed size during iteration")


class _DropsOnExtraState(nn.Module):
    """set_extra_state drops the parameters torch's loader already collected."""

    def __init__(self) -> None:
        super().__init__()
        for i in range(3):
            self.register_parameter("p" + str(1000 + i), nn.Parameter(torch.full((2,), float(i))))

    def get_extra_state(self) -> Any:
        return torch.tensor(1)

    def set_extra_state(self, state: Any) -> None:
        for name in list(self._parameters):
            del self._parameters[name]


@pytest.mark.parametrize("source", ["dict", "file"])
def test_set_extra_state_that_drops_parameters(tmp_path: Any, source: str) -> None:
    state = {k: v + 1 for k, v in _DropsOnExtraState().state_dict().items()}
    state["p1001"] = state["p1001"].clone()
    path = tmp_path / "m.safetensors"
    zerockpt.save(state, path)
    ours_model, theirs_model = _DropsOnExtraState(), _DropsOnExtraState()
    ours = zerockpt.load_state_dict(ours_model, dict(state) if source == "dict" else path)
    theirs = theirs_model.load_state_dict(dict(state))
    assert ours == theirs
    assert list(ours_model._parameters) == list(theirs_model._parameters) == []
