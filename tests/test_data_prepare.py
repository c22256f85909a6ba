"""Preparation on fake VCTK, LJSpeech and nested-folder corpora written into `tmp_path`: manifests,
speakers, resampled lengths, trimming, cache reuse and invalidation, parallel workers, a killed
preparation, an unwritable cache."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from concurrent.futures import Executor, Future
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

import wavenet.data.prepare as prepare_module
from tests.test_data import RATE, RECEPTIVE_FIELD, chirp, write
from wavenet.data import (
    AudioFolderDataModule,
    Manifest,
    PrepareSettings,
    SyntheticMusicDataModule,
    list_sources,
    prepare_corpus,
)
from wavenet.data.audio import read_audio, resampled_length
from wavenet.data.mulaw import mu_law_encode
from wavenet.data.prepare import MANIFEST, prepared_folder
from wavenet.errors import UserError

SETTINGS = PrepareSettings(sample_rate=RATE, quantization_channels=256, trim_db=None)
SPEAKERS = ("p225", "p226", "p227")


def vctk_092(root: Path) -> Path:
    """VCTK 0.92: wav48_silence_trimmed/<speaker>/<speaker>_<n>_mic{1,2}.flac, 48 kHz stereo here."""
    for s, speaker in enumerate(SPEAKERS):
        for n in (1, 2):
            for mic in (1, 2):
                path = root / "wav48_silence_trimmed" / speaker / f"{speaker}_{n:03d}_mic{mic}.flac"
                write(path, chirp(0.3 + 0.1 * n, 48000, channels=2, seed=10 * s + n), 48000)
    (root / "speaker-info.txt").write_text("ID AGE GENDER ACCENTS\n")
    return root


def vctk_080(root: Path) -> Path:
    """VCTK 0.80: wav48/<speaker>/<speaker>_<n>.wav, with one corrupt and one silent recording."""
    for s, speaker in enumerate(SPEAKERS):
        for n in (1, 2):
            write(
                root / "wav48" / speaker / f"{speaker}_{n:03d}.wav", chirp(0.4, 48000, seed=10 * s + n), 48000
            )
    (root / "wav48" / "p225" / "p225_003.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    write(root / "wav48" / "p226" / "p226_003.wav", np.zeros((4800, 1), np.float32), 48000)
    (root / "txt" / "p225").mkdir(parents=True)
    return root


def ljspeech(root: Path) -> Path:
    """LJSpeech: metadata.csv naming wavs/<id>.wav at 22.05 kHz; one listed clip is missing."""
    clips = [f"LJ001-{n:04d}" for n in range(1, 5)]
    for n, clip in enumerate(clips[:3]):
        write(root / "wavs" / f"{clip}.wav", chirp(0.5, 22050, seed=n), 22050)
    lines = [f'{clip}|Printing, "in the only sense"|Printing, in the only sense' for clip in clips]
    lines[1] = lines[1].replace("only", "\xf4nly")  # a transcript not in UTF-8: only the ids are read
    # With a byte-order mark before the first id, as some editors save the file.
    (root / "metadata.csv").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode("latin-1") + b"\n")
    return root


def nested(root: Path) -> Path:
    """Any tree: stereo and mono, 22.05/44.1/48 kHz, FLAC and WAV, a corrupt file, a silent one, NaNs."""
    write(root / "a" / "b" / "stereo48k.flac", chirp(0.5, 48000, channels=2, seed=1), 48000)
    write(root / "a" / "mono44k.wav", chirp(0.4, 44100, seed=2), 44100)
    write(root / "c" / "stereo22k.wav", chirp(0.3, 22050, channels=2, seed=3), 22050)
    write(root / "silent.flac", np.zeros((8000, 1), np.float32), RATE)
    write(root / "nan.wav", np.full((800, 1), np.nan, np.float32), RATE, subtype="FLOAT")
    write(root / "empty.wav", np.zeros((0, 1), np.float32), RATE)
    (root / "corrupt.flac").write_bytes(np.random.default_rng(0).bytes(3000))
    return root


def prepare(root: Path, layout: str = "folder", settings: PrepareSettings = SETTINGS, **kwargs) -> Manifest:
    cache = kwargs.pop("cache_dir", root.parent / "cache")
    folder = prepare_corpus(root, layout, ["wav", "flac"], settings, cache, workers=kwargs.pop("workers", 1))
    return Manifest.load(folder)


def shard_samples(manifest: Manifest, relative: str) -> np.ndarray:
    file = next(file for file in manifest.files if file.relative == relative)
    shard = np.fromfile(manifest.directory / manifest.shards[file.shard], dtype=np.uint8)
    return shard[file.offset : file.offset + file.frames]


def test_vctk_092_reads_mic1_flac_with_speakers_from_folders(tmp_path: Path) -> None:
    manifest = prepare(vctk_092(tmp_path / "VCTK-Corpus-0.92"), "vctk")
    assert [(f.relative, f.speaker) for f in manifest.files] == [
        (f"wav48_silence_trimmed/{speaker}/{speaker}_{n:03d}_mic1.flac", speaker)
        for speaker in SPEAKERS
        for n in (1, 2)
    ]
    data = json.loads((manifest.directory / MANIFEST).read_text())
    assert data["speakers"] == list(SPEAKERS) and data["layout"] == "vctk"
    for file in manifest.files:
        n = int(file.relative.split("_")[-2])
        assert file.frames == resampled_length(round((0.3 + 0.1 * n) * 48000), 48000, RATE)
    # The shards hold the mu-law classes of the mono mix resampled to 16 kHz.
    first = manifest.files[0]
    expected = mu_law_encode(read_audio(first.path, RATE)).to(torch.uint8).numpy()
    np.testing.assert_array_equal(shard_samples(manifest, first.relative), expected)


def test_vctk_080_reads_wav48_and_lists_bad_recordings_as_skipped(tmp_path: Path) -> None:
    manifest = prepare(vctk_080(tmp_path / "VCTK-Corpus"), "vctk")
    assert {f.speaker for f in manifest.files} == set(SPEAKERS) and len(manifest.files) == 6
    assert all(f.frames == resampled_length(round(0.4 * 48000), 48000, RATE) for f in manifest.files)
    reasons = dict(manifest.skipped)
    assert reasons.keys() == {"wav48/p225/p225_003.wav", "wav48/p226/p226_003.wav"}
    assert reasons["wav48/p225/p225_003.wav"].startswith("unreadable")
    assert reasons["wav48/p226/p226_003.wav"].startswith("silent")


def test_ljspeech_reads_the_clips_metadata_lists(tmp_path: Path) -> None:
    manifest = prepare(ljspeech(tmp_path / "LJSpeech-1.1"), "ljspeech")
    assert [f.relative for f in manifest.files] == [f"wavs/LJ001-{n:04d}.wav" for n in (1, 2, 3)]
    assert {f.speaker for f in manifest.files} == {"LJ"}
    assert all(f.frames == resampled_length(round(0.5 * 22050), 22050, RATE) for f in manifest.files)
    assert manifest.skipped == [("wavs/LJ001-0004.wav", "listed by the corpus but missing")]


def test_nested_folder_keeps_usable_files_and_names_the_rest(tmp_path: Path) -> None:
    manifest = prepare(nested(tmp_path / "music"))
    assert {f.relative: f.frames for f in manifest.files} == {
        "a/b/stereo48k.flac": resampled_length(24000, 48000, RATE),
        "a/mono44k.wav": resampled_length(round(0.4 * 44100), 44100, RATE),
        "c/stereo22k.wav": resampled_length(round(0.3 * 22050), 22050, RATE),
    }
    assert all(f.speaker is None for f in manifest.files)
    assert dict(manifest.skipped) == {
        "corrupt.flac": "unreadable (Format not recognised.)",
        "empty.wav": "empty (no samples)",
        "nan.wav": "contains NaN or infinite samples",
        "silent.flac": "silent (every sample is zero)",
    }
    # Files lie back to back in the shard, in listing order.
    offsets = [f.offset for f in manifest.files]
    assert offsets == list(np.cumsum([0] + [f.frames for f in manifest.files[:-1]]))


def test_layouts_that_do_not_match_the_folder_are_user_errors(tmp_path: Path) -> None:
    music = nested(tmp_path / "music")
    with pytest.raises(UserError, match="not a VCTK corpus"):
        list_sources(music, "vctk", ["wav"])
    with pytest.raises(UserError, match="not an LJSpeech corpus"):
        list_sources(music, "ljspeech", ["wav"])


def test_trim_db_cuts_silence_at_both_ends_only(tmp_path: Path) -> None:
    root = tmp_path / "padded"
    tone = chirp(0.5, RATE, seed=1)[:, 0]
    gap = np.zeros(RATE // 4, np.float32)
    write(root / "padded.wav", np.concatenate([gap, tone, gap, tone, gap])[:, None], RATE)
    write(root / "other.wav", chirp(0.5, RATE, seed=2), RATE)

    untrimmed = prepare(root)
    trimmed = prepare(root, settings=PrepareSettings(RATE, 256, trim_db=40))
    assert trimmed.directory != untrimmed.directory
    lengths = {f.relative: f.frames for f in trimmed.files}
    # The leading and trailing quarter seconds go (to 10 ms frames); the gap in the middle stays.
    assert abs(lengths["padded.wav"] - (2 * len(tone) + len(gap))) <= 2 * RATE // 100
    assert lengths["other.wav"] == len(tone)
    data = json.loads((trimmed.directory / MANIFEST).read_text())
    assert data["trim_db"] == 40
    assert {f["path"]: f["trimmed"] for f in data["files"]}["padded.wav"][0] >= len(gap) - RATE // 100


def test_an_unchanged_corpus_reuses_its_cache_and_any_change_makes_a_new_one(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="wavenet.data")
    root = nested(tmp_path / "music")
    first = prepare(root)
    manifest_mtime = (first.directory / MANIFEST).stat().st_mtime_ns

    with pytest.MonkeyPatch.context() as patch:  # reused, not decoded again
        patch.setattr(prepare_module, "_prepare_into", lambda *args, **kwargs: pytest.fail("prepared again"))
        again = prepare(root)
    assert again.directory == first.directory
    assert (first.directory / MANIFEST).stat().st_mtime_ns == manifest_mtime
    assert f"Using prepared data in {first.directory}" in caplog.text

    for change in [
        lambda: PrepareSettings(22050, 256, None),
        lambda: PrepareSettings(RATE, 128, None),
        lambda: PrepareSettings(RATE, 256, 30.0),
    ]:
        assert (
            prepared_folder(root, "folder", ["wav", "flac"], change(), tmp_path / "cache")[0]
            != first.directory
        )
    assert prepared_folder(root, "folder", ["wav"], SETTINGS, tmp_path / "cache")[0] != first.directory

    write(root / "a" / "mono44k.wav", chirp(0.6, 44100, seed=2), 44100)  # a changed source file
    changed = prepare(root)
    assert changed.directory != first.directory
    assert dict((f.relative, f.frames) for f in changed.files)["a/mono44k.wav"] == resampled_length(
        26460, 44100, RATE
    )
    write(root / "added.wav", chirp(0.2, RATE), RATE)
    added = prepare(root)
    assert added.directory not in (first.directory, changed.directory)
    # An edit that keeps the size (other samples, same length) is a change too: the modification time tells.
    edited = root / "added.wav"
    size, mtime = edited.stat().st_size, edited.stat().st_mtime_ns
    write(edited, chirp(0.2, RATE, seed=9), RATE)
    os.utime(edited, ns=(mtime + 10**9, mtime + 10**9))
    assert edited.stat().st_size == size
    assert prepare(root).directory != added.directory


def test_files_changed_while_they_were_prepared_are_trained_on_as_they_were_listed(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="wavenet.data")
    root = tmp_path / "corpus"
    for n in range(3):
        write(root / f"{n}.wav", chirp(0.5, RATE, seed=n), RATE)
    module = AudioFolderDataModule(
        root, RECEPTIVE_FIELD, extensions=["wav"], chunk_length=64, cache_dir=tmp_path / "cache", prepare_workers=1
    )
    module.prepare_data()
    write(root / "3.wav", chirp(0.5, RATE, seed=3), RATE)  # a copy still running when preparation began
    module.setup("fit")  # the whole preparation was thrown away by an error naming prepare_data_per_node
    assert module.manifest is not None and module.manifest.directory == module.prepared
    assert [file.relative for file in module.manifest.files] == ["0.wav", "1.wav", "2.wav"]
    assert "changed while they were prepared" in caplog.text
    # A process that did not prepare them (another rank) names the change among the causes.
    other = AudioFolderDataModule(root, RECEPTIVE_FIELD, extensions=["wav"], cache_dir=tmp_path / "cache")
    with pytest.raises(UserError, match="its files changed since they were prepared"):
        other.setup("fit")


def test_parallel_preparation_writes_the_same_bytes_as_serial(tmp_path: Path, monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO, logger="wavenet.data")
    root = nested(tmp_path / "music")  # small, but a number of workers set is kept
    serial = prepare(root, cache_dir=tmp_path / "serial", workers=1)
    parallel = prepare(root, cache_dir=tmp_path / "parallel", workers=2)
    assert serial.directory.name == parallel.directory.name
    assert "in 2 processes" in caplog.text
    for name in serial.shards:
        assert (serial.directory / name).read_bytes() == (parallel.directory / name).read_bytes()
    assert serial.files == parallel.files and serial.skipped == parallel.skipped


def test_preparation_in_one_process_decodes_on_one_torch_thread(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "corpus"
    for n in range(2):
        write(root / f"{n}.wav", chirp(0.3, RATE, seed=n), RATE)
    threads = []
    encode = prepare_module.encode_file
    monkeypatch.setattr(
        prepare_module, "encode_file", lambda *args: threads.append(torch.get_num_threads()) or encode(*args)
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # torch's default on a machine of 2 cores, which busy cores made 10 times slower
    try:
        prepare(root)
        assert threads == [1, 1]  # as in a pool's workers
        assert torch.get_num_threads() == 2  # and the run's own setting after it
    finally:
        torch.set_num_threads(before)


def test_a_pool_is_handed_a_few_files_ahead_of_the_one_written_not_the_whole_corpus(
    tmp_path: Path, monkeypatch
) -> None:
    submitted = []

    class Pool(Executor):  # runs each task as it is handed over, and counts them
        def __init__(self, workers: int, **kwargs: object) -> None:
            pass

        def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
            submitted.append(args)
            future: Future[str] = Future()
            future.set_result(args[0][0])
            return future

    monkeypatch.setattr(prepare_module, "ProcessPoolExecutor", Pool)
    paths = [tmp_path / f"{n}.wav" for n in range(1000)]
    for n, result in enumerate(prepare_module._encode_all(paths, SETTINGS, workers=2)):
        assert result == str(paths[n])  # in order
        # Not all 1,000 at once: a future of bookkeeping a file, and every result a long file held up, in memory.
        assert len(submitted) <= n + 1 + 2 * prepare_module._AHEAD_PER_WORKER
    assert len(submitted) == 1000


def test_the_default_is_a_pool_where_decoding_outlasts_its_start(tmp_path: Path, monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO, logger="wavenet.data")
    root = nested(tmp_path / "music")
    monkeypatch.setattr(prepare_module, "available_cpus", lambda: 2)
    raw = sum(path.stat().st_size for path in root.rglob("*") if path.is_file())
    # Its FLAC bytes count double (as long to decode as twice the WAV bytes): over the threshold, not under it.
    monkeypatch.setattr(prepare_module, "POOL_MIN_BYTES", raw + 1)
    prepare(root, cache_dir=tmp_path / "pool", workers=None)
    assert "in 2 processes" in caplog.text
    caplog.clear()
    monkeypatch.setattr(prepare_module, "POOL_MIN_BYTES", 2 * raw)
    prepare(root, cache_dir=tmp_path / "one", workers=None)
    assert "in 1 process" in caplog.text


@pytest.mark.parametrize(
    "files,expected",
    [
        ({"cpu.max": "150000 100000\n"}, 2),  # cgroup v2, 1.5 CPUs: a second process for the half
        ({"cpu.max": "50000 100000\n"}, 1),
        ({"cpu.max": "max 100000\n"}, None),  # no quota
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),  # no cgroup files: not in a container, or not Linux
    ],
)
def test_a_containers_cpu_quota_bounds_the_processes_as_its_cpus_do(tmp_path: Path, monkeypatch, files, expected):
    # A pod limited to a few CPUs sees all of its node's: a pool of one process per CPU, each importing torch.
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert prepare_module.available_cpus(tmp_path) == (expected or 64)


def test_files_go_to_a_new_shard_past_the_shard_size(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(prepare_module, "SHARD_BYTES", 10000)
    manifest = prepare(nested(tmp_path / "music"))
    assert [(f.shard, f.offset) for f in manifest.files] == [(0, 0), (1, 0), (2, 0)]  # each over 4,800
    for file in manifest.files:
        expected = mu_law_encode(read_audio(file.path, RATE)).to(torch.uint8).numpy()
        np.testing.assert_array_equal(shard_samples(manifest, file.relative), expected)


def test_a_cut_off_mp3_is_left_out_rather_than_padded_with_silence(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    write(root / "whole.wav", chirp(0.5, RATE, seed=1), RATE)
    full = write(tmp_path / "full.mp3", chirp(2.0, RATE, seed=2), RATE)
    # An interrupted download: its Xing header still gives the whole length, 3/4 of which is gone.
    (root / "cut.mp3").write_bytes(full.read_bytes()[: full.stat().st_size // 4])
    manifest = Manifest.load(prepare_corpus(root, "folder", ["wav", "mp3"], SETTINGS, tmp_path / "cache", 1))
    assert [file.relative for file in manifest.files] == ["whole.wav"]
    [(path, reason)] = manifest.skipped
    assert path == "cut.mp3"
    assert re.fullmatch(r"unreadable \(truncated: it decodes to [\d,]+ of the 32,000 samples its header gives\)", reason)


def test_the_folder_layout_reads_aiff_and_opus_by_default(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    for name, audio_format, subtype in [("a.wav", "WAV", None), ("b.aiff", "AIFF", None), ("c.AIF", "AIFF", None),
                                        ("d.opus", "OGG", "OPUS"), ("e.ogg", "OGG", "VORBIS")]:  # fmt: skip
        root.mkdir(exist_ok=True)
        sf.write(str(root / name), chirp(0.3, RATE), RATE, format=audio_format, subtype=subtype)
    extensions = list(OmegaConf.load(Path(__file__).parents[1] / "conf" / "data" / "folder.yaml").extensions)
    assert extensions == list(AudioFolderDataModule(root, RECEPTIVE_FIELD).extensions)  # data=folder and the API
    manifest = Manifest.load(prepare_corpus(root, "folder", extensions, SETTINGS, tmp_path / "cache", 1))
    assert [file.relative for file in manifest.files] == ["a.wav", "b.aiff", "c.AIF", "d.opus", "e.ogg"]


def test_a_corpus_of_one_unusable_file_is_told_so_in_the_singular(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    write(root / "silent.wav", np.zeros((800, 1), np.float32), RATE)
    with pytest.raises(UserError) as error:
        prepare(root)
    expected = f"no usable audio under data root {root}: its one file was left out: silent.wav: silent"
    assert str(error.value).startswith(expected), str(error.value)


def test_a_corpus_with_nothing_usable_is_one_error_and_leaves_no_cache(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    write(root / "silent.wav", np.zeros((800, 1), np.float32), RATE)
    (root / "corrupt.wav").write_bytes(b"not audio at all")
    with pytest.raises(UserError) as error:
        prepare(root)
    assert str(error.value) == (
        f"no usable audio under data root {root}: all 2 files were left out: "
        "corrupt.wav: unreadable (Format not recognised.); silent.wav: silent (every sample is zero)"
    )
    assert os.listdir(tmp_path / "cache") == []


KILLED = """
import os, signal, sys
import wavenet.data.prepare as prepare
original = prepare._ShardWriter.write
def write_then_die(self, samples):
    result = original(self, samples)
    self._file.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # as an out-of-memory killer or a preempted node would
