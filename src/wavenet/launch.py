"""The processes that train under Hydra: how Lightning's DDP ranks are started, and how every process logs.

Lightning's `ddp` strategy starts ranks 1..N-1 by re-running the script with the original command line
plus `hydra.run.dir=<run dir>`. Under `-m`, that command line is the whole sweep: every rank would start
a sweep of its own, in a second sweep folder. This module makes the ranks re-run only their own job:
the job's overrides, without `-m`, into the job's own folder. And since multirun jobs share one process,
it undoes what a DDP job leaves behind there (the process group, the rank variables) before the next job.

Ranks that are spawned instead (`SpawnStrategy`, trainer=ddp_sim) start a fresh Python that has never seen
Hydra: they are given the job's logging config, so that they log as the process that started them.
"""

from __future__ import annotations

import logging
import logging.config
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import __main__
import torch.distributed
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_original_cwd, to_absolute_path
from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from lightning.pytorch.strategies.launchers import subprocess_script as trainer_launcher
from lightning.pytorch.trainer import call
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import OmegaConf
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

from wavenet.process import end_without_collecting_everything, stop_on_hangup
from wavenet.signals import Handling, start_resource_tracker_deaf_to_hangups

_lightning_command = fabric_launcher._hydra_subprocess_cmd
# What Lightning's launcher sets in the launching process's environment; left there, the next job would
# take LOCAL_RANK as a sign that its ranks were started by someone else, and wait for them forever.
_LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# How long the ranks of a finished job have to end (they tear down as rank 0 does) before they are killed.
_RANK_EXIT_SECONDS = 30
# The ranks of this job that Lightning no longer watches, for `_end_ranks` to wait for.
_stopping_ranks: list[subprocess.Popen] = []


