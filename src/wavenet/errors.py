"""Errors a user can cause and fix: bad paths, unreadable audio, wrong overrides."""

import sys
from typing import NoReturn

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


def exit_with_error(message: str) -> NoReturn:
    """Ends the process as the entry points end at a `UserError`: `error: <message>`, status 1.

    For Hydra callbacks and sweepers, which run outside the task function: Hydra would print an exception
    raised there with its traceback.
    """
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)


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


def first_line(error: BaseException) -> str:
    """`KeyError: 'state_dict'`: an exception in one line, its type first, as a `UserError` can quote it."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


class FailedJob:
    """What a job of a multirun returns when a `UserError` stopped it, so the sweep goes on without it.

    Not a number, so the Optuna sweeper counts the trial as failed; `wavenet.config.SweepSummary` lists it
    as failed (a job that ran but logged no metric returns None, which is not a failure) and makes the
    sweep exit non-zero.
    """

    def __init__(self, error: UserError) -> None:
        self.reason = str(error)

    def __str__(self) -> str:
        return self.reason
