"""generate.py's answers to bad input (one line naming the key or file, before the checkpoint is read), its
progress lines, its files when interrupted, and the compiler it is told to use."""

from __future__ import annotations

import io
import logging
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
from rich.console import Console

from tests.conftest import compose_config, run_script, save_checkpoint
from wavenet.errors import Terminated, UserError
from wavenet.module import WaveNetModule
from wavenet.data.audio import read_audio
from wavenet.tasks.generate import _read_prime, run

SAMPLE_RATE = 8000


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained model without EMA weights, saved with what generate.py reads."""
    module = WaveNetModule(
        layers=4, stacks=2, residual_channels=8, dilation_channels=8, skip_channels=8, sample_rate=SAMPLE_RATE
    )
    return save_checkpoint(module, tmp_path_factory.mktemp("checkpoint") / "tiny.ckpt")


def refused_before_loading(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Overrides found in an audit, each with the start of the one error it must give."""
    text = tmp_path / "notes.wav"
    text.write_text("not audio")
    return {
        "null checkpoint": (["ckpt_path=null"], "ckpt_path must be the path of a checkpoint, got null"),
        "numeric checkpoint": (["ckpt_path=123"], "ckpt_path must be the path of a checkpoint, got 123"),
        "empty checkpoint": (["ckpt_path="], "ckpt_path is empty"),
        "numeric prime": (["prime=123"], "prime must be the path of an audio file, or null, got 123"),
        "list prime": (["prime=[1,2]"], "prime must be the path of an audio file, or null, got [1, 2]"),
        "empty prime": (["prime="], "prime is empty"),
        "missing prime": ([f"prime={tmp_path / 'missing.wav'}"], "prime file not found"),
        "unreadable prime": ([f"prime={text}"], f"cannot read prime {text}: "),
        "huge seed": (["seed=99999999999999999999"], "seed must be an integer or null, from -2**63 to 2**64 - 1"),
        "past a WAV file": (["num_samples=1000000000000"], "num_samples must be at most 2,147,483,136"),
        "past memory": (
            ["num_samples=2000000000", "batch_size=10000000"],
            "num_samples=2,000,000,000 x batch_size=10,000,000 takes 160,000,0",  # GB, more than any RAM
        ),
        "past float32 temperature": (["temperature=1e308"], "temperature must be a number from 0 (greedy) to 2e+37"),
        "mps device": (["device=mps"], "device must be auto, cpu, cuda or cuda:<index>, got 'mps'"),
        "misspelt added key": (
            ["+temprature=0"],
            "temprature is not a setting of generate.py (added with +temprature); did you mean temperature?",
        ),
    }


@pytest.mark.parametrize(
    "case",
    ["null checkpoint", "numeric checkpoint", "empty checkpoint", "numeric prime", "list prime", "empty prime",
     "missing prime", "unreadable prime", "huge seed", "past a WAV file", "past memory", "past float32 temperature",
     "mps device", "misspelt added key"],
)  # fmt: skip
def test_bad_input_is_one_line_naming_it_before_the_checkpoint_is_read(tmp_path, checkpoint, monkeypatch, case):
    def read_checkpoint(*args: object, **kwargs: object) -> None:
        raise AssertionError("the checkpoint was read before the input was checked")

    monkeypatch.setattr("wavenet.checkpoint.read_checkpoint", read_checkpoint)
    overrides, message = refused_before_loading(tmp_path)[case]
    cfg = compose_config("generate", [f"ckpt_path={checkpoint}", "device=cpu", *overrides], tmp_path / "run")
    with pytest.raises(UserError) as error:
        run(cfg)
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)


def test_a_missing_checkpoint_setting_is_named_as_missing(tmp_path):
    with pytest.raises(UserError, match=r"^missing required value\(s\): ckpt_path \(set them on the command line"):
        run(compose_config("generate", ["device=cpu"], tmp_path / "run"))


