"""Hugging Face Accelerate's ``save_state`` / ``load_state``, written by zerockpt: no pickle.

``Accelerator.save_state`` writes the models with safetensors but the optimizers, schedulers,
gradient scaler, RNG states, samplers and objects registered with ``register_for_checkpointing``
with ``torch.save`` (pickle; custom objects are even loaded with ``weights_only=False``).
:func:`save_state` and :func:`load_state` cover the same state, all in zerockpt files::

    import zerockpt.accelerate

    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    zerockpt.accelerate.save_state(accelerator, "ckpt")
    ...
    zerockpt.accelerate.load_state(accelerator, "ckpt")    # bitwise the saved state

The folder holds ``model.safetensors`` (``model_<i>.safetensors`` for the i-th prepared model),
``optimizer.safetensors``, ``scheduler.safetensors`` (``_<i>`` likewise), ``scaler.safetensors``
(with fp16 mixed precision), ``random_states_<process>.safetensors`` (Python, numpy, torch and
accelerator generators, and ``accelerator.step``), ``custom_checkpoint_<i>.safetensors`` for
registered objects, ``dataloader[_<i>].safetensors`` for the prepared data loaders' epoch
counters and seedable samplers, and ``dl_state_dict[_<i>].safetensors`` for stateful data
loaders. The model files are plain safetensors.

Hooks registered with ``register_save_state_pre_hook`` and ``register_load_state_pre_hook`` run
as in ``Accelerator.save_state`` / ``load_state``. DeepSpeed, FSDP, Megatron-LM and TPU (XLA)
setups keep their own formats: use the Accelerator's methods there (these raise ValueError).

This module reads Accelerator attributes that are not public API (``_models``,
``_optimizers``, ``_schedulers``, ``_dataloaders``, ``_custom_objects`` and the hook
registries); :data:`ACCELERATE_REQUIREMENT` is the range tested, and every call checks that
they exist. Install with ``pip install zerockpt[accelerate]``.

Example:
    >>> from accelerate import Accelerator
    >>> import zerockpt.accelerate
    >>> accelerator = Accelerator(cpu=True)
    >>> model = accelerator.prepare(torch.nn.Linear(2, 1))
    >>> folder = zerockpt.accelerate.save_state(accelerator, "ckpt")
    >>> import os
    >>> sorted(os.listdir(folder))
    ['model.safetensors', 'random_states_0.safetensors']
"""

from __future__ import annotations

import importlib
import logging
import os
import random
from typing import Any

import torch

import zerockpt
from zerockpt import _extras

__all__ = ["ACCELERATE_REQUIREMENT", "load_state", "save_state"]

logger = logging.getLogger(__name__)

# The accelerate versions this module is tested with (the ``accelerate`` extra).
ACCELERATE_REQUIREMENT = "accelerate>=1.0,<2"

# Accelerator attributes read here.
ACCELERATOR_ATTRIBUTES = (
    "_models",
    "_optimizers",
    "_schedulers",
    "_dataloaders",
    "_custom_objects",
    "_save_model_state_pre_hook",
    "_load_model_state_pre_hook",
    "scaler",
    "step",
    "distributed_type",
    "project_configuration",
)


def _import(name: str) -> Any:
    """The real library ``name``, or an ImportError naming the extra."""
    return _extras.import_extra(
        name, user="zerockpt.accelerate", requirement=ACCELERATE_REQUIREMENT, extra="accelerate"
    )


def _indexed(stem: str, i: int) -> str:
    return f"{stem}.safetensors" if i == 0 else f"{stem}_{i}.safetensors"


