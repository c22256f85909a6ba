"""Lightning callbacks that the configs in conf/callbacks/ build."""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import shlex
import signal
import sys
import threading
import time
import warnings
from collections import deque
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import LearningRateMonitor as LightningLearningRateMonitor
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_summary import ModelSummary, get_formatted_model_size, get_human_readable_count
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import OmegaConf
from rich import get_console
from rich.progress import TaskID
from rich.table import Table
from torch import Tensor
from torch.utils.data import Dataset
from torchaudio.transforms import MelSpectrogram

from wavenet.data.mulaw import mu_law_decode
from wavenet.errors import UserError
from wavenet.generation import generate
from wavenet.kernels.cpu_step import cpu_kernel_available
from wavenet.launch import leave_ranks_to_stop
from wavenet.process import carry_on_past_a_closed_stdout, log_to_files_only
from wavenet.signals import set_handler

log = logging.getLogger(__name__)

# Log-mel spectrograms as commonly drawn for 16-24 kHz speech and music: 64 ms windows, 16 ms hops at 16 kHz.
_N_FFT = 1024
_HOP = 256
_N_MELS = 80
_DYNAMIC_RANGE_DB = 80.0


class StepProgressBar(RichProgressBar):
    """Rich progress bar for training bounded by `max_steps` (max_epochs = -1): "Epoch 3", not "Epoch 3/-2".

    Such a run has one bar, over all its epochs, counting global steps to `max_steps` as the progress lines,
    the checkpoints' names and `trainer.max_steps` do (the loggers' `step` is Lightning's, one less: the index
    of the step's batch, from 0): a run resumed at step 20 with `trainer.max_steps=30` starts at 20/30, as
    Lightning's own bar starts a resumed epoch where it stopped.
    Lightning's counts the epoch's batches against the steps left to run (30/10 there), and starts over at
    every epoch.

    Where the output is no terminal (a batch job's log file, a pipe), a bar cannot redraw and rich shows it
    only at the end; there the progress is logged instead, as a line every `log_every_seconds` and after
    every validation, also into the run's log file. On a terminal the line after each validation goes to the
    log file alone: the log holds the run's metrics however it was started.

    Args:
        log_every_seconds: Seconds between progress lines where the output is no terminal.
    """

    def __init__(self, log_every_seconds: float = 60.0) -> None:
        super().__init__()
        self.log_every_seconds = log_every_seconds
        self._logged_at = 0.0
        self._started_at: float | None = None  # when this run's first step ended
        self._started_at_step = 0

    def _init_progress(self, trainer: L.Trainer) -> None:
        super()._init_progress(trainer)
        if self._console is not None:
            carry_on_past_a_closed_stdout(self._console)  # Lightning's reconfigure() replaced the console's state
        if self.progress is not None and self._logs_lines(trainer):
            # Where the lines stand for it, the bar is not drawn at the end either (rich's last frame, for files:
            # cut at 80 columns, and again at a stop).
            self.progress.live.transient = True

    def _stop_progress(self) -> None:
        console = None if self.progress is None else self.progress.console
        if console is None or console.is_interactive or not self.progress.live.transient:
            super()._stop_progress()
            return
        # rich ends the bar's last frame with a newline where the output is no terminal, also when it drew none:
        # a blank line in the log file.
        console.quiet, quiet = True, console.quiet
        try:
            super()._stop_progress()
        finally:
            console.quiet = quiet

    def _counts_steps(self) -> bool:
        return self.trainer.max_epochs == -1 and self.trainer.max_steps > 0

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs == -1:
            return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"
        return super()._get_train_description(current_epoch)

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._counts_steps() else super().total_train_batches

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.progress is None or self.train_progress_bar_id is None or not self._counts_steps():
            super().on_train_epoch_start(trainer, pl_module)
            return
        # Lightning's reset of the bar would empty it and restart its clock at every epoch.
        description = self._get_train_description(trainer.current_epoch)
        self.progress.update(self.train_progress_bar_id, description=description)
        self.refresh()

    def _update(self, progress_bar_id: TaskID | None, current: int, visible: bool = True, hard: bool = False) -> None:
        if progress_bar_id is not None and progress_bar_id == self.train_progress_bar_id and self._counts_steps():
            current = self.trainer.global_step  # Lightning passes the batch's index in its epoch
        super()._update(progress_bar_id, current, visible, hard)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version (a W&B run's id): the run folder names the run
        return metrics

    def _logs(self, trainer: L.Trainer) -> bool:
        return trainer.is_global_zero and not self.is_disabled

    def _logs_lines(self, trainer: L.Trainer) -> bool:
        """Whether progress is logged in lines, to the console too: where a bar cannot redraw."""
        return self._logs(trainer) and not get_console().is_terminal

    def _log_progress(
        self, trainer: L.Trainer, pl_module: L.LightningModule, event: str, on_console: bool = True
    ) -> None:
        metrics = self.get_metrics(trainer, pl_module)
        shown = ", ".join(
            f"{key} {_number(value)}" for key, value in metrics.items() if key.startswith(("train/", "val/"))
        )
        total = f"/{trainer.max_steps}" if trainer.max_steps > 0 else ""
        line = ("%s %d%s%s: %s", event, trainer.global_step, total, self._pace(trainer), shown)
        if on_console:
            log.info(*line)
            self._logged_at = time.monotonic()
        else:
            log_to_files_only(log, logging.INFO, *line)

    def _pace(self, trainer: L.Trainer) -> str:
        """` (2.41 steps/s, 3 min left)`: over this run's steps since its first (which waited for the loader's
        workers to start), validations included; "" before there are any."""
        if self._started_at is None:
            return ""
        steps, seconds = trainer.global_step - self._started_at_step, time.monotonic() - self._started_at
        if steps <= 0 or seconds <= 0:
            return ""
        rate = steps / seconds
        last = trainer.estimated_stepping_batches  # max_steps, or where max_epochs end; inf for neither
        left = f", {_duration((last - trainer.global_step) / rate)} left" if math.isfinite(last) else ""
        return f" ({rate:.3g} steps/s{left})"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._logged_at = time.monotonic()
        self._started_at = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        if self._started_at is None:  # a resumed run's pace counts its own steps
            self._started_at, self._started_at_step = time.monotonic(), trainer.global_step
        if self._logs_lines(trainer) and time.monotonic() - self._logged_at >= self.log_every_seconds:
            self._log_progress(trainer, pl_module, "Step")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._logs(trainer) and not trainer.sanity_checking:
            self._log_progress(trainer, pl_module, "Validated at step", on_console=self._logs_lines(trainer))


def _duration(seconds: float) -> str:
    """`45 s`, `12 min`, `3 h 05 min`: as precise as a time left to train needs to be."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60:02d} min"


def _number(value: object) -> str:
    """A metric as a progress line shows it: 3 decimals, kept when they are zeros (a loss of 5.000, not 5); a value
    that would read 0.000 (an overfitting run's loss) in 3 significant digits."""
    if not isinstance(value, float):
        return str(value)
    return f"{value:.3g}" if 0 < abs(value) < 0.0005 else f"{value:.3f}"


class ModelSummaryWithoutFlops(RichModelSummary):
    """Lightning's rich model summary without its FLOPs column and total, which read 0 here.

    Lightning counts FLOPs only in a forward pass of the module's `example_input_array`, run at every start
    (and compiled once more under `model.compile`); the count would be that of one window of an arbitrary
    length. `train/samples_per_sec` measures the speed that matters.

    The size of the parameters is that of their dtypes, also under `*-mixed` precision (float32 weights, as
    Lightning assumes after a warning at every start of a GPU's default bf16-mixed run).
    """

    def _summary(self, trainer: L.Trainer, pl_module: L.LightningModule) -> ModelSummary:
        return _StoredSizeSummary(pl_module, max_depth=self._max_depth)

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        columns = [(name, cells) for name, cells in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            justify = "left" if name in ("Name", "Type", "Mode") else "right"  # counts and sizes line up right
            table.add_column(name, justify=justify, style="dim" if name == " " else None, no_wrap=name == "Name")
        for row in zip(*(cells for _, cells in columns)):
            table.add_row(*row)
        totals = Table.grid(expand=True)
        totals.add_row(f"[bold]Trainable params[/]: {get_human_readable_count(trainable_parameters)}")
        frozen = total_parameters - trainable_parameters
        totals.add_row(f"[bold]Non-trainable params[/]: {get_human_readable_count(frozen)}")
        totals.add_row(f"[bold]Total params[/]: {get_human_readable_count(total_parameters)}")
        totals.add_row(f"[bold]Total estimated model params size (MB)[/]: {get_formatted_model_size(model_size)}")
        totals.add_row(f"[bold]Modules in train mode[/]: {total_training_modes['train']}")
        totals.add_row(f"[bold]Modules in eval mode[/]: {total_training_modes['eval']}")
        console = get_console()
        console.print(table)
        console.print(totals)


class _StoredSizeSummary(ModelSummary):
    """Lightning's model summary, its size in MB that of the parameters as stored (their dtypes)."""

    def __init__(self, model: L.LightningModule, max_depth: int = 1) -> None:
        with warnings.catch_warnings():
            # Lightning's table of bits per parameter has no entry for *-mixed; model_size does not use it.
            warnings.filterwarnings("ignore", message="Precision .* is not supported by the model summary")
            super().__init__(model, max_depth)

    @property
    def model_size(self) -> float:
        return sum(p.numel() * p.element_size() for p in self._model.parameters()) / 1e6


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's `ModelCheckpoint`, whose best checkpoint after a resume is one of the resumed run's own.

    A resumed run writes into a run folder of its own. Lightning restores the previous folder's
    `best_model_path` all the same (with a warning that the rest of the state is not restored), so a resumed
    run that never validates reports another run's file as its best. A state saved for another folder is left
    out here; one saved for this folder (a run resumed into its own folder) is restored, so that its files are
    kept or replaced by score as in one run. The class keeps Lightning's name: it names the state in
    checkpoints, which stay interchangeable with Lightning's callback.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            super().load_state_dict(state_dict)


class InterruptCheckpoint(L.Callback):
    """Saves `<dirpath>/interrupted.ckpt` when training is stopped: Ctrl-C, or SIGTERM (a preempted job), or SIGHUP
    (a terminal that hung up), which `wavenet.process.stop_on_hangup` hands to the SIGTERM handler.

    Without it, a stop loses everything since the last validation (up to `val_check_interval` steps). Both stop
    at the end of the step in progress (Ctrl-C through Lightning's SIGTERM handling), so the checkpoint resumes
    exactly where an uninterrupted run would be. A second Ctrl-C stops at once, and saves nothing: the step in
    progress may be stopped inside the optimizer step (half-updated weights) or, under DDP, inside a collective
    that other ranks left, and saving would wait for them. Other exceptions (a bug, out of memory) save nothing:
    their state may be broken. Not Lightning's `OnExceptionCheckpoint`, which saves on every exception and,
    when present, makes every `fit` without `ckpt_path` look for a checkpoint to resume from.

    Under DDP a Ctrl-C or a SIGTERM, to any rank or to all (as a terminal and SLURM send them), stops every rank
    after the same step: the ranks agree on it after each batch, in one all-reduce of a flag. Lightning's own
    SIGTERM handler broadcasts from inside the signal handler, wherever that finds the rank (in backward's
    all-reduce, say), and once per SIGTERM: ranks that received it a different number of times, or at different
    points, waited forever in mismatched collectives.
    """

    def __init__(self, dirpath: str, filename: str = "interrupted.ckpt") -> None:
        self.path = Path(dirpath) / filename
        # Made here, in the process Hydra started: trainer=ddp_sim's ranks, which it sends this to, have no Hydra.
        self.resume_advice = _resume_advice(self.path)
        self.stopped_by_ctrl_c = False
        self._ctrl_c_handler: Any = None  # SIGINT's handler before training started, while ours is installed
        self._training = False  # whether training has started: before, there is nothing to save
        self._stop_requested = False  # under DDP: by a signal to this rank, since our handlers were set
        self._agrees_on_stops = False  # under DDP: whether this rank's handlers are ours

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's SIGTERM handler is in place from here on: under DDP ours replace it before training, too.
        if trainer.world_size > 1:
            self._stop_with_every_rank(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._training = True
        if trainer.world_size > 1:
            self._stop_with_every_rank(trainer)
            return
        self.stopped_by_ctrl_c = False
        lightning_sigterm = signal.getsignal(signal.SIGTERM)  # SIG_DFL, not callable, where Lightning set none
        if not callable(lightning_sigterm):
            return
        if threading.current_thread() is not threading.main_thread():  # only there can signal handlers be set
            return

        training_process = os.getpid()

        def stop_after_this_step(signum: int, frame: FrameType | None) -> None:
            if os.getpid() != training_process:  # a DataLoader worker, forked with this handler: the trainer ends it
                return
            self._restore_ctrl_c()
            self.stopped_by_ctrl_c = True
            where = "ending this validation" if trainer.validating else "stopping at the end of this step"
            rank_zero_info(f"Ctrl-C: {where} (Ctrl-C again stops at once)")
            notices = logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector")
            level = notices.level
            notices.setLevel(logging.WARNING)  # its "Received SIGTERM" would be news to whoever pressed Ctrl-C
            try:
                lightning_sigterm(signal.SIGTERM, frame)
            finally:
                notices.setLevel(level)

        self._ctrl_c_handler = set_handler(signal.SIGINT, stop_after_this_step)

    def _stop_with_every_rank(self, trainer: L.Trainer) -> None:
        """Under DDP: sets handlers that note a Ctrl-C or a SIGTERM, for the ranks to agree on after the batch."""
        if self._agrees_on_stops:  # since the sanity check: a stop asked for then still counts
            return
        if not callable(signal.getsignal(signal.SIGTERM)) or threading.current_thread() is not threading.main_thread():
            return
        training_process, rank = os.getpid(), trainer.global_rank
        self._stop_requested = self.stopped_by_ctrl_c = False

        def note_sigterm(signum: int, frame: FrameType | None) -> None:
            if os.getpid() != training_process or self._stop_requested:  # a DataLoader worker, or said already
                return
            self._stop_requested = True
            # Every rank logs it: ranks, or nodes, may have been sent it at different times, or not at all.
            log.info("[rank: %d] Received SIGTERM: every rank stops after this step", rank)

        def note_ctrl_c(signum: int, frame: FrameType | None) -> None:
            if os.getpid() != training_process:
                return
            self._restore_ctrl_c()  # the next one stops at once
            self._stop_requested = self.stopped_by_ctrl_c = True
            rank_zero_info("Ctrl-C: every rank stops at the end of this step (Ctrl-C again stops at once)")

        signal.signal(signal.SIGTERM, note_sigterm)  # Lightning's is put back when fit ends
        self._ctrl_c_handler = set_handler(signal.SIGINT, note_ctrl_c)
        self._agrees_on_stops = True

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if not self._agrees_on_stops:
            return
        # Every rank calls this after the same batch. Set on all, Lightning's own flag ends training at the end of
        # this step on every rank (SIGTERMException), before the next batch is fetched.
        if trainer.strategy.reduce_boolean_decision(self._stop_requested, all=False):
            trainer._signal_connector.received_sigterm = True
            leave_ranks_to_stop()
            # Stopping, and saving on the way: a Ctrl-C now ends this process there, by the signal, rather than
            # raise KeyboardInterrupt into the save, the teardown or the exit (tracebacks, on every rank).
            self._ctrl_c_handler = None
            signal.signal(signal.SIGINT, signal.SIG_DFL)

    def _restore_ctrl_c(self) -> None:
        if self._ctrl_c_handler is not None:
            signal.signal(signal.SIGINT, self._ctrl_c_handler)
            self._ctrl_c_handler = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_ctrl_c()
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or trainer.state.fn != TrainerFn.FITTING:
            return
        if isinstance(exception, KeyboardInterrupt):
            self.stopped_by_ctrl_c = True  # Lightning then exits with status 1, which train.py makes 130
        launcher = trainer.strategy.launcher
        if isinstance(launcher, _MultiProcessingLauncher) and not multiprocessing.parent_process():
            # trainer=ddp_sim's launching process, whose copy of the model never trained. Its ranks say what they
            # saved, unless this is a second Ctrl-C, which stopped them at once.
            where = f"{self.path.parent} ({self.path.name} or last.ckpt)"
            rank_zero_info(f"Stopped; resume from the latest checkpoint in {where}, if any")
            return
        if not self._training:
            # Stopped while the data was prepared or the sanity check ran: no optimiser yet, so a checkpoint could
            # not resume (and the preparation starts over anyway).
            rank_zero_info("Stopped before training started: nothing to save; run the same command again")
            return
        if isinstance(exception, KeyboardInterrupt) and trainer.world_size > 1:
            # Under DDP every rank stops where a second Ctrl-C finds it, one maybe inside a collective (the
            # gradients' all-reduce) that the others left: saving, which waits for every rank, would hang until the
            # process group's time-out.
            rank_zero_info(f"Stopped; resume from the latest checkpoint in {self.path.parent} (last.ckpt), if any")
            return
        trainer.save_checkpoint(self.path, weights_only=False)
        rank_zero_info(f"Stopped at step {trainer.global_step}; {self.resume_advice}")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_ctrl_c()
        self._training = False
        self._agrees_on_stops = False


def _resume_advice(path: Path) -> str:
    """How to resume this run from `path`: with `ckpt_path` that file, and the command line that does it, this run's
    own settings (a resumed run checks them against the checkpoint's, but takes the defaults for the rest: the
    corpus, the number of steps); that line alone where this run's `ckpt_path` is a folder that holds `path` (a
    requeued job's, which finds it there)."""
    from hydra.core.hydra_config import HydraConfig

    advice = f"resume with ckpt_path={path}"
    if not HydraConfig.initialized():  # a Trainer of one's own
        return advice
    # As typed, not resolved: `${now:...}` would give this run's time.
    overrides = OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)
    given = [setting.split("=", 1)[1] for setting in overrides if setting.split("=", 1)[0].lstrip("+") == "ckpt_path"]
    folder = Path(given[-1]).expanduser() if given else None
    if folder is not None and folder.is_dir() and path.resolve().is_relative_to(folder.resolve()):
        # Its run folder inside the chain's too (`hydra.run.dir=<folder>/${now:...}`); hydra.mode is Hydra's own.
        typed = OmegaConf.to_container(HydraConfig.get().overrides.hydra, resolve=False)
        hydra_overrides = [setting for setting in typed if not setting.startswith("hydra.mode=")]
        return f"resume with the same command, whose ckpt_path={folder} finds this checkpoint: " + shlex.join(
            ["python", sys.argv[0], *overrides, *hydra_overrides]
        )
    # init_from too: the resumed run has its weights already.
    kept = [setting for setting in overrides if setting.split("=", 1)[0].lstrip("+~") not in ("ckpt_path", "init_from")]
    return f"{advice}, as in: " + shlex.join(["python", sys.argv[0], *kept, f"ckpt_path={path}"])


class LearningRateMonitor(LightningLearningRateMonitor):
    """Lightning's, logging each optimiser step's learning rates once: with `accumulate_grad_batches` it logged
    them at every batch of the step, the same rows again at the same step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._logged_step: int | None = None

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step Lightning logs them at
        if step == self._logged_step:
            return
        self._logged_step = step
        super().on_train_batch_start(trainer, *args, **kwargs)


class TrainingMonitor(L.Callback):
    """Logs the gradient norm and the training throughput, at the trainer's `log_every_n_steps`.

    - `train/grad_norm`: L2 norm of all gradients before clipping; above `trainer.gradient_clip_val`, the
      step was clipped.
    - `train/samples_per_sec`: scored audio samples (targets) per second over all processes, as
      `bench/train.py` counts them, measured over the last `log_every_n_steps` steps. Data loading is
      included; validation, sample logging and checkpointing are not, nor the first batch (compiling,
      autotuning, the loader's workers starting: the first point would show them, not the rate).
    """

    def __init__(self) -> None:
        self._marks: deque[tuple[float, int]] = deque()  # (time, samples so far) at the latest batch ends
        self._paused_at: float | None = None  # when the latest validation started, until training goes on

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Lightning calls this after unscaling the gradients (fp16) and before clipping them. The norm reads every
        # gradient, so it is taken only on steps whose metrics reach the loggers (Lightning's own condition).
        if not (trainer._logger_connector.should_update_logs or trainer.fast_dev_run):
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads:
            pl_module.log("train/grad_norm", torch.nn.utils.get_total_norm(grads, foreach=True))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        inputs, _ = batch  # (B, receptive_field + chunk_length - 1)
        if not self._marks:
            self._marks.append((time.perf_counter(), 0))
            return
        scored = inputs.shape[0] * (inputs.shape[1] - pl_module.receptive_field + 1) * trainer.world_size
        self._marks.append((time.perf_counter(), self._marks[-1][1] + scored))
        while len(self._marks) > trainer.log_every_n_steps + 1:
            self._marks.popleft()
        (start, first), (end, last) = self._marks[0], self._marks[-1]
        pl_module.log("train/samples_per_sec", (last - first) / max(end - start, 1e-9))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._paused_at = time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        # The window's marks move on by the time training waited (its validation, and the checkpoints and samples
        # saved after it), so that they span training alone. Left out of the window instead, the first batch after
        # a validation logged no rate, and the loggers got the one before again.
        if self._paused_at is not None:
            paused = time.perf_counter() - self._paused_at
            self._marks = deque((at + paused, samples) for at, samples in self._marks)
            self._paused_at = None


class AudioSampleLogger(L.Callback):
    """Logs generated audio beside real validation audio, with log-mel spectrograms of both.

    At the end of every `every_n_validations`-th validation, on rank zero, each of `num_samples` streams
    is primed with the start of a validation window (its first receptive field of samples) and continues
    it for `seconds` with the fast incremental sampler (`wavenet.generate`). The real `seconds` that follow
    the same prime in its file are logged as the reference, so the two clips start from the same point
    and should sound alike once the model is good. The streams' windows are spread evenly over the
    validation set (at 1/4 and 3/4 of it for two), away from the silence that often opens a recording;
    the same primes and the same random draws are used every time, so only the model changes between
    logged samples. The model generates with the weights validation used (the EMA's when the EMA callback
    validates with them).

    Media go to every TensorBoard and Weights & Biases logger of the trainer:

    - TensorBoard: audio `samples/generated_<i>` and `samples/real_<i>`, image `samples/spectrogram_<i>`.
    - W&B: `samples/generated`, `samples/real` (lists of `wandb.Audio`, captioned with the validation
      window of the prime) and `samples/spectrogram` (`wandb.Image`).

    Without such a logger (CSV alone, `fast_dev_run`, `WANDB_MODE=disabled`) nothing is generated.

    Generation runs one sample at a time, so it is kept to a small share of training: besides the cadence,
    a validation is skipped while the time spent generating exceeds `max_time_fraction` of the time since
    training started. That bound matters on a GPU, which speeds training up far more than sampling.

    Args:
        every_n_validations: Log at every n-th validation (validations come every
            `trainer.val_check_interval` steps, so this counts in the same unit whatever the epoch length).
        seconds: Length of each generated and real clip.
        num_samples: Number of streams, primed from different places of the validation set (generated
            as one batch: two streams cost about 1.3 times one).
        temperature: Softmax temperature of the sampler; 1 samples the model as trained.
        max_time_fraction: Largest share of the training time spent generating; None for no limit.
        seed: Seed of the sampler's random draws.
    """

    def __init__(
        self,
        every_n_validations: int = 5,
        seconds: float = 2.0,
        num_samples: int = 2,
        temperature: float = 1.0,
        max_time_fraction: float | None = 0.1,
        seed: int = 0,
    ) -> None:
        key = "callbacks.audio_samples"
        if every_n_validations < 1:
            raise UserError(f"{key}.every_n_validations must be a positive integer, got {every_n_validations}")
        if not seconds > 0:
            raise UserError(f"{key}.seconds must be positive, got {seconds}")
        if num_samples < 1:
            raise UserError(f"{key}.num_samples must be a positive integer, got {num_samples}")
        if not temperature >= 0:
            raise UserError(f"{key}.temperature must not be negative, got {temperature}")
        if max_time_fraction is not None and not 0 < max_time_fraction <= 1:
            raise UserError(f"{key}.max_time_fraction must be in (0, 1] or null, got {max_time_fraction}")
        self.every_n_validations = every_n_validations
        self.seconds = float(seconds)
        self.num_samples = num_samples
        self.temperature = temperature
        self.max_time_fraction = max_time_fraction
        self.seed = seed
        self.validations = 0  # kept in checkpoints, so a resumed run keeps its cadence
        self._loggers: list[Logger] = []
        self._clips: _Clips | None = None
        self._fit_start = 0.0
        self._generating = 0.0  # seconds spent in this fit

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start, self._generating = time.monotonic(), 0.0
        if trainer.is_global_zero:
            self._loggers = [logger for logger in trainer.loggers if _takes_media(logger)]
            if self._loggers:
                self._clips = self._read_clips(trainer, pl_module.receptive_field)
            else:
                log.info("Audio samples are not logged: no TensorBoard logger, no enabled W&B logger")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Before on_validation_end, where the EMA callback puts the training weights back.
        if trainer.sanity_checking:
            return
        self.validations += 1
        if not self._loggers or self.validations % self.every_n_validations:
            return
        elapsed = time.monotonic() - self._fit_start
        if self.max_time_fraction is not None and self._generating > self.max_time_fraction * elapsed:
            log.info(
                "Audio samples skipped at step %d: generating took %.1f s of %.1f s (max_time_fraction=%g)",
                trainer.global_step, self._generating, elapsed, self.max_time_fraction,
            )  # fmt: skip
            return
        clips = self._clips
        assert clips is not None, "read in on_fit_start"
        if pl_module.device.type == "cpu":
            # Built once per machine (15 s on 2 cores) on first use: no part of generating, whose time the
            # budget above counts, and which would skip the next samples for it.
            cpu_kernel_available()
        start = time.monotonic()
        self._log_samples(trainer, pl_module, clips)
        spent = time.monotonic() - start
        self._generating += spent
        log.info(
            "Logged %d audio samples of %.2f s at step %d in %.1f s",
            self.num_samples, clips.real.shape[1] / clips.sample_rate, trainer.global_step, spent,
        )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = state_dict["validations"]

    def _log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule, clips: _Clips) -> None:
        generator = torch.Generator(pl_module.device).manual_seed(self.seed)
        classes = generate(
            pl_module,
            num_samples=clips.real.shape[1],
            batch_size=self.num_samples,
            temperature=self.temperature,
            prime=clips.prime,
            generator=generator,
        )  # (B, N)
        generated = mu_law_decode(classes.cpu(), clips.quantization_channels)
        images = [_spectrograms(real, fake, clips.sample_rate) for real, fake in zip(clips.real, generated)]
        # The step Lightning logs this validation's metrics at (its count of optimiser steps before this one's
        # end: global_step - 1 here), so that the clips sit beside the val/loss they go with on every dashboard.
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in self._loggers:
            if isinstance(logger, TensorBoardLogger):
                _log_to_tensorboard(logger, step, clips, generated, images)
            elif isinstance(logger, WandbLogger):
                _log_to_wandb(logger, step, clips, generated, images)

    def _read_clips(self, trainer: L.Trainer, receptive_field: int) -> _Clips:
        """The primes and reference clips, read once from the validation set, spread over it."""
        val_set = getattr(trainer.datamodule, "val_set", None)
        if val_set is None:
            raise UserError(
                "callbacks.audio_samples needs a datamodule with a val_set (wavenet.data's), to prime from; "
                "set callbacks.audio_samples=null to train without it"
            )
        rate, levels = val_set.sample_rate, val_set.quantization_channels
        length = round(self.seconds * rate)
        firsts = [(2 * i + 1) * len(val_set) // (2 * self.num_samples) for i in range(self.num_samples)]
        stretches = [_contiguous(val_set, first, receptive_field, receptive_field + length) for first in firsts]
        available = min(stretch.numel() for stretch in stretches) - receptive_field
        if available < length:
            log.warning(
                "Audio samples are %.2f s, not %g s: no longer stretch of validation audio follows a prime",
                available / rate, self.seconds,
            )  # fmt: skip
            length = available
        if length < _N_FFT:
            raise UserError(
                f"callbacks.audio_samples.seconds={self.seconds:g} gives clips shorter than one spectrogram "
                f"window ({_N_FFT} samples, {_N_FFT / rate:.3f} s at {rate} Hz)"
            )
        return _Clips(
            prime=torch.stack([stretch[:receptive_field] for stretch in stretches]),
            # The reference as the model hears it: mu-law quantized, like the generated clip.
            real=torch.stack([mu_law_decode(s[receptive_field : receptive_field + length], levels) for s in stretches]),
            captions=[f"after validation window {first}" for first in firsts],
            sample_rate=rate,
            quantization_channels=levels,
        )


class _Clips(NamedTuple):
    """The fixed inputs of sample logging, read once."""

    prime: Tensor  # (B, receptive_field) mu-law classes
    real: Tensor  # (B, N) float in [-1, 1]: what follows the prime
    captions: list[str]
    sample_rate: int
    quantization_channels: int


def _contiguous(val_set: Dataset[tuple[Tensor, Tensor]], first: int, receptive_field: int, samples: int) -> Tensor:
    """The first `samples` consecutive mu-law classes of one validation file, from window `first` on.

    The search goes round the validation set, and gives the longest stretch there is if none is as long.
    Validation windows tile each file with their scored chunks, so consecutive windows of one file overlap
    by exactly `receptive_field` samples: a window that does not continue the one before starts another
    file, and the stretch starts over from it.
    """
    inputs, targets = val_set[first]
    stretch = longest = torch.cat([inputs, targets[-1:]])  # the whole window, (receptive_field + chunk,)
    for step in range(1, len(val_set)):
        if stretch.numel() >= samples:
            break
        inputs, targets = val_set[(first + step) % len(val_set)]
        window = torch.cat([inputs, targets[-1:]])
        continues = torch.equal(window[:receptive_field], stretch[-receptive_field:])
        stretch = torch.cat([stretch, window[receptive_field:]]) if continues else window
        longest = max(longest, stretch, key=len)
    return longest[:samples]


def _takes_media(logger: Logger) -> bool:
    """Whether `logger` can show audio and images (a disabled W&B run shows nothing)."""
    if isinstance(logger, TensorBoardLogger):
        return True
    return isinstance(logger, WandbLogger) and not getattr(logger.experiment, "disabled", False)


def _log_to_tensorboard(
    logger: TensorBoardLogger, step: int, clips: _Clips, generated: Tensor, images: list[np.ndarray]
) -> None:
    writer = logger.experiment
    for i, (real, fake, image) in enumerate(zip(clips.real, generated, images)):
        writer.add_audio(f"samples/generated_{i}", fake, step, sample_rate=clips.sample_rate)
        writer.add_audio(f"samples/real_{i}", real, step, sample_rate=clips.sample_rate)
        writer.add_image(f"samples/spectrogram_{i}", image, step, dataformats="HWC")


def _log_to_wandb(
    logger: WandbLogger, step: int, clips: _Clips, generated: Tensor, images: list[np.ndarray]
) -> None:
    import wandb  # only with a W&B logger, which has imported it already

    def audio(clip: Tensor, caption: str) -> wandb.Audio:
        return wandb.Audio(clip.numpy(), sample_rate=clips.sample_rate, caption=caption)

    captions = clips.captions
    media = {
        "samples/generated": [audio(clip, caption) for clip, caption in zip(generated, captions)],
        "samples/real": [audio(clip, caption) for clip, caption in zip(clips.real, captions)],
        "samples/spectrogram": [wandb.Image(image, caption=caption) for image, caption in zip(images, captions)],
    }
    logger.log_metrics(media, step=step)  # one W&B row for all, at trainer/global_step = step


def _spectrograms(real: Tensor, generated: Tensor, sample_rate: int) -> np.ndarray:
    """(H, W, 3) uint8 image of the log-mel spectrograms of a real clip (top) and a generated one."""
    mel_spectrogram = MelSpectrogram(sample_rate, n_fft=_N_FFT, hop_length=_HOP, n_mels=_N_MELS)
    mel = mel_spectrogram(torch.stack([real, generated]))
    decibels = 10 * mel.clamp_min(1e-10).log10()  # (2, n_mels, frames)
    # One colour scale for both, so that louder and quieter read the same in the two panels.
    top = float(decibels.max())
    figure = Figure(figsize=(8, 5), dpi=80, layout="constrained")
    canvas = FigureCanvasAgg(figure)
    axes = figure.subplots(2, 1, sharex=True)
    extent = (0.0, real.shape[0] / sample_rate, 0.0, float(_N_MELS))
    for ax, spectrogram, title in zip(axes, decibels, ["real", "generated"]):
        image = ax.imshow(
            spectrogram.numpy(), origin="lower", aspect="auto", cmap="magma",
            vmin=top - _DYNAMIC_RANGE_DB, vmax=top, extent=extent,
        )  # fmt: skip
        ax.set_title(title)
        ax.set_ylabel("mel band")
    axes[-1].set_xlabel("seconds")
    figure.colorbar(image, ax=list(axes), label="dB")
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