prepare._ShardWriter.write = write_then_die
settings = prepare.PrepareSettings(16000, 256, None)
prepare.prepare_corpus(sys.argv[1], "folder", ["wav", "flac"], settings, sys.argv[2], 1)
"""


def killed_pid(partial_name: str) -> str:
    """The process id in a temporary folder's name, `<name>.partial-<host>-<pid>-<token>`."""
    return partial_name.rsplit("-", 2)[1]


def test_a_killed_preparation_leaves_nothing_taken_for_a_cache_and_is_cleaned_up(tmp_path: Path) -> None:
    root, cache = nested(tmp_path / "music"), tmp_path / "cache"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED, str(root), str(cache)], capture_output=True, text=True
    )
    assert killed.returncode == -9, killed.stderr
    folder = prepared_folder(root, "folder", ["wav", "flac"], SETTINGS, cache)[0]
    leftovers = os.listdir(cache)
    assert len(leftovers) == 1 and leftovers[0].startswith(f"{folder.name}.partial-")
    assert not folder.exists()

    module = AudioFolderDataModule(
        root,
        receptive_field=8,
        extensions=["wav", "flac"],
        chunk_length=64,
        cache_dir=cache,
        prepare_workers=1,
    )
    with pytest.raises(UserError, match="prepare_data"):
        module.setup("fit")
    # Folders of preparations still running (this process) or on another host (a shared cache) are theirs.
    running = cache / f"{folder.name}.partial-{socket.gethostname()}-{os.getpid()}-x1"
    elsewhere = cache / f"{folder.name}.partial-other-host-{killed_pid(leftovers[0])}-x2"
    running.mkdir(), elsewhere.mkdir()
    module.prepare_data()
    assert sorted(os.listdir(cache)) == sorted([folder.name, running.name, elsewhere.name])  # the dead one's is gone
    fresh = prepare(root, cache_dir=tmp_path / "fresh")
    assert (folder / fresh.shards[0]).read_bytes() == (fresh.directory / fresh.shards[0]).read_bytes()


