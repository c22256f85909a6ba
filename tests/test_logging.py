"""Dashboards: what TensorBoard and W&B (offline) receive, when W&B runs offline, how W&B runs are named, the
sample logger's settings, when the gradient norm is taken, what a run prints as it starts."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import socket
import struct
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import soundfile as sf
import torch
import wandb
import yaml
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import SingleDeviceStrategy
from omegaconf import open_dict
from tensorboard.backend.event_processing.event_accumulator import AUDIO, IMAGES, EventAccumulator
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from torch.utils.data import DataLoader, Dataset, TensorDataset
from wandb.proto import wandb_internal_pb2

from tests.conftest import BUILTIN_SMALL, TINY, compose_config, run_script
from tests.test_module import TINY as TINY_MODULE
from tests.test_module import fit, sine_batch
from wavenet import WaveNetModule
from wavenet.callbacks import (
    LearningRateMonitor,
    ModelSummaryWithoutFlops,
    StepProgressBar,
    TrainingMonitor,
    _contiguous,
)
from wavenet.config import instantiate_checked, instantiate_group
from wavenet.errors import UserError
from wavenet.tasks.train import resolve_auto_settings, run, wandb_offline

SCALARS = {"train/loss", "val/loss", "val/bits_per_sample", "train/grad_norm", "train/samples_per_sec"}
# Samples at every validation, short, never skipped for time.
SAMPLES = [
    "callbacks.audio_samples.every_n_validations=1",
    "callbacks.audio_samples.seconds=0.25",
    "callbacks.audio_samples.max_time_fraction=null",
]


def wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """The records of a `.wandb` file: a LevelDB-style log of protobuf records in 32 KiB blocks."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    records, position, pending = [], 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full/first start a record
        if kind in (1, 4):  # full/last end it
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


