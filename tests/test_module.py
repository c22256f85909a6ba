"""The LightningModule: the loss learns, checkpoints load without Hydra, the schedule has its shape."""

import logging
import math

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from wavenet import WaveNetModule, mu_law_decode, mu_law_encode

TINY = dict(layers=6, stacks=2, residual_channels=16, dilation_channels=16, skip_channels=32)


def sine_batch(receptive_field: int, chunk: int = 256, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable batch: mu-law classes of sines of a few frequencies, as (inputs, targets shifted by one)."""
    t = torch.arange(receptive_field + chunk, dtype=torch.float32)
    freqs = torch.tensor([0.01, 0.023, 0.041, 0.07])[:batch, None]
    windows = mu_law_encode(0.8 * torch.sin(2 * math.pi * freqs * t))
    return windows[:, :-1], windows[:, 1:]


def fit(
    module: WaveNetModule, batch, ckpt_path: str | None = None, val_batch_size: int | None = None, **trainer_kwargs
) -> L.Trainer:
    """Trains on the one batch, validating on it too (in batches of `val_batch_size`, default all of it);
    `trainer_kwargs` override the quiet CPU defaults."""
    loader = DataLoader(TensorDataset(*batch), batch_size=len(batch[0]))
    val_loader = DataLoader(TensorDataset(*batch), batch_size=val_batch_size or len(batch[0]))
    settings = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        check_val_every_n_epoch=None,  # with one batch an epoch, count validation intervals in steps
    )
    trainer = L.Trainer(**{**settings, **trainer_kwargs})
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=val_loader, ckpt_path=ckpt_path)
    return trainer


def test_tiny_model_overfits_one_batch():
    L.seed_everything(0)
    module = WaveNetModule(**TINY, lr=1e-2, warmup_steps=10, decay="constant")
    batch = sine_batch(module.receptive_field)
    with torch.no_grad():
        before = module._nll(batch).item()
    fit(module, batch, max_steps=60, limit_val_batches=1, val_check_interval=60)
    after = module._nll(batch).item()
    assert before > 5.0  # about log(256) = 5.5 nats for an untrained model
    assert after < 0.25 * before, f"loss fell only from {before:.3f} to {after:.3f}"
    assert math.isclose(module.trainer.callback_metrics["val/bits_per_sample"].item(), after / math.log(2), rel_tol=1e-4)


def test_loss_ignores_targets_without_full_receptive_field():
    module = WaveNetModule(**TINY)
    inputs, targets = sine_batch(module.receptive_field)
    scrambled = targets.clone()
    scrambled[:, : module.receptive_field - 1] = 0  # targets whose context reaches before the window
    assert module._nll((inputs, targets)) == module._nll((inputs, scrambled))
    scrambled[:, module.receptive_field - 1] = 0
    assert module._nll((inputs, targets)) != module._nll((inputs, scrambled))


@pytest.mark.parametrize(
    "mistake, error, message",
    [
        (lambda i, t: (mu_law_decode(i), mu_law_decode(t)), TypeError, "inputs of torch.float32: encode audio with"),
        (lambda i, t: (i, t.float()), TypeError, "targets of torch.float32"),
        (lambda i, t: (i, t[:, 1:]), ValueError, r"got inputs \(4, \d+\) and targets \(4, \d+\)"),
        (lambda i, t: (i[:, None], t), ValueError, r"got inputs \(4, 1, \d+\)"),
        (lambda i, t: (i, i), ValueError, "targets equal to the inputs"),
        (lambda i, t: (i, t + 200), ValueError, r"classes must be in \[0, 256\), got values from \d+ to \d+"),
        (lambda i, t: (i[:, :10], t[:, :10]), ValueError, r"T=10, and T must be at least the receptive field \(15\)"),
        (lambda i, t: i, TypeError, r"must be \(inputs, targets\).*got a tensor \(4, \d+\)"),
    ],
)
def test_a_batch_that_is_no_shifted_mu_law_classes_is_one_error_saying_so(mistake, error, message):
    # The user's own DataLoader: these failed deep in torch ("Expected target size [4, 66], got [4, 65]"), or, for
    # targets not shifted, trained the model to copy its input.
    module = WaveNetModule(**TINY)
    with pytest.raises(error, match=message):
        module._nll(mistake(*sine_batch(module.receptive_field)), check_values=True)


def test_a_window_of_silence_is_no_mistake_and_integer_classes_of_any_width_train():
    module = WaveNetModule(**TINY)
    silence = torch.full((2, module.receptive_field + 8), module.model.silence_class)
    assert module._nll((silence, silence), check_values=True) > 0
    inputs, targets = sine_batch(module.receptive_field)
    expected = module._nll((inputs, targets))
    for dtype in (torch.uint8, torch.int16, torch.int32):  # uint8: as mu-law classes are stored
        assert module._nll((inputs.to(dtype), targets.to(dtype)), check_values=True) == expected
    fit(module, (inputs.to(torch.uint8), targets.to(torch.uint8)), max_steps=1, limit_val_batches=1)
    with pytest.raises(ValueError, match="targets equal to the inputs"):  # the steps check their first batch
        fit(WaveNetModule(**TINY), (inputs, inputs), max_steps=1, limit_val_batches=0)


def test_checkpoint_loads_without_hydra(tmp_path):
    module = WaveNetModule(**TINY, sample_rate=22050, lr=3e-3)
    batch = sine_batch(module.receptive_field)
    trainer = fit(module, batch, max_steps=2, limit_val_batches=1)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = WaveNetModule.load_from_checkpoint(path, map_location="cpu")
    assert loaded.hparams.sample_rate == 22050 and loaded.hparams.lr == 3e-3
    module.eval(), loaded.eval()
    torch.testing.assert_close(loaded(batch[0]), module(batch[0]))


def test_numpy_hyperparameters_are_saved_as_python_numbers_so_the_checkpoint_loads(tmp_path):
    # A sweep's values come from numpy (np.arange, np.logspace); torch.load(weights_only=True) refuses their types.
    module = WaveNetModule(
        **{**TINY, "layers": np.int64(6)},
        sample_rate=np.int64(22050),
        lr=np.logspace(-3, -2, 3)[1],
        warmup_steps=np.int64(5),
        min_lr_ratio=np.float32(0.5),
        betas=np.array([0.9, 0.99]),
    )
    trainer = fit(module, sine_batch(module.receptive_field), max_steps=1, limit_val_batches=0)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    for loaded in (WaveNetModule.load_from_checkpoint(path), WaveNetModule.load_for_generation(path)):
        assert loaded.hparams.layers == 6 and type(loaded.hparams.layers) is int
        assert loaded.hparams.sample_rate == 22050 and type(loaded.hparams.sample_rate) is int
        assert loaded.hparams.lr == pytest.approx(10**-2.5) and type(loaded.hparams.lr) is float
        assert loaded.hparams.betas == [0.9, 0.99]


def test_trainer_test_and_predict_take_the_batches_fit_does():
    module = WaveNetModule(**TINY)
    inputs, targets = sine_batch(module.receptive_field)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (tested,) = trainer.test(module, loader, verbose=False)
    with torch.no_grad():
        loss = module._nll((inputs, targets)).item()
    assert tested["test/loss"] == pytest.approx(loss, rel=1e-5)
    assert tested["test/bits_per_sample"] == pytest.approx(loss / math.log(2), rel=1e-5)
    for batches in (loader, DataLoader(inputs, batch_size=2)):  # (inputs, targets), or the inputs alone
        logits = torch.cat(trainer.predict(module, batches))
        torch.testing.assert_close(logits, module.eval()(inputs))


def test_learning_rate_warms_up_then_decays():
    module = WaveNetModule(**TINY, lr=1e-2, warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    fit(module, sine_batch(module.receptive_field), max_steps=50, limit_val_batches=0, callbacks=[Record()])
    assert lrs[0] == pytest.approx(1e-3)  # first of 10 warm-up steps
    assert max(lrs) == pytest.approx(1e-2)
    assert lrs.index(max(lrs)) == 9  # the last warm-up step reaches the peak
    assert lrs[-1] == pytest.approx(1e-3, rel=0.05)  # cosine ends at min_lr_ratio * lr
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


@pytest.mark.parametrize(
    "setting, message",
    [
        (dict(decay="linear"), "decay"),
        (dict(lr=-1e-3), "lr must be positive"),
        (dict(lr=float("inf")), "lr must be a finite number"),
        (dict(lr="abc"), "lr must be a finite number"),
        (dict(weight_decay=-1.0), "weight_decay must not be negative"),
        (dict(warmup_steps=-1), "warmup_steps must not be negative"),
        # Below 0 the cosine schedule drives the learning rate negative: training would ascend the loss.
        (dict(min_lr_ratio=-1.0), "min_lr_ratio must be between 0 and 1"),
        (dict(betas=(2.0, 0.9)), "betas must be two numbers"),
        (dict(betas=(0.9,)), "betas must be two numbers"),
        # Saved for generation, which refused the checkpoint: after the training, not before it.
        (dict(sample_rate=16000.0), "sample_rate must be a positive integer"),
        (dict(sample_rate="16k"), "sample_rate must be a positive integer"),
        (dict(sample_rate=0), "sample_rate must be a positive integer"),
    ],
)
def test_optimiser_settings_that_would_train_on_garbage_are_rejected(setting, message):
    with pytest.raises(ValueError, match=message):
        WaveNetModule(**TINY, **setting)


def test_a_run_resumes_only_from_a_checkpoint_of_the_same_network_with_steps_left(tmp_path, caplog):
    from wavenet.errors import UserError
    from wavenet.module import check_resumable

    module = WaveNetModule(**TINY)
    path = tmp_path / "tiny.ckpt"
    saved = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 30}
    torch.save({**saved, "optimizer_states": [{"state": {}}]}, path)
    with caplog.at_level(logging.INFO, logger="wavenet.module"):
        check_resumable(path, {**module.hparams, "betas": list(module.hparams.betas)}, max_steps=31)
        assert not caplog.records  # a list for the saved tuple is the same setting
        # The optimiser resumes as saved, the schedule's shape as configured now.
        check_resumable(path, {**module.hparams, "lr": 5e-4, "warmup_steps": 0}, max_steps=31)
    warning, schedule = caplog.records
    assert "model.lr=0.0005 (resumed as 0.001)" in warning.message and "warmup" not in warning.message
    assert schedule.getMessage() == "The learning-rate schedule changes from step 30 on: model.warmup_steps=0 (was 100)"
    torch.save(saved, tmp_path / "weights.ckpt")
    with pytest.raises(UserError, match="holds the weights only"):
        check_resumable(tmp_path / "weights.ckpt", module.hparams)
    with pytest.raises(UserError, match="is at step 30 and trainer.max_steps=30: nothing left to train"):
        check_resumable(path, module.hparams, max_steps=30)
    with pytest.raises(UserError, match=r"model.residual_channels=64 \(the checkpoint's: 16\)"):
        check_resumable(path, {**module.hparams, "residual_channels": 64})
    with pytest.raises(UserError, match=r"data.sample_rate=8000 \(the checkpoint's: 16000\)"):
        check_resumable(path, {**module.hparams, "sample_rate": 8000})
    with pytest.raises(UserError, match="checkpoint not found"):
        check_resumable(tmp_path / "missing.ckpt", module.hparams)


def test_a_resume_that_stretches_the_decay_says_how_the_rate_jumps_where_it_resumes(tmp_path, caplog):
    # A run that ended its cosine decay at step 30, resumed with trainer.max_steps=60: from 1e-4 back up to 6.9e-4.
    from wavenet.module import check_resumable, lr_factor

    module = WaveNetModule(**TINY, warmup_steps=10)
    hparams = dict(module.hparams)
    ended = 1e-3 * lr_factor(hparams, 30, 30)
    scheduler = {"base_lrs": [1e-3, 1e-3], "_last_lr": [ended, ended], "last_epoch": 30}
    path = tmp_path / "ended.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams, "global_step": 30,
                "optimizer_states": [{"state": {}}], "lr_schedulers": [scheduler]}, path)  # fmt: skip
    # Stopped mid-warm-up (step 5 of 10) and resumed as it was: nothing to say.
    warming = {**scheduler, "_last_lr": [1e-3 * lr_factor(hparams, 60, 5)] * 2, "last_epoch": 5}
    torch.save({**torch.load(path, weights_only=False), "global_step": 5, "lr_schedulers": [warming]},
               tmp_path / "warming.ckpt")  # fmt: skip
    with caplog.at_level(logging.INFO, logger="wavenet.module"):
        check_resumable(tmp_path / "warming.ckpt", hparams, max_steps=60)
        check_resumable(path, hparams, max_steps=60)
        check_resumable(path, {**hparams, "decay": "constant"}, max_steps=60)
    stretched, constant = (record.getMessage() for record in caplog.records)
    assert stretched == (
        "The learning-rate schedule changes from step 30 on, where the rate goes from 0.0001 (the checkpoint's) to "
        "0.000689: trainer.max_steps=60 moves the end of its decay"
    )
    assert constant.startswith("The learning-rate schedule changes from step 30 on, where the rate goes from 0.0001 "
                               "(the checkpoint's) to 0.001: model.decay=constant (was cosine)")  # fmt: skip


def test_a_run_starts_from_a_checkpoints_ema_weights_of_the_same_network(tmp_path):
    from tests.conftest import save_checkpoint
    from wavenet.ema import EMA_STATE_KEY
    from wavenet.errors import UserError
    from wavenet.module import init_from_checkpoint

    trained = WaveNetModule(**TINY)
    averaged = {name: torch.randn_like(value) for name, value in trained.state_dict().items()}
    path = save_checkpoint(trained, tmp_path / "trained.ckpt", **{EMA_STATE_KEY: averaged})
    fresh = WaveNetModule(**TINY, lr=5e-4)  # another optimiser's settings: taken as given
    init_from_checkpoint(fresh, path)
    torch.testing.assert_close(fresh.state_dict(), averaged, rtol=0, atol=0)
    with pytest.raises(UserError, match=r"holds another network: model.residual_channels=4 \(the checkpoint's: 16\)"):
        init_from_checkpoint(WaveNetModule(**{**TINY, "residual_channels": 4}), path)


class _ValidatedSteps(L.Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.steps.append(trainer.global_step)


@pytest.mark.parametrize("length", [dict(max_steps=5), dict(max_steps=-1, max_epochs=5)])
def test_the_last_step_is_validated_between_two_validations(length):
    # Lightning validates every val_check_interval steps only: the steps after the last were in no checkpoint.
    module, validated = WaveNetModule(**TINY), _ValidatedSteps()
    fit(module, sine_batch(module.receptive_field), val_check_interval=3, callbacks=[validated], **length)
    assert validated.steps == [3, 5]  # one batch an epoch: 5 epochs are 5 steps


def test_a_run_whose_loss_diverges_stops_with_one_error_line(tmp_path, data_dir):
    from tests.conftest import BUILTIN_SMALL, compose_config
    from tests.conftest import TINY as TINY_RUN
    from wavenet.errors import UserError
    from wavenet.tasks.train import run

    overrides = [*TINY_RUN, *BUILTIN_SMALL, f"paths.data_dir={data_dir}", "model.lr=1e30", "model.warmup_steps=0",
                 "trainer.max_steps=20", "trainer.val_check_interval=20"]  # fmt: skip
    with pytest.raises(UserError, match=r"^train/loss is nan at step \d+: training diverged; lower model.lr"):
        run(compose_config("train", overrides, tmp_path))
