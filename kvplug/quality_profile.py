"""``python -m kvplug.quality_profile``: why a compressing policy loses the suite on a model.

One dense prefill per suite prompt (HF, float32) records every layer's post-RoPE keys and
the prompt's last queries.  Each *variant* turns those into a keep mask per layer and
kv-head: what a compressing policy stores of the prompt (kvplug's own policies score,
allocate and plan here, unchanged).  The answer is then decoded greedily over the dense
cache with every evicted slot masked out (``-inf``; for a policy that also evicts at decode,
CAKE, the slots it evicts as each token's forward grows a layer past its budget), which is
the attention the compressed cache computes (``tests/test_quality_profile.py`` checks the logits against
:class:`~kvplug.integrations.hf_compression.CompressedCache`).  One prefill thus serves
every variant, budget and protocol of a prompt.

Variants (``--variants``), each at every ``--budgets`` ratio:

* ``full``; an evicting policy by name, with parameters as ``kvplug eval`` takes them
  (``snapkv``, ``cake[max_layer_ratio=30]``; ``chelsea`` is refused: it merges, a mask
  cannot stand for it); a policy that scores by replaying the prompt (``kvzip``) replays
  it over the dense cache (the policy's own chunks and scores; the replay's KV dropped);
* ``NAME+sinkK``: the same, with the first ``K`` tokens kept in every layer and kv-head
  before the rest is chosen (StreamingLLM's attention sinks; the budget is unchanged);
* ``NAME+shared``: one selection per layer, the kv-heads' scores averaged (TOVA-like);
* ``tova``: kvplug's ``tova`` policy (kvpress's TOVAPress rule), the last query's
  attention averaged over all heads, one selection per layer, the last token kept;
* ``NAME@dense=A-B``: layers ``A..B`` keep everything, the others are compressed;
  ``NAME@only=L``: only layer ``L`` is compressed.

The query-agnostic protocol compresses the context (``Sample.context_tokens``) before
the question is read: the question's forward then attends to the kept slots.

Outputs in ``--out``: ``profile.json`` and ``profile.md``: per variant and budget, the
suite score (string_match_all x 100, lm-eval's scoring) per task and on average; per
layer, the attention mass the window's queries put on token 0 and on the first 4
tokens, and the share of kv-heads that keep token 0 and of needle tokens kept (per
compressing variant at the first budget); CAKE's per-layer budgets when a ``cake``
variant runs (``cake_budgets.png``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

_IMPL = "kvplug_quality_profile"
NUM_SINKS = 4   # the sink tokens the attention-mass columns sum over (StreamingLLM's 4)


@dataclass
class Records:
    """One prompt's dense prefill of ``span`` tokens: per layer the last ``window`` queries
    ``[W, H_q, D]`` and the span's keys ``[span, H_kv, D]`` (post-RoPE)."""

    queries: list[Tensor]
    keys: list[Tensor]
    values: list[Tensor]
    scale: float

    @property
    def span(self) -> int:
        return self.keys[0].shape[0]


@dataclass
class DecodeEviction:
    """A ``decode_compress`` policy's eviction after every forward over the masked cache:
    per layer its budget (None: the layer keeps every later token)."""

    policy: object
    budgets: list[int | None]


