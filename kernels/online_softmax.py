"""The online-softmax update the decode kernels share (base 2, scores pre-scaled by
log2(e)), as a Triton function they inline."""

import triton
import triton.language as tl


@triton.jit
def online_softmax_step(m_i, l_i, qk):
    """Fold a tile of scores ``qk`` ``[rows, tokens]`` (``-inf`` where masked) into the
    running row maxima ``m_i`` and sums ``l_i``: returns the new maxima, the factor
    ``alpha`` that rescales what was accumulated, the tile's weights ``p`` and the new
    sums.  A row with no valid score yet stays at ``-inf`` without a ``-inf - -inf``."""
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, axis=1)
