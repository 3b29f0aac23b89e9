"""``kvplug duo calibrate``: DuoAttention's per-head gates, optimized on this machine.

Based on https://arxiv.org/abs/2410.10819 (mit-han-lab/duo-attention,
``duo_attn/train.py``).  As the paper's code:

* one gate α per (layer, kv-head), initialised to 1; the model is frozen;
* a two-way forward: a full-attention pass, then a mixed pass in which each
  kv-head group's attention output is ``α·full + (1-α)·streaming``, where
  ``full`` is that layer's output in the full pass (the official two-way
  forward takes it from the full copy of the batch) and ``streaming`` attends
  causally to the first ``sink`` tokens and the last ``recent`` ones;
* loss: the mean squared error of the final hidden states (after the last
  norm, before ``lm_head``) of the two passes on the answer tokens, plus
  ``reg·mean|α|``; AdamW on α only (no weight decay) with the official
  schedule (linear warm-up over the first fifth of the steps, decay over the
  last fifth, floor 0.1); α clamped to [0, 1] after each step;
* data: synthetic multi-passkey samples, passkeys of NATO-alphabet words
  inserted in a natural-text haystack at depths in [0.05, 0.95], followed by
  one question and passkey per needle; the answers are the loss tokens.

Scaled for SmolLM2-135M in float32 on a 2-core CPU (the paper: 7-8B models
on 8 GPUs, 2000 steps at 1k-32k tokens, 10 passkeys of 32 words, training sink
128 and recent 256), so that the default run takes 10-15 minutes on a free CPU:

* 128 steps on samples of 768, 1024 and 1280 tokens (a step is a forward
  pass without gradients, then one forward and backward: 4-7 s on a free
  CPU).  At lr 0.02 with the warm-up and decay that is room for an unneeded
  head to travel from α = 1 to 0, and for a needed one, pushed down by the
  regularizer first, to come back;
* 5 passkeys of 8 words, so that needles and answers (~380 tokens) leave
  half of the shortest sample to the haystack;
* training sink 64 and recent 128: at these lengths the paper's 384-token
  window would cover up to half of the context, and with it many needles.
  Both stay within the deployment window (64 + 256), so a head that does
  without long-range attention here does at deployment too.

The streaming attention is computed in bands (``L·(sink + 2·recent)`` scores
rather than a masked ``L²``), and the command makes OpenMP threads wait
passively: with another process on the machine, spinning threads made a step
2-3x slower.

The haystack is ``evals/ruler/data/essays.txt`` (shipped prose) instead of
BookSum.  Output: the paper's pattern format, ``full_attention_heads.tsv``
and ``config.json`` (see :mod:`kvplug.policies.duoattention`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads in the functions: see run()
    import torch
    from torch import Tensor

ATTENTION = "kvplug_duo_calibrate"
_GATES_ATTR = "kvplug_duo_gates"  # set on each attention module while calibrating

NATO = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
        "juliett", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
        "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth",
            "ninth", "tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth",
            "sixteenth", "seventeenth", "eighteenth", "nineteenth", "twentieth")
PROMPT = "This is a very long story book: <book> "
PROMPT_END = " </book>.\n\n"
NEEDLE = "Remember this sequence of words, it's the {ordinal} passkey to the vault: "
QUESTION = ("Based on the content of the book, what is the {ordinal} passkey to the vault?\n"
            "Passkey: ")
SEPARATOR = "\n\n"
DEPTHS = (0.05, 0.95)
DEPTH_INTERVALS = 1000
NUM_PASSKEYS, PASSKEY_WORDS = 5, 8


@dataclass(frozen=True)
class Sample:
    """One calibration sequence (unpadded)."""

    input_ids: Tensor  # [L]
    answer: Tensor     # [L] bool: the loss tokens


class PasskeySamples:
    """Multi-passkey samples of exact token lengths, deterministic in the random generator.

    As the official ``MultiplePasskeyRetrievalDataset``: built at token level,
    the i-th needle "...the {i-th} passkey to the vault: <words>" between
    separators at the i-th of ``num_passkeys`` sorted depths drawn from 1000
    points, then the questions each followed by its passkey (the loss tokens).
    The haystack is a window of the essays at a random offset (wrapping).
    """

    def __init__(self, tokenizer, num_passkeys: int = NUM_PASSKEYS,
                 passkey_words: int = PASSKEY_WORDS):
        if not 1 <= num_passkeys <= len(ORDINALS):
            raise ValueError(f"num_passkeys={num_passkeys} must be in [1, {len(ORDINALS)}]")
        if passkey_words < 1:
            raise ValueError(f"passkey_words={passkey_words} must be at least 1")
        from kvplug.evals.ruler.synth import ESSAYS

        self.num_passkeys, self.passkey_words = num_passkeys, passkey_words
        self.encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
        self.haystack = self.encode(ESSAYS.read_text(encoding="utf-8"))
        self.prompt = tokenizer.encode(PROMPT, add_special_tokens=True)
        self.prompt_end, self.sep = self.encode(PROMPT_END), self.encode(SEPARATOR)
        self.needles = [self.encode(NEEDLE.format(ordinal=o)) for o in ORDINALS[:num_passkeys]]
        self.questions = [self.encode(QUESTION.format(ordinal=o)) for o in ORDINALS[:num_passkeys]]
        step = (DEPTHS[1] - DEPTHS[0]) / (DEPTH_INTERVALS - 1)
        self.depths = [DEPTHS[0] + i * step for i in range(DEPTH_INTERVALS)]

    def sample(self, length: int, rng: random.Random) -> Sample:
        import torch

        keys = [self.encode(" ".join(rng.choice(NATO) for _ in range(self.passkey_words)))
                for _ in range(self.num_passkeys)]
        needles = [self.sep + n + k + self.sep for n, k in zip(self.needles, keys)]
        answers = [q + k + self.sep for q, k in zip(self.questions, keys)]
        fixed = (len(self.prompt) + len(self.prompt_end) + sum(map(len, needles))
                 + sum(map(len, answers)))
        n_hay = length - fixed
        if n_hay < self.num_passkeys:
            raise ValueError(f"a {length}-token sample is too short for {self.num_passkeys} "
                             f"passkeys of {self.passkey_words} words (needs about "
                             f"{fixed + self.num_passkeys} tokens)")
        start = rng.randrange(len(self.haystack))
        hay = [self.haystack[(start + i) % len(self.haystack)] for i in range(n_hay)]
        context, last = list(self.prompt), 0
        for depth, needle in zip(sorted(rng.sample(self.depths, self.num_passkeys)), needles):
            at = int(n_hay * depth)
            context += hay[last:at] + needle
            last = at
        context += hay[last:] + self.prompt_end
        qa = [t for a in answers for t in a]
        answer = torch.zeros(len(context) + len(qa), dtype=torch.bool)
        answer[len(context):] = True
        return Sample(torch.tensor(context + qa), answer)

    def stream(self, lengths: Sequence[int], seed: int) -> Iterator[Sample]:
        """Endless samples; each pass over ``lengths`` in a new shuffled order."""
        rng = random.Random(seed)
        while True:
            order = list(lengths)
            rng.shuffle(order)
            for length in order:
                yield self.sample(length, rng)


@dataclass
class Gates:
    """The gates α ``[layers, kv_heads]`` and the two-way forward's state."""

    alpha: torch.nn.Parameter
    sink: int
    recent: int
    mixed: bool = False
    reference: dict[int, Tensor] | None = None  # layer -> its full-pass attention output


