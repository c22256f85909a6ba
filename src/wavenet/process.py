"""How the processes that train and generate end, and carry on past a closed output."""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys

from rich import get_console
from rich.console import Console


def end_without_collecting_everything() -> None:
    """Has the interpreter end without running its garbage collector over everything the imports made.

    As it ends, Python frees module after module and runs its cyclic garbage collector again and again over all
    that torch, Lightning and their imports made: 2 s at the end of every run and of every DDP rank, on 2 cores of
    an AMD EPYC (0.4 s without). Registered at start-up, this runs after every exit handler registered later
    (W&B's, the data loaders', temporary folders') and freezes the objects still alive out of the collector's reach;
    their memory goes back with the process. Only cyclic garbage left at exit is not finalised, which Python never
    promised (the tests' warm runs skip that whole clean-up, and write what fresh runs write).
    """
    atexit.register(gc.freeze)


# `python train.py | tee log` stopped by a Ctrl-C, which ends tee too, or `python train.py | head`: the reader of
# stdout is gone. Rich then raised SystemExit(1) into whatever printed (the config tree, the progress bar's hook
# on the stop, before the stop's checkpoint was saved), and logging printed a traceback for every line. Stdout goes
# to /dev/null instead, and the run, or its stop, goes on: its log file keeps every line.


def send_stdout_nowhere() -> None:
    """Points stdout at /dev/null, whose writes cannot fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def carry_on_past_a_closed_stdout(console: Console | None = None) -> None:
    """Has rich's `console` (by default its global one, which rich and Lightning's progress bar print with) send
    stdout to /dev/null where its reader has gone, not raise SystemExit(1)."""
    console = console or get_console()

    def on_broken_pipe() -> None:
        console.quiet = True
        send_stdout_nowhere()

    console.on_broken_pipe = on_broken_pipe


class ConsoleLogHandler(logging.StreamHandler):
    """The console's handler of Hydra's job logging (`conf/hydra/default.yaml`): `logging.StreamHandler`, which
    sends stdout to /dev/null where its reader has gone, rather than print a traceback for this and every line."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], BrokenPipeError) and self.stream is sys.stdout:
            send_stdout_nowhere()
            return
        super().handleError(record)


def log_to_files_only(logger: logging.Logger, level: int, message: str, *args: object) -> None:
    """Logs a line to the log files (Hydra's `<task>.log`) and not to the console, which shows it otherwise."""
    if not logger.isEnabledFor(level):
        return
    record = logger.makeRecord(logger.name, level, __file__, 0, message, args, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)
