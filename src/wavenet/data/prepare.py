"""Preparation: a corpus of audio files -> flat `uint8` mu-law shards plus a manifest, made once and reused.

Decoding and resampling cost more CPU than a GPU waits for, so they are done once: every file is mixed
to mono, resampled to the model's rate, optionally trimmed of leading and trailing silence, mu-law
encoded to one byte per sample and appended to a shard. Training then slices memory-mapped shards.

The prepared folder's name holds a hash of the settings and of every source file's path, size and
modification time, so every process finds the same folder, a changed setting or file makes a new one,
and an unchanged corpus is found again from a directory listing. A folder is written under a temporary
name and renamed into place once complete: a folder with the final name is always a whole cache.

Layout of a prepared folder:

    <cache_dir>/<layout>-<root name>-<rate>hz-mu<levels>-<hash>/
        manifest.json        # settings, shards, and per file: shard, offset, samples, speaker, source
        shard-00000.bin ...  # the files' mu-law classes back to back, one byte each, no headers
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import secrets
import select
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, TextIO

import numpy as np
import torch
from tqdm import tqdm

from wavenet.data.audio import EMPTY_FILE, UnreadableAudioError, audio_info, peak_problem, read_audio, resampled_length
from wavenet.data.layouts import Source, list_sources
from wavenet.data.mulaw import mu_law_encode
from wavenet.errors import UserError, first_line
from wavenet.signals import start_resource_tracker_deaf_to_hangups

log = logging.getLogger(__name__)

# Part of every cache key: bump it whenever the bytes preparation writes for the same input change.
# 2: float files in integer units and files of one value throughout are left out (version 1 kept them).
# 3: truncated files are left out (version 2 padded them with silence to the length their header gives).
PREPARE_VERSION = 3
MANIFEST = "manifest.json"
# A shard is closed once the next file would take it past this size (a longer file gets a shard of its
# own): small enough to copy and checksum piecemeal, large enough that a corpus has few of them.
SHARD_BYTES = 1 << 28
# Files are decoded in blocks of this many seconds, so a long recording never sits in memory as float32.
_BLOCK_SECONDS = 60
# Frame length of the silence trimming, in seconds.
_TRIM_FRAME_SECONDS = 0.01
_PARTIAL = ".partial-"
# Below this much work (bytes of 16-bit WAV, or their equivalent) one process is quicker than a pool, whose workers
# take about 2 s to start (each imports torch), while one process prepares 60-80 MB of WAV a second. On 2 cores,
# 106 MB of WAV took 1.9 s in one process and 4 s in two; 635 MB 10.7 s and 7.8-9 s. Only for the default number of
# workers: a number set is kept.
POOL_MIN_BYTES = 256 << 20
# Decoding time per byte against 16-bit WAV's: compressed formats hold more audio per byte, and decoding takes
# about as long per second of audio (one core, 44.1 kHz mono: WAV 71 MB/s, FLAC 33 MB/s, MP3 at ~72 kb/s 4.6 MB/s).
_DECODING_COST = {".flac": 2, ".mp3": 15, ".ogg": 15, ".opus": 15}
# Left-out files an error about a corpus with none usable names; the line would get unreadable past that.
_LISTED_IN_ERROR = 5
# Files handed to a pool ahead of the one whose result is written next, per worker. `ProcessPoolExecutor.map` hands
# over all at once: about 1.2 KB of bookkeeping per file (1.2 GB for a million), and the results of every file that a
# long one ahead of them held up, kept until it was done. Enough that the other workers go on while a long file decodes.
_AHEAD_PER_WORKER = 16


def default_data_dir() -> Path:
    """`paths.data_dir` of the configs: $WAVENET_DATA_DIR, else ~/.cache/wavenet."""
    return Path(os.environ.get("WAVENET_DATA_DIR") or Path.home() / ".cache" / "wavenet")


@dataclass(frozen=True)
class PrepareSettings:
    """Everything besides the source files that decides the prepared bytes."""

    sample_rate: int
    quantization_channels: int
    trim_db: float | None  # trim leading and trailing audio this many dB below the file's loudest 10 ms


@dataclass(frozen=True)
class PreparedFile:
    """One file of a prepared corpus: where its samples are in the shards."""

    path: Path  # the source file, under the corpus root
    relative: str  # `path` relative to the root, "/"-separated: the file's name in the manifest
    speaker: str | None
    shard: int
    offset: int  # of its first sample in the shard
    frames: int  # samples at the prepared sample rate, after trimming


@dataclass(frozen=True)
class Manifest:
    """The contents of a prepared folder's `manifest.json`, as the data modules use it."""

    directory: Path
    root: Path
    sample_rate: int
    quantization_channels: int
    shards: list[str]
    files: list[PreparedFile]
    skipped: list[tuple[str, str]]  # (relative path, reason) of the source files left out

    @classmethod
    def load(cls, directory: str | Path, root: str | Path | None = None) -> Manifest:
        """Reads the manifest of a prepared folder.

        Args:
            directory: The prepared folder.
            root: Where the corpus is now, if it moved since it was prepared; the manifest's otherwise.

        Raises:
            UserError: If the folder is damaged: its manifest unreadable, or a shard not of the size it names.
        """
        directory = Path(directory)
        try:
            data = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
            manifest = cls.from_dict(data, directory, root)
            sizes = {shard["name"]: shard["samples"] for shard in data["shards"]}
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise _damaged(directory, f"{MANIFEST}: {first_line(error)}") from error
        for name, samples in sizes.items():
            try:
                size = (directory / name).stat().st_size
            except OSError as error:
                raise _damaged(directory, f"{name}: {error.strerror}") from error
            if size != samples:
                raise _damaged(directory, f"{name} has {size:,} bytes where the manifest says {samples:,}")
        return manifest

    @classmethod
    def from_dict(cls, data: dict[str, Any], directory: Path, root: str | Path | None = None) -> Manifest:
        root = Path(root if root is not None else data["root"])
        files = [
            PreparedFile(root / f["path"], f["path"], f["speaker"], f["shard"], f["offset"], f["samples"])
            for f in data["files"]
        ]
        return cls(
            directory=directory,
            root=root,
            sample_rate=data["sample_rate"],
            quantization_channels=data["quantization_channels"],
            shards=[shard["name"] for shard in data["shards"]],
            files=files,
            skipped=[(entry["path"], entry["reason"]) for entry in data["skipped"]],
        )


