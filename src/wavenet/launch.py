"""Lightning's DDP launcher under Hydra multirun.

Lightning's `ddp` strategy starts ranks 1..N-1 by re-running the script with the original command line
plus `hydra.run.dir=<run dir>`. Under `-m`, that command line is the whole sweep: every rank would start
a sweep of its own, in a second sweep folder. This module makes the ranks re-run only their own job:
the job's overrides, without `-m`, into the job's own folder. And since multirun jobs share one process,
it undoes what a DDP job leaves behind there (the process group, the rank variables) before the next job.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import __main__
import torch.distributed
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_original_cwd, to_absolute_path
from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
from lightning.pytorch.strategies.launchers import subprocess_script as trainer_launcher

_lightning_command = fabric_launcher._hydra_subprocess_cmd
# What Lightning's launcher sets in the launching process's environment; left there, the next job would
# take LOCAL_RANK as a sign that its ranks were started by someone else, and wait for them forever.
_LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


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
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
