"""Errors a user can cause and fix: bad paths, unreadable audio, wrong overrides."""

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

# How torch's `ExceptionWrapper` puts a worker's traceback into the message of the exception it re-raises.
_WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):"


class UserError(Exception):
    """A problem with the user's input; entry points print its message as one line and exit non-zero.

    The message must name the thing at fault (the file, the config key) and, where it helps, the fix.
    """

    def __str__(self) -> str:
        message = super().__str__()
        # Raised in a DataLoader worker, it reaches the main process re-raised by torch with the worker's whole
        # traceback in its message, ending in the line `wavenet.errors.UserError: <message>`.
        _, worker, traceback = message.partition(_WORKER_TRACEBACK)
        original = user_error_message(traceback) if worker else None
        return message if original is None else original


class Terminated(BaseException):
    """A SIGTERM (a scheduler preempting the job) stopped the work in progress; the entry point exits 143.

    A `BaseException`, as `KeyboardInterrupt` is: no `except Exception` on the way takes it for a failure.
    """


def exit_with_error(message: str) -> NoReturn:
    """Ends the process as the entry points end at a `UserError`: `error: <message>`, status 1.

    For Hydra callbacks and sweepers, which run outside the task function: Hydra would print an exception
    raised there with its traceback.
    """
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)


def report_config_errors_in_one_line() -> None:
    """Makes Hydra end at a config it cannot compose as the entry points end at a `UserError`: one line.

    An unknown option (`model=huge`) or key (`foo=1`), an override it cannot parse or merge: Hydra prints
    its message over several lines, then its config search path and a hint about HYDRA_FULL_ERROR, which
    still gives the whole traceback. Call before the `@hydra.main` function; other errors are left to Hydra.
    """
    import hydra._internal.utils as hydra_utils
    from hydra.errors import ConfigCompositionException, OverrideParseException

    report = hydra_utils.run_and_report

    def run_and_report(func: Callable[[], Any]) -> Any:
        def composed() -> Any:
            try:
                return func()
            except (ConfigCompositionException, OverrideParseException) as error:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                exit_with_error(config_error_line(error))
            except ValueError as error:
                line = _group_value_error_line(error)
                if line is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                exit_with_error(line)

        return report(composed)

    hydra_utils.run_and_report = run_and_report


def config_error_line(error: Exception) -> str:
    """Hydra's message for a config it cannot compose, in one line: without its config search path, a list of
    options on one line, and the reason of the OmegaConf error behind it (without its key and type lines)."""
    text = str(error).split("\nConfig search path:")[0]
    options = re.compile(r"Available options in (.*?):\n((?:\t.*(?:\n|$))+)")
    text = options.sub(lambda match: f"options in {match[1]}: {', '.join(match[2].split())}", text)
    pieces = [line.strip().rstrip(".") for line in text.splitlines() if line.strip()]
    reason = getattr(error.__cause__, "msg", None)
    if reason:
        pieces.insert(1, str(reason).strip().splitlines()[0].rstrip("."))
    override = getattr(error, "override", None)
    return (f"{override}: " if override else "") + "; ".join(pieces)


def _group_value_error_line(error: ValueError) -> str | None:
    """One line for the ValueError Hydra raises, with a traceback, at a config group set to what is no option name
    (`logger=null`, as `callbacks.ema=null` turns a callback off; `model=1`); None for any other error."""
    if not str(error).startswith("Config group override must be a string or a list"):
        return None
    frame, override = error.__traceback__, None
    while frame is not None:  # the override Hydra was reading, where it raised: its message does not name it
        override = frame.tb_frame.f_locals.get("override", override)
        frame = frame.tb_next
    if override is None or not hasattr(override, "key_or_group"):
        return f"{error}: a config group takes the name of one of its options"
    group = override.key_or_group
    return (
        f"{override.input_line}: {group} is a config group: give the name of one of its options (`--help` lists "
        f"them), or ~{group} to leave out a group that is optional"
    )


def user_error_message(traceback: str) -> str | None:
    """The message of the `UserError` a formatted traceback ends with (`wavenet.errors.UserError: <message>`),
    as another process reports it (a DataLoader worker, a spawned DDP rank); None if it ends with another error."""
    lines = traceback.strip().splitlines()
    if not lines:
        return None
    name, _, message = lines[-1].partition(": ")
    return message if name in {_qualified_name(cls) for cls in _user_errors(UserError)} else None


def _user_errors(cls: type) -> list[type]:
    return [cls, *(sub for direct in cls.__subclasses__() for sub in _user_errors(direct))]


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def is_integer(value: object) -> bool:
    """Whether a setting's value is an integer (not a bool, which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """Whether a setting's value is an int or a float (not a bool); it may be infinite or NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_can_write_in(key: str, folder: Path) -> Path:
    """Raises `UserError`, naming setting `key`, where `folder` cannot be made or written in by this process.

    Makes nothing: a run refused later leaves no folder behind.

    Returns:
        `folder`, or where it does not exist yet, the folder it would be made in.
    """
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot write to {key}={folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):  # also false on a read-only file system
        raise UserError(f"cannot write to {key}={folder}: {existing} is not writable")
    return existing


def first_line(error: BaseException) -> str:
    """`KeyError: 'state_dict'`: an exception in one line, its type first, as a `UserError` can quote it."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


class FailedJob:
    """What a job of a multirun returns when an error stopped it, so the sweep goes on without it: `reason`,
    one line (a `UserError`'s message, or the first line of another exception).

    Not a number, so the Optuna sweeper counts the trial as failed; `wavenet.config.SweepSummary` lists it
    as failed, with its reason (a job that ran but logged no metric returns None, which fails only a search
    that ranks trials by it) and makes the sweep exit non-zero.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __str__(self) -> str:
        return self.reason
