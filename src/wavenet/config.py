"""Helpers for the Hydra entry points: checking, printing and instantiating composed configs; sweep summaries.

Hydra loads this module at every start, for its callbacks: Lightning is imported only where it is used, so that
a setting refused before training costs no Lightning import (seconds, with torchmetrics and what it loads).
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import rich.syntax
import rich.tree
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console

from wavenet.errors import FailedJob, UserError, exit_with_error, first_line
from wavenet.process import carry_on_past_a_closed_stdout, log_to_files_only

log = logging.getLogger(__name__)

_NOT_SET = object()  # a key the sweep's command line does not set
_SWEPT = object()  # a key it sweeps (`a,b`, `choice(...)`): whatever value a job has, it is a parameter


def check_required(cfg: DictConfig, keys: Iterable[str] = ()) -> None:
    """Raises `UserError` naming every required value (`???`) the user has not set, any of the top-level `keys`
    an override removed (`~model`), or the first value whose interpolation (`${oc.env:HOME}`) fails."""
    removed = [key for key in keys if key not in cfg.keys()]  # `in cfg` is false for a `???` value too
    if removed:
        raise UserError(f"{', '.join(removed)} must be set, and the command line removed it (~{removed[0]})")
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if not missing:
            OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as error:
        reason = str(error.msg).strip().splitlines()[0] if error.msg else type(error).__name__
        raise UserError(f"{error.full_key}: {reason}") from None
    if missing:
        keys = ", ".join(missing)
        raise UserError(f"missing required value(s): {keys} (set them on the command line, e.g. {missing[0]}=...)")


def print_config_tree(cfg: DictConfig, save_to: Path | None = None) -> None:
    """Prints the composed config as a tree, one branch per top-level key, and saves it to `save_to`; on rank
    zero only."""
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        return
    tree = rich.tree.Tree("CONFIG", style="bold", guide_style="dim")
    for key, value in cfg.items():
        branch = tree.add(str(key), style="bold")
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        branch.add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
    console = rich.get_console()
    if not console.is_terminal:  # a file or a pipe, for which rich assumes 80 columns and would crop long paths
        console = Console(file=console.file, width=1000, color_system=None)
        carry_on_past_a_closed_stdout(console)
    console.print(tree)
    if save_to is not None:
        save_to.parent.mkdir(parents=True, exist_ok=True)
        with save_to.open("w") as file:
            Console(file=file, width=1000, color_system=None).print(tree)


def instantiate_checked(config: DictConfig, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, turning the target's refusal of a setting into one `UserError` line.

    Hydra wraps whatever the target raises in an `InstantiationException` with its traceback and the
    whole command line; a user's mistake (a bad value of a setting) should reach the entry point as the
    one clear message it is: a `UserError` as it is, and the `ValueError`s (and Lightning's
    `MisconfigurationException`s) with which constructors refuse their arguments prefixed by the config
    key, e.g. `model: layers (7) must be a multiple of stacks (2)`.
    """
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as error:
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        cause = error.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        key = config._get_full_key(None)
        if isinstance(cause, (ValueError, MisconfigurationException)):
            reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            raise UserError(f"{key}: {reason}") from None
        unexpected = isinstance(cause, TypeError) and re.search(r"unexpected keyword argument '(\w+)'", str(cause))
        if unexpected:  # what Hydra's hint for a misspelt key, `+key=value`, leads to
            known = [name for name in config if not str(name).startswith("_") and name != unexpected[1]]
            close = difflib.get_close_matches(unexpected[1], known, n=1)
            hint = f"; did you mean {key}.{close[0]}?" if close else ""
            raise UserError(f"{key}.{unexpected[1]} is not a setting of {config.get('_target_')}{hint}") from None
        # A value of the wrong type, compared or used deep in the target; an option whose package is missing.
        if isinstance(cause, (TypeError, ImportError)):
            raise UserError(f"{key}: {first_line(cause)}") from None
        raise


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiates each entry of a config group that maps names to `_target_` configs (callbacks, loggers)."""
    if not group:
        return []
    return [
        instantiate_checked(entry)
        for entry in group.values()
        if isinstance(entry, DictConfig) and "_target_" in entry
    ]


class FreshRunFolder(Callback):
    """Hydra callback refusing a run folder that holds an earlier run (`hydra.run.dir=` an existing one).

    Hydra rewrites the folder's record of its run (`.hydra/`) before the task starts, and the task would then
    mix its logs, metrics and checkpoints with the earlier ones: refused at the start, nothing is touched.

    Attributes:
        found: What the run (or sweep) folder held before the run (names; none where this process made it).
        made: The outermost folder this process made for the run (the run folder or one above it), or None.
        sweep_dir: The sweep folder of the multirun in this process, if any.
    """

    found: set[str] = set()
    made: Path | None = None
    sweep_dir: Path | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.output_subdir is None:  # a DDP rank, re-run into its job's folder (wavenet.launch)
            return
        folder = Path(config.hydra.run.dir)
        self._refuse_if_used(folder, config.hydra.output_subdir, "hydra.run.dir")
        self._note_before(folder)
        try:  # what Hydra does next, failing with a traceback for a folder that cannot be made
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            given = any(setting.startswith("hydra.run.dir=") for setting in config.hydra.overrides.hydra)
            # The default folder is under paths.log_dir: one given on the command line is not.
            mend = "give a writable hydra.run.dir" if given else "set paths.log_dir to a writable folder"
            exit_with_error(f"cannot create hydra.run.dir={folder}: {error.strerror or error}; {mend}")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir)
        self._refuse_if_used(folder, "multirun.yaml", "hydra.sweep.dir")
        self._note_before(folder)
        FreshRunFolder.sweep_dir = folder

    @staticmethod
    def _note_before(folder: Path) -> None:
        # Class attributes, for `discard_refused_run` and `discard_refused_sweep`: set for every run, as a process
        # may run more than one.
        try:
            FreshRunFolder.found = {path.name for path in folder.iterdir()}
        except OSError:  # not there (made next), or not a folder (refused next)
            FreshRunFolder.found = set()
        made = None
        if not folder.exists():
            made = folder.absolute()
            while not made.parent.exists():
                made = made.parent
        FreshRunFolder.made = made

    @staticmethod
    def _refuse_if_used(folder: Path, record: str, key: str) -> None:
        if (folder / record).exists():
            exit_with_error(
                f"{key}={folder} already holds a run ({record}): choose a new folder, or leave {key} to its "
                "default (a new folder per run)"
            )


# What Hydra writes into a run's record (`.hydra/`) before the task starts.
_HYDRA_RECORD = {"config.yaml", "hydra.yaml", "overrides.yaml"}


def end_refused_run(line: str) -> None:
    """For a run that was refused (`line`, the `error: ...` on the console): its folder goes where the run had
    written nothing itself (`discard_refused_run`); else the line goes into its log file, which would not say
    why the run ended (a corpus found unusable once the run had started, a refused job of a sweep)."""
    if not discard_refused_run():
        log_to_files_only(log, logging.ERROR, "%s", line)


def discard_refused_run() -> bool:
    """Removes what Hydra wrote for a single run refused before it wrote anything itself: the run's record
    (`.hydra/`, which `FreshRunFolder` found absent), its empty log, and the folders this run made. So
    the same command, mended, runs in the same `hydra.run.dir` (rather than being refused as a second run
    there), and refused runs leave no empty folders in outputs/. A run that wrote anything more is left as it is.

    Returns:
        Whether the run's record was removed.
    """
    hydra = HydraConfig.get()
    if hydra.mode == RunMode.MULTIRUN or hydra.output_subdir is None:  # a job of a sweep lists its folder; a rank
        return False
    folder = Path(hydra.runtime.output_dir)
    record = folder / hydra.output_subdir
    files = [handler for handler in logging.getLogger().handlers if isinstance(handler, logging.FileHandler)]
    try:
        logs = {Path(handler.baseFilename) for handler in files}
        logs = {path for path in logs if path.parent == folder and path.is_file() and path.stat().st_size == 0}
        if not record.is_dir() or {path.name for path in record.iterdir()} - _HYDRA_RECORD:
            return False
        found = FreshRunFolder.found
        if {path.name for path in folder.iterdir()} - found - {record.name} - {path.name for path in logs}:
            return False
        for path in record.iterdir():
            path.unlink()
        record.rmdir()
        for path in logs:
            if path.name not in found:
                path.unlink()
        _remove_made_folders(folder)  # such as outputs/train/runs/
    except OSError:  # another process writing there, a folder made read-only: then it stays
        return False
    return True


def discard_refused_sweep() -> None:
    """Removes the `multirun.yaml` of a sweep refused before any job ran, and the folders made for it.

    The sweepers write it before they compose the first job (where a misspelt key, `model.layer=4,6`, is refused),
    and it would then refuse the same command, mended, in the same `hydra.sweep.dir`, and leave a folder in
    outputs/ for every refused sweep. A sweep folder that holds anything new besides it (a job's folder, a
    summary) is left as it is; so is what it held before the sweep.
    """
    folder = FreshRunFolder.sweep_dir
    if folder is None:
        return
    try:
        if {path.name for path in folder.iterdir()} - FreshRunFolder.found != {"multirun.yaml"}:
            return
        (folder / "multirun.yaml").unlink()
        _remove_made_folders(folder)
    except OSError:  # another process writing there, a folder made read-only: then it stays
        return


def _remove_made_folders(folder: Path) -> None:
    """Removes `folder` and those above it, up to the outermost one that `FreshRunFolder` saw this process make."""
    if FreshRunFolder.made is None:
        return
    for made in [folder.absolute(), *folder.absolute().parents]:
        made.rmdir()
        if made == FreshRunFolder.made:
            break


class SweptOnce(Callback):
    """Hydra callback refusing a sweep whose command line gives a key again after a sweep of it
    (`model.lr=choice(1e-3,3e-3) model.lr=1e-3`): the sweep would be dropped without a word, as Hydra keeps the last
    value of a key. A sweep after a value of its key (`model=tiny model=tiny,small`, a command line extended)
    replaces it, as any later value does."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        swept: dict[str, str] = {}  # key -> its sweep, as typed
        for override in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task)):
            key = override.key_or_group
            if key in swept:
                exit_with_error(f"{override.input_line} would replace the sweep {swept[key]}: give one of them")
            if override.is_sweep_override():
                swept[key] = override.input_line


