"""The network shapes of conf/model/<size>.yaml, for the benchmarks: they measure the models users train.

Imported by the scripts beside it (`python bench/<script>.py` puts bench/ first on sys.path).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
DIMENSIONS = ("layers", "stacks", "residual_channels", "dilation_channels", "skip_channels", "kernel_size")


def dimensions(size: str) -> dict[str, int]:
    """`WaveNet` arguments of conf/model/<size>.yaml (over conf/model_base.yaml)."""
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "model_base.yaml"), OmegaConf.load(CONF / "model" / f"{size}.yaml"))
    return {key: int(cfg[key]) for key in DIMENSIONS}


SIZES = {size: dimensions(size) for size in ("small", "medium", "large")}