def test_an_output_folder_that_cannot_take_the_files_is_refused_before_the_checkpoint_is_read(
    tmp_path, checkpoint, monkeypatch
):
    def read_checkpoint(*args: object, **kwargs: object) -> None:
        raise AssertionError("the checkpoint was read before the output folder was checked")

    monkeypatch.setattr("wavenet.checkpoint.read_checkpoint", read_checkpoint)
    overrides = [f"ckpt_path={checkpoint}", "device=cpu", "num_samples=300000", "batch_size=2"]
    cfg = compose_config("generate", overrides, tmp_path / "run")
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    cfg.paths.output_dir = str(tmp_path / "notes.txt" / "out")
    with pytest.raises(UserError, match=r"^cannot write to paths.output_dir=.*notes.txt/out: .*notes.txt is a file, not a folder$"):
        run(cfg)
    cfg.paths.output_dir = str(tmp_path / "run")
    monkeypatch.setattr("shutil.disk_usage", lambda path: SimpleNamespace(total=2**30, used=2**30, free=2**20))
    with pytest.raises(UserError, match=r"^2 files of 0.6 MiB do not fit the 1.0 MiB free in "):
        run(cfg)


def cgroup_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    ("membership", "files", "limit"),
    [
        # cgroup v2 (Docker, Kubernetes, systemd): the lowest memory.max of the job's cgroup and those above it.
        ("0::/job/step\n", {"memory.max": "max\n", "job/memory.max": "4096\n", "job/step/memory.max": "max\n"}, 4096),
        # v1, as on older SLURM nodes; 2**63 rounded down to pages means no limit, the machine's memory then.
        ("4:memory:/slurm/uid_0/job_7\n0::/\n", {"memory/slurm/uid_0/job_7/memory.limit_in_bytes": "8192\n"}, 8192),
        ("4:memory:/\n", {"memory/memory.limit_in_bytes": "9223372036854771712\n"}, 9223372036854771712),
        # In a container the path is the host's, which its own mount does not have: the mount's root then.
        ("0::/docker/0123abcd\n", {"memory.max": "2048\n"}, 2048),
        # Hybrid: v2 mounted without the memory controller, no v1 memory hierarchy.
        ("1:cpu:/\n0::/\n", {"cgroup.controllers": "cpu\n"}, None),
    ],
    ids=["v2-nested", "v1-slurm", "v1-unlimited", "container", "none"],
)
def test_the_memory_limit_of_a_container_or_a_job_is_read_from_its_cgroups(tmp_path, membership, files, limit):
    from wavenet.tasks.generate import cgroup_memory_limit

    root = cgroup_tree(tmp_path / "cgroup", files)
    (tmp_path / "self").write_text(membership)
    assert cgroup_memory_limit(root, tmp_path / "self") == limit
    assert cgroup_memory_limit(root, tmp_path / "missing") is None


def test_samples_past_a_cgroup_memory_limit_are_refused_before_the_checkpoint_is_read(
    tmp_path, checkpoint, monkeypatch
):
    # A SLURM job of 1 GB on a machine of hundreds: generating would be killed partway, the samples lost.
    monkeypatch.setattr("wavenet.tasks.generate.cgroup_memory_limit", lambda: 2**30)
    overrides = [f"ckpt_path={checkpoint}", "device=cpu", "num_samples=16000000", "batch_size=16"]
    limit = r"takes 2.2 GB \(8 bytes a sample\), more than the cgroup memory limit of this job or container \(1.1 GB\)"
    with pytest.raises(UserError, match=limit):
        run(compose_config("generate", overrides, tmp_path / "run"))


