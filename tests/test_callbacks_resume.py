"""What a resumed run shows and reports: its progress bar, progress lines and best checkpoint."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from tests.conftest import BUILTIN_SMALL, TINY, run_script
from tests.test_module import TINY as TINY_MODULE
from tests.test_module import fit, sine_batch
from wavenet import WaveNetModule
from wavenet.callbacks import ModelCheckpoint, StepProgressBar


class RecordingBar(StepProgressBar):
    """Records (count, total) of the training bar after every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.shown: list[tuple[int, int]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        self.shown.append((int(self.train_progress_bar.completed), int(self.train_progress_bar.total)))


def test_progress_bar_counts_global_steps_to_max_steps_over_epochs_and_resumes(tmp_path):
    # One batch an epoch: Lightning's bar starts over at every epoch ("1/1" throughout).
    module = WaveNetModule(**TINY_MODULE)
    batch = sine_batch(module.receptive_field)
    bar = RecordingBar()
    settings = dict(max_epochs=-1, limit_val_batches=0, enable_progress_bar=True)
    trainer = fit(module, batch, max_steps=2, callbacks=[bar], **settings)
    trainer.save_checkpoint(tmp_path / "step2.ckpt")
    resumed = RecordingBar()
    fit(WaveNetModule(**TINY_MODULE), batch, ckpt_path=str(tmp_path / "step2.ckpt"), max_steps=4, callbacks=[resumed],
        **settings)  # fmt: skip
    assert bar.shown == [(1, 2), (2, 2)]
    assert resumed.shown == [(3, 4), (4, 4)]


def checkpoint_state(dirpath: Path) -> dict[str, Any]:
    """ModelCheckpoint's state as Lightning saves it, after a validation at step 10 in `dirpath`."""
    best = str(dirpath / "step0000010-bps8.0196.ckpt")
    return {
        "monitor": "val/loss", "best_model_score": torch.tensor(5.56), "best_model_path": best,
        "current_score": torch.tensor(5.56), "dirpath": str(dirpath), "best_k_models": {best: torch.tensor(5.56)},
        "kth_best_model_path": best, "kth_value": torch.tensor(5.56), "last_model_path": str(dirpath / "last.ckpt"),
    }  # fmt: skip


def test_checkpoint_state_is_restored_only_for_its_own_run_folder(tmp_path):
    callback = ModelCheckpoint(dirpath=str(tmp_path / "resumed"), monitor="val/loss")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Lightning's "The dirpath has changed" at every resume
        callback.load_state_dict(checkpoint_state(tmp_path / "first"))
    assert callback.best_model_path == "" and callback.best_model_score is None
    assert callback.best_k_models == {} and callback.last_model_path == ""
    # Resumed into its own folder: its best file there is kept or replaced by score, as in one run.
    state = checkpoint_state(tmp_path / "resumed")
    callback.load_state_dict(state)
    assert callback.best_model_path == state["best_model_path"]
    assert callback.best_k_models == state["best_k_models"] and callback.last_model_path == state["last_model_path"]


@pytest.mark.slow
def test_a_resumed_run_shows_its_steps_and_no_best_checkpoint_of_another_run(tmp_path, data_dir):
    common = [*TINY, *BUILTIN_SMALL, "trainer.val_check_interval=5", f"paths.data_dir={data_dir}"]
    common = [override for override in common if not override.startswith("callbacks.progress_bar")]
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    result = run_script("train.py", *common, "trainer.max_steps=10", f"hydra.run.dir={first}")
    assert result.returncode == 0, result.stderr[-2000:]
    # Resumed at step 10 to 14, validating at 14 alone (the last step), not at 15.
    result = run_script(
        "train.py", *common, "trainer.max_steps=14", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}",
        "callbacks.progress_bar.log_every_seconds=0", f"hydra.run.dir={resumed}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    # Where the output is no terminal, lines stand for the bar, which rich drew once, at the end, cut at 80 columns.
    assert not [line for line in result.stdout.splitlines() if line.startswith("Epoch ")], result.stdout[-2000:]
    # Nor a blank line where it would have been, after the last line of training.
    lines = result.stdout.splitlines()
    assert lines[lines.index(next(line for line in lines if "Trainer.fit` stopped" in line)) + 1].strip()
    log = (resumed / "train.log").read_text()
    steps = [line.split(" - ", 1)[1].split(":")[0].split(" (")[0] for line in log.splitlines() if " - Step " in line]
    assert steps == ["Step 11/14", "Step 12/14", "Step 13/14", "Step 14/14"]
    # Its own file, whatever the first run's best scored; a further resume carries it, not the first run's.
    best = resumed / "checkpoints" / "step0000014-bps"
    assert f"Best checkpoint: {best}" in log and "Best checkpoint: " + str(first) not in log
    last = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    (state,) = [state for key, state in last["callbacks"].items() if key.startswith("ModelCheckpoint")]
    assert state["best_model_path"].startswith(str(best))


def test_a_stop_says_how_to_resume_and_a_requeued_job_that_the_same_command_does(tmp_path, monkeypatch):
    from tests.conftest import compose_config
    from wavenet.callbacks import InterruptCheckpoint

    monkeypatch.setattr("sys.argv", ["train.py"])
    chain, elsewhere = tmp_path / "chain", tmp_path / "runs"
    chain.mkdir()
    stopped = chain / "2026-02-03_08-00-00" / "checkpoints"
    run_dir = f"hydra.run.dir={chain}/${{now:%H-%M-%S}}"
    compose_config("train", ["model=tiny", f"ckpt_path={chain}", "init_from=base.ckpt", run_dir], stopped.parent)
    # Its ckpt_path folder holds the checkpoint, and it finds it there again: the same command resumes, its run
    # folder in the chain's again (as typed: resolved, it would be this run's).
    assert InterruptCheckpoint(str(stopped)).resume_advice == (
        f"resume with the same command, whose ckpt_path={chain} finds this checkpoint: python train.py model=tiny "
        f"ckpt_path={chain} init_from=base.ckpt '{run_dir}'"
    )
    # A run folder resumed by a run written elsewhere: the same command would resume from it again.
    compose_config("train", ["model=tiny", f"ckpt_path={chain}"], elsewhere)
    assert InterruptCheckpoint(str(elsewhere / "checkpoints")).resume_advice == (
        f"resume with ckpt_path={elsewhere}/checkpoints/interrupted.ckpt, as in: python train.py model=tiny "
        f"ckpt_path={elsewhere}/checkpoints/interrupted.ckpt"
    )
