"""Hugging Face ``transformers.Trainer`` checkpoints written by zerockpt: no pickle anywhere.

The stock Trainer writes the model with safetensors but the rest of a checkpoint with
``torch.save`` (pickle): ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``, ``rng_state.pth``
and ``training_args.bin``. :class:`ZerockptTrainer` (or :class:`ZerockptTrainerMixin` in front
of any Trainer subclass) writes them as zerockpt files instead, and resumes from them with
``trainer.train(resume_from_checkpoint=...)`` without ``torch.load``::

    from zerockpt.transformers import ZerockptTrainer

    trainer = ZerockptTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()                                     # checkpoint-*/ written by zerockpt
    trainer.train(resume_from_checkpoint=True)          # resumes bitwise

A checkpoint folder then holds ``model.safetensors`` (the Trainer's own ``save_pretrained``),
``optimizer.safetensors``, ``scheduler.safetensors``, ``scaler.safetensors`` (with mixed
precision), ``rng_state.safetensors`` (``rng_state_<process>.safetensors`` for several
processes), ``trainer_state.json`` and ``training_args.json`` (the arguments as JSON, where the
stock Trainer pickles them to ``training_args.bin``). Each zerockpt file is nested state
(:func:`zerockpt.save`): tensors in safetensors, the rest as JSON; the Python, numpy, torch and
CUDA generator states come back exactly.

Setups whose state the Trainer hands to another library keep the stock files: DeepSpeed,
FSDP, SageMaker model parallelism and TPUs (XLA); the RNG states on NPU, HPU, MLU and MUSA.
A folder written by the stock Trainer still resumes (through the stock code).

This module hooks Trainer methods that are not public API (``_save_optimizer_and_scheduler``,
``_load_optimizer_and_scheduler``, ``_save_scaler``, ``_load_scaler``, ``_save_rng_state``,
``_load_rng_state`` and ``_save``); :data:`TRANSFORMERS_REQUIREMENT` is the range tested, and
:class:`ZerockptTrainer` checks that the hooked methods exist with the expected parameters.
Install with ``pip install zerockpt[transformers]``.

Example:
    >>> import transformers
    >>> from zerockpt.transformers import OPTIMIZER_NAME, ZerockptTrainer
    >>> issubclass(ZerockptTrainer, transformers.Trainer), OPTIMIZER_NAME
    (True, 'optimizer.safetensors')
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import random
import tempfile
from typing import Any

import torch

import zerockpt
from zerockpt import _extras

__all__ = [
    "HOOKED_METHODS",
    "OPTIMIZER_NAME",
    "RNG_STATE_NAME",
    "SCALER_NAME",
    "SCHEDULER_NAME",
    "TRAINING_ARGS_NAME",
    "TRANSFORMERS_REQUIREMENT",
    "ZerockptTrainer",  # noqa: F822  (made by __getattr__ on first use)
    "ZerockptTrainerMixin",
    "check_trainer",
]

# The transformers versions this module is tested with (the ``transformers`` extra).
TRANSFORMERS_REQUIREMENT = "transformers>=5,<6"

OPTIMIZER_NAME = "optimizer.safetensors"
SCHEDULER_NAME = "scheduler.safetensors"
SCALER_NAME = "scaler.safetensors"
RNG_STATE_NAME = "rng_state.safetensors"
TRAINING_ARGS_NAME = "training_args.json"
# What the stock Trainer pickles the arguments to; replaced by TRAINING_ARGS_NAME.
_STOCK_TRAINING_ARGS_NAME = "training_args.bin"

# Trainer methods overridden here, and the parameters each override relies on.
HOOKED_METHODS: dict[str, tuple[str, ...]] = {
    "_save_optimizer_and_scheduler": ("self", "output_dir"),
    "_load_optimizer_and_scheduler": ("self", "checkpoint"),
    "_save_scaler": ("self", "output_dir"),
    "_load_scaler": ("self", "checkpoint"),
    "_save_rng_state": ("self", "output_dir"),
    "_load_rng_state": ("self", "checkpoint"),
    "_save": ("self", "output_dir", "state_dict"),
}


def _import(name: str) -> Any:
    """The real library ``name``, or an ImportError naming the extra."""
    return _extras.import_extra(
        name,
        user="zerockpt.transformers",
        requirement=TRANSFORMERS_REQUIREMENT,
        extra="transformers",
    )


def _hooked_method(trainer_class: type, name: str) -> Any:
    """The method ``name`` that an override in ZerockptTrainerMixin calls through ``super()``."""
    mro = trainer_class.__mro__
    after = mro.index(ZerockptTrainerMixin) + 1 if ZerockptTrainerMixin in mro else 0
    for klass in mro[after:]:
        if name in vars(klass):
            return vars(klass)[name]
    return None


def check_trainer(trainer_class: type) -> None:
    """Raises ImportError unless ``trainer_class`` has every hooked method, as this module expects.

    The hooked methods are Trainer internals: a transformers release that renamed one or
    changed its parameters would otherwise bring back ``torch.save`` files, or break resuming.
    For a class with :class:`ZerockptTrainerMixin` among its bases, the methods checked are
    those after the mixin (the ones its overrides call).

    Args:
        trainer_class: ``transformers.Trainer`` or a subclass.

    Raises:
        ImportError: A hooked method is missing or takes other parameters (the message names
            it and the transformers version), or transformers is not installed.

    Example:
        >>> import transformers
        >>> from zerockpt.transformers import check_trainer
        >>> check_trainer(transformers.Trainer)  # None: every hooked method is there
    """
    for name, expected in HOOKED_METHODS.items():
        method = _hooked_method(trainer_class, name)
        if method is None:
            problem = "has no such method"
        else:
            found = tuple(inspect.signature(method).parameters)
            if found == expected:
                continue
            problem = f"takes {found}, not {expected}"
        version = getattr(_import("transformers"), "__version__", "?")
        raise ImportError(
            f"zerockpt.transformers cannot hook {trainer_class.__qualname__}.{name}: it {problem} "
            f"in transformers {version}; zerockpt supports {TRANSFORMERS_REQUIREMENT!r}"
        )


def _write_text(path: str, text: str) -> None:
    """Writes a small text file atomically: a temporary name in its folder, fsync, rename."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=".zerockpt-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


