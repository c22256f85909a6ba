"""Shared fixtures: composed configs and a runner for `train.py` as users type it."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from wavenet.process import end_without_collecting_everything

REPO = Path(__file__).resolve().parents[1]

# W&B must never reach for the network in tests; a test that checks offline runs sets its own mode.
os.environ.setdefault("WANDB_MODE", "disabled")

# Each pytest process ends as train.py does, without the collection at exit that took 2 s with torch imported.
end_without_collecting_everything()

# Each pytest-xdist worker gets its share of the cores. With torch's default, a thread per core in each worker and
# in each run it starts, OpenMP's spinning threads fought over the cores: a training test of 6 s alone took 18 to
# 40 s beside the other worker (suite: 7 min 40 s -> 6 min 20 s on 2 cores). Set before torch is imported, so
# that it holds in the warm runner and every subprocess too; a value the caller set is kept.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _WORKERS)))

# What runs cache goes to a folder of this session's, which its workers share, so that the tests start from nothing
# as in CI, whatever earlier runs left in the system's temporary folder or in ~/.cache: inductor's kernels (~1.7 s
# each on 2 cores), the CPU generation kernel (15 s), datasets. A value the caller set is kept.
_SESSION_CACHES = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "WAVENET_CACHE_DIR": "wavenet", "WAVENET_DATA_DIR": "data"}
_own_caches: str | None = None  # in the process that made the folder: the first, which ends last
if any(name not in os.environ for name in _SESSION_CACHES):
    _own_caches = tempfile.mkdtemp(prefix="wavenet-tests-caches-")
    for name, folder in _SESSION_CACHES.items():
        os.environ.setdefault(name, os.path.join(_own_caches, folder))

# A run of seconds: tiny model, CPU, validation twice, every step logged; with BUILTIN_SMALL, a small
# built-in dataset.
BUILTIN_SMALL = ["data.num_files=6", "data.seconds_per_file=2"]
TINY = [
    "model=tiny",
    "trainer=cpu",
    "trainer.log_every_n_steps=1",
    "data.chunk_length=256",
    "data.batch_size=4",
    "data.num_workers=0",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=2",
    "trainer.num_sanity_val_steps=0",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache of built-in datasets for the whole session, so each is synthesised once."""
    return tmp_path_factory.mktemp("data")


def compose_config(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """The config `train.py` / `generate.py` would run with, its run folder moved to `output_dir`."""
    GlobalHydra.instance().clear()
    with initialize(version_base="1.3", config_path="../conf"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # the task function never sees it either
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir)
        cfg.paths.root_dir = str(REPO)
    return cfg


def save_checkpoint(module: Any, path: Path, **extra: Any) -> Path:
    """Saves a `WaveNetModule` with what generate.py reads (its weights and hyperparameters), and `extra` keys."""
    import torch

    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), **extra}, path)
    return path


def checkpoint_lookalike(path: Path) -> Path:
    """A zip archive at `path`: what the checks before torch loads take for a checkpoint (they do not read it)."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"")
    return path


def wait_for_file(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    """Waits until `path` exists, failing the test if `process` ends first (with its output) or after `timeout`."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"ended with status {process.returncode} before writing {path}: {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {path} after {timeout:g} s")
        time.sleep(0.1)


def run_script(
    script: str,
    *overrides: str,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    fresh: bool = False,
    cwd: Path = REPO,
) -> subprocess.CompletedProcess:
    """Runs `python <script> overrides...` from `cwd` (the repository root), as a user would, with `env` added.

    The scripts run in a child forked from `tests/warm_python.py` (their imports done once per pytest process),
    unless `fresh` (what happens before or during those imports is under test, or `env` sets a variable they read,
    such as OMP_NUM_THREADS), WAVENET_TESTS_FRESH=1 is set, or a CUDA device is here (the GPU tests check a real
    start-up, and few of them run a script).
    """
    args, run_env = _command(script, overrides, env)
    if not fresh and _warm_runs_allowed():
        return warm_python_server().run(args, cwd=cwd, env=run_env, timeout=timeout)
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=run_env)


