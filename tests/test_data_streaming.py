"""Publishing prepared shards and streaming them back with litdata; a local folder is the bucket."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from litdata.utilities.env import _DistributedEnv
from torch.utils.data import DataLoader, IterableDataset

from tests.conftest import TINY, compose_config, start_script
from tests.test_data import CHUNK, RATE, RECEPTIVE_FIELD, WINDOW, chirp, ready, write
from wavenet.data import StreamingDataModule, publish
from wavenet.data.datamodule import split_files
from wavenet.data.prepare import PreparedFile
from wavenet.data.streaming import SEGMENT_OVERLAP, StreamedChunks, segments
from wavenet.data.streaming import main as streaming_main
from wavenet.errors import UserError

# Short segments, so the corpus's files are cut in several.
SEGMENT_SECONDS = 0.25
VAL_FRACTION = 0.3


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    """The prepared folder of a small corpus."""
    root = tmp_path / "corpus"
    for index, seconds in enumerate([1.3, 0.9, 2.2, 0.6, 3.1, 1.0]):
        write(root / f"speaker{index % 2}" / f"clip{index}.wav", chirp(seconds, RATE, seed=index), RATE)
    module = ready(root, val_fraction=VAL_FRACTION)
    assert module.manifest is not None
    return module.manifest.directory


@pytest.fixture
def published(prepared: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(prepared folder, remote folder) of a small corpus published with short segments."""
    remote = tmp_path / "bucket" / "corpus"
    publish(
        prepared,
        str(remote),
        VAL_FRACTION,
        SEGMENT_SECONDS,
        workers=1,
        cache_dir=tmp_path / "lc",
    )
    return prepared, remote


def streaming(remote: str, tmp_path: Path, **overrides) -> StreamingDataModule:
    args = dict(
        receptive_field=RECEPTIVE_FIELD,
        chunk_length=CHUNK,
        batch_size=4,
        num_workers=0,
        shuffle_buffer=8,
        cache_dir=tmp_path / "stream-cache",
        max_cache_size="1GB",
    )
    module = StreamingDataModule(remote, **{**args, **overrides})
    module.setup("fit")
    return module


def test_segments_give_every_window_start_to_exactly_one_segment() -> None:
    segment = 1000
    for frames in [
        1,
        999,
        1000,
        segment + SEGMENT_OVERLAP - 1,
        segment + SEGMENT_OVERLAP,
        5 * segment + 7 * SEGMENT_OVERLAP,
    ]:
        cuts = segments(frames, segment)
        assert cuts[0][0] == 0 and cuts[-1][0] + cuts[-1][1] == frames
        for window in [1, 500, SEGMENT_OVERLAP + 1]:
            starts = [
                start + s for start, length, owned in cuts for s in range(min(owned, length - window + 1))
            ]
            assert starts == list(range(frames - window + 1)), (frames, window)


