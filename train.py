"""Train WaveNet: python train.py [group=option ...] [key=value ...] (see README.md)."""

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from wavenet.config import SweepSummary, end_refused_run
from wavenet.errors import FailedJob, UserError, first_line, report_config_errors_in_one_line
from wavenet.process import carry_on_past_a_closed_stdout, end_without_collecting_everything, stop_on_hangup

# What a job's exit status says stopped it: the task exits as a shell reports a command ended by the signal.
_STOPPED_BY = {130: "stopped by Ctrl-C", 143: "stopped by SIGTERM", 129: "stopped by SIGHUP (the terminal hung up)"}


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | FailedJob | None:
    # Imported here so `--help` and `--cfg job` answer without loading torch.
    from wavenet.tasks.train_settings import check_settings

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    job = f"job {HydraConfig.get().job.num}: " if multirun else ""
    try:
        check_settings(cfg)  # before torch and Lightning load: a mistake is answered in a second
        from wavenet.tasks.train import run

        return run(cfg)
    except UserError as error:
        print(f"error: {job}{error}", file=sys.stderr)
        end_refused_run(f"error: {job}{error}")
        if multirun:
            # One job of a sweep: the others still run; the sweep's summary lists this one as failed, with the
            # reason, and the sweep exits non-zero at its end.
            return FailedJob(str(error))
        sys.exit(1)
    except Exception as error:
        if not multirun:
            raise
        # A bug, or out of memory: the traceback goes to the console and the job's log, and the sweep goes on
        # (Hydra's launcher would stop an Optuna search here, and end a grid with a traceback, no summary).
        logging.getLogger(__name__).exception("%s%s", job, first_line(error))
        return FailedJob(first_line(error))
    except SystemExit as stop:  # Ctrl-C, SIGTERM or SIGHUP stopped training: a sweep stops with it, its summary written
        if multirun and SweepSummary.running is not None and stop.code in _STOPPED_BY:
            SweepSummary.running.stopped(_STOPPED_BY[stop.code])
        raise
    except KeyboardInterrupt:
        # Outside training (preparing data, with train=false), where Lightning's Ctrl-C handling is not in place.
        print("interrupted", file=sys.stderr)
        if multirun and SweepSummary.running is not None:
            SweepSummary.running.stopped(_STOPPED_BY[130])
        sys.exit(130)


if __name__ == "__main__":
    end_without_collecting_everything()
    carry_on_past_a_closed_stdout()
    stop_on_hangup()
    if not sys.stderr.isatty():
        # Optuna's log lines are coloured whatever the stream: no escape codes in a batch job's log file.
        os.environ.setdefault("NO_COLOR", "1")
    report_config_errors_in_one_line()
    try:
        main()
    except KeyboardInterrupt:  # before main's own handler: Hydra composing, torch loading
        print("interrupted", file=sys.stderr)
        sys.exit(130)
