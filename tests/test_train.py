"""`python train.py ...` end to end, as users run it: single runs, resuming, DDP on CPU, multirun, errors."""

import contextlib
import csv
import fcntl
import functools
import json
import logging
import math
import os
import re
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from tests.conftest import (
    BUILTIN_SMALL,
    REPO,
    TINY,
    checkpoint_lookalike,
    compose_config,
    run_script,
    save_checkpoint,
    start_script,
    wait_for_file,
)

pytestmark = pytest.mark.slow


# With the model summary users see (without ours, Lightning prints its own).
TINY_WITH_SUMMARY = [override for override in TINY if override != "callbacks.model_summary=null"]


def train(run_dir: Path | None, data_dir: Path, *overrides: str):
    """Runs train.py in `run_dir` (or where `overrides` say)."""
    run_dir_setting = [] if run_dir is None else [f"hydra.run.dir={run_dir}"]
    result = run_script(
        "train.py", *TINY_WITH_SUMMARY, *BUILTIN_SMALL, f"paths.data_dir={data_dir}", *run_dir_setting, *overrides,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "csv" / "metrics.csv").open() as file:
        return list(csv.DictReader(file))


def test_train_writes_checkpoints_logs_and_config(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    result = train(run_dir, data_dir)
    shown = result.stdout + result.stderr
    assert "Trainable params" in shown and "GPU available" in shown
    assert "litlogger" not in shown and "FLOPs" not in shown  # Lightning's advert, and its count of 0 FLOPs
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in checkpoints and len(checkpoints) == 2, checkpoints  # last + best on val/loss
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert "WaveNetModule" in (run_dir / "config_tree.log").read_text()
    # A batch job's log says where the run is, and which file resumes it.
    log = (run_dir / "train.log").read_text()
    assert f"Run folder: {run_dir}\n" in log
    assert f"Last checkpoint, to resume from: {run_dir / 'checkpoints' / 'last.ckpt'}\n" in log
    # The printed config holds whole paths, also when the output is no terminal (rich's 80 columns cropped them).
    assert f"output_dir: {run_dir}" in result.stdout and len(f"        output_dir: {run_dir}") > 80
    rows = read_metrics(run_dir)
    logged = {key for row in rows for key, value in row.items() if value}
    assert {"train/loss", "val/loss", "val/bits_per_sample", "lr-AdamW/decayed"} <= logged
    # Every 3 steps, the last (step 6) once: Lightning logs a validation after step N at N - 1.
    assert [int(row["step"]) for row in rows if row.get("val/loss")] == [2, 5]
    assert not (Path.cwd() / "outputs" / "train" / "runs" / run_dir.name).exists()  # never chdir, nothing stray


def test_bf16_mixed_training_as_on_a_gpu_runs_on_the_cpu(tmp_path, data_dir):
    # A GPU's default precision, under the CPU's autocast: the loss, EMA, metrics and audio samples all meet
    # bfloat16 activations here before they do on a GPU.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.test_logging import SAMPLES
    from wavenet.ema import EMA_STATE_KEY

    run_dir = tmp_path / "run"
    train(run_dir, data_dir, "trainer.precision=bf16-mixed", "logger=tensorboard", *SAMPLES)
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert config["trainer"]["precision"] == "bf16-mixed"
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    for weights in (checkpoint["state_dict"], checkpoint[EMA_STATE_KEY]):  # float32 masters and average
        assert {tensor.dtype for tensor in weights.values()} == {torch.float32}
    (events_file,) = (run_dir / "tensorboard").rglob("events.out.tfevents.*")
    events = EventAccumulator(str(events_file.parent), size_guidance={"audio": 0, "scalars": 0}).Reload()
    losses = [event.value for event in events.Scalars("train/loss")] + [e.value for e in events.Scalars("val/loss")]
    assert len(losses) > 6 and all(0 < loss < 7 for loss in losses)  # finite, and nats of 256 classes
    assert any(tag.startswith("samples/generated") for tag in events.Tags()["audio"])


def test_resume_from_last_checkpoint_continues_the_step_count(tmp_path, data_dir):
    first, second = tmp_path / "first", tmp_path / "second"
    train(first, data_dir)
    last = first / "checkpoints" / "last.ckpt"
    result = train(second, data_dir, f"ckpt_path={last}", "trainer.max_steps=10")
    assert "not resumable" not in result.stderr  # the epoch goes on where it stopped (test_data has the proof)
    assert "dirpath has changed" not in result.stderr  # Lightning's warning that every resume would print
    # The last step, between two validations, is validated too: else no checkpoint would hold it.
    assert [int(row["step"]) for row in read_metrics(second) if row.get("val/loss")] == [8, 9]
    resumed = torch.load(second / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 10
    steps = [int(row["step"]) for row in read_metrics(second) if row.get("train/loss")]
    assert steps and min(steps) >= 6, steps
    # A finished checkpoint still serves a check that trains nothing; without the EMA, its average is said dropped.
    check = run_script("train.py", *TINY, *BUILTIN_SMALL, f"paths.data_dir={data_dir}",
                       f"hydra.run.dir={tmp_path / 'check'}", f"ckpt_path={last}", "train=false",
                       "callbacks.ema=null")  # fmt: skip
    assert check.returncode == 0, check.stderr[-2000:]
    assert "holds EMA weights, which this run drops: it has no callbacks.ema" in check.stdout + check.stderr

    # Fine-tuned: the checkpoint's EMA weights, with a new optimiser, schedule and step count.
    tuned = tmp_path / "tuned"
    train(tuned, data_dir, f"init_from={last}", "model.lr=0.002", "trainer.max_steps=2")
    assert f"Using the EMA weights of {last}" in (tuned / "train.log").read_text()
    started = torch.load(tuned / "checkpoints" / "last.ckpt", weights_only=False)
    assert started["global_step"] == 2 and started["lr_schedulers"][0]["base_lrs"][0] == 0.002
    # Requeued with its command, ckpt_path added: resumed, init_from left alone.
    again = tmp_path / "tuned_again"
    train(again, data_dir, f"init_from={last}", "model.lr=0.002", "trainer.max_steps=3",
          f"ckpt_path={tuned / 'checkpoints' / 'last.ckpt'}")  # fmt: skip
    assert "init_from is not used: ckpt_path=" in (again / "train.log").read_text()
    assert torch.load(again / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3


def test_a_requeued_job_resumes_from_the_furthest_checkpoint_of_its_folder(tmp_path, data_dir):
    # A scheduler requeues a job with its own command line: ckpt_path names the chain's folder, not a file that a
    # stopped run wrote. Its first job finds no checkpoint there and starts; each later one takes the furthest on.
    chain = tmp_path / "chain"
    job = [f"ckpt_path={chain}", f"hydra.run.dir={chain}/${{now:%H-%M-%S.%f}}"]
    first = train(None, data_dir, *job, "trainer.max_steps=3")
    assert f"ckpt_path={chain} holds no checkpoint yet: this run starts from step 0" in first.stdout + first.stderr
    (chain / "copy_cut_short.ckpt").write_bytes(b"PK\x03\x04")  # passed over, not taken for the furthest on
    for max_steps in (6, 8):
        result = train(None, data_dir, *job, f"trainer.max_steps={max_steps}")
        assert "Passed over 1 checkpoint under" in result.stdout + result.stderr
    runs = sorted(folder for folder in chain.iterdir() if folder.is_dir())
    assert len(runs) == 3
    log = (runs[2] / "train.log").read_text()
    # Beside step 3's checkpoints of the first run, and the best of the second's (step 6 too, written before it).
    assert re.search(f"resuming from {runs[1] / 'checkpoints'}/\\S+ \\(step 6\\)", log), log
    assert torch.load(runs[2] / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 8


def test_a_requeued_job_refused_at_max_steps_leaves_no_folder_in_the_chain(tmp_path, data_dir):
    # The job after the chain's last: refused, it leaves nothing, as a refused run does (a line saying which
    # checkpoint it found, logged before the refusal, kept its folder, with .hydra/ and train.log, in the chain's).
    from wavenet import WaveNetModule

    chain = tmp_path / "chain"
    (chain / "done").mkdir(parents=True)
    module = WaveNetModule(layers=6, stacks=2, residual_channels=8, dilation_channels=8, skip_channels=16)
    save_checkpoint(module, chain / "done" / "last.ckpt", optimizer_states=[{"state": {}}], global_step=2)
    result = run_script("train.py", *TINY, f"paths.data_dir={data_dir}", "trainer.max_steps=2",
                        f"ckpt_path={chain}", f"hydra.run.dir={chain}/next")  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].endswith("is at step 2 and trainer.max_steps=2: nothing left to train; "
                                                   "raise trainer.max_steps"), result.stderr[-2000:]  # fmt: skip
    assert sorted(path.name for path in chain.iterdir()) == ["done"]
    # Nor does one refused once its schedule's change was found (logged then, as resuming had passed its checks).
    result = run_script("train.py", *TINY, f"paths.data_dir={data_dir}", "trainer.max_steps=4",
                        "model.warmup_steps=7", "trainer.devices=abc", f"ckpt_path={chain / 'done' / 'last.ckpt'}",
                        f"hydra.run.dir={chain}/next")  # fmt: skip
    assert result.returncode == 1 and "`devices` selected with" in result.stderr.splitlines()[-1], result.stderr[-2000:]
    assert sorted(path.name for path in chain.iterdir()) == ["done"]


# A stopped run died of a heap corruption that glibc found at its exit ("corrupted size vs. prev_size while
# consolidating", status -6) once, in CI; not in 62 runs since: a crash then prints every thread's Python stack.
STOP_ENV = {**os.environ, "PYTHONFAULTHANDLER": "1"}


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_run_saves_a_checkpoint_to_resume_from(tmp_path, data_dir, stop):
    # Ctrl-C, or a scheduler's SIGTERM (preemption): the steps since the last validation are not lost. Both come
    # to every process of the job, as a terminal and SLURM send them: DataLoader workers (training's and
    # validation's) too, which must leave the stop to the trainer.
    run_dir = tmp_path / "stopped"
    tiny = [setting for setting in TINY if not setting.startswith(("data.num_workers=", "trainer.num_sanity"))]
    process = start_script("train.py", *tiny, *BUILTIN_SMALL, "data.num_workers=2", "trainer.max_steps=100000",
                           "trainer.val_check_interval=10", f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}",
                           env=STOP_ENV)  # fmt: skip
    last = run_dir / "checkpoints" / "last.ckpt"
    wait_for_file(last, process)
    time.sleep(0.5)  # training goes on past step 10's checkpoint
    os.killpg(process.pid, stop)
    stdout, stderr = process.communicate(timeout=120)
    # never 0: a preempted job is not a finished one
    assert process.returncode == 128 + stop, f"{stdout[-2000:]}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr
    interrupted = run_dir / "checkpoints" / "interrupted.ckpt"
    # With the command to type: the run's own settings, which a resumed run takes the defaults of otherwise.
    assert re.search(f"resume with ckpt_path={interrupted}, as in: python \\S*train.py model=tiny ", stdout + stderr)
    assert f" trainer.max_steps=100000 trainer.val_check_interval=10 paths.data_dir={data_dir} " in stdout + stderr
    assert "hydra.run.dir" not in (stdout + stderr).split(", as in: ")[1].splitlines()[0]
    # Said as where it came: in a step, or in a validation (every 10 steps here), which it ends.
    said = ("Ctrl-C: stopping at the end of this step", "Ctrl-C: ending this validation")
    assert any(line in stdout + stderr for line in said) == (stop == signal.SIGINT)
    assert "Received SIGTERM" not in stdout + stderr or stop == signal.SIGTERM
    checkpoint = torch.load(interrupted, weights_only=False)
    stopped_at = checkpoint["global_step"]
    assert stopped_at > 10 and stopped_at >= torch.load(last, weights_only=False)["global_step"]
    # Stopped between steps: every batch handed out was trained on, so a resumed run skips none.
    batches = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    assert batches["ready"] == batches["completed"]
    loader = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader["windows"] == batches["completed"] * 4  # data.batch_size=4 in TINY

    # Validated (and so checkpointed to last.ckpt) after each step.
    resumed = run_script("train.py", *TINY, *BUILTIN_SMALL, f"trainer.max_steps={stopped_at + 2}",
                         "trainer.val_check_interval=1",
                         f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path / 'resumed'}",
                         f"ckpt_path={interrupted}")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len([row for row in read_metrics(tmp_path / "resumed") if row.get("train/loss")]) == 2
    checkpoint = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == stopped_at + 2  # two steps trained after the stop, to max_steps


def test_a_stop_after_the_output_pipe_closed_still_saves_and_ends_with_the_stops_status(tmp_path, data_dir):
    # `python train.py | tee log` stopped by a Ctrl-C, which ends tee too: the progress bar's write to the closed
    # pipe raised SystemExit(1) in its hook, before the stop's checkpoint was saved, and the run exited 1.
    run_dir = tmp_path / "run"
    with_bar = [setting for setting in TINY if setting != "callbacks.progress_bar=null"]
    args = [sys.executable, "train.py", *with_bar, *BUILTIN_SMALL, "trainer.max_steps=100000",
            "trainer.val_check_interval=10", f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}"]  # fmt: skip
    with (tmp_path / "stderr").open("w") as stderr:
        process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, start_new_session=True,
                                   env={**STOP_ENV, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        process.stdout.close()  # the reader, gone
        wait_for_file(run_dir / "checkpoints" / "last.ckpt", process)
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(timeout=120) == 128 + signal.SIGTERM, (tmp_path / "stderr").read_text()[-3000:]
    assert (run_dir / "checkpoints" / "interrupted.ckpt").is_file()
    assert "resume with ckpt_path=" in (run_dir / "train.log").read_text()
    assert "Error" not in (tmp_path / "stderr").read_text()  # logging's "--- Logging error ---" at every line


def _in_a_terminal(
    run_dir: Path, data_dir: Path, *overrides: str, hangups: bool = True
) -> tuple[subprocess.Popen, int]:
    """Starts `python train.py` in a terminal of its own (a pseudo-terminal, its controlling terminal), with the
    progress bar, and reads what it shows until it has validated at step 10; returns it and the terminal's end
    to close. With `hangups` false, it starts with SIGHUP ignored, as `nohup` or `trap '' HUP` start it."""
    with_bar = [setting for setting in TINY if not setting.startswith(("callbacks.progress_bar=", "data.num_workers="))]
    args = [sys.executable, "train.py", *with_bar, *BUILTIN_SMALL, "data.num_workers=1", "trainer.max_steps=100000",
            "trainer.val_check_interval=10", f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}", *overrides]

    def take_the_terminal() -> None:
        # In the child, after setsid (start_new_session) and after the terminal became its stdin: it becomes the
        # session's controlling terminal, as a login shell's is of the commands typed into it.
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        if not hangups:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)

    leader, terminal = os.openpty()
    process = subprocess.Popen(args, cwd=REPO, stdin=terminal, stdout=terminal, stderr=terminal, env=STOP_ENV,
                               start_new_session=True, preexec_fn=take_the_terminal)  # fmt: skip
    os.close(terminal)
    shown = b""
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "last.ckpt").exists():  # read as a terminal does: a full one blocks the run
        if process.poll() is not None or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"status {process.wait()} before step 10: {shown.decode(errors='replace')[-3000:]}")
        if select.select([leader], [], [], 0.1)[0]:
            shown += os.read(leader, 65536)
    time.sleep(0.5)  # training goes on past step 10's checkpoint
    return process, leader