@pytest.fixture(scope="module")
def logged_sweep(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A multirun of two tiny jobs with every logger, W&B offline, audio samples at every validation."""
    sweep_dir = tmp_path_factory.mktemp("logged")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")  # for the subprocess: conftest disables W&B everywhere else
        result = run_script(
            "train.py", "-m", *TINY, *BUILTIN_SMALL, *SAMPLES, "logger=many", "seed=1,2",
            f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep_dir}",
        )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "anonymous setting" not in result.stderr  # W&B's warning of a setting Lightning passes as None
    return sweep_dir


def offline_run(job_dir: Path) -> Path:
    runs = list((job_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.slow
def test_wandb_offline_run_has_scalars_config_audio_and_images(logged_sweep):
    run_dir = offline_run(logged_sweep / "0")
    (wandb_file,) = run_dir.glob("run-*.wandb")
    records = wandb_records(wandb_file)
    history = [item for record in records if record.HasField("history") for item in record.history.item]
    logged = {item.key or "/".join(item.nested_key) for item in history}
    assert SCALARS | {"lr-AdamW/decayed"} <= logged
    assert {"samples/generated/_type", "samples/real/_type", "samples/spectrogram/_type"} <= logged
    # The composed config, resolved, is the run's config.
    config = {u.key: u.value_json for r in records if r.HasField("config") for u in r.config.update}
    config |= {u.key: u.value_json for r in records if r.HasField("run") for u in r.run.config.update}
    assert {"model", "data", "trainer", "callbacks"} <= set(config)
    assert json.loads(config["model"])["layers"] == 6
    assert "${" not in config["paths"]

    media = run_dir / "files" / "media"
    generated = list((media / "audio").rglob("generated*.wav"))
    assert generated and list((media / "audio").rglob("real*.wav"))
    info = sf.info(str(generated[0]))
    assert (info.samplerate, info.frames) == (16000, 4000)  # 0.25 s
    assert list((media / "images").rglob("spectrogram*.png"))


@pytest.mark.slow
def test_multirun_logs_one_wandb_run_per_job(logged_sweep):
    runs = [offline_run(logged_sweep / job) for job in ("0", "1")]
    assert runs[0].name.split("-")[-1] != runs[1].name.split("-")[-1]  # the run ids differ
    for job, run_dir in enumerate(runs):
        records = wandb_records(next(run_dir.glob("run-*.wandb")))
        assert [r.exit.exit_code for r in records if r.HasField("exit")] == [0]  # each finished, as a success
        (run_record,) = [r.run for r in records if r.HasField("run")]
        assert run_record.display_name == f"{logged_sweep.name}/{job}"  # named after its run folder
        assert run_record.run_group == logged_sweep.name


@pytest.mark.slow
def test_tensorboard_events_have_audio_and_image_summaries(logged_sweep):
    events = EventAccumulator(str(logged_sweep / "0" / "tensorboard"), size_guidance={AUDIO: 0, IMAGES: 0})
    events.Reload()
    tags = events.Tags()
    assert SCALARS <= set(tags["scalars"])
    assert {"samples/generated_0", "samples/real_0", "samples/generated_1"} <= set(tags["audio"])
    assert {"samples/spectrogram_0", "samples/spectrogram_1"} <= set(tags["images"])
    audio = events.Audio("samples/generated_0")
    # Every validation, at the step of its val/loss (Lightning's, one below the checkpoint's global step).
    assert [event.step for event in audio] == [event.step for event in events.Scalars("val/loss")] == [2, 5]
    assert (audio[0].sample_rate, audio[0].length_frames) == (16000, 4000)


@pytest.mark.slow
def test_tensorboard_hparams_table_and_hparams_yaml_hold_the_whole_config(logged_sweep):
    for job, seed in (("0", 1), ("1", 2)):
        events = EventAccumulator(str(logged_sweep / job / "tensorboard"))
        events.Reload()
        content = [HParamsPluginData.FromString(data) for data in events.PluginTagToContent("hparams").values()]
        (experiment,) = [data.experiment for data in content if data.HasField("experiment")]
        assert {"val/bits_per_sample", "val/loss", "train/loss"} <= {m.name.tag for m in experiment.metric_infos}
        (session,) = [data.session_start_info for data in content if data.HasField("session_start_info")]
        settings = {key: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
                    for key, value in session.hparams.items()}  # fmt: skip
        assert settings["seed"] == seed and settings["model.layers"] == 6 and settings["data.chunk_length"] == 256
        assert settings["trainer.precision"] == "32-true" and not any("_target_" in key for key in settings)
        (end,) = [data.session_end_info for data in content if data.HasField("session_end_info")]
        assert end.status == api_pb2.STATUS_SUCCESS
        for logger in ("tensorboard", "csv"):
            saved = yaml.safe_load((logged_sweep / job / logger / "hparams.yaml").read_text())
            assert saved["seed"] == seed and saved["data"]["chunk_length"] == 256 and saved["layers"] == 6


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> EventAccumulator:
    """The TensorBoard events of a tiny run: validation at steps 3 and 6, every step logged; no samples."""
    run_dir = tmp_path_factory.mktemp("tensorboard_run")
    overrides = [*TINY, *BUILTIN_SMALL, "logger=tensorboard", "callbacks.audio_samples=null", f"paths.data_dir={data_dir}"]
    run(compose_config("train", overrides, run_dir))
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return events


def test_tensorboard_has_one_epoch_point_per_step(tensorboard_run):
    # Lightning adds `epoch` to the training step's metrics and to the validation's: two points at each validation.
    steps = [event.step for event in tensorboard_run.Scalars("epoch")]
    assert steps == [event.step for event in tensorboard_run.Scalars("train/loss")] == [0, 1, 2, 3, 4, 5]


def test_tensorboard_hparams_table_shows_booleans_and_nulls_as_overrides_write_them(tensorboard_run):
    # torch's `hparams` wrote true as the number 1.0 and left null settings out of the table.
    content = [HParamsPluginData.FromString(data) for data in tensorboard_run.PluginTagToContent("hparams").values()]
    (session,) = [data.session_start_info for data in content if data.HasField("session_start_info")]
    settings = {key: getattr(value, value.WhichOneof("kind")) for key, value in session.hparams.items()}
    assert settings["train"] == "true" and settings["model.compile"] == "false"
    assert settings["ckpt_path"] == "null" and settings["callbacks.audio_samples"] == "null"
    assert settings["model.layers"] == 6 and settings["trainer.precision"] == "32-true"
    (experiment,) = [data.experiment for data in content if data.HasField("experiment")]
    types = {info.name: info.type for info in experiment.hparam_infos}
    assert types["model.compile"] == types["ckpt_path"] == api_pb2.DATA_TYPE_STRING


def test_a_run_that_did_not_finish_ends_its_tensorboard_session_as_failed(tmp_path):
    # Written at the start, "success" stood in the HPARAMS table's Status column for runs stopped or failed too.
    from lightning.pytorch.loggers import TensorBoardLogger

    from wavenet.tasks.train import end_session_as_it_ends

    for ended, status in (("success", api_pb2.STATUS_SUCCESS), ("failed", api_pb2.STATUS_FAILURE)):
        logger = TensorBoardLogger(tmp_path / ended, name="", version="")
        logger.log_metrics({"train/loss": 1.0}, step=0)
        end_session_as_it_ends(logger)
        logger.finalize(ended)  # as Lightning ends a run
        assert len(list(Path(logger.log_dir).glob("events.out.tfevents.*"))) == 1  # written before it closed
        events = EventAccumulator(logger.log_dir)
        events.Reload()
        (content,) = events.PluginTagToContent("hparams").values()
        assert HParamsPluginData.FromString(content).session_end_info.status == status


class Tiles(Dataset):
    """Windows of `receptive_field + chunk` samples whose scored chunks tile each file, as validation sets do."""

    def __init__(self, files: list[torch.Tensor], receptive_field: int, chunk: int) -> None:
        self.window = receptive_field + chunk
        self.tiles = [(file, tile * chunk) for file in files for tile in range((len(file) - receptive_field) // chunk)]

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        file, start = self.tiles[index]
        window = file[start : start + self.window]
        return window[:-1], window[1:]


def test_wandb_runs_are_named_after_their_run_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = tmp_path / "multiruns" / "2026-01-31_12-00-00"
    multirun = ["hydra.mode=MULTIRUN", f"hydra.sweep.dir={sweep}"]
    jobs = [([], tmp_path / "runs" / "2026-01-31_12-00-00"), (multirun, sweep / "0"), (multirun, sweep / "1")]
    runs = []
    for overrides, output_dir in jobs:
        cfg = compose_config("train", ["logger=wandb", *overrides], output_dir)
        resolve_auto_settings(cfg)
        experiment = instantiate_checked(cfg.logger.wandb).experiment  # starts the (offline) W&B run
        runs.append((experiment.name, experiment.group))
        wandb.finish()
    assert runs == [
        ("2026-01-31_12-00-00", "2026-01-31_12-00-00"),  # a group of its own, which resumed runs join
        ("2026-01-31_12-00-00/0", "2026-01-31_12-00-00"),
        ("2026-01-31_12-00-00/1", "2026-01-31_12-00-00"),
    ]
    cfg = compose_config("train", ["logger=wandb", "logger.wandb.name=mine", "logger.wandb.group=ours"], tmp_path)
    resolve_auto_settings(cfg)
    assert (cfg.logger.wandb.name, cfg.logger.wandb.group) == ("mine", "ours")


def test_a_chain_of_resumed_runs_is_one_wandb_group_named_after_its_first_run(tmp_path, monkeypatch):
    # A preempted job resumed again and again was as many unrelated W&B runs.
    monkeypatch.setenv("WANDB_MODE", "offline")

    def ran(folder: Path, *settings: str) -> Path:
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "config.yaml").write_text("\n".join(settings) + "\n")
        return folder / "checkpoints" / "last.ckpt"

    runs, sweep = tmp_path / "runs", tmp_path / "sweep"
    first = ran(runs / "2026-01-31_12-00-00", "ckpt_path: null")
    second = ran(runs / "2026-02-01_08-00-00", f"ckpt_path: {first}")
    named = ran(runs / "2026-02-02_08-00-00", "ckpt_path: null", "logger:", "  wandb:", "    group: baselines")
    job = ran(sweep / "3", "ckpt_path: null")
    (sweep / "multirun.yaml").write_text("")
    # A requeued job's chain, each resuming from the folder of the chain's runs: its first run has no checkpoint.
    requeued = ran(tmp_path / "chain" / "2026-02-03_08-00-00", f"ckpt_path: {tmp_path / 'chain'}")
    resumed = runs / "2026-03-01_08-00-00"
    groups = []
    for ckpt_path in (second, first, named, job, tmp_path / "elsewhere.ckpt", requeued, tmp_path / "chain", runs):
        cfg = compose_config("train", ["logger=wandb", f"ckpt_path={ckpt_path}"], resumed)
        resolve_auto_settings(cfg)
        groups.append(cfg.logger.wandb.group)
    # A sweep's job: the sweep's group, not its number; a checkpoint outside a run folder: a group of its own.
    assert groups[:5] == ["2026-01-31_12-00-00", "2026-01-31_12-00-00", "baselines", "sweep", resumed.name]
    # The chain's folder names it; a run folder given as ckpt_path is its run's.
    assert groups[5:] == ["chain", "chain", "runs"]
    cfg = compose_config("train", ["logger=wandb", f"ckpt_path={second.parent.parent}"], resumed)
    resolve_auto_settings(cfg)
    assert cfg.logger.wandb.group == "2026-01-31_12-00-00"


def test_start_of_training_shows_no_advert_and_no_flops(tmp_path, data_dir, capfd, caplog):
    with_summary = [override for override in TINY if override != "callbacks.model_summary=null"]
    overrides = [*with_summary, *BUILTIN_SMALL, f"paths.data_dir={data_dir}", "trainer.max_steps=1"]
    with caplog.at_level(logging.INFO):
        run(compose_config("train", overrides, tmp_path))
    captured = capfd.readouterr()
    shown = captured.out + captured.err + caplog.text
    assert "Trainable params" in shown and "GPU available" in shown  # the summary and Lightning's own lines
    assert "litlogger" not in shown and "Tip:" not in shown
    assert "FLOPs" not in shown and "Skipping setting a default" not in shown


def test_epochs_shorter_than_the_logging_interval_are_logged_without_a_warning(tmp_path, data_dir):
    # Windows of 8,192 samples from 5 training files of 2 s: 4 batches an epoch, against a step every 5.
    short = ["data.chunk_length=8192", "trainer.log_every_n_steps=5", "trainer.max_steps=12", "logger=csv"]
    overrides = [*TINY, *BUILTIN_SMALL, *short, f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path}"]
    result = run_script("train.py", *overrides)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "logging interval" not in result.stderr  # Lightning's warning that nothing would be logged
    with (tmp_path / "csv" / "metrics.csv").open() as file:
        rows = [row for row in csv.DictReader(file) if row.get("train/loss")]
    # Every 5 steps, and the last (step 12, logged at 11), which is validated.
    assert [(int(row["epoch"]) > 0, int(row["step"])) for row in rows] == [(True, 4), (True, 9), (True, 11)]


class RecordGradNorms(L.Callback):
    """The gradient norm at every step, as `{step: norm}`, computed apart from `TrainingMonitor`."""

    def __init__(self) -> None:
        self.norms: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        grads = [p.grad.flatten() for p in pl_module.parameters() if p.grad is not None]
        self.norms[trainer.global_step] = torch.cat(grads).norm().item()


# One batch an epoch: Lightning warns that an epoch is shorter than the log interval, which counts steps anyway.
@pytest.mark.filterwarnings("ignore:The number of training batches")
def test_grad_norm_is_taken_on_logged_steps_only_with_the_same_values(tmp_path, monkeypatch):
    taken = []
    get_total_norm = torch.nn.utils.get_total_norm

    def counted(*args, **kwargs):
        taken.append(1)
        return get_total_norm(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "get_total_norm", counted)
    L.seed_everything(0)
    module = WaveNetModule(**TINY_MODULE)
    every_step = RecordGradNorms()
    logger = CSVLogger(tmp_path, name="", version="")
    fit(
        module, sine_batch(module.receptive_field), max_steps=7, log_every_n_steps=3, limit_val_batches=0,
        logger=logger, callbacks=[TrainingMonitor(), every_step],
    )  # fmt: skip
    with (tmp_path / "metrics.csv").open() as file:
        rows = [row for row in csv.DictReader(file) if row["train/grad_norm"]]
    logged = {int(row["step"]): float(row["train/grad_norm"]) for row in rows}
    assert list(logged) == [2, 5]  # Lightning logs every 3rd step
    assert len(taken) == 2 and len(every_step.norms) == 7
    for step, norm in logged.items():
        assert norm == pytest.approx(every_step.norms[step], rel=1e-5)


class RecordLosses(L.Callback):
    """This rank's loss at every step, as `{step: loss}` (the loggers' step: from 0)."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, *args) -> None:
        self.losses[trainer.global_step - 1] = outputs["loss"].item()