def prepared_folder(
    root: str | Path,
    layout: str,
    extensions: Sequence[str],
    settings: PrepareSettings,
    cache_dir: str | Path,
) -> tuple[Path, list[Source], list[os.stat_result | None]]:
    """The folder the corpus prepares into, its sources and their `stat`s (None if missing).

    Reads only the listing and the files' sizes and modification times, not their contents.

    Raises:
        UserError: If `root` holds no corpus of `layout` (see `wavenet.data.layouts.list_sources`).
    """
    root = Path(root)
    sources = list_sources(root, layout, extensions)
    stats = [None if source.problem else (root / source.relative).stat() for source in sources]
    identities = [
        [source.relative, source.speaker, None if stat is None else _identity(root / source.relative, stat)]
        for source, stat in zip(sources, stats)
    ]
    key_fields = {
        "version": PREPARE_VERSION,
        "layout": layout,
        # Only the folder layout picks files by extension; the others have fixed formats.
        "extensions": sorted(e.lower().lstrip(".") for e in extensions) if layout == "folder" else None,
        "sample_rate": settings.sample_rate,
        "quantization_channels": settings.quantization_channels,
        # 30 and 30.0 are the same setting: one key, so `data.trim_db=30.0` finds the cache of `trim_db: 30`.
        "trim_db": None if settings.trim_db is None else _number_key(settings.trim_db),
        "sources": identities,
    }
    digest = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    rate, levels = settings.sample_rate, settings.quantization_channels
    name = f"{layout}-{root.resolve().name or 'root'}-{rate}hz-mu{levels}"
    return Path(cache_dir) / f"{name}-{digest}", sources, stats


def _identity(path: Path, stat: os.stat_result) -> list[Any]:
    """What a source file's bytes are known by: size and modification time, and whether it may be read.

    A file made readable after a preparation left it out (chmod changes neither size nor time) is then
    prepared anew; the flag is there only for unreadable files, so keys made before it was added still hold.
    """
    identity: list[Any] = [stat.st_size, stat.st_mtime_ns]
    if not os.access(path, os.R_OK):
        identity.append("unreadable")
    return identity


