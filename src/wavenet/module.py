"""The LightningModule: WaveNet trained by negative log-likelihood of the next mu-law sample."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from wavenet.checkpoint import load_problem, load_wavenet, read_checkpoint, read_for_generation
from wavenet.errors import UserError
from wavenet.hyperparameters import as_primitives, check_training
from wavenet.models.wavenet import WaveNet

log = logging.getLogger(__name__)

Batch = tuple[Tensor, Tensor]


class WaveNetModule(L.LightningModule):
    """WaveNet with its loss, metrics and optimiser.

    Every argument is a primitive and is saved with `save_hyperparameters()`, so
    `WaveNetModule.load_from_checkpoint(path)` rebuilds the model without Hydra or the training config.

    Batches, from the data modules or your own DataLoader: `(inputs, targets)`, (B, T) integer mu-law classes each
    (`mu_law_encode`; int64, or uint8 as they are stored), the targets the inputs shifted by one step (`window[:-1]`
    and `window[1:]` of T + 1 samples), T at least `receptive_field`. The loss (`train/loss`, `val/loss`, in nats per
    sample; `val/bits_per_sample`) scores the last T - receptive_field + 1 targets, those whose whole receptive
    field is real audio.

    Args:
        layers, stacks, residual_channels, dilation_channels, skip_channels, kernel_size,
            quantization_channels, bias: the network's shape; see `WaveNet`.
        sample_rate: Rate of the audio the model is trained on; kept so generation needs only the checkpoint.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW's decoupled weight decay (biases, norms and embeddings are exempt).
        betas: AdamW's moment decay rates.
        warmup_steps: Steps of linear warm-up from 0 to `lr`.
        decay: Learning-rate shape after warm-up: "cosine" (to `min_lr_ratio * lr` at the last step)
            or "constant".
        min_lr_ratio: Final learning rate as a fraction of `lr`, for cosine decay.
        compile: Whether `configure_model` compiles the network with `torch.compile` when a Trainer runs
            it; a module built without a Trainer (generation) never compiles.
        checkpoint_activations: Whether training recomputes each residual layer's activations in
            backward instead of storing them; see `WaveNet`.
    """

    def __init__(
        self,
        layers: int,
        stacks: int,
        residual_channels: int,
        dilation_channels: int,
        skip_channels: int,
        kernel_size: int = 2,
        quantization_channels: int = 256,
        bias: bool = True,
        sample_rate: int = 16000,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 100,
        decay: str = "cosine",
        min_lr_ratio: float = 0.1,
        compile: bool = False,  # shadows the builtin, for the config key's sake: model.compile
        checkpoint_activations: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # As Python's types: a numpy scalar (an np.logspace of learning rates) is a number like any other, but a
        # checkpoint holding one is refused by torch.load(weights_only=True): by load_from_checkpoint,
        # load_for_generation and generate.py.
        self.hparams.update(as_primitives(self.hparams))
        check_training(self.hparams)
        sample_rate = self.hparams.sample_rate
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate < 1:
            # Checked here, not in check_training: train.py checks data.sample_rate, where its value is set. Kept for
            # generation, which refused a checkpoint whose rate is not (16000.0 too), once the training was done.
            raise ValueError(f"sample_rate must be a positive integer (Hz), got {sample_rate!r}")
        self.model = WaveNet(
            layers=layers,
            stacks=stacks,
            residual_channels=residual_channels,
            dilation_channels=dilation_channels,
            skip_channels=skip_channels,
            kernel_size=kernel_size,
            quantization_channels=quantization_channels,
            bias=bias,
            checkpoint_activations=checkpoint_activations,
        )
        self._compiled = False
        self._last_step = math.inf  # set when training starts

    @classmethod
    def load_for_generation(
        cls, path: str | Path, use_ema: bool | str = "auto", device: str | torch.device = "cpu"
    ) -> WaveNetModule:
        """The trained module of checkpoint `path`, in eval mode, with its EMA weights where `use_ema` asks.

        `load_from_checkpoint` gives the training weights; the average of the EMA callback, also in the
        checkpoint, usually generates better audio: `generate.py` takes it in the same way.

        Args:
            path: A checkpoint written by train.py (`last.ckpt`, a best one, or weights only).
            use_ema: `"auto"` takes the EMA weights where the checkpoint has them, `True` insists on them,
                `False` takes the training weights.
            device: Where the module goes.

        Raises:
            UserError: Naming the checkpoint, if it cannot be read (see `read_checkpoint`), does not fit this
                version's module, or has no EMA weights and `use_ema` is True.
            ValueError: If `use_ema` is not "auto", True or False.
        """
        path = Path(path).expanduser()
        hparams, weights = read_for_generation(path, use_ema, device)
        try:
            # Rebuilt from the primitive hyperparameters, as load_from_checkpoint would, without a second read.
            module = cls(**hparams)
            module.load_state_dict(weights)
        except (TypeError, ValueError, RuntimeError) as error:
            # Hyperparameters or weights that do not fit this version's WaveNetModule.
            raise UserError(f"cannot load the model of checkpoint {path}: {load_problem(error)}") from error
        return module.to(device).eval()

    @property
    def receptive_field(self) -> int:
        """Number of input samples that an output depends on; see `WaveNet.receptive_field`."""
        return self.model.receptive_field

    def forward(self, x: Tensor) -> Tensor:
        """(B, T) int64 mu-law classes -> (B, Q, T) logits, output t predicting sample t + 1; see `WaveNet.forward`."""
        return self.model(x)

    def configure_model(self) -> None:
        """Compiles the network in place if `compile` is set and a Trainer runs the module; once.

        Lightning calls this on every rank at the start of fit, validate, test and predict, before the
        strategy moves and wraps the module. `nn.Module.compile` leaves the network the same object with
        the same parameters: state_dict keys and checkpoints are unchanged, the EMA callback swaps weights
        in place under the compiled code, and generation, which runs the layers one by one, never enters it.
        """
        # `load_from_checkpoint` calls this hook too, with no Trainer attached: a module loaded for
        # generation or in a notebook stays eager (and compiles if a Trainer runs it later).
        if not self.hparams.compile or self._compiled or self._trainer is None:
            return
        # Shapes: dynamo's default, static first and dynamic in a dimension once it changes. Training and
        # validation windows have the same length (receptive field + chunk) and training batches one size
        # (drop_last), so training is one static graph. Validation is a second one whatever the shapes (no
        # grad, no backward), and its smaller last batch a third, with the batch dynamic: compiled once per
        # run. dynamic=False would compile the same three, but one more for each new shape should shapes
        # ever vary; dynamic=True saves one graph but took twice as long to compile `small` (CPU, inductor).
        self.model.compile()
        self._compiled = True
        if self.trainer.is_global_zero:  # else the first step's silent minute looks like a hang
            log.info(
                "model.compile=true: the first training and validation steps compile the network (a minute or more)"
            )

    def _nll(self, batch: Batch, check_values: bool = False) -> Tensor:
        """Mean cross-entropy (nats/sample) over the targets that see a full receptive field of real input.

        Args:
            batch: (inputs, targets), (B, T) integer mu-law classes each, targets = inputs shifted by one step.
            check_values: Whether to check the classes too (one pass over them, and a GPU sync).
        """
        inputs, targets = self._checked(batch, check_values)
        logits = self.model(inputs, causal_pad=False)  # (B, Q, T - receptive_field + 1)
        return F.cross_entropy(logits.float(), targets[:, self.receptive_field - 1 :])

    def _checked(self, batch: Batch, check_values: bool) -> Batch:
        """The batch as int64 classes, after a TypeError or ValueError saying what is wrong with it. Batches come
        from the user's DataLoader, where a mistake failed deep in torch ("Expected target size [4, 66], got [4,
        65]", "expected scalar type Long but found Int"), or, for targets not shifted, trained the model to copy
        its input."""
        expected = "a batch must be (inputs, targets), (B, T) mu-law classes each, targets = inputs shifted by one step"
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(x, Tensor) for x in batch)):
            raise TypeError(f"{expected}; got {_describe(batch)}")
        inputs, targets = batch
        for name, x in (("inputs", inputs), ("targets", targets)):
            if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
                raise TypeError(f"{expected}; got {name} of {x.dtype}: encode audio with wavenet.mu_law_encode")
        if inputs.dim() != 2 or inputs.shape != targets.shape:
            raise ValueError(f"{expected}; got inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)}")
        if inputs.shape[1] < self.receptive_field:
            raise ValueError(
                f"{expected}; got T={inputs.shape[1]}, and T must be at least the receptive field "
                f"({self.receptive_field}): the loss scores the last T - {self.receptive_field - 1} targets"
            )
        if check_values:
            levels = self.model.quantization_channels
            low, high = min(inputs.min(), targets.min()).item(), max(inputs.max(), targets.max()).item()
            if low < 0 or high >= levels:
                raise ValueError(f"{expected}; classes must be in [0, {levels}), got values from {low} to {high}")
            # Equal unshifted but not shifted: a window of silence is both, and fine.
            if torch.equal(inputs, targets) and not torch.equal(inputs[:, 1:], targets[:, :-1]):
                raise ValueError(
                    f"{expected}; got targets equal to the inputs (inputs = window[:-1], targets = window[1:]): the "
                    "model sees each input, and would learn to copy it"
                )
        # int64 for the embedding and the loss: uint8, as mu-law classes are stored, is 8x less to move per batch.
        return inputs.long(), targets.long()

    def training_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        # The classes are checked in each epoch's first batch only: a pass over them, and a GPU sync.
        loss = self._nll(batch, check_values=batch_idx == 0)
        # This rank's loss, for the progress bar at every step; the loggers get the mean over ranks, from
        # on_train_batch_end, which knows which steps they get.
        self.log("train/loss", loss, prog_bar=True, logger=False)
        # Lightning hands "loss" on divided by accumulate_grad_batches; "nll" is the loss itself.
        return {"loss": loss, "nll": loss.detach()}

    def on_train_start(self) -> None:
        # The run's last step: max_steps, or where its epochs (max_epochs) end; inf for a run without an end.
        self._last_step = self.trainer.estimated_stepping_batches

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
        trainer = self.trainer
        if trainer.global_step >= self._last_step:
            # Lightning validates every val_check_interval steps only: a last step between two would be in no
            # checkpoint (last.ckpt included) and the run's final metric, a sweep's value, would come from before
            # it. Asked to stop, it validates this step, and its checkpoint callbacks save after that.
            trainer.should_stop = True
        # Lightning passes the step's metrics to the loggers after this hook, at the steps where this says so (the
        # last one, stopped above, included). Only there is the loss averaged over the ranks: one all-reduce every
        # log_every_n_steps, where `self.log(..., sync_dist=True)` would all-reduce at every step, once per name.
        if not trainer._logger_connector.should_update_logs:
            return
        loss = trainer.strategy.reduce(outputs["nll"], reduce_op="mean")
        self.log("train/loss", loss)
        self.log("train/bits_per_sample", loss / math.log(2))
        # A NaN or infinite loss is the end of the run: its gradients make every weight NaN, and every step after
        # trains on nothing. Checked on the mean, which is finite only where every rank's loss is.
        if torch.isfinite(loss):
            return
        raise UserError(
            f"train/loss is {loss.item()} at step {trainer.global_step}: training diverged; lower model.lr (or "
            "raise model.warmup_steps) and start again, or resume from a checkpoint saved before it"
        )

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate("val", batch, batch_idx)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        """`trainer.test`: `test/loss` and `test/bits_per_sample`, as validation's."""
        self._evaluate("test", batch, batch_idx)

    def _evaluate(self, stage: str, batch: Batch, batch_idx: int) -> None:
        loss = self._nll(batch, check_values=batch_idx == 0)
        # Every validation batch has the same number of targets, so the mean of batch means is exact.
        self.log(f"{stage}/loss", loss, sync_dist=True)
        self.log(f"{stage}/bits_per_sample", loss / math.log(2), prog_bar=True, sync_dist=True)

    def predict_step(self, batch: Tensor | Batch, batch_idx: int) -> Tensor:
        """`trainer.predict`: (B, Q, T) logits, as `forward`'s, of a batch of (B, T) mu-law classes, or of the inputs
        of an (inputs, targets) batch such as training's, so that its loaders serve here too."""
        return self(batch[0] if isinstance(batch, (tuple, list)) else batch)

    def configure_optimizers(self):  # noqa: ANN201 (Lightning's union of return types)
        hp = self.hparams
        decayed, exempt = [], []
        for name, parameter in self.named_parameters():
            # Weight decay on biases and the embedding table only pulls them towards zero for no benefit.
            (decayed if parameter.ndim > 1 and "embedding" not in name else exempt).append(parameter)
        optimizer = torch.optim.AdamW(
            [
                # Named, so the LR monitor logs lr-AdamW/decayed and lr-AdamW/exempt rather than pg1, pg2.
                {"params": decayed, "weight_decay": hp.weight_decay, "name": "decayed"},
                {"params": exempt, "weight_decay": 0.0, "name": "exempt"},
            ],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps):  # trainer.max_steps=-1 and no max_epochs: a run without an end
            if hp.decay != "constant":
                raise UserError(
                    f"model.decay={hp.decay} decays over the whole run, and this one has no end (trainer.max_steps="
                    f"{self.trainer.max_steps}): set trainer.max_steps, or model.decay=constant"
                )
            total_steps = hp.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, hp, int(total_steps)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _describe(batch: object) -> str:
    """`a tuple of 3`, `a Tensor (4, 72)`, for an error about a batch of the wrong structure."""
    if isinstance(batch, Tensor):
        return f"a tensor {tuple(batch.shape)}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)}: " + ", ".join(type(x).__name__ for x in batch)
    return type(batch).__name__


