"""The checkpoints train.py writes, read without Lightning: generation needs only torch and the network.

`generate.py` loads its model here, not through `WaveNetModule`: importing Lightning (and the torchmetrics,
torchvision and scipy it brings) would take longer than generating a second of audio. torch itself loads only
when a checkpoint is read, so that train.py can refuse a `ckpt_path` that is no file before importing it.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wavenet.errors import UserError, counted, first_line

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from wavenet.models.wavenet import WaveNet

log = logging.getLogger(__name__)

# Where the EMA callback's averaged weights sit in a checkpoint, beside the training weights in "state_dict".
EMA_STATE_KEY = "ema_state_dict"
# The hyperparameters of a checkpoint's `WaveNetModule` that shape its network; the rest are training's.
_NETWORK = ("layers", "stacks", "residual_channels", "dilation_channels", "skip_channels", "kernel_size",
            "quantization_channels", "bias")  # fmt: skip
# `WaveNetModule` keeps its network as `self.model`, so that its weights are saved under this prefix.
_PREFIX = "model."


def check_checkpoint_file(path: Path) -> None:
    """Raises `UserError` if `path` is a folder, missing, or not a `torch.save` archive (or one cut short)."""
    if path.is_dir():
        found = checkpoints_under(path)
        if not found:
            raise UserError(f"checkpoint {path} is a folder, not a file (a run's are in checkpoints/, e.g. last.ckpt)")
        latest = max(found, key=lambda checkpoint: checkpoint.stat().st_mtime)
        raise UserError(
            f"checkpoint {path} is a folder, not a file; it holds {counted(len(found), 'checkpoint')}, the latest "
            f"written {latest}"
        )
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if not path.is_file():  # a device, a pipe: torch.load would read it as a stream, never as a checkpoint
        raise UserError(f"checkpoint {path} is not a regular file")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a PyTorch checkpoint (torch.save's zip archive), or it was cut short")


def read_checkpoint(path: Path, map_location: str | torch.device | None = None, mmap: bool = False) -> dict[str, Any]:
    """The contents of a checkpoint of a `WaveNetModule` (as train.py writes them), read with `torch.load`.

    Args:
        path: The checkpoint file.
        map_location: Where tensors go, as for `torch.load`.
        mmap: Map the file instead of reading it (CPU tensors only): to look at a checkpoint cheaply.

    Raises:
        UserError: Saying why `path` is not such a checkpoint: missing, a folder, not (or no longer) a
            `torch.save` archive, unreadable, or without the module's hyperparameters and weights.
    """
    check_checkpoint_file(path)
    import torch  # after the file checks: a path that is no checkpoint is refused without loading torch

    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        # torch.load's own message here is a paragraph about weights_only, misleading for a non-checkpoint.
        reason = "it holds objects torch.load will not unpickle (weights_only)"
        raise UserError(f"cannot read checkpoint {path}: {reason}") from error
    except Exception as error:  # noqa: BLE001 (zip and pickle errors of many types; all mean a bad file)
        raise UserError(f"cannot read checkpoint {path}: {first_line(error)}") from error
    if not isinstance(checkpoint, dict) or not {"hyper_parameters", "state_dict"} <= checkpoint.keys():
        raise UserError(f"{path} is not a checkpoint of a WaveNet model (no hyper_parameters and state_dict)")
    return checkpoint


def checkpoints_under(folder: Path) -> list[Path]:
    """The checkpoint files (`*.ckpt`) in `folder` and the folders below it, in order of their paths."""
    return sorted(path for path in folder.rglob("*.ckpt") if path.is_file())


def latest_resumable(folder: Path) -> tuple[Path, int] | None:
    """The checkpoint under `folder` that a run can resume from and that is furthest on, with its step; None if
    `folder` holds no checkpoint at all.

    Furthest on is the highest step, then the latest written: a stopped run's `interrupted.ckpt` over the
    `last.ckpt` of its validation before, and the runs of a chain of resumes over the ones they resumed. Files
    that cannot be read (a copy cut short) are passed over with a warning; weights-only ones, quietly.

    Raises:
        UserError: If `folder` holds checkpoints, but none a run can resume from.
    """
    found = checkpoints_under(folder)
    if not found:
        return None
    candidates, unreadable = [], []
    for path in found:
        try:
            checkpoint = read_checkpoint(path, map_location="cpu", mmap=True)
        except UserError as error:
            unreadable.append(str(error))
            continue
        if checkpoint.get("optimizer_states"):
            candidates.append((int(checkpoint.get("global_step", 0)), path.stat().st_mtime, path))
    if unreadable:
        log.warning("Passed over %s under %s: %s", counted(len(unreadable), "checkpoint"), folder, "; ".join(unreadable))
    if not candidates:
        raise UserError(
            f"ckpt_path={folder}: no checkpoint under it can resume training ({counted(len(found), 'checkpoint')}, "
            "each unreadable or saved with weights only)"
        )
    step, _, path = max(candidates)
    return path, step


def read_for_generation(
    path: Path, use_ema: bool | str = "auto", device: str | torch.device = "cpu"
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The hyperparameters of checkpoint `path` and the `WaveNetModule` weights to generate with, on `device`:
    its EMA average where `use_ema` asks for it and the checkpoint has one (`"auto"`), or insists on it
    (`True`); else its training weights.

    Raises:
        UserError: Naming the checkpoint, if it cannot be read (see `read_checkpoint`), or has no EMA weights and
            `use_ema` is True.
        ValueError: If `use_ema` is not "auto", True or False.
    """
    if not (isinstance(use_ema, bool) or use_ema == "auto"):
        raise ValueError(f"use_ema must be 'auto', True or False, got {use_ema!r}")
    checkpoint = read_checkpoint(path, map_location=device)
    averaged = checkpoint.get(EMA_STATE_KEY) if use_ema else None
    if use_ema is True and not averaged:
        raise UserError(
            f"use_ema=true but checkpoint {path} has no EMA weights (trained without the EMA callback); "
            "use_ema=false (or auto) takes its training weights"
        )
    if averaged:
        log.info("Using the EMA weights of %s", path)
    elif use_ema == "auto":
        log.info(
            "Using the training weights of %s: it holds no EMA weights (trained without callbacks.ema, or saved with "
            "weights only)",
            path,
        )
    import torch  # loaded by read_checkpoint already

    weights = averaged or checkpoint["state_dict"]
    floats = [(name, value) for name, value in weights.items() if torch.is_tensor(value) and value.is_floating_point()]
    # A NaN or an infinity anywhere makes its tensor's sum one: a pass over the weights, 10x sooner than a mask.
    sums = [value.sum(dtype=torch.float32) for _, value in floats]
    finite = torch.isfinite(torch.stack(sums)).tolist() if sums else []
    broken = [name for (name, _), ok in zip(floats, finite) if not ok]
    if broken:
        # Sampled from, NaN logits gave a file of one value throughout, without a word.
        raise UserError(
            f"checkpoint {path}: its {'EMA ' * bool(averaged)}weights hold NaN or infinite values ({broken[0]}): the "
            "run diverged before it was saved; take an earlier checkpoint"
        )
    return dict(checkpoint["hyper_parameters"]), weights