def test_streams_whose_state_does_not_fit_in_memory_are_refused_before_generating(tmp_path, monkeypatch):
    # Each stream keeps a receptive field of residual channels (0.5 MB for `small`): 60,000 streams of `small`, 5 MB
    # of samples, passed the check, then failed to allocate 31 GB with a traceback (or were killed by the OOM killer).
    def generate(*args: object, **kwargs: object) -> None:
        raise AssertionError("generation started with more state than memory")

    module = WaveNetModule(
        layers=20, stacks=2, residual_channels=8, dilation_channels=8, skip_channels=8, sample_rate=SAMPLE_RATE
    )  # a receptive field of 2,047 samples: 65,472 bytes of state a stream
    checkpoint = save_checkpoint(module, tmp_path / "deep.ckpt")
    monkeypatch.setattr("wavenet.tasks.generate.generate", generate)
    monkeypatch.setattr("wavenet.tasks.generate.cgroup_memory_limit", lambda: 10**9)
    overrides = [f"ckpt_path={checkpoint}", "device=cpu", "num_samples=10", "batch_size=20000"]  # 1.6 MB of samples
    state = r"takes 1.3 GB \(8 bytes a sample, and 65,472 bytes of state a file\), more than the cgroup memory limit"
    with pytest.raises(UserError, match=state):
        run(compose_config("generate", overrides, tmp_path / "run"))


@pytest.mark.slow
@pytest.mark.parametrize("override", ["ckpt_path=null", "prime=[1,2]"])
def test_generate_script_answers_a_wrong_type_in_one_line(tmp_path, checkpoint, override):
    result = run_script("generate.py", f"ckpt_path={checkpoint}", override, f"hydra.run.dir={tmp_path / 'run'}")
    key = override.split("=")[0]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and f"error: {key} must be" in result.stderr


def test_only_the_last_receptive_field_of_a_prime_is_read(tmp_path, checkpoint):
    # A prime of hours was decoded whole (4 GB of memory for 40 minutes of 48 kHz stereo), though only its last
    # receptive field is used: what comes before it is not read, not even integer values saved as float.
    rate = 11025
    wave = 0.5 * np.sin(2 * np.pi * 220 * np.arange(5 * rate) / rate)
    audio = np.stack([wave, 0.25 * wave], axis=1)
    audio[:rate] = 1000.0
    path = tmp_path / "long.wav"
    sf.write(path, audio, rate, subtype="FLOAT")
    tail = _read_prime(path, SAMPLE_RATE, 100)
    np.testing.assert_allclose(tail, read_audio(path, SAMPLE_RATE)[-100:], atol=1e-5)
    # Seeking in Ogg lands late in the last page (here by 2,000 of these 2,047 samples): it is read whole.
    noise = np.cumsum(np.random.default_rng(0).normal(size=20 * 16000))
    ogg = tmp_path / "long.ogg"
    sf.write(ogg, 0.3 * noise / np.abs(noise).max(), 16000, format="OGG", subtype="VORBIS", compression_level=0.9)
    np.testing.assert_allclose(_read_prime(ogg, 16000, 2047), read_audio(ogg, 16000)[-2047:], atol=1e-5)
    overrides = [f"ckpt_path={checkpoint}", "device=cpu", "num_samples=50", f"prime={path}"]
    (wav,) = run(compose_config("generate", overrides, tmp_path / "run"))
    assert sf.info(wav).frames == 50


def test_use_ema_true_insists_on_ema_weights_and_auto_takes_the_training_ones(tmp_path, checkpoint):
    overrides = [f"ckpt_path={checkpoint}", "device=cpu", "num_samples=50"]
    with pytest.raises(UserError, match=f"use_ema=true but checkpoint {checkpoint} has no EMA weights"):
        run(compose_config("generate", [*overrides, "use_ema=true"], tmp_path / "true"))
    assert not (tmp_path / "true").exists()
    (wav,) = run(compose_config("generate", overrides, tmp_path / "auto"))  # the default
    assert sf.info(wav).frames == 50