class MaskedAttention:
    """transformers' attention function for the profile: SDPA, recording a prefill's
    queries, and hiding the slots a keep mask evicts from every later forward (and, with
    ``eviction``, the slots the policy evicts as decoding grows a layer past its budget,
    as :meth:`CompressedLayer.evict` does)."""

    def __init__(self, window: int):
        self.window = window
        self.recorded: dict[int, Tensor] = {}
        self.masks: list[Tensor] | None = None   # per layer [H_kv, span or more] bool
        self.eviction: DecodeEviction | None = None
        self.replay: Replay | None = None
        self.span = 0

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        layer = module.layer_idx
        if self.replay is not None:                    # a replay chunk: scored, causal
            self.replay.score(layer, query, key, module.scaling)
            bias = evicted_bias(None, key.shape[2], query.shape[2], query.shape[1], query.dtype)
            return sdpa_attention_forward(module, query, key, value, bias, **kwargs)
        if query.shape[2] == key.shape[2]:            # a prefill: dense, recorded
            self.recorded[layer] = query[0, :, -self.window:].transpose(0, 1).float()
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        bias = None
        if self.masks is not None:
            bias = evicted_bias(self.masks[layer], key.shape[2], query.shape[2],
                                query.shape[1], query.dtype)
        elif query.shape[2] > 1:
            bias = evicted_bias(None, key.shape[2], query.shape[2], query.shape[1], query.dtype)
        out = sdpa_attention_forward(module, query, key, value, bias, **kwargs)
        if self.eviction is not None and self.eviction.budgets[layer] is not None:
            self.masks[layer] = self._evict(layer, query, key, module.scaling)
        return out

    def _evict(self, layer: int, query: Tensor, key: Tensor, scale: float) -> Tensor:
        """The layer's keep mask over ``key``'s slots once the policy has evicted what the
        forward of ``query`` pushed past the budget (every kv-head holds as many slots)."""
        mask = self.masks[layer]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], key.shape[2] - mask.shape[1])], 1)
        kept = mask.nonzero()[:, 1].view(mask.shape[0], -1)                 # [H_kv, slots]
        keys = key[0].gather(1, kept[..., None].expand(-1, -1, key.shape[-1]))
        keep = self.eviction.policy.decode_keep(layer, query[0].transpose(0, 1).float(),
                                                keys.transpose(0, 1).float(),
                                                self.eviction.budgets[layer], scale)
        if keep is None:
            return mask
        return torch.zeros_like(mask).scatter_(1, kept.gather(1, keep), True)


@dataclass
class Replay:
    """One replay chunk of a ``replay`` policy over the dense cache: each layer's queries
    and keys (context then chunk, post-RoPE) score the chunk's context tokens into
    ``scores[layer]`` ``[H_kv, span]``."""

    policy: object
    chunk: object
    scores: list[Tensor]

    def score(self, layer: int, query: Tensor, key: Tensor, scale: float) -> None:
        self.scores[layer][:, self.chunk.start:self.chunk.end] = self.policy.replay_scores(
            layer, query[0].transpose(0, 1).float(), key[0].transpose(0, 1).float(),
            self.chunk, scale)


def replay_scores(model, attention: MaskedAttention, cache, ids: Tensor, policy,
                  tokenizer) -> list[Tensor]:
    """Per layer ``[H_kv, span]``: ``policy``'s replay scores of the ``span`` prompt tokens
    ``ids`` the dense ``cache`` holds, one forward per replay chunk at the positions after
    the span, each chunk's KV cut from the cache again."""
    from kvplug.integrations.replay import replay_chunks

    span = ids.shape[1]
    num_kv_heads = cache.layers[0].keys.shape[1]
    scores = [policy.unscored(num_kv_heads, span) for _ in cache.layers]
    try:
        with torch.no_grad():
            for chunk in replay_chunks(policy, ids, tokenizer):
                attention.replay = Replay(policy, chunk, scores)
                model.get_decoder()(input_ids=chunk.input_ids, past_key_values=cache,
                                    position_ids=torch.arange(
                                        span, span + chunk.input_ids.shape[1])[None],
                                    use_cache=True)
                cache.crop(span - cache.get_seq_length())
    finally:
        attention.replay = None
        if cache.get_seq_length() > span:
            cache.crop(span - cache.get_seq_length())
    return scores


def evicted_bias(mask: Tensor | None, kv_len: int, num_new: int, num_heads: int,
                 dtype: torch.dtype) -> Tensor:
    """``[1, H_q, num_new, kv_len]``: 0 where a new query may read a slot, ``-inf`` where
    the slot is evicted (``mask`` ``[H_kv, span]`` False) or in its future.  The new
    queries are the last ``num_new`` positions; slots after the span are kept."""
    positions = torch.arange(kv_len - num_new, kv_len)
    visible = torch.arange(kv_len)[None] <= positions[:, None]           # [new, kv]
    if mask is None:
        keep = torch.ones(1, kv_len, dtype=torch.bool)
    else:
        keep = torch.cat([mask, mask.new_ones(mask.shape[0], kv_len - mask.shape[1])], dim=1)
    visible = visible[None] & keep[:, None]                             # [H_kv, new, kv]
    visible = visible.repeat_interleave(num_heads // visible.shape[0], dim=0)
    bias = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))
    return bias[None]


# ---------------------------------------------------------------------------- variants

