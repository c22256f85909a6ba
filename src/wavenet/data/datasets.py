"""Datasets of mu-law windows sliced from prepared audio, and the sampler that spreads them over an epoch.

An example is a window of `receptive_field + chunk_length` consecutive samples of one file, returned as
`(inputs, targets) = (window[:-1], window[1:])`, both int64. The model predicts every target from the
inputs up to it, and the loss keeps the last `chunk_length` targets, each of which sees a full receptive
field of real audio. Windows never cross from one file into the next.

The datasets see a corpus as tracks (prepared files, or segments of them) and a `read(track, start,
length)` that returns the track's mu-law classes; `ShardReader` is the one for memory-mapped shards.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from wavenet.data.prepare import PreparedFile
from wavenet.signals import Handling

Track = TypeVar("Track")
# (track, first sample, number of samples) -> (length,) uint8 mu-law classes
Reader = Callable[[Track, int, int], np.ndarray]

log = logging.getLogger(__name__)


class ShardReader:
    """Reads stretches of prepared files from their memory-mapped `uint8` shards.

    Each process maps the shards itself on first use: a mapping is not sent to DataLoader workers (a
    pickled `np.memmap` would be a full copy), and pages are shared through the OS page cache.
    """

    def __init__(self, directory: Path, shards: Sequence[str]) -> None:
        self.paths = [directory / name for name in shards]
        self._maps: list[np.memmap] | None = None

    def __call__(self, file: PreparedFile, start: int, length: int) -> np.ndarray:
        if self._maps is None:
            self._maps = [np.memmap(path, dtype=np.uint8, mode="r") for path in self.paths]
        begin = file.offset + start
        return self._maps[file.shard][begin : begin + length]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}


class _Chunks(Dataset[tuple[Tensor, Tensor]], Generic[Track]):
    """Windows of `tracks`; subclasses say which window an index means.

    Args:
        tracks: What `read` reads from (the `files` attribute, for callers that want the metadata).
        starts: Number of first samples a window may start at in each track.
        read: Reads samples of a track.
        receptive_field: The model's receptive field, in samples.
        chunk_length: Targets per example that the loss uses.
        sample_rate: Of the audio (for callers that decode examples back to audio).
        quantization_channels: Number of mu-law classes.
    """

    def __init__(
        self,
        tracks: Sequence[Track],
        starts: Sequence[int],
        read: Reader,
        receptive_field: int,
        chunk_length: int,
        sample_rate: int,
        quantization_channels: int,
    ) -> None:
        assert len(tracks) == len(starts) and all(count > 0 for count in starts), (
            "tracks too short are left out"
        )
        self.files = list(tracks)
        self.starts = list(starts)
        self.read = read
        self.chunk_length = chunk_length
        self.window = receptive_field + chunk_length
        self.sample_rate = sample_rate
        self.quantization_channels = quantization_channels

    def _example(self, track: int, start: int) -> tuple[Tensor, Tensor]:
        window = torch.from_numpy(
            np.asarray(self.read(self.files[track], start, self.window), dtype=np.int64)
        )
        return window[:-1], window[1:]


def _locate(ends: list[int], position: int) -> tuple[int, int]:
    """(track, offset in that track) of `position` in tracks laid end to end, `ends` their cumsum."""
    track = bisect.bisect_right(ends, position)
    return track, position - (ends[track - 1] if track else 0)


class RandomChunks(_Chunks[Track]):
    """Training windows, indexed by their start: index p is the p-th valid start of all tracks end to end.

    Its length is the number of valid starts, every sample of the corpus at which a window fits; which
    of them an epoch uses is `ChunkSampler`'s choice.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ends = list(itertools.accumulate(self.starts))

    def __len__(self) -> int:
        return self._ends[-1]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} window starts")
        return self._example(*_locate(self._ends, index))


