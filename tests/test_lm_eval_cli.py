import pytest

from kvplug.evals.ruler import LM_EVAL_TASKS_DIR
from kvplug.lm_eval_cli import prepare


def test_include_path_is_added_unless_given():
    assert prepare(["--model", "hf", "--tasks", "kvplug_ruler"])[-2:] == \
        ["--include_path", str(LM_EVAL_TASKS_DIR)]
    assert prepare(["--include_path", "mine"]) == ["--include_path", "mine"]


@pytest.mark.parametrize("model_args", [None, "model=m,base_url=http://127.0.0.1:8000/v1/completions"])
def test_local_completions_without_max_length_is_refused(model_args):
    args = ["--model", "local-completions"] + (["--model_args", model_args] if model_args else [])
    with pytest.raises(ValueError, match="silently left-truncate"):
        prepare(args)
    ok = prepare(["--model=local-completions", "--model_args", "model=m,max_length=8192"])
    assert ok[0] == "--model=local-completions"