def refuse_folder_to_resume_in_sweep(ckpt_path: object) -> None:
    """Raises `UserError` for a `ckpt_path` that is a folder (a requeued chain's, whose furthest checkpoint it
    resumes from) in a sweep: every job would resume from the same checkpoint, whatever its settings."""
    if isinstance(ckpt_path, str) and Path(ckpt_path).expanduser().is_dir():
        raise UserError(
            f"ckpt_path={ckpt_path} is a folder, which resumes one chain of runs, not the jobs of a sweep: give each "
            "job the checkpoint file to resume from"
        )


class FolderToResumeOutsideSweeps(Callback):
    """Hydra callback refusing a training sweep whose `ckpt_path` is a folder, once, before its first job: each job
    refused it on its own, and an Optuna search of 20 trials said so 20 times, and kept 20 failed trials."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("task_name") != "train":
            return
        try:
            refuse_folder_to_resume_in_sweep(config.get("ckpt_path"))
        except UserError as error:
            exit_with_error(str(error))


class SweepSummary(Callback):
    """Hydra callback that ends a multirun with a list of its jobs, their values and the best.

    Logs a table and writes `<sweep dir>/multirun_summary.yaml`: for every job, the value the task function
    returned, its parameters (the overrides the sweep set: swept values, or drawn by a search), why it failed,
    and its run folder. Values are collected as jobs end, so this needs a launcher that runs jobs in this
    process, like Hydra's basic launcher (the default, and what the Optuna sweeper launches trials with).

    A sweep stopped by Ctrl-C or preemption never reaches Hydra's end-of-multirun callbacks: the task calls
    `stopped` instead, which writes the summary of the jobs so far, the stopped one listed as failed.

    Args:
        metric: Name of the value the task function returns, for the table.
        direction: "minimize" or "maximize": which value is the best.
        require_value: Whether a job that returns no value, or NaN, failed: as in a search, which ranks its
            trials by the value (Optuna fails such a trial); a grid of runs may not log it.

    Attributes:
        running: The summary of the multirun in progress in this process, if any.
    """

    running: SweepSummary | None = None

    def __init__(self, metric: str, direction: str = "minimize", require_value: bool = False) -> None:
        if direction not in ("minimize", "maximize"):
            # Hydra would print a ValueError here with the traceback of its callbacks' instantiation.
            exit_with_error(
                f"hydra.sweeper.direction (or hydra.callbacks.summary.direction) must be minimize or maximize, "
                f"got {direction!r}"
            )
        self.metric = metric
        self.direction = direction
        self.require_value = require_value
        self.jobs: list[dict[str, Any]] | None = None  # a list from the start of a multirun
        self.command_line: dict[str, Any] = {}  # key: its value, or _SWEPT

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        SweepSummary.running = self
        self.jobs = []
        # The sweep's own command line: a job's override that it does not set to that value is one of the job's
        # parameters (a value of `key=a,b`, or drawn by a search), even where every job has the same.
        self.command_line = {
            override.key_or_group: _SWEPT if override.is_sweep_override() else override.value()
            for override in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        }

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.jobs is None:  # a single run (conf/train.yaml configures this callback for every run)
            return
        completed = job_return.status == JobStatus.COMPLETED
        # A failed job's return_value re-raises its exception, and says so on stderr: read where it is kept.
        value = job_return.return_value if completed else job_return._return_value
        reason = None
        if not completed:
            reason = first_line(value)
        elif isinstance(value, FailedJob):
            reason = value.reason
        elif self.require_value and (value is None or math.isnan(float(value))):
            reason = f"{self.metric} was not logged" if value is None else f"{self.metric} is nan"
        self._add_job(job_return.hydra_cfg.hydra, job_return.overrides, reason, value)

    def stopped(self, reason: str) -> None:
        """Adds the job in progress as failed for `reason` and writes the summary of the jobs so far."""
        if self.jobs is None:
            return
        hydra_cfg = HydraConfig.get()
        log.warning("The sweep ends at job %s, %s: the summary lists the jobs so far", hydra_cfg.job.num, reason)
        self._add_job(hydra_cfg, hydra_cfg.overrides.task, reason, None)
        self._write(Path(hydra_cfg.sweep.dir))

    def _add_job(self, hydra_cfg: DictConfig, overrides: Iterable[str] | None, reason: str | None, value: Any) -> None:
        assert self.jobs is not None
        parsed = OverridesParser.create().parse_overrides(list(overrides or []))
        self.jobs.append(
            {
                "job": int(hydra_cfg.job.num),
                "failed": reason is not None,
                "reason": reason,
                "value": None if reason is not None or value is None else float(value),
                "params": {  # as typed on the command line: numbers stay numbers in the summary's YAML
                    override.key_or_group: override.value()
                    for override in parsed
                    if self.command_line.get(override.key_or_group, _NOT_SET) != override.value()
                },
                "output_dir": str(hydra_cfg.runtime.output_dir),
            }
        )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        SweepSummary.running = None
        failed = self._write(Path(config.hydra.sweep.dir))
        if failed:
            # After the summary is written: a sweep with failed jobs is a failed command, for scripts and CI.
            raise SystemExit(1)

    def _write(self, sweep_dir: Path) -> list[int]:
        """Writes and logs the summary of the jobs so far; returns the failed ones."""
        if not self.jobs:
            return []
        swept = sorted({key for job in self.jobs for key in job["params"]})
        trials = [
            {
                "job": job["job"],
                "failed": job["failed"],
                "reason": job["reason"],
                "value": job["value"],
                "params": {key: job["params"].get(key) for key in swept},
                "output_dir": job["output_dir"],
            }
            for job in self.jobs
        ]
        scored = [trial for trial in trials if trial["value"] is not None and not math.isnan(trial["value"])]
        pick = min if self.direction == "minimize" else max
        best = pick(scored, key=lambda trial: trial["value"]) if scored else None
        path = sweep_dir / "multirun_summary.yaml"
        summary = {"metric": self.metric, "direction": self.direction, "best": best, "trials": trials}
        # Written whole or not at all: a second Ctrl-C while a stopped sweep writes it left half a YAML file.
        partial = path.with_name(f".{path.name}.partial")
        try:
            OmegaConf.save(OmegaConf.create(summary), partial)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)

        lines = [f"Multirun summary ({self.metric}, {self.direction}), saved to {path}:"]
        for trial in trials:
            value = "failed" if trial["failed"] else "-" if trial["value"] is None else f"{trial['value']:.4f}"
            params = " ".join(f"{key}={override_text(setting)}" for key, setting in trial["params"].items())
            reason = f"  ({trial['reason']})" if trial["failed"] else ""
            lines.append(f"  job {trial['job']:>3}  {value:>9}  {params}{reason}".rstrip())
        if best is not None:
            lines.append(f"Best: job {best['job']}, {self.metric} = {best['value']:.4f}, in {best['output_dir']}")
        log.info("\n".join(lines))
        failed = [trial["job"] for trial in trials if trial["failed"]]
        if failed:
            log.error("%d of %d jobs failed: %s", len(failed), len(trials), failed)
        return failed


def check_added_keys(cfg: DictConfig, script: str) -> None:
    """Raises `UserError` for a top-level key added on the command line (`+ckpt_pth=...`) that nothing reads.

    Hydra takes any key with `+`: a misspelt setting would be ignored, and the run go on without it. Keys of
    the groups (`+trainer.limit_train_batches`) are checked by what they configure.
    """
    hydra_cfg = HydraConfig.get()
    for override in hydra_cfg.overrides.task:
        if not override.startswith("+"):
            continue
        key = override.lstrip("+").split("=", 1)[0]
        if "." in key or "/" in key or key in hydra_cfg.runtime.choices:  # a group's key, or a group: `+experiment=`
            continue
        close = difflib.get_close_matches(key, [name for name in cfg if name != key], n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UserError(f"{key} is not a setting of {script} (added with {override.split('=', 1)[0]}){hint}")


def override_text(value: Any) -> str:
    """`value` as a command-line override would give it (`null`, `true`, `[1, 2]`), for tables and refusals."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, list):
        return f"[{', '.join(map(override_text, value))}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {override_text(item)}" for key, item in value.items()) + "}"
    return str(value)