@dataclass(frozen=True)
class Variant:
    """A keep rule: a policy (or ``full``), forced sinks, a shared selection per
    layer, and the layers it compresses (None: all)."""

    name: str
    policy: str
    params: tuple[tuple[str, object], ...] = ()
    sinks: int = 0
    shared: bool = False
    layers: tuple[int, ...] | None = None

    @property
    def compresses(self) -> bool:
        return self.policy != "full"


def parse_variant(text: str, num_layers: int) -> Variant:
    """``POLICY[key=value;...][+sinkK][+shared][@dense=A-B | @only=L]`` (see the module
    doc)."""
    from kvplug.eval import parse_policy

    body, _, where = text.partition("@")
    head, *mods = body.split("+")
    policy, params = parse_policy(head)
    sinks, shared = 0, False
    for mod in mods:
        if mod.startswith("sink") and mod[4:].isdigit():
            sinks = int(mod[4:])
        elif mod == "shared":
            shared = True
        else:
            raise ValueError(f"variant {text!r}: unknown modifier {mod!r} (sinkK, shared)")
    layers = None
    if where:
        kind, _, value = where.partition("=")
        lo, _, hi = value.partition("-")
        if kind not in ("dense", "only") or not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"variant {text!r}: expected @dense=A-B or @only=L")
        chosen = set(range(int(lo), int(hi or lo) + 1))
        layers = tuple(l for l in range(num_layers) if (l in chosen) == (kind == "only"))
    if policy != "full":
        from kvplug.policies import POLICIES, CompressionPolicy, build_policy
        kind = POLICIES.get(policy, object)
        if not issubclass(kind, CompressionPolicy) or kind.store != "evicted":
            raise ValueError(f"variant {text!r}: {policy!r} is not a policy that evicts "
                             "(snapkv, cake, tova, kvzip, full)")
        try:                                                    # bad parameters fail here
            build_policy(policy, {"budget_ratio": 0.5, **dict(params)})
        except ValueError as error:
            raise ValueError(f"variant {text!r}: {error}") from None
    elif params:
        raise ValueError(f"variant {text!r}: {policy!r} takes no parameters")
    return Variant(text, policy, params, sinks, shared, layers)


def decode_eviction(variant: Variant, ratio: float, budgets: list[int],
                    span: int) -> DecodeEviction | None:
    """The decode-time eviction of ``variant``'s policy, if it has one: each compressed
    layer held to its prefill budget (the policy's budget where the prompt fitted it), as
    kvplug's engines do.  ``+sinkK``/``+shared`` change the prompt's keep rule only."""
    if not variant.compresses:
        return None
    policy = _policy(variant, ratio)
    if "decode_compress" not in policy.stages:
        return None
    whole = policy.token_budget(span) >= span
    return DecodeEviction(policy, [
        None if variant.layers is not None and l not in variant.layers
        else policy.kept_budget(span) if whole else budget
        for l, budget in enumerate(budgets)])


def _policy(variant: Variant, ratio: float):
    from kvplug.policies import POLICIES

    return POLICIES[variant.policy](budget_ratio=ratio, **dict(variant.params))


def keep_masks(variant: Variant, ratio: float, records: Records,
               replayed: list[Tensor] | None = None) -> tuple[list[Tensor], list[int], int]:
    """Per layer the ``[H_kv, span]`` keep mask of ``variant`` at ``ratio`` of the span, each
    layer's budget in tokens (kvplug's own scoring, allocation and plan), and the most any
    layer may keep (CAKE's ``max_layer_ratio`` cap; the budget for uniform policies).
    ``replayed``: a replay policy's scores (:func:`replay_scores`)."""
    from kvplug.policies import LayerScores
    from kvplug.policies.compression import top_tokens

    span, num_layers = records.span, len(records.keys)
    num_kv_heads = records.keys[0].shape[1]
    if not variant.compresses:
        return [torch.ones(num_kv_heads, span, dtype=torch.bool)] * num_layers, [span] * num_layers, span
    policy = _policy(variant, ratio)
    budget = policy.token_budget(span)
    if replayed is not None:
        scores = [LayerScores(s) for s in replayed]
    else:
        scores = [policy.prefill_scores(l, q, k, records.scale)
                  for l, (q, k) in enumerate(zip(records.queries, records.keys))]
    budgets = policy.layer_budgets(scores, budget, span)
    cap = policy.largest_layer_budget(budget, span)
    masks = []
    for l, (score, layer_budget) in enumerate(zip(scores, budgets)):
        if variant.layers is not None and l not in variant.layers:
            masks.append(torch.ones(num_kv_heads, span, dtype=torch.bool))
            continue
        token = score.token.clone()
        if variant.shared:
            token = token.mean(0, keepdim=True).expand_as(token)
        if variant.sinks:
            token[:, :variant.sinks] = float("inf")
        counts = None
        if variant.shared or variant.sinks:
            kept = top_tokens(token, layer_budget, span)
        else:                      # the policy's own plan
            plan = policy.keep_plan(score, layer_budget, span, records.keys[l],
                                    records.values[l])
            kept, counts = plan.indices, plan.counts
        # a slot of count 0 pads a kv-head that keeps fewer than the layer's widest
        real = torch.ones_like(kept) if counts is None else (counts > 0).long()
        masks.append(torch.zeros(num_kv_heads, span, dtype=torch.long)
                     .scatter_add_(1, kept, real) > 0)
    return masks, budgets, cap


