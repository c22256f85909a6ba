"""Prepared corpora in object storage, streamed to every node with litdata.

`publish` copies a prepared corpus (`wavenet.data.prepare`) to a remote location as litdata datasets;
`StreamingDataModule` trains from there. litdata gives each rank and DataLoader worker its own share of
the chunks, shuffled anew every epoch, downloads them ahead of use and keeps a bounded local cache, so a
node needs neither the source corpus nor room for all of it. (Why litdata: README, "Data at scale".)

A published corpus (`remote` is s3://bucket/prefix, gs://..., azure://..., r2://..., a local folder, or
local:/folder, which litdata copies into its cache like a download):

    <remote>/train/     litdata chunks of the training files, one item per segment:
                        {"audio": uint8 (T,) mu-law classes, "file": manifest index, "start": in the file,
                         "owned": window starts that belong to this segment}
    <remote>/val/       the same for the validation files, in manifest order
    <remote>/manifest/  one item: the prepared manifest, plus how it was split and segmented. Written
                        last: a remote without it holds no complete published corpus.

A long file is cut into segments of `segment_seconds`, each carrying the `SEGMENT_OVERLAP` samples that
follow it, so every window up to `SEGMENT_OVERLAP + 1` samples long starts in exactly one segment and
fits in it: segments lose no window start, and none is drawn twice.

    python -m wavenet.data.streaming PREPARED_FOLDER REMOTE [--val-fraction 0.1] [--workers 8]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import litdata
import numpy as np
import torch
from litdata import ChunkWaitTimeoutError
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from wavenet.data.datamodule import ChunkDataModule, split_files
from wavenet.data.datasets import FixedChunks, SignalSafeLoader
from wavenet.data.prepare import MANIFEST, Manifest, PreparedFile, available_cpus, default_data_dir, wait_for_exit
from wavenet.data.settings import check_data_settings
from wavenet.errors import UserError, counted, first_line

log = logging.getLogger(__name__)

# Samples each segment carries past the window starts it owns: the longest window that never misses a
# start is one more. 2**15 covers the `large` and `medium` models (3,070 and 6,139 samples of receptive
# field) with chunks of up to 26,000 samples.
SEGMENT_OVERLAP = 2**15
# litdata's unit of download and caching.
_CHUNK_BYTES = "64MB"


@dataclass(frozen=True)
class Segment:
    """A stretch of one prepared file, as published: item `index` of its split."""

    index: int
    file: PreparedFile
    start: int  # in the file
    frames: int
    owned: int  # window starts [0, owned) of this segment are its own; later ones belong to the next

    @property
    def path(self) -> Path:
        return self.file.path


def segments(frames: int, segment: int) -> list[tuple[int, int, int]]:
    """(start, frames, owned) of the segments a file of `frames` samples is published as."""
    cuts = []
    start = 0
    while frames - start >= segment + SEGMENT_OVERLAP:
        cuts.append((start, segment + SEGMENT_OVERLAP, segment))
        start += segment
    cuts.append((start, frames - start, frames - start))
    return cuts


def _join(remote: str, name: str) -> str:
    return f"{remote.rstrip('/')}/{name}"


class _SegmentItems:
    """litdata `optimize` function: the segment items of one prepared file (run in litdata's workers)."""

    def __init__(self, directory: Path, shards: list[str], segment: int) -> None:
        self.paths = [directory / name for name in shards]
        self.segment = segment

    def __call__(self, job: tuple[int, int, int, int]) -> Iterator[dict[str, Any]]:
        index, shard, offset, frames = job
        samples = np.memmap(self.paths[shard], dtype=np.uint8, mode="r", offset=offset, shape=(frames,))
        for start, length, owned in segments(frames, self.segment):
            yield {
                "audio": np.array(samples[start : start + length]),
                "file": index,
                "start": start,
                "owned": owned,
            }


def _identity(item: str) -> str:
    return item


def _optimize(fn: Any, inputs: list[Any], output_dir: str, workers: int, scratch: Path) -> None:
    """litdata.optimize, run in a child process of its own process group, so that Ctrl-C stays ours. Chunks
    bound for a bucket are staged in `scratch` (litdata's default is the system's temporary folder, often small
    on cluster nodes).

    litdata points SIGINT at a handler that its workers inherit and that ends each process with
    `os._exit(0)`: Ctrl-C made publishing exit with status 0 and half a split written, ended a Python caller
    the same way, and a SIGINT to the main process alone left its workers waiting forever. The terminal sends
    Ctrl-C to its foreground process group only, so here it raises KeyboardInterrupt in this process, which
    kills the child's group (litdata's workers with it) before passing on.

    Raises:
        UserError: If the operating system refused a write (a local folder that is not writable, ...).
    """
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_optimize_alone, args=(sender, fn, inputs, output_dir, workers, scratch))
    # What the child sends: None once done, else whether an OSError stopped it and its traceback. This default
    # stands if it ends without a word.
    outcome: tuple[bool, str] | None = (False, "")
    # Blocked until the child is in a group of its own: a Ctrl-C in between must not reach it.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        child.start()
        # Both sides move the child, as shells do, so the group exists whichever runs first (a spawned child
        # may have exec'd already, which refuses this call; its own covers it).
        with contextlib.suppress(OSError):
            os.setpgid(child.pid, child.pid)  # type: ignore[arg-type]
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        sender.close()  # the child has the copy that writes
        multiprocessing.connection.wait([receiver, child.sentinel])
        with contextlib.suppress(EOFError):
            if receiver.poll():
                outcome = receiver.recv()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if child.pid is not None:
            if outcome is not None:
                _kill_group(child)
            child.join()
    if outcome is None:
        return
    os_error, report = outcome
    if os_error:
        raise UserError(f"cannot publish to {output_dir}: {report.strip().splitlines()[-1]}")
    raise RuntimeError(f"litdata.optimize did not finish {output_dir} (exit status {child.exitcode})\n{report}".strip())


