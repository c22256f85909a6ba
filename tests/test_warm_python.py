"""The tests' runner of the scripts (tests/warm_python.py) must be indistinguishable from `python <script>`."""

import difflib
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from tests.conftest import BUILTIN_SMALL, TINY, run_script, save_checkpoint, warm_python_server
from wavenet import WaveNetModule

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the runner forks")


@pytest.mark.parametrize(
    "body,status,stdout,stderr",
    [
        ("print('out'); print('err', file=sys.stderr)", 0, "out\n", "err\n"),
        ("sys.exit(3)", 3, "", ""),
        ("sys.exit('refused')", 1, "", "refused\n"),
        ("raise ValueError('bad')", 1, "", "ValueError: bad\n"),
        ("raise KeyboardInterrupt", -signal.SIGINT, "", "KeyboardInterrupt\n"),
        ("import atexit; atexit.register(print, 'at exit')", 0, "at exit\n", ""),
    ],
)
def test_a_script_ends_with_the_status_and_output_python_gives_it(tmp_path, body, status, stdout, stderr):
    script = tmp_path / "script.py"
    script.write_text(
        "import os, sys\n"
        "assert sys.argv[1:] == ['a=1'] and os.getcwd() == os.environ['EXPECTED_CWD'] and __name__ == '__main__'\n"
        f"{body}\n"
    )
    args = [sys.executable, str(script), "a=1"]
    result = warm_python_server().run(args, cwd=tmp_path, env={"EXPECTED_CWD": str(tmp_path)}, timeout=60)
    fresh = subprocess.run(args, cwd=tmp_path, env={"EXPECTED_CWD": str(tmp_path)}, capture_output=True, text=True)
    assert (result.returncode, fresh.returncode) == (status, status), result.stderr
    assert result.stdout == fresh.stdout == stdout
    assert result.stderr.endswith(stderr) and fresh.stderr.endswith(stderr)


def test_a_run_past_its_timeout_is_killed_and_the_next_run_goes_ahead(tmp_path):
    sleeps, quick = tmp_path / "sleeps.py", tmp_path / "quick.py"
    sleeps.write_text("import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    quick.write_text("print('done')\n")
    with pytest.raises(subprocess.TimeoutExpired) as raised:
        warm_python_server().run([sys.executable, str(sleeps)], cwd=tmp_path, env={}, timeout=2)
    assert raised.value.output == "started\n"
    assert warm_python_server().run([sys.executable, str(quick)], cwd=tmp_path, env={}, timeout=60).stdout == "done\n"


def test_runs_go_side_by_side_in_sessions_of_their_own_with_the_start_up_their_pythonpath_gives(tmp_path):
    # The stop tests signal a run's process group, some start two runs at once, and some slow a run down with a
    # sitecustomize on PYTHONPATH, as they did with Popen(start_new_session=True) and a fresh Python.
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "sitecustomize.py").write_text("import os\nos.environ['HOOKED'] = 'yes'\n")
    shows = "import os\nprint(os.getpgid(0) == os.getpid(), os.environ.get('HOOKED'), flush=True)\n"
    waits, goes = tmp_path / "waits.py", tmp_path / "goes.py"
    waits.write_text(shows + "import pathlib, time\nwhile not pathlib.Path('go').exists():\n    time.sleep(0.05)\n")
    goes.write_text(shows + "open('go', 'w').close()\n")
    hooked = {"PYTHONPATH": str(tmp_path / "hooks")}
    server = warm_python_server()
    waiting = server.start([sys.executable, str(waits)], cwd=tmp_path, env=hooked, new_session=True)
    going = server.start([sys.executable, str(goes)], cwd=tmp_path, env={})
    assert waiting.communicate(timeout=60) == ("True yes\n", "")  # ended once the other had run
    assert (going.communicate(timeout=60), going.returncode, waiting.returncode) == (("False None\n", ""), 0, 0)
    fresh = subprocess.run([sys.executable, str(waits)], cwd=tmp_path, env=hooked, start_new_session=True,
                           capture_output=True, text=True)  # fmt: skip
    assert fresh.stdout == "True yes\n"


@pytest.mark.parametrize("script", ["train.py", "generate.py"])
def test_a_script_prints_and_writes_the_same_warm_and_fresh(tmp_path, script):
    def normalised(text: str) -> list[str]:
        # Times of day, durations, speeds, and the prepared cache's name (its key holds the files' times) differ.
        pattern = r"\d\d:\d\d:\d\d,\d+|\d+\.\d+|[\d,]+ samples/s|\d+(ms|s)\b|-[0-9a-f]{16}\b"
        return [re.sub(pattern, "#", line) for line in text.splitlines()]

    run_dir, data_dir = tmp_path / "run", tmp_path / "data"
    if script == "train.py":
        # Without Lightning's progress bar, whose layout follows the width of its figures.
        no_bar = "+trainer.enable_progress_bar=false"
        overrides = [*TINY, *BUILTIN_SMALL, "trainer.max_steps=3", no_bar, f"paths.data_dir={data_dir}"]
    else:
        from wavenet.kernels.cpu_step import cpu_kernel_problem

        cpu_kernel_problem()  # the CPU kernel built before: the first of the runs would say that it builds it
        module = WaveNetModule(layers=4, stacks=2, residual_channels=8, dilation_channels=8, skip_channels=16)
        overrides = [f"ckpt_path={save_checkpoint(module, tmp_path / 'tiny.ckpt')}", "num_samples=500", "batch_size=2",
                     "seed=1"]  # fmt: skip
    runs = {}
    for fresh in (True, False):
        result = run_script(script, *overrides, f"hydra.run.dir={run_dir}", fresh=fresh)
        assert result.returncode == 0, result.stderr[-2000:]
        files = {str(path.relative_to(run_dir)): path for path in sorted(run_dir.rglob("*"))}
        log = (run_dir / script.replace(".py", ".log")).read_text()
        samples = [path.read_bytes() for name, path in files.items() if name.endswith(".wav")]  # seeded
        runs[fresh] = normalised(result.stdout), normalised(result.stderr), normalised(log), list(files), samples
        # The next run writes to the same folders, and synthesises and prepares its data as this one did.
        shutil.rmtree(run_dir)
        shutil.rmtree(data_dir, ignore_errors=True)
    parts = ("stdout", "stderr", "log", "files", "samples")
    for part, fresh, warm in zip(parts, runs[True], runs[False], strict=True):
        difference = [] if part == "samples" else difflib.unified_diff(fresh, warm, lineterm="")
        assert warm == fresh, f"{part}:\n" + "\n".join(difference)