def _check(accelerator: Any, what: str) -> None:
    missing = [a for a in ACCELERATOR_ATTRIBUTES if not hasattr(accelerator, a)]
    if missing:
        version = getattr(_import("accelerate"), "__version__", "?")
        raise TypeError(
            f"zerockpt.accelerate.{what} needs an accelerate.Accelerator with the attributes "
            f"{missing} (accelerate {version}; zerockpt supports {ACCELERATE_REQUIREMENT!r})"
        )
    kind = _import("accelerate.utils").DistributedType
    own_formats = (kind.DEEPSPEED, kind.FSDP, kind.MEGATRON_LM, kind.XLA)
    if accelerator.distributed_type in own_formats:
        raise ValueError(
            f"zerockpt.accelerate.{what} does not handle {accelerator.distributed_type} "
            f"(it keeps its own checkpoint format): use accelerator.{what}"
        )


def _sampler(dataloader: Any) -> Any:
    """A data loader's seedable sampler (whose epoch and seed are state), else None."""
    seedable = _import("accelerate.data_loader").SeedableRandomSampler
    get_sampler = getattr(dataloader, "get_sampler", None)
    sampler = get_sampler() if get_sampler is not None else None
    return sampler if isinstance(sampler, seedable) else None


def _loader_position(dataloader: Any) -> dict[str, int]:
    """Where a prepared data loader is in its epochs: what its next shuffle depends on.

    Its ``iteration`` (the epoch it sets on its sampler and dataset when an iteration starts)
    and, for a seedable sampler, the sampler's epoch and seed.
    """
    position: dict[str, int] = {}
    if isinstance(getattr(dataloader, "iteration", None), int):
        position["iteration"] = dataloader.iteration
    sampler = _sampler(dataloader)
    if sampler is not None:
        position["epoch"] = sampler.epoch
        position["initial_seed"] = sampler.initial_seed
    return position


def _set_loader_position(dataloader: Any, position: Any) -> None:
    if "iteration" in position:
        dataloader.iteration = position["iteration"]
    sampler = _sampler(dataloader)
    if sampler is not None and "epoch" in position:
        sampler.epoch = position["epoch"]
        sampler.initial_seed = position["initial_seed"]


def _rng_states(step: int) -> dict[str, Any]:
    np = importlib.import_module("numpy")
    states: dict[str, Any] = {
        "step": step,
        "random_state": random.getstate(),
        "numpy_random_seed": np.random.get_state(),
        "torch_manual_seed": torch.get_rng_state(),
    }
    device_type, module = _import("accelerate.utils").get_torch_accelerator_backend()
    if device_type is not None:
        key = f"torch_{device_type}_manual_seed"
        if module is torch.accelerator or device_type == "mps":
            states[key] = torch.get_device_module(device_type).get_rng_state()
        else:
            states[key] = module.get_rng_state_all()
    return states


def _set_rng_states(states: Any, path: str) -> None:
    for key in ("random_state", "numpy_random_seed", "torch_manual_seed"):
        if key not in states:
            raise ValueError(f"{path} has no {key!r}: it is not a random-states file")
    random.setstate(states["random_state"])
    importlib.import_module("numpy").random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    device_type, module = _import("accelerate.utils").get_torch_accelerator_backend()
    key = f"torch_{device_type}_manual_seed"
    if device_type is not None and key in states:
        if module is torch.accelerator or device_type == "mps":
            torch.get_device_module(device_type).set_rng_state(states[key])
        else:
            module.set_rng_state_all(states[key])


