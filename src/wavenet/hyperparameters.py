"""The model's hyperparameters, checked without torch: by `WaveNet` and `WaveNetModule` as they are made, and by
`train.py` on the composed config before torch loads, so that `model.lr=-1` is answered in a second."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping


def check_network(settings: Mapping[str, object]) -> None:
    """Raises ValueError naming the first of `WaveNet`'s arguments in `settings` that it cannot be built with;
    arguments not given are not checked."""
    for least, names in (
        (1, ("layers", "stacks", "residual_channels", "dilation_channels", "skip_channels")),
        (2, ("kernel_size", "quantization_channels")),
    ):
        for name in names:
            value = settings.get(name, least)
            # numbers.Integral, not int: numpy's integers (a sweep over np.arange) are integers too.
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise ValueError(f"{name} must be an integer of at least {least}, got {value!r}")
    layers, stacks = settings.get("layers", 1), settings.get("stacks", 1)
    if layers % stacks:
        raise ValueError(f"layers ({layers}) must be a multiple of stacks ({stacks})")
    for name in ("bias", "checkpoint_activations"):
        if not isinstance(settings.get(name, False), bool):  # "no" and 0 would pass for true and false where tested
            raise ValueError(f"{name} must be true or false, got {settings[name]!r}")


def check_training(settings: Mapping[str, object]) -> None:
    """Raises ValueError naming the first of `WaveNetModule`'s own arguments (its optimiser's and schedule's) in
    `settings` that would train on garbage or fail later; arguments not given are not checked."""
    decay = settings.get("decay", "cosine")
    if decay not in ("cosine", "constant"):
        raise ValueError(f"decay must be 'cosine' or 'constant', got {decay!r}")
    # Checked here, not when the optimiser is built: a negative rate or decay would train, on garbage.
    if _finite("lr", settings.get("lr", 1.0)) <= 0:
        raise ValueError(f"lr must be positive, got {settings['lr']}")
    if _finite("weight_decay", settings.get("weight_decay", 0.0)) < 0:
        raise ValueError(f"weight_decay must not be negative, got {settings['weight_decay']}")
    if _finite("warmup_steps", settings.get("warmup_steps", 0)) < 0:
        raise ValueError(f"warmup_steps must not be negative, got {settings['warmup_steps']}")
    if not 0 <= _finite("min_lr_ratio", settings.get("min_lr_ratio", 0.0)) <= 1:
        raise ValueError(f"min_lr_ratio must be between 0 and 1, got {settings['min_lr_ratio']}")
    betas = settings.get("betas", (0.9, 0.999))
    if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if not all(0 <= _finite("betas", beta) < 1 for beta in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {list(betas)}")
    if not isinstance(settings.get("compile", False), bool):
        raise ValueError(f"compile must be true or false, got {settings['compile']!r}")


def _finite(name: str, value: object) -> float:
    """`value`, or ValueError naming `name` if it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


def as_primitives(settings: Mapping[str, object]) -> dict[str, object]:
    """`settings` with numpy's scalars and arrays (an `np.logspace` of learning rates) as Python's ints, floats
    and lists, and the same inside lists and tuples; everything else as it is."""
    return {name: _primitive(value) for name, value in settings.items()}


def _primitive(value: object) -> object:
    if isinstance(value, (list, tuple)):
        return type(value)(_primitive(item) for item in value)
    tolist = getattr(value, "tolist", None)  # numpy's scalars and arrays: their values as Python's types
    return tolist() if callable(tolist) else value