class FixedChunks(_Chunks[Track]):
    """Validation windows: every track cut into consecutive windows, the same ones every time.

    The windows' last `chunk_length` samples, the ones the loss sees, tile each track from its first
    full receptive field on, without overlap.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ends = list(itertools.accumulate(-(-count // self.chunk_length) for count in self.starts))

    def __len__(self) -> int:
        return self._ends[-1]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} windows")
        track, tile = _locate(self._ends, index)
        return self._example(track, tile * self.chunk_length)


# Window starts a sampler turns into Python ints at a time.
_BLOCK = 2**16


class ChunkSampler(DistributedSampler):
    """The training windows of one rank for each epoch: uniform over samples, disjoint, new every epoch.

    An epoch is a systematic sample of all valid starts laid end to end: `strata = starts // chunk_length`
    points `stride = starts / strata` (at least `chunk_length`) apart, shifted by a random fraction of a
    stride, in a random order. Every start is equally likely to be drawn, so files weigh by their length;
    two windows of an epoch are at least `chunk_length` apart, so no sample is scored twice in an epoch
    (across ranks and workers too: each rank takes every `num_replicas`-th point, and the DataLoader hands
    each batch of those to one worker); the shift and the order come from `(seed, epoch)`, so every epoch
    differs and a run repeats exactly from its seed.

    Lightning leaves a `DistributedSampler` in place and calls its `set_epoch` every epoch; this one gets
    the rank and world size from the data module, which reads them from the trainer.

    Args:
        dataset: The training windows.
        num_replicas: Number of ranks.
        rank: This process's rank.
        seed: Seed of the epochs' shifts and orders.

    Attributes:
        skip: Windows of the epoch's order, all ranks together, that the next iteration passes over
            because they were trained on before a resume (`ChunkLoader` sets it).
    """

    def __init__(self, dataset: RandomChunks, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.starts = len(dataset)
        self.strata = self.starts // dataset.chunk_length
        # Every rank takes the same number of windows, or DDP would wait at the end of an epoch forever.
        self.num_samples = self.strata // num_replicas
        self.total_size = self.num_samples * num_replicas
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed % 2**63, self.epoch])
        shift = rng.random()
        # Rounded up to whole rounds of ranks, so ranks still take equal shares after a world-size change.
        first = -(-self.skip // self.num_replicas) * self.num_replicas + self.rank
        order = rng.permutation(self.strata)[first : self.total_size : self.num_replicas]
        positions = np.floor((order + shift) * (self.starts / self.strata)).astype(np.int64)
        # Python ints a block at a time: for a corpus of 10^7 windows a whole epoch's would take half a GB.
        return itertools.chain.from_iterable(
            positions[begin : begin + _BLOCK].tolist() for begin in range(0, len(positions), _BLOCK)
        )

    def __len__(self) -> int:
        return self.num_samples


class SignalSafeLoader(DataLoader):
    """A DataLoader whose worker processes start with Ctrl-C, SIGTERM and SIGHUP blocked (a fork keeps the mask) until
    their `worker_init_fn` (`leave_stops_to`) takes them: a job's signal that came while a worker was still
    starting killed it, and the run ended in "DataLoader worker (pid N) exited unexpectedly", status 1, rather than
    stop as it does a moment later. This process's own handlers wait for the workers' start (milliseconds) too: a
    KeyboardInterrupt inside it left a half-made iterator, whose clean-up printed a traceback."""

    def _get_iterator(self) -> Any:
        stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        held: list[int] = []
        try:
            with Handling(lambda signum, frame: held.append(signum), *stops):
                blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
                try:
                    return super()._get_iterator()
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        finally:
            for signum in dict.fromkeys(held):
                signal.raise_signal(signum)


class ChunkLoader(SignalSafeLoader):
    """The training DataLoader of a `ChunkSampler`, which resumes mid-epoch where a checkpoint left off.

    Lightning saves a loader's `state_dict()` in every checkpoint and passes it back to `load_state_dict`
    when a run resumes, before the first batch. The state is the epoch and the number of windows all
    ranks have trained on in it: an interrupted epoch continues with the next window of its order
    instead of starting over (which would train twice on its first part), also after a change of batch
    size or world size. Lightning does not prefetch from a loader with a length, so the batches this
    loader has handed out are exactly those trained on. The state also holds what the order is drawn
    from (seed, chunk length, number of window starts): a run resumed mid-epoch in another order warns.
    """

    dataset: RandomChunks
    sampler: ChunkSampler | Sampler[int]  # Lightning puts a SequentialSampler in for trainer.overfit_batches

    def __init__(self, dataset: RandomChunks, *args: Any, sampler: Sampler[int], **kwargs: Any) -> None:
        super().__init__(dataset, *args, sampler=sampler, **kwargs)
        self._epoch_batches = 0
        self._resume_state: dict[str, int] | None = None

    def state_dict(self) -> dict[str, int]:
        if not isinstance(self.sampler, ChunkSampler):  # Lightning's own (trainer.overfit_batches): no epochs
            return {}
        windows = self._epoch_batches * self.batch_size * self.sampler.num_replicas
        return {"epoch": self.sampler.epoch, "windows": windows, **self._order()}

    def _order(self) -> dict[str, int]:
        """What an epoch's order is drawn from, besides the epoch: a resume compares the checkpoint's."""
        assert isinstance(self.sampler, ChunkSampler)
        return {"seed": self.sampler.seed, "chunk_length": self.dataset.chunk_length, "starts": self.sampler.starts}

    def _warn_if_reordered(self, resume: dict[str, int], done: int) -> None:
        """Warns where the interrupted epoch's order is not the checkpoint's, so that skipping the windows it
        trained on passes over others (older checkpoints did not save the order: nothing to compare)."""
        order = self._order()
        if self.sampler.rank != 0 or not done or not set(order) <= set(resume):
            return
        differ = [
            f"{key}={order[name]} (the checkpoint's: {resume[name]})"
            for name, key in (("seed", "data.seed"), ("chunk_length", "data.chunk_length"))
            if order[name] != resume[name]
        ]
        if not differ and order["starts"] != resume["starts"]:
            differ = [f"the corpus, with {order['starts']:,} window starts (the checkpoint's: {resume['starts']:,})"]
        if differ:
            log.warning(
                "Resuming epoch %d after %d windows in another order than the checkpoint's: %s. The rest of the "
                "epoch follows this run's order, so it may train again on windows trained on before the resume, "
                "and leave others out; the next epochs are whole",
                resume["epoch"],
                done,
                ", ".join(differ),
            )

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume_state = dict(state_dict)

    def __iter__(self) -> Iterator[Any]:
        # A generator, so nothing is read until the first batch is asked for: Lightning creates the
        # iterator of a resumed run before it sets the sampler's epoch, and the epoch decides the order.
        resume, self._resume_state = self._resume_state, None
        if not isinstance(self.sampler, ChunkSampler):
            yield from super().__iter__()
            return
        # A state without this epoch (another epoch's, or a streamed run's) leaves nothing to pass over.
        done = resume.get("windows", 0) if resume is not None and resume.get("epoch") == self.sampler.epoch else 0
        if resume is not None:
            self._warn_if_reordered(resume, done)
        self.sampler.skip = done
        per_batch = self.batch_size * self.sampler.num_replicas
        self._epoch_batches = -(-done // per_batch)
        for batch in super().__iter__():
            self._epoch_batches += 1
            yield batch
