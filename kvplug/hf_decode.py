"""Decode speed of kvplug policies in the HF transformers path, on a random-init model.

One long prompt per policy: ``generate`` prefills it and decodes ``new_tokens``
greedy tokens; a streamer stamps every token as it reaches the host (so each
stamp follows a device sync).  Reported per policy: prefill seconds, decode
milliseconds per token (stamps after the first token), the KV the cache keeps
on the device and in host memory (ShadowKV: low-rank keys and exact window on
the device, the prompt's values pinned in host memory), and peak device memory.

    python -m kvplug.hf_decode --out DIR          # CUDA: Llama-3.1-8B-shaped at 32k
    python -m kvplug.hf_decode --smoke --out DIR  # a tiny model on CPU, seconds

Weights are random, so the tokens mean nothing.  ``--out`` writes ``hf_decode.md``
and ``hf_decode.json`` (every number, the device, the command), after each policy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# Llama-3.1-8B's shape (config.json of meta-llama/Llama-3.1-8B)
LLAMA_31_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                   vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192},
                   rms_norm_eps=1e-5, tie_word_embeddings=False)
# a few-layer stand-in with the same structure, for a CPU check of the whole script
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=4096,
            rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)


class TokenStamps:
    """A ``generate`` streamer that records when each ``put`` (prompt, then every new
    token) reaches it; ``generate`` moves tokens to the host first, a device sync."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def random_model(shape: dict[str, Any], device: str, dtype: torch.dtype):
    """A Llama model of ``shape`` with random weights, running kvplug attention."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from kvplug.integrations import transformers as kvhf

    kvhf.register()
    torch.manual_seed(0)
    config = LlamaConfig(**shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 attn_implementation=kvhf.ATTN_IMPLEMENTATION)
    return model.eval()


def decode_rows(shape: dict[str, Any], context: int, policies: list[str], budget: int,
                new_tokens: int, device: str, dtype: torch.dtype) -> Iterator[dict[str, Any]]:
    """One row per policy as it finishes (``full`` reads everything; the others ``budget``
    tokens)."""
    from kvplug.integrations import transformers as kvhf

    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 (decode time is measured after the first "
                         f"token), got {new_tokens}")
    model = random_model(shape, device, dtype)
    prompt = torch.randint(shape["vocab_size"], (1, context),
                           generator=torch.Generator().manual_seed(1)).to(device)
    for name in policies:
        policy = kvhf.attach_policy(model, name, **({} if name == "full" else
                                                    {"budget": budget}))
        stamps = TokenStamps()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, streamer=stamps, pad_token_id=0,
                                 return_dict_in_generate=True)
        kept = kvhf.cache_bytes(out.past_key_values)
        prefill, decode = stamps.times[1] - stamps.times[0], stamps.times[-1] - stamps.times[1]
        row = {
            "policy": name, "params": policy.params(), "context": context,
            "new_tokens": new_tokens, "prefill_s": round(prefill, 4),
            "decode_ms_per_token": round(1e3 * decode / (new_tokens - 1), 3),
            "kv_device_bytes": kept["device"], "kv_host_bytes": kept["host"],
            "peak_device_bytes": (torch.cuda.max_memory_allocated() if device == "cuda"
                                  else None)}
        del out
        if device == "cuda":
            torch.cuda.empty_cache()
        yield row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m kvplug.hf_decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--context", type=int, default=None,
                   help="prompt tokens (default: 32768 on CUDA, 2048 on CPU)")
    p.add_argument("--policies", default="full,quest,shadowkv")
    p.add_argument("--budget", type=int, default=2048, help="tokens a decode step reads")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--smoke", action="store_true",
                   help="a 2-layer model, 128 tokens, 4 new ones, on CPU: the script end to end")
    p.add_argument("--out", default=None, help="directory for hf_decode.md and hf_decode.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.context, args.new_tokens, args.budget = "cpu", 128, 4, 32
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    context = args.context or (32768 if device == "cuda" else 2048)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
              "model": "tiny Llama" if args.smoke else "Llama-3.1-8B-shaped, random init",
              "command": "python -m kvplug.hf_decode " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "rows": []}
    shape = TINY if args.smoke else LLAMA_31_8B
    for row in decode_rows(shape, context, args.policies.split(","), args.budget,
                           args.new_tokens, device, dtype):
        report["rows"].append(row)
        print(f"# HF {row['policy']:<10} context {row['context']}: prefill "
              f"{row['prefill_s']:.2f} s, decode {row['decode_ms_per_token']:.2f} ms/token, "
              f"KV {row['kv_device_bytes'] / 2**20:.0f} MiB device + "
              f"{row['kv_host_bytes'] / 2**20:.0f} MiB host", flush=True)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "hf_decode.json").write_text(json.dumps(report, indent=1) + "\n")
            (out / "hf_decode.md").write_text(markdown(report))
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# HF path decode: {report['device']}, {report['dtype']} ({report['model']}, "
             "batch 1)", "", f"Command: `{report['command']}`", "",
             "| policy | context | prefill s | decode ms/token | KV on device MiB | "
             "KV in host memory MiB | peak device MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        peak = "" if r["peak_device_bytes"] is None else f"{r['peak_device_bytes'] / 2**20:.0f}"
        lines.append(f"| {r['policy']} | {r['context']} | {r['prefill_s']:.2f} | "
                     f"{r['decode_ms_per_token']:.2f} | {r['kv_device_bytes'] / 2**20:.1f} | "
                     f"{r['kv_host_bytes'] / 2**20:.1f} | {peak} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
