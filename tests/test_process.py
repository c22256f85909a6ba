"""How the scripts' processes end: after every exit handler, without the collector walking all that was imported.

(The fresh runs of tests/test_warm_python.py end so, and write what the warm runs write.)"""

import subprocess
import sys

from tests.conftest import REPO

ENDS_AND_SAYS_WHAT_WAS_FROZEN = """
import atexit, gc
atexit.register(lambda: print("the end:", gc.get_freeze_count() > 0))  # as logging's, registered at import
from wavenet.process import end_without_collecting_everything
end_without_collecting_everything()
# What a run registers later (W&B's, the data loaders', temporary folders') runs first, with the collector as ever.
atexit.register(lambda: print("a later handler:", gc.get_freeze_count() > 0))
"""


def test_the_objects_alive_at_the_end_are_frozen_after_the_exit_handlers_registered_later():
    result = subprocess.run([sys.executable, "-c", ENDS_AND_SAYS_WHAT_WAS_FROZEN], capture_output=True, text=True,
                            cwd=REPO, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["a later handler: False", "the end: True"]