def _optimize_alone(
    result: Connection, fn: Any, inputs: list[Any], output_dir: str, workers: int, scratch: Path
) -> None:
    """`_optimize`'s child: sends None once litdata.optimize is done, or what stopped it."""
    os.setpgid(0, 0)
    # Its own group is out of reach of a kill of the parent's (kill -9 -<group>): without this, killing the
    # command would leave litdata writing on, unwatched.
    threading.Thread(target=_end_group_with, args=(os.getppid(),), name="end-with-parent", daemon=True).start()
    os.environ["DATA_OPTIMIZER_CACHE_FOLDER"] = str(scratch / "chunks")
    os.environ["DATA_OPTIMIZER_DATA_CACHE_FOLDER"] = str(scratch / "data")
    # Drops a Ctrl-C that came while this process was still in the parent's group (it was blocked).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        litdata.optimize(
            fn=fn,
            inputs=inputs,
            output_dir=output_dir,
            chunk_bytes=_CHUNK_BYTES,
            num_workers=workers,
            reorder_files=False,
            keep_data_ordered=True,  # the validation items must be in manifest order
            mode="overwrite",  # over what an interrupted publication left: it is redone from the start
            # litdata spawns by default, which imports torch again in every worker; this is a short command.
            start_method="fork" if sys.platform == "linux" else None,
            verbose=False,
        )
    except Exception as error:  # noqa: BLE001 (every failure goes to the parent; as text, as not all pickle)
        result.send((isinstance(error, OSError), traceback.format_exc()))
    else:
        result.send(None)


def _end_group_with(pid: int) -> None:
    """Kills this process's group (litdata's writers with it) once process `pid` has ended."""
    wait_for_exit(pid)
    os.killpg(0, signal.SIGKILL)


