"""The Optuna sweeper of hydra-optuna-sweeper, for searches in which settings may refuse a trial.

`conf/hparams_search/optuna.yaml` selects it, as `hydra_plugins.wavenet_sweeper.OptunaSweeper` (the one place
Hydra takes sweepers from). It differs from the plugin's own in these ways:
- `n_trials` or `n_jobs` below 1 is refused in one line before any trial (the plugin ran no trial and
  ended in a traceback, or divided by zero); so is a `storage` that cannot be opened, or whose study was
  made for the other direction;
- it writes `multirun.yaml` to the sweep folder, as Hydra's own sweeper does: the record by which a second
  sweep into that folder is refused (`wavenet.config.FreshRunFolder`), instead of mixing its trials' files
  with the first one's;
- a study continued from `storage` gets new trials: its sampler, seeded from `${seed}`, would draw the
  trials it drew the first time again, so it is reseeded with the seed and the number of trials so far;
- a search in which no trial completed ends like any other sweep: Hydra's end-of-multirun callbacks still
  run, so `wavenet.config.SweepSummary` writes the summary, lists the failed trials and exits non-zero (the
  plugin raised Optuna's "No trials are completed yet" when asking for the best trial, before them);
- a search stopped before its end (Ctrl-C, preemption, an error) tells the study that its trials still running
  failed, as Optuna's own `optimize` does (the plugin left them running in a `storage` study forever);
- a study continued from `storage` with other choices for a parameter (`choice(4,8)`, then `choice(-1,4)`), which
  Optuna cannot do, is refused in one line naming the parameter and the study's choices, and leaves the sweep
  folder as it found it (the plugin ended in a traceback naming neither);
- so is a study continued from `storage` with other fixed settings (`trainer.max_steps`, `model=`) than those its
  completed trials ran with, naming them (the plugin ranked trials whose values do not compare as one study);
- a trial that failed (refused with a `UserError`, or raised: `train.py` returns a `FailedJob`), returned
  NaN (the plugin then crashed in Optuna 2.10) or no value is logged as `Trial <job> failed: <reason>`, in
  place of the plugin's lines about a return value that is not a number, and the search goes on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as PluginOptunaSweeper
from omegaconf import DictConfig, OmegaConf

from wavenet.config import override_text
from wavenet.errors import FailedJob, UserError, counted, exit_with_error, first_line

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

# Optuna 2.10's messages for the best trial of a study in which none completed: in memory, and in a database.
_NO_COMPLETED_TRIAL = {"No trials are completed yet.", "Record does not exist."}


class OptunaSweeper(PluginOptunaSweeper):
    """`hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper`, with the same settings."""

    def __init__(self, n_trials: int, n_jobs: int, **kwargs: Any) -> None:
        for key, value in (("n_trials", n_trials), ("n_jobs", n_jobs)):
            if value < 1:
                exit_with_error(f"hydra.sweeper.{key} must be a positive integer, got {value}")
        super().__init__(n_trials=n_trials, n_jobs=n_jobs, **kwargs)
        self.failures = _FailedTrials()

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.failures.launcher = self.sweeper.launcher
        self.sweeper.launcher = self.failures

    def sweep(self, arguments: list[str]) -> None:
        impl = self.sweeper
        arguments = _let_the_command_line_win(impl, arguments)
        if impl.storage is not None:
            self._continue_study(impl, arguments)
        sweep_dir = Path(impl.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(impl.config, sweep_dir / "multirun.yaml")
        plugin_log = logging.getLogger("hydra_plugins.hydra_optuna_sweeper._impl")
        plugin_log.addFilter(self.failures)
        asked = _remember_asked_trials(impl)
        try:
            try:
                super().sweep(arguments)
            except BaseException as error:
                _fail_unfinished(asked)
                if not isinstance(error, _ChangedSearchSpace):  # refused: no trial of this search ran
                    _save_best_so_far(asked, sweep_dir)
                raise
        except _ChangedSearchSpace as error:
            # Refused before any trial ran, it leaves the sweep folder as it found it (discard_refused_sweep).
            exit_with_error(f"hydra.sweeper.storage={impl.storage}: {error}")
        except ValueError as error:
            if str(error) not in _NO_COMPLETED_TRIAL:
                raise
            log.warning("No trial of the sweep completed: no best parameters, no optimization_results.yaml")
        finally:
            plugin_log.removeFilter(self.failures)

    @staticmethod
    def _continue_study(impl: Any, arguments: list[str]) -> None:
        """Opens the study in `impl.storage` as the plugin will (one line for a storage or direction that does
        not do), refuses it where its trials ran with other fixed settings (`_check_fixed_settings`), and reseeds
        the sampler where the study has trials already."""
        import optuna  # Hydra imports this module at every start, to list its plugins: Optuna only for a search

        try:
            study = optuna.create_study(
                study_name=impl.study_name,
                storage=impl.storage,
                directions=impl._get_directions(),
                load_if_exists=True,
            )
        except Exception as error:  # noqa: BLE001 (SQLAlchemy's errors, of many types; Optuna's ValueError)
            exit_with_error(f"hydra.sweeper.storage={impl.storage}: {first_line(error)}")
        try:
            _check_fixed_settings(study, impl, arguments)
        except _ChangedSettings as error:
            exit_with_error(f"hydra.sweeper.storage={impl.storage}: {error}")
        trials = len(study.trials)
        sampler = impl.config.hydra.sweeper.get("sampler")
        if trials and sampler is not None and sampler.get("seed") is not None:
            seed = (int(sampler.seed) + trials) % 2**32
            impl.sampler = instantiate(sampler, seed=seed)
            continued = counted(trials, "trial")
            log.info("Continuing study %s after its %s, with sampler seed %d", study.study_name, continued, seed)


def _let_the_command_line_win(impl: Any, arguments: list[str]) -> list[str]:
    """Returns the last override of each key in `arguments`, and drops the entries of the config's search space
    (`hydra.sweeper.params`) for the keys they give: the command line wins over a config, and its last value of a
    key over earlier ones, as everywhere else in Hydra. Refuses a key that the command line gives both as an entry
    of the search space and on its own (`wavenet.config.SweptOnce` refuses a sweep followed by another value).

    The plugin let a fixed value win over a search wherever each came from: `model.lr=choice(1e-3,3e-3)` lost to a
    `model.lr: 1e-3` entry of a config, and to `model.lr=1e-3` before it on the command line.
    """
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(arguments)
    last = {override.key_or_group: index for index, override in enumerate(parsed)}
    given = {override.key_or_group: override.input_line for override in parsed}
    entries: dict[str, str] = {}  # given on the command line: key -> the override that gives it
    for override in parser.parse_overrides(list(impl.config.hydra.overrides.hydra)):
        key = override.key_or_group
        if key == "hydra.sweeper.params" and isinstance(override.value(), dict):
            entries.update(dict.fromkeys(map(str, override.value()), override.input_line))
        elif key.startswith("hydra.sweeper.params."):
            entries[key.removeprefix("hydra.sweeper.params.")] = override.input_line
    twice = sorted(entries.keys() & given.keys())
    if twice:
        key = twice[0]
        exit_with_error(f"{entries[key]} and {given[key]} both give {key} on the command line: give one of them")
    impl.params = {key: value for key, value in (impl.params or {}).items() if key not in given}
    return [arguments[index] for index in sorted(last.values())]


# What a trial's value does not depend on: where things are written, how a run is logged and shown, how many
# processes read the data, and whether it trains at all (train=false, a check of the command: its trials fail).
_NOT_COMPARED = (
    "hydra", "paths", "logger", "tags", "task_name", "train", "data.num_workers", "data.prepare_workers",
    "callbacks.progress_bar", "callbacks.model_summary", "callbacks.model_checkpoint", "callbacks.interrupt_checkpoint",
    "callbacks.lr_monitor", "callbacks.training_monitor", "callbacks.audio_samples",
)  # fmt: skip
_UNSET = object()  # a setting the config does not have


class _ChangedSettings(UserError):
    """A search whose fixed settings differ from those the completed trials of its study ran with."""


def _check_fixed_settings(study: optuna.Study, impl: Any, arguments: list[str]) -> None:
    """Raises `_ChangedSettings` where `study` has completed trials and a setting that this search does not vary
    (`trainer.max_steps`, the model's size) differs from the one they ran with: the study's best would rank values
    that do not compare. Else records this search's settings in the study (as user attributes), for the next one.

    A key searched in one search and fixed in another is no change; fixed at two values in two searches it is, even
    with a search of it between them: so the study keeps each key's latest fixed value, and the keys ever searched.
    """
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from optuna.trial import TrialState

    in_params = impl._parse_sweeper_params_config()  # `key=value` for each entry of hydra.sweeper.params
    distributions, fixed = create_params_from_overrides([*in_params, *arguments])
    searched = {name.lstrip("+~") for name in distributions if name not in fixed}  # a fixed value wins
    _, fixed_in_params = create_params_from_overrides(in_params)  # set in each trial's overrides, not in the config
    settings = {
        key: value
        for key, value in {**_settings(impl.config), **fixed_in_params}.items()
        if not _under(key, (*_NOT_COMPARED, *searched))
    }

    stored, searched_before = study.user_attrs.get("settings"), set(study.user_attrs.get("searched", ()))
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if stored is None and completed:
        log.warning("Study %s does not record the settings its trials ran with: this search's are taken for them",
                    study.study_name)  # fmt: skip
    elif stored is not None and completed:
        changed = [
            key
            for key in sorted(stored.keys() | settings.keys())
            if stored.get(key, _UNSET) != settings.get(key, _UNSET)
            and not (key not in stored and _under(key, searched_before))
            and not (key not in settings and _under(key, searched))
        ]
        if changed:
            shown = [f"{key}={_text(stored, key)} (this search: {_text(settings, key)})" for key in changed[:3]]
            more = f" and {counted(len(changed) - 3, 'more setting')}" if len(changed) > 3 else ""
            raise _ChangedSettings(
                f"the trials of study {study.study_name} ran with {', '.join(shown)}{more}, and a value compares only "
                "with those of the same settings: give a new hydra.sweeper.study_name, or the study's settings"
            )
    kept = {key: value for key, value in (stored or {}).items() if _under(key, searched)}
    study.set_user_attr("settings", {**kept, **settings})
    study.set_user_attr("searched", sorted(searched_before | searched))


def _settings(config: DictConfig) -> dict[str, Any]:
    """The settings of a sweep's `config` that a trial's value may depend on, by dotted key, resolved: without
    `_NOT_COMPARED`, and without those that interpolate a path of this machine (`${paths.data_dir}/prepared`)."""
    from omegaconf.errors import OmegaConfBaseException

    settings: dict[str, Any] = {}

    def add(raw: dict, prefix: str) -> None:
        for key, value in raw.items():
            name = f"{prefix}{key}"
            if _under(name, _NOT_COMPARED) or (isinstance(value, str) and ("${paths." in value or "${hydra:" in value)):
                continue
            if isinstance(value, dict):
                add(value, f"{name}.")
                continue
            try:
                resolved = OmegaConf.select(config, name)
            except OmegaConfBaseException:  # left to the trial to report
                resolved = value
            is_node = OmegaConf.is_config(resolved)  # a list
            settings[name] = OmegaConf.to_container(resolved, resolve=True) if is_node else resolved

    add(OmegaConf.to_container(config, resolve=False), "")
    return settings


def _text(settings: dict[str, Any], key: str) -> str:
    """The value of `key` in `settings` as an override gives it, or `unset`."""
    return override_text(settings[key]) if key in settings else "unset"


def _under(key: str, prefixes: Any) -> bool:
    """Whether `key` is one of `prefixes`, or a key inside one (`model.layers` inside `model`)."""
    return any(key == prefix or key.startswith(f"{prefix}.") for prefix in prefixes)


def _remember_asked_trials(impl: Any) -> list[optuna.trial.Trial]:
    """The list that the trials `impl` asks its study for are added to, as it asks for them.

    A parameter whose distribution differs from the one the study drew it from before raises
    `_ChangedSearchSpace` as its trial is given its parameters.
    """
    asked: list[optuna.trial.Trial] = []
    configure = impl._configure_trials  # every trial asked for goes through it before its job is launched

    def configure_and_remember(
        trials: list[optuna.trial.Trial], search_space: dict[str, optuna.distributions.BaseDistribution], *args: Any
    ) -> Any:
        asked.extend(trials)
        try:
            return configure(trials, search_space, *args)
        except ValueError:  # Optuna's message names neither the parameter nor the study
            _check_search_space(trials[0].study, search_space)
            raise

    impl._configure_trials = configure_and_remember
    return asked


class _ChangedSearchSpace(UserError):
    """A search space that the study continued from `storage` cannot take."""


def _check_search_space(study: optuna.Study, search_space: dict[str, optuna.distributions.BaseDistribution]) -> None:
    """Raises `_ChangedSearchSpace` for the first parameter of `search_space` that the earlier trials of `study` drew
    from a distribution that Optuna does not let it change to (other choices, or another kind of range)."""
    from optuna.distributions import check_distribution_compatibility

    trials = study.get_trials(deepcopy=False)
    for name, distribution in search_space.items():
        earlier = next((trial.distributions[name] for trial in trials if name in trial.distributions), None)
        if earlier is None:
            continue
        try:
            check_distribution_compatibility(earlier, distribution)
        except ValueError:
            # Of the same kind, they differ in their choices: a range may change its bounds.
            same = "the same choices" if type(earlier) is type(distribution) else f"{name} as {_sweep_text(earlier)}"
            raise _ChangedSearchSpace(
                f"study {study.study_name} has {name} as {_sweep_text(earlier)}, not {_sweep_text(distribution)}, and "
                f"Optuna cannot change that within a study: give a new hydra.sweeper.study_name, or {same}"
            ) from None


def _sweep_text(distribution: optuna.distributions.BaseDistribution) -> str:
    """`choice(4, 8)`, as a sweep override gives it; Optuna's own text for a range."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(distribution, CategoricalDistribution):
        return f"choice({', '.join(map(str, distribution.choices))})"
    return repr(distribution)


def _fail_unfinished(asked: Sequence[optuna.trial.Trial]) -> None:
    """Tells the study that the trials of a stopped search (Ctrl-C, preemption, a crash) that were still running
    failed, as Optuna's own `optimize` does: else a study kept in `storage` would hold them as running forever."""
    import optuna

    for trial in asked:
        running = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if trial.number not in {other.number for other in running}:
            continue
        try:
            trial.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        except Exception as error:  # noqa: BLE001 (a database error must not hide why the search stopped)
            log.warning("Optuna trial %d stays running in the study: %s", trial.number, first_line(error))
        else:
            log.warning("Optuna trial %d failed: the search stopped before it ended", trial.number)


def _save_best_so_far(asked: Sequence[optuna.trial.Trial], sweep_dir: Path) -> None:
    """For a search stopped before its end (Ctrl-C, preemption): `optimization_results.yaml`, as the plugin writes
    it at the end, from the trials that completed, marked `stopped: true`; nothing where none did."""
    if not asked or len(asked[0].study.directions) > 1:  # a Pareto front: the plugin's own end only
        return
    try:
        best = asked[0].study.best_trial
    except Exception:  # noqa: BLE001 (no trial completed; a database error must not hide why the search stopped)
        return
    results = {"name": "optuna", "best_params": best.params, "best_value": best.value, "stopped": True}
    OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
    log.info("Best parameters of the trials that completed: %s (value %s)", best.params, best.value)


class _FailedTrials(logging.Filter):
    """Stands in for the sweep's launcher to make each trial without a value (failed, NaN, not logged) a
    `FailedJob` logged in one line, and filters the plugin's log to drop its own lines about those trials."""

    def __init__(self) -> None:
        super().__init__()
        self.launcher: Launcher | None = None
        self.plugin_lines: set[str] = set()  # about the failed trials of the last batch launched

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.launcher is not None
        returns = self.launcher.launch(job_overrides, initial_job_idx)
        # A job that raised has a return_value that re-raises; the plugin reports those itself.
        completed = [ret for ret in returns if ret.status == JobStatus.COMPLETED]
        for ret in completed:
            metric = ret.cfg.get("optimized_metric") or "the value"
            if ret.return_value is None:
                ret.return_value = FailedJob(f"{metric} was not logged")
            elif not isinstance(ret.return_value, FailedJob) and math.isnan(float(ret.return_value)):
                # Told as a value, Optuna 2.10 fails the trial and raises, and the plugin's retry ends the search.
                ret.return_value = FailedJob(f"{metric} is nan")
        failed = [ret for ret in completed if isinstance(ret.return_value, FailedJob)]
        for ret in failed:
            log.warning("Trial %s failed: %s", ret.hydra_cfg.hydra.job.num, ret.return_value)
        # What hydra-optuna-sweeper 1.3 logs for a trial whose value is not a number.
        self.plugin_lines = {
            f"Failed experiment: Return value must be float-castable. Got '{ret.return_value}'." for ret in failed
        }
        return returns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        # The plugin's line for a batch with more failed trials than max_failure_rate allows: it then re-raises
        # the exceptions of the jobs that raised one, but a failed trial here has none, and the search goes on.
        too_many = message.startswith("Failed [") and " times out of " in message
        return message not in self.plugin_lines and not (self.plugin_lines and too_many)
