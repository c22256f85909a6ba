"""The settings of `generate.py` that can be checked on the composed config (and the files it names: the
checkpoint, the prime) before torch loads: `generate.py` checks them first, so that a mistake
is answered in about a second, not after the seconds torch takes (and `wavenet.tasks.generate.run` checks them
again, for callers from Python)."""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig

from wavenet.checkpoint import check_checkpoint_file
from wavenet.config import check_added_keys, check_required
from wavenet.errors import UserError, is_integer, is_number
from wavenet.temperature import MAX_TEMPERATURE, check_temperature

# Every setting of conf/generate.yaml, which `~key` could remove.
SETTINGS = (
    "ckpt_path", "num_samples", "batch_size", "temperature", "seed", "prime", "use_ema", "device", "method",
    "precision", "log_every_seconds", "paths",
)  # fmt: skip
# precision= -> the torch dtype of the weights and activations (bf16 halves the bytes every step reads).
PRECISION_DTYPES = {"32": "float32", "bf16": "bfloat16"}
# RIFF's sizes are 32-bit: a WAV file holds 4 GiB, less room for its header, at 2 bytes a 16-bit sample.
MAX_WAV_SAMPLES = (2**32 - 2**10) // 2
# torch.Generator.manual_seed's range: negative seeds are taken modulo 2**64.
_SEEDS = range(-(2**63), 2**64)


def check_settings(cfg: DictConfig) -> tuple[Path, Path | None]:
    """Raises `UserError`, naming the key, for a required value not set, a key removed or added by mistake, a
    value the generator would refuse, or a checkpoint or prime that is not there.

    Returns:
        The paths of the checkpoint and of the prime (None without one).
    """
    check_required(cfg, keys=SETTINGS)
    check_added_keys(cfg, "generate.py")
    if str(cfg.precision) not in PRECISION_DTYPES:
        raise UserError(f"precision must be 32 or bf16, got {cfg.precision}")
    for key in ("num_samples", "batch_size"):
        if not is_integer(cfg[key]) or cfg[key] < 1:
            raise UserError(f"{key} must be a positive integer, got {cfg[key]!r}")
    if cfg.num_samples > MAX_WAV_SAMPLES:
        raise UserError(
            f"num_samples must be at most {MAX_WAV_SAMPLES:,}, what a 16-bit WAV file holds (4 GiB), "
            f"got {cfg.num_samples:,}"
        )
    try:
        check_temperature(cfg.temperature)
    except (TypeError, ValueError):
        raise UserError(
            f"temperature must be a number from 0 (greedy) to {MAX_TEMPERATURE:.0e}, got {cfg.temperature!r}"
        ) from None
    if cfg.seed is not None and not (is_integer(cfg.seed) and cfg.seed in _SEEDS):
        raise UserError(f"seed must be an integer or null, from -2**63 to 2**64 - 1, got {cfg.seed!r}")
    if not isinstance(cfg.use_ema, bool) and cfg.use_ema != "auto":
        raise UserError(f"use_ema must be auto, true or false, got {cfg.use_ema!r}")
    seconds = cfg.log_every_seconds
    if not is_number(seconds) or not 0 <= seconds < math.inf:
        raise UserError(f"log_every_seconds must be a number of seconds, 0 or more, got {seconds!r}")
    ckpt_path = _file_path("ckpt_path", cfg.ckpt_path, "the path of a checkpoint")
    check_checkpoint_file(ckpt_path)  # its contents are checked when it is read
    prime_path = None
    if cfg.prime is not None:
        prime_path = _file_path("prime", cfg.prime, "the path of an audio file, or null")
        if prime_path.is_dir():
            raise UserError(f"prime {prime_path} is a folder, not an audio file")
        if not prime_path.exists():
            raise UserError(f"prime file not found: {prime_path}")
        if not prime_path.is_file():  # a device, a pipe: reading it would wait for a writer
            raise UserError(f"prime {prime_path} is not a regular file")
    return ckpt_path, prime_path


def _file_path(key: str, value: object, expected: str) -> Path:
    """`value` of config key `key` as a path; a `UserError` for a value that is no path or empty."""
    if not isinstance(value, str):
        raise UserError(f"{key} must be {expected}, got {'null' if value is None else repr(value)}")
    if not value.strip():
        raise UserError(f"{key} is empty: set it to {expected}")
    return Path(value).expanduser()