def streaming_attention(query: Tensor, key: Tensor, value: Tensor, sink: int, recent: int,
                        scale: float | None = None) -> Tensor:
    """Causal attention of each query to the first ``sink`` keys and its last ``recent`` ones.

    ``[B, H, L, D]`` in and out (keys repeated to H heads).  Computed in bands
    of ``recent`` queries, each reading the sink and the two bands up to its
    own: ``L·(sink + 2·recent)`` scores instead of the ``L²`` of a masked SDPA.
    """
    import torch
    import torch.nn.functional as F

    B, H, L, D = query.shape
    n = -(-L // recent)
    q = F.pad(query, (0, 0, 0, n * recent - L)).view(B, H, n, recent, D)
    start = torch.arange(n, device=query.device) * recent - recent             # [n]
    pos = start[:, None] + torch.arange(2 * recent, device=query.device)       # [n, 2R]
    sink_pos = torch.arange(min(sink, L), device=query.device)
    k = torch.cat([key[:, :, None, :len(sink_pos)].expand(B, H, n, -1, D),
                   key[:, :, pos.clamp(0, L - 1)]], 3)
    v = torch.cat([value[:, :, None, :len(sink_pos)].expand(B, H, n, -1, D),
                   value[:, :, pos.clamp(0, L - 1)]], 3)
    qpos = (start[:, None] + recent + torch.arange(recent, device=query.device))[..., None]
    in_sink = (sink_pos <= qpos) & (sink_pos < start[:, None, None])    # not again in the band
    in_band = (pos[:, None] >= 0) & (pos[:, None] <= qpos) & (
        (qpos - pos[:, None] < recent) | (pos[:, None] < sink))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.cat([in_sink, in_band], -1),
                                         scale=scale)
    return out.reshape(B, H, n * recent, D)[:, :, :L]


