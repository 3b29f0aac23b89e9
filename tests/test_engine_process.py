import os
import subprocess
import sys
import time

import pytest

from engine_process import run_engine_script

SPAWNS_AND_HANGS = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:        # a zombie is gone for our purposes
        return f.read().split()[2] != "Z"


def test_a_timed_out_script_leaves_no_child_behind(tmp_path):
    """Engine scripts' children (vLLM's engine core) must not outlive a timeout."""
    pid_file = tmp_path / "child.pid"
    with pytest.raises(subprocess.TimeoutExpired):
        run_engine_script([sys.executable, "-c", SPAWNS_AND_HANGS, str(pid_file)], timeout=5)
    child = int(pid_file.read_text())
    deadline = time.time() + 5
    while _alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


def test_a_failing_script_raises_with_its_exit_code():
    with pytest.raises(subprocess.CalledProcessError) as err:
        run_engine_script([sys.executable, "-c", "raise SystemExit(3)"], timeout=30)
    assert err.value.returncode == 3
