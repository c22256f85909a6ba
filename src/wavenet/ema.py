"""Exponential moving average of the weights: validated with, checkpointed, and generated from."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from wavenet.checkpoint import EMA_STATE_KEY

log = logging.getLogger(__name__)


class EMA(L.Callback):
    """Keeps `ema = d * ema + (1 - d) * weights` after every optimiser step (not every batch: with
    `accumulate_grad_batches` the weights change once per step), in fp32.

    The decay warms up as `min(decay, (1 + n) / (10 + n))` after n updates, so short runs average over
    their own steps instead of staying near the initial weights. Validation runs on the averaged weights
    (so `val/loss` and the best checkpoint are those of the EMA model); the training weights are swapped
    back before anything is saved, and the average is stored under `ema_state_dict` in every checkpoint.

    Args:
        decay: Final decay per update; 0.9999 averages over about the last 10,000 steps.
        validate_with_ema: Whether validation uses the averaged weights.
    """

    def __init__(self, decay: float = 0.9999, validate_with_ema: bool = True) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.validate_with_ema = validate_with_ema
        self.updates = 0
        self.averaged: dict[str, Tensor] = {}
        self._training_weights: dict[str, Tensor] | None = None
        self._averaged_at_step = 0  # trainer.global_step of the last update

    def _float_state(self, module: L.LightningModule) -> dict[str, Tensor]:
        return {name: p for name, p in module.state_dict().items() if p.is_floating_point()}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.averaged:  # fresh run; a resumed one has it from the checkpoint already
            self.averaged = {k: v.detach().float().clone() for k, v in self._float_state(pl_module).items()}
        self.averaged = {k: v.to(pl_module.device) for k, v in self.averaged.items()}
        self._averaged_at_step = trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self._averaged_at_step:
            return  # a batch whose gradients were accumulated: the weights did not change
        self._averaged_at_step = trainer.global_step
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        current = self._float_state(pl_module)
        names = list(self.averaged)
        torch._foreach_lerp_(
            [self.averaged[k] for k in names], [current[k].float() for k in names], 1.0 - decay
        )

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.validate_with_ema and self.averaged and not trainer.sanity_checking:
            self._training_weights = {k: v.detach().clone() for k, v in self._float_state(pl_module).items()}
            pl_module.load_state_dict(self.averaged, strict=False)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_training_weights(pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # A stop inside validation (Ctrl-C, SIGTERM) skips on_validation_end.
        self._restore_training_weights(pl_module)

    def _restore_training_weights(self, pl_module: L.LightningModule) -> None:
        if self._training_weights is not None:
            pl_module.load_state_dict(self._training_weights, strict=False)
            self._training_weights = None

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._training_weights is not None:
            # Saved during validation (interrupted.ckpt, whichever callback's on_exception runs first): the module
            # holds the average, but the checkpoint must resume training from the training weights.
            checkpoint["state_dict"] |= {k: v.detach().clone() for k, v in self._training_weights.items()}
        checkpoint[EMA_STATE_KEY] = {k: v.detach().cpu() for k, v in self.averaged.items()}

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.averaged = {k: v.float() for k, v in checkpoint.get(EMA_STATE_KEY, {}).items()}
        if not self.averaged:
            # A log line, not a warning: the run's log file keeps it.
            rank_zero_only(log.warning)(
                "The checkpoint resumed from has no EMA weights (trained without callbacks.ema): the average starts "
                "from its weights, at this step"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates = state_dict["updates"]
