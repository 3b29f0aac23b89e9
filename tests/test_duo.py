"""``kvplug duo calibrate``: streaming attention, data, and the gate optimization."""

import json
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from kvplug import duo
from kvplug.cli import main
from kvplug.policies import build_policy


@pytest.fixture
def one_thread():
    """One thread: while another process keeps the other core busy, OpenMP's second thread
    spins and stalls every op (a tiny model's calibration step took 30x longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _window_mask(L, sink, recent):
    i, j = torch.arange(L)[:, None], torch.arange(L)[None]
    return (j <= i) & ((j < sink) | (i - j < recent))


@pytest.mark.parametrize("L, sink, recent", [(100, 4, 16), (50, 64, 128), (129, 0, 1),
                                             (256, 8, 64)])
def test_banded_streaming_attention_equals_masked_sdpa(L, sink, recent):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, L, 8, requires_grad=True) for _ in range(3))
    out = duo.streaming_attention(q, k, v, sink, recent, scale=0.3)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=_window_mask(L, sink, recent),
                                          scale=0.3)
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_lr_schedule_is_the_papers():
    factor = duo._lr_factor(10)  # warm-up and decay over 10 // 5 = 2 steps, floor 0.1
    assert [factor(s) for s in range(10)] == [0.5, 1, 1, 1, 1, 1, 1, 1, 1, 0.5]
    assert duo._lr_factor(100)(0) == 0.1 and duo._lr_factor(100)(99) == 0.1


def test_passkey_samples(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    samples = duo.PasskeySamples(tok, num_passkeys=3, passkey_words=6)
    for length in (500, 777):
        s = samples.sample(length, random.Random(1))
        assert s.input_ids.shape == s.answer.shape == (length,)
        start = int(s.answer.float().argmax())
        assert s.answer[start:].all() and not s.answer[:start].any()  # the answers end the sample
        context, answers = tok.decode(s.input_ids[:start]), tok.decode(s.input_ids[start:])
        keys = [line for line in answers.split("\n") if line.startswith("Passkey: ")]
        assert len(keys) == 3 and all(len(k.split()) == 1 + 6 for k in keys)
        found = [context.index(f"{o} passkey to the vault: {k[len('Passkey: '):]}")
                 for o, k in zip(("first", "second", "third"), keys)]
        assert found == sorted(found)                                 # needles in order
        assert found[0] > 40 and found[-1] < len(context) - 40        # depths within [5%, 95%]
    a, b = (samples.sample(600, random.Random(7)) for _ in range(2))
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, samples.sample(600, random.Random(8)).input_ids)
    with pytest.raises(ValueError, match="100-token sample is too short for 3 passkeys"):
        samples.sample(100, random.Random(0))


def _planted_llama(streaming_heads):
    """A random 3-layer GQA Llama whose listed (layer, kv-head)s output the same vector at
    every position (no value weights, only a bias): their streaming output is their full one."""
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, attention_bias=True, initializer_range=0.2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    d = config.head_dim
    with torch.no_grad():
        for layer, head in streaming_heads:
            v = model.model.layers[layer].self_attn.v_proj
            v.weight[head * d:(head + 1) * d] = 0
            v.bias[head * d:(head + 1) * d] = torch.randn(d)
    return model


def _random_samples(vocab, length, answer_tokens, seed):
    g = torch.Generator().manual_seed(seed)
    answer = torch.zeros(length, dtype=torch.bool)
    answer[-answer_tokens:] = True
    while True:
        yield duo.Sample(torch.randint(0, vocab, (length,), generator=g), answer)


def test_calibration_recovers_planted_retrieval_heads(one_thread):
    planted = [(0, 1), (1, 0), (2, 1)]
    model = _planted_llama(planted)
    impl = model.config._attn_implementation
    alpha, history = duo.calibrate(model, _random_samples(64, 96, 16, seed=0), 150,
                                   lr=0.02, reg=0.05, sink=4, recent=8)
    retrieval = torch.ones(3, 2, dtype=torch.bool)
    for layer, head in planted:
        retrieval[layer, head] = False
    assert torch.equal(alpha >= 0.5, retrieval), alpha
    assert alpha[~retrieval].max() < 0.1 and alpha[retrieval].min() > 0.7
    assert len(history) == 150 and history[0]["distill_loss"] == 0  # α = 1: mixed == full
    # the model is left as it was
    assert model.config._attn_implementation == impl
    assert all(p.requires_grad for p in model.parameters())


def test_cli_writes_a_pattern_the_policy_loads(model_dir, tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # run() sets it when unset
    tok = AutoTokenizer.from_pretrained(model_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024)
    torch.manual_seed(0)
    tiny = tmp_path / "tiny"
    LlamaForCausalLM(config).save_pretrained(tiny)
    tok.save_pretrained(tiny)
    out = tmp_path / "pattern"
    assert main(["duo", "calibrate", "--model", str(tiny), "--out", str(out), "--steps", "3",
                 "--lengths", "300", "400", "--passkeys", "2", "--passkey-words", "4",
                 "--sink", "8", "--recent", "16"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == "tiny" and cfg["num_steps"] == 3 and cfg["lengths"] == [300, 400]
    assert cfg["sink_size"] == 8 and cfg["recent_size"] == 16 and cfg["lr"] == 0.02
    assert cfg["final_loss"] > 0 and cfg["wall_time_s"] >= 0
    policy = build_policy("duoattention", {"pattern": str(out)})
    policy.check_model(2, 2, 1)
    assert policy.alpha.shape == (2, 2) and ((policy.alpha > 0.9) & (policy.alpha < 1)).all()


def test_cli_rejects_lengths_within_the_window(capsys, tmp_path):
    assert main(["duo", "calibrate", "--out", str(tmp_path), "--lengths", "150",
                 "--sink", "64", "--recent", "128"]) == 2
    assert "--lengths [150] must all exceed --sink + --recent = 192" in capsys.readouterr().err


def test_bundled_pattern_beats_a_random_split_of_as_many_heads(model_dir, one_thread):
    """The shipped calibration on a held-out sample, at the deployment window: the final
    hidden states move far less than with as many retrieval heads drawn at random."""
    from transformers import AutoModelForCausalLM

    from kvplug.policies.duoattention import top_heads

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    learned = build_policy("duoattention").retrieval
    drawn = top_heads(torch.rand(learned.shape, generator=torch.Generator().manual_seed(0),
                                 dtype=torch.float64), int(learned.sum()))
    sample = duo.PasskeySamples(tok).sample(640, random.Random(12345))
    gates = duo.Gates(torch.nn.Parameter(learned.float()), sink=64, recent=256)
    with duo.gated(model, gates), torch.no_grad():
        learned_loss = duo.distill_step(model, sample, gates, reg=0.0)[0]
        gates.alpha.copy_(drawn)
        drawn_loss = duo.distill_step(model, sample, gates, reg=0.0)[0]
    assert 0 < 10 * learned_loss < drawn_loss, (learned_loss, drawn_loss)
