"""How the processes that train and generate end."""

from __future__ import annotations

import atexit
import gc


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
