"""The speculation bench without an engine: its rows (speed, acceptance, step profile)
from fake runs, and settings it refuses."""

import pytest

from kvplug.evals import speculation_bench as sb

N = 64


def _run(decode_s, drafts=0, accepted=0, steps=0, draft_s=0.0, forwards=0, guesses=0, kept=0):
    return {"decode_s": decode_s, "draft_tokens": drafts, "accepted_tokens": accepted,
            "verify_steps": steps, "draft_s": draft_s, "draft_forwards": forwards,
            "first_tier_tokens_proposed": guesses, "first_tier_tokens_accepted": kept}


def test_rows_speedup_acceptance_and_step_profile():
    default = {"context": 4096, "batch": 4, "runs": [_run(8.0), _run(8.0)]}
    base = sb.row("default", default, N, None)
    assert base["decode_tok_s"] == 4 * N / 8.0
    assert base["target_ms_per_step"] == 1000 * 16.0 / (2 * N)     # one forward per token
    assert base["acceptance"] is None and base["draft_ms_per_forward"] is None
    spec = {"context": 4096, "batch": 4,
            "runs": [_run(4.0, 80, 60, 20, draft_s=2.0, forwards=80),
                     _run(6.0, 80, 20, 20, draft_s=3.0, forwards=80)]}
    r = sb.row("self-quest", spec, N, base)
    assert r["spread_tok_s"] == [round(4 * N / 6.0, 2), 4 * N / 4.0]
    assert r["speedup"] == round(r["decode_tok_s"] / base["decode_tok_s"], 2)
    assert r["acceptance"] == 0.5 and r["mean_accepted_length"] == 3.0
    # 5 s of the 10 s drafted in 160 forwards; the other 5 s over 40 verification steps
    assert r["draft_ms_per_forward"] == 31.2 and r["target_ms_per_step"] == 125.0
    assert r["first_tier_acceptance"] is None and base["first_tier_acceptance"] is None
    tiered = {"context": 4096, "batch": 4, "runs": [_run(4.0, 80, 60, 20, 1.0, 40, 30, 12),
                                                     _run(4.0, 80, 60, 20, 1.0, 40, 10, 3)]}
    assert sb.row("self-streamingllm-ngram", tiered, N, base)["first_tier_acceptance"] == 0.375


def test_contexts_past_the_essays_read_on_into_opticks_and_past_both_are_refused():
    class Tok:
        def apply_chat_template(self, messages, **_):
            return messages[0]["content"]

        def __call__(self, text, **_):
            return {"input_ids": text.split()}

        def decode(self, ids):
            return " ".join(ids)

    essays = len(sb.ESSAYS.read_text().split())
    ids = sb.prompt_ids(Tok(), essays + 500)
    assert len(ids) == essays + 500 and ids[essays:essays + 3] == sb.OPTICKS.read_text().split()[:3]
    with pytest.raises(ValueError, match="context 100000 exceeds the text"):
        sb.prompt_ids(Tok(), 100000)


def test_unknown_setting_is_named(tmp_path):
    with pytest.raises(SystemExit, match="unknown \\['fast'\\]"):
        sb.main(["--settings", "default,fast", "--out", str(tmp_path)])


def test_hierarchy_without_room_for_a_guess_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--gamma 1 leaves the first tier of "
                                         "self-streamingllm-ngram no guess"):
        sb.main(["--settings", "default,self-streamingllm-ngram", "--gamma", "1",
                 "--out", str(tmp_path)])
