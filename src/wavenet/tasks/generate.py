"""`generate.py`'s task: load a checkpoint, sample audio with incremental generation, write WAV files."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TimeRemainingColumn
from rich.text import Text

from wavenet.config import check_required
from wavenet.data.audio import read_audio, write_wav
from wavenet.data.mulaw import mu_law_decode, mu_law_encode
from wavenet.ema import EMA_STATE_KEY
from wavenet.errors import UserError, first_line
from wavenet.generation import generate, resolve_method
from wavenet.module import WaveNetModule, read_checkpoint

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> list[Path]:
    """Writes `cfg.batch_size` files `sample_000.wav`, ... of `cfg.num_samples` samples to the run folder.

    Returns:
        The paths of the files written.

    Raises:
        UserError: For a missing or unreadable checkpoint or prime file, or a setting out of range.
    """
    check_required(cfg)
    _check_settings(cfg)
    output_dir = Path(cfg.paths.output_dir)
    _check_output_dir(output_dir)
    device = _device(str(cfg.device))
    dtype = PRECISIONS[str(cfg.precision)]
    try:  # before the checkpoint is read, so that a method that cannot run here costs no loading
        resolve_method(str(cfg.method), device, dtype, int(cfg.batch_size))
    except ValueError as error:
        raise UserError(f"method={cfg.method}: {error}") from error
    module = _load_checkpoint(Path(cfg.ckpt_path).expanduser(), device, use_ema=bool(cfg.use_ema))
    model = module.model.eval().to(dtype)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    method = resolve_method(str(cfg.method), device, dtype, int(cfg.batch_size), parameters)
    sample_rate = int(module.hparams.sample_rate)
    levels = model.quantization_channels
    prime = None
    if cfg.prime is not None:
        audio = _read_prime(Path(cfg.prime).expanduser(), sample_rate)
        prime = mu_law_encode(audio[-model.receptive_field :], levels)  # older samples cannot matter
    generator = None if cfg.seed is None else torch.Generator(device).manual_seed(int(cfg.seed))
    log.info(
        "Generating %d x %d samples (%.2f s at %d Hz) on %s (%s, %s), temperature %g%s; receptive field %d samples",
        cfg.batch_size,
        cfg.num_samples,
        cfg.num_samples / sample_rate,
        sample_rate,
        device,
        method,
        cfg.precision,
        cfg.temperature,
        "" if prime is None else f", continuing {cfg.prime}",
        model.receptive_field,
    )

    started = time.perf_counter()
    with _progress_bar(cfg.num_samples, cfg.batch_size, sample_rate) as advance:
        classes = generate(
            model,
            cfg.num_samples,
            batch_size=cfg.batch_size,
            temperature=cfg.temperature,
            prime=prime,
            generator=generator,
            progress=advance,
            method=method,
        )
    seconds = time.perf_counter() - started
    rate = cfg.num_samples * cfg.batch_size / seconds

    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    digits = max(3, len(str(cfg.batch_size - 1)))  # sample_0999.wav sorts before sample_1000.wav
    for index, stream in enumerate(classes.cpu()):  # decoded one at a time: float audio of one stream in memory
        paths.append(output_dir / f"sample_{index:0{digits}d}.wav")
        write_wav(paths[-1], mu_law_decode(stream, levels), sample_rate)
    log.info(
        "Wrote %d file(s) to %s in %.1f s: %s samples/s, %.2fx real time",
        len(paths),
        output_dir,
        seconds,
        f"{rate:,.0f}",
        rate / sample_rate,
    )
    return paths


# Weights and activations of the step; bf16 halves the bytes every step reads (see conf/generate.yaml).
PRECISIONS = {"32": torch.float32, "bf16": torch.bfloat16}


def _check_settings(cfg: DictConfig) -> None:
    """Raises `UserError` for a value the generator would refuse, naming the key."""
    if str(cfg.precision) not in PRECISIONS:
        raise UserError(f"precision must be 32 or bf16, got {cfg.precision}")
    for key in ("num_samples", "batch_size"):
        if not _is_integer(cfg[key]) or cfg[key] < 1:
            raise UserError(f"{key} must be a positive integer, got {cfg[key]!r}")
    temperature = cfg.temperature
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not math.isfinite(temperature):
        raise UserError(f"temperature must be a number, 0 (greedy) or more, got {temperature!r}")
    if temperature < 0:
        raise UserError(f"temperature must be 0 (greedy) or positive, got {temperature}")
    if cfg.seed is not None and not _is_integer(cfg.seed):
        raise UserError(f"seed must be an integer or null, got {cfg.seed!r}")
    if not isinstance(cfg.use_ema, bool):
        raise UserError(f"use_ema must be true or false, got {cfg.use_ema!r}")


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_output_dir(output_dir: Path) -> None:
    """Refuses a folder holding samples of an earlier run: writing over some of them would mix two runs."""
    earlier = sorted(output_dir.glob("sample_*.wav"))
    if earlier:
        raise UserError(
            f"{output_dir} already holds {len(earlier)} sample_*.wav of an earlier run; "
            "choose another hydra.run.dir or remove them"
        )


def _device(name: str) -> torch.device:
    """`auto` is CUDA when there is a GPU, else the CPU; other names are torch's (`cpu`, `cuda`, `cuda:1`)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UserError(f"device must be auto, cpu or cuda[:index], got {name!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device={name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "cpu":  # `cpu:0` is the CPU too, but torch.load cannot map a checkpoint to it
        return torch.device("cpu")
    return device


