"""`python train.py ...` for the tests, forked from an interpreter that has imported torch and Lightning once.

On 2 CPU cores most of an end-to-end run of train.py is its imports (~7 s: torch, then Lightning, which imports
torchmetrics, which imports torchvision and scipy), and the suite runs the scripts some eighty times. This
server, one per pytest process, imports those third-party packages and then forks a child per run. The child
takes the run's arguments, environment, working folder and output files and runs the script as `__main__`, so
that a run still has a process of its own, its own exit status, and our own package imported afresh: what the
runs share is what importing those packages did (tests/test_warm_python.py checks that a run prints and writes
the same as a fresh one).

Protocol, one JSON object per line: the client sends {"argv", "cwd", "env", "stdout", "stderr", "session"} (the
two paths are files for the child's output; `session`: the child leads a session of its own, as with Popen's
`start_new_session`, so that a test can signal its process group as a terminal or a scheduler does); the server
answers {"pid"} once the child is started, and {"pid", "status"} when it ends, its exit status as `subprocess`
gives it (negative: killed by that signal). Children run side by side: a test may start several.
"""

from __future__ import annotations

import atexit
import faulthandler
import gc
import json
import os
import runpy
import select
import signal
import sys
import threading
from typing import NoReturn


def _import_packages() -> dict[str, str]:
    """Imports what train.py and generate.py spend their start-up on; returns the environment variables those
    imports set."""
    before = dict(os.environ)
    import hydra  # noqa: F401
    import lightning.pytorch  # noqa: F401
    import numpy  # noqa: F401
    import omegaconf  # noqa: F401
    import soundfile  # noqa: F401
    import torch  # noqa: F401
    import torchaudio  # noqa: F401

    return {key: value for key, value in os.environ.items() if before.get(key) != value}


def _run_child(request: dict, set_by_imports: dict[str, str]) -> NoReturn:
    """In the forked child: becomes `python <argv>`, runs the script, and exits as that would."""
    if request.get("session"):
        os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update({**set_by_imports, **request["env"]})  # as those imports would have: where not set
    stdin = os.open(os.devnull, os.O_RDONLY)
    stdout = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    stderr = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    for source, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
        os.dup2(source, target)
        os.close(source)
    if request["env"].get("PYTHONUNBUFFERED"):
        sys.stdout.reconfigure(write_through=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if request["env"].get("PYTHONFAULTHANDLER"):  # what Python's start-up does for it
        faulthandler.enable()
    script, *_ = request["argv"]
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python script.py` has it
    _start_up_with_pythonpath(request["env"].get("PYTHONPATH", ""))
    try:
        runpy.run_path(os.path.abspath(script), run_name="__main__")  # __file__ absolute, as Python makes it
        status = 0
    except SystemExit as stop:
        status = _exit_status(stop.code)
    except BaseException:  # noqa: BLE001 (as Python ends a script: the traceback, then the status)
        sys.excepthook(*sys.exc_info())
        status = -signal.SIGINT if isinstance(sys.exc_info()[1], KeyboardInterrupt) else 1
    _exit(status)


def _start_up_with_pythonpath(pythonpath: str) -> None:
    """What Python's start-up does with the run's PYTHONPATH, where it names folders the server was not given:
    puts them on the path, after the script's, and imports the `sitecustomize` module found there."""
    added = [folder for folder in pythonpath.split(os.pathsep) if folder and folder not in sys.path]
    if not added:
        return
    sys.path[1:1] = added
    sys.modules.pop("sitecustomize", None)
    try:
        import sitecustomize  # noqa: F401
    except ImportError as error:
        if error.name != "sitecustomize":  # as `site` has it: a missing one is no error, a broken one is
            raise


def _exit_status(code: object) -> int:
    """The status `sys.exit(code)` ends Python with."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _exit(status: int) -> NoReturn:
    """Ends the child as Python's own exit does, less the tear-down of every module: in a fork of a process that
    has imported torch it touches (and so copies) most of the parent's memory, ~1.5 s of each run on 2 cores."""
    threading._shutdown()  # as at exit: non-daemon threads finish their work first
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    if status == -signal.SIGINT:  # Python ends a run stopped by an uncaught Ctrl-C as killed by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status)


def serve() -> None:
    # The protocol keeps stdin and stdout; what the imports print goes to stderr.
    requests = os.dup(0)
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)
    set_by_imports = _import_packages()
    # Out of the collector's reach in every child, whose collections no longer walk (and copy, page by page) all
    # that the imports made, and in this server, which then ends without walking it either (2 s, as train.py would
    # without wavenet.process).
    gc.freeze()
    print(json.dumps({"ready": True}), file=answers, flush=True)
    unread, running, more_requests = b"", set(), True
    while more_requests or running:  # the server ends at the end of its requests, once their runs have ended
        ready, _, _ = select.select([requests] if more_requests else [], [], [], 0.05)
        if ready:
            read = os.read(requests, 65536)
            more_requests = bool(read)
            unread += read
        while b"\n" in unread:
            line, unread = unread.split(b"\n", 1)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                os.close(requests)
                answers.close()
                _run_child(json.loads(line), set_by_imports)
            running.add(pid)
            print(json.dumps({"pid": pid}), file=answers, flush=True)
        for pid in list(running):
            ended, status = os.waitpid(pid, os.WNOHANG)
            if ended:
                running.remove(pid)
                print(json.dumps({"pid": pid, "status": os.waitstatus_to_exitcode(status)}), file=answers, flush=True)


if __name__ == "__main__":
    serve()
