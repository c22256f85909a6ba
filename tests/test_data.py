"""Tests of audio I/O and of the folder data module on audio synthesised into `tmp_path`: windows,
sampling, split, errors, the built-in dataset.

Preparation itself is tested in test_data_prepare.py, streaming in test_data_streaming.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import re
import signal
from pathlib import Path
from types import SimpleNamespace

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
from wavenet.data.datasets import ChunkSampler, SignalSafeLoader
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


def noise(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    """(T, 1) float32 white noise: every window of it is different, so a window tells where it came from."""
    return (0.3 * np.random.default_rng(seed).standard_normal((round(seconds * rate), 1))).astype(np.float32)


def write(path: Path, audio: np.ndarray, rate: int, subtype: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, rate, subtype=subtype)  # format from the extension
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
    write(root / "silent.wav", np.zeros((RATE, 1), np.float32), RATE)
    (root / "corrupt.wav").write_bytes(np.random.default_rng(6).bytes(4000))
    (root / "notes.txt").write_text("not audio")
    return root


def make_module(root: Path, **overrides) -> AudioFolderDataModule:
    """A module on `root` with its cache next to it, prepared in this process."""
    args = dict(
        receptive_field=RECEPTIVE_FIELD,
        chunk_length=CHUNK,
        batch_size=2,
        num_workers=0,
        val_fraction=0.3,
        cache_dir=root.parent / "cache",
        prepare_workers=1,
    )
    return AudioFolderDataModule(root, **{**args, **overrides})


def ready(root: Path, **overrides) -> AudioFolderDataModule:
    module = make_module(root, **overrides)
    module.prepare_data()
    module.setup("fit")
    return module


def simulate_rank(module: L.LightningDataModule, rank: int, world_size: int) -> None:
    """What the data module sees of a DDP trainer: its rank and the world size."""
    module.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)


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
        "silent.wav",
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


def test_names_that_are_not_utf8_are_read_and_hidden_files_passed_over(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="wavenet.data")
    root = tmp_path / "corpus"
    latin1 = root / os.fsdecode(b"caf\xe9.wav")  # a Latin-1 name, as older corpora have
    write(root / "cafe.wav", chirp(0.5, RATE, seed=1), RATE).rename(latin1)
    write(root / "b.wav", chirp(0.5, RATE, seed=2), RATE)
    write(root / "._b.wav", chirp(0.5, RATE, seed=3), RATE)  # what macOS leaves beside a copied file
    write(root / ".trash" / "c.wav", chirp(0.5, RATE, seed=4), RATE)
    assert find_audio_files(root, ["wav"]) == [root / "b.wav", latin1]
    assert audio_info(latin1) == (RATE // 2, RATE)
    module = ready(root, val_fraction=0.5)
    assert {file.relative for file in module.train_files + module.val_files} == {"b.wav", latin1.name}
    assert any("Preparing 2 files" in record.getMessage() for record in caplog.records)


def test_a_long_list_of_left_out_files_says_where_the_rest_are_listed(tmp_path: Path, caplog, monkeypatch) -> None:
    monkeypatch.setattr("wavenet.data.datamodule._LISTED", 2)
    caplog.set_level(logging.WARNING, logger="wavenet.data")
    root = tmp_path / "corpus"
    for index in range(2):
        write(root / f"long{index}.wav", chirp(0.5, RATE, seed=index), RATE)
    for index in range(3):
        (root / f"bad{index}.wav").write_bytes(b"not audio")
        write(root / f"short{index}.wav", chirp(0.01, RATE, seed=index), RATE)
    ready(root, val_fraction=0.5)
    (warning,) = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    # The manifest lists those left out at preparation; the short ones depend on the window.
    assert warning.splitlines()[-1].strip().startswith(
        "... and 4 more (3 shorter than one window, 1 left out at preparation, listed under skipped in "
    )


def test_preparation_progress_is_a_line_a_minute_where_stderr_is_no_terminal(capsys) -> None:
    from wavenet.data.prepare import file_progress

    with file_progress(3, "Preparing") as progress:  # pytest's stderr is no terminal
        assert progress.mininterval == 60.0
        progress.fp.write("\rPreparing: 1/3")  # what tqdm writes to redraw its bar
        progress.fp.write("\rPreparing: 2/3")
    assert capsys.readouterr().err == "Preparing: 1/3\nPreparing: 2/3"


def test_float_audio_far_outside_one_and_constant_audio_are_left_out(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="wavenet.data")
    root = tmp_path / "corpus"
    for index in range(2):
        write(root / f"ok{index}.wav", chirp(0.5, RATE, seed=index), RATE, subtype="FLOAT")
    write(root / "int16_as_float.wav", 20000 * chirp(0.5, RATE), RATE, subtype="FLOAT")
    write(root / "hot_master.wav", 1.3 * chirp(0.5, RATE), RATE, subtype="FLOAT")  # a little over: kept
    write(root / "dc.wav", np.full((RATE, 1), 0.3, np.float32), RATE)  # one mu-law class throughout
    module = ready(root, val_fraction=0.3)
    assert len(module.train_files + module.val_files) == 3
    (warning,) = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert "int16_as_float.wav: samples reach 1" in warning and "far outside audio's [-1, 1]" in warning
    assert "dc.wav: constant (every sample is 0.3)" in warning


def test_rates_without_a_large_common_factor_resample_by_a_near_ratio(tmp_path: Path, caplog) -> None:
    # 48,001 Hz to 16 kHz exactly would take a 3 GB filter: read as 48 kHz is, a ratio 0.002 % off.
    samples = chirp(1.0, 48001, seed=1)
    odd = write(tmp_path / "odd.wav", samples, 48001, subtype="FLOAT")
    usual = write(tmp_path / "usual.wav", samples, 48000, subtype="FLOAT")  # the same samples, labelled 48 kHz
    with caplog.at_level(logging.WARNING, logger="wavenet.data"):
        audio = read_audio(odd, RATE)
    assert "Resampling 48001 Hz to 16000 Hz as 3 to 1" in caplog.text
    assert len(audio) == resampled_length(48001, 48001, RATE) == 16000
    expected = read_audio(usual, RATE)  # 48,000 samples of it: one fewer source sample
    assert (audio[:-1] - expected[: len(audio) - 1]).abs().max() < 1e-5
    # A window still equals the same part of the whole file.
    torch.testing.assert_close(read_audio(odd, RATE, start=5000, frames=300), audio[5000:5300])


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


def test_paths_starting_with_a_tilde_are_under_the_home_folder(folder: Path, monkeypatch) -> None:
    # `root: ~/corpus` in a YAML config, or a quoted override: no shell expands the `~` there.
    monkeypatch.setenv("HOME", str(folder.parent))
    module = ready(Path("~/corpus"), cache_dir="~/cache")
    assert module.root == folder and module.cache_dir == folder.parent / "cache"
    assert module.train_files and (folder.parent / "cache").is_dir()


def test_setup_lists_every_left_out_file_in_one_warning(folder: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="wavenet.data")
    module = ready(folder)
    # Of the 7 files to prepare, corrupt.wav and silent.wav are left out; short.wav only once the window is known.
    assert " of audio from 5 of 7 files in " in caplog.text

    files = module.train_files + module.val_files
    indexed = {file.relative: file.frames for file in files}
    assert indexed == {
        "stereo44k.wav": 16000,
        "nested/stereo44k.flac": resampled_length(round(0.8 * 44100), 44100, RATE),
        "nested/deeper/mono22k.wav": resampled_length(round(0.5 * 22050), 22050, RATE),
        "UPPER16K.WAV": round(0.6 * RATE),
    }
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    lines = warnings[0].splitlines()
    assert "Leaving out 3 of 7 audio files" in lines[0]
    assert sorted(line.strip() for line in lines[1:]) == [
        "corrupt.wav: unreadable (Format not recognised.)",
        f"short.wav: shorter than one window ({WINDOW} samples = 0.020 s at 16000 Hz)",
        "silent.wav: silent (every sample is zero)",
    ]
    # A folder that cannot be listed is left out too, and counted apart: it is no audio file.
    assert module.manifest is not None
    locked = ("locked/", "folder cannot be listed (Permission denied)")
    manifest = dataclasses.replace(module.manifest, skipped=[*module.manifest.skipped, locked])
    caplog.clear()
    module._warn_left_out(manifest, [])
    assert f"Leaving out 2 of 7 audio files and 1 folder under {folder}:" in caplog.text


def test_examples_are_windows_of_the_mu_law_audio_with_targets_shifted_by_one(folder: Path) -> None:
    module = ready(folder)
    assert module.val_set is not None and module.train_set is not None

    for dataset in (module.train_set, module.val_set):
        inputs, targets = dataset[0]
        assert inputs.shape == targets.shape == (WINDOW - 1,)
        assert inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(inputs[1:], targets[:-1])
        assert 0 <= int(inputs.min()) and int(inputs.max()) < 256

    # Validation tile 1 of the first validation file starts one chunk in; train index p is the p-th start.
    first = module.val_files[0]
    inputs, targets = module.val_set[1]
    expected = mu_law_encode(read_audio(first.path, RATE, start=CHUNK, frames=WINDOW))
    assert torch.equal(inputs, expected[:-1]) and torch.equal(targets, expected[1:])
    last = module.train_files[-1]
    inputs, _ = module.train_set[sum(module.train_set.starts[:-1]) + 5]
    assert torch.equal(inputs, mu_law_encode(read_audio(last.path, RATE, start=5, frames=WINDOW))[:-1])


def test_dataset_lengths_count_starts_and_validation_tiles(folder: Path) -> None:
    module = ready(folder)
    assert module.train_set is not None and module.val_set is not None
    assert len(module.train_set) == sum(f.frames - WINDOW + 1 for f in module.train_files)
    assert len(module.val_set) == sum((f.frames - WINDOW) // CHUNK + 1 for f in module.val_files)
    # Validation is fixed: the loader gives the set's windows in order, the same every pass, whatever the RNG.
    expected = torch.stack([module.val_set[i][0] for i in range(len(module.val_set))])
    for seed in (0, 123):
        torch.manual_seed(seed)
        np.random.seed(seed)
        passed = torch.cat([inputs for inputs, _ in module.val_dataloader()])
        assert torch.equal(passed, expected)


def level_corpus(root: Path, seconds: list[float]) -> Path:
    """Files that each hold one level, so a window tells which file it came from by its first sample; the last
    sample, which starts no window, is 0 (a file of one value throughout is left out as constant)."""
    for index, length in enumerate(seconds):
        audio = np.full((round(length * RATE), 1), 0.1 * (index + 1), np.float32)
        audio[-1] = 0.0
        write(root / f"level{index}.wav", audio, RATE)
    return root


def test_training_windows_are_uniform_over_samples_not_files(tmp_path: Path) -> None:
    module = ready(
        level_corpus(tmp_path / "levels", [0.05, 0.1, 0.2, 0.4, 0.4]), batch_size=1, val_fraction=0.2
    )
    dataset = module.train_set
    assert dataset is not None and len(dataset.files) >= 3
    level_of = {int(mu_law_encode(read_audio(f.path, RATE, 0, 1))[0]): i for i, f in enumerate(dataset.files)}
    ends = np.cumsum(dataset.starts)

    sampler = ChunkSampler(dataset, seed=0)
    counts = np.zeros(len(dataset.files))
    halves = np.zeros(2)  # where in its file a window starts: first or second half of the valid starts
    for epoch in range(40):
        sampler.set_epoch(epoch)
        for position in sampler:
            file = int(np.searchsorted(ends, position, side="right"))
            counts[file] += 1
            offset = position - (ends[file - 1] if file else 0)
            halves[int(2 * offset >= dataset.starts[file])] += 1
    # Spot check that a position reads from the file it names.
    assert level_of[int(dataset[position][0][0])] == file

    np.testing.assert_allclose(
        counts / counts.sum(), np.array(dataset.starts) / sum(dataset.starts), atol=0.01
    )
    assert abs(halves[0] / halves.sum() - 0.5) < 0.02

    # Within its stride a start is uniform too: every start can be drawn, not only the first part of each stride
    # (which the halves above would not notice). The shift is one per epoch: over 300 epochs a Kolmogorov-
    # Smirnov distance to the uniform below 0.11 (about its 0.1 % critical value at this count; the seed is fixed).
    stride = sampler.starts / sampler.strata
    shifts = []
    for epoch in range(300):
        sampler.set_epoch(epoch)
        fractions = (np.fromiter(sampler, np.int64) / stride) % 1.0
        shifts.append(np.median(fractions))
    shifts = np.sort(shifts)
    below, above = np.arange(len(shifts)) / len(shifts), np.arange(1, len(shifts) + 1) / len(shifts)
    assert max(np.abs(shifts - below).max(), np.abs(above - shifts).max()) < 0.11


def test_sampler_epochs_are_disjoint_chunks_new_every_epoch_and_reproducible(folder: Path) -> None:
    module = ready(folder, batch_size=1)
    dataset = module.train_set
    sampler = ChunkSampler(dataset, seed=3)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
    for positions in epochs:
        assert len(positions) == len(dataset) // CHUNK == len(sampler)
        ordered = np.sort(positions)
        assert np.diff(ordered).min() >= CHUNK  # no two windows of an epoch score the same sample
    assert epochs[0] != epochs[1] and set(epochs[0]) != set(epochs[1])
    again = ChunkSampler(dataset, seed=3)
    again.set_epoch(1)
    assert list(again) == epochs[1]
    other = ChunkSampler(dataset, seed=4)
    other.set_epoch(1)
    assert list(other) != epochs[1]


def test_two_ranks_with_two_workers_each_load_disjoint_windows(tmp_path: Path) -> None:
    root = tmp_path / "noise"
    for index, seconds in enumerate([0.7, 0.5, 0.9, 0.3]):
        write(root / f"noise{index}.wav", noise(seconds, RATE, seed=index), RATE)
    module = ready(root, batch_size=3, num_workers=2, val_fraction=0.2)
    dataset = module.train_set
    assert dataset is not None
    # Where every window may start, by its first 8 classes (unique in white noise).
    where = {}
    for position in range(len(dataset)):
        where[dataset[position][0][:8].numpy().tobytes()] = position
    assert len(where) == len(dataset)

    loaded = {}
    for rank in range(2):
        simulate_rank(module, rank, world_size=2)
        loader = module.train_dataloader()
        loader.sampler.set_epoch(5)
        batches = list(loader)
        assert len(batches) == len(dataset) // CHUNK // 2 // 3
        loaded[rank] = [where[window[:8].numpy().tobytes()] for inputs, _ in batches for window in inputs]
    assert len(loaded[0]) == len(loaded[1])
    positions = np.sort(loaded[0] + loaded[1])
    assert len(set(positions.tolist())) == len(positions)
    assert np.diff(positions).min() >= CHUNK


def test_sampler_skip_passes_over_the_head_of_the_epoch_on_every_world_size(folder: Path) -> None:
    dataset = ready(folder, batch_size=1).train_set
    whole = ChunkSampler(dataset, seed=3)
    whole.set_epoch(2)
    order = list(whole)
    resumed = ChunkSampler(dataset, seed=3)
    resumed.set_epoch(2)
    resumed.skip = 4
    assert list(resumed) == order[4:]
    # Trained on 4 windows with one rank, resumed with two: the rest of the same order, shared equally.
    ranks = []
    for rank in range(2):
        sampler = ChunkSampler(dataset, num_replicas=2, rank=rank, seed=3)
        sampler.set_epoch(2)
        sampler.skip = 4
        ranks.append(list(sampler))
    assert len(ranks[0]) == len(ranks[1]) and sorted(ranks[0] + ranks[1]) == sorted(order[4 : 4 + 2 * len(ranks[0])])


def test_a_mid_epoch_resume_in_another_order_warns_what_changed(folder: Path, caplog) -> None:
    def interrupted_state(**overrides) -> dict[str, int]:
        loader = ready(folder, **{"batch_size": 2, "seed": 3, **overrides}).train_dataloader()
        loader.sampler.set_epoch(1)
        next(iter(loader))
        return loader.state_dict()

    def resume(state: dict[str, int], **overrides) -> list[str]:
        loader = ready(folder, **{"batch_size": 2, "seed": 3, **overrides}).train_dataloader()
        loader.sampler.set_epoch(1)
        loader.load_state_dict(state)
        caplog.clear()
        next(iter(loader))
        return [record.getMessage() for record in caplog.records if record.name == "wavenet.data.datasets"]

    state = interrupted_state()
    assert state["epoch"] == 1 and state["windows"] == 2
    assert resume(state) == []
    [reseeded] = resume(interrupted_state(seed=4))
    assert "Resuming epoch 1 after 2 windows in another order" in reseeded
    assert "data.seed=3 (the checkpoint's: 4)" in reseeded
    [rechunked] = resume(interrupted_state(chunk_length=CHUNK // 2))
    assert f"data.chunk_length={CHUNK} (the checkpoint's: {CHUNK // 2})" in rechunked
    [recut] = resume(interrupted_state(val_fraction=0.01))  # 3 training files, not 1
    assert "the corpus, with" in recut and "data.seed" not in recut
    # A checkpoint from before the order was saved, or one saved at an epoch's end: nothing to compare or skip.
    assert resume({"epoch": 1, "windows": 2}) == []
    assert resume({**interrupted_state(seed=4), "epoch": 0}) == []


class BatchRecorder(L.Callback):
    """The training batches a run trains on, by their bytes."""

    def __init__(self) -> None:
        self.batches: list[bytes] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch[0].numpy().tobytes())


def test_a_run_resumed_mid_epoch_trains_on_the_batches_of_an_uninterrupted_run(tmp_path: Path, caplog) -> None:
    """Resuming from last.ckpt (saved at a validation mid-epoch, as train.py's default callbacks do) must
    neither repeat the start of the interrupted epoch nor replay epoch 0's order in a later epoch; resuming
    with another seed says that the rest of the epoch is in another order."""
    from wavenet import WaveNetModule

    root = tmp_path / "noise"
    for index in range(5):
        write(root / f"noise{index}.wav", noise(0.1, RATE, seed=index), RATE)

    def run(
        max_steps: int, ckpt_path: Path | None = None, checkpoints: Path | None = None, seed: int = 0
    ) -> list[bytes]:
        L.seed_everything(0)
        model = WaveNetModule(layers=4, stacks=1, residual_channels=8, dilation_channels=8, skip_channels=8)
        data = make_module(root, receptive_field=model.receptive_field, num_workers=2, val_fraction=0.2, seed=seed)
        recorder = BatchRecorder()
        callbacks: list[L.Callback] = [recorder]
        if checkpoints is not None:
            callbacks.append(L.pytorch.callbacks.ModelCheckpoint(checkpoints, monitor="val/loss", save_last=True))
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=max_steps,
            max_epochs=-1,
            val_check_interval=13,
            check_val_every_n_epoch=None,
            limit_val_batches=1,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=checkpoints is not None,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
        )
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
        if ckpt_path is None:
            assert trainer.num_training_batches == 10  # so step 13 is in the middle of the second epoch
        return recorder.batches

    uninterrupted = run(max_steps=24)
    first = run(max_steps=13, checkpoints=tmp_path / "checkpoints")
    second = run(max_steps=24, ckpt_path=tmp_path / "checkpoints" / "last.ckpt", checkpoints=tmp_path / "again")
    assert first == uninterrupted[:13]
    assert second == uninterrupted[13:]
    assert "another order" not in caplog.text
    reseeded = run(max_steps=24, ckpt_path=tmp_path / "checkpoints" / "last.ckpt", seed=1)
    assert reseeded != second and len(reseeded) == len(second)
    assert "Resuming epoch 1 after 6 windows in another order than the checkpoint's: data.seed=1" in caplog.text


def test_dataloader_round_trip_gives_batches_of_windows(folder: Path) -> None:
    module = ready(folder, batch_size=3)
    train = module.train_dataloader()
    assert train.drop_last and not train.pin_memory and not train.persistent_workers
    assert isinstance(train.sampler, ChunkSampler)
    batch = next(iter(train))
    assert isinstance(batch, tuple) and len(batch) == 2
    inputs, targets = batch
    assert inputs.shape == targets.shape == (3, WINDOW - 1)
    assert inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])

    val_batches = list(module.val_dataloader())
    assert sum(len(inputs) for inputs, _ in val_batches) == len(module.val_set)
    assert all(inputs.shape[1] == WINDOW - 1 for inputs, _ in val_batches)


def test_worker_processes_load_the_same_batches_from_the_same_seed(folder: Path) -> None:
    def first_batches(seed: int) -> list[torch.Tensor]:
        module = ready(folder, num_workers=2, seed=seed)
        loader = module.train_dataloader()
        assert loader.persistent_workers
        return [inputs for inputs, _ in itertools.islice(loader, 4)]

    first, again, other = first_batches(7), first_batches(7), first_batches(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_missing_empty_or_unusable_roots_are_user_errors_naming_the_path(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file.wav").write_bytes(b"")
    bad = tmp_path / "bad"
    write(bad / "short.wav", chirp(0.01, RATE), RATE)
    write(bad / "short2.wav", chirp(0.01, RATE), RATE)
    one = tmp_path / "one"
    write(one / "only.wav", chirp(0.5, RATE), RATE)

    for root, reason in [
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "a_file.wav", "not a directory"),
        (tmp_path / "empty", "no audio files"),
        (bad, "of 2 audio files, 2 are shorter than one window"),
        (one, "validation needs a file of its own"),
    ]:
        with pytest.raises(UserError, match=reason) as error:
            ready(root)
        assert str(root) in str(error.value)


def test_the_counts_of_files_left_out_agree_with_their_words(tmp_path: Path) -> None:
    mixed, single = tmp_path / "mixed", tmp_path / "single"
    write(mixed / "short.wav", chirp(0.01, RATE), RATE)
    (mixed / "corrupt.wav").write_bytes(b"not audio at all")
    write(single / "short.wav", chirp(0.01, RATE), RATE)
    for root, counts in [
        (mixed, "of 2 audio files, 1 is unusable and 1 is shorter than one window"),
        (single, "of 1 audio file, 1 is shorter than one window"),
    ]:
        with pytest.raises(UserError, match=f"^no usable audio under data root {re.escape(str(root))}: {counts} "):
            ready(root)


def test_too_little_training_audio_for_one_batch_per_rank_is_a_user_error(folder: Path) -> None:
    with pytest.raises(UserError, match="batch_size"):
        ready(folder, batch_size=1000)


def test_setup_before_prepare_data_is_a_user_error(folder: Path) -> None:
    with pytest.raises(UserError, match="prepare_data"):
        make_module(folder).setup("fit")


def test_bad_settings_are_user_errors(folder: Path) -> None:
    for overrides in [
        dict(chunk_length=0),
        dict(val_fraction=1.0),
        dict(num_workers=-1),
        dict(quantization_channels=512),
        dict(trim_db=-20),
        dict(layout="timit"),
        dict(prepare_workers=0),
        # Text where a number belongs (a mistyped override) is named, not a TypeError from a comparison.
        dict(batch_size="abc"),
        dict(sample_rate="16k"),
        dict(val_fraction="abc"),
        dict(trim_db="abc"),
        dict(num_workers=1.5),
        dict(seed="abc"),
    ]:
        with pytest.raises(UserError, match=next(iter(overrides))):
            make_module(folder, **overrides)
    # A string is a sequence of one-letter extensions: `data.extensions=wav` must not look for w, a and v.
    with pytest.raises(UserError, match="data.extensions must be a list"):
        make_module(folder, extensions="wav")
    for root in (None, ""):  # `data.root=null`, or empty: not the current folder
        with pytest.raises(UserError, match="data.root must be the folder of your audio"):
            AudioFolderDataModule(root, receptive_field=RECEPTIVE_FIELD)


class _BlockedSignals(torch.utils.data.Dataset):
    """One item: the signals blocked in the process that loads it."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> list[int]:
        return sorted(int(number) for number in signal.pthread_sigmask(signal.SIG_BLOCK, []))


def test_loader_workers_start_with_stops_blocked_and_the_owner_keeps_its_own(folder: Path) -> None:
    # A Ctrl-C, SIGTERM or SIGHUP to the job while a worker started, before its worker_init_fn took them, killed
    # it: the run ended in "DataLoader worker (pid N) exited unexpectedly" instead of stopping.
    (in_worker,) = SignalSafeLoader(_BlockedSignals(), batch_size=None, num_workers=1)
    assert {signal.SIGINT, signal.SIGTERM, signal.SIGHUP} <= set(in_worker)
    assert not {signal.SIGINT, signal.SIGTERM, signal.SIGHUP} & signal.pthread_sigmask(signal.SIG_BLOCK, [])
    module = ready(folder, num_workers=1)
    assert isinstance(module.train_dataloader(), SignalSafeLoader)
    assert isinstance(module.val_dataloader(), SignalSafeLoader)


class _Refuses(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> None:
        raise UserError("data.chunk_length=9 is refused here")


def test_a_user_error_from_a_loader_worker_keeps_its_one_line_message() -> None:
    with pytest.raises(UserError) as error:
        next(iter(torch.utils.data.DataLoader(_Refuses(), num_workers=1)))
    assert "Original Traceback" in error.value.args[0]  # torch's re-raise carries the worker's traceback
    assert str(error.value) == "data.chunk_length=9 is refused here"


def test_split_is_deterministic_disjoint_non_empty_and_stable_when_files_are_added(tmp_path: Path) -> None:
    root = tmp_path / "many"
    for index in range(12):
        write(root / f"piece{index:02d}.wav", chirp(0.05, RATE, seed=index), RATE)

    def split() -> tuple[set[str], set[str]]:
        module = ready(root, batch_size=1)
        return {file.path.name for file in module.train_files}, {file.path.name for file in module.val_files}

    train, val = split()
    assert train and val and not train & val and len(train | val) == 12
    assert split() == (train, val)

    write(root / "added" / "new.wav", chirp(0.05, RATE, seed=99), RATE)
    new_train, new_val = split()
    assert train <= new_train and val <= new_val


def test_split_always_keeps_a_file_on_each_side(folder: Path) -> None:
    for val_fraction in (1e-9, 1 - 1e-9):
        module = ready(folder, val_fraction=val_fraction, batch_size=1)
        assert module.train_files and module.val_files


# SyntheticMusicDataModule


def make_synthetic(data_dir: Path, **overrides) -> SyntheticMusicDataModule:
    args = dict(
        receptive_field=RECEPTIVE_FIELD,
        num_files=4,
        seconds_per_file=2.0,
        chunk_length=CHUNK,
        num_workers=0,
        cache_dir=data_dir / "prepared",
        prepare_workers=1,
    )
    return SyntheticMusicDataModule(data_dir / "synthetic", **{**args, **overrides})


def test_synthetic_dataset_is_deterministic_and_cached(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="wavenet.data")
    first = make_synthetic(tmp_path / "a")
    first.prepare_data()
    assert "Synthesising built-in dataset (4 files)" in caplog.text
    files = sorted(first.root.iterdir())
    assert [path.name for path in files] == ["0000.wav", "0001.wav", "0002.wav", "0003.wav"]
    assert list((tmp_path / "a" / "synthetic").iterdir()) == [first.root]  # no temporary folder left behind

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
    noise_audio = np.random.default_rng(0).standard_normal(2 * RATE)

    def flatness(audio: np.ndarray) -> float:
        power = np.abs(np.fft.rfft(audio)) ** 2 + 1e-12
        return float(np.exp(np.log(power).mean()) / power.mean())

    def lag_one_correlation(audio: np.ndarray) -> float:
        return float(np.corrcoef(audio[:-1], audio[1:])[0, 1])

    assert flatness(noise_audio) > 0.4
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


def test_synthetic_module_trains_from_prepared_shards(tmp_path: Path) -> None:
    module = make_synthetic(tmp_path, batch_size=2)
    module.prepare_data()
    module.setup("fit")
    assert len(module.val_files) == 1 and len(module.train_files) == 3
    assert module.manifest is not None and (module.manifest.directory / "shard-00000.bin").is_file()
    assert module.manifest.directory.parent == tmp_path / "prepared"
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
    assert os.listdir(tmp_path / "synthetic") == []


def test_overfit_batches_train_on_the_same_spread_windows_every_epoch(folder: Path) -> None:
    module = ready(folder)
    module.trainer = SimpleNamespace(global_rank=0, world_size=1, overfit_batches=2)
    loader = module.train_dataloader()
    # A SequentialSampler: Lightning would replace any other by windows starting at samples 0, 1, 2, ...
    assert isinstance(loader.sampler, torch.utils.data.SequentialSampler)
    windows = list(loader.sampler)
    first_epoch = list(ChunkSampler(module.train_set, seed=module.seed))
    assert windows == first_epoch[: 2 * module.batch_size] == list(loader.sampler)
    assert min(b - a for a, b in itertools.pairwise(sorted(windows))) >= CHUNK
