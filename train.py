"""Train WaveNet: python train.py [group=option ...] [key=value ...] (see README.md)."""

import sys

import hydra
from omegaconf import DictConfig

from wavenet.errors import UserError


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # Imported here so `--help` and `--cfg job` answer without loading torch.
    from wavenet.tasks.train import run

    try:
        return run(cfg)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
