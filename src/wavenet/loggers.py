"""Lightning loggers that the configs in conf/logger/ build."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's `TensorBoardLogger`, writing the `epoch` scalar once per step.

    Lightning adds `epoch` to every set of metrics it hands the loggers, and a step that validates hands them two:
    the training step's, then the validation's. TensorBoard drew two points of `epoch` at every validation's step.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch_written: tuple[int | None, float] | None = None  # (step, epoch) of the latest point

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if "epoch" in metrics:
            if (step, metrics["epoch"]) == self._epoch_written:
                metrics = {name: value for name, value in metrics.items() if name != "epoch"}
            else:
                self._epoch_written = (step, metrics["epoch"])
        super().log_metrics(metrics, step)
