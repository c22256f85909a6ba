"""Tests of the data package on audio synthesised into `tmp_path`: I/O, resampling, windows, split, cache."""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

import wavenet.data.datamodule as datamodule_module
from wavenet.data import (
    AudioFolderDataModule,
    SyntheticMusicDataModule,
    audio_info,
    find_audio_files,
    mu_law_decode,
    mu_law_encode,
    read_audio,
    write_wav,
)
from wavenet.data.audio import resampled_length
from wavenet.errors import UserError

RATE = 16000
RECEPTIVE_FIELD = 64
CHUNK = 256
WINDOW = RECEPTIVE_FIELD + CHUNK


def chirp(seconds: float, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """(T, channels) float32: a rising chirp per channel, a different range each, plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    columns = [
        0.5 * np.sin(2 * np.pi * (200 * (c + 1) + 400 * t) * t) + 0.02 * rng.standard_normal(len(t))
        for c in range(channels)
    ]
    return np.stack(columns, axis=1).astype(np.float32)


def write(path: Path, audio: np.ndarray, rate: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, rate)  # format from the extension
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A corpus with every case the data module handles: rates, formats, nesting, bad and short files."""
    root = tmp_path / "corpus"
    write(root / "stereo44k.wav", chirp(1.0, 44100, channels=2, seed=1), 44100)
    write(root / "nested" / "stereo44k.flac", chirp(0.8, 44100, channels=2, seed=2), 44100)
    write(root / "nested" / "deeper" / "mono22k.wav", chirp(0.5, 22050, seed=3), 22050)
    write(root / "UPPER16K.WAV", chirp(0.6, RATE, seed=4), RATE)
    write(root / "short.wav", chirp(0.01, RATE, seed=5), RATE)  # 160 samples < one window
    (root / "corrupt.wav").write_bytes(np.random.default_rng(6).bytes(4000))
    (root / "notes.txt").write_text("not audio")
    return root


def make_module(root: Path, **overrides) -> AudioFolderDataModule:
    args = dict(
        receptive_field=RECEPTIVE_FIELD, chunk_length=CHUNK, batch_size=2, num_workers=0, val_fraction=0.3
    )
    return AudioFolderDataModule(root, **{**args, **overrides})


# Audio I/O


def test_find_audio_files_is_recursive_sorted_and_case_insensitive(folder: Path) -> None:
    found = find_audio_files(folder, ["wav", ".FLAC"])
    names = [path.relative_to(folder).as_posix() for path in found]
    assert names == sorted(names)
    assert set(names) == {
        "UPPER16K.WAV",
        "corrupt.wav",
        "nested/deeper/mono22k.wav",
        "nested/stereo44k.flac",
        "short.wav",
        "stereo44k.wav",
    }


def test_read_audio_mixes_to_mono_and_resamples_the_whole_file(folder: Path) -> None:
    path = folder / "stereo44k.wav"
    frames, rate = audio_info(path)
    assert (frames, rate) == (44100, 44100)

    audio = read_audio(path, RATE)

    assert audio.dtype == torch.float32 and audio.dim() == 1
    assert len(audio) == resampled_length(frames, rate, RATE) == 16000
    stereo, _ = sf.read(str(path), dtype="float32")
    expected = AF.resample(torch.from_numpy(stereo.mean(axis=1)), 44100, RATE)
    torch.testing.assert_close(audio, expected)


@pytest.mark.parametrize("name", ["stereo44k.wav", "nested/stereo44k.flac", "nested/deeper/mono22k.wav"])
def test_window_read_matches_the_whole_file_resampled(folder: Path, name: str) -> None:
    whole = read_audio(folder / name, RATE)
    # Starts on and off the resampling grid (every 160 samples), at the edges and past the end.
    for start in [0, 1, 159, 160, 333, len(whole) - 500, len(whole) - 100]:
        window = read_audio(folder / name, RATE, start=start, frames=500)
        expected = torch.zeros(500)
        expected[: len(whole[start : start + 500])] = whole[start : start + 500]
        assert len(window) == 500
        assert (window - expected).abs().max() < 1e-5, f"start {start}"


def test_read_audio_at_the_target_rate_is_the_file(folder: Path) -> None:
    samples, _ = sf.read(str(folder / "UPPER16K.WAV"), dtype="float32")
    window = read_audio(folder / "UPPER16K.WAV", RATE, start=100, frames=300)
    assert torch.equal(window, torch.from_numpy(samples[100:400]))


def test_unreadable_audio_is_a_user_error_naming_the_file(folder: Path) -> None:
    with pytest.raises(UserError, match="corrupt.wav"):
        audio_info(folder / "corrupt.wav")
    with pytest.raises(UserError, match="corrupt.wav"):
        read_audio(folder / "corrupt.wav", RATE)


def test_write_wav_round_trips_at_16_bits_and_clips(tmp_path: Path) -> None:
    audio = torch.linspace(-1.5, 1.5, 1000)
    write_wav(tmp_path / "out.wav", audio, RATE)
    info = sf.info(str(tmp_path / "out.wav"))
    assert (info.samplerate, info.channels, info.subtype) == (RATE, 1, "PCM_16")
    back = read_audio(tmp_path / "out.wav", RATE)
    assert (back - audio.clamp(-1, 1)).abs().max() < 1 / 2**14


def test_mu_law_is_exported_and_round_trips() -> None:
    audio = torch.linspace(-1, 1, 101)
    classes = mu_law_encode(audio)
    assert classes.dtype == torch.int64 and classes.min() == 0 and classes.max() == 255
    assert (mu_law_decode(classes) - audio).abs().max() < 0.02


# AudioFolderDataModule


def test_setup_indexes_usable_files_and_warns_about_the_rest(folder: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="wavenet.data")
    module = make_module(folder)
    module.setup("fit")

    files = module.train_files + module.val_files
    indexed = {file.path.relative_to(folder).as_posix(): file.frames for file in files}
    assert indexed == {
        "stereo44k.wav": 16000,
        "nested/stereo44k.flac": resampled_length(round(0.8 * 44100), 44100, RATE),
        "nested/deeper/mono22k.wav": resampled_length(round(0.5 * 22050), 22050, RATE),
        "UPPER16K.WAV": round(0.6 * RATE),
    }
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 2
    unreadable, short = warnings
    assert "corrupt.wav" in unreadable and "Format not recognised" in unreadable
    assert "short.wav" in short and "corrupt.wav" not in short


def test_examples_are_windows_with_targets_shifted_by_one(folder: Path) -> None:
    module = make_module(folder)
    module.setup("fit")
    assert module.val_set is not None and module.train_set is not None

    for dataset in (module.train_set, module.val_set):
        inputs, targets = dataset[0]
        assert inputs.shape == targets.shape == (WINDOW - 1,)
        assert inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(inputs[1:], targets[:-1])
        assert 0 <= int(inputs.min()) and int(inputs.max()) < 256

    # Validation tile 1 of the first validation file starts one chunk in.
    first = module.val_files[0]
    inputs, targets = module.val_set[1]
    expected = mu_law_encode(read_audio(first.path, RATE, start=CHUNK, frames=WINDOW))
    assert torch.equal(inputs, expected[:-1]) and torch.equal(targets, expected[1:])


def test_dataset_lengths_count_non_overlapping_chunks(folder: Path) -> None:
    module = make_module(folder)
    module.setup("fit")
    assert module.train_set is not None and module.val_set is not None
    assert len(module.train_set) == sum((f.frames - RECEPTIVE_FIELD) // CHUNK for f in module.train_files)
    assert len(module.val_set) == sum((f.frames - RECEPTIVE_FIELD) // CHUNK for f in module.val_files)
    # Validation is fixed: the same windows every pass, whatever the RNG does.
    first_pass = [module.val_set[i][0] for i in range(len(module.val_set))]
    torch.manual_seed(123)
    assert all(torch.equal(a, module.val_set[i][0]) for i, a in enumerate(first_pass))


def test_train_windows_are_reproducible_from_the_torch_seed(folder: Path) -> None:
    module = make_module(folder)
    module.setup("fit")
    dataset = module.train_set
    assert dataset is not None

    def draw(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return [dataset[i][0] for i in range(8)]

    first, again, other = draw(0), draw(0), draw(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    # Same RNG state, different index (as on two DDP ranks): different windows.
    torch.manual_seed(0)
    index_0 = dataset[0][0]
    torch.manual_seed(0)
    assert not torch.equal(index_0, dataset[1][0])


def test_train_windows_are_uniform_over_samples_not_files(tmp_path: Path) -> None:
    # Each file holds one constant level, so a window tells which file it came from.
    root = tmp_path / "levels"
    for index, seconds in enumerate([0.05, 0.1, 0.2, 0.4]):
        level = np.full((round(seconds * RATE), 1), 0.1 * (index + 1), np.float32)
        write(root / f"level{index}.wav", level, RATE)
    module = make_module(root, batch_size=1)
    module.setup("fit")
    dataset = module.train_set
    assert dataset is not None and len(dataset.files) >= 2
    level_of = {int(mu_law_encode(read_audio(f.path, RATE, 0, 1))[0]): i for i, f in enumerate(dataset.files)}

    torch.manual_seed(0)
    counts = np.zeros(len(dataset.files))
    for index in range(3000):
        counts[level_of[int(dataset[index][0][0])]] += 1

    starts = np.array([file.frames - WINDOW + 1 for file in dataset.files])
    np.testing.assert_allclose(counts / counts.sum(), starts / starts.sum(), atol=0.03)


def test_dataloader_round_trip_gives_batches_of_windows(folder: Path) -> None:
    module = make_module(folder, batch_size=3)
    L.seed_everything(0, workers=True)
    module.setup("fit")

    train = module.train_dataloader()
    assert train.drop_last and not train.pin_memory and not train.persistent_workers
    batch = next(iter(train))
    assert isinstance(batch, tuple) and len(batch) == 2
    inputs, targets = batch
    assert inputs.shape == targets.shape == (3, WINDOW - 1)
    assert inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])

    val_batches = list(module.val_dataloader())
    assert sum(len(inputs) for inputs, _ in val_batches) == len(module.val_set)
    assert all(inputs.shape[1] == WINDOW - 1 for inputs, _ in val_batches)


def test_worker_processes_draw_reproducibly_under_seed_everything(folder: Path) -> None:
    module = make_module(folder, num_workers=2)
    module.setup("fit")

    def first_batches() -> list[torch.Tensor]:
        L.seed_everything(7, workers=True)
        loader = module.train_dataloader()
        assert loader.persistent_workers
        return [inputs for inputs, _ in itertools.islice(loader, 4)]

    first, again = first_batches(), first_batches()
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # Two workers with their own seeds: the batches they make differ.
    assert not torch.equal(first[0], first[1])


def test_missing_empty_or_unusable_roots_are_user_errors_naming_the_path(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file.wav").write_bytes(b"")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "corrupt.wav").write_bytes(b"garbage")
    write(bad / "short.wav", chirp(0.01, RATE), RATE)
    one = tmp_path / "one"
    write(one / "only.wav", chirp(0.5, RATE), RATE)

    for root, reason in [
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "a_file.wav", "not a directory"),
        (tmp_path / "empty", "no audio files"),
        (bad, "1 are unreadable and 1 are shorter"),
        (one, "validation needs a file of its own"),
    ]:
        with pytest.raises(UserError, match=reason) as error:
            make_module(root).setup("fit")
        assert str(root) in str(error.value)


def test_too_little_training_audio_for_one_batch_is_a_user_error(folder: Path) -> None:
    with pytest.raises(UserError, match="batch_size"):
        make_module(folder, batch_size=1000).setup("fit")


def test_bad_settings_are_user_errors(folder: Path) -> None:
    for overrides in [dict(chunk_length=0), dict(val_fraction=1.0), dict(num_workers=-1)]:
        with pytest.raises(UserError, match=next(iter(overrides))):
            make_module(folder, **overrides)


def test_split_is_deterministic_disjoint_non_empty_and_stable_when_files_are_added(tmp_path: Path) -> None:
    root = tmp_path / "many"
    for index in range(12):
        write(root / f"piece{index:02d}.wav", chirp(0.05, RATE, seed=index), RATE)

    def split() -> tuple[set[str], set[str]]:
        module = make_module(root, batch_size=1)
        module.setup("fit")
        return {file.path.name for file in module.train_files}, {file.path.name for file in module.val_files}

    train, val = split()
    assert train and val and not train & val and len(train | val) == 12
    assert split() == (train, val)

    write(root / "added" / "new.wav", chirp(0.05, RATE, seed=99), RATE)
    new_train, new_val = split()
    assert train <= new_train and val <= new_val


def test_split_always_keeps_a_file_on_each_side(folder: Path) -> None:
    for val_fraction in (1e-9, 1 - 1e-9):
        module = make_module(folder, val_fraction=val_fraction, batch_size=1)
        module.setup("fit")
        assert module.train_files and module.val_files


# SyntheticMusicDataModule


def make_synthetic(cache_dir: Path, **overrides) -> SyntheticMusicDataModule:
    args = dict(
        receptive_field=RECEPTIVE_FIELD, num_files=4, seconds_per_file=2.0, chunk_length=CHUNK, num_workers=0
    )
    return SyntheticMusicDataModule(cache_dir, **{**args, **overrides})


def test_synthetic_dataset_is_deterministic_and_cached(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="wavenet.data")
    first = make_synthetic(tmp_path / "a")
    first.prepare_data()
    assert "Synthesising built-in dataset (4 files)" in caplog.text
    files = sorted(first.root.iterdir())
    assert [path.name for path in files] == ["0000.wav", "0001.wav", "0002.wav", "0003.wav"]
    assert list((tmp_path / "a").iterdir()) == [first.root]  # no temporary folder left behind

    second = make_synthetic(tmp_path / "b")
    second.prepare_data()
    second_files = sorted(second.root.iterdir())
    assert [path.read_bytes() for path in files] == [path.read_bytes() for path in second_files]

    mtimes = [path.stat().st_mtime_ns for path in files]
    again = make_synthetic(tmp_path / "a")
    assert again.root == first.root
    again.prepare_data()
    assert [path.stat().st_mtime_ns for path in files] == mtimes

    assert make_synthetic(tmp_path / "a", synthesis_seed=1).root != first.root
    assert make_synthetic(tmp_path / "a", seconds_per_file=3).root != first.root


def test_synthetic_audio_is_music_not_noise(tmp_path: Path) -> None:
    module = make_synthetic(tmp_path)
    module.prepare_data()
    noise = np.random.default_rng(0).standard_normal(2 * RATE)

    def flatness(audio: np.ndarray) -> float:
        power = np.abs(np.fft.rfft(audio)) ** 2 + 1e-12
        return float(np.exp(np.log(power).mean()) / power.mean())

    def lag_one_correlation(audio: np.ndarray) -> float:
        return float(np.corrcoef(audio[:-1], audio[1:])[0, 1])

    assert flatness(noise) > 0.4
    for path in sorted(module.root.iterdir()):
        audio = read_audio(path, RATE).numpy()
        assert len(audio) == 2 * RATE
        assert 0.3 < np.abs(audio).max() < 0.9
        assert flatness(audio) < 0.05
        assert lag_one_correlation(audio) > 0.8
        # Notes change: the strongest frequency of successive 1/8 s frames takes several values.
        frames = audio[: len(audio) // 2000 * 2000].reshape(-1, 2000)
        peaks = np.abs(np.fft.rfft(frames * np.hanning(2000), axis=1)).argmax(axis=1)
        assert len(set(peaks.tolist())) >= 3


def test_synthetic_module_trains_like_a_folder(tmp_path: Path) -> None:
    module = make_synthetic(tmp_path, batch_size=2)
    module.prepare_data()
    module.setup("fit")
    assert len(module.val_files) == 1 and len(module.train_files) == 3
    inputs, targets = next(iter(module.train_dataloader()))
    assert inputs.shape == targets.shape == (2, WINDOW - 1)


def test_synthetic_setup_before_prepare_and_a_root_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="prepare_data"):
        make_synthetic(tmp_path).setup("fit")
    with pytest.raises(UserError, match="data.root"):
        make_synthetic(tmp_path, root=str(tmp_path))


def test_interrupted_synthesis_leaves_nothing_that_passes_as_a_cache(tmp_path: Path, monkeypatch) -> None:
    def interrupted(directory, *args, **kwargs):
        (Path(directory) / "0000.wav").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(datamodule_module, "synthesize_dataset", interrupted)
    module = make_synthetic(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        module.prepare_data()
    assert not module.root.exists()
    assert os.listdir(tmp_path) == []