# ---------------------------------------------------------------------------- decoding

def load(model_dir: str | None, window: int):
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    from kvplug import models

    path = model_dir or str(models.model_dir(None))
    attention = MaskedAttention(window)
    AttentionInterface.register(_IMPL, attention)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation=_IMPL)
    model.eval()
    return path, AutoTokenizer.from_pretrained(path), model, attention


def prefill(model, attention: MaskedAttention, ids: Tensor):
    """Dense forward of ``ids`` ``[1, n]``: the cache, the last logits and the records."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    attention.masks, attention.recorded = None, {}
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    layers = range(len(attention.recorded))
    records = Records([attention.recorded[l] for l in layers],
                      [cache.layers[l].keys[0].transpose(0, 1).float() for l in layers],
                      [cache.layers[l].values[0].transpose(0, 1).float() for l in layers],
                      model.model.layers[0].self_attn.scaling)
    return cache, out.logits[0, -1], records


def greedy(model, attention: MaskedAttention, cache, logits: Tensor, masks: list[Tensor] | None,
           rest: Tensor | None, max_tokens: int, eos: set[int], done,
           guess: list[int] = (), eviction: DecodeEviction | None = None) -> list[int]:
    """Greedy tokens over ``cache`` with ``masks`` on its first ``span`` slots (and
    ``eviction`` after every forward): ``rest`` (tokens after the span, e.g. the question)
    is read first when given; stops at EOS, after ``max_tokens``, or once
    ``done(tokens)``.  The cache is cut back afterwards; ``masks`` are left as given.

    ``guess`` (the dense answer) is checked in one forward wherever the tokens so far
    follow it: its tokens are accepted while the argmax agrees, and decoding goes on
    token by token from the first disagreement, so the tokens are greedy decoding's
    (up to float rounding between a batched and a stepwise forward).  Not with
    ``eviction``: a policy evicting after every token must see every token's forward."""
    start = cache.get_seq_length()
    attention.masks = None if masks is None else list(masks)
    attention.eviction = eviction
    if eviction is not None:
        guess = ()
    tokens: list[int] = []
    try:
        with torch.no_grad():
            if rest is not None:
                logits = model(rest, past_key_values=cache, use_cache=True,
                               logits_to_keep=1).logits[0, -1]
            base = cache.get_seq_length()
            while True:
                token = int(logits.argmax())
                if token in eos:
                    break
                tokens.append(token)
                if done(tokens) or len(tokens) >= max_tokens:
                    break
                n = len(tokens) - 1
                if len(guess) > n + 1 and tokens == list(guess[:n + 1]):
                    feed = list(guess[n:])
                    block = model(torch.tensor([feed]), past_key_values=cache,
                                  use_cache=True).logits[0]
                    j, stopped = 0, False
                    while j < len(feed) - 1 and int(block[j].argmax()) == feed[j + 1]:
                        tokens.append(feed[j + 1])
                        if done(tokens) or len(tokens) >= max_tokens:
                            stopped = True
                            break
                        j += 1
                    if stopped:
                        break
                    extra = cache.get_seq_length() - (base + n + j + 1)
                    if extra:
                        cache.crop(-extra)
                    logits = block[j]
                    continue
                logits = model(torch.tensor([[token]]), past_key_values=cache,
                               use_cache=True).logits[0, -1]
    finally:
        attention.masks, attention.eviction = None, None
        if cache.get_seq_length() > start:
            cache.crop(start - cache.get_seq_length())
    return tokens