def _job_command(local_rank: int) -> tuple[Sequence[str], str]:
    """The command that starts `local_rank` of this Hydra job, and the folder to start it in."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return _lightning_command(local_rank)
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += list(hydra_cfg.overrides.task)  # this job's values, not the sweep's lists
    command += [
        # A search's config (hparams_search=optuna) sets MULTIRUN itself: the rank would start a search of its own.
        "hydra.mode=RUN",
        f"hydra.run.dir={hydra_cfg.runtime.output_dir}",
        f"hydra.job.name={hydra_cfg.job.name}_ddp_rank_{local_rank}",
        # The job's rank 0 writes the config; other ranks must not overwrite it.
        "hydra.output_subdir=null",
    ]
    return command, get_original_cwd()


@contextmanager
def ddp_job() -> Iterator[None]:
    """Runs one training job so that DDP works under Hydra multirun, job after job in one process."""
    fabric_launcher._hydra_subprocess_cmd = _job_command
    # The Trainer's launcher imported the function by name: both modules hold a reference.
    trainer_launcher._hydra_subprocess_cmd = _job_command
    environment = {name: os.environ.get(name) for name in _LAUNCH_VARIABLES}
    try:
        yield
    finally:
        _end_ranks()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _end_ranks() -> None:
    """Waits for the ranks Lightning started for this job (trainer=ddp) to end, and ends those that do not.

    Lightning watches them from a thread that, when one exits with an error, kills this process: in a multirun
    it outlives the job and killed the sweep in a later job for a rank of an earlier one that was refused (a
    `UserError`, which the sweep goes on past). A rank still running after its job is waiting for a rank 0 that
    stopped; nothing would end it.
    """
    leave_ranks_to_stop()
    ranks, _stopping_ranks[:] = list(_stopping_ranks), []
    for rank in ranks:
        try:
            rank.wait(timeout=_RANK_EXIT_SECONDS)
        except subprocess.TimeoutExpired:
            rank.kill()
            rank.wait()


def leave_ranks_to_stop() -> None:
    """Ends Lightning's watch over the ranks it started for this job (trainer=ddp), which `_end_ranks` waits for.

    For a run that every rank stops together (Ctrl-C, SIGTERM): the watch kills this process when a rank exits
    with an error, as a stopped one does (130, 143, 129), maybe before this one has ended too.
    """
    for thread in threading.enumerate():
        if isinstance(thread, fabric_launcher._ChildProcessObserver):
            _stopping_ranks.extend(thread._child_processes)
            thread._child_processes = []  # the thread ends at its next look


class StopsBeforeTraining(Handling):
    """Within it, a SIGTERM raises Lightning's `SIGTERMException` where it finds the process, until Lightning's own
    SIGTERM handling takes over as training is set up (and again once it has ended).

    Before training, a SIGTERM (a preempted job) ended the process by the signal, without a word, also in the data
    preparation, hours long for a big corpus; under trainer=ddp_sim with a traceback. Raised, it unwinds as a Ctrl-C
    does (the preparation removes its temporary folder), and the run ends with status 143. The ranks that
    trainer=ddp started are sent it too; a rank waiting for rank 0 at a barrier raises it once the barrier opens
    (the one around the data preparation does when rank 0's preparation ends, stopped or not).

    Only the first signal raises: a second (a rank may be sent one by the scheduler and one by rank 0) would
    interrupt the first one's clean-up. With `ctrl_c` (the ranks of trainer=ddp_sim, which a terminal's Ctrl-C
    reaches, and then their launching process's SIGTERM), a Ctrl-C raises `KeyboardInterrupt`, as Python's own
    handler does, and counts as the first signal.
    """

    def __init__(self, ctrl_c: bool = False) -> None:
        super().__init__(self._stop, *((signal.SIGTERM, signal.SIGINT) if ctrl_c else (signal.SIGTERM,)))
        self._stopping = False

    def _stop(self, signum: int, frame: Any) -> None:
        if signal.getsignal(signum) != self._stop:  # a bound method: an equal one, not the same object
            # Called by Lightning's own handler, which keeps the one it replaced in its chain: training is set up,
            # and stops at the end of a step.
            return
        if self._stopping:
            return
        self._stopping = True
        # The ranks that trainer=ddp started (children of rank 0) wait at a barrier, or in set-up: they stop too.
        leave_ranks_to_stop()
        for rank in _stopping_ranks:
            if rank.poll() is None:
                rank.send_signal(signal.SIGTERM)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SIGTERMException


def _not_a_tip(record: logging.LogRecord) -> bool:
    """False for Lightning's advertisements, and for its note that the model summary callback we configure
    replaces its default one (every run would print it)."""
    return not record.getMessage().startswith(("💡 Tip:", "Trainer already configured with model summary"))


def quiet_lightning() -> None:
    """Sends Lightning's log records to the root logger's handlers alone (Hydra's console and the run's log file),
    without its advertisements, and silences warnings of Lightning's that users can do nothing about."""
    # Lightning gives its loggers console handlers of their own, and stops them propagating where it is imported
    # before logging is set up (as in a spawned rank): its messages would print twice, or never reach the log file.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # At every start Lightning suggests installing its cloud services (litlogger, litmodels) in a "💡 Tip:" line
    # that no setting turns off (Lightning-AI/pytorch-lightning#21294).
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_a_tip)
    # Lightning 2.6 calls a torch pytree API that torch 2.11 deprecates.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # Wrong for this project's step-wise logging: every log_every_n_steps optimiser steps are logged, counted
    # across epochs, so a corpus of few batches per epoch is logged all the same.
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging")


