"""Shared fixtures: composed configs and a runner for `train.py` as users type it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

REPO = Path(__file__).resolve().parents[1]

# W&B must never reach for the network in tests; a test that checks offline runs sets its own mode.
os.environ.setdefault("WANDB_MODE", "disabled")

# A run of seconds: tiny model, CPU, validation twice, every step logged; with BUILTIN_SMALL, a small
# built-in dataset.
BUILTIN_SMALL = ["data.num_files=6", "data.seconds_per_file=2"]
TINY = [
    "model=tiny",
    "trainer=cpu",
    "trainer.log_every_n_steps=1",
    "data.chunk_length=256",
    "data.batch_size=4",
    "data.num_workers=0",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=2",
    "trainer.num_sanity_val_steps=0",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache of built-in datasets for the whole session, so each is synthesised once."""
    return tmp_path_factory.mktemp("data")


def compose_config(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """The config `train.py` / `generate.py` would run with, its run folder moved to `output_dir`."""
    GlobalHydra.instance().clear()
    with initialize(version_base="1.3", config_path="../conf"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # the task function never sees it either
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir)
        cfg.paths.root_dir = str(REPO)
    return cfg


def save_checkpoint(module: Any, path: Path, **extra: Any) -> Path:
    """Saves a `WaveNetModule` with what generate.py reads (its weights and hyperparameters), and `extra` keys."""
    import torch

    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), **extra}, path)
    return path


def run_script(
    script: str, *overrides: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Runs `python <script> overrides...` from the repository root, as a user would, with `env` added."""
    return subprocess.run(
        [sys.executable, script, *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` are skipped where there is no CUDA device (CI); `pytest -m gpu` runs them on one."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