# ---------------------------------------------------------------------------- the profile

@dataclass
class Prompt:
    task: str
    index: int
    ids: Tensor            # [1, n] the chat-templated prompt
    context_tokens: int    # where the question starts (query-agnostic span)
    outputs: list[str]
    needles: Tensor        # positions of the needles' tokens
    gen_tokens: int


def suite(tokenizer, tasks: list[str], length: int, num_samples: int) -> list[Prompt]:
    from kvplug.evals.ruler import synth

    prompts = []
    for task in tasks:
        for s in synth.generate(task, tokenizer, [length], num_samples):
            text = s.prompt(tokenizer, s.chat)
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                            return_tensors="pt")
            start = text.index(s.context)
            spans = [(start + o, start + o + len(n)) for o, n in zip(s.needle_offsets, s.needles)]
            needles = [i for i, (a, b) in enumerate(enc.offset_mapping[0].tolist())
                       if any(a < hi and b > lo for lo, hi in spans)]
            prompts.append(Prompt(task, s.index, enc.input_ids, s.context_tokens, list(s.outputs),
                                  torch.tensor(needles, dtype=torch.long), s.gen_tokens))
    return prompts


def sink_mass(records: Records) -> tuple[Tensor, Tensor, Tensor]:
    """Per layer ``[L]``: attention mass of the window's queries on token 0, on the first
    ``NUM_SINKS`` tokens (mean over query heads and queries), and of the last query on
    token 0."""
    from kvplug.policies.compression import window_attention

    first, sinks, last = [], [], []
    for q, k in zip(records.queries, records.keys):
        probs = window_attention(q, k, records.scale)          # [H_q, W, N]
        first.append(probs[..., 0].mean())
        sinks.append(probs[..., :NUM_SINKS].sum(-1).mean())
        last.append(probs[:, -1, 0].mean())
    return torch.stack(first), torch.stack(sinks), torch.stack(last)


