"""`train.py`'s task: build model, data, loggers and trainer from the composed config, then fit."""

from __future__ import annotations

import logging
import netrc
import os
import signal
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from wavenet.config import check_required, instantiate_checked, instantiate_group, print_config_tree
from wavenet.errors import UserError
from wavenet.launch import ddp_job, quiet_lightning
from wavenet.module import check_resumable

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
    if setting != "auto":
        return bool(setting)
    mode = os.environ.get("WANDB_MODE", "").lower()
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


def wandb_run_names(output_dir: Path) -> tuple[str, str | None]:
    """W&B's name and group for the run of this job, after its run folder: `<time>` for a single run; under
    multirun `<sweep time>/<job>`, grouped as `<sweep time>`, so that a sweep's runs are told apart and seen together.
    """
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return output_dir.name, None
    sweep = Path(hydra_cfg.sweep.dir).name
    return f"{sweep}/{output_dir.name}", sweep


def resolve_auto_settings(cfg: DictConfig) -> None:
    """Replaces the `auto` values Lightning and W&B do not understand by what they mean on this machine."""
    with open_dict(cfg):
        if cfg.trainer.get("precision") == "auto":
            cfg.trainer.precision = auto_precision(str(cfg.trainer.get("accelerator", "auto")))
        wandb_cfg = (cfg.get("logger") or {}).get("wandb")
        if wandb_cfg is None:
            return
        name, group = wandb_run_names(Path(cfg.paths.output_dir))
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


# What Lightning's fit(ckpt_path=...) takes besides a path: it finds those checkpoints itself.
_LIGHTNING_CHECKPOINT_NAMES = ("last", "best", "hpc", "registry")


def _check_settings(cfg: DictConfig) -> None:
    """Raises `UserError` for top-level and trainer settings that would fail only later, naming the key."""
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise UserError(f"seed must be an integer, got {cfg.seed!r}")
    if not isinstance(cfg.train, bool):
        raise UserError(f"train must be true or false, got {cfg.train!r}")
    max_steps = cfg.trainer.get("max_steps")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or not (max_steps > 0 or max_steps == -1):
        raise UserError(f"trainer.max_steps must be a positive integer (or -1: no limit), got {max_steps!r}")
    interval = cfg.trainer.get("val_check_interval")
    if isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval <= 0:
        raise UserError(f"trainer.val_check_interval must be positive (steps, or a fraction of an epoch): {interval}")
    accelerator = str(cfg.trainer.get("accelerator"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(
            f"trainer.accelerator={accelerator} but no CUDA GPU is available here; use trainer=cpu, or trainer=default "
            "(the GPU when there is one)"
        )


def run(cfg: DictConfig) -> float | None:
    """Trains as the config says and returns `cfg.optimized_metric` (for sweepers), if it was logged."""
    check_required(cfg)
    resolve_auto_settings(cfg)
    output_dir = Path(cfg.paths.output_dir)
    print_config_tree(cfg, save_to=output_dir / "config_tree.log")

    _check_settings(cfg)
    L.seed_everything(cfg.seed, workers=True)
    module = instantiate_checked(cfg.model)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and ckpt_path not in _LIGHTNING_CHECKPOINT_NAMES:
        ckpt_path = str(Path(str(ckpt_path)).expanduser())
        # Before the data is prepared: a wrong path or another network is found in a second, not after hours.
        check_resumable(Path(ckpt_path), module.hparams, max_steps=cfg.trainer.get("max_steps", -1))
    datamodule = instantiate_checked(cfg.data, receptive_field=module.receptive_field)
    loggers = instantiate_group(cfg.get("logger"))
    try:
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                # Lightning 2.6 hands wandb.init anonymous=None, which W&B (0.19 on) warns of in every run.
                if getattr(logger, "_wandb_init", {}).get("anonymous", False) is None:
                    del logger._wandb_init["anonymous"]
                # The whole composed config, resolved, as the run's config (log_hyperparams is rank-zero only).
                # Lightning adds the module's hyperparameters at the top level when fit starts.
                logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        trainer: L.Trainer = instantiate_checked(
            cfg.trainer, callbacks=instantiate_group(cfg.get("callbacks")), logger=loggers or False
        )
        if trainer.is_global_zero:  # under trainer=ddp every rank runs this script
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
            except SIGTERMException:
                # Lightning's exits with status 0: a preempted job must not look finished to its scheduler.
                ctrl_c = any(getattr(callback, "stopped_by_ctrl_c", False) for callback in trainer.callbacks)
                raise SystemExit(128 + (signal.SIGINT if ctrl_c else signal.SIGTERM)) from None
            checkpoints = trainer.checkpoint_callback
            if trainer.is_global_zero and checkpoints is not None and checkpoints.best_model_path:
                log.info("Best checkpoint: %s", checkpoints.best_model_path)
        else:
            # A check of the data too, and a way to prepare a corpus on a CPU machine before the GPU job.
            datamodule.prepare_data()
            datamodule.setup("fit")
            log.info("train=false: config, model and data are ready; nothing trained")
    finally:
        if any(isinstance(logger, WandbLogger) for logger in loggers):
            import wandb

            # Each multirun job must end its own W&B run, or the next job logs into it.
            wandb.finish()

    metric = trainer.callback_metrics.get(cfg.get("optimized_metric"))
    return None if metric is None else float(metric)
