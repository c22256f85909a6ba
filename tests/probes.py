"""Callbacks that tests add to train.py runs (`+callbacks.probe._target_=tests.probes...`) to look inside ranks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L


class RankRecorder(L.Callback):
    """Writes `<out>/rank<r>.json`: a digest of every training window the rank trained on, its loss at every step,
    and a digest of its weights."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.windows: list[str] = []
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args: Any) -> None:
        inputs = batch[0]
        self.windows += [hashlib.sha1(window.cpu().numpy().tobytes()).hexdigest() for window in inputs]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        self.losses.append(outputs["loss"].item())  # the loss itself: no gradient accumulation in these runs

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        weights = hashlib.sha1()
        for name, value in sorted(pl_module.state_dict().items()):
            weights.update(name.encode() + value.detach().cpu().numpy().tobytes())
        self.out.mkdir(parents=True, exist_ok=True)
        record = {"windows": self.windows, "losses": self.losses, "weights": weights.hexdigest()}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
