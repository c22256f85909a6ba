"""Entry-point tasks: `run(cfg)` for train.py and generate.py."""