@pytest.mark.filterwarnings("ignore:The number of training batches")
def test_the_logged_training_loss_is_averaged_over_ranks_at_the_logged_steps_only(tmp_path, monkeypatch):
    # Under DDP the loggers had rank 0's loss. Averaged at every step, it would cost an all-reduce at each.
    reduced = []

    def mean_with_a_rank_whose_loss_is_zero(strategy, tensor, group=None, reduce_op="mean"):
        if reduce_op != "mean":  # Lightning's sum of the loaders' lengths
            return tensor
        reduced.append(strategy.lightning_module.trainer.global_step - 1)
        return tensor / 2

    monkeypatch.setattr(SingleDeviceStrategy, "reduce", mean_with_a_rank_whose_loss_is_zero)
    L.seed_everything(0)
    module, own = WaveNetModule(**TINY_MODULE), RecordLosses()
    trainer = fit(
        module, sine_batch(module.receptive_field), max_steps=7, log_every_n_steps=3, limit_val_batches=0,
        logger=CSVLogger(tmp_path, name="", version=""), callbacks=[own],
    )  # fmt: skip
    assert reduced == [2, 5, 6]  # every 3rd step, and the last, which Lightning logs as it stops
    with (tmp_path / "metrics.csv").open() as file:
        rows = [row for row in csv.DictReader(file) if row["train/loss"]]
    assert {int(row["step"]): float(row["train/loss"]) for row in rows} == pytest.approx(
        {step: own.losses[step] / 2 for step in reduced}
    )
    assert [float(row["train/bits_per_sample"]) for row in rows] == pytest.approx(
        [own.losses[step] / 2 / math.log(2) for step in reduced]
    )
    # The progress bar shows this rank's own loss, at every step.
    assert trainer.progress_bar_metrics["train/loss"] == pytest.approx(own.losses[6])


