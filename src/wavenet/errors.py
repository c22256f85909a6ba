"""Errors a user can cause and fix: bad paths, unreadable audio, wrong overrides."""


class UserError(Exception):
    """A problem with the user's input; entry points print its message as one line and exit non-zero.

    The message must name the thing at fault (the file, the config key) and, where it helps, the fix.
    """


def first_line(error: BaseException) -> str:
    """`KeyError: 'state_dict'`: an exception in one line, its type first, as a `UserError` can quote it."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
