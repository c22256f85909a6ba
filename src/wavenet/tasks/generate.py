"""`generate.py`'s task: load a checkpoint, sample audio with incremental generation, write WAV files."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig
from rich import get_console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

from wavenet.checkpoint import load_wavenet
from wavenet.data.audio import (
    UnreadableAudioError,
    audio_header,
    audio_info,
    peak_problem,
    read_audio,
    resampled_length,
    write_wav,
)
from wavenet.data.mulaw import mu_law_decode, mu_law_encode
from wavenet.errors import Terminated, UserError, check_can_write_in, counted
from wavenet.generation import generate, resolve_method
from wavenet.models.wavenet import WaveNet
from wavenet.process import stop_signal
from wavenet.signals import Handling
from wavenet.tasks.generate_settings import PRECISION_DTYPES, check_settings

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> list[Path]:
    """Writes `cfg.batch_size` files `sample_000.wav`, ... of `cfg.num_samples` samples to the run folder.

    Every setting and the prime file are checked before the checkpoint is read, so that a mistake costs no
    loading. Interrupted (Ctrl-C, or a SIGTERM or SIGHUP: `Terminated`), it writes the samples made so far, as
    shorter files, and re-raises; a Ctrl-C or a SIGTERM while files are written stops the run once they are.

    Returns:
        The paths of the files written.

    Raises:
        UserError: For a missing or unreadable checkpoint or prime file, or a setting out of range.
    """
    ckpt_path, prime_path = check_settings(cfg)
    device = _device(cfg.device)
    num_samples, batch_size = cfg.num_samples, cfg.batch_size
    _check_memory(num_samples, batch_size, device)
    output_dir = Path(cfg.paths.output_dir)
    _check_output_dir(output_dir, _WAV_HEADER_BYTES + 2 * num_samples, batch_size)
    dtype = PRECISIONS[str(cfg.precision)]
    try:  # before the checkpoint is read, so that a method that cannot run here costs no loading
        resolve_method(str(cfg.method), device, dtype, batch_size)
    except ValueError as error:
        raise UserError(f"method={cfg.method}: {error}") from error
    if prime_path is not None:
        _check_prime_header(prime_path)
    model, hparams = load_wavenet(ckpt_path, use_ema=cfg.use_ema, device=device)
    model = model.to(dtype)
    # Again with each stream's state, which only the network gives: `small`'s is 0.5 MB a stream, 65,000 samples.
    _check_memory(num_samples, batch_size, device, _state_bytes(model))
    parameters = sum(parameter.numel() for parameter in model.parameters())
    method = resolve_method(str(cfg.method), device, dtype, batch_size, parameters)
    sample_rate = hparams["sample_rate"]
    levels = model.quantization_channels
    prime = None
    if prime_path is not None:
        prime = mu_law_encode(_read_prime(prime_path, sample_rate, model.receptive_field), levels)
        if len(prime) < model.receptive_field:
            log.info(
                "The prime's %d samples are fewer than the receptive field's %d: silence comes before them",
                len(prime), model.receptive_field,
            )  # fmt: skip
    generator = None if cfg.seed is None else torch.Generator(device).manual_seed(cfg.seed)
    log.info(
        "Generating %d x %d samples (%.2f s at %d Hz) on %s (%s, %s), temperature %g%s; receptive field %d samples",
        batch_size,
        num_samples,
        num_samples / sample_rate,
        sample_rate,
        device,
        method,
        cfg.precision,
        cfg.temperature,
        "" if prime is None else f", continuing {prime_path}",
        model.receptive_field,
    )

    # Filled as generation goes, so that an interrupted run can still write the first `made` samples of each file.
    classes = torch.empty(batch_size, num_samples, dtype=torch.long, device=device)
    made = 0
    started = time.perf_counter()
    try:
        with _SigtermStops(), _progress_bar(num_samples, batch_size, sample_rate, float(cfg.log_every_seconds)) as show:

            def advance(steps: int) -> None:
                nonlocal made
                made += steps
                show(steps)

            generate(
                model,
                num_samples,
                batch_size=batch_size,
                temperature=cfg.temperature,
                prime=prime,
                generator=generator,
                progress=advance,
                method=method,
                out=classes,
            )
    except (KeyboardInterrupt, Terminated) as stop:
        if made:
            # A Ctrl-C stopped generating: the next one stops the writing too, at once.
            with _StopsAfterWriting(batch_size, stopping=isinstance(stop, KeyboardInterrupt)):
                paths = _write_wavs(output_dir, classes[:, :made], levels, sample_rate)
                how = "Interrupted" if isinstance(stop, KeyboardInterrupt) else f"Stopped by {stop_signal().name}"
                log.warning("%s: wrote %d file(s) cut short, %s of %s samples, to %s",
                            how, len(paths), f"{made:,}", f"{num_samples:,}", output_dir)  # fmt: skip
        raise
    with _StopsAfterWriting(batch_size):
        seconds = time.perf_counter() - started
        log.info("Generated in %.1f s: %s", seconds, _speed(num_samples, seconds, batch_size, sample_rate, total=True))
        started = time.perf_counter()
        paths = _write_wavs(output_dir, classes, levels, sample_rate)
        log.info("Wrote %d file(s) to %s in %.1f s", len(paths), output_dir, time.perf_counter() - started)
    return paths


class _SigtermStops(Handling):
    """Within it, a SIGTERM raises `Terminated` (and so does a SIGHUP, see `wavenet.process.stop_on_hangup`).

    A preempted batch job is sent SIGTERM, whose default ended generation at once: no file of hours of sampling.
    """

    def __init__(self) -> None:
        super().__init__(self._stop, signal.SIGTERM)

    def _stop(self, signum: int, frame: object) -> None:
        raise Terminated


class _StopsAfterWriting(Handling):
    """Within it, a Ctrl-C or a SIGTERM is held until the block has ended, then raised (`KeyboardInterrupt`,
    `Terminated`), so that samples already made are all written; a second Ctrl-C raises at once.

    Writing many files, or long ones, takes seconds to minutes; a Ctrl-C then used to lose every file not yet
    written, without a word.
    """

    def __init__(self, files: int, stopping: bool = False) -> None:
        """`stopping`: a Ctrl-C has come already, so that the next one raises at once."""
        super().__init__(self._stop, signal.SIGINT, signal.SIGTERM)
        self.files = files
        self.ctrl_c = stopping
        self.received: BaseException | None = None

    def _stop(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT:
            if self.ctrl_c:
                raise KeyboardInterrupt
            self.ctrl_c = True
            self.received = KeyboardInterrupt()  # also after a SIGTERM: the run stops as the user asked
            log.warning("Ctrl-C: writing the %d file(s) first (Ctrl-C again stops now, without the rest)", self.files)
        elif self.received is None:
            self.received = Terminated()
            log.warning("%s: writing the %d file(s) first", stop_signal().name, self.files)

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        super().__exit__(kind, error, traceback)
        if self.received is not None and kind is None:
            raise self.received


def _write_wavs(output_dir: Path, classes: torch.Tensor, levels: int, sample_rate: int) -> list[Path]:
    """Writes each stream of (B, T) classes as `sample_<index>.wav`; returns their paths. Stopped by a Ctrl-C
    (the second, within `_StopsAfterWriting`), it leaves no file cut off in the middle."""
    paths: list[Path] = []
    digits = max(3, len(str(len(classes) - 1)))  # sample_0999.wav sorts before sample_1000.wav
    writing: Path | None = None
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        for index, stream in enumerate(classes.cpu()):  # decoded one at a time: one stream's audio in memory
            path = writing = output_dir / f"sample_{index:0{digits}d}.wav"
            write_wav(path, mu_law_decode(stream, levels), sample_rate)
            writing = None
            paths.append(path)
    except (OSError, RuntimeError) as error:  # soundfile reports a failed write (a full disk) as RuntimeError
        if writing is None:
            raise UserError(f"cannot write {output_dir}: {error}") from None
        with contextlib.suppress(OSError):
            writing.unlink(missing_ok=True)  # cut off in the middle: a player would take it for a whole, short file
        # libsndfile says only "System error." for a full disk.
        full = shutil.disk_usage(output_dir).free < _WAV_HEADER_BYTES + 2 * classes.shape[1]
        raise UserError(
            f"cannot write {writing}: {'no space left on the device' if full else error}; wrote "
            f"{len(paths)} of {len(classes)} file(s)"
        ) from None
    except KeyboardInterrupt:
        if writing is not None:
            writing.unlink(missing_ok=True)  # cut off in the middle
        log.warning("Ctrl-C again: wrote %d of %d file(s), to %s", len(paths), len(classes), output_dir)
        raise
    return paths


PRECISIONS = {name: getattr(torch, dtype) for name, dtype in PRECISION_DTYPES.items()}
# What soundfile writes before a 16-bit PCM WAV file's samples (RIFF, fmt and data headers).
_WAV_HEADER_BYTES = 44


def _check_output_dir(output_dir: Path, file_bytes: int, files: int) -> None:
    """Refuses a folder that cannot take the files (not writable, under a file, not enough free space) or
    holds samples of an earlier run (writing over some of them would mix two runs): found after generating,
    either would lose the samples. Makes nothing: a run refused later leaves no folder behind."""
    free = shutil.disk_usage(check_can_write_in("paths.output_dir", output_dir)).free
    earlier = sorted(output_dir.glob("sample_*.wav"))
    if earlier:
        raise UserError(
            f"{output_dir} already holds {len(earlier)} sample_*.wav of an earlier run; "
            "choose another hydra.run.dir or remove them"
        )
    if file_bytes * files > free:
        raise UserError(
            f"{counted(files, 'file')} of {file_bytes / 2**20:,.1f} MiB {'does' if files == 1 else 'do'} not fit the "
            f"{free / 2**20:,.1f} MiB free in "
            f"{output_dir}; lower num_samples or batch_size, or set paths.output_dir elsewhere"
        )


def _device(name: object) -> torch.device:
    """`auto` is CUDA when there is a GPU, else the CPU; other names are torch's (`cpu`, `cuda`, `cuda:1`)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    wrong = UserError(f"device must be auto, cpu, cuda or cuda:<index>, got {name!r}")
    if not isinstance(name, str):
        raise wrong
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise wrong from error
    if device.type not in ("cpu", "cuda"):  # torch names more (mps, xpu, meta); generation runs on these two
        raise wrong
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device={name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "cpu":  # `cpu:0` is the CPU too, but torch.load cannot map a checkpoint to it
        return torch.device("cpu")
    return device


def _check_memory(num_samples: int, batch_size: int, device: torch.device, state_bytes: int = 0) -> None:
    """Refuses samples that cannot fit in memory, which would fail only once the checkpoint is loaded (or, past
    a container's or a job's limit, be killed partway, the samples lost); with `state_bytes`, each stream's state
    (`_state_bytes`) on the device too, which the checkpoint's network sets.

    The bound is the memory there is, not what is free: a run it lets through may still not fit beside
    other processes, but none it refuses could run.
    """
    classes = 8 * batch_size * num_samples  # (B, N) int64 classes: on the device, and copied to the host to write
    state = state_bytes * batch_size
    host = classes + 8 * num_samples  # and one stream's float32 audio at a time, decoded then clipped to write
    sizes = [(host + state * (device.type == "cpu"), *_host_memory())]
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
        sizes.append((classes + state, memory, f"the memory of {device}"))
    per_stream = f", and {state_bytes:,} bytes of state a file" if state_bytes else ""
    for needed, memory, where in sizes:
        if memory is not None and needed > memory:
            raise UserError(
                f"num_samples={num_samples:,} x batch_size={batch_size:,} takes {needed / 1e9:,.1f} GB (8 bytes a "
                f"sample{per_stream}), more than {where} ({memory / 1e9:,.1f} GB): generate fewer or shorter files"
            )


def _state_bytes(model: WaveNet) -> int:
    """Bytes of one stream's state as it generates: every layer's ring buffer of past inputs, a receptive field of
    residual channels in all, which dwarfs the rest (`wavenet.generation.IncrementalWaveNet`)."""
    weight = model.embedding.weight
    return (model.receptive_field - 1) * weight.shape[1] * weight.element_size()


def _host_memory() -> tuple[int | None, str]:
    """What this process may use of the host's memory, in bytes (None where unknown), and what bounds it: the
    machine's memory, or its cgroup's limit where that is lower."""
    memory, limit = _physical_memory(), cgroup_memory_limit()
    if limit is not None and (memory is None or limit < memory):
        return limit, "the cgroup memory limit of this job or container"
    return memory, "this machine's memory"


def cgroup_memory_limit(
    root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")
) -> int | None:
    """The lowest memory limit of this process's cgroup and those above it (cgroup v2's memory.max, v1's
    memory.limit_in_bytes), in bytes; None where none is set or the OS has no cgroups. Docker, Kubernetes and
    SLURM set one, and the machine's memory (sysconf) does not show it.

    Args:
        root: Where the cgroup file systems are mounted.
        membership: The process's cgroups, one `hierarchy:controllers:path` line each.
    """
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:
            mount, name = root, "memory.max"
        elif "memory" in controllers.split(","):
            mount, name = root / "memory", "memory.limit_in_bytes"
        else:
            continue
        # The process's own cgroup and every one above it; in a container the path may be the host's, which
        # its mount does not have: then its root's limit alone.
        folder = mount / path.strip("/")
        for parent in (folder, *folder.parents):
            try:
                value = (parent / name).read_text().strip()
            except OSError:
                value = ""
            if value.isdigit():
                limits.append(int(value))
            if parent == mount:
                break
    return min(limits, default=None)


def _physical_memory() -> int | None:
    """Bytes of RAM, or None where the OS does not say (sysconf is POSIX)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _check_prime_header(path: Path) -> None:
    """Raises `UserError` unless the prime file (`check_settings` found it) is readable audio with samples."""
    try:
        frames, _ = audio_info(path)
    except UnreadableAudioError as error:
        raise UserError(f"cannot read prime {path}: {error.reason}") from error
    if frames == 0:
        raise UserError(f"prime file {path} has no samples")


# Containers that libsndfile cannot seek in to the sample: in Ogg a seek into the last page lands late (seconds late at
# low bitrates), and the MP3 frame decoded first after a seek differs from the same frame decoded in sequence.
_INEXACT_SEEKS = ("OGG", "MP3")


def _read_prime(path: Path, sample_rate: int, samples: int) -> torch.Tensor:
    """The last `samples` (older ones cannot matter) of the prime file, checked by `_check_prime_header`, as float
    audio at the model's rate. Only they are decoded, but from Ogg and MP3 files, which are read whole: the whole
    file took 4 GB of memory and 10 s for a WAV prime of 40 minutes at 48 kHz in stereo, and one of hours did not
    fit."""
    try:
        header = audio_header(path)
    except UnreadableAudioError as error:
        raise UserError(f"cannot read prime {path}: {error.reason}") from error
    total = resampled_length(header.frames, header.samplerate, sample_rate)
    start = max(total - samples, 0) if header.format not in _INEXACT_SEEKS else 0
    audio = read_audio(path, sample_rate, start, total - start)[-samples:]
    if not torch.isfinite(audio).all():
        raise UserError(f"prime file {path} holds NaN or infinite samples")
    problem = peak_problem(float(audio.abs().max()) if audio.numel() else 0.0)  # as preparation refuses a file
    if problem is not None:
        raise UserError(f"prime file {path}: {problem}")
    return audio


def _speed(steps: float, seconds: float, batch_size: int, sample_rate: int, total: bool = False) -> str:
    """`4 x 31,000 samples/s, 1.94x real time each` for 4 files, as their count shows; or with `total`,
    `124,000 samples/s in all, 1.94x real time each`."""
    rate = steps / seconds  # per file
    if batch_size == 1:
        return f"{rate:,.0f} samples/s, {rate / sample_rate:.2f}x real time"
    speed = f"{rate * batch_size:,.0f} samples/s in all" if total else f"{batch_size:,} x {rate:,.0f} samples/s"
    return f"{speed}, {rate / sample_rate:.2f}x real time each"


class _SpeedColumn(ProgressColumn):
    """`_speed` since the start: the mean, steady enough."""

    def __init__(self, batch_size: int, sample_rate: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.sample_rate = sample_rate

    def render(self, task: Task) -> Text:
        if not task.elapsed or not task.completed:
            return Text("? samples/s", style="progress.data.speed")
        speed = _speed(task.completed, task.elapsed, self.batch_size, self.sample_rate)
        return Text(speed, style="progress.data.speed")


@contextmanager
def _progress_bar(
    num_samples: int, batch_size: int, sample_rate: int, log_every_seconds: float
) -> Iterator[Callable[[int], None]]:
    """A progress bar over the steps of generation, `4 x 4,864/16,000` for 4 files; yields what advances it.

    Where the output is no terminal (a batch job's log), a bar would show only once full, squeezed to 80
    columns: there a progress line is logged every `log_every_seconds` instead, as in training.
    """
    files = f"{batch_size:,} x " if batch_size > 1 else ""
    logs_lines = not get_console().is_terminal
    with Progress(
        BarColumn(bar_width=20),
        TextColumn(files + "{task.completed:,.0f}/{task.total:,.0f}", style="progress.download"),
        _SpeedColumn(batch_size, sample_rate),
        TimeRemainingColumn(),
        disable=logs_lines,
    ) as progress:
        task = progress.add_task("generate", total=num_samples)
        logged_at = time.monotonic()

        def advance(steps: int) -> None:
            nonlocal logged_at
            progress.advance(task, steps)
            if logs_lines and time.monotonic() - logged_at >= log_every_seconds:
                done, seconds = progress.tasks[0].completed, progress.tasks[0].elapsed
                left = datetime.timedelta(seconds=round((num_samples - done) * seconds / done))
                log.info("Sample %s%s/%s: %s, %s left", files, f"{done:,.0f}", f"{num_samples:,}",
                         _speed(done, seconds, batch_size, sample_rate), left)  # fmt: skip
                logged_at = time.monotonic()

        yield advance
