"""LightningDataModules: a folder of the user's audio, and the built-in synthetic music.

Both stream windows from disk (see `wavenet.data.datasets`): `setup` reads only file headers, so memory
does not grow with the corpus.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from wavenet.data.audio import audio_info, find_audio_files, resampled_length
from wavenet.data.datasets import AudioFile, RandomWindows, TiledWindows
from wavenet.data.synthetic import SYNTHESIS_VERSION, synthesize_dataset
from wavenet.errors import UserError

log = logging.getLogger(__name__)


@rank_zero_only
def _log(level: int, message: str) -> None:
    """Logs once, not once per DDP process: every rank runs `setup`."""
    log.log(level, message)


def _collate(examples: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Stacks examples into `(inputs, targets)`, each (B, T); `default_collate` alone would give a list."""
    inputs, targets = default_collate(examples)
    return inputs, targets


def _validation_score(relative_path: str) -> float:
    """A number in [0, 1) fixed by the path alone, so adding files never moves the others."""
    return zlib.crc32(relative_path.encode("utf-8")) / 2**32


class AudioFolderDataModule(L.LightningDataModule):
    """Every audio file under `root`, as mu-law windows for training and validation.

    Files are mixed to mono and resampled to `sample_rate`. A file goes to validation when a hash of its
    path relative to `root` falls below `val_fraction`, so the split is the same on every run and stays
    put when files are added; at least one file goes to each side.

    Args:
        root: Folder searched recursively for audio files.
        receptive_field: The model's receptive field, in samples.
        extensions: File extensions to read, case-insensitive.
        sample_rate: Rate the model works at; files at other rates are resampled.
        quantization_channels: Number of mu-law classes.
        chunk_length: Number of targets per example that the loss uses.
        batch_size: Examples per batch (per process under DDP).
        num_workers: DataLoader worker processes; 0 reads in the main process.
        val_fraction: Fraction of files, by count, held out for validation.
    """

    def __init__(
        self,
        root: str | Path,
        receptive_field: int,
        extensions: Sequence[str] = ("wav", "flac", "ogg", "mp3"),
        sample_rate: int = 16000,
        quantization_channels: int = 256,
        chunk_length: int = 4096,
        batch_size: int = 4,
        num_workers: int = 2,
        val_fraction: float = 0.1,
    ) -> None:
        super().__init__()
        for name, value in [
            ("receptive_field", receptive_field),
            ("sample_rate", sample_rate),
            ("chunk_length", chunk_length),
            ("batch_size", batch_size),
        ]:
            if value < 1:
                raise UserError(f"data.{name} must be a positive integer, got {value}")
        if quantization_channels < 2:
            raise UserError(f"data.quantization_channels must be at least 2, got {quantization_channels}")
        if num_workers < 0:
            raise UserError(f"data.num_workers must not be negative, got {num_workers}")
        if not 0.0 < val_fraction < 1.0:
            raise UserError(f"data.val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
        self.root = Path(root)
        self.receptive_field = receptive_field
        self.extensions = tuple(str(extension) for extension in extensions)
        self.sample_rate = sample_rate
        self.quantization_channels = quantization_channels
        self.chunk_length = chunk_length
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.train_files: list[AudioFile] = []
        self.val_files: list[AudioFile] = []
        self.train_set: RandomWindows | None = None
        self.val_set: TiledWindows | None = None

    @property
    def window(self) -> int:
        """Samples per example: a receptive field of context, then the chunk the loss is taken on."""
        return self.receptive_field + self.chunk_length

    def setup(self, stage: str | None = None) -> None:
        """Indexes the files under `root` from their headers and splits them into training and validation.

        Raises:
            UserError: If `root` is missing or holds no usable audio, if only one file is usable (validation
                needs a file of its own), or if the training files hold fewer chunks than one batch.
        """
        if self.train_set is not None:
            return
        files = self._index()
        self.train_files, self.val_files = self._split(files)
        dataset_args = (self.receptive_field, self.chunk_length, self.sample_rate, self.quantization_channels)
        self.train_set = RandomWindows(self.train_files, *dataset_args)
        self.val_set = TiledWindows(self.val_files, *dataset_args)
        if len(self.train_set) < self.batch_size:
            raise UserError(
                f"the training files under {self.root} hold {len(self.train_set)} chunks of "
                f"{self.chunk_length} samples, fewer than one batch (data.batch_size={self.batch_size}): "
                "add audio, or lower data.batch_size or data.chunk_length"
            )
        _log(
            logging.INFO,
            f"Audio under {self.root}: {len(self.train_files)} training files "
            f"({self._hours(self.train_files):.2f} h), {len(self.val_files)} validation files "
            f"({self._hours(self.val_files):.2f} h) at {self.sample_rate} Hz",
        )

    def train_dataloader(self) -> DataLoader[tuple[Tensor, Tensor]]:
        assert self.train_set is not None, "setup() must run first"
        return self._loader(self.train_set, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader[tuple[Tensor, Tensor]]:
        assert self.val_set is not None, "setup() must run first"
        return self._loader(self.val_set, shuffle=False, drop_last=False)

    def _loader(self, dataset: Dataset[tuple[Tensor, Tensor]], shuffle: bool, drop_last: bool) -> DataLoader:
        # No sampler here: under DDP, Lightning swaps in a DistributedSampler with these shuffle settings.
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=_collate,
        )

    def _index(self) -> list[AudioFile]:
        """Every usable file under `root`, with its length at `sample_rate`; warns about the rest."""
        if not self.root.exists():
            raise UserError(f"data root {self.root} does not exist")
        if not self.root.is_dir():
            raise UserError(f"data root {self.root} is not a directory")
        paths = find_audio_files(self.root, self.extensions)
        if not paths:
            kinds = ", ".join(self.extensions)
            raise UserError(f"no audio files ({kinds}) found under data root {self.root}")

        usable, short, unreadable = [], [], []
        for path in paths:
            try:
                frames, file_rate = audio_info(path)
            except UserError as error:
                unreadable.append(str(error))
                continue
            audio_file = AudioFile(path, resampled_length(frames, file_rate, self.sample_rate))
            (usable if audio_file.frames >= self.window else short).append(audio_file)

        window = f"{self.window} samples = {self.window / self.sample_rate:.3f} s at {self.sample_rate} Hz"
        if unreadable:
            _log(
                logging.WARNING,
                f"Skipping {len(unreadable)} unreadable audio files:\n  " + "\n  ".join(unreadable),
            )
        if short:
            _log(
                logging.WARNING,
                f"Skipping {len(short)} audio files shorter than one window ({window}): "
                + ", ".join(str(file.path) for file in short),
            )
        if not usable:
            raise UserError(
                f"no usable audio under data root {self.root}: of {len(paths)} audio files, "
                f"{len(unreadable)} are unreadable and {len(short)} are shorter than one window ({window})"
            )
        if len(usable) == 1:
            raise UserError(
                f"only one usable audio file under data root {self.root} ({usable[0].path}): "
                "validation needs a file of its own, so add at least one more"
            )
        return usable

    def _split(self, files: list[AudioFile]) -> tuple[list[AudioFile], list[AudioFile]]:
        """(training, validation) files, by a hash of each path relative to `root`."""
        scores = {file.path: _validation_score(file.path.relative_to(self.root).as_posix()) for file in files}
        val = [file for file in files if scores[file.path] < self.val_fraction]
        # The fallbacks pick by score too, so they are as stable as the threshold itself.
        if not val:
            val = [min(files, key=lambda file: scores[file.path])]
        if len(val) == len(files):
            val.remove(max(val, key=lambda file: scores[file.path]))
        val_paths = {file.path for file in val}
        return [file for file in files if file.path not in val_paths], val

    def _hours(self, files: list[AudioFile]) -> float:
        return sum(file.frames for file in files) / self.sample_rate / 3600


class SyntheticMusicDataModule(AudioFolderDataModule):
    """The built-in dataset: synthetic music (see `wavenet.data.synthetic`), made on first use and cached.

    The pieces are written to a folder under `cache_dir` whose name holds a hash of everything that
    determines them, so every process computes the same folder and a changed setting never reuses a stale
    cache. Other arguments are those of `AudioFolderDataModule`.

    Args:
        cache_dir: Folder holding synthesised datasets.
        num_files: Number of pieces; about `val_fraction` of them (at least one) go to validation.
        seconds_per_file: Length of each piece.
        synthesis_seed: Seed of the pieces themselves (training randomness has its own seed).
        root: Must be None: this module makes its own audio.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        receptive_field: int,
        num_files: int = 64,
        seconds_per_file: float = 10.0,
        synthesis_seed: int = 0,
        root: str | Path | None = None,
        extensions: Sequence[str] = ("wav", "flac", "ogg", "mp3"),
        sample_rate: int = 16000,
        quantization_channels: int = 256,
        chunk_length: int = 4096,
        batch_size: int = 4,
        num_workers: int = 2,
        val_fraction: float = 0.1,
    ) -> None:
        if root is not None:
            raise UserError(
                f"the built-in dataset makes its own audio and takes no data.root (got {root}); "
                "to train on your files use data=folder data.root=..."
            )
        if num_files < 2:
            raise UserError(f"data.num_files must be at least 2 (one for validation), got {num_files}")
        if seconds_per_file <= 0:
            raise UserError(f"data.seconds_per_file must be positive, got {seconds_per_file}")
        self.cache_dir = Path(cache_dir)
        self.num_files = num_files
        self.seconds_per_file = float(seconds_per_file)
        self.synthesis_seed = synthesis_seed
        key = json.dumps([SYNTHESIS_VERSION, num_files, self.seconds_per_file, sample_rate, synthesis_seed])
        digest = hashlib.sha256(key.encode()).hexdigest()[:10]
        name = f"music-{num_files}x{self.seconds_per_file:g}s-{sample_rate}hz-{digest}"
        super().__init__(
            self.cache_dir / name,
            receptive_field,
            extensions=extensions,
            sample_rate=sample_rate,
            quantization_channels=quantization_channels,
            chunk_length=chunk_length,
            batch_size=batch_size,
            num_workers=num_workers,
            val_fraction=val_fraction,
        )

    def prepare_data(self) -> None:
        """Synthesises the dataset into `root` unless it is there already (Lightning runs this on rank 0).

        The files are written to a temporary sibling folder renamed into place at the end: a run stopped
        halfway leaves no folder that a later run would take for a complete dataset.
        """
        if self.root.is_dir():
            log.info("Using the built-in dataset cached in %s", self.root)
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        log.info("Synthesising built-in dataset (%d files) into %s", self.num_files, self.root)
        partial = Path(tempfile.mkdtemp(prefix=f"{self.root.name}.partial-", dir=self.cache_dir))
        partial.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any dataset folder
        try:
            synthesize_dataset(
                partial, self.num_files, self.seconds_per_file, self.sample_rate, self.synthesis_seed
            )
            try:
                partial.rename(self.root)
            except OSError:
                if not self.root.is_dir():
                    raise
                # Another process finished first; its files are the same, so this copy is dropped.
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    def setup(self, stage: str | None = None) -> None:
        if not self.root.is_dir():
            raise UserError(
                f"the built-in dataset is not in {self.root}: prepare_data() makes it (the Trainer calls it)"
            )
        super().setup(stage)
