"""The network shapes of conf/model/<size>.yaml, for the benchmarks: they measure the models users train.

Imported by the scripts beside it (`python bench/<script>.py` puts bench/ first on sys.path).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

MODEL_CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
DIMENSIONS = ("layers", "stacks", "residual_channels", "dilation_channels", "skip_channels", "kernel_size")


def dimensions(size: str) -> dict[str, int]:
    """`WaveNet` arguments of conf/model/<size>.yaml (over _base.yaml)."""
    cfg = OmegaConf.merge(OmegaConf.load(MODEL_CONF / "_base.yaml"), OmegaConf.load(MODEL_CONF / f"{size}.yaml"))
    return {key: int(cfg[key]) for key in DIMENSIONS}


SIZES = {size: dimensions(size) for size in ("small", "medium", "large")}