def test_a_full_disk_is_a_user_error_and_leaves_no_cache(tmp_path: Path, monkeypatch) -> None:
    def full(self, samples):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(prepare_module._ShardWriter, "write", full)
    root = nested(tmp_path / "music")
    with pytest.raises(
        UserError, match=f"cannot write prepared data under {tmp_path / 'cache'}: No space left"
    ):
        prepare(root)
    assert os.listdir(tmp_path / "cache") == []


def test_an_unwritable_cache_directory_is_a_user_error(tmp_path: Path) -> None:
    root = nested(tmp_path / "music")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="cannot write prepared data under .*a_file/cache.*paths.data_dir"):
        prepare(root, cache_dir=tmp_path / "a_file" / "cache")
    if os.geteuid() != 0:  # root writes into read-only folders
        (tmp_path / "read_only").mkdir(mode=0o555)
        with pytest.raises(UserError, match="Permission denied"):
            prepare(root, cache_dir=tmp_path / "read_only")


def test_links_are_followed_and_a_file_reached_twice_is_prepared_once(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    write(root / "a" / "one.wav", chirp(0.3, RATE, seed=1), RATE)
    write(elsewhere / "two.wav", chirp(0.3, RATE, seed=2), RATE)
    (root / "b").mkdir()
    (root / "b" / "link.wav").symlink_to(root / "a" / "one.wav")  # the same audio, under another name
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)  # a folder kept elsewhere
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)  # a link back up must not loop
    # A file of a git-annex or DataLad dataset whose content was never fetched, and a loop of links: named, not
    # passed over (a corpus of nothing but such links was "no audio files found").
    (root / "dangling.wav").symlink_to(tmp_path / "gone.wav")
    (root / "loop1.wav").symlink_to(root / "loop2.wav")
    (root / "loop2.wav").symlink_to(root / "loop1.wav")
    manifest = prepare(root)
    assert [file.relative for file in manifest.files] == ["a/one.wav", "linked/two.wav"]
    assert manifest.skipped == [
        ("b/link.wav", "same file as a/one.wav"),
        ("dangling.wav", f"link to {tmp_path / 'gone.wav'}, which cannot be opened (No such file or directory)"),
        ("loop1.wav", f"link to {root / 'loop2.wav'}, which cannot be opened (Too many levels of symbolic links)"),
        ("loop2.wav", f"link to {root / 'loop1.wav'}, which cannot be opened (Too many levels of symbolic links)"),
    ]
    (root / "a" / "one.wav").unlink(), (root / "linked" / "two.wav").unlink()
    with pytest.raises(UserError, match=r"all 4 files were left out: b/link.wav: link to .*one.wav, which cannot"):
        prepare(root)