@contextlib.contextmanager
def _killed_at_the_end(process: subprocess.Popen) -> Iterator[None]:
    """Kills what is left of `process`'s group (a rank, a worker) when the block ends, however it ends."""
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def _hang_up(process: subprocess.Popen, leader: int) -> None:
    """Hangs up the terminal, as a dropped ssh session or a closed terminal window does."""
    # The kernel sends SIGHUP to the session's leader as its terminal hangs up, here the run itself; a login
    # shell, the leader of a real one, passes it on to every process of the job it runs in the foreground.
    os.close(leader)
    os.killpg(process.pid, signal.SIGHUP)


@pytest.mark.parametrize("strategy", [[], ["trainer=ddp_sim"]], ids=["one process", "ddp_sim"])
def test_a_hangup_of_the_terminal_saves_and_says_so_in_the_log(tmp_path, data_dir, strategy):
    # An ssh session that drops, a terminal window closed: the terminal hangs up, and SIGHUP, whose default ended
    # the run at once, reaches every process of the job. Nothing since the last validation was saved, and the
    # run's log did not say why it ended. Every write to the console fails (EIO) from then on: what the run has
    # to say goes to its log file alone.
    run_dir = tmp_path / "run"
    process, leader = _in_a_terminal(run_dir, data_dir, *strategy)
    with _killed_at_the_end(process):
        _hang_up(process, leader)
        status = process.wait(timeout=120)
    logged = (run_dir / "train.log").read_text()
    assert status == 128 + signal.SIGHUP, f"status {status}\n{logged[-3000:]}"
    interrupted = run_dir / "checkpoints" / "interrupted.ckpt"
    assert torch.load(interrupted, weights_only=False)["global_step"] > 10
    assert "SIGHUP (the terminal hung up): stopping as for SIGTERM" in logged
    assert f"resume with ckpt_path={interrupted}, as in: python " in logged
    assert "Traceback" not in logged and "Logging error" not in logged