def gated_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                    attention_mask: Tensor | None, scaling: float | None = None,
                    **kwargs) -> tuple[Tensor, None]:
    """Full pass: SDPA, remembered per layer.  Mixed pass: α·full + (1-α)·streaming."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    gates: Gates = getattr(module, _GATES_ATTR)
    layer = module.layer_idx
    if not gates.mixed:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask,
                                        scaling=scaling, **kwargs)
        gates.reference[layer] = out
        return out, None
    if attention_mask is not None:
        raise ValueError("DuoAttention calibration runs unpadded single sequences; got an "
                         "attention mask")
    group = query.shape[1] // key.shape[1]
    stream = streaming_attention(query, key.repeat_interleave(group, 1),
                                 value.repeat_interleave(group, 1), gates.sink, gates.recent,
                                 scaling).transpose(1, 2)                      # [B, L, H_q, D]
    a = gates.alpha[layer].clamp(0, 1).repeat_interleave(group)[:, None]
    return a * gates.reference[layer] + (1 - a) * stream, None


def _lr_factor(steps: int) -> Callable[[int], float]:
    """The official schedule: warm up over steps/5, hold, decay over the last steps/5; floor 0.1."""
    ramp = max(steps // 5, 1)
    return lambda s: min(1.0, max((s + 1) / ramp, 0.1), max((steps - s) / ramp, 0.1))


def distill_step(model, sample: Sample, gates: Gates, reg: float) -> tuple[Tensor, Tensor]:
    """One two-way forward: (distillation loss, total loss)."""
    import torch

    ids = sample.input_ids[None]
    with torch.no_grad():
        gates.mixed, gates.reference = False, {}
        full = model.base_model(input_ids=ids).last_hidden_state[0, sample.answer]
    gates.mixed = True
    mixed = model.base_model(input_ids=ids).last_hidden_state[0, sample.answer]
    gates.reference = None
    distill = (full - mixed).pow(2).mean(-1).mean()
    return distill, distill + reg * gates.alpha.abs().mean()


@contextlib.contextmanager
def gated(model, gates: Gates) -> Iterator[None]:
    """The model frozen, with ``gates`` in every attention layer; restored on exit."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTENTION, gated_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    modules = [m for m in model.modules() if hasattr(m, "layer_idx")]
    for m in modules:
        setattr(m, _GATES_ATTR, gates)
    try:
        yield
    finally:
        for m in modules:
            delattr(m, _GATES_ATTR)
        for p in trainable:
            p.requires_grad_(True)
        model.set_attn_implementation(previous)


def calibrate(model, samples: Iterable[Sample], steps: int, *, lr: float = 0.02,
              reg: float = 0.05, sink: int = 64, recent: int = 128,
              log: Callable[[dict], None] | None = None) -> tuple[Tensor, list[dict]]:
    """Optimize the gates of a HF Llama-style model: (α ``[layers, kv_heads]``, history)."""
    import torch

    config = model.config
    alpha = torch.nn.Parameter(torch.ones(config.num_hidden_layers, config.num_key_value_heads))
    gates = Gates(alpha, sink, recent)
    optimizer = torch.optim.AdamW([alpha], lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(steps))
    history = []
    with gated(model, gates):
        for step, sample in zip(range(steps), samples):
            t0 = time.monotonic()
            distill, loss = distill_step(model, sample, gates, reg)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            with torch.no_grad():
                alpha.clamp_(0, 1)
            history.append({"step": step + 1, "tokens": len(sample.input_ids),
                            "distill_loss": distill.item(), "loss": loss.item(),
                            "mean_alpha": alpha.mean().item(),
                            "seconds": time.monotonic() - t0})
            if log:
                log(history[-1])
    return alpha.detach().clone(), history


