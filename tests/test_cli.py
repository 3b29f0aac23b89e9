import subprocess
import sys

from kvplug.cli import main


def test_policies_lists_every_policy_and_engine_key(capsys):
    assert main(["policies"]) == 0
    out = capsys.readouterr().out
    assert "\nfull: dense passthrough" in "\n" + out
    assert "log_every_steps: int = 200" in out and "log_request_stats: bool = True" in out
    assert ("\nzipcache: keeps every token quantized" in out
            and "saves memory and bandwidth; runs on vLLM on CPU, HF transformers" in out)


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["demo", "--model", str(missing)]) == 2
    assert f"model directory '{missing}' does not exist" in capsys.readouterr().err


def test_runs_as_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "kvplug", "policies"], capture_output=True,
                         text=True, timeout=120, check=True)
    assert "full:" in out.stdout