def test_a_run_that_ignores_hangups_carries_on_past_its_gone_terminal(tmp_path, data_dir):
    # `trap '' HUP; python train.py`, or nohup: SIGHUP stays ignored. The progress bar's next write to the terminal
    # that hung up raised OSError (EIO) into training, which ended with status 1 and nothing saved.
    run_dir = tmp_path / "run"
    process, leader = _in_a_terminal(run_dir, data_dir, hangups=False)
    with _killed_at_the_end(process):
        validated = (run_dir / "train.log").read_text().count("Validated at step")
        _hang_up(process, leader)
        deadline = time.monotonic() + 60
        while (run_dir / "train.log").read_text().count("Validated at step") <= validated + 1:
            assert process.poll() is None and time.monotonic() < deadline, (run_dir / "train.log").read_text()[-3000:]
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGTERM)
        status = process.wait(timeout=120)
    logged = (run_dir / "train.log").read_text()
    assert status == 128 + signal.SIGTERM, f"status {status}\n{logged[-3000:]}"
    assert "SIGHUP" not in logged
    assert "resume with ckpt_path=" in logged and (run_dir / "checkpoints" / "interrupted.ckpt").is_file()
    assert "Traceback" not in logged and "Logging error" not in logged


CPU_DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]


@pytest.mark.parametrize(
    ("strategy", "stop", "to_whom"),
    [
        (CPU_DDP, signal.SIGTERM, "every process"),
        (["trainer=ddp_sim"], signal.SIGTERM, "the launching process"),
        (["trainer=ddp_sim"], signal.SIGINT, "every process"),
    ],
)
def test_a_stop_ends_every_ddp_rank_after_the_same_step_and_saves(tmp_path, data_dir, strategy, stop, to_whom):
    # SLURM sends SIGTERM to every process of the job: once to each rank, and Lightning's rank 0 sent it to its
    # ranks again; Lightning's handler then broadcast from wherever it found each rank, and the ranks waited forever
    # in mismatched collectives. Kubernetes sends it to the first process alone, which under ddp_sim trains
    # nothing; a terminal sends Ctrl-C to every process, which stopped each rank at once, with nothing saved.
    run_dir = tmp_path / "stopped"
    tiny = [setting for setting in TINY if not setting.startswith(("trainer=", "data.num_workers="))]
    process = start_script("train.py", *tiny, *BUILTIN_SMALL, *strategy, "data.num_workers=1",
                           "trainer.max_steps=100000", "trainer.val_check_interval=10", f"paths.data_dir={data_dir}",
                           f"hydra.run.dir={run_dir}", env=STOP_ENV)  # fmt: skip
    with _killed_at_the_end(process):  # a rank left waiting in a collective
        wait_for_file(run_dir / "checkpoints" / "last.ckpt", process)
        time.sleep(0.5)
        if to_whom == "every process":
            os.killpg(process.pid, stop)
        else:
            process.send_signal(stop)
        stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + stop, f"{stdout[-2000:]}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "Terminating process" not in stdout + stderr  # torch's warning as it ends the other spawned rank
    interrupted = run_dir / "checkpoints" / "interrupted.ckpt"
    # With the command, also from a spawned rank (trainer=ddp_sim), which has no Hydra of its own.
    assert re.search(f"resume with ckpt_path={interrupted}, as in: python \\S*train.py ", stdout + stderr)
    checkpoint = torch.load(interrupted, weights_only=False)
    assert checkpoint["global_step"] > 10
    batches = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    assert batches["ready"] == batches["completed"] == checkpoint["global_step"]


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_first_ctrl_c_stops_after_the_step_and_a_second_at_once(world_size):
    from wavenet.callbacks import InterruptCheckpoint

    stops: list[int] = []
    lightning_sigterm = signal.signal(signal.SIGTERM, lambda signum, frame: stops.append(signum))
    ctrl_c = signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever an earlier test left there
    try:
        callback = InterruptCheckpoint("unused")
        callback.on_train_start(SimpleNamespace(world_size=world_size, global_rank=0, validating=False), None)
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler  # or it would stop pytest
        signal.raise_signal(signal.SIGINT)
        assert callback.stopped_by_ctrl_c
        # Alone, handed to Lightning's SIGTERM handler; under DDP, noted for the ranks to agree on after the batch
        # (Lightning's would broadcast from inside the handler).
        assert stops == [signal.SIGTERM] * (world_size == 1)
        assert callback._stop_requested == (world_size > 1)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        assert stops == [signal.SIGTERM] * (world_size == 1)
    finally:
        signal.signal(signal.SIGTERM, lightning_sigterm)
        signal.signal(signal.SIGINT, ctrl_c)


