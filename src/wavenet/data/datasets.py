"""Datasets of mu-law windows read from audio files on demand: only an index of files stays in memory.

An example is a window of `receptive_field + chunk_length` consecutive samples, returned as
`(inputs, targets) = (window[:-1], window[1:])`, both int64. The model predicts every target from the
inputs up to it, and the loss keeps the last `chunk_length` targets, each of which sees a full receptive
field of real audio.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from wavenet.data.audio import read_audio
from wavenet.data.mulaw import mu_law_encode

# Any large odd number spreads consecutive indices over the corpus; this one is 2**64 / golden ratio.
_INDEX_STRIDE = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class AudioFile:
    """One file of the corpus, as its header describes it."""

    path: Path
    frames: int  # at the dataset's sample rate, after resampling


class _Windows(Dataset[tuple[Tensor, Tensor]]):
    """Reads windows of `files` as mu-law examples; subclasses say which window an index means."""

    def __init__(
        self,
        files: list[AudioFile],
        receptive_field: int,
        chunk_length: int,
        sample_rate: int,
        quantization_channels: int,
    ) -> None:
        self.files = files
        self.chunk_length = chunk_length
        self.window = receptive_field + chunk_length
        self.sample_rate = sample_rate
        self.quantization_channels = quantization_channels
        assert all(file.frames >= self.window for file in files), "shorter files are skipped in indexing"

    def _tiles(self, file: AudioFile) -> int:
        """Number of windows whose last `chunk_length` samples tile the file without overlap."""
        return (file.frames - self.window) // self.chunk_length + 1

    def _example(self, file: AudioFile, start: int) -> tuple[Tensor, Tensor]:
        audio = read_audio(file.path, self.sample_rate, start, self.window)
        window = mu_law_encode(audio, self.quantization_channels)  # (receptive_field + chunk_length,)
        return window[:-1], window[1:]


def _locate(ends: list[int], position: int) -> tuple[int, int]:
    """(file index, offset in that file) of `position` in files laid end to end, `ends` their cumsum."""
    index = bisect.bisect_right(ends, position)
    return index, position - (ends[index - 1] if index else 0)


class RandomWindows(_Windows):
    """Training examples: windows drawn uniformly over every valid start of every file.

    Its length is the number of non-overlapping chunks the files hold, so an epoch covers about as much
    audio as the corpus; the index itself picks nothing. Draws use torch's global RNG, which
    `lightning.seed_everything(seed, workers=True)` seeds in the main process and in every worker.
    """

    def __init__(
        self,
        files: list[AudioFile],
        receptive_field: int,
        chunk_length: int,
        sample_rate: int,
        quantization_channels: int,
    ) -> None:
        super().__init__(files, receptive_field, chunk_length, sample_rate, quantization_channels)
        # Drawing a position among all starts of all files, rather than a file and then a start, weights
        # each file by its length: every sample of the corpus is equally likely.
        self._ends = list(itertools.accumulate(file.frames - self.window + 1 for file in files))
        self._length = sum(self._tiles(file) for file in files)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        total = self._ends[-1]
        draw = int(torch.randint(total, ()).item())
        # Ranks under DDP (and workers without Lightning's seeding) can share an RNG state, but they are
        # given different indices: offsetting the draw by its index keeps their windows apart, and a
        # uniform draw plus any fixed offset, modulo the total, is still uniform.
        file_index, start = _locate(self._ends, (draw + index * _INDEX_STRIDE) % total)
        return self._example(self.files[file_index], start)


class TiledWindows(_Windows):
    """Validation examples: every file cut into consecutive windows, the same ones every time.

    The windows' last `chunk_length` samples, the ones the loss sees, tile each file from its first
    full receptive field on, without overlap.
    """

    def __init__(
        self,
        files: list[AudioFile],
        receptive_field: int,
        chunk_length: int,
        sample_rate: int,
        quantization_channels: int,
    ) -> None:
        super().__init__(files, receptive_field, chunk_length, sample_rate, quantization_channels)
        self._ends = list(itertools.accumulate(self._tiles(file) for file in files))

    def __len__(self) -> int:
        return self._ends[-1]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} windows")
        file_index, tile = _locate(self._ends, index)
        return self._example(self.files[file_index], tile * self.chunk_length)
