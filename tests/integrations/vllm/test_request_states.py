"""``drained_request_states``: the last finished request leaves a worker at the engine's next
step, which may come after the RPC that reads the counts."""

import kvplug.integrations.vllm as kv_vllm


class _Engine:
    """A stand-in ``vllm.LLM`` whose workers drop their last state after ``steps_late`` reads."""

    def __init__(self, steps_late: int):
        self.reads, self.steps_late = 0, steps_late

    def collective_rpc(self, method):
        assert method == "kvplug_request_states"
        self.reads += 1
        live = int(self.reads <= self.steps_late)
        return [{"live": live, "created": 6, "finished": 6 - live}]


def test_waits_for_the_step_that_drops_finished_requests():
    engine = _Engine(steps_late=3)
    assert kv_vllm.request_states(engine)["live"] == 1        # read before that step: racy
    assert kv_vllm.drained_request_states(engine) == {"live": 0, "created": 6, "finished": 6}
    assert engine.reads == 4


def test_a_state_still_live_after_the_timeout_is_reported():
    engine = _Engine(steps_late=10**9)
    assert kv_vllm.drained_request_states(engine, timeout=0.2)["live"] == 1
