"""`train.py`'s task: build model, data, loggers and trainer from the composed config, then fit."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from wavenet.config import check_required, instantiate_group, print_config_tree

log = logging.getLogger(__name__)

# `lightning` gives itself a console handler and also propagates to the root logger, which Hydra has set up
# (console and the run's log file): without this every Lightning message would print twice.
logging.getLogger("lightning").handlers.clear()


def auto_precision(accelerator: str) -> str:
    """bf16-mixed where training will run on a GPU that has bf16 (Ampere and later), else full fp32."""
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


def wandb_logged_in() -> bool:
    """Whether W&B has credentials on this machine, looked up without touching the network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _resolve_auto_settings(cfg: DictConfig) -> None:
    """Replaces the `auto` values Lightning and W&B do not understand by what they mean on this machine."""
    with open_dict(cfg):
        if cfg.trainer.get("precision") == "auto":
            cfg.trainer.precision = auto_precision(str(cfg.trainer.get("accelerator", "auto")))
        wandb_cfg = (cfg.get("logger") or {}).get("wandb")
        if wandb_cfg is not None and wandb_cfg.get("offline") == "auto":
            # Offline rather than a hanging login prompt or a network time-out.
            wandb_cfg.offline = not wandb_logged_in()


def run(cfg: DictConfig) -> float | None:
    """Trains as the config says and returns `cfg.optimized_metric` (for sweepers), if it was logged."""
    check_required(cfg)
    _resolve_auto_settings(cfg)
    output_dir = Path(cfg.paths.output_dir)
    print_config_tree(cfg, save_to=output_dir / "config_tree.log")

    L.seed_everything(cfg.seed, workers=True)
    module = instantiate(cfg.model)
    datamodule = instantiate(cfg.data, receptive_field=module.receptive_field)
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=instantiate_group(cfg.get("callbacks")), logger=loggers or False
    )
    log.info(
        "WaveNet: %s parameters, receptive field %d samples (%.0f ms)",
        f"{sum(p.numel() for p in module.parameters()):,}",
        module.receptive_field,
        1000 * module.receptive_field / module.hparams.sample_rate,
    )
    try:
        if cfg.train:
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
            if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.best_model_path:
                log.info("Best checkpoint: %s", trainer.checkpoint_callback.best_model_path)
    finally:
        if any(type(logger).__name__ == "WandbLogger" for logger in loggers):
            import wandb

            # Each multirun job must end its own W&B run, or the next job logs into it.
            wandb.finish()

    metric = trainer.callback_metrics.get(cfg.get("optimized_metric"))
    return None if metric is None else float(metric)