def lr_factor(hparams: Mapping[str, Any], total_steps: int, step: int) -> float:
    """The learning rate at `step` of a run of `total_steps`, as a multiple of `hparams.lr`: a linear warm-up over
    `warmup_steps`, then constant or a cosine decay to `min_lr_ratio` at the end of the run."""
    total_steps = max(total_steps, 1)
    warmup_steps = min(hparams["warmup_steps"], total_steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if hparams["decay"] == "constant":
        return 1.0
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    min_ratio = hparams["min_lr_ratio"]
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# What the config a run resumes under must share with its checkpoint, by config key: the network's shape and
# what its classes mean (the optimiser's settings may change).
_SHAPE = ("layers", "stacks", "residual_channels", "dilation_channels", "skip_channels", "kernel_size", "bias")
_RESUMED_AS_SAVED = {
    **{name: f"model.{name}" for name in _SHAPE},
    "quantization_channels": "data.quantization_channels",
    "sample_rate": "data.sample_rate",
}


# Settings a resumed run keeps as saved: Lightning restores the optimiser's hyperparameters, and the schedule's
# base learning rate, from the checkpoint.
_OPTIMISER_SETTINGS = ("lr", "weight_decay", "betas")
# The schedule's shape is not saved (`LambdaLR` keeps no function): it is rebuilt from these and
# trainer.max_steps, so a resumed run follows a changed one from its resumed step (a longer run decays longer).
_SCHEDULE_SETTINGS = ("warmup_steps", "decay", "min_lr_ratio")


def check_resumable(path: Path, hparams: Mapping[str, Any], max_steps: int = -1) -> None:
    """Checks, before anything is prepared or trained, that `path` is a checkpoint a run of the module
    that `hparams` (the config's `model`) describe can resume from, with steps left before `max_steps`.
    Warns about optimiser settings that differ from the checkpoint's: Lightning restores the optimiser as it
    was, so those changes would not take effect. Changes to the schedule's shape do, and are logged.

    Raises:
        UserError: Saying why `path` is no checkpoint (see `read_checkpoint`) or holds no optimiser state
            (saved with weights only), naming each setting
            whose value differs from the checkpoint's (a resumed network cannot change shape, nor its
            audio its sample rate or mu-law levels), or if the checkpoint is at `max_steps` already.
    """
    checkpoint = read_checkpoint(path, map_location="cpu", mmap=True)
    saved = checkpoint["hyper_parameters"]
    differ = _network_settings_that_differ(hparams, saved)
    if differ:
        raise UserError(
            f"ckpt_path={path} was trained with other settings: {differ}; resume with its settings (e.g. its model= "
            "option)"
        )
    if not checkpoint.get("optimizer_states"):
        raise UserError(
            f"ckpt_path={path} holds the weights only (no optimiser state, as save_weights_only writes): it "
            "cannot resume training; generate.py reads it"
        )
    step = int(checkpoint.get("global_step", 0))
    if max_steps != -1 and step >= max_steps:
        raise UserError(
            f"ckpt_path={path} is at step {step} and trainer.max_steps={max_steps}: nothing left to train; "
            "raise trainer.max_steps"
        )
    ignored = [
        f"model.{name}={hparams.get(name)} (resumed as {saved.get(name)})"
        for name in _OPTIMISER_SETTINGS
        if name in saved and _as_saved(hparams.get(name)) != _as_saved(saved.get(name))
    ]
    if ignored:
        log.warning(
            "Resuming continues the checkpoint's optimiser, so these settings have no effect: %s", ", ".join(ignored)
        )
    reshaped = [
        f"model.{name}={hparams.get(name)} (was {saved.get(name)})"
        for name in _SCHEDULE_SETTINGS
        if name in saved and hparams.get(name) != saved.get(name)
    ]
    rates = _resumed_rates(checkpoint, hparams, max_steps)
    if rates is not None and not math.isclose(*rates, rel_tol=1e-3):
        # A raised max_steps stretches the decay: the rate jumps where the run resumes, a step in every curve.
        reshaped = reshaped or [f"trainer.max_steps={max_steps} moves the end of its decay"]
        log.info(
            "The learning-rate schedule changes from step %d on, where the rate goes from %.3g (the checkpoint's) "
            "to %.3g: %s",
            step,
            *rates,
            ", ".join(reshaped),
        )
    elif reshaped:
        log.info("The learning-rate schedule changes from step %d on: %s", step, ", ".join(reshaped))


def _resumed_rates(
    checkpoint: Mapping[str, Any], hparams: Mapping[str, Any], max_steps: int
) -> tuple[float, float] | None:
    """(the checkpoint's learning rate at its step, the resumed run's there), for runs that end at `max_steps`;
    None where that is not known (a run without an end, a checkpoint without the scheduler's state)."""
    schedulers = checkpoint.get("lr_schedulers") or [{}]
    state = schedulers[0]
    if max_steps == -1 or not {"base_lrs", "_last_lr", "last_epoch"} <= set(state):
        return None
    if any(hparams.get(name) is None for name in _SCHEDULE_SETTINGS):
        return None
    # Both at the checkpoint's step: the first resumed step runs at its rate (the optimiser's state restores it),
    # the schedule's rate follows from the next.
    return state["_last_lr"][0], state["base_lrs"][0] * lr_factor(hparams, max_steps, state["last_epoch"])


def _network_settings_that_differ(hparams: Mapping[str, Any], saved: Mapping[str, Any]) -> str:
    """`model.layers=4 (the checkpoint's: 6), ...` for each setting of the network or its audio that `hparams` (a
    config's) and `saved` (a checkpoint's) disagree on; "" where they agree."""
    return ", ".join(
        f"{key}={hparams.get(name)} (the checkpoint's: {saved.get(name)})"
        for name, key in _RESUMED_AS_SAVED.items()
        if hparams.get(name) != saved.get(name)
    )


def check_starting_point(path: Path, hparams: Mapping[str, Any]) -> None:
    """Checks, before anything is prepared or trained, that checkpoint `path` holds the network that `hparams` (the
    config's `model`) describe, for `init_from_checkpoint`.

    Raises:
        UserError: Saying why `path` is no checkpoint (see `read_checkpoint`), or naming each setting that differs.
    """
    _refuse_another_network(path, hparams, read_checkpoint(path, map_location="cpu", mmap=True)["hyper_parameters"])


def init_from_checkpoint(module: WaveNetModule, path: Path) -> None:
    """Loads the weights of checkpoint `path` (its EMA average where it holds one, as generation takes them) into
    `module`, for a run that starts from them with its own optimiser, schedule and steps: fine-tuning.

    Raises:
        UserError: As `check_starting_point`, or for weights that hold NaN.
    """
    network, saved = load_wavenet(path, use_ema="auto")  # the checkpoint's settings too: read once
    _refuse_another_network(path, module.hparams, saved)
    module.model.load_state_dict(network.state_dict())


def _refuse_another_network(path: Path, hparams: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
    differ = _network_settings_that_differ(hparams, saved)
    if differ:
        raise UserError(
            f"init_from={path} holds another network: {differ}; start from it with its settings (e.g. its model= "
            "option)"
        )


def _as_saved(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value