def test_progress_is_logged_per_file_and_in_all_where_the_output_is_no_terminal(
    tmp_path, checkpoint, monkeypatch, caplog
):
    monkeypatch.setattr("wavenet.tasks.generate.get_console", lambda: Console(file=io.StringIO()))
    overrides = [f"ckpt_path={checkpoint}", "device=cpu", "num_samples=200", "batch_size=3", "log_every_seconds=0"]
    with caplog.at_level(logging.INFO, logger="wavenet.tasks.generate"):
        run(compose_config("generate", overrides, tmp_path))
    lines = [record.getMessage() for record in caplog.records]
    progress = [line for line in lines if line.startswith("Sample ")]
    # Every chunk of 64 steps, the last one too: the count and the speed are per file, 3 of them.
    assert [line.split(":")[0] for line in progress] == [f"Sample 3 x {n}/200" for n in (64, 128, 192, 200)]
    assert all(" samples/s, " in line and "x real time each, " in line and line.endswith(" left") for line in progress)
    assert all(line.split(": ")[1].startswith("3 x ") for line in progress)
    (generated,) = [line for line in lines if line.startswith("Generated in")]
    assert " samples/s in all, " in generated and generated.endswith("x real time each")
    assert [line for line in lines if line.startswith("Wrote 3 file(s) to ")]


def test_a_disk_that_fills_while_the_files_are_written_leaves_no_file_cut_off(tmp_path, checkpoint, monkeypatch):
    # Another process may fill the disk after the free space was checked. The file being written was left cut off,
    # and the error was libsndfile's "System error.".
    from wavenet.tasks import generate

    original, written = generate.write_wav, []

    def write_wav(path: Path, audio: object, sample_rate: int) -> None:
        if written:
            path.write_bytes(b"RIFF")
            monkeypatch.setattr("shutil.disk_usage", lambda path: SimpleNamespace(total=2**30, used=2**30, free=0))
            raise RuntimeError("Error opening file: System error.")
        original(path, audio, sample_rate)
        written.append(path)

    monkeypatch.setattr(generate, "write_wav", write_wav)
    overrides = [f"ckpt_path={checkpoint}", "device=cpu", "num_samples=100", "batch_size=3"]
    with pytest.raises(UserError, match=r"sample_001.wav: no space left on the device; wrote 1 of 3 file\(s\)$"):
        run(compose_config("generate", overrides, tmp_path / "run"))
    assert sorted(path.name for path in (tmp_path / "run").glob("*.wav")) == ["sample_000.wav"]


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm", "sighup"])
def test_an_interrupted_run_writes_the_samples_made_so_far(tmp_path, checkpoint, monkeypatch, caplog, stop):
    # A SIGTERM is how a scheduler preempts a batch job: by default it ended the run with nothing written. A SIGHUP
    # (the terminal hung up: a dropped ssh session) ended it so too; generate.py has it stop as a SIGTERM does.
    from wavenet import generation, process

    sample_steps, chunks = generation.sample_steps, []

    def interrupted_at_the_third_chunk(*args: object) -> None:
        chunks.append(args)
        if len(chunks) == 3:
            if stop == "ctrl-c":
                raise KeyboardInterrupt
            signal.raise_signal(signal.SIGHUP if stop == "sighup" else signal.SIGTERM)
        sample_steps(*args)

    monkeypatch.setattr(generation, "sample_steps", interrupted_at_the_third_chunk)
    overrides = [f"ckpt_path={checkpoint}", "device=cpu", "num_samples=1000", "batch_size=2", "method=eager"]
    sigterm = signal.getsignal(signal.SIGTERM)
    hangup = signal.signal(signal.SIGHUP, signal.SIG_DFL)  # whatever started pytest (nohup) has left there
    try:
        if stop == "sighup":
            monkeypatch.setattr(process, "_hung_up", False)  # this process's stop, for this test only
            monkeypatch.setattr(process, "_hangups_stop", None)
            process.stop_on_hangup()  # as generate.py does
        with pytest.raises(KeyboardInterrupt if stop == "ctrl-c" else Terminated):
            run(compose_config("generate", [*overrides, "seed=3"], tmp_path / "cut"))
        said = {"ctrl-c": "Interrupted", "sigterm": "Stopped by SIGTERM", "sighup": "Stopped by SIGHUP"}[stop]
        assert process.stop_signal() == (signal.SIGHUP if stop == "sighup" else signal.SIGTERM)  # exits 128 + it
    finally:
        signal.signal(signal.SIGHUP, hangup)
    assert signal.getsignal(signal.SIGTERM) == sigterm  # put back
    cut = sorted((tmp_path / "cut").glob("sample_*.wav"))
    assert [sf.info(path).frames for path in cut] == [128, 128]  # two chunks of 64 steps
    assert f"{said}: wrote 2 file(s) cut short, 128 of 1,000 samples" in caplog.text
    monkeypatch.undo()
    whole = run(compose_config("generate", [*overrides, "seed=3"], tmp_path / "whole"))
    for part, full in zip(cut, whole):
        np.testing.assert_array_equal(sf.read(part)[0], sf.read(full)[0][:128])