def run(args: argparse.Namespace) -> dict:
    from kvplug.evals.ruler.scoring import postprocess, string_match_all

    path, tokenizer, model, attention = load(args.model, args.window)
    num_layers = model.config.num_hidden_layers
    variants = [parse_variant(v, num_layers) for v in args.variants]
    prompts = suite(tokenizer, args.tasks, args.length, args.num_samples)
    eos = {tokenizer.eos_token_id, *([model.generation_config.eos_token_id]
                                    if isinstance(model.generation_config.eos_token_id, int)
                                    else model.generation_config.eos_token_id or [])}
    cells = [(v, r) for v in variants for r in ([None] if not v.compresses else args.budgets)]
    scores = {f"{v.name}@{r:g}" if r else v.name: {} for v, r in cells}
    kept_token0 = {k: [] for k in scores}
    kept_needles = {k: [] for k in scores}
    evicted_needles = {k: [] for k in scores}
    layer_budgets = {k: [] for k in scores}
    capped = {k: [] for k in scores}
    cap_ratio = {k: [] for k in scores}
    masses = []
    from tqdm import tqdm
    start = time.time()
    for prompt in tqdm(prompts, desc="prompts"):
        agnostic = args.protocol == "query_agnostic"
        span = prompt.context_tokens if agnostic else prompt.ids.shape[1]
        cache, logits, records = prefill(model, attention, prompt.ids[:, :span])
        masses.append(torch.stack(sink_mass(records)))
        rest = prompt.ids[:, span:] if agnostic else None
        refs = [o.lower() for o in prompt.outputs]

        def done(tokens):
            text = tokenizer.decode(tokens).lower()
            return all(r in text for r in refs)

        max_tokens = min(prompt.gen_tokens, args.max_new_tokens)
        dense = greedy(model, attention, cache, logits, None, rest, max_tokens, eos, done)
        replayed = {}     # a replay policy's scores, per policy and parameters
        for variant, ratio in cells:
            key = f"{variant.name}@{ratio:g}" if ratio else variant.name
            scored = None
            if variant.compresses and "replay" in _policy(variant, ratio).stages:
                which = (variant.policy, variant.params)
                if which not in replayed:
                    replayed[which] = replay_scores(model, attention, cache,
                                                    prompt.ids[:, :span],
                                                    _policy(variant, ratio), tokenizer)
                scored = replayed[which]
            masks, budgets, cap = keep_masks(variant, ratio or 1.0, records, scored)
            tokens = dense if not variant.compresses else greedy(
                model, attention, cache, logits, masks, rest, max_tokens, eos, done, dense,
                decode_eviction(variant, ratio, budgets, span))
            answer = postprocess(tokenizer.decode(tokens, skip_special_tokens=True))
            scores[key].setdefault(prompt.task, []).append(
                string_match_all([answer], [prompt.outputs]))
            kept_token0[key].append(torch.stack([m[:, 0].float().mean() for m in masks]))
            if prompt.needles.numel():
                needles = prompt.needles[prompt.needles < span]
                kept_needles[key].append(torch.stack([m[:, needles].float().mean()
                                                      for m in masks]))
                # of what each layer evicts, the share that is needle tokens
                evicted_needles[key].append(torch.stack([
                    (~m[:, needles]).sum() / (~m).sum().clamp(min=1) for m in masks]))
            layer_budgets[key].append(torch.tensor(budgets, dtype=torch.float) / span)
            capped[key].append(torch.tensor(budgets) >= cap)
            cap_ratio[key].append(cap / span)
    mass = torch.stack(masses).mean(0)
    result = {
        "command": shlex.join(["python", "-m", "kvplug.quality_profile", *sys.argv[1:]]),
        "model": Path(path).name, "protocol": args.protocol, "length": args.length,
        "tasks": args.tasks, "num_samples": args.num_samples, "window": args.window,
        "max_new_tokens": args.max_new_tokens, "minutes": round((time.time() - start) / 60, 1),
        "machine": _machine_line(),
        "scores": {k: {"tasks": {t: round(sum(s) / len(s), 1) for t, s in v.items()},
                       "avg": round(sum(sum(s) for s in v.values())
                                    / sum(len(s) for s in v.values()), 1)}
                   for k, v in scores.items()},
        "attention_on_token0": _rounded(mass[0]),
        f"attention_on_first{NUM_SINKS}": _rounded(mass[1]),
        "last_query_on_token0": _rounded(mass[2]),
        "kept_token0": {k: _rounded(torch.stack(v).mean(0)) for k, v in kept_token0.items()},
        "kept_needles": {k: _rounded(torch.stack(v).mean(0)) for k, v in kept_needles.items()
                         if v},
        "needles_of_evicted": {k: _rounded(torch.stack(v).mean(0))
                               for k, v in evicted_needles.items() if v},
        "needle_share_of_prompt": round(sum(float(p.needles.numel()) / p.ids.shape[1]
                                            for p in prompts) / len(prompts), 4),
        "layer_budget_ratio": {k: _rounded(torch.stack(v).mean(0))
                               for k, v in layer_budgets.items()},
        "capped": {k: _rounded(torch.stack(v).float().mean(0)) for k, v in capped.items()
                   if k.startswith("cake")},
        "cap_ratio": {k: round(sum(v) / len(v), 4) for k, v in cap_ratio.items()},
        "layer_budget_ratio_per_prompt": {k: [_rounded(b) for b in v]
                                          for k, v in layer_budgets.items()
                                          if k.startswith("cake")},
    }
    return result


def _machine_line() -> str:
    from kvplug.bench import machine

    info = machine()
    return f"{info['cpu']}, {torch.get_num_threads()} threads"


def _rounded(values: Tensor) -> list[float]:
    return [round(float(v), 4) for v in values]


