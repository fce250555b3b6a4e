"""How the fused chunked loss (network/loss.py) splits its rows: shared with the planner, which must not import
paddle."""
from __future__ import annotations

from collections.abc import Sequence

CHUNK_BYTES = 256 * 2**20  # fp32 logits of one chunk


def rows_per_chunk(hidden_shape: Sequence[int], weight_shape: Sequence[int], transpose_weight: bool) -> int:
    """Rows along N per chunk so that one chunk's fp32 logits [..., rows, V] are about CHUNK_BYTES. Give the
    shapes one process computes on (a distributed caller: the local shapes)."""
    vocab = weight_shape[0] if transpose_weight else weight_shape[-1]
    lead = 1
    for d in hidden_shape[:-2]:
        lead *= d
    return max(1, CHUNK_BYTES // (4 * vocab * lead))
