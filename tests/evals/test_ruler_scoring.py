"""RULER's scoring against hand-worked cases."""

import pytest

from kvplug.evals.ruler.scoring import (Summary, postprocess, scores_from_lm_eval, string_match_all,
                                        string_match_part, summarize)


def test_postprocess_strips_and_turns_control_characters_into_newlines():
    assert postprocess("  The answer\x00is\t42 \n") == "The answer\nis\n42"


def test_string_match_all_is_the_share_of_references_found_times_100():
    assert string_match_all(["The numbers are 123 and 456."], [["123", "456", "789"]]) == pytest.approx(200 / 3)
    assert string_match_all(["ALPHA-beta"], [["alpha-BETA"]]) == 100  # case-insensitive
    # two samples: 2/2 found and 0/1 found -> (1 + 0) / 2
    assert string_match_all(["a b", "c"], [["a", "b"], ["d"]]) == 50


def test_string_match_part_counts_a_sample_once_any_reference_is_found():
    # RULER scores this 100; lm-eval's ruler_qa would give 33.3
    assert string_match_part(["Paris"], [["Paris", "city of Paris", "Paris, France"]]) == 100
    assert string_match_part(["Paris", "Rome"], [["paris"], ["Milan", "Turin"]]) == 50


def test_summary_is_the_task_mean_per_length_then_avg_and_weighted_avgs():
    scores = {"a": {4096: 80, 8192: 60, 16384: 40}, "b": {4096: 100, 8192: 80, 16384: 20}}
    # per length: 90, 70, 30; Avg 190/3; wAvg(inc) (1*90 + 2*70 + 3*30) / 6; wAvg(dec) (3*90 + 2*70 + 30) / 6
    assert summarize(scores) == Summary({4096: 90, 8192: 70, 16384: 30}, pytest.approx(190 / 3),
                                        pytest.approx(320 / 6), pytest.approx(440 / 6))


def test_summary_needs_every_task_at_every_length():
    with pytest.raises(ValueError, match=r"\('b', 8192\)"):
        summarize({"a": {4096: 80, 8192: 60}, "b": {4096: 100}})


def test_scores_from_lm_eval_reads_per_length_metrics_of_tasks_only():
    results = {
        "results": {
            "kvplug_ruler": {"alias": "kvplug_ruler", "4096,none": 75.0, "4096_stderr,none": "N/A"},
            "kvplug_ruler_vt": {"alias": "kvplug_ruler_vt", "sample_len": 4, "4096,none": 50.0,
                                "4096_stderr,none": 5.0, "8192,none": 25.0},
            "kvplug_ruler_fwe": {"4096,none": 100.0, "8192,none": 0.0},
        },
        "groups": {"kvplug_ruler": {}},
    }
    assert scores_from_lm_eval(results) == {"kvplug_ruler_vt": {4096: 50.0, 8192: 25.0},
                                            "kvplug_ruler_fwe": {4096: 100.0, 8192: 0.0}}
