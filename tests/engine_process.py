"""Run a script that starts a vLLM engine in a process group of its own, so that a
timeout ends the engine's processes too (vLLM's engine core and workers are children
that would otherwise outlive a killed script and hold its memory)."""

from __future__ import annotations

import os
import signal
import subprocess


def run_engine_script(args: list[str], timeout: float, env: dict | None = None) -> None:
    """``subprocess.run(args, check=True, timeout=timeout)``, killing the whole process
    group when the script fails to finish in time."""
    proc = subprocess.Popen(args, env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # engine processes left behind by the script
        except ProcessLookupError:
            pass
    if code != 0:
        raise subprocess.CalledProcessError(code, args)