def test_streamed_window_offsets_are_uniform_and_new_every_epoch() -> None:
    chunks = StreamedChunks(None, RECEPTIVE_FIELD, CHUNK, shuffle_buffer=1, seed=5, epoch_windows=1)
    record = {"file": 3, "start": 0, "owned": 10 * CHUNK, "audio": np.zeros(11 * CHUNK + WINDOW, np.uint8)}
    offsets = np.array([chunks.starts(record, epoch)[0] for epoch in range(1, 2001)])
    assert offsets.min() >= 0 and offsets.max() < CHUNK
    # Every offset below chunk_length equally likely (chi-square over 8 bins, far below its 0.1 % value of 24).
    counts = np.bincount(offsets * 8 // CHUNK, minlength=8)
    assert ((counts - 250) ** 2 / 250).sum() < 24.3
    assert np.mean(offsets[1:] != offsets[:-1]) > 0.95  # a new grid every epoch
    # Another file has its own grid in the same epoch.
    other = {**record, "file": 4}
    assert np.mean([chunks.starts(other, e)[0] != offsets[e - 1] for e in range(1, 201)]) > 0.9


@pytest.mark.parametrize("scheme", ["", "local:"])
def test_streamed_validation_is_the_local_validation(
    published: tuple[Path, Path], tmp_path: Path, scheme: str
) -> None:
    prepared, remote = published
    local = ready(tmp_path / "corpus", val_fraction=VAL_FRACTION)
    module = streaming(f"{scheme}{remote}", tmp_path)
    assert module.val_set is not None and local.val_set is not None
    # Segments carry the overlap, so tiling them gives the windows tiling their files does.
    assert len(module.val_set) == len(local.val_set)
    for index in range(len(local.val_set)):
        streamed, expected = module.val_set[index], local.val_set[index]
        assert torch.equal(streamed[0], expected[0]) and torch.equal(streamed[1], expected[1])
    assert {segment.path for segment in module.val_set.files} == {file.path for file in local.val_files}


def test_streamed_training_batches_are_windows_with_shifted_targets(
    published: tuple[Path, Path], tmp_path: Path
) -> None:
    _, remote = published
    module = streaming(f"local:{remote}", tmp_path, num_workers=2)
    batches = list(itertools.islice(module.train_dataloader(), 30))  # more than one epoch: the stream goes on
    for inputs, targets in batches:
        assert inputs.shape == targets.shape == (4, WINDOW - 1)
        assert inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert len({inputs.numpy().tobytes() for inputs, _ in batches}) == len(batches)


class OneEpochStarts(IterableDataset):
    """The (file, start) of every window that one simulated rank's workers draw in epoch 1."""

    def __init__(self, chunks: StreamedChunks, rank: int, world_size: int) -> None:
        self.chunks, self.rank, self.world_size = chunks, rank, world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        records = self.chunks.records
        records.distributed_env = _DistributedEnv(self.world_size, self.rank, 1)
        records.set_epoch(1)
        for record in records:
            for start in self.chunks.starts(record, 1):
                yield int(record["file"]), int(record["start"]) + start


def test_two_ranks_with_two_workers_stream_disjoint_windows_on_one_grid(
    published: tuple[Path, Path], tmp_path: Path
) -> None:
    _, remote = published
    module = streaming(str(remote), tmp_path)
    assert module.train_set is not None and module.manifest is not None
    drawn = {
        rank: [
            (int(file), int(start))
            for file, start in DataLoader(
                OneEpochStarts(module.train_set, rank, 2), batch_size=None, num_workers=2
            )
        ]
        for rank in range(2)
    }
    assert drawn[0] and drawn[1]
    everything = drawn[0] + drawn[1]
    assert len(set(everything)) == len(everything)
    for file in {file for file, _ in everything}:
        starts = np.sort([start for f, start in everything if f == file])
        # One grid per file: segments continue it, so no two chunks of the epoch overlap.
        assert np.all(np.diff(starts) % CHUNK == 0) and np.all(np.diff(starts) >= CHUNK)
        assert starts[-1] <= module.manifest.files[file].frames - WINDOW


def test_publishing_stages_nothing_in_the_system_temporary_folder(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    options = ["--val-fraction", str(VAL_FRACTION), "--segment-seconds", str(SEGMENT_SECONDS), "--workers", "1"]
    streaming_main([str(prepared), str(tmp_path / "bucket"), *options, "--cache-dir", str(tmp_path / "lc")])
    assert list(system_tmp.iterdir()) == []
    assert (tmp_path / "lc" / "publishing" / "chunks").is_dir()


def test_publishing_leaves_ctrl_c_as_it_was(published: tuple[Path, Path], tmp_path: Path) -> None:
    # litdata.optimize leaves a handler behind that exits with status 0: a later Ctrl-C would look like success.
    prepared, _ = published
    ctrl_c = signal.getsignal(signal.SIGINT)
    publish(prepared, str(tmp_path / "other"), VAL_FRACTION, SEGMENT_SECONDS, workers=1, cache_dir=tmp_path / "lc2")
    assert signal.getsignal(signal.SIGINT) is ctrl_c


def test_publishing_again_is_a_no_op_and_another_corpus_is_refused(
    published: tuple[Path, Path], tmp_path: Path
) -> None:
    prepared, remote = published
    mtime = (remote / "manifest" / "index.json").stat().st_mtime_ns
    publish(prepared, str(remote), VAL_FRACTION, SEGMENT_SECONDS, workers=1, cache_dir=tmp_path / "lc")
    assert (remote / "manifest" / "index.json").stat().st_mtime_ns == mtime
    with pytest.raises(UserError, match="holds another published corpus"):
        publish(prepared, str(remote), 0.5, SEGMENT_SECONDS, workers=1, cache_dir=tmp_path / "lc")
    with pytest.raises(UserError, match="is not a prepared corpus"):
        publish(tmp_path, str(tmp_path / "elsewhere"))


def test_missing_remote_or_other_settings_are_user_errors(
    published: tuple[Path, Path], tmp_path: Path
) -> None:
    _, remote = published
    with pytest.raises(UserError, match=f"no published corpus at data.remote={tmp_path / 'nothing'}"):
        streaming(str(tmp_path / "nothing"), tmp_path)
    with pytest.raises(UserError, match="data.sample_rate=22050"):
        streaming(str(remote), tmp_path, sample_rate=22050)
    with pytest.raises(UserError, match="data.chunk_length"):
        streaming(str(remote), tmp_path, chunk_length=10**6)


@pytest.mark.slow
def test_training_streams_from_the_remote(published: tuple[Path, Path], tmp_path: Path) -> None:
    from wavenet.tasks.train import run

    _, remote = published
    overrides = [*TINY, "data=streaming", f"data.remote={remote}", f"paths.data_dir={tmp_path / 'data'}"]
    cfg = compose_config(
        "train", [*overrides, "trainer.max_steps=4", "trainer.val_check_interval=2"], tmp_path / "run"
    )
    metric = run(cfg)
    assert metric is not None and 0.0 < metric < 9.0
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    # The checkpoint holds how far the stream got, and a run resumed from it goes on.
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    [state] = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state["windows"] >= 4 * 4  # 4 steps of 4 windows (and the batch Lightning fetches ahead)
    resumed = compose_config(
        "train",
        [*overrides, "trainer.max_steps=6", "trainer.val_check_interval=2", f"ckpt_path={last}"],
        tmp_path / "resumed",
    )
    assert run(resumed) is not None
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6


def test_a_resumed_stream_starts_a_new_epoch_instead_of_replaying_the_start(
    published: tuple[Path, Path], tmp_path: Path
) -> None:
    _, remote = published

    def windows(loader: DataLoader, batches: int) -> list[bytes]:
        return [window.numpy().tobytes() for inputs, _ in itertools.islice(loader, batches) for window in inputs]

    fresh = streaming(str(remote), tmp_path)
    loader = fresh.train_dataloader()
    first = windows(loader, 6)
    state = loader.state_dict()
    assert state == {"windows": 6 * 4}

    again = streaming(str(remote), tmp_path)
    replay = again.train_dataloader()
    assert windows(replay, 6) == first  # the same seed streams the same windows

    module = streaming(str(remote), tmp_path)
    resumed = module.train_dataloader()
    resumed.load_state_dict(state)
    after = windows(resumed, 6)
    assert not set(after) & set(first)
    assert resumed.state_dict() == {"windows": 12 * 4}  # counting goes on from the checkpoint's


# Publishing as users type it, each segment item slowed down, so that a Ctrl-C comes in the middle.
SLOW_PUBLISH = """
import sys, time
from wavenet.data import streaming

items = streaming._SegmentItems.__call__

def slowly(self, job):
    for item in items(self, job):
        time.sleep(0.2)
        yield item

streaming._SegmentItems.__call__ = slowly
streaming.main(sys.argv[1:])
"""


def in_session(session: int) -> list[int]:
    """The processes of `session` that have not ended: a publisher's, and any it left behind."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            state, _, _, sid = stat.read_text().rsplit(")", 1)[1].split()[:4]  # after the name, which may hold ")"
            if int(sid) == session and state != "Z":
                pids.append(int(stat.parent.name))
    return pids


@pytest.mark.skipif(sys.platform != "linux", reason="litdata's workers are slowed down through fork")
@pytest.mark.parametrize("ctrl_c", ["terminal", "process", "kill -9"])
def test_ctrl_c_stops_publishing_at_once_with_nothing_taken_as_complete(
    prepared: Path, tmp_path: Path, ctrl_c: str
) -> None:
    # litdata's own handler exited with status 0 at Ctrl-C from a terminal, and left its workers hanging forever
    # when only the main process got SIGINT (kill -INT). kill -9 of the command's group left litdata writing on.
    remote = tmp_path / "bucket" / "interrupted"
    (tmp_path / "publish.py").write_text(SLOW_PUBLISH)
    options = ["--segment-seconds", "0.25", "--workers", "1"]
    # A session of its own, as a terminal gives a command: its group is what Ctrl-C signals.
    publisher = start_script(str(tmp_path / "publish.py"), str(prepared), str(remote), *options,
                             env={"WAVENET_DATA_DIR": str(tmp_path / "data")})  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (remote / "train").is_dir() and publisher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # made as the train split starts
        time.sleep(0.5)  # litdata's workers are writing the first items
        assert publisher.poll() is None, publisher.communicate()
        interrupted = time.monotonic()
        if ctrl_c == "terminal":
            os.killpg(publisher.pid, signal.SIGINT)
        elif ctrl_c == "kill -9":
            os.killpg(publisher.pid, signal.SIGKILL)
        else:
            publisher.send_signal(signal.SIGINT)
        _, stderr = publisher.communicate(timeout=30)
        took = time.monotonic() - interrupted
        deadline = time.monotonic() + 0.5
        while (left := in_session(publisher.pid)) and time.monotonic() < deadline:  # killed processes going
            time.sleep(0.1)
    finally:
        for pid in in_session(publisher.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    lines = stderr.strip().splitlines()
    assert not left, f"processes left writing: {left}"
    assert not (remote / "manifest").exists()
    if ctrl_c == "kill -9":
        return
    assert publisher.returncode == 130, lines
    assert took < 10, took  # some 1 s here, most of it the interpreter's shutdown
    assert lines[-1] == f"interrupted: nothing published to {remote} is complete; run the same command again"
    assert not any("Traceback" in line or "Error" in line for line in lines), lines


@pytest.mark.parametrize("target", ["a file", "under a file", "read-only"])
def test_an_unwritable_remote_is_a_user_error_naming_it(prepared: Path, tmp_path: Path, target: str) -> None:
    afile = tmp_path / "afile.txt"
    afile.write_text("not a folder")
    remote = {"a file": afile, "under a file": afile / "corpus", "read-only": tmp_path / "locked" / "corpus"}[target]
    if target == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes to read-only folders")
        remote.parent.mkdir()
        remote.parent.chmod(0o500)
    reason = "is not writable|Permission denied" if target == "read-only" else "Not a directory"
    with pytest.raises(UserError, match=f"^cannot publish to {re.escape(str(remote))}: .*({reason})"):
        publish(prepared, str(remote), VAL_FRACTION, SEGMENT_SECONDS, workers=1, cache_dir=tmp_path / "lc")


def test_an_unusable_cache_folder_is_a_user_error_naming_the_setting(
    published: tuple[Path, Path], tmp_path: Path, monkeypatch
) -> None:
    prepared, remote = published
    afile = tmp_path / "afile.txt"
    afile.write_text("not a folder")
    # local: is copied through the cache like a download (a plain folder is read in place).
    with pytest.raises(UserError, match=f"cache in {re.escape(str(afile))}/streaming .*set data.cache_dir to"):
        streaming(f"local:{remote}", tmp_path, cache_dir=afile / "streaming")
    # publish must not take a remote it cannot read back for an empty one, and write over it.
    monkeypatch.setenv("WAVENET_DATA_DIR", str(afile))
    with pytest.raises(UserError, match="set WAVENET_DATA_DIR to"):
        publish(prepared, f"local:{remote}", 0.5, SEGMENT_SECONDS, workers=1)


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_remote_missing_a_split_is_a_user_error_at_setup(
    published: tuple[Path, Path], tmp_path: Path, split: str
) -> None:
    _, remote = published
    for path in (remote / split).iterdir():
        path.unlink()
    (remote / split).rmdir()
    missing = f"data.remote={re.escape(str(remote))} has a manifest but no complete {split}/"
    with pytest.raises(UserError, match=missing):
        streaming(str(remote), tmp_path)


def test_an_empty_manifest_folder_is_a_one_line_user_error(published: tuple[Path, Path], tmp_path: Path) -> None:
    _, remote = published
    for path in (remote / "manifest").iterdir():
        path.unlink()
    with pytest.raises(UserError, match="no published corpus at data.remote") as error:
        streaming(str(remote), tmp_path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_truncated_chunk_is_a_user_error_naming_it(
    published: tuple[Path, Path], tmp_path: Path, split: str
) -> None:
    _, remote = published
    chunk = remote / split / "chunk-0-0.bin"
    os.truncate(chunk, 1000)
    module = streaming(str(remote), tmp_path, num_workers=1)
    with pytest.raises(UserError, match=f"chunk {re.escape(str(chunk))} of the published corpus was not complete"):
        if split == "train":
            next(iter(module.train_dataloader()))  # in a worker, as training reads
        else:
            assert module.val_set is not None
            module.val_set[0]


@pytest.mark.parametrize("damage", ["a truncated shard", "a broken manifest"])
def test_a_damaged_prepared_folder_is_refused_before_anything_is_published(
    prepared: Path, tmp_path: Path, damage: str
) -> None:
    if damage == "a truncated shard":
        shard = prepared / "shard-00000.bin"
        os.truncate(shard, shard.stat().st_size // 2)
    else:
        (prepared / "manifest.json").write_text('{"files": [')
    remote = tmp_path / "bucket" / "corpus"
    with pytest.raises(UserError, match=f"^the prepared folder {re.escape(str(prepared))} is damaged"):
        publish(prepared, str(remote), VAL_FRACTION, SEGMENT_SECONDS, workers=1, cache_dir=tmp_path / "lc")
    assert not (tmp_path / "bucket").exists()


def test_training_files_shorter_than_one_window_are_named_with_the_fix(tmp_path: Path) -> None:
    names = [f"clip{index}.wav" for index in range(4)]
    _, val = split_files([PreparedFile(Path(name), name, None, 0, 0, 0) for name in names], VAL_FRACTION)
    for index, name in enumerate(names):  # training files of 2 s, validation files of 3 s
        seconds = 3.0 if name in {file.relative for file in val} else 2.0
        write(tmp_path / "corpus" / name, chirp(seconds, RATE, seed=index), RATE)
    module = ready(tmp_path / "corpus", val_fraction=VAL_FRACTION)
    assert module.manifest is not None
    remote = tmp_path / "bucket"
    publish(module.manifest.directory, str(remote), VAL_FRACTION, workers=1, cache_dir=tmp_path / "lc")
    short = f"no training file .* as long as one window \\({RECEPTIVE_FIELD + 32000} samples.*lower data.chunk_length$"
    with pytest.raises(UserError, match=short):
        streaming(str(remote), tmp_path, chunk_length=32000)


class _Records(list):
    """Segment items as litdata hands them to one worker, without litdata."""

    def set_epoch(self, epoch: int) -> None:
        pass


def test_a_worker_draws_on_past_epochs_that_miss_its_few_window_starts() -> None:
    # One window start: each epoch draws it with probability 1 / chunk_length, most epochs draw nothing.
    audio = (np.arange(WINDOW) % 256).astype(np.uint8)
    record = {"file": 0, "start": 0, "owned": 1, "audio": audio}
    chunks = StreamedChunks(_Records([record]), RECEPTIVE_FIELD, CHUNK, shuffle_buffer=1, seed=0, epoch_windows=1)
    inputs, targets = next(iter(chunks))
    assert np.array_equal(inputs.numpy(), audio[:-1]) and np.array_equal(targets.numpy(), audio[1:])
    # Segments too short for any window: the worker has too small a share of the corpus.
    short = _Records([{**record, "audio": audio[:-1]}])
    chunks = StreamedChunks(short, RECEPTIVE_FIELD, CHUNK, shuffle_buffer=1, seed=0, epoch_windows=1)
    too_few = rf"no training segment as long as one window \({WINDOW} samples\).*lower data.num_workers$"
    with pytest.raises(UserError, match=too_few):
        next(iter(chunks))
