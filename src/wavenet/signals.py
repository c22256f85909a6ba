"""Signal handlers that are put back, and signals kept from helper processes: what the stops of training, of
generation, of the launchers and of the data preparation share."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from multiprocessing import resource_tracker
from types import FrameType
from typing import Any

Handler = Callable[[int, FrameType | None], Any]


def set_handler(signum: int, handler: Handler | int) -> Handler | int:
    """`signal.signal`, returning the handler to put back: for None (a handler set outside Python, which cannot be
    put back) the default."""
    previous = signal.signal(signum, handler)
    return signal.SIG_DFL if previous is None else previous


class Handling:
    """Within it, `handler` handles `signums`, and after it the handlers it replaced do again.

    Only the main thread can set handlers: elsewhere (a Trainer or a generation run from a thread) it leaves them
    as they are, and `previous` stays empty.

    Attributes:
        previous: The replaced handlers, by signal, while it is in force.
    """

    def __init__(self, handler: Handler, *signums: int) -> None:
        self.handler, self.signums = handler, signums
        self.previous: dict[int, Handler | int] = {}

    def __enter__(self) -> Handling:
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: set_handler(signum, self.handler) for signum in self.signums}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}


def start_resource_tracker_deaf_to_hangups() -> None:
    """Starts multiprocessing's resource tracker, unless it runs already, with SIGHUP blocked for good.

    The tracker (one process, which unlinks the semaphores and shared memory of processes that die) ignores Ctrl-C
    and SIGTERM, but not a hangup: sent to the whole job, it died of it and was started anew, with a warning that
    resources might leak and a traceback for each semaphore freed after ("KeyError: '/mp-...'"). Call it before
    the first use of multiprocessing that a hangup may follow: starting processes (spawned DDP ranks, a pool) or
    queues. A DataLoader starts it with SIGHUP blocked already (`SignalSafeLoader`).
    """
    if not hasattr(signal, "SIGHUP"):
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        resource_tracker.ensure_running()  # the tracker keeps the mask it starts with
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