@pytest.mark.filterwarnings("ignore:The number of training batches", "ignore:You defined a `validation_step`")
def test_learning_rates_are_logged_once_per_step_under_gradient_accumulation(tmp_path):
    module = WaveNetModule(**TINY_MODULE)
    batch = sine_batch(module.receptive_field)
    loader = DataLoader(TensorDataset(*batch), batch_size=len(batch[0]) // 4)  # 2 steps of 2 batches an epoch
    trainer = L.Trainer(
        accelerator="cpu", logger=CSVLogger(tmp_path, name="", version=""), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, max_steps=4,
        accumulate_grad_batches=2, log_every_n_steps=1, callbacks=[LearningRateMonitor(logging_interval="step")],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    with (tmp_path / "metrics.csv").open() as file:
        steps = [int(row["step"]) for row in csv.DictReader(file) if row.get("lr-AdamW/decayed")]
    assert steps == [0, 1, 2, 3]  # Lightning's monitor logged each twice


class Slowed(L.Callback):
    """A second more in the first training batch (as compiling or starting workers takes), or in each validation;
    the time at the end of each training batch, in `ends`."""

    def __init__(self, where: str) -> None:
        self.where = where  # "first batch" or "validation"
        self.ends: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self.where == "first batch" and trainer.global_step == 0:
            time.sleep(1.0)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.where == "validation":
            time.sleep(1.0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        self.ends.append(time.perf_counter())


def logged_rates(tmp_path: Path, slow: Slowed, **settings: Any) -> tuple[dict[int, float], int]:
    """`train/samples_per_sec` by step, of a tiny run with `slow` and the trainer `settings`; and a batch's samples."""
    L.seed_everything(0)
    module = WaveNetModule(**TINY_MODULE)
    batch = sine_batch(module.receptive_field)
    fit(module, batch, logger=CSVLogger(tmp_path, name="", version=""), callbacks=[TrainingMonitor(), slow],
        **settings)  # fmt: skip
    with (tmp_path / "metrics.csv").open() as file:
        rates = {int(row["step"]): float(row["train/samples_per_sec"]) for row in csv.DictReader(file)
                 if row["train/samples_per_sec"]}  # fmt: skip
    return rates, batch[0].shape[0] * (batch[0].shape[1] - module.receptive_field + 1)


@pytest.mark.filterwarnings("ignore:The number of training batches")
def test_samples_per_sec_leaves_out_the_first_batch(tmp_path):
    slow = Slowed("first batch")
    rates, per_batch = logged_rates(tmp_path, slow, max_steps=3, log_every_n_steps=3, limit_val_batches=0)
    (rate,) = rates.values()
    # Batches 2 and 3, from the end of the first: its second of sleep left out.
    assert rate == pytest.approx(2 * per_batch / (slow.ends[2] - slow.ends[0]), rel=0.05)


@pytest.mark.filterwarnings("ignore:The number of training batches")
def test_samples_per_sec_after_a_validation_is_measured_over_training_alone(tmp_path):
    slow = Slowed("validation")
    rates, per_batch = logged_rates(
        tmp_path, slow, max_steps=4, log_every_n_steps=1, val_check_interval=2, num_sanity_val_steps=0
    )
    # Step 2 follows the validation after step 1: its own rate (the loggers had step 1's again), without the
    # validation's second of sleep, which would make it a fraction of the others.
    assert rates[2] != rates[1]
    assert rates[2] > 0.5 * min(rates[1], rates[3])
    assert rates[2] > 2 * per_batch / (slow.ends[2] - slow.ends[1])


def test_sample_audio_is_contiguous_audio_of_one_file():
    files = [torch.arange(0, 100), torch.arange(1000, 1050)]  # 12 and 5 tiles of 8 after 4 samples of context
    tiles = Tiles(files, receptive_field=4, chunk=8)
    assert torch.equal(_contiguous(tiles, 0, 4, 60), torch.arange(0, 60))
    assert torch.equal(_contiguous(tiles, 3, 4, 20), torch.arange(24, 44))
    # From the last tile of the first file, too short: the next file starts over.
    assert torch.equal(_contiguous(tiles, 11, 4, 30), torch.arange(1000, 1030))
    # From the last file, too short: round to the first.
    assert torch.equal(_contiguous(tiles, 14, 4, 30), torch.arange(0, 30))
    # Nothing as long as asked: the longest stretch.
    assert torch.equal(_contiguous(tiles, 13, 4, 500), torch.arange(0, 100))


def test_nothing_is_generated_without_a_media_logger(tmp_path, data_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("generated audio that no logger takes")

    monkeypatch.setattr("wavenet.callbacks.generate", fail)
    cfg = compose_config("train", [*TINY, *BUILTIN_SMALL, *SAMPLES, f"paths.data_dir={data_dir}"], tmp_path)
    assert run(cfg) is not None
    with (tmp_path / "csv" / "metrics.csv").open() as file:
        logged = {key for row in csv.DictReader(file) for key, value in row.items() if value}
    assert SCALARS <= logged


@pytest.mark.parametrize(
    "setting,value",
    [
        ("seconds", 0),
        ("seconds", -1.5),
        ("every_n_validations", 0),
        ("num_samples", 0),
        ("temperature", -0.1),
        ("max_time_fraction", 0),
        ("max_time_fraction", 1.5),
    ],
)
def test_bad_sample_logger_setting_is_an_error_naming_it(tmp_path, setting, value):
    cfg = compose_config("train", [f"callbacks.audio_samples.{setting}={value}"], tmp_path)
    with pytest.raises(UserError, match=rf"^callbacks\.audio_samples\.{setting} must"):
        instantiate_group(cfg.callbacks)


def test_the_first_build_of_the_cpu_kernel_is_not_counted_as_generating(monkeypatch):
    from wavenet import callbacks

    built = []

    def kernel_available() -> bool:  # the first call builds it, as on a new machine
        if not built:
            time.sleep(0.5)
            built.append(True)
        return True

    monkeypatch.setattr(callbacks, "cpu_kernel_available", kernel_available)
    samples = callbacks.AudioSampleLogger(every_n_validations=1)
    monkeypatch.setattr(samples, "_log_samples", lambda *args: kernel_available())  # as `generate` on first use
    samples._loggers, samples._clips = [CSVLogger("unused")], callbacks._Clips(torch.zeros(2, 15), torch.zeros(2, 100), ["a", "b"], 16000, 256)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    samples.on_validation_epoch_end(trainer, WaveNetModule(**TINY_MODULE))
    assert built and samples._generating < 0.2  # else a 15 s build skips the next samples, as over budget


def test_user_errors_of_config_targets_are_not_wrapped_by_hydra(tmp_path):
    cfg = compose_config("train", ["data.batch_size=0"], tmp_path)
    with pytest.raises(UserError, match=r"^data\.batch_size must"):
        instantiate_checked(cfg.data, receptive_field=15)


@pytest.mark.slow
def test_bad_sample_logger_setting_is_one_error_line(tmp_path, data_dir):
    result = run_script(
        "train.py", *TINY, f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path}",
        "callbacks.audio_samples.seconds=0",
    )  # fmt: skip
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: callbacks.audio_samples.seconds must be positive, got 0"], result.stderr[-2000:]


@pytest.mark.slow
def test_a_run_that_stops_with_an_error_ends_its_wandb_run_as_failed(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    result = run_script(
        "train.py", *TINY, *BUILTIN_SMALL, "logger=wandb", f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path}",
        "callbacks.audio_samples.seconds=0.01",  # refused when training starts, once the W&B run is open
    )  # fmt: skip
    assert result.returncode == 1 and "shorter than one spectrogram window" in result.stderr, result.stderr[-2000:]
    records = wandb_records(next(offline_run(tmp_path).glob("run-*.wandb")))
    assert [r.exit.exit_code for r in records if r.HasField("exit")] == [1]


@pytest.fixture
def no_wandb_environment(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def test_wandb_offline_auto_follows_login_server_and_wandb_mode(no_wandb_environment, monkeypatch, caplog):
    assert wandb_offline(True) is True
    assert wandb_offline("auto") is True  # not logged in
    # Online without a login, W&B would wait at its prompt for a key: refused up front.
    with pytest.raises(UserError, match=r"^logger.wandb.offline=false, but W&B has no login here"):
        wandb_offline(False)
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(UserError, match=r"^WANDB_MODE=online, but W&B has no login here"):
        wandb_offline("auto")
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_offline(False) is False
    with socket.socket() as closed:  # a local port nobody listens on: the server does not answer
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed.getsockname()[1]}")
    with caplog.at_level(logging.WARNING):
        assert wandb_offline("auto") is True
    assert "does not answer" in caplog.text
    with socket.create_server(("127.0.0.1", 0)) as server:  # logged in, and the server answers
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert wandb_offline("auto") is False
    for mode, offline in [("offline", True), ("dryrun", True), ("online", False), ("disabled", False)]:
        monkeypatch.setenv("WANDB_MODE", mode)
        assert wandb_offline("auto") is offline, mode
    with pytest.raises(UserError, match="logger.wandb.offline"):
        wandb_offline("sometimes")


def test_wandb_log_model_needs_online(no_wandb_environment, tmp_path, caplog):
    cfg = compose_config("train", ["logger=wandb", "logger.wandb.log_model=true"], tmp_path)
    with caplog.at_level(logging.WARNING):
        resolve_auto_settings(cfg)  # auto, not logged in: offline, without artifacts
    assert cfg.logger.wandb.offline is True and cfg.logger.wandb.log_model is False
    assert "not logged as artifacts" in caplog.text
    with open_dict(cfg):
        cfg.logger.wandb.offline, cfg.logger.wandb.log_model = True, True
    with pytest.raises(UserError, match="logger.wandb.log_model"):
        resolve_auto_settings(cfg)


def test_wandb_disabled_by_the_environment_is_said(no_wandb_environment, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for offline, said in [("auto", True), (False, True), (True, False)]:  # offline: Lightning overrides the mode
        caplog.clear()
        cfg = compose_config("train", ["logger=wandb", f"logger.wandb.offline={offline}"], tmp_path)
        with caplog.at_level(logging.WARNING):
            resolve_auto_settings(cfg)
        assert ("records nothing" in caplog.text) == said, offline


def test_audio_samples_are_generated_with_the_weights_validation_used(tmp_path, data_dir, monkeypatch):
    # The EMA callback swaps its average in for validation; samples of the training weights would not be
    # the model that val/loss describes.
    import wavenet.callbacks
    from wavenet.ema import EMA

    seen = []

    def recording_generate(model, *args, **kwargs):
        ema = next(callback for callback in model.trainer.callbacks if isinstance(callback, EMA))
        weights = {name: value for name, value in model.state_dict().items() if name in ema.averaged}
        seen.append(
            (
                all(torch.equal(value, ema.averaged[name]) for name, value in weights.items()),
                any(not torch.equal(value, ema._training_weights[name]) for name, value in weights.items()),
            )
        )
        return torch.full((kwargs["batch_size"], kwargs["num_samples"]), 128)

    monkeypatch.setattr(wavenet.callbacks, "generate", recording_generate)
    overrides = [*TINY, *BUILTIN_SMALL, *SAMPLES, "logger=tensorboard", f"paths.data_dir={data_dir}"]
    run(compose_config("train", overrides, tmp_path))
    assert seen == [(True, True), (True, True)]  # both validations: the average, not the training weights


def test_progress_is_logged_in_lines_where_the_output_is_no_terminal(tmp_path, data_dir):
    # A batch job writes to a file, where a progress bar cannot redraw: lines instead, in the run's log too.
    tiny = [override for override in TINY if not override.startswith("callbacks.progress_bar")]
    result = run_script(
        "train.py", *tiny, *BUILTIN_SMALL, "callbacks.progress_bar.log_every_seconds=0", f"paths.data_dir={data_dir}",
        f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line.split(" - ", 1)[1] for line in (tmp_path / "train.log").read_text().splitlines() if "Step " in line
             or "Validated at step" in line]  # fmt: skip
    assert [line.split(":")[0].split(" (")[0] for line in lines] == [
        "Step 1/6", "Step 2/6", "Step 3/6", "Validated at step 3/6", "Step 4/6", "Step 5/6", "Step 6/6",
        "Validated at step 6/6",
    ]  # fmt: skip
    # With the pace a bar would show, from the second step on: steps/s since the first, and the time left at that
    # rate (the first waited for the loader to start).
    assert all(re.search(r"/6 \([\d.]+ steps/s, \d+ s left\): ", line) for line in lines[1:]), lines
    assert "train/loss" in lines[0] and "val/bits_per_sample" in lines[3]
    # Three decimals each, also where they are zeros: "train/loss 5.000", never "train/loss 5".
    values = [pair.rsplit(" ", 1)[1] for line in lines for pair in line.split(": ", 1)[1].split(", ")]
    assert values and all(re.fullmatch(r"\d+\.\d{3}", value) for value in values), lines


def test_on_a_terminal_each_validation_is_a_line_of_the_log_file_alone(tmp_path, monkeypatch, caplog):
    # The bar shows the metrics on a terminal, and the run's log file held none of them.
    caplog.set_level(logging.INFO, logger="wavenet.callbacks")
    monkeypatch.setattr("wavenet.callbacks.get_console", lambda: SimpleNamespace(is_terminal=True))
    console = io.StringIO()
    handlers = [logging.FileHandler(tmp_path / "train.log"), logging.StreamHandler(console)]
    root = logging.getLogger()
    for handler in handlers:
        root.addHandler(handler)
    try:
        module = WaveNetModule(**TINY_MODULE)
        fit(module, sine_batch(module.receptive_field), max_steps=2, val_check_interval=1, num_sanity_val_steps=1,
            enable_progress_bar=True, callbacks=[StepProgressBar(log_every_seconds=0)])  # fmt: skip
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
    lines = [line for line in (tmp_path / "train.log").read_text().splitlines() if "Validated" in line]
    assert [line.split(":")[0].split(" (")[0] for line in lines] == ["Validated at step 1/2", "Validated at step 2/2"]
    assert "val/bits_per_sample" in lines[1]
    assert "Validated" not in console.getvalue() and "Step " not in console.getvalue()


def test_model_summary_of_a_mixed_precision_run_sizes_float32_weights_without_a_warning(recwarn, capsys):
    # bf16-mixed is the default on a GPU, where Lightning's summary warned at every start that it knows no size
    # for it; its weights are float32.
    module = WaveNetModule(**TINY_MODULE)
    fit(
        module, sine_batch(module.receptive_field), max_steps=1, limit_val_batches=0, precision="bf16-mixed",
        enable_model_summary=True, callbacks=[ModelSummaryWithoutFlops()],
    )  # fmt: skip
    assert not [warning for warning in recwarn if "model summary" in str(warning.message)]
    megabytes = sum(p.numel() for p in module.parameters()) * 4 / 1e6
    assert f"Total estimated model params size (MB): {megabytes:.3f}" in capsys.readouterr().out


def test_progress_bar_shows_metrics_without_the_loggers_version(tmp_path):
    # Lightning adds the logger's version, for W&B the end of its run id ("v_num: 24do"): noise beside the losses.
    module = WaveNetModule(**TINY_MODULE)
    bar = StepProgressBar()
    trainer = fit(
        module, sine_batch(module.receptive_field), max_steps=1, log_every_n_steps=1, limit_val_batches=0,
        enable_progress_bar=True, callbacks=[bar], logger=CSVLogger(tmp_path, name="", version="offline-run-24do"),
    )  # fmt: skip
    shown = bar.get_metrics(trainer, module)
    assert "train/loss" in shown and "v_num" not in shown, shown
