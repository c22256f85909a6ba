"""How the scripts' processes end: after every exit handler, without the collector walking all that was imported;
and how they carry on past a console that is gone.

(The fresh runs of tests/test_warm_python.py end so, and write what the warm runs write.)"""

import errno
import io
import logging
import subprocess
import sys

from rich.console import Console

from tests.conftest import REPO
from wavenet import process

ENDS_AND_SAYS_WHAT_WAS_FROZEN = """
import atexit, gc
atexit.register(lambda: print("the end:", gc.get_freeze_count() > 0))  # as logging's, registered at import
from wavenet.process import end_without_collecting_everything
end_without_collecting_everything()
# What a run registers later (W&B's, the data loaders', temporary folders') runs first, with the collector as ever.
atexit.register(lambda: print("a later handler:", gc.get_freeze_count() > 0))
"""


def test_the_objects_alive_at_the_end_are_frozen_after_the_exit_handlers_registered_later():
    result = subprocess.run([sys.executable, "-c", ENDS_AND_SAYS_WHAT_WAS_FROZEN], capture_output=True, text=True,
                            cwd=REPO, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["a later handler: False", "the end: True"]


class _HungUpTerminal(io.StringIO):
    """A console whose terminal hung up (a dropped ssh session): every write fails with EIO."""

    def write(self, text: str) -> int:
        raise OSError(errno.EIO, "Input/output error")


def test_a_console_whose_terminal_hung_up_is_sent_nowhere_rather_than_raise(monkeypatch):
    # Between a hangup and its SIGHUP (which the shell passes on), rich's next write raised OSError into the
    # progress bar's hook, and training failed there; logging printed a traceback for every line.
    sent = []
    monkeypatch.setattr(process, "send_nowhere", lambda stream=None: sent.append(stream))  # not pytest's stdout
    console = Console(file=_HungUpTerminal(), force_terminal=True)
    process.carry_on_past_a_closed_stdout(console)
    console.print("a progress bar's frame")
    assert console.quiet and sent == [None]  # stdout, rich's

    terminal = _HungUpTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    handler = process.ConsoleLogHandler(terminal)
    handler.handle(logging.makeLogRecord({"msg": "Validated at step 10"}))
    assert sent == [None, terminal]
