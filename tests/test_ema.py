"""EMA of the weights: the update rule, validation on the average, checkpoints and resuming."""

import logging
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, TensorDataset

from tests.test_module import TINY, fit, sine_batch
from wavenet import WaveNetModule
from wavenet.callbacks import InterruptCheckpoint
from wavenet.ema import EMA, EMA_STATE_KEY


def test_update_rule_with_warm_up():
    module = WaveNetModule(**TINY)
    ema = EMA(decay=0.9)
    ema.on_fit_start(SimpleNamespace(global_step=0), module)
    weight = module.model.head[-1].weight
    expected = weight.detach().clone()
    for step in range(1, 30):
        with torch.no_grad():
            weight.add_(1.0)
        ema.on_train_batch_end(SimpleNamespace(global_step=step), module)
        decay = min(0.9, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * weight.detach()
    torch.testing.assert_close(ema.averaged["model.head.3.weight"], expected)


def test_with_accumulated_gradients_the_average_follows_optimiser_steps_not_batches():
    L.seed_everything(0)
    module = WaveNetModule(**TINY, lr=1e-2, warmup_steps=1, decay="constant")
    ema = EMA(decay=0.9)
    stepped: list[torch.Tensor] = []  # the weights after each optimiser step

    class Record(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            stepped.append(None)  # filled in after the step, at the end of the batch

        def on_train_batch_end(self, trainer, pl_module, *args):
            if stepped and stepped[-1] is None:
                stepped[-1] = pl_module.model.head[-1].weight.detach().clone()

    initial = module.model.head[-1].weight.detach().clone()
    batch = sine_batch(module.receptive_field)
    loader = DataLoader(TensorDataset(*batch), batch_size=len(batch[0]) // 4)  # 4 batches an epoch
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, max_steps=4, accumulate_grad_batches=2,
                        callbacks=[Record(), ema])  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == len(stepped) == 4
    assert ema.updates == 4  # one per optimiser step, not one per batch (8)
    expected = initial
    for update, weight in enumerate(stepped, start=1):
        decay = min(0.9, (1 + update) / (10 + update))
        expected = decay * expected + (1 - decay) * weight
    torch.testing.assert_close(ema.averaged["model.head.3.weight"], expected)


def test_validation_uses_the_average_and_training_weights_survive():
    L.seed_everything(0)
    module = WaveNetModule(**TINY, lr=1e-2, warmup_steps=1, decay="constant")
    ema = EMA(decay=0.5)
    batch = sine_batch(module.receptive_field)
    trainer = fit(module, batch, callbacks=[ema], max_steps=20, val_check_interval=20)
    training_weights = {k: v.clone() for k, v in module.state_dict().items()}
    val_loss = trainer.callback_metrics["val/loss"].item()
    averaged_model = WaveNetModule(**TINY)
    averaged_model.load_state_dict(ema.averaged)
    with torch.no_grad():
        assert averaged_model._nll(batch).item() == pytest.approx(val_loss, rel=1e-5)
        assert module._nll(batch).item() != pytest.approx(val_loss, rel=1e-3)
    for name, value in module.state_dict().items():
        assert torch.equal(value, training_weights[name])


def test_checkpoint_holds_both_and_resume_restores_the_average(tmp_path):
    L.seed_everything(0)
    module = WaveNetModule(**TINY, lr=1e-2, warmup_steps=1, decay="constant")
    batch = sine_batch(module.receptive_field)
    trainer = fit(module, batch, callbacks=[EMA(decay=0.9)], max_steps=10, val_check_interval=10)
    path = tmp_path / "resume.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    averaged = checkpoint[EMA_STATE_KEY]
    assert set(averaged) == set(checkpoint["state_dict"])
    assert not torch.equal(averaged["model.head.3.weight"], checkpoint["state_dict"]["model.head.3.weight"])

    resumed_ema = EMA(decay=0.9)
    seen = {}

    class Peek(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["updates"] = resumed_ema.updates
            seen["weight"] = resumed_ema.averaged["model.head.3.weight"].clone()

    fit(WaveNetModule(**TINY), batch, ckpt_path=str(path), callbacks=[resumed_ema, Peek()], max_steps=12, val_check_interval=12)
    assert seen["updates"] == 10
    torch.testing.assert_close(seen["weight"], averaged["model.head.3.weight"])


def test_a_stop_during_validation_saves_and_keeps_the_training_weights(tmp_path):
    L.seed_everything(0)
    module = WaveNetModule(**TINY, lr=1e-2, warmup_steps=1, decay="constant")
    training_weights = {}

    class StopInValidation(L.Callback):
        """Records the weights as validation starts (before the EMA swaps them), then stops as Ctrl-C does."""

        def on_validation_start(self, trainer, pl_module):
            training_weights.update({k: v.clone() for k, v in pl_module.state_dict().items()})

        def on_validation_batch_end(self, trainer, *args):
            if not trainer.sanity_checking:
                raise SIGTERMException

    # The checkpointing callback first: its on_exception saves before the EMA's can swap anything back.
    callbacks = [InterruptCheckpoint(str(tmp_path)), StopInValidation(), EMA(decay=0.5)]
    with pytest.raises(SIGTERMException):
        fit(module, sine_batch(module.receptive_field), callbacks=callbacks, max_steps=20, val_check_interval=10)
    saved = torch.load(tmp_path / "interrupted.ckpt", weights_only=False)
    assert saved["global_step"] == 10
    for name, value in module.state_dict().items():
        assert torch.equal(saved["state_dict"][name], training_weights[name]), name
        assert torch.equal(value, training_weights[name]), name
    assert not torch.equal(saved[EMA_STATE_KEY]["model.head.3.weight"], training_weights["model.head.3.weight"])


def test_resuming_a_checkpoint_without_an_average_says_it_starts_anew(tmp_path, caplog):
    L.seed_everything(0)
    module = WaveNetModule(**TINY, lr=1e-2, warmup_steps=1, decay="constant")
    batch = sine_batch(module.receptive_field)
    trainer = fit(module, batch, max_steps=4, val_check_interval=4)
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    ema = EMA(decay=0.9)
    with caplog.at_level(logging.WARNING, logger="wavenet.ema"):  # a log line: the run's log file keeps it
        fit(WaveNetModule(**TINY), batch, ckpt_path=str(tmp_path / "plain.ckpt"), callbacks=[ema], max_steps=6,
            val_check_interval=6)  # fmt: skip
    assert any("has no EMA weights" in record.getMessage() for record in caplog.records)
    assert ema.updates == 2  # counted from the resumed step


def test_bad_decay():
    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.0)
