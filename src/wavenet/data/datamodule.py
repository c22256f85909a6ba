"""LightningDataModules: a corpus of the user's audio (any folder, VCTK, LJSpeech), and the built-in music.

Both prepare their corpus once into memory-mapped mu-law shards (`wavenet.data.prepare`, run by
Lightning's `prepare_data` on one process per node) and train on windows sliced from them
(`wavenet.data.datasets`). `wavenet.data.streaming` has a third module that streams published shards.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler, default_collate

from wavenet.data.datasets import ChunkLoader, ChunkSampler, FixedChunks, RandomChunks, ShardReader, SignalSafeLoader
from wavenet.data.prepare import (
    MANIFEST,
    Manifest,
    PreparedFile,
    PrepareSettings,
    default_data_dir,
    leave_stops_to,
    prepare_corpus,
    prepared_folder,
)
from wavenet.data.settings import check_data_settings, check_no_root, check_synthesis_settings
from wavenet.data.synthetic import SYNTHESIS_VERSION, synthesize_dataset
from wavenet.errors import UserError, counted

log = logging.getLogger(__name__)

# Files listed one per line in the warning about left-out files; the manifest lists them all.
_LISTED = 20


@rank_zero_only
def _log(level: int, message: str) -> None:
    """Logs once, not once per DDP process: every rank runs `setup`."""
    log.log(level, message)


def _collate(examples: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Stacks examples into `(inputs, targets)`, each (B, T); `default_collate` alone would give a list."""
    inputs, targets = default_collate(examples)
    return inputs, targets


def _leave_stops_to_the_trainer(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: Ctrl-C, SIGHUP, and SIGTERM from anyone but the process that owns the loader, are
    ignored.

    Schedulers preempt a job by sending SIGTERM to every process in it (SLURM at the time limit, `timeout`, `kill`
    of a process group), workers included. PyTorch's workers die of it, and the trainer, told by SIGCHLD, raised
    "DataLoader worker ... is killed by signal: Terminated" from wherever it was, before it could finish the step
    and save `interrupted.ckpt` (see `leave_stops_to`).
    """
    owner = multiprocessing.parent_process()
    leave_stops_to(owner.pid if owner is not None else os.getppid())


def _validation_score(relative_path: str) -> float:
    """A number in [0, 1) fixed by the path alone, so adding files never moves the others."""
    # A name that is not UTF-8 keeps its bytes (surrogate escapes): UTF-8 names hash as they always did.
    return zlib.crc32(relative_path.encode("utf-8", "surrogateescape")) / 2**32


def split_files(
    files: Sequence[PreparedFile], val_fraction: float
) -> tuple[list[PreparedFile], list[PreparedFile]]:
    """(training, validation) files, by a hash of each path relative to the corpus root.

    A file goes to validation when its hash falls below `val_fraction`, so the split is the same on
    every run and stays put when files are added; at least one file goes to each side (needs two files).
    """
    assert len(files) >= 2, "validation needs a file of its own"
    scores = {file.relative: _validation_score(file.relative) for file in files}
    val = [file for file in files if scores[file.relative] < val_fraction]
    # The fallbacks pick by score too, so they are as stable as the threshold itself.
    if not val:
        val = [min(files, key=lambda file: scores[file.relative])]
    if len(val) == len(files):
        val.remove(max(val, key=lambda file: scores[file.relative]))
    val_names = {file.relative for file in val}
    return [file for file in files if file.relative not in val_names], val


class ChunkDataModule(L.LightningDataModule):
    """What every data module here shares: checked settings, the window, and the loaders' settings.

    Args:
        receptive_field: The model's receptive field, in samples.
        sample_rate: Rate the model works at.
        quantization_channels: Number of mu-law classes (at most 256: a class is stored in one byte).
        chunk_length: Number of targets per example that the loss uses.
        batch_size: Examples per batch (per process under DDP).
        num_workers: DataLoader worker processes; 0 reads in the main process.
        seed: Seed of the training windows' order (the config passes `${seed}`).
    """

    def __init__(
        self,
        receptive_field: int,
        sample_rate: int,
        quantization_channels: int,
        chunk_length: int,
        batch_size: int,
        num_workers: int,
        seed: int,
    ) -> None:
        super().__init__()
        check_data_settings(
            dict(
                receptive_field=receptive_field, sample_rate=sample_rate, quantization_channels=quantization_channels,
                chunk_length=chunk_length, batch_size=batch_size, num_workers=num_workers, seed=seed,
            )
        )  # fmt: skip
        self.receptive_field = receptive_field
        self.sample_rate = sample_rate
        self.quantization_channels = quantization_channels
        self.chunk_length = chunk_length
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: Dataset[tuple[Tensor, Tensor]] | None = None
        self.val_set: FixedChunks | None = None

    @property
    def window(self) -> int:
        """Samples per example: a receptive field of context, then the chunk the loss is taken on."""
        return self.receptive_field + self.chunk_length

    def val_dataloader(self) -> DataLoader[tuple[Tensor, Tensor]]:
        assert self.val_set is not None, "setup() must run first"
        # Under DDP, Lightning gives each rank its share of these through a DistributedSampler.
        return self._loader(self.val_set, shuffle=False, drop_last=False)

    def _distributed(self) -> tuple[int, int]:
        """(rank, world size) of the trainer this module is attached to; (0, 1) outside one."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(
        self,
        dataset: Dataset,
        shuffle: bool = False,
        drop_last: bool = False,
        sampler: Sampler | None = None,
        loader_class: Callable[..., DataLoader] = SignalSafeLoader,
    ) -> DataLoader[tuple[Tensor, Tensor]]:
        return loader_class(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=_collate,
            worker_init_fn=_leave_stops_to_the_trainer,
        )