@pytest.mark.parametrize("world_size", [1, 2])
def test_ctrl_c_saves_a_checkpoint_only_outside_ddp(tmp_path, world_size):
    from lightning.pytorch.trainer.states import TrainerFn

    from wavenet.callbacks import InterruptCheckpoint

    saved: list[Path] = []
    trainer = SimpleNamespace(
        world_size=world_size, state=SimpleNamespace(fn=TrainerFn.FITTING), global_step=7,
        strategy=SimpleNamespace(launcher=None), save_checkpoint=lambda path, weights_only: saved.append(path),
    )  # fmt: skip
    callback = InterruptCheckpoint(str(tmp_path))
    callback.on_exception(trainer, None, KeyboardInterrupt())
    assert saved == [] and callback.stopped_by_ctrl_c  # before training started (preparing data): nothing to save
    callback.on_train_start(trainer, None)
    callback.on_exception(trainer, None, KeyboardInterrupt())
    # Under DDP a rank may have stopped inside an all-reduce the others left: saving waits for all of them.
    assert saved == [tmp_path / "interrupted.ckpt"] * (world_size == 1)
    assert callback.stopped_by_ctrl_c  # train.py then exits 130, not Lightning's 1


def test_before_training_the_first_sigterm_raises_and_then_lightning_handles_them():
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from wavenet.launch import StopsBeforeTraining

    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with StopsBeforeTraining():
            with pytest.raises(SIGTERMException):
                signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)  # a second one would interrupt the first one's clean-up
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        with StopsBeforeTraining():
            ours = signal.getsignal(signal.SIGTERM)
            # As Lightning's handler, set when training is set up, calls the one it replaced: it stops the run itself.
            signal.signal(signal.SIGTERM, lambda signum, frame: ours(signum, frame))
            signal.raise_signal(signal.SIGTERM)
        with StopsBeforeTraining(ctrl_c=True), pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_ddp_sim_rank_that_a_passed_on_stop_killed_stops_the_launching_process(monkeypatch):
    from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    from torch.multiprocessing import ProcessExitedException

    from wavenet.launch import _SpawnLauncher

    def ranks_end(self, *args, stop: bool, **kwargs):
        if stop:  # to the launching process, which passes it on to its ranks
            signal.raise_signal(signal.SIGTERM)
        raise ProcessExitedException("process 1 terminated with signal SIGTERM", 1, 1234, -15, "SIGTERM")

    for stop in (True, False):
        launcher = _SpawnLauncher(SimpleNamespace(), start_method="spawn")
        launcher.procs = []
        monkeypatch.setattr(_MultiProcessingLauncher, "launch", functools.partialmethod(ranks_end, stop=stop))
        # A rank killed by the stop while it was starting, before it had handlers of its own, is the stop (status
        # 143), not torch's traceback; one that died without a stop passed on is an error still.
        with pytest.raises(SIGTERMException if stop else ProcessExitedException):
            launcher.launch(print)


