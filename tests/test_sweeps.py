"""Recipes: every experiment config runs, an Optuna search reports its best trial and its refused ones, the W&B
sweep file's trials are valid train.py command lines."""

from __future__ import annotations

import math
import re
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from omegaconf import OmegaConf

from tests.conftest import BUILTIN_SMALL, REPO, TINY, compose_config, run_script, start_script, wait_for_file
from wavenet.tasks.train import run

EXPERIMENTS = sorted(path.stem for path in (REPO / "conf" / "experiment").glob("*.yaml"))


def write_speech_like(root: Path, files: int = 3, seconds: float = 1.0, rate: int = 16000) -> None:
    """Vowel-like buzz: harmonics of a gliding pitch shaped by three formants, in syllables of ~4 Hz."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    root.mkdir(parents=True, exist_ok=True)
    for index in range(files):
        pitch = 110 + 30 * index + 15 * np.sin(2 * np.pi * 2 * t)  # (T,) Hz
        phase = 2 * np.pi * np.cumsum(pitch) / rate
        formants = rng.uniform([300, 900, 2200], [800, 1800, 3000])
        voice = np.zeros_like(t)
        for k in range(1, 40):
            gain = sum(np.exp(-(((k * pitch - f) / 150) ** 2)) for f in formants)
            voice += gain * np.sin(k * phase) * (k * pitch < rate / 2)
        syllables = np.abs(np.sin(2 * np.pi * 4 * t + rng.uniform(0, np.pi))) ** 0.5
        audio = syllables * voice / np.abs(voice).max() + 0.01 * rng.standard_normal(t.shape)
        sf.write(root / f"speaker{index}.wav", (0.5 * audio).astype(np.float32), rate, subtype="PCM_16")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_runs_fast_dev_run(name, tmp_path, data_dir):
    recipe = compose_config("train", [f"experiment={name}"], tmp_path)
    assert recipe.tags and list(recipe.tags) != ["dev"], "an experiment tags its runs"
    OmegaConf.to_container(recipe, resolve=True)  # every interpolation of the recipe itself resolves
    if OmegaConf.is_missing(recipe.data, "root"):  # a folder of the user's audio
        write_speech_like(tmp_path / "audio")
        data = [f"data.root={tmp_path / 'audio'}", f"paths.data_dir={data_dir}"]
    else:
        data = [*BUILTIN_SMALL, f"paths.data_dir={data_dir}"]
    # Tiny and on the CPU, whatever the recipe's size and device: this checks that it runs, not how well.
    cfg = compose_config("train", [f"experiment={name}", *TINY, *data, "trainer.fast_dev_run=true"], tmp_path)
    assert cfg.tags == recipe.tags
    assert math.isfinite(run(cfg))


DEBUGS = sorted(path.stem for path in (REPO / "conf" / "debug").glob("*.yaml"))


@pytest.mark.parametrize("name", DEBUGS)
def test_debug_option_runs(name, tmp_path, data_dir):
    # Each on the tiny model for a few steps: overfit_batches once met a loader Lightning re-samples.
    cfg = compose_config("train", [f"debug={name}", *TINY, *BUILTIN_SMALL, f"paths.data_dir={data_dir}"], tmp_path)
    if not cfg.trainer.get("fast_dev_run"):
        cfg.trainer.max_steps, cfg.trainer.val_check_interval = 4, 2
    metric = run(cfg)
    assert metric is None or math.isfinite(metric)
    assert not list(tmp_path.rglob("*.ckpt"))  # callbacks=none: not even Lightning's own, in the logger's folder


@pytest.mark.parametrize("name", DEBUGS)
def test_debug_recipe_warns_of_nothing_and_keeps_the_chosen_logger(name, tmp_path, caplog):
    from wavenet.tasks.train import _warn_of_settings_that_waste_the_run

    cfg = compose_config("train", [f"debug={name}", "logger=tensorboard"], tmp_path)
    assert cfg.logger.tensorboard._target_.endswith("TensorBoardLogger")
    with caplog.at_level("WARNING"):
        _warn_of_settings_that_waste_the_run(cfg)
    assert not caplog.records, [record.getMessage() for record in caplog.records]


@pytest.mark.slow
def test_optuna_search_of_three_trials_reports_the_best(tmp_path, data_dir):
    sweep_dir = tmp_path / "optuna"
    result = run_script(
        "train.py", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3", *TINY, *BUILTIN_SMALL,
        # The search space's channels and layers, scaled down to the tiny model (chunk_length is fixed by TINY).
        "model.residual_channels=choice(4,8)", "model.layers=choice(4,6)", "logger=many",
        f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep_dir}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    optuna = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert set(optuna["best_params"]) == {"model.lr", "model.residual_channels", "model.layers"}
    summary = yaml.safe_load((sweep_dir / "multirun_summary.yaml").read_text())
    assert summary["metric"] == "val/bits_per_sample"
    values = [trial["value"] for trial in summary["trials"]]
    assert [trial["job"] for trial in summary["trials"]] == [0, 1, 2] and all(map(math.isfinite, values))
    assert optuna["best_value"] == summary["best"]["value"] == min(values)
    for trial in summary["trials"]:  # numbers, as drawn, not their text
        assert isinstance(trial["params"]["model.lr"], float) and isinstance(trial["params"]["model.layers"], int)
    assert "Best: job" in result.stdout + result.stderr
    assert "\x1b[" not in result.stderr  # Optuna colours its lines, also into a file
    for job in ("0", "1", "2"):  # each trial logged on its own
        assert (sweep_dir / job / "checkpoints" / "last.ckpt").is_file()
        assert len(list((sweep_dir / job / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_optuna_search_goes_on_past_a_refused_trial(tmp_path, data_dir):
    sweep_dir = tmp_path / "optuna"
    result = run_script(
        "train.py", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3", *TINY, *BUILTIN_SMALL,
        # TPE's first trials are random (seeded): 7 layers, which the model refuses (2 stacks), for some of them.
        "model.layers=choice(4,7)", "model.residual_channels=4", "trainer.max_steps=2", "trainer.val_check_interval=2",
        f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep_dir}",
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    summary = yaml.safe_load((sweep_dir / "multirun_summary.yaml").read_text())
    refused = [trial["job"] for trial in summary["trials"] if trial["params"]["model.layers"] == 7]
    assert [trial["job"] for trial in summary["trials"] if trial["failed"]] == refused
    assert 0 < len(refused) < 3, refused
    optuna = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert optuna["best_params"]["model.layers"] == 4 and optuna["best_value"] == summary["best"]["value"]
    # Each refused trial in one line of the sweep's log, not as a return value that is not a number.
    for job in refused:
        assert f"Trial {job} failed: model: layers (7) must be a multiple of stacks (2)\n" in result.stdout
    assert "float-castable" not in result.stdout + result.stderr


def test_optuna_search_in_which_no_trial_completes_ends_with_its_summary(tmp_path, data_dir):
    sweep_dir = tmp_path / "optuna"
    result = run_script(
        "train.py", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", "model.layers=choice(7,9)", *TINY,
        *BUILTIN_SMALL, f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep_dir}",
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("must be a multiple of stacks" in error for error in errors)  # one per trial
    summary = yaml.safe_load((sweep_dir / "multirun_summary.yaml").read_text())
    assert [(trial["job"], trial["failed"]) for trial in summary["trials"]] == [(0, True), (1, True)]
    assert summary["best"] is None and not (sweep_dir / "optimization_results.yaml").exists()
    assert result.stdout.rstrip().endswith("2 of 2 jobs failed: [0, 1]")  # after the summary's table


FAST_TRIAL = ["model.residual_channels=4", "model.layers=4", "trainer.max_steps=2"]


@pytest.mark.parametrize(
    "overrides,reason",
    [
        # Diverged in the update of the last step, whose loss (checked, as at every logged step) was finite.
        (["model.lr=1e30", "model.warmup_steps=0", "trainer.max_steps=1", "trainer.val_check_interval=1"],
         "val/bits_per_sample is nan"),  # fmt: skip
        (["trainer.limit_val_batches=0"], "val/bits_per_sample was not logged"),  # never validated
    ],
    ids=["nan", "not logged"],
)
def test_optuna_search_goes_on_past_trials_without_a_value_and_fails(tmp_path, data_dir, overrides, reason):
    sweep_dir = tmp_path / "optuna"
    result = run_script(
        "train.py", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", *TINY, *BUILTIN_SMALL, *FAST_TRIAL,
        *overrides, f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep_dir}",
    )  # fmt: skip
    # Optuna 2.10 raised at a NaN, and the plugin's retry ended the search in a traceback after the first trial.
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    summary = yaml.safe_load((sweep_dir / "multirun_summary.yaml").read_text())
    assert [(trial["failed"], trial["reason"]) for trial in summary["trials"]] == [(True, reason)] * 2
    for job in (0, 1):
        assert f"Trial {job} failed: {reason}\n" in result.stdout
    assert "float-castable" not in result.stdout + result.stderr


def test_a_job_that_raises_fails_alone_with_its_traceback_in_its_log(tmp_path, data_dir):
    sweep_dir = tmp_path / "sweep"
    result = run_script(
        "train.py", "-m", *TINY, *BUILTIN_SMALL, *FAST_TRIAL, "trainer.val_check_interval=2",
        # Lightning raises at the first validation for a monitored metric that is never logged.
        "callbacks.model_checkpoint.monitor=val/loss,val/nope", f"paths.data_dir={data_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    summary = yaml.safe_load((sweep_dir / "multirun_summary.yaml").read_text())
    assert [trial["failed"] for trial in summary["trials"]] == [False, True]
    assert summary["trials"][1]["reason"].startswith("MisconfigurationException: `ModelCheckpoint(monitor='val/nope')`")
    assert "Traceback" in (sweep_dir / "1" / "train.log").read_text()


def test_optuna_study_continued_from_storage_gets_new_trials_in_a_new_folder(tmp_path, data_dir):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"

    def search(folder: str, *settings: str) -> subprocess.CompletedProcess:
        return run_script(
            "train.py", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=1", *TINY, *BUILTIN_SMALL,
            *FAST_TRIAL, "train=false", f"paths.data_dir={data_dir}", f"hydra.sweep.dir={tmp_path / folder}",
            *settings,
        )  # fmt: skip

    first, second = (search(folder, f"hydra.sweeper.storage={storage}") for folder in ("first", "second"))
    assert first.returncode == second.returncode == 1  # train=false: no value, so no trial completed
    assert "Traceback" not in first.stderr + second.stderr, second.stderr[-3000:]
    # The sampler is seeded from ${seed}: continued as it was, it drew the first search's trials again.
    lrs = [re.search(r"#0 : model\.lr=(\S+)", result.stdout)[1] for result in (first, second)]
    assert lrs[0] != lrs[1] and "Continuing study wavenet after its 1 trial," in second.stdout, lrs
    for folder in ("first", "second"):
        assert yaml.safe_load((tmp_path / folder / "multirun.yaml").read_text())["hydra"]["sweeper"]["storage"]
        (trial,) = yaml.safe_load((tmp_path / folder / "multirun_summary.yaml").read_text())["trials"]
        assert list(trial["params"]) == ["model.lr"]  # what was drawn, even in a search of one trial

    again = search("first")  # a folder that holds a search is refused, not mixed with a second one
    assert again.returncode == 1
    assert again.stderr.splitlines() == [
        f"error: hydra.sweep.dir={tmp_path / 'first'} already holds a run (multirun.yaml): choose a new folder, or "
        "leave hydra.sweep.dir to its default (a new folder per run)"
    ]  # fmt: skip
    unusable = search("third", "hydra.sweeper.storage=sqlite:////nonexistent/folder/optuna.db")
    assert unusable.returncode == 1 and not (tmp_path / "third").exists()
    assert unusable.stderr.splitlines() == [
        "error: hydra.sweeper.storage=sqlite:////nonexistent/folder/optuna.db: OperationalError: "
        "(sqlite3.OperationalError) unable to open database file"
    ]  # fmt: skip


def study_storage(tmp_path: Path) -> str:
    """Where `stored_search` keeps its study."""
    return f"sqlite:///{tmp_path / 'optuna.db'}"


def stored_search(tmp_path: Path, data_dir: Path, folder: str, *settings: str) -> subprocess.CompletedProcess:
    """A search of one fast trial into `tmp_path / folder`, its study kept in `study_storage(tmp_path)`."""
    return run_script(
        "train.py", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=1", *TINY, *BUILTIN_SMALL, *FAST_TRIAL,
        f"paths.data_dir={data_dir}", f"hydra.sweeper.storage={study_storage(tmp_path)}",
        f"hydra.sweep.dir={tmp_path / folder}", *settings,
    )  # fmt: skip


def test_a_study_continued_with_other_choices_is_refused_in_one_line_and_its_trial_failed(tmp_path, data_dir):
    import optuna

    storage = study_storage(tmp_path)
    first = stored_search(tmp_path, data_dir, "first", "model.residual_channels=choice(4,8)", "train=false")
    assert first.returncode == 1 and "Traceback" not in first.stderr, first.stderr[-3000:]  # train=false: no value
    changed = stored_search(tmp_path, data_dir, "second", "model.residual_channels=choice(-1,4)", "train=false")
    assert changed.returncode == 1 and "Traceback" not in changed.stderr, changed.stderr[-3000:]
    refusal = (
        f"error: hydra.sweeper.storage={storage}: study wavenet has model.residual_channels as choice(4, 8), not "
        "choice(-1, 4), and Optuna cannot change that within a study: give a new hydra.sweeper.study_name, or the "
        "same choices"
    )
    assert [line for line in changed.stderr.splitlines() if line.startswith("error:")] == [refusal]
    assert changed.stderr.splitlines()[-1].startswith("error:")
    # The trial asked for is not left running in the study, and the folder is left for the search mended.
    study = optuna.load_study(study_name="wavenet", storage=storage)
    assert [trial.state for trial in study.trials] == [optuna.trial.TrialState.FAIL] * 2
    assert not (tmp_path / "second").exists()


def test_a_study_with_completed_trials_continued_with_other_choices_leaves_no_sweep_folder(tmp_path, data_dir):
    # Refused before any of its trials ran, the search writes no optimization_results.yaml of the earlier one's best
    # into its folder ("stopped: true", as if it had been stopped), which then kept the folder from being taken away.
    interval = "trainer.val_check_interval=2"
    first = stored_search(tmp_path, data_dir, "first", interval, "model.residual_channels=choice(4,8)")
    assert first.returncode == 0, first.stderr[-3000:]
    changed = stored_search(tmp_path, data_dir, "second", interval, "model.residual_channels=choice(-1,4)")
    assert changed.returncode == 1 and changed.stderr.splitlines()[-1].startswith("error:"), changed.stderr[-3000:]
    assert "Best parameters" not in changed.stdout + changed.stderr
    assert not (tmp_path / "second").exists()


def test_a_study_continued_with_other_fixed_settings_is_refused_in_one_line(tmp_path, data_dir):
    # Its trials and the earlier ones were ranked as one, though trained for other numbers of steps.
    import optuna

    storage = study_storage(tmp_path)

    def search(folder: str, *settings: str) -> subprocess.CompletedProcess:
        return stored_search(tmp_path, data_dir, folder, "trainer.val_check_interval=2", *settings)

    first = search("first")
    assert first.returncode == 0, first.stderr[-3000:]
    changed = search("second", "trainer.max_steps=3", "model.skip_channels=8")
    assert changed.returncode == 1 and "Traceback" not in changed.stderr, changed.stderr[-3000:]
    refusal = (
        f"error: hydra.sweeper.storage={storage}: the trials of study wavenet ran with model.skip_channels=16 (this "
        "search: 8), trainer.max_steps=2 (this search: 3), and a value compares only with those of the same "
        "settings: give a new hydra.sweeper.study_name, or the study's settings"
    )
    assert [line for line in changed.stderr.splitlines() if line.startswith("error:")] == [refusal]
    assert not (tmp_path / "second").exists()
    assert len(optuna.load_study(study_name="wavenet", storage=storage).trials) == 1
    # Where a trial writes and how it logs change nothing, nor does a check of the command (train=false).
    same = search("third", "logger=tensorboard", "train=false")
    assert "Continuing study wavenet after its 1 trial," in same.stdout, same.stderr[-3000:]
    assert "error:" not in same.stderr


def test_a_search_stopped_by_ctrl_c_leaves_no_trial_running_in_its_storage_and_writes_its_summary(tmp_path, data_dir):
    import optuna

    storage, sweep_dir = f"sqlite:///{tmp_path / 'optuna.db'}", tmp_path / "sweep"
    process = start_script("train.py", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", *TINY,
                           *BUILTIN_SMALL, *FAST_TRIAL[:2], "trainer.max_steps=100000", f"paths.data_dir={data_dir}",
                           f"hydra.sweeper.storage={storage}", f"hydra.sweep.dir={sweep_dir}")  # fmt: skip
    wait_for_file(sweep_dir / "0" / "checkpoints" / "last.ckpt", process)  # the first trial is training
    process.send_signal(signal.SIGINT)
    output = "".join(process.communicate(timeout=120))
    assert process.returncode == 130, output[-2000:]
    assert "Optuna trial 0 failed: the search stopped before it ended" in output
    study = optuna.load_study(study_name="wavenet", storage=storage)
    assert [trial.state for trial in study.trials] == [optuna.trial.TrialState.FAIL]
    # Hydra's end-of-sweep callbacks never ran, yet the summary of the trials so far is there.
    summary = yaml.safe_load((sweep_dir / "multirun_summary.yaml").read_text())
    assert [(trial["job"], trial["reason"]) for trial in summary["trials"]] == [(0, "stopped by Ctrl-C")]


def test_a_stopped_search_saves_the_best_of_the_trials_that_completed(tmp_path):
    # Its optimization_results.yaml was missing: the plugin writes it at the end only.
    import optuna

    from wavenet.sweeper import _save_best_so_far

    study = optuna.create_study(direction="minimize")
    for value in (7.5, 7.25):
        trial = study.ask()
        trial.suggest_categorical("model.layers", [4, 6])
        study.tell(trial, value)
    running = study.ask()  # the trial the stop cut short
    _save_best_so_far([running], tmp_path)
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert results == {"name": "optuna", "best_params": study.best_trial.params, "best_value": 7.25, "stopped": True}
    _save_best_so_far([optuna.create_study().ask()], tmp_path / "none")  # no trial completed: nothing
    assert not (tmp_path / "none").exists()


def test_the_summary_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    # A stopped sweep writes it on the way out, where a second Ctrl-C may cut the writing short.
    from wavenet import config

    summary = config.SweepSummary(metric="val/loss")
    job = {"failed": False, "reason": None, "params": {"model.lr": 0.1}, "output_dir": str(tmp_path)}
    summary.jobs = [{"job": 0, "value": 1.5, **job}]
    summary._write(tmp_path)
    written = (tmp_path / "multirun_summary.yaml").read_text()
    summary.jobs.append({"job": 1, "value": 1.25, **job})

    def cut_short(conf, path):
        Path(path).write_text("metric: val/loss\ntrials:\n- job: 0\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(config.OmegaConf, "save", cut_short)
    with pytest.raises(KeyboardInterrupt):
        summary._write(tmp_path)
    assert (tmp_path / "multirun_summary.yaml").read_text() == written
    assert [path.name for path in tmp_path.iterdir()] == ["multirun_summary.yaml"]


@pytest.mark.parametrize("setting", ["n_trials=0", "n_trials=-3", "n_jobs=0"])
def test_optuna_search_of_no_trials_is_refused_before_any(tmp_path, setting):
    sweep_dir = tmp_path / "optuna"
    result = run_script("train.py", "-m", "hparams_search=optuna", f"hydra.sweeper.{setting}", *TINY,
                        f"hydra.sweep.dir={sweep_dir}")  # fmt: skip
    key, value = setting.split("=")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: hydra.sweeper.{key} must be a positive integer, got {value}"]
    assert not sweep_dir.exists()


@pytest.mark.parametrize(
    "sweep",
    [["model.layer=4,6"], ["hparams_search=optuna", "hydra.sweeper.n_trials=1", "model.layer=choice(4,6)"]],
    ids=["grid", "optuna"],
)
def test_a_sweep_refused_before_any_job_ran_leaves_nothing_behind(tmp_path, sweep):
    # The sweepers write multirun.yaml before they compose a job: it refused the mended command in the same folder.
    named = tmp_path / "named"
    named.mkdir()
    (named / "notes.txt").write_text("the user's")
    for folder in (tmp_path / "made" / "sweep", named):
        result = run_script("train.py", "-m", *sweep, f"hydra.sweep.dir={folder}")
        assert result.returncode == 1
        assert result.stderr.splitlines()[-1] == (
            "error: model.layer is not a setting of wavenet.WaveNetModule; did you mean model.layers?"
        )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["named"]
    assert [path.name for path in named.iterdir()] == ["notes.txt"]


def test_a_sweep_refused_after_a_job_ran_is_kept(tmp_path, monkeypatch):
    from wavenet.config import FreshRunFolder, discard_refused_sweep

    for name in ("found", "made", "sweep_dir"):  # what the callback notes, as it was before this test
        monkeypatch.setattr(FreshRunFolder, name, getattr(FreshRunFolder, name))
    sweep_dir = tmp_path / "sweep"
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}})
    FreshRunFolder().on_multirun_start(config)
    (sweep_dir / "0").mkdir(parents=True)  # the job that ran (model=tiny) before one was refused (model=huge)
    (sweep_dir / "multirun.yaml").write_text("")
    discard_refused_sweep()
    assert sorted(path.name for path in sweep_dir.iterdir()) == ["0", "multirun.yaml"]


@pytest.mark.parametrize(
    "given,refusal",
    [
        (["model.lr=0.01,0.02", "model.lr=0.001"], "model.lr=0.001 would replace the sweep model.lr=0.01,0.02"),
        (["hparams_search=optuna", "model.lr=choice(0.01,0.02)", "model.lr=0.001"],
         "model.lr=0.001 would replace the sweep model.lr=choice(0.01,0.02)"),  # fmt: skip
        (["hparams_search=optuna", "hydra.sweeper.params={model.lr:'choice(0.01,0.02)'}", "model.lr=0.001"],
         "hydra.sweeper.params={model.lr:'choice(0.01,0.02)'} and model.lr=0.001 both give model.lr on the command "
         "line"),  # fmt: skip
    ],
    ids=["grid", "search", "search-space"],
)
def test_a_sweep_that_a_value_of_its_key_would_replace_is_refused(tmp_path, data_dir, given, refusal):
    # Hydra's sweeper kept the last of the two, Optuna's the plain value: either way a sweep of one value.
    sweep_dir = tmp_path / "sweep"
    trials = ["hydra.sweeper.n_trials=1"] if "hparams_search=optuna" in given else []
    result = run_script(
        "train.py", "-m", *given, *trials, *TINY, *BUILTIN_SMALL, "train=false", f"paths.data_dir={data_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == f"error: {refusal}: give one of them"
    assert not sweep_dir.exists()


def test_a_search_on_the_command_line_wins_over_a_value_before_it_and_an_entry_of_the_search_space_of_a_config():
    # The plugin let the value win wherever it came from: a search of model.lr that never varied it.
    from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides

    from wavenet.sweeper import _let_the_command_line_win

    impl = OptunaSweeperImpl(
        sampler=None, direction="minimize", storage=None, study_name="wavenet", n_trials=1, n_jobs=1,
        max_failure_rate=0.0, search_space=None, custom_search_space=None,
        params=OmegaConf.create({"model.lr": 1e-3, "model.layers": "choice(4, 6)", "data.chunk_length": "choice(1,2)"}),
    )  # fmt: skip
    impl.config = OmegaConf.create({"hydra": {"overrides": {"hydra": []}}})  # no hydra.sweeper.params= on it
    # As tests.conftest.TINY and a sweep after it give data.chunk_length.
    given = ["model=tiny", "data.chunk_length=256", "model.lr=choice(0.01,0.02)", "data.chunk_length=choice(256,512)"]
    arguments = _let_the_command_line_win(impl, given)
    searched, fixed = create_params_from_overrides([*impl._parse_sweeper_params_config(), *arguments])
    assert {name: list(distribution.choices) for name, distribution in searched.items()} == {
        "model.layers": [4, 6], "model.lr": [0.01, 0.02], "data.chunk_length": [256, 512]
    }  # fmt: skip
    assert fixed == {"model": "tiny"}


def test_wandb_sweep_trials_are_train_py_overrides(tmp_path):
    sweep = yaml.safe_load((REPO / "conf" / "wandb_sweep.yaml").read_text())
    train_cfg = yaml.safe_load((REPO / "conf" / "train.yaml").read_text())
    assert sweep["metric"] == {"name": train_cfg["optimized_metric"], "goal": "minimize"}
    assert sweep["program"] == "train.py" and (REPO / sweep["program"]).is_file()

    # One trial, expanded as `wandb agent` expands the command's macros.
    values = {}
    for name, space in sweep["parameters"].items():
        values[name] = space["values"][-1] if "values" in space else space["max"]
    macros = {
        "${env}": [],
        "${program}": [sweep["program"]],
        "${args_no_hyphens}": [f"{name}={value}" for name, value in values.items()],
    }
    command = [part for chunk in sweep["command"] for part in macros.get(chunk, [chunk])]
    assert command[:2] == ["python", "train.py"]
    cfg = compose_config("train", command[2:], tmp_path)
    assert "wandb" in cfg.logger
    for name, value in values.items():
        assert OmegaConf.select(cfg, name) == pytest.approx(value), name
    assert cfg.model.dilation_channels == cfg.model.residual_channels == 128


@pytest.mark.parametrize("sweep", [["seed=1,2"], ["hparams_search=optuna", "hydra.sweeper.n_trials=3"]])
def test_a_sweep_resuming_from_a_folder_is_refused_once_before_its_first_job(tmp_path, sweep):
    # Each job refused it: a search of 20 trials printed the error 20 times (and kept 20 failed trials).
    chain = tmp_path / "chain"
    (chain / "run").mkdir(parents=True)
    (chain / "run" / "last.ckpt").write_bytes(b"")
    result = run_script("train.py", "-m", *sweep, f"ckpt_path={chain}", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: ckpt_path={chain} is a folder, which resumes one chain of runs, not the jobs of a sweep: give each "
        "job the checkpoint file to resume from"
    ], result.stderr[-2000:]
    assert not (tmp_path / "sweep").exists()