def start_script(script: str, *overrides: str, env: dict[str, str] | None = None, fresh: bool = False) -> Any:
    """Starts `python <script> overrides...` as `run_script` runs it, in a session of its own (a test signals its
    process group as a terminal or a scheduler does), and returns at once: a `subprocess.Popen`, or what the tests
    use of one (`pid`, `returncode`, `poll`, `send_signal`, `communicate`)."""
    args, run_env = _command(script, overrides, env)
    if not fresh and _warm_runs_allowed():
        return warm_python_server().start(args, cwd=REPO, env=run_env, new_session=True)
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=run_env)  # fmt: skip


def _command(script: str, overrides: tuple[str, ...], env: dict[str, str] | None) -> tuple[list[str], dict[str, str]]:
    """`python <script> overrides...`, and its environment: this one, with `env` added."""
    return [sys.executable, script, *overrides], {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}


def _warm_runs_allowed() -> bool:
    import torch

    return hasattr(os, "fork") and os.environ.get("WAVENET_TESTS_FRESH") != "1" and not torch.cuda.is_available()


class WarmPython:
    """The client of `tests/warm_python.py`: one server, started on first use, running the scripts it is given."""

    def __init__(self) -> None:
        self.server = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "warm_python.py")],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        self._unread = b""  # answers read from the pipe and not yet taken: they may come two at a time
        self._statuses: dict[int, int] = {}  # of the runs that ended, by pid, until their WarmProcess asks
        self._answer(deadline=time.monotonic() + 300)  # {"ready": true}: torch and Lightning are imported

    def start(self, args: list[str], cwd: Path, env: dict[str, str], new_session: bool = False) -> WarmProcess:
        outputs = tempfile.TemporaryDirectory(prefix="warm-run-")
        stdout, stderr = Path(outputs.name) / "stdout", Path(outputs.name) / "stderr"
        request = {"argv": args[1:], "cwd": str(cwd), "env": env, "stdout": str(stdout), "stderr": str(stderr),
                   "session": new_session}  # fmt: skip
        self.server.stdin.write(json.dumps(request).encode() + b"\n")
        self.server.stdin.flush()
        while "status" in (answer := self._answer(deadline=time.monotonic() + 60)):
            self._statuses[answer["pid"]] = answer["status"]
        return WarmProcess(self, args, answer["pid"], outputs)

    def run(self, args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        process = self.start(args, cwd, env)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as expired:
            process.kill()
            process.communicate(timeout=60)
            raise subprocess.TimeoutExpired(args, timeout, expired.output, expired.stderr) from None
        return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)

    def status(self, pid: int, deadline: float) -> int | None:
        """The exit status of run `pid`, waiting for it until `deadline`; None if it is still running then."""
        while pid not in self._statuses:
            try:
                answer = self._answer(deadline)
            except subprocess.TimeoutExpired:
                return None
            self._statuses[answer["pid"]] = answer["status"]  # every answer without a request is an end
        return self._statuses.pop(pid)

    def _answer(self, deadline: float) -> dict:
        pipe = self.server.stdout.fileno()
        while b"\n" not in self._unread:
            ready, _, _ = select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise subprocess.TimeoutExpired(self.server.args, timeout=0)  # the caller knows its own
            read = os.read(pipe, 65536)
            if not read:
                raise RuntimeError(f"tests/warm_python.py ended with status {self.server.wait()}")
            self._unread += read
        line, self._unread = self._unread.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        self.server.stdin.close()  # the server ends at the end of its requests
        self.server.wait(timeout=60)
        self.server.stdout.close()


class WarmProcess:
    """A run of the warm server, with what the tests use of `subprocess.Popen`: its output is read at its end."""

    def __init__(self, server: WarmPython, args: list[str], pid: int, outputs: tempfile.TemporaryDirectory) -> None:
        self.server, self.args, self.pid, self._outputs = server, args, pid, outputs
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.status(self.pid, deadline=time.monotonic())
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        if self.returncode is None:
            deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
            self.returncode = self.server.status(self.pid, deadline)
        stdout, stderr = (Path(self._outputs.name, name).read_text() for name in ("stdout", "stderr"))
        if self.returncode is None:
            raise subprocess.TimeoutExpired(self.args, timeout, stdout, stderr)
        self._outputs.cleanup()
        return stdout, stderr


_warm: WarmPython | None = None


def warm_python_server() -> WarmPython:
    global _warm
    if _warm is None:
        _warm = WarmPython()
    return _warm


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _warm is not None:
        _warm.close()
    if _own_caches is not None:
        shutil.rmtree(_own_caches, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` are skipped where there is no CUDA device (CI); `pytest -m gpu` runs them on one."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
