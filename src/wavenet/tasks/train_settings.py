"""The settings of `train.py` that can be checked on the composed config (and the paths it names: the checkpoint
to resume, a corpus folder) before torch and Lightning load: `train.py` checks them first, so that a mistake is
answered in about a second, not after the seconds those imports take (and `wavenet.tasks.train.run` checks them
again, for callers from Python)."""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from wavenet.checkpoint import check_checkpoint_file, checkpoints_under
from wavenet.config import check_added_keys, check_required, refuse_folder_to_resume_in_sweep
from wavenet.data.layouts import check_root
from wavenet.data.settings import check_data_settings, check_no_root, check_synthesis_settings
from wavenet.errors import UserError, check_can_write_in, is_integer, is_number
from wavenet.hyperparameters import check_network, check_training

# What Lightning's fit(ckpt_path=...) takes besides a path. It looks for them in the run's own folder, and every
# run has a new one: they would find nothing, and train from scratch.
_LIGHTNING_CHECKPOINT_NAMES = ("last", "best", "hpc", "registry")
# Trainer settings Lightning compares with numbers: text there fails deep inside it, with a TypeError.
_TRAINER_INTEGERS = (
    "max_epochs", "min_epochs", "min_steps", "log_every_n_steps", "num_sanity_val_steps", "accumulate_grad_batches",
    "check_val_every_n_epoch", "num_nodes",
)  # fmt: skip
# Of those, the ones Lightning (or the module) divides by: 0 stopped training at its first step, with a
# ZeroDivisionError; a negative value, as in num_nodes, is no better.
_TRAINER_POSITIVE = ("accumulate_grad_batches", "log_every_n_steps", "check_val_every_n_epoch", "num_nodes")
_TRAINER_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "overfit_batches")
# The folders a run writes to, besides its own: found unwritable only when the loggers or checkpoints first write.
_OUTPUT_FOLDERS = (("logger", "save_dir"), ("callbacks", "dirpath"))
# The data modules whose `root` is a corpus on this machine (data=folder, vctk, ljspeech).
_FOLDER_DATA_MODULES = ("wavenet.data.AudioFolderDataModule", "wavenet.data.datamodule.AudioFolderDataModule")
_MODULES = ("wavenet.WaveNetModule", "wavenet.module.WaveNetModule")
_BUILT_IN_DATA_MODULES = ("wavenet.data.SyntheticMusicDataModule", "wavenet.data.datamodule.SyntheticMusicDataModule")


