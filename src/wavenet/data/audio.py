"""Audio files in and out: soundfile for I/O (torchaudio.load/save need ffmpeg), torchaudio to resample.

Everything here works on float32 mono at a target sample rate. A region of a file can be read on its own,
resampled exactly as if the whole file had been resampled and then cut, so preparation decodes a long
recording block by block, and sample logging reads a few seconds of a file, without holding it in memory.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from stat import S_ISREG
from typing import NamedTuple

import numpy as np
import soundfile as sf
import torch
from torch import Tensor
from torchaudio.transforms import Resample

from wavenet.errors import UserError

log = logging.getLogger(__name__)

# torchaudio's defaults, passed explicitly because `_resample_margin` must agree with them.
_LOWPASS_FILTER_WIDTH = 6
_ROLLOFF = 0.99


# The reason `UnreadableAudioError` gives for a file of no bytes (preparation reports those as empty).
EMPTY_FILE = "empty file (0 bytes)"
# Frames a read may come up short of what the header promised before the file counts as truncated: libsndfile's
# Ogg Vorbis seeking can land up to one lapped block late (issue #885), and Vorbis's largest block is 8,192 frames.
# A cut-off MP3 (a partial download or copy) keeps the length its Xing header gives: read as it was, the missing
# seconds became silence that training took for audio.
_READ_SLACK = 8192
# Largest magnitude taken as audio. Integer formats decode within [-1, 1]; a float file may overshoot a little
# (clipped masters, resampling ringing) but not by this much: beyond, it holds integer values saved as float.
_MAX_PEAK = 2.0


def peak_problem(peak: float) -> str | None:
    """Why audio whose largest magnitude is `peak` is no audio (float samples in integer units, which mu-law would
    clip to a square wave), or None."""
    if peak <= _MAX_PEAK:
        return None
    return f"samples reach {peak:.6g}, far outside audio's [-1, 1] (float samples in integer units?)"


class _TruncatedError(Exception):
    """A file decodes to far fewer frames than its header gives."""


class UnreadableAudioError(UserError):
    """An audio file that cannot be opened or decoded; `reason` says why (the OS's or libsndfile's words)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"cannot read audio file {path}: {reason}")
        self.path = path
        self.reason = reason


class AudioHeader(NamedTuple):
    frames: int
    samplerate: int
    format: str  # libsndfile's container, whatever the file's name: "WAV", "FLAC", "OGG", "MP3", ...


def audio_header(path: str | Path) -> AudioHeader:
    """The header of an audio file, read without decoding it.

    Raises:
        UnreadableAudioError: If the file cannot be opened as audio; the message names the file and why.
    """
    try:
        with _sound_file(path) as file:
            return AudioHeader(file.frames, file.samplerate, file.format)
    except (sf.SoundFileError, OSError) as error:
        raise UnreadableAudioError(path, _reason(path, error)) from error


def audio_info(path: str | Path) -> tuple[int, int]:
    """Returns `(frames, samplerate)` of an audio file from its header (see `audio_header`)."""
    header = audio_header(path)
    return header.frames, header.samplerate


@contextlib.contextmanager
def _sound_file(path: str | Path) -> Iterator[sf.SoundFile]:
    """The file opened for reading. libsndfile takes names as UTF-8: one that is not (a Latin-1 name from an
    older corpus, which Python holds with surrogate escapes) is opened by Python and read through it."""
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        with open(path, "rb") as raw, sf.SoundFile(raw) as file:
            yield file
        return
    with sf.SoundFile(name) as file:
        yield file


