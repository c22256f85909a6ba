"""The built-in dataset: short pieces of synthetic music, generated from a seed (no download).

Each piece has structure a WaveNet can learn: harmonic notes from a scale in one key, a melody that
repeats and varies a two-bar rhythmic motif over a chord progression, a bass line, chords (held or
arpeggiated), four timbres (organ, string, bell, plucked string) with envelopes and vibrato, and a
little noise. Rendering is vectorised per note, so 64 pieces of 10 s take a couple of seconds.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from wavenet.data.audio import write_wav
from wavenet.data.prepare import file_progress
from wavenet.data.settings import check_synthesis_settings

# Part of the cache key of the built-in dataset: bump it whenever the audio generated here changes.
SYNTHESIS_VERSION = 1

_SCALES = (
    (0, 2, 4, 5, 7, 9, 11),  # major
    (0, 2, 3, 5, 7, 8, 10),  # natural minor
    (0, 2, 3, 5, 7, 9, 10),  # dorian
    (0, 2, 4, 5, 7, 9, 10),  # mixolydian
)
# Scale degrees of the chord roots, one chord per bar, cycled (I-V-vi-IV, I-IV-V-I, ...).
_PROGRESSIONS = ((0, 4, 5, 3), (0, 3, 4, 0), (0, 5, 3, 4), (5, 3, 0, 4), (0, 3, 0, 4), (0, 6, 5, 4))
# Note lengths in beats filling one bar of 4/4.
_RHYTHMS = (
    (1, 1, 1, 1),
    (0.5, 0.5, 1, 2),
    (1.5, 0.5, 1, 1),
    (0.5,) * 8,
    (2, 1, 1),
    (1, 0.5, 0.5, 2),
    (0.75, 0.25, 1, 1, 1),
    (3, 1),
)
_WAVETABLE_SIZE = 2048
# Partials stay below this fraction of the sample rate, clear of aliasing at Nyquist (0.5).
_MAX_PARTIAL = 0.45
# Stiff-bar ratios of a bell's partials and their relative levels: inharmonic, unlike the other timbres.
_BELL_RATIOS = np.array([1.0, 2.0, 2.76, 4.07, 5.4])
_BELL_LEVELS = np.array([1.0, 0.5, 0.45, 0.25, 0.2])


class _Note(NamedTuple):
    onset: float  # seconds
    gate: float  # seconds the note is held, before its release
    degree: int  # in the piece's scale, 0 = tonic; `synthesize_piece` knows the key
    velocity: float  # 0..1


def synthesize_dataset(
    directory: str | Path, num_files: int, seconds_per_file: float, sample_rate: int = 16000, seed: int = 0
) -> list[Path]:
    """Writes `num_files` pieces as 16-bit WAV files `0000.wav`, `0001.wav`, ... into `directory`.

    The same arguments give the same bytes: piece i depends only on `(seed, i)`, `seconds_per_file` and
    `sample_rate`.

    Returns:
        The paths written, in order.

    Raises:
        UserError: If a setting is not one the pieces can be made from (see `check_synthesis_settings`).
    """
    check_synthesis_settings(num_files, seconds_per_file, sample_rate, seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    # `delay`: no bar at all when synthesis is quick, as it is for the tests' small sets.
    with file_progress(num_files, "Synthesising") as progress:
        for index in range(num_files):
            piece = synthesize_piece(seconds_per_file, sample_rate, np.random.default_rng([seed, index]))
            path = directory / f"{index:04d}.wav"
            write_wav(path, torch.from_numpy(piece), sample_rate)
            paths.append(path)
            progress.update()
    return paths


def synthesize_piece(seconds: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """One piece of music: (round(seconds * sample_rate),) float32 with its peak at about 0.5 to 0.8."""
    tonic = int(rng.integers(45, 57))  # A2 .. G#3: chords around 110-220 Hz, melody an octave or two up
    scale = _SCALES[rng.integers(len(_SCALES))]
    beat = 60.0 / rng.uniform(80, 150)
    bars = math.ceil(seconds / (4 * beat))
    progression = _PROGRESSIONS[rng.integers(len(_PROGRESSIONS))]
    chord_roots = [progression[bar % len(progression)] for bar in range(bars)]

    def frequency(degree: int) -> float:
        octave, step = divmod(degree, len(scale))
        return 440.0 * 2 ** ((tonic + 12 * octave + scale[step] - 69) / 12)

    lead = str(rng.choice(list(_TIMBRES)))
    chords, bass = (str(name) for name in rng.choice(["organ", "string", "pluck"], 2))
    voices = [
        (_melody(chord_roots, beat, rng), lead, 1.0),
        (_chords(chord_roots, beat, arpeggio=chords == "pluck", rng=rng), chords, 0.3),
        (_bass(chord_roots, beat, rng), bass, 0.6),
    ]
    length = round(seconds * sample_rate)
    # Room for the release of the last notes, cropped at the end.
    mix = np.zeros(length + 3 * sample_rate, dtype=np.float32)
    for notes, timbre, level in voices:
        render = _TIMBRES[timbre]
        for note in notes:
            start = round(note.onset * sample_rate)
            if start >= length:
                continue
            samples = render(frequency(note.degree), note.gate, sample_rate, rng)
            mix[start : start + len(samples)] += level * note.velocity * samples
    mix = mix[:length]
    mix *= rng.uniform(0.5, 0.8) / max(float(np.abs(mix).max()), 1e-6)
    mix += rng.normal(0.0, rng.uniform(5e-4, 2e-3), length).astype(np.float32)
    return mix


def _melody(chord_roots: list[int], beat: float, rng: np.random.Generator) -> list[_Note]:
    """A two-bar motif (rhythm and contour) repeated on each chord, sometimes varied or replaced."""

    def new_motif() -> list[tuple[float, int]]:
        lengths = [*_RHYTHMS[rng.integers(len(_RHYTHMS))], *_RHYTHMS[rng.integers(len(_RHYTHMS))]]
        steps = rng.choice([-2, -1, -1, 0, 1, 1, 2, 3, -3], len(lengths))
        steps[0] = 0  # each phrase starts on its chord's root
        return list(zip(lengths, np.cumsum(steps).tolist()))

    notes = []
    motif = new_motif()
    for phrase_start in range(0, len(chord_roots), 2):
        if phrase_start and rng.random() < 0.3:
            motif = new_motif()
        position = 4.0 * phrase_start  # in beats
        for index, (length, contour) in enumerate(motif):
            root = chord_roots[min(int(position // 4), len(chord_roots) - 1)]
            variation = int(rng.integers(-1, 2)) if rng.random() < 0.2 else 0
            degree = int(np.clip(7 + root + contour + variation, 3, 17))  # keeps the lead in two octaves
            if index == 0 or rng.random() > 0.08:  # a few rests
                accent = 1.0 if position % 4 == 0 else 0.8
                velocity = accent * rng.uniform(0.8, 1.0)
                notes.append(_Note(position * beat, 0.9 * length * beat, degree, velocity))
            position += length
    return notes


def _chords(chord_roots: list[int], beat: float, arpeggio: bool, rng: np.random.Generator) -> list[_Note]:
    """Triads on each root: held for the bar, or broken into eighth notes."""
    notes = []
    for bar, root in enumerate(chord_roots):
        triad = (root, root + 2, root + 4)
        onset = bar * 4 * beat
        if arpeggio:
            pattern = (0, 1, 2, 1, 0, 1, 2, 1) if rng.random() < 0.5 else (0, 1, 2, 3, 2, 1, 0, 1)
            for step, index in enumerate(pattern):
                degree = triad[index % 3] + 7 * (index // 3)
                notes.append(_Note(onset + step * beat / 2, 0.45 * beat, degree, rng.uniform(0.6, 0.9)))
        else:
            notes.extend(_Note(onset, 3.9 * beat, degree, 0.7) for degree in triad)
    return notes


def _bass(chord_roots: list[int], beat: float, rng: np.random.Generator) -> list[_Note]:
    """Chord roots an octave below the tonic, on a rhythm chosen once per piece."""
    pattern = ((0, 0, 4, 0), (0, 4), (0, 0, 0, 0), (0, 4, 7, 4, 0, 4, 7, 4))[rng.integers(4)]
    step = 4 * beat / len(pattern)
    return [
        _Note(bar * 4 * beat + index * step, 0.85 * step, root - 7 + offset, 1.0 if index == 0 else 0.8)
        for bar, root in enumerate(chord_roots)
        for index, offset in enumerate(pattern)
    ]


def _adsr(
    t: np.ndarray, gate: float, attack: float, decay: float, sustain: float, release: float
) -> np.ndarray:
    """Attack to 1, decay to `sustain`, hold until `gate`, then fade out over `release` seconds."""
    attack_decay_sustain = np.interp(t, [0.0, attack, attack + decay], [0.0, 1.0, sustain])
    return attack_decay_sustain * np.clip((gate + release - t) / release, 0.0, 1.0)


def _phase(
    freq: float, t: np.ndarray, sample_rate: int, vibrato: float, rng: np.random.Generator
) -> np.ndarray:
    """Phase in cycles of a tone at `freq` whose vibrato (relative depth `vibrato`) fades in over 0.3 s."""
    if vibrato == 0.0:
        return freq * t
    rate = rng.uniform(4.5, 6.5)
    depth = vibrato * np.minimum(t / 0.3, 1.0)
    return np.cumsum(freq * (1.0 + depth * np.sin(2 * np.pi * rate * t))) / sample_rate


@functools.lru_cache(maxsize=None)
def _wavetable(shape: str, harmonics: int) -> np.ndarray:
    """One period of a band-limited waveform, plus the first sample again for interpolation."""
    k = np.arange(1, harmonics + 1)
    if shape == "odd":  # organ-like: odd harmonics, hollow
        levels = np.where(k % 2 == 1, 1.0 / k, 0.05 / k)
    else:  # "saw", string-like: every harmonic at 1/k, bright
        levels = 1.0 / k
    x = np.arange(_WAVETABLE_SIZE + 1) / _WAVETABLE_SIZE
    table = levels @ np.sin(2 * np.pi * k[:, None] * x[None, :])
    return (table / np.abs(table).max()).astype(np.float32)


def _lookup(table: np.ndarray, cycles: np.ndarray) -> np.ndarray:
    """Reads a wavetable at phases `cycles`, with linear interpolation."""
    position = (cycles % 1.0) * _WAVETABLE_SIZE
    index = position.astype(np.int64)
    fraction = (position - index).astype(np.float32)
    return table[index] + fraction * (table[index + 1] - table[index])


def _harmonics(freq: float, sample_rate: int, most: int) -> int:
    return max(1, min(most, int(_MAX_PARTIAL * sample_rate / freq)))


def _organ(freq: float, gate: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int((gate + 0.05) * sample_rate)) / sample_rate
    table = _wavetable("odd", _harmonics(freq, sample_rate, 15))
    return _lookup(table, _phase(freq, t, sample_rate, 0.0, rng)) * _adsr(t, gate, 0.01, 0.05, 0.8, 0.05)


def _string(freq: float, gate: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int((gate + 0.15) * sample_rate)) / sample_rate
    table = _wavetable("saw", _harmonics(freq, sample_rate, 30))
    return _lookup(table, _phase(freq, t, sample_rate, 0.006, rng)) * _adsr(t, gate, 0.08, 0.1, 0.85, 0.15)


def _partials(
    freq: float, ratios: np.ndarray, levels: np.ndarray, decays: np.ndarray, t: np.ndarray, sample_rate: int
) -> np.ndarray:
    """Sum of sines at `freq * ratios`, each decaying exponentially with its own time constant."""
    audible = freq * ratios < _MAX_PARTIAL * sample_rate
    out = np.zeros(len(t), dtype=np.float32)
    for ratio, level, decay in zip(ratios[audible], levels[audible], decays[audible]):
        out += (level * np.exp(-t / decay) * np.sin(2 * np.pi * freq * ratio * t)).astype(np.float32)
    return out


def _bell(freq: float, gate: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int((gate + 0.4) * sample_rate)) / sample_rate
    # Higher partials die away first, so the strike is bright and the tail a near-pure tone.
    decays = 1.2 / _BELL_RATIOS**0.8
    tone = _partials(freq, _BELL_RATIOS, _BELL_LEVELS, decays, t, sample_rate)
    return tone * np.minimum(t / 0.002, 1.0) * np.clip((gate + 0.4 - t) / 0.4, 0.0, 1.0) / 1.5


def _pluck(freq: float, gate: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int((gate + 0.08) * sample_rate)) / sample_rate
    k = np.arange(1, 11, dtype=np.float64)
    # A string plucked at a fraction `p` of its length lacks the harmonics with a node there; higher
    # harmonics lose energy faster, as in a real string.
    p = rng.uniform(0.15, 0.3)
    tone = _partials(freq, k, np.abs(np.sin(np.pi * k * p)) / k, 0.5 / (1 + 0.7 * (k - 1)), t, sample_rate)
    return tone * np.minimum(t / 0.001, 1.0) * np.clip((gate + 0.08 - t) / 0.08, 0.0, 1.0)


_TIMBRES: dict[str, Callable[[float, float, int, np.random.Generator], np.ndarray]] = {
    "organ": _organ,
    "string": _string,
    "bell": _bell,
    "pluck": _pluck,
}
