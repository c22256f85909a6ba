"""Errors a user can cause and fix: bad paths, unreadable audio, wrong overrides."""

import difflib
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from wavenet.target_arguments import keyword_arguments

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
    """A SIGTERM (a scheduler preempting the job) stopped the work in progress; the entry point exits 143 (129 for a
    SIGHUP, which stops it as a SIGTERM does: see `wavenet.process.stop_on_hangup`).

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
    A sweep refused in one line before any job ran leaves no folder (`wavenet.config.discard_refused_sweep`).
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
                exit_with_error(
                    _search_space_line(error)
                    or _unknown_key_line(error)
                    or _unquoted_value_line(error)
                    or config_error_line(error)
                )
            except (ValueError, AssertionError) as error:
                # An AssertionError: OmegaConf's, at a search-space key set where there is no search space.
                line = _search_space_line(error) or (
                    _group_value_error_line(error) if isinstance(error, ValueError) else None
                )
                if line is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                exit_with_error(line)

        def composed_and_discarded_if_refused() -> Any:
            try:
                return composed()
            except SystemExit as stop:
                if stop.code == 1:
                    from wavenet.config import discard_refused_sweep  # which imports this module

                    discard_refused_sweep()
                raise

        return report(composed_and_discarded_if_refused)

    hydra_utils.run_and_report = run_and_report


def config_error_line(error: Exception) -> str:
    """Hydra's message for a config it cannot compose, in one line: without its config search path, a list of
    options on one line, and the reason of the OmegaConf error behind it (without its key and type lines)."""
    text = str(error).split("\nConfig search path:")[0]
    # Hydra 1.3's own messages link its 1.2 documentation.
    text = re.sub(r"https://hydra\.cc/docs/1\.\d+/", f"https://hydra.cc/docs/{_hydra_release()}/", text)
    options = re.compile(r"Available options in (.*?):\n((?:\t.*(?:\n|$))+)")
    text = options.sub(lambda match: f"options in {match[1]}: {', '.join(match[2].split())}", text)
    pieces = [line.strip().rstrip(".") for line in text.splitlines() if line.strip()]
    reason = getattr(error.__cause__, "msg", None)
    if reason:
        pieces.insert(1, str(reason).strip().splitlines()[0].rstrip("."))
    override = getattr(error, "override", None)
    return (f"{override}: " if override else "") + "; ".join(pieces)


def _hydra_release() -> str:
    from hydra import __version__

    return ".".join(__version__.split(".")[:2])


def _unquoted_value_line(error: Exception) -> str | None:
    """One line, with what to type instead, for an override whose value has a character that Hydra's grammar takes
    only quoted: `~` (`data.root=~/wavs`, which the shell does not expand after `=`), `<` or `>` (a placeholder
    such as `<time>` copied as it is), a letter outside ASCII (`data.root=/data/café`); None for any other error."""
    override = getattr(error, "override", None)
    if not isinstance(override, str) or not str(error).startswith("LexerNoViableAltException"):
        return None
    key, _, value = override.partition("=")
    # Shell quotes around the whole override (`'data.root=~/wavs'`) reach Hydra as the same text; its own quotes
    # around the value give the text as it is.
    quoted = f"\"{key}='{value}'\""
    placeholder = re.search(r"<[^<>=]*>", value)
    if placeholder:
        return f"{override}: {placeholder[0]} looks like a placeholder: replace it with the value it stands for"
    if "<" in value or ">" in value:
        return f"{override}: Hydra's override grammar takes < and > only quoted: {quoted}"
    if "~" not in value:
        if value.isascii():
            return None
        # A corpus under /data/café or /data/日本語: Hydra's own message names no character, nor that quotes take it.
        return f"{override}: Hydra's override grammar takes letters outside ASCII only quoted: {quoted}"
    if not value.startswith("~"):  # in a name, where it stays as it is once quoted
        return f"{override}: Hydra's override grammar takes ~ only quoted: {quoted}"
    # Quoted, Hydra gives `~` as it is: a path setting of this project's expands it, a folder of Hydra's does not.
    ways = [f"write {key}=$HOME{value[1:]} (the shell expands it)"] if value == "~" or value.startswith("~/") else []
    if not key.lstrip("+~").startswith(("hydra.", "paths.")):
        ways.append(f"quote it: {quoted}")
    return f"{override}: Hydra's override grammar takes ~ only quoted: " + (
        " or ".join(ways) or f"write the folder {value.split('/')[0]} stands for"
    )


_SEARCH_SPACE = "hydra.sweeper.params."


def _search_space_line(error: Exception) -> str | None:
    """One line for an override of an entry of a search space by its key (`hydra.sweeper.params.model.lr=0.1`);
    None for any other error.

    The entries' keys hold dots (`model.lr`), which an override reads as nested settings: Hydra answered that
    `hydra.sweeper.params.model` is no setting, and took a sweep of it for one over its own config.
    """
    swept = re.search(r"Sweeping over Hydra's configuration is not supported : '(.*)'$", str(error).strip())
    override = swept[1] if swept else getattr(_local_of_raising_frames(error, "override"), "input_line", None)
    if not isinstance(override, str) or not override.lstrip("+~").startswith(_SEARCH_SPACE) or "=" not in override:
        return None
    key, value = override.lstrip("+~").split("=", 1)
    searched = key.removeprefix(_SEARCH_SPACE)
    return (
        f"{key}: an override reads the dots of the search space's {searched} as nested settings; give "
        f"{searched}={value}, which replaces the search space's entry"
    )


def _unknown_key_line(error: Exception) -> str | None:
    """One line for an override of a key the config does not have (`trainer.max_step=20`, `modle=tiny`); None for
    any other error.

    Hydra's own message advises appending the key with `+`, which for a misspelt key only leads to a second error
    (`check_added_keys`, `instantiate_checked`): the `+` is advised here only where the key's config is built by a
    `_target_` that takes it, or that cannot be read without importing it.
    """
    script = Path(sys.argv[0]).name or "this script"
    message = str(error)
    unused_group = re.match(r"Could not override '([^']+)'\. No match in the defaults list", message)
    if unused_group:  # a config group that exists (for another script: `generate.py model=tiny`) but is not used
        return f"{unused_group[1]} is neither a setting nor a config group of {script}"
    cause = error.__cause__
    node = getattr(cause, "parent_node", None)
    name = getattr(cause, "key", None)
    if not message.startswith("Could not override '") or node is None or not isinstance(name, str):
        return None
    from omegaconf import DictConfig

    if not isinstance(node, DictConfig):
        return None
    prefix = node._get_full_key(None)
    key = f"{prefix}.{name}" if prefix else name
    override = getattr(_local_of_raising_frames(error, "override"), "input_line", None) or f"{key}=..."
    known = [str(setting) for setting in node if not str(setting).startswith("_")]
    if not prefix:  # the top level, where a misspelt group (`modle=tiny`) is missed too
        defaults = _local_of_raising_frames(error, "defaults_list")
        groups = getattr(getattr(defaults, "overrides", None), "known_choices", {})
        known += [group for group in groups if "/" not in group and group not in known]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"{key} is neither a setting nor a config group of {script}{hint}"
    target = node.get("_target_") if "_target_" in node else None
    parameters = keyword_arguments(target) if isinstance(target, str) else None
    if parameters is not None and name in parameters:
        return f"{key} is not in the config, and {target} takes it: add it with +{override.lstrip('+')}"
    close = difflib.get_close_matches(name, [*known, *(parameters or ())], n=1)
    unknown_parameters = target is not None and parameters is None
    fault = f"{key} is not in the config" if unknown_parameters else f"{key} is not a setting of {target or prefix}"
    if close:
        plus = "" if close[0] in known else "+"
        return f"{fault}; did you mean {plus}{prefix}.{close[0]}?"
    if unknown_parameters:
        return f"{fault}: if {target} takes {name}, add it with +{override.lstrip('+')}"
    return fault


def _local_of_raising_frames(error: BaseException, name: str) -> Any:
    """The value of local variable `name` in the innermost frame of `error`'s traceback that has one, else None."""
    frame, value = error.__traceback__, None
    while frame is not None:
        value = frame.tb_frame.f_locals.get(name, value)
        frame = frame.tb_next
    return value


def _group_value_error_line(error: ValueError) -> str | None:
    """One line for the ValueError Hydra raises, with a traceback, at a config group set to what is no option name
    (`logger=null`, as `callbacks.ema=null` turns a callback off; `model=1`); None for any other error."""
    if not str(error).startswith("Config group override must be a string or a list"):
        return None
    override = _local_of_raising_frames(error, "override")  # the override Hydra was reading: its message omits it
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


def counted(count: int, singular: str, plural: str | None = None) -> str:
    """`1 file`, `2 files`, `0 files`; `1 is`, `2 are` with `plural`: a count and the word that agrees with it."""
    return f"{count} {singular if count == 1 else plural or singular + 's'}"


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