def _load_checkpoint(path: Path, device: torch.device, use_ema: bool) -> WaveNetModule:
    """The trained module, with the EMA weights in place of the training weights where there are some."""
    # Read once: the module is rebuilt from its primitive hyperparameters, as load_from_checkpoint would.
    checkpoint = read_checkpoint(path, map_location=device)
    try:
        module = WaveNetModule(**checkpoint["hyper_parameters"]).to(device)
        averaged = checkpoint.get(EMA_STATE_KEY) if use_ema else None
        module.load_state_dict(averaged or checkpoint["state_dict"])
    except (TypeError, ValueError, RuntimeError) as error:
        # Hyperparameters or weights that do not fit this version's WaveNetModule.
        raise UserError(f"cannot load the model of checkpoint {path}: {first_line(error)}") from error
    if averaged:
        log.info("Using the EMA weights of %s", path)
    return module


def _read_prime(path: Path, sample_rate: int) -> torch.Tensor:
    """The prime file as float audio at the model's rate; read_audio raises UserError if it is unreadable."""
    if path.is_dir():
        raise UserError(f"prime {path} is a folder, not an audio file")
    if not path.is_file():
        raise UserError(f"prime file not found: {path}")
    audio = read_audio(path, sample_rate)
    if audio.numel() == 0:
        raise UserError(f"prime file {path} has no samples")
    if not torch.isfinite(audio).all():
        raise UserError(f"prime file {path} holds NaN or infinite samples")
    return audio


class _SpeedColumn(ProgressColumn):
    """Samples per second over all streams, and how many seconds of audio that makes per second."""

    def __init__(self, batch_size: int, sample_rate: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.sample_rate = sample_rate

    def render(self, task: Task) -> Text:
        if not task.elapsed or not task.completed:
            return Text("? samples/s", style="progress.data.speed")
        rate = task.completed * self.batch_size / task.elapsed  # the mean since the start: steady enough
        text = f"{rate:,.0f} samples/s, {rate / self.sample_rate:.2f}x real time"
        return Text(text, style="progress.data.speed")


@contextmanager
def _progress_bar(num_samples: int, batch_size: int, sample_rate: int) -> Iterator[Callable[[int], None]]:
    """A progress bar over the steps of generation; yields the function that advances it."""
    with Progress(
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        _SpeedColumn(batch_size, sample_rate),
        TimeRemainingColumn(),
    ) as progress:
        task = progress.add_task("generate", total=num_samples)
        yield lambda steps: progress.advance(task, steps)
