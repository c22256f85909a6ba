"""`train.py`'s task: build model, data, loggers and trainer from the composed config, then fit."""

from __future__ import annotations

import json
import logging
import netrc
import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.multiprocessing import ProcessRaisedException

from wavenet.checkpoint import EMA_STATE_KEY, latest_resumable, read_checkpoint
from wavenet.config import instantiate_checked, instantiate_group, print_config_tree
from wavenet.ema import EMA
from wavenet.errors import UserError, is_integer, user_error_message
from wavenet.launch import RankStopped, StopsBeforeTraining, ddp_job, quiet_lightning
from wavenet.module import check_resumable, check_starting_point, init_from_checkpoint
from wavenet.process import stop_signal
from wavenet.tasks.train_settings import check_settings

log = logging.getLogger(__name__)

quiet_lightning()

WANDB_SERVER = "https://api.wandb.ai"  # W&B's own default, when WANDB_BASE_URL does not name another


def auto_precision(accelerator: str) -> str:
    """bf16-mixed where training will run on a GPU that has bf16 (Ampere and later), else full fp32."""
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


def wandb_logged_in() -> bool:
    """Whether W&B has credentials on this machine, looked up without touching the network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", WANDB_SERVER)).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_reachable(timeout: float = 3.0) -> bool:
    """Whether the W&B server accepts a connection within `timeout` seconds."""
    url = urlparse(os.environ.get("WANDB_BASE_URL", WANDB_SERVER))
    address = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
    answered = threading.Event()

    def connect() -> None:
        try:
            with socket.create_connection(address, timeout=timeout):
                answered.set()
        except OSError:
            pass

    # In a thread that is not waited for beyond `timeout`: the name lookup has no time-out of its own.
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return answered.is_set()


def wandb_offline(setting: bool | str) -> bool:
    """What `logger.wandb.offline` (true, false or auto) means here: whether W&B logs offline.

    auto follows WANDB_MODE where it is set (online or disabled: not offline, so that Lightning leaves the
    variable alone). Otherwise it is online only when logged in and the server answers within seconds, so
    that a run never waits for a login prompt or a network time-out.
    """
    if setting not in (True, False, "auto"):
        raise UserError(f"logger.wandb.offline must be true, false or auto, got {setting!r}")
    mode = os.environ.get("WANDB_MODE", "").lower()
    forced_online = (setting is False and mode != "disabled") or (setting == "auto" and mode in ("online", "run"))
    if forced_online and not wandb_logged_in():
        # W&B would ask for a key at a terminal, and wait; without one it raises.
        asked = "logger.wandb.offline=false" if setting is False else f"WANDB_MODE={mode}"
        raise UserError(
            f"{asked}, but W&B has no login here: run `wandb login`, or set WANDB_API_KEY (or log offline: "
            "logger.wandb.offline=true)"
        )
    if setting != "auto":
        return bool(setting)
    if mode in ("offline", "dryrun"):
        return True
    if mode in ("online", "run", "disabled"):
        return False
    if not wandb_logged_in():
        return True
    if not wandb_reachable():
        server = os.environ.get("WANDB_BASE_URL", WANDB_SERVER)
        log.warning("W&B: %s does not answer, logging offline (upload later with `wandb sync`)", server)
        return True
    return False


def wandb_run_names(output_dir: Path, ckpt_path: str | None = None) -> tuple[str, str | None]:
    """W&B's name and group for the run of this job, after its run folder: `<time>` for a single run, in a group of
    its own name; under multirun `<sweep time>/<job>`, grouped as `<sweep time>`, so that a sweep's runs are told
    apart and seen together. A single run resumed from a checkpoint of another run joins that run's group: a job
    preempted and resumed again and again is one group, not unrelated runs.
    """
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        resumed = None if ckpt_path is None else _group_resumed(Path(ckpt_path).expanduser())
        return output_dir.name, resumed or output_dir.name
    sweep = Path(hydra_cfg.sweep.dir).name
    return f"{sweep}/{output_dir.name}", sweep


def _group_resumed(ckpt_path: Path) -> str | None:
    """The W&B group of the run that saved `ckpt_path` (in `<run>/checkpoints/`), as `wandb_run_names` gave it: the
    group the run was given, its sweep's, or that of the run it resumed in turn, back to the first of the chain
    (each run's `.hydra/config.yaml` records its `ckpt_path`); None for a checkpoint outside a run folder.

    A folder to resume from (a requeued job's `ckpt_path`) is a run folder, taken as its checkpoints are, or the
    folder of a chain's runs, whose name is the group of every run of it, the first (with no checkpoint yet)
    included.
    """
    group, seen, resumed = None, set(), ckpt_path
    while True:
        if resumed.is_dir() and not _is_run_folder(resumed):
            return resumed.name
        folder = resumed if resumed.is_dir() else resumed.parent.parent
        if folder in seen or not _is_run_folder(folder):
            return group
        seen.add(folder)
        if (folder.parent / "multirun.yaml").is_file():  # a job of a sweep, whose group is the sweep's
            return folder.parent.name
        group = folder.name
        try:
            config = OmegaConf.load(folder / ".hydra" / "config.yaml")
            given = OmegaConf.select(config, "logger.wandb.group")
            resumed = config.get("ckpt_path")
        except Exception:  # noqa: BLE001 (a config edited by hand, or half-written: the chain ends here)
            return group
        # Saved before `auto` is resolved: a group found there is one the command gave.
        if given is not None and given != "auto":
            return str(given)
        if resumed is None:
            return group
        resumed = Path(str(resumed)).expanduser()


def _is_run_folder(folder: Path) -> bool:
    return (folder / ".hydra" / "config.yaml").is_file()


def resolve_auto_settings(cfg: DictConfig) -> None:
    """Replaces the `auto` values Lightning and W&B do not understand by what they mean on this machine."""
    with open_dict(cfg):
        if cfg.trainer.get("precision") == "auto":
            cfg.trainer.precision = auto_precision(str(cfg.trainer.get("accelerator", "auto")))
        wandb_cfg = (cfg.get("logger") or {}).get("wandb")
        if wandb_cfg is None:
            return
        name, group = wandb_run_names(Path(cfg.paths.output_dir), cfg.get("ckpt_path"))
        if wandb_cfg.get("name") == "auto":
            wandb_cfg.name = name
        if wandb_cfg.get("group") == "auto":
            wandb_cfg.group = group
        setting = wandb_cfg.get("offline", False)
        wandb_cfg.offline = wandb_offline(setting)
        # Lightning sets WANDB_MODE itself for an offline run only; otherwise W&B obeys it and keeps nothing.
        if not wandb_cfg.offline and os.environ.get("WANDB_MODE", "").lower() == "disabled":
            log.warning(
                "W&B: WANDB_MODE=disabled, so logger=wandb records nothing (unset it, or set "
                "logger.wandb.offline=true, to keep the run)"
            )
        if wandb_cfg.offline and wandb_cfg.get("log_model"):
            # Lightning refuses to log artifacts offline.
            if setting is True:
                raise UserError(
                    "logger.wandb.log_model uploads checkpoints, which needs W&B online, but "
                    "logger.wandb.offline=true: set one of them to false"
                )
            log.warning("W&B is offline: checkpoints stay in the run folder and are not logged as artifacts")
            wandb_cfg.log_model = False


@rank_zero_only  # under trainer=ddp every rank runs this script
def _warn_of_settings_that_waste_the_run(cfg: DictConfig) -> None:
    trainer, warmup = cfg.trainer, cfg.model.get("warmup_steps")
    if trainer.get("fast_dev_run"):  # a check that everything runs, of a batch or a few: no schedule to waste
        return
    max_steps = trainer.get("max_steps")
    if is_integer(warmup) and max_steps != -1 and warmup >= max_steps:
        log.warning(
            "model.warmup_steps=%d is not below trainer.max_steps=%d: the learning rate rises for the whole run, "
            "and never decays",
            warmup,
            max_steps,
        )


# TensorBoard's HPARAMS table shows each run's latest value of these scalars beside its settings.
_HPARAMS_TABLE_METRICS = ("val/bits_per_sample", "val/loss", "train/loss")


def _log_config(loggers: list, cfg: DictConfig) -> None:
    """Logs the whole composed config, resolved, as each logger's hyperparameters (W&B's run config, CSV's and
    TensorBoard's hparams.yaml; Lightning adds the module's at the top level when fit starts), and fills
    TensorBoard's HPARAMS table, which Lightning leaves empty with `default_hp_metric: false`. Rank zero only."""
    config = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        # Lightning 2.6 hands wandb.init anonymous=None, which W&B (0.19 on) warns of in every run.
        if isinstance(logger, WandbLogger) and getattr(logger, "_wandb_init", {}).get("anonymous", False) is None:
            del logger._wandb_init["anonymous"]
        logger.log_hyperparams(config)
        if isinstance(logger, TensorBoardLogger) and rank_zero_only.rank == 0:
            from torch.utils.tensorboard.summary import hparams  # loads TensorBoard: here, where it is used

            names = sorted({cfg.get("optimized_metric"), *_HPARAMS_TABLE_METRICS} - {None})
            writer = logger.experiment._get_file_writer()
            # The table's metric values are not these zeros but the scalars' own, which the run logs. The session's
            # end, which says "success", is written as the run ends.
            experiment, session_start, _ = hparams(_table_values(config), dict.fromkeys(names, 0.0))
            writer.add_summary(experiment)
            writer.add_summary(session_start)
            end_session_as_it_ends(logger)


def end_session_as_it_ends(logger: TensorBoardLogger) -> None:
    """Has `logger` end its HPARAMS session as Lightning ends the logger, with the run's status ("success" or
    "failed": a run stopped by Ctrl-C or SIGTERM too), before it closes its event file: the table's Status column
    said "success" for every run."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    finalize = logger.finalize

    def end_session_and_finalize(status: str) -> None:
        logger.finalize = finalize  # once: a second call only closes
        if logger._experiment is not None:  # None: it never wrote an event file
            ended = api_pb2.Status.Value("STATUS_SUCCESS" if status == "success" else "STATUS_FAILURE")
            content = plugin_data_pb2.HParamsPluginData(
                session_end_info=plugin_data_pb2.SessionEndInfo(status=ended), version=metadata.PLUGIN_DATA_VERSION
            )
            data = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString())
            tagged = Summary.Value(tag=metadata.SESSION_END_INFO_TAG, metadata=SummaryMetadata(plugin_data=data))
            logger.experiment._get_file_writer().add_summary(Summary(value=[tagged]))
        finalize(status)

    logger.finalize = end_session_and_finalize


def _table_values(config: dict, prefix: str = "") -> dict[str, int | float | str]:
    """`config` flattened to the dotted keys of command-line overrides, each value a number or a string; without
    Hydra's `_target_`s, which name classes, not settings. Booleans and nulls are the strings an override writes,
    `true`, `false` and `null`: torch's `hparams` makes a bool the number 1 or 0 (it asks whether it is an int
    first) and leaves a None out of the table."""
    values = {}
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if isinstance(value, dict):
            values |= _table_values(value, f"{prefix}{key}.")
        elif value is None or isinstance(value, bool):
            values[f"{prefix}{key}"] = json.dumps(value)
        else:
            values[f"{prefix}{key}"] = value if isinstance(value, (int, float, str)) else str(value)
    return values


@contextmanager
def _held_records() -> Iterator[None]:
    """Holds the records that the root logger's handlers (the console's, the run's log file's) get within it, and
    hands them on after it, unless it raised: a refused run logs none, and its folder holds nothing of its own."""
    held: list[tuple[logging.Handler, logging.LogRecord]] = []
    holds = []
    for handler in logging.getLogger().handlers:

        def hold(record: logging.LogRecord, handler: logging.Handler = handler) -> bool:
            held.append((handler, record))
            return False

        handler.addFilter(hold)
        holds.append((handler, hold))
    try:
        yield
    finally:
        for handler, hold in holds:
            handler.removeFilter(hold)
    for handler, record in held:
        handler.handle(record)


def _resume_path_in(folder: Path) -> Path | None:
    """The checkpoint that `ckpt_path=<folder>` resumes from: the furthest on under it; None for the first run of a
    chain, whose folder holds none yet (`check_resume_folder` refused any other folder without checkpoints)."""
    found = latest_resumable(folder)
    if found is None:
        log.info("ckpt_path=%s holds no checkpoint yet: this run starts from step 0", folder)
        return None
    path, step = found
    log.info("ckpt_path=%s: resuming from %s (step %d), the furthest on of its checkpoints", folder, path, step)
    return path


def _stopped_by_ctrl_c(trainer: L.Trainer) -> bool:
    return any(getattr(callback, "stopped_by_ctrl_c", False) for callback in trainer.callbacks)


def run(cfg: DictConfig) -> float | None:
    """Trains as the config says and returns `cfg.optimized_metric` (for sweepers), if it was logged.

    A SIGTERM ends the run with status 143: from the first step of training on, once that step is done (see
    `wavenet.callbacks.InterruptCheckpoint`); before, where it finds it (preparing the data, say). A SIGHUP (the
    terminal hung up) does the same, with status 129 (see `wavenet.process.stop_on_hangup`).
    """
    # Before anything is written to the run folder: a refused setting leaves nothing to clean up.
    check_settings(cfg)
    try:
        with StopsBeforeTraining():
            return _train(cfg)
    except SIGTERMException:
        # Stopped outside `fit` (which ends with 143 itself, having said so): building the model, or train=false.
        log.info("Stopped by %s: run the same command again", stop_signal().name)
        raise SystemExit(128 + stop_signal()) from None


def _train(cfg: DictConfig) -> float | None:
    resolve_auto_settings(cfg)
    # Every part of the run is built before anything is written or logged, so that a setting they refuse leaves
    # the run folder as Hydra made it, for `discard_refused_run` to take away: the lines they log (which checkpoint
    # a folder gave, a schedule that changes on resuming) wait until all are built; the seed is said below.
    with _held_records():
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        module = instantiate_checked(cfg.model)
        ckpt_path = cfg.get("ckpt_path")
        if ckpt_path is not None and Path(str(ckpt_path)).expanduser().is_dir():
            ckpt_path = _resume_path_in(Path(str(ckpt_path)).expanduser())
        if ckpt_path is not None:
            ckpt_path = str(Path(str(ckpt_path)).expanduser())
            # Before the data is prepared: a wrong path or another network is found in a second, not after hours.
            max_steps = cfg.trainer.get("max_steps", -1) if cfg.train else -1  # train=false trains nothing
            check_resumable(Path(ckpt_path), module.hparams, max_steps=max_steps)
        init_from = cfg.get("init_from")
        if init_from is not None:
            init_from = Path(str(init_from)).expanduser()
            if ckpt_path is None:
                check_starting_point(init_from, module.hparams)
        datamodule = instantiate_checked(cfg.data, receptive_field=module.receptive_field)
        loggers = instantiate_group(cfg.get("logger"))  # W&B's run starts when it is first logged to, not here
        callbacks = instantiate_group(cfg.get("callbacks"))
        settings = {}
        if "enable_checkpointing" not in cfg.trainer and not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            # Without ours (callbacks=none), Lightning would checkpoint into the first logger's folder.
            settings["enable_checkpointing"] = False
        # It logs the devices it found before it checks the debugging settings (fast_dev_run, limit_*_batches).
        trainer: L.Trainer = instantiate_checked(cfg.trainer, callbacks=callbacks, logger=loggers or False, **settings)
    if init_from is not None and ckpt_path is None:  # loaded here, as it logs which weights it takes: after refusals
        init_from_checkpoint(module, init_from)
    elif init_from is not None:
        # A requeued fine-tuning job's command keeps its init_from: the run it resumes started from it already.
        log.info("init_from is not used: ckpt_path=%s resumes a run, weights and all", ckpt_path)
    rank_zero_info(f"Seed set to {cfg.seed}")
    print_config_tree(cfg, save_to=Path(cfg.paths.output_dir) / "config_tree.log")
    _warn_of_settings_that_waste_the_run(cfg)
    finished = False
    try:
        if cfg.train:  # train=false opens no W&B run and writes no logs
            _log_config(loggers, cfg)
        if ckpt_path is not None and not any(isinstance(callback, EMA) for callback in callbacks):
            if EMA_STATE_KEY in read_checkpoint(Path(ckpt_path), map_location="cpu", mmap=True):
                log.warning("ckpt_path=%s holds EMA weights, which this run drops: it has no callbacks.ema", ckpt_path)
        if trainer.is_global_zero:  # under trainer=ddp every rank runs this script
            log.info("Run folder: %s", cfg.paths.output_dir)
            log.info(
                "WaveNet: %s parameters, receptive field %d samples (%.0f ms)",
                f"{sum(p.numel() for p in module.parameters()):,}",
                module.receptive_field,
                1000 * module.receptive_field / module.hparams.sample_rate,
            )
        if cfg.train:
            try:
                with ddp_job():
                    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
            except ProcessRaisedException as error:
                if str(error).rstrip().endswith(RankStopped.__name__):  # stopped, its checkpoint saved
                    ctrl_c = getattr(trainer.strategy.launcher, "stopped_by_ctrl_c", False)
                    raise SystemExit(128 + (signal.SIGINT if ctrl_c else stop_signal())) from None
                # A spawned rank (trainer=ddp_sim) stopped by a UserError: torch passes on its traceback as text.
                message = user_error_message(str(error))
                if message is None:
                    raise
                raise UserError(message) from None
            except SIGTERMException:
                # Lightning's exits with status 0: a preempted job must not look finished to its scheduler.
                raise SystemExit(128 + (signal.SIGINT if _stopped_by_ctrl_c(trainer) else stop_signal())) from None
            except SystemExit as stop:
                # Lightning ends a run stopped at once by Ctrl-C (under DDP, or the second Ctrl-C) with status 1.
                if stop.code == 1 and _stopped_by_ctrl_c(trainer):
                    raise SystemExit(128 + signal.SIGINT) from None
                raise
            checkpoints = trainer.checkpoint_callback
            if trainer.is_global_zero and checkpoints is not None:
                if checkpoints.best_model_path:
                    # Without a monitored metric (Lightning's own checkpointing: +trainer.enable_checkpointing=true
                    # with callbacks=none) it is the latest.
                    kind = "Best checkpoint" if checkpoints.monitor else "Checkpoint"
                    log.info("%s: %s", kind, checkpoints.best_model_path)
                if checkpoints.last_model_path:
                    log.info("Last checkpoint, to resume from: %s", checkpoints.last_model_path)
        else:
            # A check of the data too, and a way to prepare a corpus on a CPU machine before the GPU job.
            datamodule.prepare_data()
            datamodule.setup("fit")
            log.info("train=false: config, model and data are ready; nothing trained")
        finished = True
    finally:
        if any(isinstance(logger, WandbLogger) for logger in loggers):
            import wandb

            # Each multirun job must end its own W&B run, or the next job logs into it. A run that stopped (an
            # error, Ctrl-C, preemption) shows as failed, as its exit status says.
            wandb.finish(exit_code=0 if finished else 1)

    name = cfg.get("optimized_metric")
    metric = trainer.callback_metrics.get(name)
    if metric is None and name and cfg.train and HydraConfig.get().mode == RunMode.MULTIRUN:
        logged = ", ".join(sorted(key for key in trainer.callback_metrics if "/" in key))
        log.warning("optimized_metric=%s was not logged, so this job has no value (logged: %s)", name, logged or "none")
    return None if metric is None else float(metric)
