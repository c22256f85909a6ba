"""The data modules' settings, checked without torch: by the modules as they are made, and by `train.py` on the
composed config before torch loads, so that a mistyped `data.batch_size` is answered in a second."""

from __future__ import annotations

import math
from collections.abc import Mapping

from wavenet.data.layouts import LAYOUTS
from wavenet.errors import UserError, is_integer, is_number


def check_data_settings(settings: Mapping[str, object]) -> None:
    """Raises `UserError` naming the first of `settings` (a data module's arguments, by name) that is out of range;
    arguments not given are not checked (the module's defaults are in range)."""
    for name in ("receptive_field", "sample_rate", "chunk_length", "batch_size"):
        value = settings.get(name, 1)
        if not is_integer(value) or value < 1:
            raise UserError(f"data.{name} must be a positive integer, got {value!r}")
    levels = settings.get("quantization_channels", 256)
    if not is_integer(levels) or not 2 <= levels <= 256:
        raise UserError(f"data.quantization_channels must be between 2 and 256 (one byte per sample), got {levels!r}")
    num_files = settings.get("num_files", 2)
    if is_integer(num_files) and num_files < 2:
        raise UserError(f"data.num_files must be at least 2 (one for validation), got {num_files}")
    shuffle_buffer = settings.get("shuffle_buffer", 1)
    if not is_integer(shuffle_buffer) or shuffle_buffer < 1:
        raise UserError(f"data.shuffle_buffer must be a positive integer, got {shuffle_buffer!r}")
    workers = settings.get("num_workers", 0)
    if not is_integer(workers) or workers < 0:
        raise UserError(f"data.num_workers must be 0 or more, got {workers!r}")
    if not is_integer(settings.get("seed", 0)):
        raise UserError(f"data.seed must be an integer, got {settings['seed']!r}")
    if "layout" in settings and settings["layout"] not in LAYOUTS:
        raise UserError(f"data.layout must be one of {', '.join(LAYOUTS)}, got {settings['layout']!r}")
    trim_db = settings.get("trim_db")
    if trim_db is not None and (not is_number(trim_db) or not 0 < trim_db < math.inf):
        raise UserError(f"data.trim_db must be positive (dB below the peak) or null, got {trim_db!r}")
    val_fraction = settings.get("val_fraction", 0.1)
    if not is_number(val_fraction) or not 0.0 < val_fraction < 1.0:
        raise UserError(f"data.val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")
    prepare_workers = settings.get("prepare_workers")
    if prepare_workers is not None and (not is_integer(prepare_workers) or prepare_workers < 1):
        raise UserError(f"data.prepare_workers must be at least 1 or null, got {prepare_workers!r}")
    extensions = settings.get("extensions", ("wav",))
    if isinstance(extensions, str) or not extensions:
        raise UserError(f"data.extensions must be a list such as [wav, flac], got {extensions!r}")


def check_synthesis_settings(num_files: object, seconds_per_file: object, sample_rate: object, seed: object) -> None:
    """Raises a UserError naming the setting (`data.num_files`, ...) unless the dataset can be made from these.

    Values arrive as typed on the command line (`data.num_files=2.5`, `data.synthesis_seed=abc`): a wrong one
    is named here rather than met as a traceback from numpy.
    """
    if not is_integer(num_files) or num_files < 1:
        raise UserError(f"data.num_files must be a positive integer, got {num_files!r}")
    if not is_integer(sample_rate) or sample_rate < 1:
        raise UserError(f"data.sample_rate must be a positive integer, got {sample_rate!r}")
    # A piece has round(seconds * rate) samples; one of none has no peak to normalise.
    if not is_number(seconds_per_file) or not math.isfinite(seconds_per_file) or seconds_per_file * sample_rate <= 0.5:
        raise UserError(
            f"data.seconds_per_file must be a number of seconds, at least one sample at {sample_rate} Hz, "
            f"got {seconds_per_file!r}"
        )
    if not is_integer(seed) or seed < 0:
        raise UserError(f"data.synthesis_seed must be an integer of 0 or more, got {seed!r}")


def check_no_root(root: object) -> None:
    """The built-in dataset's refusal of a corpus folder, which it would not read."""
    if root is not None:
        raise UserError(
            f"the built-in dataset makes its own audio and takes no data.root (got {root}); "
            "to train on your files use data=folder data.root=..."
        )