def markdown(result: dict) -> str:
    tasks = result["tasks"]
    lines = [f"Suite over masked dense caches (`kvplug.quality_profile`): {result['model']}, "
             f"{result['protocol']}, {result['length']} tokens, {result['num_samples']} samples "
             f"x {len(tasks)} tasks, {result['machine']}, {result['minutes']} min", "",
             f"Command: `{result['command']}`", "",
             "| variant@budget | avg | " + " | ".join(tasks) + " |",
             "|---|---:|" + "---:|" * len(tasks)]
    for key, row in result["scores"].items():
        lines.append(f"| `{key}` | {row['avg']:.1f} | "
                     + " | ".join(f"{row['tasks'].get(t, 0):.0f}" for t in tasks) + " |")
    num_layers = len(result["attention_on_token0"])
    lines += ["", "Per layer (0..%d):" % (num_layers - 1), "",
              "| measure | " + " | ".join(str(l) for l in range(num_layers)) + " |",
              "|---|" + "---:|" * num_layers]

    def row(name, values):
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")

    row("attention on token 0 (window queries)", result["attention_on_token0"])
    row(f"attention on tokens 0-{NUM_SINKS - 1} (window queries)",
        result[f"attention_on_first{NUM_SINKS}"])
    row("attention on token 0 (last query)", result["last_query_on_token0"])
    for key, values in result["kept_token0"].items():
        if "@" in key:
            row(f"`{key}` kv-heads keeping token 0", values)
    for key, values in result["kept_needles"].items():
        if "@" in key:
            row(f"`{key}` needle tokens kept", values)
    for key, values in result.get("needles_of_evicted", {}).items():
        if "@" in key:
            row(f"`{key}` needle share of the evicted tokens", values)
    for key, values in result["layer_budget_ratio"].items():
        if key.startswith("cake"):
            row(f"`{key}` layer budget / span", values)
    for key, values in result.get("capped", {}).items():
        row(f"`{key}` prompts whose budget is capped", values)
    return "\n".join(lines) + "\n"


def plot_cake(result: dict, out: Path) -> None:
    """Per layer, CAKE's budget over the span for each prompt and budget (and the cap)."""
    per_prompt = result["layer_budget_ratio_per_prompt"]
    if not per_prompt:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for i, (key, rows) in enumerate(per_prompt.items()):
        color = f"C{i}"
        for r in rows:
            ax.plot(r, color=color, alpha=0.25, lw=0.8)
        ax.plot(result["layer_budget_ratio"][key], color=color, lw=2, label=f"{key} (mean)")
        ax.axhline(result["cap_ratio"][key], color=color, ls="--", lw=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel("budget / prompt tokens")
    ax.set_title(f"CAKE's per-layer budgets, {result['model']}, {result['length']} tokens "
                 "(dashed: the max_layer_ratio cap)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "cake_budgets.png", dpi=110)


def plot_layers(result: dict, out: Path) -> None:
    """Per layer: the window's attention on token 0, and the share of needle tokens each
    compressing variant keeps (``layers.png``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(result["attention_on_token0"], "k-", label="window queries")
    top.plot(result["last_query_on_token0"], "k--", label="last query")
    top.set_ylabel("attention on token 0")
    top.legend(fontsize=8)
    for key, values in result["kept_needles"].items():
        if "@" in key and "+" not in key:
            bottom.plot(values, label=key)
    bottom.set_ylabel("needle tokens kept")
    bottom.set_xlabel("layer")
    bottom.legend(fontsize=7, ncol=2)
    top.set_title(f"{result['model']}, {result['protocol']}, {result['length']} tokens")
    fig.tight_layout()
    fig.savefig(out / "layers.png", dpi=110)


def write(result: dict, out: Path) -> None:
    """``profile.json``, ``profile.md`` and the plots in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(result, indent=1))
    (out / "profile.md").write_text(markdown(result))
    plot_cake(result, out)
    plot_layers(result, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvplug.quality_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model directory (default: kvplug models path)")
    p.add_argument("--variants", default="full,snapkv,cake,tova",
                   type=lambda s: [v for v in s.split(",") if v])
    p.add_argument("--budgets", default="0.25", type=lambda s: [float(b) for b in s.split(",")])
    p.add_argument("--tasks", default="passkey,niah_single_1,niah_single_2,niah_single_3,"
                                      "niah_multikey_1", type=lambda s: [t for t in s.split(",") if t])
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--num-samples", type=int, default=4, help="samples per task")
    p.add_argument("--protocol", choices=("query_aware", "query_agnostic"), default="query_aware")
    p.add_argument("--window", type=int, default=64,
                   help="prompt queries recorded (the largest observation window scored)")
    p.add_argument("--max-new-tokens", type=int, default=48,
                   help="decode at most this many tokens (below the task's own budget, e.g. "
                        "niah's 128: answers come first; decoding also stops at EOS and once "
                        "every reference is in the answer)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print(markdown(result))
    if args.out:
        write(result, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