class SpawnStrategy(DDPStrategy):
    """Lightning's `ddp_spawn` (DDP on processes started afresh), whose ranks log as the process that starts them,
    and start their DataLoader workers as it would.

    A spawned process begins with Python's default logging: Lightning's bare console handlers and no log file.
    Each rank here takes the Hydra job's logging config first thing, so its lines have the job's format and
    reach the run's log file, as they do from the ranks of `ddp`, which re-run the script under Hydra.

    A spawned process also starts its own processes by spawning them: DataLoader workers that import torch afresh,
    seconds each on a small machine, at every epoch and validation (the first step of a 2-rank run on 2 cores took
    16 s), and as long to end. Each rank takes the start method of the process that started it (fork on Linux).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(start_method="spawn", **kwargs)
        # Read in the Hydra job, where it is set; the strategy carries it into every rank.
        self._logging_config = (
            OmegaConf.to_container(HydraConfig.get().job_logging, resolve=True) if HydraConfig.initialized() else None
        )
        self._workers_start_method = multiprocessing.get_start_method()

    def setup_environment(self) -> None:
        # Each rank's first step of `fit`, before the process group (which logs) and the data.
        end_without_collecting_everything()  # as the launching process does, which train.py set up
        # A terminal's hangup reaches every rank (the job in its foreground), and their console is gone with it.
        stop_on_hangup()
        if self._logging_config is not None:
            logging.config.dictConfig(self._logging_config)
        quiet_lightning()
        multiprocessing.set_start_method(self._workers_start_method, force=True)
        super().setup_environment()

    def _configure_launcher(self) -> None:
        self._launcher = _SpawnLauncher(self, start_method=self._start_method)


def _not_terminating_ranks(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Terminating process ")


class RankStopped(Exception):
    """A spawned rank stopped on a Ctrl-C or a SIGTERM, as every rank did, having saved `interrupted.ckpt` if training
    had started."""


class _SpawnLauncher(_MultiProcessingLauncher):
    """Lightning's launcher of spawned ranks, with a way to stop them for a Ctrl-C or a SIGTERM.

    The launching process trains nothing. Its default for either was to end, and torch then stopped each rank
    with a SIGINT (its parent-death signal) wherever it was: tracebacks, and no checkpoint. It passes a SIGTERM
    on to the ranks instead (which agree on a step to stop after, see `InterruptCheckpoint`; before training, each
    stops where it is, see `StopsBeforeTraining`) and waits for them;
    a first Ctrl-C the same (the terminal sent it to the ranks too), a second stops at once. A rank that stops
    so runs what Lightning runs only in the launching process for a stop (the callbacks' `on_exception`: the
    checkpoint), and reports `RankStopped`, which torch passes on as an error. A rank that the signal ended
    otherwise (one still starting, before it has handlers of its own, dies of it) stops the launching process as
    the signal would have: `SIGTERMException`, or `KeyboardInterrupt` for a Ctrl-C, not torch's traceback.

    Attributes:
        stopped_by_ctrl_c: Whether the launching process was sent Ctrl-C.
    """

    stopped_by_ctrl_c = False
    _stop_passed_on = False

    def launch(self, function: Any, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        def pass_on(signum: int, frame: Any) -> None:
            self._stop_passed_on = True
            if signum == signal.SIGINT:
                self.stopped_by_ctrl_c = True
                signal.signal(signal.SIGINT, handling.previous[signal.SIGINT])  # a second one stops at once
            for process in self.procs:
                if process.is_alive() and process.pid is not None:
                    os.kill(process.pid, signal.SIGTERM)

        # torch ends the other ranks once one has ended with an error, with a warning for each; a stop (RankStopped)
        # and a refused setting end so too, and the warning read as a crash after their own last line.
        spawn_log = logging.getLogger("torch.multiprocessing.spawn")
        spawn_log.addFilter(_not_terminating_ranks)
        start_resource_tracker_deaf_to_hangups()  # spawning the ranks would start it, and a hangup end it
        with Handling(pass_on, signal.SIGTERM, signal.SIGINT) as handling:
            try:
                return super().launch(function, *args, trainer=trainer, **kwargs)
            except (ProcessExitedException, ProcessRaisedException) as error:
                if not self._stop_passed_on or str(error).rstrip().endswith(RankStopped.__name__):
                    raise
                raise (KeyboardInterrupt if self.stopped_by_ctrl_c else SIGTERMException) from None
            finally:
                spawn_log.removeFilter(_not_terminating_ranks)

    def _wrapping_function(self, process_idx: int, trainer: Any, *args: Any, **kwargs: Any) -> None:
        try:
            with StopsBeforeTraining(ctrl_c=True):
                super()._wrapping_function(process_idx, trainer, *args, **kwargs)
        except (SIGTERMException, KeyboardInterrupt) as stop:
            # Either would end the rank with status 0 (torch's rank wrapper takes a SystemExit, such as
            # SIGTERMException, for an exit, and a KeyboardInterrupt for its parent's death), and the launching
            # process then waited forever for the results rank 0 never sent.
            call._interrupt(trainer, stop)
            trainer._teardown()
            raise RankStopped from None
