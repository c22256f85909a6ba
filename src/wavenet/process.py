"""How the processes that train and generate end, carry on past a closed output, and stop when their terminal
hangs up."""

from __future__ import annotations

import atexit
import errno
import gc
import logging
import os
import signal
import sys
from types import FrameType
from typing import TextIO

from rich import get_console
from rich.console import Console

log = logging.getLogger(__name__)


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
# A terminal that hung up (a dropped ssh session, a closed window) is gone the same way, but a write to it fails
# with EIO, not EPIPE; and it is stderr's too.


def _reader_gone(error: BaseException | None) -> bool:
    """Whether `error`, raised by a write to the console, says that nothing will read it: the reader of a pipe has
    gone (EPIPE), or the terminal has hung up (EIO)."""
    return isinstance(error, BrokenPipeError) or (isinstance(error, OSError) and error.errno == errno.EIO)


def send_nowhere(stream: TextIO | None = None) -> None:
    """Points `stream` (by default stdout) at /dev/null, whose writes cannot fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, (stream or sys.stdout).fileno())
    os.close(devnull)


def carry_on_past_a_closed_stdout(console: Console | None = None) -> None:
    """Has rich's `console` (by default its global one, which rich and Lightning's progress bar print with) send
    stdout to /dev/null where its reader has gone or its terminal hung up, not raise SystemExit(1) or OSError."""
    console = console or get_console()

    def on_broken_pipe() -> None:
        console.quiet = True
        send_nowhere()

    def check_buffer() -> None:
        # Rich's own write, which takes BrokenPipeError to its `on_broken_pipe` and lets every other OSError through:
        # a hung-up terminal's EIO, raised into the progress bar's hook (or its refresh thread) between the hangup
        # and its SIGHUP, failed the run there, before its stop had saved anything.
        try:
            type(console)._check_buffer(console)
        except OSError as error:
            if not _reader_gone(error):
                raise
            on_broken_pipe()

    console.on_broken_pipe = on_broken_pipe
    console._check_buffer = check_buffer  # type: ignore[method-assign]


class ConsoleLogHandler(logging.StreamHandler):
    """The console's handler of Hydra's job logging (`conf/hydra/default.yaml`): `logging.StreamHandler`, which
    sends its stream to /dev/null where its reader has gone or its terminal hung up, rather than print a traceback
    for this and every line."""

    def handleError(self, record: logging.LogRecord) -> None:
        if _reader_gone(sys.exc_info()[1]) and self.stream in (sys.stdout, sys.stderr):
            send_nowhere(self.stream)
            return
        super().handleError(record)


def _hung_up_terminal(stream: TextIO) -> bool:
    """Whether `stream` writes to a terminal that has hung up (which answers EIO to everything but a close)."""
    import termios  # POSIX only, as SIGHUP is

    try:
        termios.tcgetattr(stream.fileno())  # unlike a write, sends no SIGTTOU to a job in the background
    except termios.error as error:
        return error.args[0] == errno.EIO
    except (AttributeError, ValueError, OSError):  # replaced by one without a file descriptor, or closed
        return False
    return False  # a terminal that is still there


_hung_up = False
_hangups_stop: int | None = None  # the process that `stop_on_hangup` set up


def stop_signal() -> signal.Signals:
    """The signal that stopped this process other than by Ctrl-C, for its exit status (128 + it) and its messages:
    SIGHUP if its terminal hung up (see `stop_on_hangup`), else SIGTERM."""
    return signal.SIGHUP if _hung_up else signal.SIGTERM


def stop_on_hangup() -> None:
    """Has a SIGHUP stop this process as a SIGTERM does: wherever SIGTERM's handler stops it (at the end of the
    training step in progress, saving `interrupted.ckpt`; generation writing what it has made), with status 129.

    An ssh session that drops, a terminal window that closes: the terminal hangs up, and every process of the job
    in its foreground is sent SIGHUP (by the kernel, or by the shell that led the session), whose default ended the
    run at once, without a checkpoint or a line in its log file. The console is gone with the terminal: stdout and
    stderr, where they wrote to it, go to /dev/null, and the log file alone says why the run ended.

    A SIGHUP ignored from the start (`nohup python train.py`) stays ignored.
    """
    global _hangups_stop
    if not hasattr(signal, "SIGHUP") or signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:  # Windows has none
        return
    _hangups_stop = os.getpid()
    signal.signal(signal.SIGHUP, _stop_on_hangup)


def _stop_on_hangup(signum: int, frame: FrameType | None) -> None:
    global _hung_up
    if os.getpid() != _hangups_stop:
        # A process forked from the one that set this handler, and left with it (DataLoader workers ignore SIGHUP,
        # see `leave_stops_to`): the hangup reached that one too, which stops, and ends it. Its SIGTERM handler
        # here would be a copy of the trainer's.
        return
    if _hung_up:  # the shell's, then the kernel's as the shell ends: one stop
        return
    _hung_up = True
    gone = [stream for stream in (sys.stdout, sys.stderr) if _hung_up_terminal(stream)]
    for stream in gone:
        if stream is sys.stdout:
            get_console().quiet = True  # rich, and the progress bar: nothing to draw on
        send_nowhere(stream)
    stop = signal.getsignal(signal.SIGTERM)
    if not callable(stop):
        # Nothing is set up to stop yet (Hydra composing, torch importing), or any more: nothing to save, and a
        # SIGTERM would end the process by its default. It ends by the hangup's, as it always did.
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.raise_signal(signal.SIGHUP)
        return
    # `kill -HUP` leaves the terminal as it was; output sent to files (`> log 2>&1`) cannot tell.
    log.warning("SIGHUP%s: stopping as for SIGTERM", " (the terminal hung up)" if gone else "")
    stop(signal.SIGTERM, frame)


def log_to_files_only(logger: logging.Logger, level: int, message: str, *args: object) -> None:
    """Logs a line to the log files (Hydra's `<task>.log`) and not to the console, which shows it otherwise."""
    if not logger.isEnabledFor(level):
        return
    record = logger.makeRecord(logger.name, level, __file__, 0, message, args, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)
