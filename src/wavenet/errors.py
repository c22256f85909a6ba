"""Errors a user can cause and fix: bad paths, unreadable audio, wrong overrides."""


class UserError(Exception):
    """A problem with the user's input; entry points print its message as one line and exit non-zero.

    The message must name the thing at fault (the file, the config key) and, where it helps, the fix.
    """
