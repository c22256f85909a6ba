"""Helpers for the Hydra entry points: checking, printing and instantiating composed configs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import rich.syntax
import rich.tree
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from wavenet.errors import UserError

log = logging.getLogger(__name__)


def check_required(cfg: DictConfig) -> None:
    """Raises `UserError` naming every required value (`???`) the user has not set."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        keys = ", ".join(missing)
        raise UserError(f"missing required value(s): {keys} (set them on the command line, e.g. {missing[0]}=...)")


@rank_zero_only
def print_config_tree(cfg: DictConfig, save_to: Path | None = None) -> None:
    """Prints the composed config as a tree, one branch per top-level key, and saves it to `save_to`."""
    tree = rich.tree.Tree("CONFIG", style="bold", guide_style="dim")
    for key, value in cfg.items():
        branch = tree.add(str(key), style="bold")
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        branch.add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
    rich.print(tree)
    if save_to is not None:
        save_to.parent.mkdir(parents=True, exist_ok=True)
        with save_to.open("w") as file:
            Console(file=file, width=120, color_system=None).print(tree)


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiates each entry of a config group that maps names to `_target_` configs (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if isinstance(entry, DictConfig) and "_target_" in entry]
