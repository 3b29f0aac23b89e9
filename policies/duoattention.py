"""DuoAttention: retrieval heads read the whole context, streaming heads sink + recent.

Based on https://arxiv.org/abs/2410.10819 (mit-han-lab/duo-attention).  Each
(layer, kv-head) has a gate α in [0, 1], optimized offline (``kvplug duo
calibrate``) so that heads whose long-range attention does not change the
model's output get α near 0.  At decode, heads with a high α (retrieval heads)
read every KV token; the others (streaming heads) read the first
``sink_size`` tokens and the last ``recent_size``.  The cache keeps every
token: this is the read pattern, not the paper's split cache.

A pattern is the paper's format: ``full_attention_heads.tsv``, the α matrix
with one row per layer and one tab-separated column per kv-head, next to a
``config.json`` of the calibration's arguments.  Binarization as the paper's
``sparsify_attention_heads``: α >= ``threshold``, or the ``sparsity`` quantile
of α; ties go to the earlier (layer, head) instead of random noise, so a split
is deterministic.  With a ``budget`` the split follows the context instead:
the most retrieval heads (top α) whose average read fits the budget.

Composed with Quest (``retrieval_read="quest"``, the composition of
docs/design.md): the split comes from the pattern (threshold or sparsity), every
head reads sink + recent, and each retrieval head also reads its top Quest pages
(per-page key min/max bound of ``q·k``, outside sink and window), as many as
the budget leaves after the streaming reads, shared evenly by the retrieval
heads.  The budget then buys pages on the heads that use long context instead
of whole contexts on a few of them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kvplug.kernels import chunk_scores, select_topk
from kvplug.policies.base import Policy, param, register_policy
from kvplug.policies.selection import (Selection, SelectionPolicy, SummarySpec, check_chunk,
                                       recent_tokens)

PATTERN_FILE = "full_attention_heads.tsv"
CONFIG_FILE = "config.json"
BUNDLED = Path(__file__).parent / "patterns" / "SmolLM2-135M-Instruct"
PAPER_THRESHOLD = 0.5


def read_pattern(path: str | Path) -> Tensor:
    """The α matrix ``[layers, kv_heads]`` (float64, clipped to [0, 1]) of a pattern dir or TSV."""
    path = Path(path)
    tsv = path / PATTERN_FILE if path.is_dir() else path
    if not tsv.is_file():
        raise FileNotFoundError(f"DuoAttention pattern {str(path)!r} is neither a {PATTERN_FILE} "
                                f"file nor a directory holding one")
    try:  # numbers only: the file is text, parsed by float(), never unpickled or evaluated
        rows = [[float(x) for x in line.split("\t")]
                for line in tsv.read_text().splitlines() if line.strip()]
    except ValueError as e:
        raise ValueError(f"DuoAttention pattern {str(tsv)!r} is not a tab-separated matrix of "
                         f"numbers: {e}") from None
    if not rows or len({len(r) for r in rows}) != 1:
        raise ValueError(f"DuoAttention pattern {str(tsv)!r} must have one row per layer with "
                         f"the same number of kv-head columns; got row lengths "
                         f"{[len(r) for r in rows]}")
    alpha = torch.tensor(rows, dtype=torch.float64)
    bad = (~alpha.isfinite()).nonzero()
    if len(bad):  # float() reads 'nan' and 'inf'; a gate must be a number
        layer, head = bad[0].tolist()
        raise ValueError(f"DuoAttention pattern {str(tsv)!r} holds {len(bad)} non-finite "
                         f"gate(s), the first at layer {layer}, kv-head {head}: "
                         f"{alpha[layer, head].item()}")
    return alpha.clamp(0, 1)


def write_pattern(out_dir: str | Path, alpha: Tensor, config: dict[str, Any]) -> Path:
    """Write ``full_attention_heads.tsv`` (as the paper's ``np.savetxt``) and ``config.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(f"{v:.18e}" for v in row) for row in alpha.double().tolist()]
    (out / PATTERN_FILE).write_text("\n".join(lines) + "\n")
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def top_heads(alpha: Tensor, n: int) -> Tensor:
    """The ``n`` highest-α heads as a retrieval mask ``[layers, kv_heads]``; among equal α,
    the earlier (layer, head)."""
    mask = torch.zeros(alpha.numel(), dtype=torch.bool)
    mask[torch.sort(-alpha.flatten(), stable=True).indices[:n]] = True
    return mask.view(alpha.shape)


def threshold_heads(alpha: Tensor, threshold: float) -> Tensor:
    """Retrieval heads: α >= threshold."""
    return alpha >= threshold


def sparsity_heads(alpha: Tensor, sparsity: float) -> Tensor:
    """The paper's ``np.quantile(α, sparsity)`` cut: the ``ceil(sparsity·(N-1))`` lowest
    heads stream."""
    n = alpha.numel()
    streaming = n if sparsity >= 1 else math.ceil(round(sparsity * (n - 1), 9))
    return top_heads(alpha, n - streaming)


def budget_retrieval_count(num_heads: int, context_len: int, window: int, budget: int) -> int:
    """Most retrieval heads n with ``n·L + (N-n)·min(L, window) <= budget·N``."""
    if context_len <= window:
        return num_heads
    n = num_heads * (budget - window) // (context_len - window)
    return max(0, min(num_heads, n))


@register_policy("duoattention")
@dataclass
class DuoAttention(SelectionPolicy):
    summary = "retrieval heads read all KV, streaming heads sink + recent (bandwidth)"
    budget: int = param(0, "KV tokens read per decode step per sequence, averaged over layers "
                           "and kv-heads: sets the split (0: no budget)", min=0)
    budget_ratio: float = param(0.0, "the same as a fraction of the current context "
                                     "(0: no budget)", min=0.0, max=1.0)
    pattern: str = param("bundled", "pattern directory or full_attention_heads.tsv ('bundled': "
                                    "calibrated for SmolLM2-135M-Instruct)")
    threshold: float = param(-1.0, "α at or above it: retrieval head (-1: 0.5, the paper's, "
                                   "unless sparsity or a budget is set)", min=-1.0, max=1.0)
    sparsity: float = param(-1.0, "fraction of heads made streaming, lowest α first "
                                  "(-1: unused)", min=-1.0, max=1.0)
    sink_size: int = param(64, "first tokens a streaming head reads", min=0)
    recent_size: int = param(256, "last tokens a streaming head reads", min=1)
    retrieval_read: str = param("all", "what a retrieval head reads: the whole context (the "
                                       "paper) or, within the budget, sink + recent and its "
                                       "top Quest pages", choices=("all", "quest"))
    page_size: int = param(16, "Quest page of the retrieval heads (retrieval_read='quest'; "
                               "vLLM-cpu reads whole 32-token blocks fastest)", min=1)

    def __post_init__(self) -> None:
        Policy.__post_init__(self)  # the budget is optional here
        for name in ("threshold", "sparsity"):
            value = getattr(self, name)
            if -1 < value < 0:
                raise ValueError(f"policy 'duoattention': {name}={value} must be in [0, 1], "
                                 "or -1 for unused")
        split = [f"{k}={getattr(self, k)}" for k in ("threshold", "sparsity")
                 if getattr(self, k) != -1]
        budgets = [f"{k}={getattr(self, k)}" for k in ("budget", "budget_ratio")
                   if getattr(self, k) != 0]
        if self.reads_pages:
            if len(budgets) != 1 or len(split) > 1:
                raise ValueError(f"policy 'duoattention': retrieval_read='quest' needs exactly "
                                 f"one of budget and budget_ratio (the pages it reads) and at "
                                 f"most one of threshold and sparsity (the head split); got "
                                 f"{', '.join(budgets + split) or 'none'}")
        elif len(split + budgets) > 1:
            raise ValueError(f"policy 'duoattention': set at most one of threshold, sparsity, "
                             f"budget and budget_ratio; got {', '.join(split + budgets)}")
        elif self.page_size != 16:
            raise ValueError(f"policy 'duoattention': page_size={self.page_size} is read only "
                             f"with retrieval_read='quest'")
        if 0 < self.budget < self.sink_size + self.recent_size:
            raise ValueError(f"policy 'duoattention': budget={self.budget} is less than a "
                             f"streaming head reads, sink_size + recent_size = "
                             f"{self.sink_size + self.recent_size}")
        try:
            self.alpha = read_pattern(BUNDLED if self.pattern == "bundled" else self.pattern)
        except (OSError, ValueError) as e:
            raise ValueError(f"policy 'duoattention': parameter 'pattern'={self.pattern!r}: "
                             f"{e}") from None
        if self.sparsity >= 0:
            self.retrieval = sparsity_heads(self.alpha, self.sparsity)
        else:
            self.retrieval = threshold_heads(self.alpha, self.threshold if self.threshold >= 0
                                             else PAPER_THRESHOLD)
        self.unit = 1

    def check_model(self, num_layers, num_kv_heads, unit):
        """Refuse a pattern calibrated for another shape of model; remember the read unit."""
        layers, heads = self.alpha.shape
        if (num_layers, num_kv_heads) != (layers, heads):
            raise ValueError(f"policy 'duoattention': pattern {self.pattern!r} has {layers} "
                             f"layers x {heads} kv-heads, the model {num_layers} x "
                             f"{num_kv_heads}; calibrate one for it with `kvplug duo calibrate`")
        super().check_model(num_layers, num_kv_heads, unit)
        self.unit = unit

    @property
    def reads_pages(self) -> bool:
        return self.retrieval_read == "quest"

    def _page(self, layer_idx: int, unit: int) -> int | None:
        """The Quest page this layer's retrieval heads read, None if they read all or none."""
        if not self.reads_pages or not bool(self.retrieval[layer_idx].any()):
            return None
        return check_chunk(self.name, "page_size", self.page_size, unit)

    def summary_spec(self, layer_idx, unit):
        page = self._page(layer_idx, unit)
        return None if page is None else SummarySpec("minmax", page)

    def read_chunk(self, layer_idx, unit):
        return self._page(layer_idx, unit)

    def streaming_reads(self, seq_lens: Tensor, unit: int) -> tuple[int, Tensor]:
        """(sink, recent) tokens of a streaming head, in whole read units."""
        n_sink = -(-self.sink_size // unit) * unit
        return n_sink, recent_tokens(seq_lens, -(-self.recent_size // unit), unit)

    @property
    def has_budget(self) -> bool:
        return self.budget > 0 or self.budget_ratio > 0

    def retrieval_count(self, context_len: int, window: int) -> int:
        """Retrieval heads in the model at ``context_len`` (streaming heads read ``window``)."""
        if not self.has_budget or self.reads_pages:
            return int(self.retrieval.sum())
        return budget_retrieval_count(self.alpha.numel(), context_len, window,
                                      self.token_budget(context_len))

    def kv_tokens_read(self, context_len: int) -> float:
        """Average over layers and kv-heads of the tokens each reads."""
        n_sink, recent = self.streaming_reads(torch.tensor([context_len]), self.unit)
        window = min(context_len, n_sink + int(recent))
        n, total = self.retrieval_count(context_len, window), self.alpha.numel()
        if self.reads_pages:
            pages = self.pages_per_head(torch.tensor([context_len]), torch.tensor([window]))
            return min(context_len, window + n * int(pages) * self.page_size / total)
        return (n * context_len + (total - n) * window) / total

    def pages_per_head(self, seq_lens: Tensor, window: Tensor) -> Tensor:
        """``[B]`` Quest pages each retrieval head reads: the budget left after every head's
        ``window``, shared evenly by the model's retrieval heads."""
        spare = (self.token_budgets(seq_lens) - window).clamp_min(0) * self.alpha.numel()
        return spare // max(1, int(self.retrieval.sum()) * self.page_size)

    def retrieval_heads(self, seq_lens: Tensor, window: Tensor) -> Tensor:
        """This step's ``[layers, kv_heads]`` split; a batch shares that of its tightest row."""
        if not self.has_budget or self.reads_pages:
            return self.retrieval
        n = min(self.retrieval_count(L, W) for L, W in zip(seq_lens.tolist(), window.tolist()))
        return top_heads(self.alpha, n)

    def plan_step(self, seq_lens: Tensor, unit: int) -> DuoStep:
        """The streaming heads' reads, whether every row fits them, every layer's
        retrieval heads and, reading Quest pages, what every head shares and the pages
        each retrieval head reads: the same at every layer of a step (the layers'
        selections share the streaming part, so engines reuse its tables)."""
        n_sink, recent = self.streaming_reads(seq_lens, unit)
        window = torch.minimum(seq_lens, n_sink + recent)
        fits = window == seq_lens
        streaming = Selection(None, 1, n_sink, torch.where(fits, seq_lens, recent))
        step = DuoStep(streaming, bool(fits.all()), self.retrieval_heads(seq_lens, window)
                       .to(seq_lens.device))
        if self.reads_pages:
            fits = self.token_budgets(seq_lens) >= seq_lens
            step.pages_fit = bool(fits.all())
            step.base = replace(streaming,
                                n_recent=torch.where(fits, seq_lens, streaming.n_recent))
            step.pages_per_head = self.pages_per_head(seq_lens, window)
        return step

    def select(self, layer_idx, q, summary, seq_lens, ctx):
        step = ctx.plan
        if self.reads_pages:
            return self._with_pages(layer_idx, q, summary, seq_lens, step, ctx.unit)
        if step.all_fit or bool(step.retrieval[layer_idx].all()):
            return None
        return replace(step.streaming, dense_kv_heads=step.retrieval[layer_idx])

    def _with_pages(self, layer_idx, q, summary, seq_lens, step: DuoStep,
                    unit: int) -> Selection | None:
        """Every head: sink + recent; this layer's retrieval heads also their top pages."""
        heads, base, k_per_seq = step.retrieval[layer_idx], step.base, step.pages_per_head
        if step.pages_fit:
            return None
        if not bool(heads.any()) or int(k_per_seq.max()) == 0:
            return base
        page = self._page(layer_idx, unit)
        # candidates: pages wholly before the recent window, outside the sink
        num_pages = (seq_lens - base.n_recent).clamp_min(0) // page
        scores = chunk_scores(q, summary.lo, num_pages, summary_max=summary.hi,
                              summary_table=summary.table)
        scores[..., : -(-base.n_sink // page)] = float("-inf")
        ids = select_topk(scores, heads.numel(), num_pages, int(k_per_seq.max()),
                          k_per_seq=k_per_seq, softmax=False)
        return replace(base, chunk_ids=ids.masked_fill(~heads[None, :, None], -1),
                       chunk_size=page)


@dataclass
class DuoStep:
    """One decode step of DuoAttention (:meth:`DuoAttention.plan_step`)."""

    streaming: Selection        # the streaming heads' sink + recent reads
    all_fit: bool               # every row's context fits the streaming reads
    retrieval: Tensor           # [layers, kv_heads] the retrieval heads of this step
    # reading Quest pages: every row fits the budget, the reads every head shares, and
    # the [B] pages each retrieval head reads
    pages_fit: bool = False
    base: Selection | None = None
    pages_per_head: Tensor | None = None