class ZerockptTrainerMixin:
    """Put first among a Trainer (subclass)'s bases, to write its checkpoints with zerockpt.

    ``class MyTrainer(ZerockptTrainerMixin, SFTTrainer): ...``. :class:`ZerockptTrainer` is
    ``ZerockptTrainerMixin`` on ``transformers.Trainer``. See the module's documentation for the
    files and the setups that keep the stock ones. Making the class checks the hooked methods
    (:func:`check_trainer`).

    Example:
        >>> import transformers
        >>> from zerockpt.transformers import ZerockptTrainerMixin
        >>> class MyTrainer(ZerockptTrainerMixin, transformers.Trainer):
        ...     pass
        >>> MyTrainer._save_rng_state is ZerockptTrainerMixin._save_rng_state
        True
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_trainer(cls)

    # Which parts this mixin writes, and which it leaves to the stock Trainer.
    def _zerockpt_writes_optimizer(self) -> bool:
        trainer: Any = self
        utils = _import("transformers.utils")
        return not (
            trainer.is_deepspeed_enabled
            or trainer.is_fsdp_enabled
            or utils.is_torch_xla_available()
            or utils.is_sagemaker_mp_enabled()
        )

    def _zerockpt_writes_rng(self) -> bool:
        utils = _import("transformers.utils")
        others = (
            "is_torch_xla_available",
            "is_torch_npu_available",
            "is_torch_hpu_available",
            "is_torch_mlu_available",
            "is_torch_musa_available",
        )
        return not any(getattr(utils, name, lambda: False)() for name in others)

    def _zerockpt_rng_name(self) -> str:
        args: Any = self.args  # type: ignore[attr-defined]
        if args.world_size <= 1:
            return RNG_STATE_NAME
        return f"rng_state_{args.process_index}.safetensors"

    # Saving.
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        trainer: Any = self
        if not self._zerockpt_writes_optimizer():
            super()._save_optimizer_and_scheduler(output_dir)  # type: ignore[misc]
            return
        if trainer.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            zerockpt.save(trainer.optimizer.state_dict(), os.path.join(output_dir, OPTIMIZER_NAME))
            zerockpt.save(
                trainer.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME)
            )

    def _save_scaler(self, output_dir: str) -> None:
        trainer: Any = self
        scaler = getattr(trainer.accelerator, "scaler", None)
        if scaler is None:
            return
        if _import("transformers.utils").is_torch_xla_available():
            super()._save_scaler(output_dir)  # type: ignore[misc]
            return
        if trainer.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            zerockpt.save(scaler.state_dict(), os.path.join(output_dir, SCALER_NAME))

    def _save_rng_state(self, output_dir: str) -> None:
        trainer: Any = self
        if not self._zerockpt_writes_rng():
            super()._save_rng_state(output_dir)  # type: ignore[misc]
            return
        np = importlib.import_module("numpy")
        states: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "cpu": torch.random.get_rng_state(),
        }
        if torch.cuda.is_available():
            if _distributed(trainer):
                states["cuda"] = torch.cuda.random.get_rng_state_all()
            else:
                states["cuda"] = torch.cuda.random.get_rng_state()
        # A process can get here before process 0 has saved the model and made the folder.
        os.makedirs(output_dir, exist_ok=True)
        zerockpt.save(states, os.path.join(output_dir, self._zerockpt_rng_name()))

    def _save(
        self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None
    ) -> None:
        trainer: Any = self
        super()._save(output_dir, state_dict)  # type: ignore[misc]
        if not trainer.args.should_save:
            return
        folder = output_dir if output_dir is not None else trainer.args.output_dir
        # The stock Trainer pickles the arguments (torch.save); keep them as JSON instead.
        _write_text(os.path.join(folder, TRAINING_ARGS_NAME), trainer.args.to_json_string())
        pickled = os.path.join(folder, _STOCK_TRAINING_ARGS_NAME)
        if os.path.isfile(pickled):
            os.remove(pickled)

    # Loading: zerockpt files when the folder has them, else the stock files (stock code).
    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        trainer: Any = self
        if checkpoint is None:
            return
        optimizer_file = os.path.join(checkpoint, OPTIMIZER_NAME)
        scheduler_file = os.path.join(checkpoint, SCHEDULER_NAME)
        if not (
            self._zerockpt_writes_optimizer()
            and os.path.isfile(optimizer_file)
            and os.path.isfile(scheduler_file)
        ):
            super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
            return
        # As the stock Trainer: onto the CPU with one process (optimizer.load_state_dict moves
        # each state to its parameter's device), onto the process's device with several.
        device = trainer.args.device
        on_device = trainer.args.world_size > 1 and device.type != "cpu"
        optimizer_state = zerockpt.load(
            optimizer_file, device=device if on_device else "cpu", mmap=False
        )
        trainer.optimizer.load_state_dict(optimizer_state)
        trainer.lr_scheduler.load_state_dict(zerockpt.load(scheduler_file, mmap=False))

    def _load_scaler(self, checkpoint: str | None) -> None:
        trainer: Any = self
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, SCALER_NAME)
        if not os.path.isfile(path) or _import("transformers.utils").is_torch_xla_available():
            super()._load_scaler(checkpoint)  # type: ignore[misc]
            return
        scaler = getattr(trainer.accelerator, "scaler", None)
        if scaler is None:
            raise ValueError(
                f"{path} holds a gradient scaler's state, but this Trainer has no scaler "
                "(it was saved with fp16 mixed precision)"
            )
        scaler.load_state_dict(zerockpt.load(path, mmap=False))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        trainer: Any = self
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, self._zerockpt_rng_name())
        if not os.path.isfile(path):  # a stock folder (rng_state.pth), or none at all
            super()._load_rng_state(checkpoint)  # type: ignore[misc]
            return
        states: Any = zerockpt.load(path, mmap=False)
        for key in ("python", "numpy", "cpu"):
            if key not in states:
                raise ValueError(f"{path} has no {key!r} generator state; it is not an RNG file")
        random.setstate(states["python"])
        importlib.import_module("numpy").random.set_state(states["numpy"])
        torch.random.set_rng_state(states["cpu"])
        if "cuda" in states and torch.cuda.is_available():
            if _distributed(trainer):
                torch.cuda.random.set_rng_state_all(states["cuda"])
            else:
                torch.cuda.random.set_rng_state(states["cuda"])


def _distributed(trainer: Any) -> bool:
    parallel_mode = _import("transformers.training_args").ParallelMode
    return bool(trainer.args.parallel_mode == parallel_mode.DISTRIBUTED)


_trainer_class: type | None = None
_TRAINER_DOC = """``transformers.Trainer`` whose checkpoints zerockpt writes.

    It takes ``transformers.Trainer``'s arguments; see :mod:`zerockpt.transformers` for the files.

    Example:
        >>> import transformers
        >>> from zerockpt.transformers import ZerockptTrainer
        >>> config = transformers.GPT2Config(
        ...     vocab_size=16, n_positions=4, n_embd=8, n_layer=1, n_head=2
        ... )
        >>> sample = {"input_ids": torch.arange(4), "labels": torch.arange(4)}
        >>> args = transformers.TrainingArguments(
        ...     "run", max_steps=1, save_steps=1, per_device_train_batch_size=2, use_cpu=True,
        ...     report_to=[], logging_strategy="no", disable_tqdm=True
        ... )
        >>> model = transformers.GPT2LMHeadModel(config)
        >>> trainer = ZerockptTrainer(model=model, args=args, train_dataset=[sample] * 2)
        >>> _ = trainer.train()
        {...}
        >>> import os
        >>> names = set(os.listdir("run/checkpoint-1"))
        >>> sorted(n for n in names if n.endswith(".safetensors"))
        ['model.safetensors', 'optimizer.safetensors', 'rng_state.safetensors',
         'scheduler.safetensors']
        >>> "training_args.json" in names, "optimizer.pt" in names
        (True, False)
    """


def __getattr__(name: str) -> Any:
    # ZerockptTrainer is built on first use, so that importing this module needs no transformers.
    global _trainer_class
    if name == "ZerockptTrainer":
        if _trainer_class is None:
            base = _import("transformers").Trainer
            _trainer_class = type(
                "ZerockptTrainer",
                (ZerockptTrainerMixin, base),
                {
                    "__module__": __name__,
                    "__qualname__": "ZerockptTrainer",
                    "__doc__": _TRAINER_DOC,
                },
            )
        return _trainer_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "ZerockptTrainer"})
