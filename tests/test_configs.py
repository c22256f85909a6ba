"""Every option of every config group composes, and the parts it names can be built."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import BUILTIN_SMALL, REPO, TINY, checkpoint_lookalike, compose_config, run_script
from wavenet import WaveNetModule
from wavenet.tasks.train import auto_precision, resolve_auto_settings

CONF = REPO / "conf"
GROUPS = {group.name: sorted(p.stem for p in group.glob("*.yaml")) for group in CONF.iterdir() if group.is_dir()}
OPTIONS = [(group, option) for group, options in sorted(GROUPS.items()) for option in options]
REQUIRED = {("data", "folder"): ["data.root=/some/wavs"]}


def test_expected_groups_exist():
    for group in ["model", "data", "trainer", "logger", "callbacks", "paths", "hydra", "experiment", "debug"]:
        assert GROUPS.get(group), f"conf/{group}/ has no options"
    assert {"tiny", "small", "medium", "large"} <= set(GROUPS["model"])
    assert {"default", "cpu", "gpu", "ddp", "ddp_sim"} <= set(GROUPS["trainer"])
    assert {"csv", "tensorboard", "wandb", "many"} <= set(GROUPS["logger"])


def test_help_offers_the_options_of_each_group_and_nothing_else():
    result = run_script("train.py", "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    groups = result.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    offered = dict(line.split(": ", 1) for line in groups.splitlines() if ": " in line)
    assert offered["model"] == "large, medium, small, tiny"  # not the base every size inherits
    app_groups = [group for group in GROUPS if group != "hydra"]  # Hydra lists its own under --hydra-help
    assert offered == {group: ", ".join(GROUPS[group]) for group in app_groups}


def test_generate_help_offers_its_settings_not_the_training_groups():
    result = run_script("generate.py", "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("python generate.py ckpt_path=<checkpoint>")
    assert "Configuration groups" not in result.stdout and "trainer" not in result.stdout
    for key in ("ckpt_path", "num_samples", "batch_size", "temperature", "seed", "prime", "method", "precision"):
        assert f"\n{key}: " in result.stdout, key


@pytest.mark.parametrize("group,option", OPTIONS)
def test_option_composes_and_resolves(group, option, tmp_path):
    overrides = [f"{group}={option}", *REQUIRED.get((group, option), [])]
    cfg = compose_config("train", overrides, tmp_path)
    assert not OmegaConf.missing_keys(cfg.model) and not OmegaConf.missing_keys(cfg.trainer)
    container = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert container["model"]["sample_rate"] == container["data"]["sample_rate"]


@pytest.mark.parametrize("size", ["tiny", "small", "medium", "large"])
def test_model_sizes_instantiate(size, tmp_path):
    cfg = compose_config("train", [f"model={size}"], tmp_path)
    module = instantiate(cfg.model)
    assert isinstance(module, WaveNetModule)
    assert module.model.quantization_channels == cfg.data.quantization_channels == 256
    assert module.model.layers[0].filter_gate.in_channels == cfg.model.residual_channels
    # Hyperparameters are plain Python, so checkpoints load without OmegaConf.
    assert type(module.hparams.betas) is list


def test_loggers_and_callbacks_instantiate(tmp_path):
    cfg = compose_config("train", [*TINY, *BUILTIN_SMALL, "logger=many"], tmp_path)
    loggers = [instantiate(entry) for entry in cfg.logger.values()]
    assert {type(logger).__name__ for logger in loggers} == {"CSVLogger", "TensorBoardLogger", "WandbLogger"}
    callbacks = [instantiate(entry) for entry in cfg.callbacks.values() if entry is not None]
    assert {type(c).__name__ for c in callbacks} == {
        "ModelCheckpoint",
        "InterruptCheckpoint",
        "LearningRateMonitor",
        "EMA",
        "TrainingMonitor",
        "AudioSampleLogger",
    }


def test_audio_settings_are_defined_once(tmp_path):
    cfg = compose_config("train", ["data.sample_rate=22050", "data.quantization_channels=64"], tmp_path)
    assert cfg.model.sample_rate == 22050 and cfg.model.quantization_channels == 64


def test_auto_precision(monkeypatch, tmp_path):
    assert auto_precision("cpu") == "32-true"
    if not torch.cuda.is_available():
        assert auto_precision("auto") == "32-true"
    # As on a GPU machine: bf16-mixed by default there, for trainer=default (auto) and trainer=gpu alike.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert auto_precision("auto") == auto_precision("gpu") == "bf16-mixed"
    assert auto_precision("cpu") == "32-true"
    for trainer in ("default", "gpu"):
        cfg = compose_config("train", [f"trainer={trainer}"], tmp_path / trainer)
        resolve_auto_settings(cfg)
        assert cfg.trainer.precision == "bf16-mixed", trainer
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)  # before Ampere
    assert auto_precision("gpu") == "32-true"


def test_config_tree_lists_every_group(tmp_path):
    from wavenet.config import print_config_tree

    cfg = compose_config("train", TINY, tmp_path)
    print_config_tree(cfg, save_to=Path(tmp_path) / "tree.log")
    text = (Path(tmp_path) / "tree.log").read_text()
    for key in ["data", "model", "trainer", "callbacks", "logger", "paths"]:
        assert key in text


@pytest.mark.parametrize(
    "script,override,expected",
    [
        ("train.py", "model=huge", "Could not find 'model/huge'; options in 'model': large, medium, small, tiny"),
        ("train.py", "+experiment=nope", "Could not find 'experiment/nope'; options in 'experiment': music_medium"),
        ("train.py", "foo=1", "foo is neither a setting nor a config group of train.py"),
        ("train.py", "seed=[", "seed=[: no viable alternative at input '['"),
        ("train.py", "logger=null", "logger=null: logger is a config group: give the name of one of its options"),
        ("generate.py", "num_samples=1,2", "Ambiguous value for argument 'num_samples=1,2'; 1. To use it as a list"),
    ],
)
def test_a_config_hydra_cannot_compose_is_one_line(tmp_path, script, override, expected):
    result = run_script(script, override, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [f"error: {result.stderr.strip().removeprefix('error: ')}"], result.stderr
    assert expected in result.stderr and "Config search path" not in result.stderr, result.stderr
    # Hydra's way to the whole traceback still works.
    full = run_script(script, override, f"hydra.run.dir={tmp_path / 'run'}", env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 1 and "Traceback" in full.stderr, full.stderr


@pytest.mark.parametrize(
    "script,override,expected",
    [
        ("train.py", "data.root=~/wavs",
         ("data.root=~/wavs: Hydra's override grammar takes ~ only quoted: write data.root=$HOME/wavs (the shell "
          "expands it) or quote it: \"data.root='~/wavs'\"")),
        # Quoted, Hydra's folders would be named ~.
        ("train.py", "hydra.run.dir=~/runs",
         ("hydra.run.dir=~/runs: Hydra's override grammar takes ~ only quoted: write hydra.run.dir=$HOME/runs (the "
          "shell expands it)")),
        ("generate.py", "ckpt_path=outputs/train/runs/<time>/checkpoints/last.ckpt",
         ("ckpt_path=outputs/train/runs/<time>/checkpoints/last.ckpt: <time> looks like a placeholder: replace it "
          "with the value it stands for")),
        ("train.py", "data.root=/data/café/日本",
         "data.root=/data/café/日本: Hydra's override grammar takes letters outside ASCII only quoted: "
         "\"data.root='/data/café/日本'\""),
        ("train.py", "data.root=a&b",
         ("data.root=a&b: LexerNoViableAltException: data.root=a&b; ^; See "
          "https://hydra.cc/docs/1.3/advanced/override_grammar/basic for details")),
    ],
)  # fmt: skip
def test_a_value_hydra_takes_only_quoted_is_answered_with_what_to_type(tmp_path, script, override, expected):
    result = run_script(script, override, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 1 and result.stderr.splitlines() == [f"error: {expected}"], result.stderr
    assert not (tmp_path / "run").exists()


def test_both_ways_to_give_a_home_folder_that_the_error_advises_reach_it(tmp_path, monkeypatch):
    from wavenet.errors import UserError
    from wavenet.tasks.train_settings import check_settings

    monkeypatch.setenv("HOME", str(tmp_path))
    for root in ["'~/wavs'", f"{tmp_path}/wavs"]:  # quoted for Hydra; as the shell expands $HOME/wavs
        cfg = compose_config("train", ["data=folder", f"data.root={root}"], tmp_path / "run")
        with pytest.raises(UserError, match=f"data root {tmp_path}/wavs does not exist"):
            check_settings(cfg)


def test_a_path_outside_ascii_quoted_as_the_error_advises_is_the_data_root(tmp_path):
    cfg = compose_config("train", ["data=folder", "data.root='/data/café/日本'"], tmp_path / "run")
    assert cfg.data.root == "/data/café/日本"


THE_SETTING_MEANT = [
    ("train.py", ["trainer.max_step=20"],
     "trainer.max_step is not a setting of lightning.Trainer; did you mean trainer.max_steps?"),
    ("train.py", ["model.layer=10"],
     "model.layer is not a setting of wavenet.WaveNetModule; did you mean model.layers?"),
    ("train.py", ["callbacks.ema.decy=0.9"],
     "callbacks.ema.decy is not a setting of wavenet.ema.EMA; did you mean callbacks.ema.decay?"),
    ("train.py", ["modle=tiny"], "modle is neither a setting nor a config group of train.py; did you mean model?"),
    # An argument of lightning.Trainer that the config does not list, misspelt.
    ("train.py", ["trainer.enable_progres_bar=false"],
     "trainer.enable_progres_bar is not a setting of lightning.Trainer; did you mean +trainer.enable_progress_bar?"),
    ("generate.py", ["ckpt=x.ckpt"],
     "ckpt is neither a setting nor a config group of generate.py; did you mean ckpt_path?"),
    # A group of train.py's.
    ("generate.py", ["ckpt_path=x.ckpt", "model=tiny"], "model is neither a setting nor a config group of generate.py"),
    # The `+` is the way to pass an argument of the target that the config does not list.
    ("train.py", ["trainer.enable_progress_bar=false"],
     ("trainer.enable_progress_bar is not in the config, and lightning.Trainer takes it: add it with "
      "+trainer.enable_progress_bar=false")),
    ("train.py", ["logger=wandb", "logger.wandb.entity=me"],  # WandbLogger takes **kwargs, for wandb.init
     ("logger.wandb.entity is not in the config: if lightning.pytorch.loggers.WandbLogger takes entity, add it with "
      "+logger.wandb.entity=me")),
    # The search space's keys hold dots: Hydra said "did you mean" the key typed, that it swept its own config, or
    # (without a search space) failed an assertion, with a traceback.
    *[
        ("train.py", ["-m", *search, f"hydra.sweeper.params.model.lr={value}"],
         (f"hydra.sweeper.params.model.lr: an override reads the dots of the search space's model.lr as nested "
          f"settings; give model.lr={value}, which replaces the search space's entry"))
        for search, value in [(["hparams_search=optuna"], "0.1"), (["hparams_search=optuna"], "choice(0.1,0.2)"),
                              ([], "0.1")]
    ],
]  # fmt: skip


@pytest.mark.parametrize("script,overrides,expected", THE_SETTING_MEANT)
def test_a_key_the_config_lacks_is_named_with_the_setting_meant_not_a_plus_that_is_refused(
    tmp_path, script, overrides, expected
):
    result = run_script(script, *overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 1 and result.stderr.splitlines() == [f"error: {expected}"], result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "config,overrides,expected",
    [
        ("train", ["~model"], "model must be set, and the command line removed it (~model)"),
        ("generate", ["ckpt_path=x.ckpt", "~method"], "method must be set, and the command line removed it (~method)"),
        ("train", ["data.root=${oc.env:WAVENET_TEST_UNSET}"], "data.root: KeyError raised while resolving"),
        ("train", ["model.lr=${nope}"], "model.lr: Interpolation key 'nope' not found"),
    ],
)
def test_a_removed_setting_or_a_broken_interpolation_is_one_line(tmp_path, monkeypatch, config, overrides, expected):
    from wavenet.errors import UserError
    from wavenet.tasks import generate, train

    monkeypatch.delenv("WAVENET_TEST_UNSET", raising=False)
    cfg = compose_config(config, overrides, tmp_path / "run")
    with pytest.raises(UserError) as error:
        (train if config == "train" else generate).run(cfg)
    assert str(error.value).startswith(expected) and "\n" not in str(error.value), str(error.value)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_trainer_settings_the_readme_names_take_no_plus(tmp_path):
    cfg = compose_config("train", ["trainer=ddp", "trainer.num_nodes=4", "trainer.accumulate_grad_batches=2"], tmp_path)
    assert (cfg.trainer.num_nodes, cfg.trainer.accumulate_grad_batches) == (4, 2)


@pytest.mark.parametrize(
    ("modules", "absent"),
    [
        # Hydra loads the callbacks' module at every start, and train.py checks its settings before anything else.
        (["wavenet.config", "wavenet.tasks.train_settings", "hydra_plugins.wavenet_sweeper"], "torch"),
        (["wavenet.tasks.generate_settings"], "torch"),  # generate.py checks its settings before it loads torch
        # generate.py: importing Lightning (with torchmetrics, torchvision, scipy) took longer than generating.
        (["wavenet.tasks.generate"], "lightning"),
    ],
)
def test_what_runs_before_training_or_generating_leaves_the_slow_imports_out(modules, absent):
    loaded = f"sorted(name for name in sys.modules if name.split('.')[0] == {absent!r})"
    code = f"import sys; import {', '.join(modules)}; print({loaded})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", f"{absent} imported: {result.stdout[:300]}"


REFUSED_BEFORE_TORCH = [
    (script, [f"ckpt_path={{tmp}}/{name}"], expected)
    for script, folder_refused in [
        # A folder resumes from the checkpoint furthest on under it: one without any is a mistyped path.
        ("train.py", "ckpt_path={tmp}/folder is a folder with no checkpoint (*.ckpt) in it or below"),
        ("generate.py", "checkpoint {tmp}/folder is a folder"),
    ]
    for name, expected in [
        ("missing.ckpt", "checkpoint not found: {tmp}/missing.ckpt"),
        ("folder", folder_refused),
        ("notes.txt", "{tmp}/notes.txt is not a PyTorch checkpoint"),
        ("pipe", "checkpoint {tmp}/pipe is not a regular file"),  # reading it would wait for a writer
    ]
] + [
    ("train.py", ["data=folder", "data.root={tmp}/missing"], "data root {tmp}/missing does not exist"),
    ("train.py", ["data=vctk", "data.root={tmp}/notes.txt"], "data root {tmp}/notes.txt is not a directory"),
    ("train.py", ["data.batch_size=0"], "data.batch_size must be a positive integer, got 0"),
    ("train.py", ["model.lr=-1"], "model: lr must be positive, got -1"),
    ("train.py", ["data=streaming", "data.remote={tmp}", "data.shuffle_buffer=abc"], "data.shuffle_buffer must be a"),
    ("train.py", ["model=tiny", "model.stacks=4"], "model: layers (6) must be a multiple of stacks (4)"),
    ("train.py", ["data=folder", "data.root={tmp}", "data.val_fraction=1"], "data.val_fraction must be between 0 and 1"),
    ("train.py", ["data.root={tmp}"], "the built-in dataset makes its own audio and takes no data.root"),
    ("train.py", ["data.num_files=1"], "data.num_files must be at least 2 (one for validation), got 1"),
    ("train.py", ["data.seconds_per_file=0"], "data.seconds_per_file must be a number of seconds"),
] + [
    ("generate.py", ["ckpt_path={tmp}/archive.ckpt", *settings], expected)
    for settings, expected in [
        (["prime={tmp}/missing.wav"], "prime file not found: {tmp}/missing.wav"),
        (["prime={tmp}/pipe"], "prime {tmp}/pipe is not a regular file"),
        (["num_samples=0"], "num_samples must be a positive integer, got 0"),
        (["temperature=hot"], "temperature must be a number from 0 (greedy) to"),
        (["precision=16"], "precision must be 32 or bf16, got 16"),
    ]
]


@pytest.mark.parametrize("script,overrides,expected", REFUSED_BEFORE_TORCH)
def test_a_path_that_is_not_there_or_a_bad_setting_is_refused_before_torch_loads(tmp_path, script, overrides, expected):
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    os.mkfifo(tmp_path / "pipe")
    checkpoint_lookalike(tmp_path / "archive.ckpt")
    overrides = [override.format(tmp=tmp_path) for override in overrides]
    command = [sys.executable, "-X", "importtime", script, *overrides, f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected.format(tmp=tmp_path) in errors[0], result.stderr[-2000:]
    imports = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time")]
    assert "torch" not in imports
    assert not (tmp_path / "run" / "config_tree.log").exists()  # no config shown, no logger made


def test_a_folder_to_resume_from_is_refused_in_a_sweep(tmp_path):
    from wavenet.errors import UserError
    from wavenet.tasks.train_settings import check_settings

    chain = tmp_path / "chain"
    (chain / "run").mkdir(parents=True)
    checkpoint_lookalike(chain / "run" / "last.ckpt")
    single = compose_config("train", [f"ckpt_path={chain}"], tmp_path / "new")
    check_settings(single)  # one chain: resumed from its furthest checkpoint
    # Every job would resume from the same checkpoint, whatever its settings.
    sweep = compose_config("train", [f"ckpt_path={chain}", "hydra.mode=MULTIRUN"], tmp_path / "sweep" / "0")
    with pytest.raises(UserError, match=f"ckpt_path={chain} is a folder, which resumes one chain of runs, not"):
        check_settings(sweep)


def test_machine_settings_in_conf_local_override_the_defaults_and_are_not_committed(tmp_path):
    import shutil

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "local").mkdir(exist_ok=True)
    (conf / "local" / "default.yaml").write_text("seed: 7\ntrainer:\n  devices: 4\n")
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
        local = compose("train")
        overridden = compose("train", overrides=["seed=9"])
    GlobalHydra.instance().clear()
    assert (local.seed, local.trainer.devices, "local" in local) == (7, 4, False)
    assert overridden.seed == 9  # the command line over the machine's file
    # A group's option set as a value (model: medium) replaced the group's settings by a string: a traceback.
    from omegaconf import open_dict

    from wavenet.errors import UserError
    from wavenet.tasks.train_settings import check_settings

    with open_dict(local):
        local.model = "medium"
    with pytest.raises(UserError, match=r"model must hold the settings of a model= option, got 'medium'; .*"
                                        r"defaults: \[\{override /model: medium\}\]"):  # fmt: skip
        check_settings(local)
    ignored = subprocess.run(["git", "check-ignore", "-q", "conf/local/default.yaml"], cwd=REPO)
    assert ignored.returncode == 0