def save_state(accelerator: Any, output_dir: str | os.PathLike[str]) -> str:
    """Saves what ``accelerator.save_state(output_dir)`` saves, every file written by zerockpt.

    The models (as ``accelerator.get_state_dict(model, unwrap=False)``), optimizers,
    schedulers, gradient scaler, RNG states and ``accelerator.step``, the prepared data
    loaders' epoch counters (``iteration``) and seedable samplers' epoch and seed (accelerate
    keeps neither), stateful data loaders' state, and the objects registered with
    ``register_for_checkpointing``. Save-state pre hooks run first, as in accelerate. The main
    process writes the shared files (with ``save_on_each_node``, the main process of each
    node); every process writes its RNG states. Each file is written atomically.

    Args:
        accelerator: The ``accelerate.Accelerator`` the objects were prepared with.
        output_dir: The folder (created if missing); files of the same names are replaced.

    Returns:
        The folder, as a str.

    Raises:
        TypeError: ``accelerator`` is not an Accelerator this module knows, or a state holds a
            value zerockpt cannot store (a registered object's ``state_dict()`` must be nested
            state: tensors, numbers, strings, containers...); the message names its path.
        ValueError: A DeepSpeed, FSDP, Megatron-LM or XLA setup (use ``accelerator.save_state``).
        ImportError: accelerate is not installed (``pip install zerockpt[accelerate]``).

    Example:
        >>> from accelerate import Accelerator
        >>> import zerockpt.accelerate
        >>> accelerator = Accelerator(cpu=True)
        >>> model = torch.nn.Linear(2, 1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> model, optimizer = accelerator.prepare(model, optimizer)
        >>> zerockpt.accelerate.save_state(accelerator, "ckpt")
        'ckpt'
        >>> import os
        >>> sorted(os.listdir("ckpt"))
        ['model.safetensors', 'optimizer.safetensors', 'random_states_0.safetensors']
    """
    _check(accelerator, "save_state")
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    weights = [accelerator.get_state_dict(m, unwrap=False) for m in accelerator._models]
    for hook in list(accelerator._save_model_state_pre_hook.values()):
        hook(accelerator._models, weights, output_dir)

    config = accelerator.project_configuration
    writes = (
        accelerator.is_local_main_process
        if config.save_on_each_node
        else accelerator.is_main_process
    )
    if writes:
        for i, state in enumerate(weights):
            # model.safetensors, model_1.safetensors: the names (and format) accelerate uses.
            zerockpt.save(state, os.path.join(output_dir, _indexed("model", i)))
        for i, optimizer in enumerate(accelerator._optimizers):
            zerockpt.save(
                optimizer.state_dict(), os.path.join(output_dir, _indexed("optimizer", i))
            )
        for i, scheduler in enumerate(accelerator._schedulers):
            zerockpt.save(
                scheduler.state_dict(), os.path.join(output_dir, _indexed("scheduler", i))
            )
        for i, dataloader in enumerate(accelerator._dataloaders):
            position = _loader_position(dataloader)
            if position:
                zerockpt.save(position, os.path.join(output_dir, _indexed("dataloader", i)))
            if getattr(dataloader, "use_stateful_dataloader", False):
                zerockpt.save(
                    dataloader.state_dict(), os.path.join(output_dir, _indexed("dl_state_dict", i))
                )
        if accelerator.scaler is not None:
            zerockpt.save(
                accelerator.scaler.state_dict(), os.path.join(output_dir, "scaler.safetensors")
            )
        for i, obj in enumerate(accelerator._custom_objects):
            zerockpt.save(
                obj.state_dict(), os.path.join(output_dir, f"custom_checkpoint_{i}.safetensors")
            )
    process = accelerator.process_index
    zerockpt.save(
        _rng_states(accelerator.step),
        os.path.join(output_dir, f"random_states_{process}.safetensors"),
    )
    config.iteration += 1
    return output_dir


def _require(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing: the folder was not written by zerockpt.accelerate.save_state "
            "with the same prepared objects"
        )
    return path