def _kill_group(child: BaseProcess) -> None:
    """Ends `_optimize`'s child and every process litdata started in it."""
    try:
        os.killpg(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
    except ProcessLookupError:  # a spawned child killed before it made its group: it has started nothing
        child.kill()


def _output_dir(remote: str, split: str) -> str:
    """Where litdata writes `split` of `remote`; a local folder is made first, so a bad one is named.

    Raises:
        UserError: If the folder cannot be made or written to.
    """
    if "://" in remote:
        return _join(remote, split)
    # litdata reads local:/folder but does not write to it.
    folder = Path(remote.removeprefix("local:")).expanduser() / split
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot publish to {remote}: {first_line(error)}") from error
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot publish to {remote}: {folder} is not writable")
    return str(folder)


def _cache_folder(remote: str, folder: Path, setting: str) -> None:
    """Makes `folder` for litdata's cache of `remote`, or raises a UserError naming the `setting` that chose it."""
    if "://" not in remote and not remote.startswith("local:"):
        return  # litdata reads a plain local folder in place
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = first_line(error)
    else:
        if os.access(folder, os.W_OK | os.X_OK):
            return
        reason = "it is not writable"
    raise UserError(f"cannot keep litdata's cache in {folder} ({reason}); set {setting} to a writable folder")


def _stalled(records: litdata.StreamingDataset, error: ChunkWaitTimeoutError) -> UserError:
    """The UserError of a chunk litdata gave up waiting for: truncated, or a download that stalled."""
    chunk = _join(records.input_dir.url or records.input_dir.path, Path(error.path).name)
    return UserError(
        f"chunk {chunk} of the published corpus was not complete after {error.waited_s:.0f} s: it is shorter "
        "than its index says (publish the corpus again) or its download stalled"
    )


def read_published(remote: str, cache_dir: str | Path, max_cache_size: str | int = "50GB") -> dict[str, Any]:
    """The manifest of the corpus published at `remote`.

    Raises:
        UserError: If nothing complete is published there.
    """
    try:
        # With its size given: litdata warns of a default otherwise (the manifest is one small chunk).
        manifest = litdata.StreamingDataset(
            _join(remote, "manifest"), cache_dir=str(cache_dir), max_cache_size=max_cache_size
        )
        text = manifest[0]
    except (FileNotFoundError, ValueError) as error:
        raise UserError(
            f"no published corpus at data.remote={remote} ({first_line(error)}); publish a prepared one with "
            "python -m wavenet.data.streaming PREPARED_FOLDER REMOTE"
        ) from error
    return json.loads(text)


def publish(
    prepared: str | Path,
    remote: str,
    val_fraction: float = 0.1,
    segment_seconds: float = 30.0,
    workers: int | None = None,
    cache_dir: str | Path | None = None,
) -> None:
    """Publishes a prepared corpus to `remote` for `StreamingDataModule`; does nothing if it is there already.

    Args:
        prepared: A folder `prepare_corpus` made (the training log names it).
        remote: Where to publish: s3://bucket/prefix, gs://..., a local folder, ...
        val_fraction: Fraction of files held out for validation, split as `AudioFolderDataModule` splits.
        segment_seconds: Length of the segments long files are cut into: litdata's unit of shuffling.
        workers: Processes writing the training items; None for one per CPU.
        cache_dir: Where litdata keeps what it reads back, and stages chunks bound for a bucket (in
            `publishing/`); None for the default data folder's.

    Raises:
        UserError: If `prepared` is no prepared corpus, `remote` holds a different published corpus or cannot be
            written to, or the cache cannot be made.
        KeyboardInterrupt: At Ctrl-C, once every process writing has stopped; the manifest, written last, is
            not, so nothing at `remote` is taken as complete.
    """
    prepared = Path(prepared)
    if not (prepared / MANIFEST).is_file():
        raise UserError(f"{prepared} is not a prepared corpus (it has no {MANIFEST})")
    # Checked as training checks it, so a damaged folder is refused before anything is written to the remote.
    manifest = Manifest.load(prepared)
    data = json.loads((prepared / MANIFEST).read_text(encoding="utf-8"))
    segment = round(segment_seconds * manifest.sample_rate)
    if segment < 1 or not 0.0 < val_fraction < 1.0 or len(manifest.files) < 2:
        raise UserError(
            f"cannot publish {prepared} with {counted(len(manifest.files), 'file')}, val_fraction={val_fraction} and "
            f"segment_seconds={segment_seconds}: needs two files, a fraction in (0, 1) and a positive length"
        )
    settings = {
        "prepared": prepared.name,
        "val_fraction": val_fraction,
        "segment": segment,
        "overlap": SEGMENT_OVERLAP,
    }
    setting = "WAVENET_DATA_DIR" if cache_dir is None else "cache_dir"
    cache_dir = default_data_dir() / "streaming" if cache_dir is None else Path(cache_dir)
    # Checked first: read_published failing on it would look like nothing published, which would be written over.
    _cache_folder(remote, cache_dir, setting)
    try:
        existing = read_published(remote, cache_dir)["published"]
    except UserError:
        existing = None
    if existing is not None:
        if {key: existing[key] for key in settings} != settings:
            raise UserError(
                f"{remote} holds another published corpus ({existing['prepared']}); publish to another place "
                "or delete it first"
            )
        log.info("%s is published at %s already", prepared.name, remote)
        return

    index = {file.relative: i for i, file in enumerate(manifest.files)}
    train, val = split_files(manifest.files, val_fraction)
    writer = _SegmentItems(prepared, manifest.shards, segment)
    workers = available_cpus() if workers is None else workers
    scratch = cache_dir / "publishing"
    for split, files, split_workers in (("train", train, workers), ("val", val, 1)):
        jobs = [(index[file.relative], file.shard, file.offset, file.frames) for file in files]
        output_dir = _output_dir(remote, split)
        log.info("Publishing %s of %s to %s", counted(len(files), f"{split} file"), prepared.name, _join(remote, split))
        _optimize(writer, jobs, output_dir, split_workers, scratch)
    published = {
        **data,
        "published": {
            **settings,
            "train_files": [index[file.relative] for file in train],
            "val_files": [index[file.relative] for file in val],
        },
    }
    _optimize(_identity, [json.dumps(published)], _output_dir(remote, "manifest"), 1, scratch)
    log.info("Published %s to %s", prepared.name, remote)


class StreamedChunks(IterableDataset[tuple[Tensor, Tensor]]):
    """Training windows cut from streamed segments, as an endless stream (training runs by steps).

    litdata hands each rank and worker its own segments, in a new order every epoch. Each file's windows
    start at a random offset below `chunk_length` and every `chunk_length` after it: every start is drawn
    with probability 1 / `chunk_length`, so sampling is uniform over samples, and the windows of an epoch
    never overlap in the targets the loss sees (as `ChunkSampler` does for local shards). A shuffle
    buffer mixes windows of many segments into every batch. Offsets and orders come from the seed.

    Args:
        records: The training segments.
        receptive_field: The model's receptive field, in samples.
        chunk_length: Targets per example that the loss uses.
        shuffle_buffer: Windows held back to shuffle.
        seed: Seed of the windows' offsets and the buffer's order (litdata's shuffle has its own copy).
        epoch_windows: About how many windows an epoch has, all ranks together (`StreamLoader` uses it).

    Attributes:
        first_epoch: The epoch the stream starts with (`StreamLoader` sets it when a run resumes).
    """

    def __init__(
        self,
        records: litdata.StreamingDataset,
        receptive_field: int,
        chunk_length: int,
        shuffle_buffer: int,
        seed: int,
        epoch_windows: int,
    ) -> None:
        self.records = records
        self.chunk_length = chunk_length
        self.window = receptive_field + chunk_length
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed % 2**63
        self.epoch_windows = max(epoch_windows, 1)
        self.first_epoch = 1

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        worker = get_worker_info()
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        rng = np.random.default_rng([self.seed, rank, worker.id if worker is not None else 0, self.first_epoch])
        buffer: list[np.ndarray] = []
        for epoch in itertools.count(self.first_epoch):
            self.records.set_epoch(epoch)
            fits = False
            try:
                for record in self.records:
                    fits = fits or len(record["audio"]) >= self.window
                    for window in self._windows(record, epoch):
                        if len(buffer) < self.shuffle_buffer:
                            buffer.append(window)
                            continue
                        slot = int(rng.integers(len(buffer)))
                        buffer[slot], window = window, buffer[slot]
                        yield self._example(window)
            except ChunkWaitTimeoutError as error:
                raise _stalled(self.records, error) from error
            # A worker whose segments hold a window but drew none this epoch (short files and a large
            # data.chunk_length leave few starts, and each is drawn with probability 1 / chunk_length) goes on.
            if not fits:
                raise UserError(
                    f"a data loader worker got no training segment as long as one window ({self.window} samples) "
                    f"in epoch {epoch}: the published corpus has too few for every rank and worker; lower "
                    "data.num_workers"
                )

    def starts(self, record: dict[str, Any], epoch: int) -> range:
        """Where the windows of a segment item start in an epoch, counted from the segment's start.

        One random offset per file and epoch, then every `chunk_length`: the segments of a file continue
        one grid, so windows on either side of a segment boundary are `chunk_length` apart as well.
        """
        count = min(int(record["owned"]), len(record["audio"]) - self.window + 1)
        offset = np.random.default_rng([self.seed, epoch, int(record["file"])]).integers(self.chunk_length)
        return range(int(offset - int(record["start"])) % self.chunk_length, max(count, 0), self.chunk_length)

    def _windows(self, record: dict[str, Any], epoch: int) -> Iterator[np.ndarray]:
        for start in self.starts(record, epoch):
            # A copy: a view would keep the whole segment alive for as long as the window waits in the buffer.
            yield np.array(record["audio"][start : start + self.window])

    @staticmethod
    def _example(window: np.ndarray) -> tuple[Tensor, Tensor]:
        classes = torch.from_numpy(window.astype(np.int64))
        return classes[:-1], classes[1:]


class StreamLoader(SignalSafeLoader):
    """The training DataLoader of a `StreamedChunks`: a resumed run streams a new epoch, not its start again.

    Lightning saves a loader's `state_dict()` in every checkpoint and passes it back to `load_state_dict`
    when a run resumes, before the first batch. The state is the number of windows all ranks have trained
    on, which says how many epochs the run has begun; the resumed stream starts with the next one (without
    this, every resume would train again on the run's first windows, in the same order). The rest of the
    interrupted epoch is not trained on: its windows wait in the workers' shuffle buffers and litdata's
    readers, which a checkpoint does not hold; a new epoch is a new draw, uniform over samples like any.
    """

    dataset: StreamedChunks

    def __init__(self, dataset: StreamedChunks, *args: Any, world_size: int, **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.world_size = world_size
        self._run_batches = 0
        self._resume_state: dict[str, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"windows": self._run_batches * self.batch_size * self.world_size}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume_state = dict(state_dict)

    def __iter__(self) -> Iterator[Any]:
        # A generator, so the epoch is set before the workers take their copy of the dataset.
        resume, self._resume_state = self._resume_state, None
        if resume is not None:
            windows = resume.get("windows", 0)
            self.dataset.first_epoch = windows // self.dataset.epoch_windows + 2
            self._run_batches = windows // (self.batch_size * self.world_size)
        for batch in super().__iter__():
            self._run_batches += 1
            yield batch


class _SegmentReader:
    """`read` of the validation windows: samples of a segment item, keeping the last item decoded."""

    def __init__(self, records: litdata.StreamingDataset) -> None:
        self.records = records
        self._last: tuple[int, np.ndarray] | None = None

    def __call__(self, segment: Segment, start: int, length: int) -> np.ndarray:
        # Validation reads a segment's windows one after another: decode it once, not once per window.
        if self._last is None or self._last[0] != segment.index:
            try:
                self._last = (segment.index, self.records[segment.index]["audio"])
            except ChunkWaitTimeoutError as error:
                raise _stalled(self.records, error) from error
        return self._last[1][start : start + length]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_last": None}


class StreamingDataModule(ChunkDataModule):
    """A corpus published with `publish`, streamed from `remote` through a local cache.

    Training is an endless stream of windows (train by `trainer.max_steps`, as the configs do);
    validation is a fixed set of windows of the validation files, as for local corpora.

    Args:
        remote: Where the corpus was published (s3://bucket/prefix, gs://..., a local folder, ...).
        receptive_field: The model's receptive field, in samples.
        cache_dir: Where litdata caches downloaded chunks; None for the default data folder's.
        max_cache_size: Most disk the cache may take ("50GB"); chunks are evicted past it.
        sample_rate: Must be the published corpus's (the model is built for it).
        quantization_channels: Must be the published corpus's.
        chunk_length: Number of targets per example that the loss uses.
        batch_size: Examples per batch (per process under DDP).
        num_workers: DataLoader worker processes; each streams its own segments.
        shuffle_buffer: Training windows held back per worker to shuffle.
        seed: Seed of litdata's shuffle and of the windows' offsets (the config passes `${seed}`).
    """

    def __init__(
        self,
        remote: str,
        receptive_field: int,
        cache_dir: str | Path | None = None,
        max_cache_size: str | int = "50GB",
        sample_rate: int = 16000,
        quantization_channels: int = 256,
        chunk_length: int = 4096,
        batch_size: int = 4,
        num_workers: int = 2,
        shuffle_buffer: int = 4096,
        seed: int = 0,
    ) -> None:
        super().__init__(
            receptive_field, sample_rate, quantization_channels, chunk_length, batch_size, num_workers, seed
        )
        check_data_settings({"shuffle_buffer": shuffle_buffer})
        self.remote = str(remote) if "://" in str(remote) else str(Path(remote).expanduser())
        self.cache_dir = default_data_dir() / "streaming" if cache_dir is None else Path(cache_dir).expanduser()
        self.max_cache_size = max_cache_size
        self.shuffle_buffer = shuffle_buffer
        self.manifest: Manifest | None = None
        self.train_set: StreamedChunks | None = None

    def setup(self, stage: str | None = None) -> None:
        """Reads the published manifest and opens the training and validation streams.

        Raises:
            UserError: If nothing complete is published at `remote`, its sample rate or mu-law levels differ
                from the settings, no validation segment is as long as one window, or the cache cannot be made.
        """
        if self.train_set is not None:
            return
        _cache_folder(self.remote, self.cache_dir, "data.cache_dir")
        data = read_published(self.remote, self.cache_dir, self.max_cache_size)
        for key in ("sample_rate", "quantization_channels"):
            if data[key] != getattr(self, key):
                raise UserError(
                    f"the corpus at data.remote={self.remote} has {key}={data[key]}, but data.{key}="
                    f"{getattr(self, key)}; set data.{key}={data[key]} or publish a corpus prepared with it"
                )
        published = data["published"]
        if self.window > published["overlap"] + 1:
            log.warning(
                "Windows of %d samples are longer than the published segments' overlap (%d): starts in the "
                "last %d samples of each segment are never drawn",
                self.window, published["overlap"], self.window - published["overlap"] - 1,
            )  # fmt: skip
        self.manifest = manifest = Manifest.from_dict(data, Path(self.remote))
        # Four chunks ahead: litdata raises it to four for its concurrent downloads, saying so every epoch.
        records = dict(cache_dir=str(self.cache_dir), max_cache_size=self.max_cache_size, max_pre_download=4)
        train_starts = sum(max(manifest.files[i].frames - self.window + 1, 0) for i in published["train_files"])
        if not train_starts:
            raise UserError(
                f"no training file of the corpus at data.remote={self.remote} is as long as one window "
                f"({self.window} samples: the receptive field, {self.receptive_field}, plus data.chunk_length, "
                f"{self.chunk_length}): lower data.chunk_length"
            )
        train_records = self._records("train", shuffle=True, seed=self.seed % 2**31, **records)
        self.train_set = StreamedChunks(
            train_records,
            self.receptive_field,
            self.chunk_length,
            self.shuffle_buffer,
            self.seed,
            epoch_windows=train_starts // self.chunk_length,
        )
        # Item i of the validation dataset is the i-th segment of the validation files in manifest order.
        val_files = [manifest.files[index] for index in published["val_files"]]
        cuts = [(file, cut) for file in val_files for cut in segments(file.frames, published["segment"])]
        val_segments = [Segment(index, file, *cut) for index, (file, cut) in enumerate(cuts)]
        usable = [s for s in val_segments if min(s.owned, s.frames - self.window + 1) > 0]
        if not usable:
            raise UserError(
                f"no validation file of the corpus at data.remote={self.remote} is as long as one window "
                f"({self.window} samples): lower data.chunk_length"
            )
        val_records = self._records("val", shuffle=False, **records)
        self.val_set = FixedChunks(
            usable,
            [min(s.owned, s.frames - self.window + 1) for s in usable],
            _SegmentReader(val_records),
            self.receptive_field,
            self.chunk_length,
            self.sample_rate,
            self.quantization_channels,
        )
        hours = sum(manifest.files[i].frames for i in published["train_files"]) / self.sample_rate / 3600
        log.info(
            "Streaming %.2f h of training audio (%d files) from %s",
            hours,
            len(published["train_files"]),
            self.remote,
        )

    def _records(self, split: str, **options: Any) -> litdata.StreamingDataset:
        try:
            return litdata.StreamingDataset(_join(self.remote, split), **options)
        except (FileNotFoundError, ValueError) as error:
            raise UserError(
                f"the corpus at data.remote={self.remote} has a manifest but no complete {split}/ "
                f"({first_line(error)}); publish it again with "
                "python -m wavenet.data.streaming PREPARED_FOLDER REMOTE"
            ) from error

    def train_dataloader(self) -> DataLoader[tuple[Tensor, Tensor]]:
        assert self.train_set is not None, "setup() must run first"
        _, world_size = self._distributed()
        return self._loader(self.train_set, loader_class=functools.partial(StreamLoader, world_size=world_size))


def main(argv: list[str] | None = None) -> None:
    """`python -m wavenet.data.streaming PREPARED REMOTE`: publishes a prepared corpus."""
    parser = argparse.ArgumentParser(
        prog="python -m wavenet.data.streaming",
        description="Publishes a prepared corpus to object storage (or a folder) for data=streaming.",
    )
    parser.add_argument("prepared", help="a prepared corpus folder (the training log names it)")
    parser.add_argument("remote", help="s3://bucket/prefix, gs://..., a local folder, ...")
    parser.add_argument(
        "--val-fraction", type=float, default=0.1,
        help="files held out for validation (default: 0.1); data=streaming keeps this split",
    )  # fmt: skip
    parser.add_argument("--segment-seconds", type=float, default=30.0, help="litdata's unit of shuffling (default: 30)")
    parser.add_argument("--workers", type=int, default=None, help="processes writing (default: one per CPU)")
    parser.add_argument(
        "--cache-dir", default=None,
        help="where chunks bound for a bucket are staged, and read back (default: $WAVENET_DATA_DIR/streaming)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("litdata").setLevel(logging.WARNING)  # it reports each dataset's cache size at INFO
    try:
        publish(args.prepared, args.remote, args.val_fraction, args.segment_seconds, args.workers, args.cache_dir)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(
            f"interrupted: nothing published to {args.remote} is complete; run the same command again",
            file=sys.stderr,
        )
        sys.exit(130)  # what a shell reports for a command Ctrl-C ended


if __name__ == "__main__":
    main()
