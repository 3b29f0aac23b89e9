"""A request's self-speculation stats as its log line prints them."""

from kvplug.integrations.vllm.lifecycle import DraftStats


def test_first_tier_stats_appear_only_with_a_first_tier():
    stats = DraftStats()
    stats.record("draft", 4, 3)
    stats.record("draft", 4, 3)
    assert stats.as_dict() == {"draft_proposed": 8, "draft_accepted": 6, "draft_acceptance": 0.75}
    stats.record("first_tier", 6, 2)
    assert stats.as_dict() == {
        "draft_proposed": 8, "draft_accepted": 6, "draft_acceptance": 0.75,
        "first_tier_proposed": 6, "first_tier_accepted": 2, "first_tier_acceptance": 0.333}