def test_a_sigterm_outside_fit_ends_the_run_with_status_143(tmp_path, monkeypatch, caplog):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    import wavenet.tasks.train as task

    def stopped(cfg):  # as a SIGTERM while train=false prepares the data, or while the model is built
        raise SIGTERMException  # a SystemExit of status 0, were it let through

    monkeypatch.setattr(task, "_train", stopped)
    cfg = compose_config("train", [*TINY, "train=false"], tmp_path)
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as stop:
        task.run(cfg)
    assert stop.value.code == 143
    assert "Stopped by SIGTERM: run the same command again" in caplog.text


# Put on PYTHONPATH, it slows every process's preparation of each file (the ranks' and the pool workers' too),
# as a big corpus would, and with WAVENET_TEST_POOL set makes even a small corpus go to a pool of workers.
SLOW_PREPARATION = """
import importlib.abc, importlib.util, os, sys, time

class SlowPreparation(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "wavenet.data.prepare":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module

        def run_then_slow_down(module):
            run_module(module)
            encode = module.encode_file
            def slowly(*args):
                time.sleep(1.0)
                return encode(*args)
            module.encode_file = slowly

        spec.loader.exec_module = run_then_slow_down
        return spec

sys.meta_path.insert(0, SlowPreparation())
"""


@pytest.mark.parametrize(
    ("settings", "to_whom", "stop"),
    [
        ([], "every process", signal.SIGTERM),  # a pool of 2 workers prepares
        (CPU_DDP, "the first process", signal.SIGTERM),
        # A terminal's hangup, which multiprocessing's resource tracker (the pool's) died of, with tracebacks.
        ([], "every process", signal.SIGHUP),
    ],
)
def test_a_sigterm_while_data_is_prepared_stops_the_run_and_keeps_nothing_half_made(tmp_path, settings, to_whom, stop):
    # The first run on a big corpus spends its first hours preparing it. A SIGTERM then ended the run by the signal,
    # without a word; under ddp, sent to rank 0 alone (as Kubernetes sends it), rank 1 was left to fail at its
    # barrier. Now every process stops as it would in training, with status 143.
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "sitecustomize.py").write_text(SLOW_PREPARATION)
    env = {**STOP_ENV, "PYTHONPATH": str(tmp_path / "hooks")}
    tiny = [setting for setting in TINY if not setting.startswith("trainer=")]  # the runs stop before training
    workers = "data.prepare_workers=1" if settings else "data.prepare_workers=2"
    process = start_script("train.py", *tiny, *BUILTIN_SMALL, *settings, workers,
                           f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}", env=env)
    prepared = tmp_path / "data" / "prepared"
    with _killed_at_the_end(process):  # a rank left behind
        deadline = time.monotonic() + 120
        while not list(prepared.glob("*.partial-*")):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        time.sleep(0.5)  # into the first file
        if to_whom == "every process":
            os.killpg(process.pid, stop)
        else:
            process.send_signal(stop)
        stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + stop, f"{stdout[-2000:]}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "Stopped before training started: nothing to save" in stdout + stderr
    assert ("Preparing 6 files" in stdout + stderr) and ("in 2 processes" in stdout + stderr) == (not settings)
    assert os.listdir(prepared) == []  # neither a cache nor the half of one


def test_ctrl_c_in_a_forked_data_loader_worker_is_left_to_the_trainer():
    from wavenet.callbacks import InterruptCheckpoint

    stops: list[int] = []
    lightning_sigterm = signal.signal(signal.SIGTERM, lambda signum, frame: stops.append(signum))
    ctrl_c = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        callback = InterruptCheckpoint("unused")
        callback.on_train_start(SimpleNamespace(world_size=1), None)
        child = os.fork()
        if child == 0:  # as a worker: the inherited handler must neither stop nor print
            signal.raise_signal(signal.SIGINT)
            os._exit(10 + len(stops) + callback.stopped_by_ctrl_c)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 10
    finally:
        signal.signal(signal.SIGTERM, lightning_sigterm)
        signal.signal(signal.SIGINT, ctrl_c)


