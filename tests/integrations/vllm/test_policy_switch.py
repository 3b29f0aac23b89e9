"""The worker's policy switch, without an engine: validated when asked, refused while a
request holds state (at the RPC, between steps), applied at the next step."""

import pytest

from kvplug.config import resolve_config
from kvplug.integrations.vllm.lifecycle import WorkerPolicy

QUEST = {"policy": "quest", "budget": 256, "page_size": 16}


def _worker() -> WorkerPolicy:
    config = resolve_config({"kvplug": {"policy": "full", "switch_to": [QUEST]}})
    return WorkerPolicy(config, num_layers=30, num_kv_heads=3, unit=16)


def test_switch_is_queued_then_applied():
    worker = _worker()
    worker.request_switch(QUEST, running=0)
    assert worker.active.policy == "full" and worker.next_policy.name == "quest"
    worker.apply(running=0)
    assert worker.active.policy == "quest" and worker.pending is None


def test_switch_while_a_request_holds_state_is_refused_at_once():
    """A request may start between a caller's idle check and the switch; the switch is
    refused then (the route answers 409), never left to fail the next engine step."""
    worker = _worker()
    with pytest.raises(RuntimeError, match="needs an idle engine; 1 requests hold"):
        worker.request_switch(QUEST, running=1)
    assert worker.pending is None
    worker.apply(running=1)          # nothing queued: the step runs on
    assert worker.active.policy == "full"


def test_unknown_config_names_the_choices():
    with pytest.raises(ValueError, match="valid choices"):
        _worker().request_switch({"policy": "quest", "budget": 512, "page_size": 16}, running=0)


def test_a_packed_pool_is_one_policy_and_reads_whole_pages():
    """The packed pool's page size is fixed at engine start: no switch, no draft; a
    selection over it reads whole pages (refused before any engine process starts)."""
    def worker(kvplug: dict, unit: int = 128) -> WorkerPolicy:
        return WorkerPolicy(resolve_config({"kvplug": kvplug}, environ={}), num_layers=30,
                            num_kv_heads=3, unit=unit)

    alone = worker({"policy": "zipcache"})
    assert alone.quantized and alone.packer.name == "zipcache" and alone.store is None
    under = worker({**QUEST, "page_size": 128, "store": {"policy": "zipcache"}})
    assert under.quantized and under.packer is under.store and under.policy.name == "quest"
    assert not worker(QUEST, unit=16).quantized
    with pytest.raises(ValueError, match=r"'zipcache' keeps the KV pool in packed pages"):
        worker({"policy": "zipcache", "switch_to": [{"policy": "full"}]})
    with pytest.raises(ValueError, match=r"'quest' reads 16-token chunks; over the packed pool "
                                         r"of 'zipcache' a selection reads whole 128-token"):
        worker({**QUEST, "store": {"policy": "zipcache"}})


CAKE = {"policy": "cake", "budget": 64}


@pytest.mark.parametrize("kvplug, workers, layer_groups", [
    (CAKE, 1, True),                    # per-layer budgets of evicted tokens
    (CAKE, 2, False),                   # the scheduler cannot read the worker's kept blocks
    ({**CAKE, "layer_groups": False}, 1, False),        # the user's choice: one group
    ({**CAKE, "switch_to": [{"policy": "full"}]}, 1, False),   # full keeps every layer alike
    ({"policy": "snapkv", "budget": 64}, 1, False),     # every layer keeps the same budget
    ({"policy": "kvzip", "budget": 64}, 1, False),      # its heads keep uneven cells, replayed
    ({"policy": "full"}, 1, False),
])
def test_a_group_per_layer_where_every_policy_evicts_by_per_layer_budgets(kvplug, workers,
                                                                        layer_groups):
    config = resolve_config({"kvplug": kvplug}, environ={})
    worker = WorkerPolicy(config, num_layers=30, num_kv_heads=3, unit=32, workers=workers)
    assert worker.layer_groups is layer_groups