class _SameWindows(SequentialSampler):
    """The same windows every epoch: the first batches of the first epoch, for `trainer.overfit_batches`.

    Lightning replaces any training sampler that is not a `SequentialSampler` by one over the dataset's first
    indices: windows starting at samples 0, 1, 2, ... of the first file, one window shifted by a sample each.
    """

    def __init__(self, windows: list[int]) -> None:
        self.windows = windows

    def __iter__(self) -> Iterator[int]:
        return iter(self.windows)

    def __len__(self) -> int:
        return len(self.windows)


class AudioFolderDataModule(ChunkDataModule):
    """The audio files of a corpus, prepared once into mu-law shards, as windows for training and validation.

    Files are mixed to mono, resampled to `sample_rate`, optionally trimmed of silence at both ends and
    mu-law encoded, once (`prepare_data`); the result is cached under `cache_dir` and reused while the
    files and settings stay the same. A file goes to validation by a hash of its path (`split_files`).

    Args:
        root: The corpus folder.
        receptive_field: The model's receptive field, in samples.
        layout: "folder" (every audio file under `root`, recursively), "vctk" or "ljspeech"; see
            `wavenet.data.layouts`.
        extensions: File extensions the "folder" layout reads, case-insensitive.
        sample_rate: Rate the model works at; files at other rates are resampled.
        quantization_channels: Number of mu-law classes.
        trim_db: If set, audio quieter than this many dB below a file's loudest 10 ms is cut from its
            start and end.
        chunk_length: Number of targets per example that the loss uses.
        batch_size: Examples per batch (per process under DDP).
        num_workers: DataLoader worker processes; 0 reads in the main process.
        val_fraction: Fraction of files, by count, held out for validation.
        seed: Seed of the training windows' order (the config passes `${seed}`).
        cache_dir: Where prepared corpora are kept; None for `$WAVENET_DATA_DIR/prepared` (or
            `~/.cache/wavenet/prepared`), as the configs' `${paths.data_dir}/prepared`.
        prepare_workers: Processes decoding files during preparation; None for one per CPU.
    """

    def __init__(
        self,
        root: str | Path,
        receptive_field: int,
        layout: str = "folder",
        extensions: Sequence[str] = ("wav", "flac", "ogg", "mp3", "aiff", "aif", "opus"),
        sample_rate: int = 16000,
        quantization_channels: int = 256,
        trim_db: float | None = None,
        chunk_length: int = 4096,
        batch_size: int = 4,
        num_workers: int = 2,
        val_fraction: float = 0.1,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        prepare_workers: int | None = None,
    ) -> None:
        super().__init__(
            receptive_field, sample_rate, quantization_channels, chunk_length, batch_size, num_workers, seed
        )
        check_data_settings(
            dict(
                layout=layout, trim_db=trim_db, val_fraction=val_fraction, prepare_workers=prepare_workers,
                extensions=extensions,
            )
        )  # fmt: skip
        if not isinstance(root, (str, Path)) or not str(root):
            raise UserError(f"data.root must be the folder of your audio, got {root!r}")
        self.root = Path(root).expanduser()  # also `~/...` from a YAML config or a quoted override
        self.layout = layout
        self.extensions = tuple(str(extension) for extension in extensions)
        self.settings = PrepareSettings(sample_rate, quantization_channels, trim_db)
        self.val_fraction = val_fraction
        self.cache_dir = default_data_dir() / "prepared" if cache_dir is None else Path(cache_dir).expanduser()
        self.prepare_workers = prepare_workers
        self.manifest: Manifest | None = None
        self.prepared: Path | None = None  # the folder this process's `prepare_data` prepared or found
        self.train_files: list[PreparedFile] = []
        self.val_files: list[PreparedFile] = []
        self.train_set: RandomChunks[PreparedFile] | None = None

    def prepare_data(self) -> None:
        """Prepares the corpus unless it is cached already (Lightning runs this on one process per node)."""
        self.prepared = prepare_corpus(
            self.root, self.layout, self.extensions, self.settings, self.cache_dir, self.prepare_workers
        )

    def setup(self, stage: str | None = None) -> None:
        """Opens the prepared corpus, leaves out files shorter than one window and splits the rest.

        Raises:
            UserError: If the corpus was not prepared, no file is as long as one window, only one is
                (validation needs a file of its own), or the training files hold fewer chunks than one
                batch per rank.
        """
        if self.train_set is not None:
            return
        folder, _, _ = prepared_folder(self.root, self.layout, self.extensions, self.settings, self.cache_dir)
        if self.prepared is not None and folder != self.prepared:
            # Files were added, changed or removed while they were prepared (a copy still running, hours into
            # preparing a large corpus): what was prepared is trained on, rather than thrown away by an error.
            _log(
                logging.WARNING,
                f"The files under {self.root} changed while they were prepared: training on them as they were "
                "listed when preparation began; the next run prepares them as they are then",
            )
            folder = self.prepared
        if not (folder / MANIFEST).is_file():
            raise UserError(
                f"the prepared data of {self.root} is not in {folder}: its files changed since they were prepared "
                "(run again to prepare them as they are), or prepare_data() did not run (the Trainer calls it on "
                "one process per node; with a cache that is not shared between nodes, keep "
                "trainer.prepare_data_per_node true)"
            )
        self.manifest = manifest = Manifest.load(folder, self.root)
        usable = [file for file in manifest.files if file.frames >= self.window]
        short = [file for file in manifest.files if file.frames < self.window]
        total = len(manifest.files) + len(manifest.skipped)
        self._warn_left_out(manifest, short)
        if not usable:
            reasons = [
                *([f"{counted(len(manifest.skipped), 'is', 'are')} unusable"] if manifest.skipped else []),
                f"{counted(len(short), 'is', 'are')} shorter than one window ({self._window_text()})",
            ]
            raise UserError(
                f"no usable audio under data root {self.root}: of {counted(total, 'audio file')}, "
                f"{' and '.join(reasons)}: add longer audio, or lower data.chunk_length"
            )
        if len(usable) == 1:
            raise UserError(
                f"only one usable audio file under data root {self.root} ({usable[0].path}): "
                "validation needs a file of its own, so add at least one more"
            )
        self.train_files, self.val_files = split_files(usable, self.val_fraction)
        read = ShardReader(folder, manifest.shards)
        args = (read, self.receptive_field, self.chunk_length, self.sample_rate, self.quantization_channels)
        self.train_set = RandomChunks(
            self.train_files, [f.frames - self.window + 1 for f in self.train_files], *args
        )
        self.val_set = FixedChunks(
            self.val_files, [f.frames - self.window + 1 for f in self.val_files], *args
        )
        _, world_size = self._distributed()
        chunks = len(self.train_set) // self.chunk_length
        if chunks < self.batch_size * world_size:
            raise UserError(
                f"the training files under {self.root} hold {chunks} chunks of {self.chunk_length} samples, "
                f"fewer than one batch per process (data.batch_size={self.batch_size} x {world_size}): add "
                "audio, or lower data.batch_size or data.chunk_length"
            )
        _log(
            logging.INFO,
            f"Audio under {self.root}: {len(self.train_files)} training file{'s' * (len(self.train_files) != 1)} "
            f"({self._hours(self.train_files):.2f} h), "
            f"{len(self.val_files)} validation file{'s' * (len(self.val_files) != 1)} "
            f"({self._hours(self.val_files):.2f} h) at {self.sample_rate} Hz, "
            f"prepared in {folder}",
        )

    def train_dataloader(self) -> DataLoader[tuple[Tensor, Tensor]]:
        assert self.train_set is not None, "setup() must run first"
        rank, world_size = self._distributed()
        sampler = ChunkSampler(self.train_set, num_replicas=world_size, rank=rank, seed=self.seed)
        overfit = getattr(self.trainer, "overfit_batches", 0) if self.trainer is not None else 0
        if overfit:
            batches = overfit if isinstance(overfit, int) else max(int(overfit * len(sampler) / self.batch_size), 1)
            windows = list(itertools.islice(sampler, batches * self.batch_size))
            return self._loader(self.train_set, sampler=_SameWindows(windows), drop_last=True)
        return self._loader(self.train_set, sampler=sampler, drop_last=True, loader_class=ChunkLoader)

    def _warn_left_out(self, manifest: Manifest, short: list[PreparedFile]) -> None:
        """One warning for every file left out, whether at preparation or for being shorter than a window."""
        left_out = [
            *manifest.skipped,
            *((file.relative, f"shorter than one window ({self._window_text()})") for file in short),
        ]
        if not left_out:
            return
        lines = [f"{path}: {reason}" for path, reason in left_out[:_LISTED]]
        if len(left_out) > _LISTED:
            # The manifest lists what preparation left out; which files are too short depends on the window.
            unlisted_skipped = max(len(manifest.skipped) - _LISTED, 0)
            where = f"listed under skipped in {manifest.directory / MANIFEST}"
            if unlisted_skipped == len(left_out) - _LISTED:
                more = f"all {where}"
            else:
                unlisted_short = len(left_out) - _LISTED - unlisted_skipped
                more = f"{unlisted_short} shorter than one window" + (
                    f", {unlisted_skipped} left out at preparation, {where}" if unlisted_skipped else ""
                )
            lines.append(f"... and {len(left_out) - _LISTED} more ({more})")
        # A folder that cannot be listed is a source left out, but no audio file.
        folders = sum(path.endswith("/") for path, _ in manifest.skipped)
        total = len(manifest.files) + len(manifest.skipped) - folders
        folder_note = f" and {counted(folders, 'folder')}" if folders else ""
        what = f"{len(left_out) - folders} of {counted(total, 'audio file')}{folder_note}"
        _log(logging.WARNING, f"Leaving out {what} under {self.root}:\n  " + "\n  ".join(lines))

    def _window_text(self) -> str:
        return f"{self.window} samples = {self.window / self.sample_rate:.3f} s at {self.sample_rate} Hz"

    def _hours(self, files: list[PreparedFile]) -> float:
        return sum(file.frames for file in files) / self.sample_rate / 3600


