"""Fixtures for the kernel tests, and Triton's interpreter mode.

There is no GPU here, so the Triton kernels run under ``TRITON_INTERPRET=1``.
Triton reads that variable when a kernel is decorated *and* when it is
launched, so the kernel modules are imported with it set and each test in
this folder runs with it set.  It is unset again between tests so it does not
leak into other tests (spawned vLLM workers inherit the environment).

If Triton itself was imported earlier in the session without the variable
(triton.language's own helpers are then compiled-mode functions the
interpreter cannot call), nothing can be interpreted: the launchers fall back
to the reference and ``test_common.py::test_launchers_run_triton_not_the_reference``
fails, saying so.  Run ``pytest tests/kernels`` on its own, or export
``TRITON_INTERPRET=1`` for the session, in that case.

``KVPLUG_TEST_DEVICE=cuda`` runs the same tests compiled on a GPU instead.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

import pytest
import torch

DEVICE = os.environ.get("KVPLUG_TEST_DEVICE", "cpu")
# set when triton was imported before this conftest, not in interpreter mode
TRITON_PREIMPORTED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"


@contextlib.contextmanager
def _interpreter():
    if DEVICE != "cpu" or TRITON_PREIMPORTED:
        yield
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


with _interpreter():
    importlib.import_module("kvplug.kernels")       # the kernels are decorated here


@pytest.fixture(autouse=True)
def _triton_interpreter():
    with _interpreter():
        yield


@pytest.fixture
def device() -> str:
    return DEVICE


TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor,
                  dtype: torch.dtype = torch.float32, scale: float = 1.0) -> None:
    """``torch.testing.assert_close`` at per-dtype tolerances, reporting abs and rel error."""
    atol, rtol = TOL[dtype]
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    finite = torch.isfinite(e)
    assert torch.equal(finite, torch.isfinite(a)) and torch.equal(a[~finite], e[~finite]), \
        f"{name}: non-finite entries differ"
    diff = (a[finite] - e[finite]).abs()
    max_abs = diff.max().item() if diff.numel() else 0.0
    rel = (diff.norm() / e[finite].norm().clamp_min(1e-12)).item() if diff.numel() else 0.0
    torch.testing.assert_close(a[finite], e[finite], atol=atol * scale, rtol=rtol * scale,
                               msg=lambda m: f"{name}: max abs err {max_abs:.3g}, "
                                             f"rel (norm) err {rel:.3g}\n{m}")


@pytest.fixture
def assert_close():
    return _assert_close


def _paged_kv(seq_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int,
              dtype: torch.dtype, device: str, extra_blocks: int = 3, seed: int = 0):
    """A paged K/V cache holding random contiguous K/V, blocks randomly permuted.

    Returns ``(k_cache, v_cache, block_table, seq_lens, k, v)`` with ``k, v``
    the contiguous ``[B, max_len, H_kv, D]`` truth (zero past each length).
    Unused table slots point at random blocks, which must never be read.
    """
    g = torch.Generator().manual_seed(seed)
    B = len(seq_lens)
    max_blocks = max(-(-L // block_size) for L in seq_lens) + 1       # one spare column
    num_blocks = B * max_blocks + extra_blocks
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    table = torch.randperm(num_blocks, generator=g)[:B * max_blocks].view(B, max_blocks)
    max_len = max_blocks * block_size
    k = torch.zeros(B, max_len, num_kv_heads, head_dim)
    v = torch.zeros_like(k)
    for b, L in enumerate(seq_lens):
        t = torch.arange(L)
        k[b, :L] = k_cache[table[b, t // block_size], t % block_size]
        v[b, :L] = v_cache[table[b, t // block_size], t % block_size]
    to = dict(device=device)
    return (k_cache.to(dtype).to(**to), v_cache.to(dtype).to(**to),
            table.to(torch.int32).to(**to), torch.tensor(seq_lens, dtype=torch.int32, **to),
            k.to(dtype), v.to(dtype))


@pytest.fixture
def paged_kv():
    return _paged_kv
