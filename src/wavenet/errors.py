"""Errors a user can cause and fix: bad paths, unreadable audio, wrong overrides."""

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
        return traceback.strip().splitlines()[-1].split(": ", 1)[-1] if worker and traceback.strip() else message


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