class SyntheticMusicDataModule(AudioFolderDataModule):
    """The built-in dataset: synthetic music (see `wavenet.data.synthetic`), made on first use and cached.

    The pieces are written as WAV files to a folder under `synthesis_dir` whose name holds a hash of
    everything that determines them, then prepared like any folder of audio. Other arguments are those
    of `AudioFolderDataModule`.

    Args:
        synthesis_dir: Folder holding synthesised datasets.
        num_files: Number of pieces; about `val_fraction` of them (at least one) go to validation.
        seconds_per_file: Length of each piece.
        synthesis_seed: Seed of the pieces themselves (training randomness has its own seed).
        root: Must be None: this module makes its own audio.
        sample_rate: Rate the pieces are synthesised at (and the model works at).
        folder_args: The other arguments of `AudioFolderDataModule`.
    """

    def __init__(
        self,
        synthesis_dir: str | Path,
        receptive_field: int,
        num_files: int = 64,
        seconds_per_file: float = 10.0,
        synthesis_seed: int = 0,
        root: str | Path | None = None,
        sample_rate: int = 16000,
        **folder_args: Any,
    ) -> None:
        check_no_root(root)
        check_synthesis_settings(num_files, seconds_per_file, sample_rate, synthesis_seed)
        check_data_settings({"num_files": num_files})
        self.synthesis_dir = Path(synthesis_dir).expanduser()
        self.num_files = num_files
        self.seconds_per_file = float(seconds_per_file)
        self.synthesis_seed = synthesis_seed
        key = json.dumps([SYNTHESIS_VERSION, num_files, self.seconds_per_file, sample_rate, synthesis_seed])
        digest = hashlib.sha256(key.encode()).hexdigest()[:10]
        name = f"music-{num_files}x{self.seconds_per_file:g}s-{sample_rate}hz-{digest}"
        super().__init__(self.synthesis_dir / name, receptive_field, sample_rate=sample_rate, **folder_args)

    def prepare_data(self) -> None:
        """Synthesises the dataset into `root` unless it is there already, then prepares it like a folder.

        The files are written to a temporary sibling folder renamed into place at the end: a run stopped
        halfway leaves no folder that a later run would take for a complete dataset.
        """
        if self.root.is_dir():
            log.info("Using the built-in dataset cached in %s", self.root)
        else:
            self._synthesize()
        super().prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if not self.root.is_dir():
            raise UserError(
                f"the built-in dataset is not in {self.root}: prepare_data() makes it (the Trainer calls it)"
            )
        super().setup(stage)

    def _synthesize(self) -> None:
        try:
            self.synthesis_dir.mkdir(parents=True, exist_ok=True)
            partial = Path(tempfile.mkdtemp(prefix=f"{self.root.name}.partial-", dir=self.synthesis_dir))
        except OSError as error:
            raise UserError(
                f"cannot write the built-in dataset under {self.synthesis_dir}: {error.strerror or error}; "
                "set paths.data_dir (or $WAVENET_DATA_DIR) to a writable folder"
            ) from error
        log.info("Synthesising built-in dataset (%d files) into %s", self.num_files, self.root)
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