ALL_THREE = ["sample_000.wav", "sample_001.wav", "sample_002.wav"]


@pytest.mark.parametrize(
    ("signals", "files"),
    [
        ([signal.SIGTERM], ALL_THREE),
        ([signal.SIGINT], ALL_THREE),
        ([signal.SIGINT, signal.SIGINT], ALL_THREE[:1]),  # a second Ctrl-C stops at once
        ([signal.SIGTERM, signal.SIGINT, signal.SIGINT], ALL_THREE[:2]),  # after a SIGTERM too
    ],
)
def test_a_stop_while_the_files_are_written_waits_until_they_are(tmp_path, checkpoint, monkeypatch, signals, files):
    # Writing many or long files takes seconds: a Ctrl-C then lost every file not yet written, without a word.
    from wavenet.tasks import generate as task

    write_wav, written = task.write_wav, []

    def stopped_while_writing(*args: object) -> None:
        if len(written) < len(signals):
            signal.raise_signal(signals[len(written)])
        write_wav(*args)
        written.append(args[0].name)

    monkeypatch.setattr(task, "write_wav", stopped_while_writing)
    overrides = [f"ckpt_path={checkpoint}", "device=cpu", "num_samples=100", "batch_size=3"]
    with pytest.raises(Terminated if signals == [signal.SIGTERM] else KeyboardInterrupt):
        run(compose_config("generate", overrides, tmp_path))
    # Stopped at once, it leaves no file cut off in the middle.
    assert written == files
    assert sorted(path.name for path in tmp_path.glob("sample_*.wav")) == files
    assert all(sf.info(tmp_path / name).frames == 100 for name in files)


def test_a_second_ctrl_c_stops_the_writing_of_what_the_first_cut_short(tmp_path, checkpoint, monkeypatch):
    from wavenet import generation
    from wavenet.tasks import generate as task

    sample_steps, write_wav, chunks = generation.sample_steps, task.write_wav, []

    def interrupted_at_the_second_chunk(*args: object) -> None:
        chunks.append(args)
        if len(chunks) == 2:
            raise KeyboardInterrupt
        sample_steps(*args)

    def ctrl_c_again(*args: object) -> None:
        signal.raise_signal(signal.SIGINT)
        write_wav(*args)

    monkeypatch.setattr(generation, "sample_steps", interrupted_at_the_second_chunk)
    monkeypatch.setattr(task, "write_wav", ctrl_c_again)
    overrides = [f"ckpt_path={checkpoint}", "device=cpu", "num_samples=1000", "batch_size=2", "method=eager"]
    with pytest.raises(KeyboardInterrupt):
        run(compose_config("generate", overrides, tmp_path))
    assert not list(tmp_path.glob("sample_*.wav"))  # not held, as the first Ctrl-C while writing is


def test_a_cxx_that_names_no_program_is_named_in_a_warning(monkeypatch, caplog):
    from wavenet.kernels import cpu_step

    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with caplog.at_level(logging.WARNING, logger="wavenet.kernels.cpu_step"):
        cpu_step._compiler()
    assert "CXX=/nonexistent/c++: no such program" in caplog.text
