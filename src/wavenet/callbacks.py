"""Lightning callbacks that the configs in conf/callbacks/ build."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Rich progress bar for training bounded by `max_steps` (max_epochs = -1): "Epoch 3", not "Epoch 3/-2"."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs == -1:
            return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"
        return super()._get_train_description(current_epoch)