def check_settings(cfg: DictConfig) -> None:
    """Raises `UserError` for a required value not set, a top-level key removed or added by mistake, a
    `ckpt_path` or corpus `data.root` that is not there, and top-level and trainer settings that would fail only
    later, naming the key."""
    for group in ("model", "data", "trainer", "paths"):
        chosen = cfg.get(group)
        if isinstance(chosen, str):
            # `model: medium` in conf/local/default.yaml, which sets the group's settings, not its option.
            raise UserError(
                f"{group} must hold the settings of a {group}= option, got {chosen!r}; to choose an option in a "
                f"config file, list it under its defaults: `defaults: [{{override /{group}: {chosen}}}]`"
            )
    check_required(cfg, keys=("model", "data", "trainer", "paths", "seed", "train"))
    check_added_keys(cfg, "train.py")
    if not is_integer(cfg.seed) or not 0 <= cfg.seed < 2**32:
        raise UserError(f"seed must be an integer from 0 to 2**32 - 1 (numpy's range), got {cfg.seed!r}")
    if not isinstance(cfg.train, bool):
        raise UserError(f"train must be true or false, got {cfg.train!r}")
    ckpt_path = cfg.get("ckpt_path")
    for key, use in (("ckpt_path", "to resume from"), ("init_from", "to start from")):
        path = cfg.get(key)
        if path is not None and (not isinstance(path, str) or not path.strip()):
            got = "empty" if isinstance(path, str) else repr(path)
            raise UserError(f"{key} must be the path of a checkpoint {use}, or null, got {got}")
    if ckpt_path in _LIGHTNING_CHECKPOINT_NAMES:
        raise UserError(
            f"ckpt_path={ckpt_path} would look in this run's folder, which is new: give the checkpoint's path, "
            "e.g. ckpt_path=outputs/train/runs/<time>/checkpoints/last.ckpt"
        )
    if ckpt_path is not None and Path(ckpt_path).expanduser().is_dir():
        check_resume_folder(Path(ckpt_path).expanduser(), Path(cfg.paths.output_dir))
    elif ckpt_path is not None:
        check_checkpoint_file(Path(ckpt_path).expanduser())  # its contents are checked once torch is loaded
    if cfg.get("init_from") is not None:
        check_checkpoint_file(Path(cfg.init_from).expanduser())
    if cfg.model.get("_target_") in _MODULES:  # ours: made once torch has loaded
        settings = {key: value for key, value in cfg.model.items() if not str(key).startswith("_")}
        try:
            check_network(settings)
            check_training(settings)
        except ValueError as error:
            raise UserError(f"model: {error}") from None  # as `instantiate_checked` says it, once torch has loaded
    root, target = cfg.data.get("root"), cfg.data.get("_target_")
    if isinstance(target, str) and target.startswith("wavenet.data."):  # one of ours: made once torch has loaded
        check_data_settings({key: value for key, value in cfg.data.items() if key != "_target_"})
        if target in _BUILT_IN_DATA_MODULES:
            check_no_root(root)
            synthesis = [cfg.data.get(key) for key in ("num_files", "seconds_per_file", "sample_rate", "synthesis_seed")]
            if None not in synthesis:  # else the module's defaults
                check_synthesis_settings(*synthesis)
    if target in _FOLDER_DATA_MODULES and isinstance(root, str) and root:
        # Found otherwise only when the data is prepared: after the config is shown and the loggers are made.
        check_root(Path(root).expanduser())
    trainer = cfg.trainer
    max_steps = trainer.get("max_steps")
    if not is_integer(max_steps) or not (max_steps > 0 or max_steps == -1):
        raise UserError(f"trainer.max_steps must be a positive integer (or -1: no limit), got {max_steps!r}")
    for key in _TRAINER_INTEGERS:
        value = trainer.get(key)
        if value is not None and not is_integer(value):
            raise UserError(f"trainer.{key} must be an integer, got {value!r}")
        if value is not None and key in _TRAINER_POSITIVE and value < 1:
            raise UserError(f"trainer.{key} must be a positive integer, got {value}")
    decay = cfg.model.get("decay", "constant")
    if max_steps == -1 and trainer.get("max_epochs") == -1 and decay != "constant":
        # The module finds it too (an endless data set with max_epochs), but only once the data is prepared.
        raise UserError(
            f"model.decay={decay} decays over the whole run, and this one has no end (trainer.max_steps=-1, "
            "trainer.max_epochs=-1): set trainer.max_steps, or model.decay=constant"
        )
    for key in _TRAINER_LIMITS:
        value = trainer.get(key)
        if value is not None and not is_number(value):
            raise UserError(f"trainer.{key} must be a number of batches or a fraction of them, got {value!r}")
    interval = trainer.get("val_check_interval")
    if is_number(interval) and interval <= 0:
        raise UserError(f"trainer.val_check_interval must be a positive number of steps, got {interval}")
    clip = trainer.get("gradient_clip_val")
    if clip is not None and (not is_number(clip) or clip < 0):
        # Lightning takes 0 and below as "no clipping": a negative value would quietly turn it off.
        raise UserError(f"trainer.gradient_clip_val must be a positive number, 0 or null (no clipping), got {clip!r}")
    for key in ("max_epochs", "limit_train_batches"):
        if trainer.get(key) == 0:
            raise UserError(f"trainer.{key}=0 trains nothing; to check the data only, use train=false")
    deterministic = trainer.get("deterministic")
    if deterministic is not None and deterministic not in (True, False, "warn"):
        raise UserError(f"trainer.deterministic must be true, false, warn or null, got {deterministic!r}")
    for group, key in _OUTPUT_FOLDERS:
        for name, settings in (cfg.get(group) or {}).items():
            folder = settings.get(key) if isinstance(settings, DictConfig) else None
            if isinstance(folder, str) and folder:
                check_can_write_in(f"{group}.{name}.{key}", Path(folder).expanduser())
    accelerator = str(cfg.trainer.get("accelerator"))
    if accelerator in ("gpu", "cuda") and not _cuda_available():
        raise UserError(
            f"trainer.accelerator={accelerator} but no CUDA GPU is available here; use trainer=cpu, or trainer=default "
            "(the GPU when there is one)"
        )


def check_resume_folder(folder: Path, output_dir: Path) -> None:
    """Raises `UserError` if `folder`, given as `ckpt_path`, holds no checkpoint and is not where this run writes.

    A folder that holds this run's own folder is a chain's: a job requeued with the same command (`hydra.run.dir`
    under it) resumes from its newest checkpoint, and the first job of the chain, finding none, starts training.
    Anywhere else, a folder without checkpoints is a mistyped path, which must not start a run from scratch.
    """
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        # Refused before the first job too (`FolderToResumeOutsideSweeps`), but not where a job's sweep set it.
        refuse_folder_to_resume_in_sweep(str(folder))
    if checkpoints_under(folder) or output_dir.resolve().is_relative_to(folder.resolve()):
        return
    raise UserError(
        f"ckpt_path={folder} is a folder with no checkpoint (*.ckpt) in it or below: give a checkpoint, or the "
        "folder of the runs to resume from"
    )


def _cuda_available() -> bool:
    import torch  # only for trainer.accelerator=gpu: the one check here that needs it

    return torch.cuda.is_available()
