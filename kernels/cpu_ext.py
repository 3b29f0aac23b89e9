"""kvplug's C++ CPU kernels (``kernels/csrc``), compiled once per machine on first use.

Triton has no CPU backend here, and some reads cannot be vectorized in torch without
writing a full-precision copy of what they read (ZipCache's packed pages): those have a
C++ kernel, built with torch's extension loader (g++ and ninja, both needed) for the
machine's own instruction set into ``~/.cache/kvplug/cpu_ext/<cpu>-<sources>`` (override
the root with ``KVPLUG_CPU_EXT_DIR``).  :func:`cpu_ext` builds or loads it; the first call
takes about a minute, later ones (and other processes) load the built library.  Each
checkout of the sources builds into its own directory: ninja rebuilds whenever the source
paths in its build file change, so checkouts sharing one would rebuild each other's.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCES = ("bindings.cpp", "quant_pages_cpu.cpp", "paged_queries_cpu.cpp")
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]


def _build_tag() -> str:
    """The build's machine (``-march=native`` code must not run on another CPU) and the
    sources' directory."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "model name")):
                flags += line
                if line.startswith("flags"):
                    break
    except OSError:
        flags = platform.processor()
    sources = hashlib.sha1(str(Path(__file__).with_name("csrc").resolve()).encode())
    return (f"{platform.machine()}-{hashlib.sha1(flags.encode()).hexdigest()[:12]}"
            f"-{sources.hexdigest()[:8]}")


@functools.cache
def cpu_ext():
    """The compiled module (``pages_decode``, ``paged_queries``); raises ``RuntimeError``
    naming what failed when it cannot be built."""
    from torch.utils.cpp_extension import load

    build = Path(os.environ.get("KVPLUG_CPU_EXT_DIR",
                                Path.home() / ".cache" / "kvplug" / "cpu_ext")) / _build_tag()
    build.mkdir(parents=True, exist_ok=True)
    sources = [str(Path(__file__).with_name("csrc") / name) for name in SOURCES]
    logger.info("kvplug: loading its CPU kernels (built once into %s)", build)
    try:
        return load(name="kvplug_cpu_ext", sources=sources, extra_cflags=FLAGS,
                    extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False)
    except (OSError, RuntimeError, ImportError) as e:  # no compiler, ninja or headers
        raise RuntimeError(f"kvplug could not build its CPU kernels {SOURCES} in {build} "
                           f"(needs g++ and ninja): {e}") from e


@functools.cache
def optional_cpu_ext(instead: str):
    """:func:`cpu_ext`, or None with one warning naming what failed and what runs
    ``instead`` (callers with a slower path of their own)."""
    try:
        return cpu_ext()
    except RuntimeError as e:
        logger.warning("%s; %s", e, instead)
        return None
