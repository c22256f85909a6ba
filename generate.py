"""Sample audio from a trained WaveNet: python generate.py ckpt_path=<checkpoint> [key=value ...]."""

import sys

import hydra
from omegaconf import DictConfig

from wavenet.config import end_refused_run
from wavenet.errors import Terminated, UserError, report_config_errors_in_one_line
from wavenet.process import (
    carry_on_past_a_closed_stdout,
    end_without_collecting_everything,
    stop_on_hangup,
    stop_signal,
)
from wavenet.tasks.generate_settings import check_settings


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    try:
        check_settings(cfg)  # before torch loads: a mistake costs a second
        # Imported here so `--help` and `--cfg job` answer without loading torch.
        from wavenet.tasks.generate import run

        run(cfg)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        end_refused_run(f"error: {error}")
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated:  # a SIGTERM, or a SIGHUP (the terminal hung up; stderr goes to /dev/null then)
        print(f"stopped by {stop_signal().name}", file=sys.stderr)
        sys.exit(128 + stop_signal())


if __name__ == "__main__":
    end_without_collecting_everything()
    carry_on_past_a_closed_stdout()
    stop_on_hangup()
    report_config_errors_in_one_line()
    try:
        main()
    except KeyboardInterrupt:  # before main's own handler: Hydra composing, torch loading
        print("interrupted", file=sys.stderr)
        sys.exit(130)