def run_without_root_override(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -c script args` with file permissions enforced, also when the tests run as root."""
    command = [sys.executable, "-c", script, *args]
    if os.geteuid() == 0:
        capabilities = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--inh-caps={capabilities}", f"--bounding-set={capabilities}", *command]
    return subprocess.run(command, capture_output=True, text=True)


# Prepares the corpus at argv[1] three times in one process (each start imports torch): as it is, once locked.wav
# is readable (chmod changes neither a file's size nor its modification time), and once the root itself is not.
PREPARE_THREE_TIMES = """
import json, sys
from pathlib import Path
from wavenet.data import Manifest, PrepareSettings, prepare_corpus
from wavenet.errors import UserError
root, cache = Path(sys.argv[1]), sys.argv[2]

def prepare():
    folder = prepare_corpus(str(root), "folder", ["wav"], PrepareSettings(16000, 256, None), cache, 1)
    manifest = Manifest.load(folder)
    return {"files": [f.relative for f in manifest.files], "skipped": manifest.skipped}

first = prepare()
(root / "locked.wav").chmod(0o644)
again = prepare()
root.chmod(0)
try:
    refused = prepare()
except UserError as error:
    refused = str(error)
print(json.dumps({"first": first, "again": again, "refused": refused}))
"""


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="needs setpriv to drop root's rights")
def test_unreadable_files_and_folders_are_named_and_prepared_once_readable(tmp_path: Path) -> None:
    root, cache = tmp_path / "corpus", tmp_path / "cache"
    for name in ("a.wav", "b.wav", "locked.wav", "locked_folder/c.wav"):
        write(root / name, chirp(0.3, RATE), RATE)
    (root / "empty.wav").write_bytes(b"")
    (root / "locked.wav").chmod(0)
    (root / "locked_folder").chmod(0)
    try:
        result = run_without_root_override(PREPARE_THREE_TIMES, str(root), str(cache))
    finally:
        root.chmod(0o755)
        (root / "locked_folder").chmod(0o755)
    assert result.returncode == 0, result.stderr
    runs = json.loads(result.stdout)
    assert runs["first"] == {
        "files": ["a.wav", "b.wav"],
        "skipped": [
            ["empty.wav", "empty (0 bytes)"],
            ["locked.wav", "unreadable (Permission denied)"],
            ["locked_folder/", "folder cannot be listed (Permission denied)"],
        ],
    }
    assert "locked.wav" in runs["again"]["files"]
    assert f"cannot list data root {root}: Permission denied" in runs["refused"]


def test_a_whole_number_trim_db_finds_the_same_cache_as_its_float(tmp_path: Path) -> None:
    root = nested(tmp_path / "music")
    folders = [
        prepared_folder(root, "folder", ["wav"], PrepareSettings(RATE, 256, trim_db), tmp_path / "cache")[0]
        for trim_db in (30, 30.0, 30.5)
    ]
    assert folders[0] == folders[1] != folders[2]


def test_a_damaged_prepared_folder_is_one_error_naming_it(tmp_path: Path) -> None:
    manifest = prepare(nested(tmp_path / "music"))
    shard = manifest.directory / manifest.shards[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:1000])  # a copy cut short
    with pytest.raises(UserError, match=f"prepared folder {manifest.directory} is damaged .*shard-00000.bin has 1,000"):
        Manifest.load(manifest.directory)
    shard.write_bytes(data)
    (manifest.directory / MANIFEST).write_text('{"files": [')
    with pytest.raises(UserError, match=f"prepared folder {manifest.directory} is damaged .*manifest.json"):
        Manifest.load(manifest.directory)


def test_an_unreadable_ljspeech_metadata_is_one_error_naming_it(tmp_path: Path) -> None:
    root = ljspeech(tmp_path / "LJSpeech-1.1")

    def refused(self: Path, *args, **kwargs) -> str:  # chmod 000 does not stop root: the refusal is simulated
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    with pytest.MonkeyPatch.context() as patch, pytest.raises(UserError) as error:
        patch.setattr(Path, "read_text", refused)
        list_sources(root, "ljspeech", ["wav"])
    assert str(error.value) == f"cannot read {root / 'metadata.csv'}: Permission denied"


def test_a_clip_listed_twice_in_ljspeech_metadata_is_prepared_once_and_named(tmp_path: Path) -> None:
    root = ljspeech(tmp_path / "LJSpeech-1.1")
    with (root / "metadata.csv").open("ab") as metadata:
        metadata.write(b"LJ001-0002|Printing again|Printing again\n")
    manifest = prepare(root, "ljspeech")
    assert [f.relative for f in manifest.files] == [f"wavs/LJ001-{n:04d}.wav" for n in (1, 2, 3)]
    assert manifest.skipped == [
        ("wavs/LJ001-0002.wav", "listed again on line 5 of metadata.csv (taken once, from line 2)"),
        ("wavs/LJ001-0004.wav", "listed by the corpus but missing"),
    ]


def test_vctk_names_speaker_folders_that_cannot_be_listed_and_second_paths_as_the_folder_layout_does(
    tmp_path: Path, monkeypatch
) -> None:
    root = vctk_092(tmp_path / "VCTK-Corpus-0.92")
    recordings = root / "wav48_silence_trimmed"
    locked = recordings / "p226"
    (recordings / "p227" / "p227_003_mic1.flac").symlink_to(recordings / "p225" / "p225_001_mic1.flac")
    (recordings / "p227" / "p227_004_mic1.flac").symlink_to(tmp_path / "never-fetched.flac")
    (recordings / "p227" / "p227_004_mic2.flac").symlink_to(tmp_path / "never-fetched.flac")  # not a recording read
    scandir = os.scandir

    def refusing_scandir(path: str | os.PathLike[str] = ".") -> object:  # chmod 000 does not stop root
        if Path(path) == locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing_scandir)
    manifest = prepare(root, "vctk")
    assert [f.relative for f in manifest.files] == [
        f"wav48_silence_trimmed/{speaker}/{speaker}_{n:03d}_mic1.flac" for speaker in ("p225", "p227") for n in (1, 2)
    ]
    assert manifest.skipped == [
        ("wav48_silence_trimmed/p226/", "folder cannot be listed (Permission denied)"),
        ("wav48_silence_trimmed/p227/p227_003_mic1.flac", "same file as wav48_silence_trimmed/p225/p225_001_mic1.flac"),
        (
            "wav48_silence_trimmed/p227/p227_004_mic1.flac",
            f"link to {tmp_path / 'never-fetched.flac'}, which cannot be opened (No such file or directory)",
        ),
    ]


def test_bad_settings_of_the_built_in_dataset_are_user_errors_naming_them(tmp_path: Path) -> None:
    for setting, value in [
        ("num_files", 2.5),
        ("num_files", "abc"),
        ("synthesis_seed", -1),
        ("synthesis_seed", "abc"),
        ("seconds_per_file", math.nan),
        ("seconds_per_file", "abc"),
        ("seconds_per_file", 1e-6),  # no sample at all
    ]:
        with pytest.raises(UserError, match=rf"^data\.{setting} must be .*, got {re.escape(repr(value))}$"):
            SyntheticMusicDataModule(
                tmp_path / "synthetic",
                receptive_field=RECEPTIVE_FIELD,
                cache_dir=tmp_path / "prepared",
                prepare_workers=1,
                **{setting: value},
            )
    assert not (tmp_path / "synthetic").exists()  # refused when the config is built, before anything is made