def test_ddp_sim_trains_on_two_cpu_processes(tmp_path, data_dir):
    run_dir, ranks = tmp_path / "ddp", tmp_path / "ranks"
    probe = ["+callbacks.probe._target_=tests.probes.RankRecorder", f"+callbacks.probe.out={ranks}"]
    result = train(run_dir, data_dir, "trainer=ddp_sim", *probe)
    records = [json.loads((ranks / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    # Each rank trained on batches of its own (6 steps x 4 windows, none shared) into the same weights.
    assert [len(record["windows"]) for record in records] == [24, 24]
    assert not set(records[0]["windows"]) & set(records[1]["windows"])
    assert records[0]["weights"] == records[1]["weights"]
    # What the loggers get is the mean over both ranks: rank 0's alone was logged.
    rows = [row for row in read_metrics(run_dir) if row["train/loss"]]
    means = [(loss0 + loss1) / 2 for loss0, loss1 in zip(records[0]["losses"], records[1]["losses"])]
    assert [float(row["train/loss"]) for row in rows] == pytest.approx(means, rel=1e-6)
    assert [float(row["train/bits_per_sample"]) for row in rows] == pytest.approx(
        [mean / math.log(2) for mean in means], rel=1e-6
    )
    assert "distributed_backend=gloo" in result.stderr + result.stdout
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
    # The spawned ranks log as the main process: in its format, into the run's log file, nothing bare on stderr.
    log = (run_dir / "train.log").read_text()
    for rank in (0, 1):
        assert f"[lightning.fabric.utilities.distributed][INFO] - Initializing distributed: GLOBAL_RANK: {rank}," in log
    assert "[wavenet.data.datamodule][INFO] - Audio under " in log  # set up in the ranks
    assert "[lightning.pytorch.utilities.rank_zero][INFO] - `Trainer.fit` stopped: `max_steps=6` reached." in log
    assert result.stderr == "", result.stderr[-2000:]


def test_multirun_makes_one_run_per_value(tmp_path, data_dir):
    sweep_dir = tmp_path / "sweep"
    result = run_script(
        "train.py", "-m", *TINY, *BUILTIN_SMALL, "model=tiny,small", "trainer.max_steps=2", "trainer.val_check_interval=2",
        f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep_dir}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1"):
        assert (sweep_dir / job / "checkpoints" / "last.ckpt").is_file()
    layers = [(sweep_dir / job / ".hydra" / "config.yaml").read_text().count("layers: 20") for job in "01"]
    assert layers == [0, 1]


def test_a_preempted_sweep_writes_the_summary_of_its_jobs_so_far(tmp_path, data_dir):
    # SIGTERM (a scheduler's preemption) in the second job: Hydra's end-of-sweep callbacks never run.
    sweep_dir = tmp_path / "sweep"
    process = start_script("train.py", "-m", *TINY, *BUILTIN_SMALL, "trainer.max_steps=2,100000",
                           "trainer.val_check_interval=2", f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep_dir}")
    wait_for_file(sweep_dir / "1" / "checkpoints" / "last.ckpt", process)
    process.send_signal(signal.SIGTERM)
    output = "".join(process.communicate(timeout=120))
    assert process.returncode == 143, output[-3000:]
    assert "The sweep ends at job 1, stopped by SIGTERM: the summary lists the jobs so far" in output, output[-3000:]
    summary = yaml.safe_load((sweep_dir / "multirun_summary.yaml").read_text())
    assert [(trial["job"], trial["failed"], trial["reason"]) for trial in summary["trials"]] == [
        (0, False, None),
        (1, True, "stopped by SIGTERM"),
    ]
    assert summary["best"]["job"] == 0 and summary["trials"][1]["params"] == {"trainer.max_steps": 100000}


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["data=folder"], "data.root"),
        (["data=folder", "data.root=/nonexistent/wavs"], "/nonexistent/wavs"),
        (["data=folder", "data.root=/nonexistent/wavs", "train=false"], "/nonexistent/wavs"),  # checks the data
        # Found by an audit: each was a traceback, or (min_lr_ratio) trained with a negative learning rate.
        (["model.layers=7"], "model: layers (7) must be a multiple of stacks (2)"),
        (["model.min_lr_ratio=-1"], "model: min_lr_ratio must be between 0 and 1"),
        (["seed=abc"], "seed must be an integer from 0 to 2**32 - 1 (numpy's range), got 'abc'"),
        (["seed=-1"], "seed must be an integer from 0 to 2**32 - 1 (numpy's range), got -1"),
        # A second audit: each was a traceback, or trained from scratch (`last`), or without clipping (-1).
        (["ckpt_path=last"], "ckpt_path=last would look in this run's folder, which is new"),
        (["+ckpt_pth=x.ckpt"], "ckpt_pth is not a setting of train.py (added with +ckpt_pth); did you mean ckpt_path?"),
        (["trainer.max_epochs=abc"], "trainer.max_epochs must be an integer, got 'abc'"),
        (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val must be a positive number, 0 or null"),
        (["trainer.max_epochs=0"], "trainer.max_epochs=0 trains nothing; to check the data only, use train=false"),
        (["trainer.devices=abc"], "trainer: TypeError: `devices` selected with `CPUAccelerator` should be an int"),
        (["train=maybe"], "train must be true or false, got 'maybe'"),
        # Hydra's own hint for a misspelt key is to add it with +.
        (["+data.batchsize=8"], "data.batchsize is not a setting of wavenet.data.SyntheticMusicDataModule; did you "
                                "mean data.batch_size?"),  # fmt: skip
        (["model.compile=maybe"], "model: compile must be true or false, got 'maybe'"),
        (["callbacks.ema.decay=abc"], "callbacks.ema: EMA decay must be in (0, 1), got abc"),
        (["trainer.max_steps=2.5"], "trainer.max_steps must be a positive integer (or -1: no limit), got 2.5"),
        (["trainer.max_steps=0"], "trainer.max_steps must be a positive integer (or -1: no limit), got 0"),
        (["trainer.max_steps=-1"], "model.decay=cosine decays over the whole run, and this one has no end"),
        (["trainer.val_check_interval=0"], "trainer.val_check_interval must be a positive number of steps"),
        # A third: a ZeroDivisionError at the first step, or once the data was prepared and the loggers made.
        (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches must be a positive integer, got 0"),
        (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps must be a positive integer, got 0"),
        (["logger=tensorboard", "logger.tensorboard.save_dir={tiny}/tb"],
         "cannot write to logger.tensorboard.save_dir={tiny}/tb: {tiny} is a file, not a folder"),
        pytest.param(
            ["trainer.accelerator=gpu"], "trainer.accelerator=gpu but no CUDA GPU is available here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is available here"),
        ),
        (["ckpt_path={tmp}/missing.ckpt"], "checkpoint not found: {tmp}/missing.ckpt"),
        (["init_from={tmp}/missing.ckpt"], "checkpoint not found: {tmp}/missing.ckpt"),
        (["init_from={tiny}", "model.residual_channels=4"],
         "init_from={tiny} holds another network: model.residual_channels=4 (the checkpoint's: 8)"),
        # A folder holding the run's (a requeued job's), with one checkpoint, saved without an optimiser.
        (["ckpt_path={tmp}"], "ckpt_path={tmp}: no checkpoint under it can resume training (1 checkpoint, each "),
        (["ckpt_path="], "ckpt_path must be the path of a checkpoint to resume from, or null, got empty"),
        (["ckpt_path={tiny}", "model=small"], "trained with other settings: model.layers=20 (the checkpoint's: 6)"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, data_dir, overrides, expected):
    from wavenet import WaveNetModule

    module = WaveNetModule(layers=6, stacks=2, residual_channels=8, dilation_channels=8, skip_channels=16)
    tiny = save_checkpoint(module, tmp_path / "tiny.ckpt")
    overrides = [override.format(tmp=tmp_path, tiny=tiny) for override in overrides]
    expected = expected.format(tmp=tmp_path, tiny=tiny)
    run_dir = tmp_path / "run"
    result = run_script("train.py", *TINY, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}", *overrides)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
    if any(override.startswith("ckpt_path=") for override in overrides):
        assert "CONFIG" not in result.stdout  # a refused checkpoint is all the run prints, found in a second


def test_ddp_under_multirun_runs_each_job_once_in_its_own_folder(tmp_path, data_dir):
    # Plain `ddp` starts ranks by re-running the script: they must re-run their own job, not the sweep
    # (which, with the default time-stamped sweep folder, would land in a second folder). A job refused on
    # every rank fails alone: Lightning's watch over the ranks of one job once killed the sweep in the next.
    log_dir = tmp_path / "outputs"
    result = run_script(
        "train.py", "-m", *TINY, *BUILTIN_SMALL, *CPU_DDP, "trainer.max_steps=2", "trainer.val_check_interval=2",
        "model.residual_channels=4", "model.min_lr_ratio=-1,0.1,0.2", f"paths.data_dir={data_dir}",
        f"paths.log_dir={log_dir}",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    (sweep,) = (log_dir / "train" / "multiruns").iterdir()
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "2", "multirun.yaml", "multirun_summary.yaml"]
    summary = yaml.safe_load((sweep / "multirun_summary.yaml").read_text())
    assert [trial["failed"] for trial in summary["trials"]] == [True, False, False], summary
    for job in ("1", "2"):
        assert torch.load(sweep / job / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2


def test_ddp_in_an_optuna_search_runs_each_trial_once(tmp_path, data_dir):
    # The search's config makes a run a multirun: a rank re-run with it started a search of its own.
    log_dir = tmp_path / "outputs"
    result = run_script(
        "train.py", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=1", *TINY, *BUILTIN_SMALL, *CPU_DDP,
        "trainer.max_steps=2", "trainer.val_check_interval=2", "model.residual_channels=4", "model.layers=4",
        f"paths.data_dir={data_dir}", f"paths.log_dir={log_dir}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Study name:") == 1, result.stdout[-3000:]
    (sweep,) = (log_dir / "train" / "multiruns").iterdir()
    assert sorted(p.name for p in sweep.iterdir()) == [
        "0", "multirun.yaml", "multirun_summary.yaml", "optimization_results.yaml"
    ]  # fmt: skip


def test_a_job_of_a_sweep_with_bad_input_fails_alone_and_the_sweep_says_so(tmp_path, data_dir):
    sweep_dir = tmp_path / "sweep"
    result = run_script(
        "train.py", "-m", *TINY, *BUILTIN_SMALL, "trainer.max_steps=2", "trainer.val_check_interval=2",
        "model.min_lr_ratio=0.1,-1,0.2", f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep_dir}",
    )  # fmt: skip
    assert result.returncode == 1  # a sweep with a failed job is a failed command
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: job 1: model: min_lr_ratio must be between 0 and 1, got -1"], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    summary = yaml.safe_load((sweep_dir / "multirun_summary.yaml").read_text())
    assert [trial["failed"] for trial in summary["trials"]] == [False, True, False]  # the others ran
    assert (sweep_dir / "2" / "checkpoints" / "last.ckpt").is_file()
    assert errors[0] in (sweep_dir / "1" / "train.log").read_text()  # the job's own log says why it failed


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, data_dir):
    # A job array or a script starts several runs at once: they must never share a folder.
    log_dir = tmp_path / "outputs"
    overrides = [*TINY, *BUILTIN_SMALL, "train=false", f"paths.data_dir={data_dir}", f"paths.log_dir={log_dir}"]
    runs = [start_script("train.py", *overrides) for _ in range(2)]
    for process in runs:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr[-2000:]
    folders = sorted((log_dir / "train" / "runs").iterdir())
    assert len(folders) == 2, folders  # two started together: before microseconds, one folder for both


def test_a_sweep_whose_jobs_log_no_metric_is_not_a_failure(tmp_path, data_dir):
    sweep_dir = tmp_path / "sweep"
    result = run_script(
        "train.py", "-m", *TINY, *BUILTIN_SMALL, "train=false", "model.layers=4,6", f"paths.data_dir={data_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    summary = yaml.safe_load((sweep_dir / "multirun_summary.yaml").read_text())
    assert [(trial["failed"], trial["value"]) for trial in summary["trials"]] == [(False, None), (False, None)]


OPTUNA_TINY = ["hparams_search=optuna", "hydra.sweeper.n_trials=2", "model.residual_channels=choice(4,8)",
               "model.layers=choice(4,6)"]  # fmt: skip


@pytest.mark.parametrize("sweep", [["model.layers=4,6", "train=false"], OPTUNA_TINY], ids=["values", "optuna"])
def test_a_sweep_as_the_readme_shows_it_runs_from_any_folder(tmp_path, data_dir, sweep):
    # No hydra.sweep.dir or paths.log_dir: the sweep folder comes from the defaults, under the current folder.
    result = run_script(str(REPO / "train.py"), "-m", *TINY, *BUILTIN_SMALL, *sweep, f"paths.data_dir={data_dir}",
                        cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "outputs" / "train" / "multiruns").iterdir()
    assert {"0", "1", "multirun_summary.yaml"} <= {path.name for path in sweep_dir.iterdir()}


INTERRUPTED_BEFORE_TRAINING = """
import runpy, sys
import wavenet.tasks.{task} as task
def interrupted(cfg):  # as a Ctrl-C while data is prepared (train=false) or a checkpoint loads
    raise KeyboardInterrupt
task.run = interrupted
sys.argv = ["{task}.py", "hydra.run.dir=" + sys.argv[1], *sys.argv[2:]]
runpy.run_path("{task}.py", run_name="__main__")
"""


@pytest.mark.parametrize("task", ["train", "generate"])
def test_ctrl_c_outside_training_is_one_line_and_status_130(tmp_path: Path, task: str) -> None:
    script = INTERRUPTED_BEFORE_TRAINING.format(task=task)
    settings = []
    if task == "generate":  # a file that passes the checks before torch loads, as a checkpoint would
        settings.append(f"ckpt_path={checkpoint_lookalike(tmp_path / 'archive.ckpt')}")
    (tmp_path / "interrupted.py").write_text(script)
    result = run_script(str(tmp_path / "interrupted.py"), str(tmp_path / "run"), *settings)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip() == "interrupted"


def test_a_run_folder_holding_a_run_is_refused_before_anything_is_written(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    train(run_dir, data_dir)
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    for script, overrides in [("train.py", TINY), ("generate.py", [f"ckpt_path={run_dir}/checkpoints/last.ckpt"])]:
        result = run_script(script, *overrides, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}")
        assert result.returncode == 1
        assert result.stderr.strip() == (
            f"error: hydra.run.dir={run_dir} already holds a run (.hydra): choose a new folder, or leave "
            "hydra.run.dir to its default (a new folder per run)"
        )
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before
    (tmp_path / "a_file").write_text("")
    result = run_script("train.py", *TINY, f"hydra.run.dir={tmp_path / 'a_file' / 'run'}")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: cannot create hydra.run.dir={tmp_path / 'a_file' / 'run'}: Not a directory; give a writable "
        "hydra.run.dir"
    )
    # The default run folder is under paths.log_dir, which is then what to mend.
    result = run_script("train.py", *TINY, f"paths.log_dir={tmp_path / 'a_file'}")
    assert result.returncode == 1
    assert result.stderr.strip().startswith(f"error: cannot create hydra.run.dir={tmp_path / 'a_file'}/train/runs/")
    assert result.stderr.strip().endswith(": Not a directory; set paths.log_dir to a writable folder")


def test_a_run_refused_before_writing_leaves_nothing_so_the_mended_command_runs_in_its_folder(tmp_path, data_dir):
    # Hydra writes the run's record (.hydra/) and an empty log before the settings are checked: left there, they
    # made the retry of the same command a "second run" in that folder, and every refused run an empty folder.
    made, found = tmp_path / "made", tmp_path / "found"
    found.mkdir()
    (found / "notes.txt").write_text("the user's")
    for run_dir in (made / "runs" / "1", found):  # as outputs/train/runs/<time>, and a folder of the user's
        for script, overrides in [("train.py", ["seed=-1"]), ("generate.py", ["ckpt_path=missing.ckpt"])]:
            result = run_script(script, *overrides, f"hydra.run.dir={run_dir}")
            assert result.returncode == 1 and result.stderr.startswith("error: "), result.stderr[-2000:]
    # Refused once torch has loaded, as the callbacks and Lightning's Trainer are built: the seed's line and the
    # config shown had made the run folder one of a run; and the devices Lightning logs before it checks the last.
    for override in ("callbacks.audio_samples.seconds=0", "trainer.precision=foo", "trainer.limit_val_batches=-1"):
        result = run_script("train.py", *TINY, override, f"hydra.run.dir={made / 'runs' / '2'}")
        assert result.returncode == 1 and result.stderr.startswith("error: "), result.stderr[-2000:]
        assert "CONFIG" not in result.stdout
    assert not made.exists()
    assert [path.name for path in found.iterdir()] == ["notes.txt"]
    # Refused once it has written its own files (the config it showed, its loggers'): all of it stays.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "noise.wav").write_bytes(b"not audio" * 100)
    run_dir = tmp_path / "refused_later"
    result = run_script("train.py", *TINY, "data=folder", f"data.root={corpus}", f"paths.data_dir={data_dir}",
                        f"hydra.run.dir={run_dir}")  # fmt: skip
    assert result.returncode == 1 and "no usable audio" in result.stderr, result.stderr[-2000:]
    assert {".hydra", "config_tree.log", "train.log"} <= {path.name for path in run_dir.iterdir()}
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert (run_dir / "train.log").read_text().rstrip().endswith(f"[ERROR] - {error}")  # why the run ended


def test_a_setting_refused_on_the_spawned_ranks_is_one_error_line(tmp_path, data_dir):
    result = run_script(
        "train.py", *TINY, *BUILTIN_SMALL, "trainer=ddp_sim", "data.chunk_length=10000000", f"paths.data_dir={data_dir}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "shorter than one window (10000" in errors[0], result.stderr[-2000:]


def test_settings_that_waste_a_run_are_warned_of(caplog):
    from omegaconf import OmegaConf

    from wavenet.tasks.train import _warn_of_settings_that_waste_the_run

    cfg = OmegaConf.create({"model": {"warmup_steps": 100}, "trainer": {"max_steps": 20, "val_check_interval": 50}})
    _warn_of_settings_that_waste_the_run(cfg)
    assert [record.getMessage() for record in caplog.records] == [
        "model.warmup_steps=100 is not below trainer.max_steps=20: the learning rate rises for the whole run, and "
        "never decays",
    ]  # not the validation interval (50): the last step is validated