def load_state(accelerator: Any, input_dir: str | os.PathLike[str], *, strict: bool = True) -> None:
    """Loads what :func:`save_state` saved into the accelerator's prepared objects.

    As ``accelerator.load_state(input_dir)``: load-state pre hooks run first (and may take
    models off the list they get), the models are loaded in place, the optimizers' states onto
    the CPU (``load_state_dict`` moves each to its parameter's device), then the schedulers,
    the data loaders' positions and states, the scaler, the objects registered with
    ``register_for_checkpointing`` and this process's RNG states and ``accelerator.step``. A
    folder without this process's random-states file (saved with fewer processes) leaves the
    generators as they are, with a warning. Nothing is unpickled: ``torch.load`` is never
    called.

    Args:
        accelerator: The ``accelerate.Accelerator`` the objects were prepared with.
        input_dir: A folder written by :func:`save_state`.
        strict: As ``load_state_dict``'s: every model key must be in its file and vice versa.

    Raises:
        FileNotFoundError: ``input_dir`` is not a folder, or a file for a prepared object is
            missing from it.
        ValueError: The folder holds another number of custom checkpoints than objects are
            registered, an RNG file lacks a generator, or a DeepSpeed, FSDP, Megatron-LM or
            XLA setup (use ``accelerator.load_state``).
        TypeError: ``accelerator`` is not an Accelerator this module knows.
        RuntimeError: A model's keys or shapes do not match its file (``load_state_dict``).
        zerockpt.FormatError: A file is not a valid zerockpt / safetensors file.
        ImportError: accelerate is not installed (``pip install zerockpt[accelerate]``).

    Example:
        >>> from accelerate import Accelerator
        >>> import zerockpt.accelerate
        >>> accelerator = Accelerator(cpu=True)
        >>> model = accelerator.prepare(torch.nn.Linear(2, 1))
        >>> _ = zerockpt.accelerate.save_state(accelerator, "ckpt")
        >>> _ = model.weight.data.zero_()
        >>> zerockpt.accelerate.load_state(accelerator, "ckpt")
        >>> bool(model.weight.abs().sum() > 0)
        True
    """
    _check(accelerator, "load_state")
    input_dir = os.fspath(os.path.expanduser(input_dir))
    if not os.path.isdir(input_dir):
        raise FileNotFoundError(f"{input_dir} is not a folder (of zerockpt.accelerate.save_state)")
    registered = accelerator._custom_objects
    found = sorted(
        name
        for name in os.listdir(input_dir)
        if name.startswith("custom_checkpoint_") and name.endswith(".safetensors")
    )
    if len(found) != len(registered):
        raise ValueError(
            f"{input_dir} holds {len(found)} custom checkpoints ({found}) but "
            f"{len(registered)} objects are registered for checkpointing"
        )
    models = list(accelerator._models)
    for hook in list(accelerator._load_model_state_pre_hook.values()):
        hook(models, input_dir)

    def path(name: str) -> str:
        return _require(os.path.join(input_dir, name))

    for i, model in enumerate(models):
        zerockpt.load_state_dict(model, path(_indexed("model", i)), strict=strict)
    for i, optimizer in enumerate(accelerator._optimizers):
        optimizer.load_state_dict(zerockpt.load(path(_indexed("optimizer", i)), mmap=False))
    for i, scheduler in enumerate(accelerator._schedulers):
        scheduler.load_state_dict(zerockpt.load(path(_indexed("scheduler", i)), mmap=False))
    for i, dataloader in enumerate(accelerator._dataloaders):
        if _loader_position(dataloader):
            _set_loader_position(dataloader, zerockpt.load(path(_indexed("dataloader", i))))
        if getattr(dataloader, "use_stateful_dataloader", False):
            stateful = os.path.join(input_dir, _indexed("dl_state_dict", i))
            if os.path.isfile(stateful):
                dataloader.load_state_dict(zerockpt.load(stateful, mmap=False))
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(zerockpt.load(path("scaler.safetensors"), mmap=False))
    for i, obj in enumerate(registered):
        obj.load_state_dict(zerockpt.load(path(f"custom_checkpoint_{i}.safetensors"), mmap=False))
    rng_file = os.path.join(input_dir, f"random_states_{accelerator.process_index}.safetensors")
    if not os.path.isfile(rng_file):
        logger.warning("%s is missing: the random generators are left as they are", rng_file)
        return
    states: Any = zerockpt.load(rng_file, mmap=False)
    _set_rng_states(states, rng_file)
    if "step" in states:
        accelerator.step = states["step"]