def _number_key(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def prepare_corpus(
    root: str | Path,
    layout: str,
    extensions: Sequence[str],
    settings: PrepareSettings,
    cache_dir: str | Path,
    workers: int | None = None,
) -> Path:
    """Prepares the corpus under `root` into `cache_dir` unless that was done already; returns the folder.

    Args:
        root: The corpus.
        layout: How to read it: "folder", "vctk" or "ljspeech".
        extensions: File extensions the "folder" layout takes.
        settings: Sample rate, mu-law levels, silence trimming.
        cache_dir: Where prepared folders live.
        workers: Processes decoding files in parallel; None for one per CPU this process may use.

    Raises:
        UserError: If the corpus is missing or holds no usable audio, or the cache cannot be written
            (read-only, full); no folder that passes for a finished cache is left behind.
    """
    root = Path(root)
    folder, sources, stats = prepared_folder(root, layout, extensions, settings, cache_dir)
    if (folder / MANIFEST).is_file():
        log.info("Using prepared data in %s", folder)
        return folder
    if workers is not None and workers < 1:
        raise UserError(f"data.prepare_workers must be at least 1, got {workers}")
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(cache_dir)
        partial = (
            cache_dir / f"{folder.name}{_PARTIAL}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        )
        partial.mkdir()
    except OSError as error:
        raise _cache_error(cache_dir, error) from error
    try:
        _prepare_into(partial, root, layout, sources, stats, settings, workers)
        try:
            os.rename(partial, folder)
        except OSError:
            if not (folder / MANIFEST).is_file():
                raise
            # Another process (another node sharing the cache) finished first with the same bytes.
    except OSError as error:
        raise _cache_error(cache_dir, error) from error
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("Prepared data in %s", folder)
    return folder


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: those it may run on (a container's or a SLURM job's cpuset, `taskset`), or fewer
    where its container's CPU quota allows less time (Kubernetes' `limits.cpu`, `docker run --cpus`): a pod limited
    to 4 CPUs on a node of 64 sees all 64, and a process per CPU there, each importing torch, is slower than 4 and
    may not fit its memory limit."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cpu_quota(cgroup_root)
    return cpus if quota is None else max(1, min(cpus, math.ceil(quota)))


def _cpu_quota(cgroup_root: Path) -> float | None:
    """The CPUs' worth of time that the quota of this process's container allows (cgroup v2's `cpu.max`, v1's
    `cpu.cfs_quota_us` over `cpu.cfs_period_us`, as mounted in a container); None without a quota."""
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup_root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        allowed = int(quota) / int(period)  # "max" (v2) is no number: no quota
    except (ValueError, ZeroDivisionError):
        return None
    return allowed if allowed > 0 else None  # v1 says -1 for none


class _Lines:
    """A stream for tqdm that starts each redraw on a line of its own: a log file shows a list of progress
    lines, not one line of bars joined by carriage returns."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.started = False

    def write(self, text: str) -> None:
        lines = text.replace("\r", "\n")
        if not self.started:  # no empty line before the first
            lines = lines.lstrip("\n")
            self.started = bool(lines)
        self.stream.write(lines)

    def flush(self) -> None:
        self.stream.flush()


def file_progress(total: int, description: str) -> tqdm:
    """A progress bar over `total` files on stderr; where that is no terminal (a batch job's log), a line a
    minute instead of a bar redrawn ten times a second."""
    if sys.stderr.isatty():
        return tqdm(total=total, desc=description, unit="file", delay=1.0)
    return tqdm(total=total, desc=description, unit="file", delay=1.0, mininterval=60.0, file=_Lines(sys.stderr))


class _Encoded(NamedTuple):
    """What preparing one file gave: its classes, or why it was left out."""

    samples: np.ndarray | None  # (T,) uint8
    problem: str | None
    source_rate: int
    trimmed: tuple[int, int]  # samples removed at the start and at the end


def encode_file(path: str | Path, settings: PrepareSettings) -> _Encoded:
    """Decodes, mixes to mono, resamples, checks, trims and mu-law encodes one file.

    Problems with the file (unreadable, empty, NaN or infinite samples, nothing but silence) are
    returned, not raised, so one bad file among thousands is reported rather than stopping the run.
    """
    try:
        source_frames, source_rate = audio_info(path)
    except UnreadableAudioError as error:
        problem = "empty (0 bytes)" if error.reason == EMPTY_FILE else f"unreadable ({error.reason})"
        return _Encoded(None, problem, 0, (0, 0))
    if source_frames == 0:
        return _Encoded(None, "empty (no samples)", source_rate, (0, 0))
    rate = settings.sample_rate
    total = resampled_length(source_frames, source_rate, rate)
    frame = max(1, round(rate * _TRIM_FRAME_SECONDS))
    block = frame * round(_BLOCK_SECONDS / _TRIM_FRAME_SECONDS)  # whole frames, so blocks split no frame
    classes, energies = [], []
    low, high = math.inf, -math.inf
    for start in range(0, total, block):
        try:
            audio = read_audio(path, rate, start, min(block, total - start)).numpy()
        except UnreadableAudioError as error:
            return _Encoded(None, f"unreadable ({error.reason})", source_rate, (0, 0))
        if not np.isfinite(audio).all():
            return _Encoded(None, "contains NaN or infinite samples", source_rate, (0, 0))
        problem = peak_problem(float(np.abs(audio).max(initial=0.0)))
        if problem is not None:
            return _Encoded(None, problem, source_rate, (0, 0))
        low, high = min(low, float(audio.min(initial=math.inf))), max(high, float(audio.max(initial=-math.inf)))
        padded = np.pad(audio, (0, -len(audio) % frame))
        energies.append(np.square(padded, dtype=np.float64).reshape(-1, frame).mean(axis=1))
        encoded = mu_law_encode(torch.from_numpy(audio), settings.quantization_channels)
        classes.append(encoded.to(torch.uint8).numpy())
    energy = np.concatenate(energies)
    if not energy.max() > 0.0:
        return _Encoded(None, "silent (every sample is zero)", source_rate, (0, 0))
    if low == high:  # a DC offset and nothing else: one mu-law class throughout
        return _Encoded(None, f"constant (every sample is {low:.4g})", source_rate, (0, 0))
    samples = np.concatenate(classes)
    begin, end = 0, total
    if settings.trim_db is not None:
        loud = np.flatnonzero(energy >= energy.max() * 10.0 ** (-settings.trim_db / 10.0))
        begin, end = int(loud[0]) * frame, min(int(loud[-1] + 1) * frame, total)
    return _Encoded(samples[begin:end], None, source_rate, (begin, total - end))


def _encode_job(job: tuple[str, PrepareSettings]) -> _Encoded:
    return encode_file(*job)


def _init_worker(preparing_pid: int) -> None:
    # One thread per process: the pool is the parallelism, and torch's own threads would oversubscribe.
    torch.set_num_threads(1)
    threading.Thread(target=_exit_with, args=(preparing_pid,), name="exit-with-parent", daemon=True).start()
    # Workers that died of a job's SIGTERM broke the pool: tracebacks from its thread, or at Python 3.11's exit
    # ("Exception ignored in: <module 'threading'> ... OSError: [Errno 9] Bad file descriptor").
    leave_stops_to(preparing_pid)


def leave_stops_to(owner_pid: int) -> None:
    """For a worker process: ignores Ctrl-C and SIGHUP, and a SIGTERM from anyone but process `owner_pid`, which it
    exits on.

    A terminal's Ctrl-C and hangup (SIGHUP: a dropped ssh session) and a scheduler's SIGTERM (SLURM, `timeout`, `kill`
    of a process group) reach every process of a job, workers included: the process that owns them decides what
    stops, and ends its workers itself. Its SIGTERM (`Process.terminate`) still ends a worker at once, so the signal
    is taken by a thread that knows the sender, rather than ignored outright. Where `sigwaitinfo` is missing (macOS,
    Windows), SIGTERM stays as it was.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        return
    # Blocked here, it is blocked in every thread this worker starts later (its queue's feeder): only
    # sigwaitinfo below receives it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait_for_sigterm() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == owner_pid:
                os._exit(0)  # as PyTorch's own handler does for a DataLoader worker's owner's SIGTERM

    threading.Thread(target=wait_for_sigterm, name="sigterm", daemon=True).start()


def _exit_with(pid: int) -> None:
    """Ends this worker once process `pid` has gone.

    A pool worker waits for jobs forever, and the forkserver it was forked from waits for its workers: if the
    preparing process is killed (the OOM killer, kill -9), nothing else would end them and their memory.
    """
    wait_for_exit(pid)
    os._exit(1)


def wait_for_exit(pid: int) -> None:
    """Returns once process `pid` has ended."""
    try:
        process = os.pidfd_open(pid)  # Linux: readable when the process ends, and immune to pid reuse
    except (AttributeError, OSError):
        while _alive(pid):
            time.sleep(1.0)
    else:
        select.select([process], [], [])


def _encode_all(paths: list[Path], settings: PrepareSettings, workers: int) -> Iterator[_Encoded]:
    """`encode_file` over `paths`, results in order, in `workers` processes."""
    jobs = [(str(path), settings) for path in paths]
    if workers == 1 or len(jobs) <= 1:
        # One torch thread, as in a pool's worker: a file's operations gain little from sharing out, and torch's
        # other threads, spinning while they wait for work, took the core this one decoded on. On 2 cores that other
        # jobs used too, 3,000 one-second files took 18-22 s with torch's 2 threads, 1.8 s with one.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield from map(_encode_job, jobs)
        finally:
            torch.set_num_threads(threads)
        return
    start_resource_tracker_deaf_to_hangups()  # the pool's queues would start it, and a hangup end it
    # forkserver, not fork: the caller may be multi-threaded (loggers, Lightning), and fork copies locks.
    pool = ProcessPoolExecutor(
        min(workers, len(jobs)),
        mp_context=multiprocessing.get_context("forkserver"),
        initializer=_init_worker,
        initargs=(os.getpid(),),
    )
    try:
        # Results come back in order, so the shards are the same bytes whatever the number of workers. One file per
        # task: a stopped preparation ends once its workers have done the few files handed to them.
        queued = iter(jobs)
        # The workers start with the first tasks (one for each, so they all start here), with Ctrl-C, SIGTERM and
        # SIGHUP blocked (the forkserver, started now too, keeps the mask, and so does every worker it forks) until
        # `leave_stops_to` takes them: a job's signal that came while a worker was still starting (importing torch,
        # a second or two) killed it, and broke the pool.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
        try:
            ahead = min(workers, len(jobs)) * _AHEAD_PER_WORKER
            pending = collections.deque(pool.submit(_encode_job, job) for job in itertools.islice(queued, ahead))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        while pending:
            result = pending.popleft().result()
            job = next(queued, None)
            if job is not None:
                pending.append(pool.submit(_encode_job, job))
            yield result
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


class _ShardWriter:
    """Appends files' classes to `shard-NNNNN.bin` files of at most `SHARD_BYTES` (or one file, if longer)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.sizes: list[int] = []
        self._file: BinaryIO | None = None

    def write(self, samples: np.ndarray) -> tuple[int, int]:
        """Appends `samples` and returns (shard index, offset in the shard)."""
        if self._file is None or (self.sizes[-1] and self.sizes[-1] + len(samples) > SHARD_BYTES):
            self._next_shard()
        assert self._file is not None
        offset = self.sizes[-1]
        self._file.write(samples.tobytes())
        self.sizes[-1] += len(samples)
        return len(self.sizes) - 1, offset

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            _sync_close(self._file)
            self._file = None

    @staticmethod
    def name(index: int) -> str:
        return f"shard-{index:05d}.bin"

    def _next_shard(self) -> None:
        self.close()
        self._file = (self.directory / self.name(len(self.sizes))).open("wb")
        self.sizes.append(0)


def _sync_close(file: BinaryIO) -> None:
    """Flushes to disk before closing: the rename that publishes the cache must not outrun its contents."""
    file.flush()
    os.fsync(file.fileno())
    file.close()


def _prepare_into(
    partial: Path,
    root: Path,
    layout: str,
    sources: list[Source],
    stats: list[os.stat_result | None],
    settings: PrepareSettings,
    workers: int | None,
) -> None:
    """Writes the shards and manifest of the corpus into the folder `partial`, in `workers` processes (None: one
    per CPU, or one for a small corpus)."""
    started = time.perf_counter()
    present = [(source, stat) for source, stat in zip(sources, stats) if stat is not None]
    if workers is None:
        work = sum(stat.st_size * _DECODING_COST.get(Path(source.relative).suffix.lower(), 1) for source, stat in present)
        workers = 1 if work < POOL_MIN_BYTES else available_cpus()
    processes = min(workers, max(len(present), 1))
    log.info(
        "Preparing %d file%s of %s (%s layout) at %d Hz in %s",
        len(present), "s" * (len(present) != 1), root, layout, settings.sample_rate,
        "1 process" if processes == 1 else f"{processes} processes",
    )  # fmt: skip
    skipped = [{"path": source.relative, "reason": source.problem} for source in sources if source.problem]
    files: list[dict[str, Any]] = []
    writer = _ShardWriter(partial)
    total = 0
    progress = file_progress(len(present), "Preparing")
    # `closing`: an error here stops the worker pool now, not whenever the generator is collected.
    results = contextlib.closing(
        _encode_all([root / source.relative for source, _ in present], settings, workers)
    )
    with progress, writer, results as encoded_files:
        for (source, stat), encoded in zip(present, encoded_files):
            progress.update()
            if encoded.samples is None:
                skipped.append({"path": source.relative, "reason": encoded.problem})
                continue
            shard, offset = writer.write(encoded.samples)
            files.append(
                {
                    "path": source.relative,
                    "speaker": source.speaker,
                    "shard": shard,
                    "offset": offset,
                    "samples": len(encoded.samples),
                    "seconds": len(encoded.samples) / settings.sample_rate,
                    "source": {
                        "size": stat.st_size,
                        "mtime_ns": stat.st_mtime_ns,
                        "sample_rate": encoded.source_rate,
                    },
                    "trimmed": list(encoded.trimmed),
                }
            )
            total += len(encoded.samples)
            progress.set_postfix_str(f"{total / settings.sample_rate / 3600:.2f} h", refresh=False)
    skipped.sort(key=lambda entry: entry["path"])
    if not files:
        listed = [f"{entry['path']}: {entry['reason']}" for entry in skipped[:_LISTED_IN_ERROR]]
        more = f"; and {len(skipped) - _LISTED_IN_ERROR} more" if len(skipped) > _LISTED_IN_ERROR else ""
        every_file = "its one file was" if len(skipped) == 1 else f"all {len(skipped)} files were"
        raise UserError(f"no usable audio under data root {root}: {every_file} left out: {'; '.join(listed)}{more}")
    seconds = total / settings.sample_rate
    manifest = {
        "format": PREPARE_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "root": str(root.resolve()),
        "layout": layout,
        "sample_rate": settings.sample_rate,
        "quantization_channels": settings.quantization_channels,
        "encoding": "mu-law, one uint8 class per sample",
        "trim_db": settings.trim_db,
        "samples": total,
        "hours": seconds / 3600,
        "speakers": sorted({f["speaker"] for f in files if f["speaker"] is not None}),
        "shards": [{"name": _ShardWriter.name(i), "samples": size} for i, size in enumerate(writer.sizes)],
        "files": files,
        "skipped": skipped,
    }
    with (partial / MANIFEST).open("wb") as file:
        file.write(_manifest_json(manifest).encode("utf-8"))
        _sync_close(file)
    elapsed = time.perf_counter() - started
    log.info(
        "Prepared %.2f h of audio from %d of %d files in %.1f s: %.1f h of audio per minute",
        seconds / 3600, len(files), len(present), elapsed, seconds / 3600 / (elapsed / 60),
    )  # fmt: skip


def _manifest_json(manifest: dict[str, Any]) -> str:
    """The manifest as JSON with one line per shard, file and left-out file: readable, and compact for a
    corpus of tens of thousands of files."""
    lists = ("shards", "files", "skipped")
    head = json.dumps({key: value for key, value in manifest.items() if key not in lists}, indent=1)
    parts = [head.removesuffix("\n}")]
    for key in lists:
        entries = ",\n".join(f"  {json.dumps(entry)}" for entry in manifest[key])
        parts.append(f' "{key}": [\n{entries}\n ]' if entries else f' "{key}": []')
    return ",\n".join(parts) + "\n}\n"


def _remove_abandoned(cache_dir: Path) -> None:
    """Deletes temporary folders that preparations on this machine left when they were killed.

    A temporary folder is named after the host and process that writes it; one whose process is gone
    can never be finished. Folders of other hosts (a shared cache) are left to their own host.
    """
    host = socket.gethostname()
    for path in cache_dir.glob(f"*{_PARTIAL}*"):
        owner = path.name.rsplit(_PARTIAL, 1)[1].rsplit("-", 2)  # host (may hold dashes), pid, random token
        if len(owner) == 3 and owner[0] == host and owner[1].isdigit() and not _alive(int(owner[1])):
            log.info("Removing %s, left by a preparation that was stopped", path)
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _damaged(directory: Path, what: str) -> UserError:
    return UserError(f"the prepared folder {directory} is damaged ({what}): delete it, and it is prepared again")


def _cache_error(cache_dir: Path, error: OSError) -> UserError:
    fix = "free some space, or set" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "set"
    return UserError(
        f"cannot write prepared data under {cache_dir}: {error.strerror or error}; {fix} paths.data_dir "
        "(or $WAVENET_DATA_DIR, or data.cache_dir) to a writable folder"
    )