def resampled_length(frames: int, file_rate: int, sample_rate: int) -> int:
    """Number of samples `frames` samples at `file_rate` become at `sample_rate` (torchaudio's rounding)."""
    return -(-frames * sample_rate // file_rate)


def read_audio(
    path: str | Path, sample_rate: int, start: int | None = None, frames: int | None = None
) -> Tensor:
    """Reads a file, or a region of it, as float32 mono at `sample_rate`.

    Channels are averaged. A region is resampled on its own with a margin of source samples on each side,
    so it equals (to float rounding) the same region of the whole file resampled at once. That is exact
    for PCM and FLAC; libsndfile's Ogg Vorbis seeking can land a little late in the last page of a file
    (libsndfile issue #885), which shifts such a region by a few hundred samples but keeps it contiguous.

    Args:
        path: Any format libsndfile reads (wav, flac, ogg, mp3, ...).
        sample_rate: The rate of the returned samples; the file is resampled if its rate differs.
        start: First sample to return, counted at `sample_rate`. None reads from the beginning.
        frames: Number of samples to return, counted at `sample_rate`; past the end of the file they are
            zeros, as whole-file resampling pads with zeros. None reads to the end of the file.

    Returns:
        (T,) float32.

    Raises:
        UnreadableAudioError: If the file cannot be opened or decoded; the message names the file and why.
    """
    start = 0 if start is None else start
    if start < 0 or (frames is not None and frames < 0):
        raise ValueError(f"start ({start}) and frames ({frames}) must not be negative")
    try:
        with _sound_file(path) as file:
            file_rate = file.samplerate
            total = resampled_length(file.frames, file_rate, sample_rate)
            frames = max(total - start, 0) if frames is None else frames
            if file_rate == sample_rate:
                audio = _read_source(file, start, frames)
            else:
                audio = _read_resampled(file, sample_rate, start, frames)
                # The resampler rings past the last sample; whole-file resampling crops that away.
                audio[max(total - start, 0) :] = 0.0
    except (sf.SoundFileError, OSError) as error:
        raise UnreadableAudioError(path, _reason(path, error)) from error
    except _TruncatedError as error:
        raise UnreadableAudioError(path, str(error)) from error
    return torch.from_numpy(audio)


def _read_source(file: sf.SoundFile, start: int, frames: int) -> np.ndarray:
    """Source samples [start, start + frames) mixed to mono, zeros where that range leaves the file."""
    audio = np.zeros(frames, dtype=np.float32)
    begin, end = max(start, 0), min(start + frames, file.frames)
    if end > begin:
        file.seek(begin)
        data = file.read(end - begin, dtype="float32", always_2d=True).mean(axis=1)
        if end - begin - len(data) > _READ_SLACK:
            raise _TruncatedError(
                f"truncated: it decodes to {begin + len(data):,} of the {file.frames:,} samples its header gives"
            )
        # A seek that landed a little late leaves the last few frames of the region silent.
        audio[begin - start : begin - start + len(data)] = data
    return audio


def _read_resampled(file: sf.SoundFile, sample_rate: int, start: int, frames: int) -> np.ndarray:
    """Samples [start, start + frames) at `sample_rate` of a file at another rate."""
    source_step, target_step = _steps(file.samplerate, sample_rate)
    # The resampler's output phase is set by where its input begins: beginning on a multiple of
    # `source_step` source samples (= `target_step` target samples) puts its outputs on the same grid as
    # whole-file resampling. The region read is widened down to that grid and cropped afterwards.
    aligned = start // target_step * target_step
    offset = start - aligned
    steps = -(-(offset + frames) // target_step)
    margin_steps = -(-_resample_margin(file.samplerate, sample_rate) // source_step)
    source = _read_source(
        file,
        (aligned // target_step - margin_steps) * source_step,
        (steps + 2 * margin_steps) * source_step,
    )
    resampled = _resampler(file.samplerate, sample_rate)(torch.from_numpy(source))
    first = margin_steps * target_step + offset
    return resampled[first : first + frames].numpy()


@functools.lru_cache(maxsize=8)
def _resampler(file_rate: int, sample_rate: int) -> Resample:
    """`torchaudio.functional.resample` with its sinc kernel computed once per pair of rates, not per call.

    Building the kernel costs three times as much as applying it to a window.
    """
    source_step, target_step = _steps(file_rate, sample_rate)
    return Resample(source_step, target_step, lowpass_filter_width=_LOWPASS_FILTER_WIDTH, rolloff=_ROLLOFF)


# Most (source step x target step) of a resampling ratio: torchaudio's sinc kernel holds about that many floats
# (48,001 Hz to 16 kHz, steps 48,001 and 16,000, would take 3 GB and more per call).
_MAX_RATIO_TERMS = 1_000_000


@functools.lru_cache(maxsize=64)
def _steps(file_rate: int, sample_rate: int) -> tuple[int, int]:
    """(source step, target step): `target step` output samples for every `source step` input ones; the rates'
    ratio reduced, or, where its terms are too large, its nearest fraction of small enough terms (a rate pair
    with no large common factor, as 48,001 Hz or 16,001 Hz has with the usual rates)."""
    gcd = math.gcd(file_rate, sample_rate)
    source_step, target_step = file_rate // gcd, sample_rate // gcd
    if source_step * target_step <= _MAX_RATIO_TERMS:
        return source_step, target_step
    # A fraction n / d near sample_rate / file_rate has n * d ~ d ** 2 * sample_rate / file_rate.
    ratio = Fraction(sample_rate, file_rate).limit_denominator(math.isqrt(_MAX_RATIO_TERMS * file_rate // sample_rate))
    log.warning(
        "Resampling %d Hz to %d Hz as %d to %d (a ratio off by %.2g %%): the exact ratio's terms would take too "
        "large a filter",
        file_rate, sample_rate, ratio.denominator, ratio.numerator,
        abs(float(ratio) * file_rate / sample_rate - 1.0) * 100,
    )  # fmt: skip
    return ratio.denominator, ratio.numerator


def _resample_margin(file_rate: int, sample_rate: int) -> int:
    """Source samples on each side that one resampled output depends on (half the sinc kernel, plus one)."""
    return math.ceil(_LOWPASS_FILTER_WIDTH * file_rate / (min(file_rate, sample_rate) * _ROLLOFF)) + 1


def write_wav(path: str | Path, audio: Tensor, sample_rate: int) -> None:
    """Writes (T,) float audio in [-1, 1] as a 16-bit PCM WAV file; values outside are clipped."""
    if audio.dim() != 1:
        raise ValueError(f"write_wav expects mono audio of shape (T,), got {tuple(audio.shape)}")
    samples = audio.detach().to("cpu", torch.float32).clamp(-1.0, 1.0).numpy()
    sf.write(str(path), samples, sample_rate, subtype="PCM_16", format="WAV")


class AudioFiles(NamedTuple):
    """What `scan_audio_files` found under a folder."""

    paths: list[Path]  # sorted, each file once
    duplicates: list[tuple[Path, Path]]  # (path, the listed path of the same file): links, hard or symbolic
    unreadable_folders: list[tuple[Path, str]]  # (folder, why it could not be listed)
    broken: list[tuple[Path, str]]  # (path, why it cannot be opened): a link to nothing, a loop of links


def scan_audio_files(root: str | Path, extensions: Iterable[str]) -> AudioFiles:
    """The files under `root` whose extension is one of `extensions`, recursively, through folder links.

    Extensions are matched case-insensitively, with or without their leading dot. Hidden files and folders
    (names starting with a dot) under `root` are passed over. A file reached by two
    paths (a link to another file of the corpus) is listed once, under the first path in sorted order, as
    training on it twice would weigh it double, or score validation on training audio. A folder reached
    twice (a link to a parent) is walked once. A link to nothing is listed as broken, not passed over: a
    dataset whose content was never fetched (git-annex, DataLad) is such links, and a corpus missing some of
    its files must say so.

    Raises:
        UserError: If `root` itself cannot be listed.
    """
    root = Path(root)
    wanted = {extension.lower().lstrip(".") for extension in extensions}
    unreadable: list[tuple[Path, str]] = []
    visited: set[tuple[int, int]] = set()
    found = []

    def unlisted(error: OSError) -> None:
        unreadable.append((Path(error.filename), error.strerror or str(error)))

    for folder, folders, names in os.walk(root, onerror=unlisted, followlinks=True):
        identity = os.stat(folder)
        if (identity.st_dev, identity.st_ino) in visited:
            folders.clear()
            continue
        visited.add((identity.st_dev, identity.st_ino))
        # Hidden names are not the corpus: macOS's ._x.wav beside every copied file, .git, editors' backups.
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        found += [
            Path(folder, name)
            for name in names
            if not name.startswith(".") and Path(name).suffix.lower().lstrip(".") in wanted
        ]
    if unreadable and unreadable[0][0] == root:
        raise UserError(f"cannot list data root {root}: {unreadable[0][1]}")
    paths, duplicates, broken, first_path = [], [], [], {}
    for path in sorted(found):
        try:
            stat = path.stat()
        except OSError as error:
            what = f"link to {os.readlink(path)}, which cannot be opened" if path.is_symlink() else "cannot be opened"
            broken.append((path, f"{what} ({error.strerror or error})"))
            continue
        if not S_ISREG(stat.st_mode):
            continue
        first = first_path.setdefault((stat.st_dev, stat.st_ino), path)
        if first is path:
            paths.append(path)
        else:
            duplicates.append((path, first))
    return AudioFiles(paths, duplicates, sorted(unreadable), broken)


def find_audio_files(root: str | Path, extensions: Iterable[str]) -> list[Path]:
    """The paths of `scan_audio_files`: each audio file under `root` once, in sorted order."""
    return scan_audio_files(root, extensions).paths


def _reason(path: str | Path, error: Exception) -> str:
    """Why a file could not be read: "Permission denied", "empty file (0 bytes)", or the useful part of
    soundfile's error ("Format not recognised."), without the repeated file name.

    libsndfile reports a file it may not open as "System error." and one of no bytes as an unknown format.
    """
    try:
        with open(path, "rb") as file:
            if not file.read(1):
                return EMPTY_FILE
    except OSError as os_error:
        return os_error.strerror or str(os_error)
    message = str(error)
    return message.split(": ", 1)[1] if message.startswith("Error opening") and ": " in message else message