# -- command line ----------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="duo_cmd", required=True)
    c = sub.add_parser("calibrate", help="optimize DuoAttention's per-head gates and write a "
                       "pattern (full_attention_heads.tsv + config.json)")
    c.add_argument("--model", default=None, help="HF model directory (default: kvplug models path)")
    c.add_argument("--out", required=True, help="output pattern directory")
    c.add_argument("--steps", type=int, default=128, help="optimizer steps, one sample each")
    c.add_argument("--lengths", type=int, nargs="+", default=[768, 1024, 1280],
                   help="sample lengths in tokens, cycled in a shuffled order")
    c.add_argument("--lr", type=float, default=0.02, help="AdamW learning rate (the paper's)")
    c.add_argument("--reg", type=float, default=0.05, help="weight of mean|α| (the paper's)")
    c.add_argument("--sink", type=int, default=64, help="streaming sink tokens while training")
    c.add_argument("--recent", type=int, default=128, help="streaming recent tokens while training")
    c.add_argument("--passkeys", type=int, default=NUM_PASSKEYS, help="passkeys per sample")
    c.add_argument("--passkey-words", type=int, default=PASSKEY_WORDS, help="words per passkey")
    c.add_argument("--seed", type=int, default=0, help="seed of the samples")


def _check_args(args: argparse.Namespace) -> None:
    for name, low in (("steps", 1), ("sink", 0), ("recent", 1)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name} must be >= {low}, got {getattr(args, name)}")
    for name in ("lr", "reg"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if min(args.lengths) <= args.sink + args.recent:
        raise ValueError(f"--lengths {args.lengths} must all exceed --sink + --recent = "
                         f"{args.sink + args.recent}, or streaming equals full attention")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    # passive OpenMP threads (see the module docstring); read when torch is first imported,
    # which the command line has not done yet
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvplug import models
    from kvplug.policies.duoattention import write_pattern

    model_path = Path(args.model or models.model_dir(None))
    if not model_path.is_dir():
        raise FileNotFoundError(f"model directory '{model_path}' does not exist; run "
                                "`kvplug models fetch` or pass --model DIR")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    samples = PasskeySamples(tokenizer, args.passkeys, args.passkey_words)
    for length in args.lengths:  # fail on a too-short length before loading the model
        samples.sample(length, random.Random(args.seed))
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    t0 = time.monotonic()

    def log(h: dict) -> None:
        eta = (time.monotonic() - t0) / h["step"] * (args.steps - h["step"])
        print(f"step {h['step']}/{args.steps}  tokens {h['tokens']}  distill "
              f"{h['distill_loss']:.3e}  loss {h['loss']:.4f}  mean α {h['mean_alpha']:.3f}  "
              f"{h['seconds']:.1f} s  eta {eta / 60:.1f} min", file=sys.stderr, flush=True)

    alpha, history = calibrate(model, samples.stream(args.lengths, args.seed), args.steps,
                               lr=args.lr, reg=args.reg, sink=args.sink, recent=args.recent,
                               log=log)
    wall = time.monotonic() - t0
    config = {"model": model_path.name, "num_steps": args.steps, "lengths": args.lengths,
              "lr": args.lr, "reg_weight": args.reg, "sink_size": args.sink,
              "recent_size": args.recent, "num_passkeys": args.passkeys,
              "passkey_words": args.passkey_words, "min_needle_depth_ratio": DEPTHS[0],
              "max_needle_depth_ratio": DEPTHS[1], "initial_value": 1.0, "seed": args.seed,
              "dtype": "float32", "torch_threads": torch.get_num_threads(),
              "final_distill_loss": history[-1]["distill_loss"],
              "final_loss": history[-1]["loss"], "wall_time_s": round(wall, 1)}
    out = write_pattern(args.out, alpha, config)
    print(f"wrote {out} ({wall / 60:.1f} min, final loss {history[-1]['loss']:.4f}); "
          f"α >= 0.5: {int((alpha >= 0.5).sum())} of {alpha.numel()} heads")
    return 0