def load_problem(error: Exception) -> str:
    """Why a checkpoint's hyperparameters or weights do not fit this version's network, in one line.

    `load_state_dict` names each mismatch on a line of its own, under a first line that names none ("Error(s) in
    loading state_dict for WaveNet:"), which was all the error said: the first mismatch, and how many more.
    """
    heading, *problems = [line.strip() for line in str(error).strip().splitlines()] or [""]
    if not isinstance(error, RuntimeError) or not heading.startswith("Error(s) in loading state_dict") or not problems:
        return first_line(error)
    first = problems[0] if len(problems[0]) <= 300 else problems[0][:300] + "..."  # a list of every key, perhaps
    more = f" (and {counted(len(problems) - 1, 'more mismatch', 'more mismatches')})" if len(problems) > 1 else ""
    return f"its weights do not fit the network its hyperparameters give: {first}{more}"


def load_wavenet(
    path: str | Path, use_ema: bool | str = "auto", device: str | torch.device = "cpu"
) -> tuple[WaveNet, dict[str, Any]]:
    """The network of checkpoint `path`, in eval mode on `device`, with the weights `read_for_generation` picks;
    and the checkpoint's hyperparameters (`sample_rate` among them). What `WaveNetModule.load_for_generation`
    gives as `module.model` and `module.hparams`, without Lightning.

    Raises:
        UserError: Naming the checkpoint, if it cannot be read (see `read_checkpoint`), its network does not
            fit this version's `WaveNet`, or it has no EMA weights and `use_ema` is True.
        ValueError: If `use_ema` is not "auto", True or False.
    """
    from wavenet.models.wavenet import WaveNet

    path = Path(path).expanduser()
    hparams, weights = read_for_generation(path, use_ema, device)
    try:
        model = WaveNet(**{name: hparams[name] for name in _NETWORK if name in hparams})
        model.load_state_dict({key.removeprefix(_PREFIX): value for key, value in weights.items()})
    except (TypeError, ValueError, RuntimeError) as error:
        # Hyperparameters or weights that do not fit this version's WaveNet.
        raise UserError(f"cannot load the model of checkpoint {path}: {load_problem(error)}") from error
    sample_rate = hparams.get("sample_rate")
    if not isinstance(sample_rate, int) or isinstance(sample_rate, bool) or sample_rate < 1:
        raise UserError(f"cannot load the model of checkpoint {path}: it has no sample_rate (got {sample_rate!r})")
    return model.to(device).eval(), hparams
