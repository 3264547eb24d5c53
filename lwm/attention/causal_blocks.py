"""The one causal block rule: which key blocks a causal query block can see, and which it sees whole.

Every kernel that skips work under a causal mask asks the same four questions about a grid of blocks:
the blockwise kernel (`blockwise.py`, chunks of a block), both Pallas kernels (`pallas_gpu.py`,
`pallas_tpu.py`, their grid blocks) and the ring (`ring.py`, whole run pairs). They all answer them here,
in one convention, kept so by `tests/attention/test_causal_blocks.py` (brute-force enumeration over
offsets, block sizes and lengths, with an off-by-one variant that must fail) and
`tests/test_one_home.py::test_kernels_use_the_one_causal_block_rule` (all four import this module).

The convention:
  * Positions are *global* integers; a query at position p may see a key at position s iff s <= p.
  * A grid of n blocks of size b starting at `offset` holds positions offset + j*b + [0, b) in block j.
  * Every answer is a block index or a block count clipped to [0, n], so it can be a loop bound
    (`range(0, count)`, `range(first, n)`) with no further care; nothing is ever negative.
  * Integer division is only ever done on non-negative numbers (`lax.div`, truncation = floor there),
    after a `where` on the sign: Triton lowers it directly, and Python ints and traced int32 scalars
    (the ring's offsets) work alike. Results are int32 arrays.
  * `causal=False` answers "everything is visible and whole" (count n, first index 0).

Worked example: queries at positions 8..11 (one block, q_offset=8, bq=4) against keys at 0..15 in four
blocks of 4 (k_offset=0, bk=4, nk=4):
  num_visible_k_blocks(q_last=11, k_offset=0, bk=4, nk=4) = 3   key blocks 0, 1, 2 hold a key <= 11
  num_whole_k_blocks(q_first=8, k_offset=0, bk=4, nk=4)   = 2   blocks 0, 1 (keys 0..7) are all <= 8,
                                                                 so they need no mask; block 2 (8..11)
                                                                 straddles the diagonal and is masked
And the transposed view, key block 8..11 (k_offset + j*bk = 8) against four query blocks of 4 at 0..15:
  first_visible_q_block(q_offset=0, k_first=8, bq=4, nq=4) = 2   query blocks 2, 3 have a query >= 8
  first_whole_q_block(q_offset=0, k_last=11, bq=4, nq=4)   = 3   block 3 (12..15) sees all of 8..11;
                                                                 block 2 is masked
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def _nonneg_div(d, b: int):
    """floor(d / b) for d >= 0 (0 where d < 0): int32."""
    d = jnp.asarray(d, jnp.int32)
    return lax.div(jnp.maximum(d, 0), jnp.int32(b))


def num_visible_k_blocks(q_last, k_offset, bk: int, nk: int, causal: bool = True):
    """Number of leading key blocks holding at least one key a query at `q_last` may see.

    Key block j holds positions k_offset + j*bk + [0, bk); it is visible iff its first key
    k_offset + j*bk <= q_last. So the count is floor((q_last - k_offset) / bk) + 1, clipped to [0, nk].
    Pass the *last* query of a query block to get the key blocks the block must visit (those past the
    count are wholly in the future). Example: q_last=11, k_offset=0, bk=4, nk=4 -> 3.
    """
    if not causal:
        return jnp.int32(nk)
    d = jnp.asarray(q_last, jnp.int32) - k_offset
    return jnp.where(d < 0, 0, jnp.minimum(_nonneg_div(d, bk) + 1, nk)).astype(jnp.int32)


def num_whole_k_blocks(q_first, k_offset, bk: int, nk: int, causal: bool = True):
    """Number of leading key blocks wholly visible to a query at `q_first` (and so to every later query).

    Key block j is whole iff its last key k_offset + j*bk + bk - 1 <= q_first: the count is
    floor((q_first - k_offset + 1) / bk), clipped to [0, nk]. Pass the *first* query of a query block:
    those key blocks need no causal mask. Example: q_first=8, k_offset=0, bk=4, nk=4 -> 2.
    """
    if not causal:
        return jnp.int32(nk)
    d = jnp.asarray(q_first, jnp.int32) - k_offset + 1
    return jnp.minimum(_nonneg_div(d, bk), nk).astype(jnp.int32)


def first_visible_q_block(q_offset, k_first, bq: int, nq: int, causal: bool = True):
    """Index of the first query block with a query that may see the key at `k_first` (nq if none).

    Query block i holds positions q_offset + i*bq + [0, bq); it sees k_first iff its last query
    q_offset + i*bq + bq - 1 >= k_first, i.e. i >= floor((k_first - q_offset) / bq), clipped to [0, nq].
    Pass the *first* key of a key block: earlier query blocks are wholly before it.
    Example: q_offset=0, k_first=8, bq=4, nq=4 -> 2.
    """
    if not causal:
        return jnp.int32(0)
    d = jnp.asarray(k_first, jnp.int32) - q_offset
    return jnp.minimum(_nonneg_div(d, bq), nq).astype(jnp.int32)


def first_whole_q_block(q_offset, k_last, bq: int, nq: int, causal: bool = True):
    """Index of the first query block whose every query sees the key at `k_last` (nq if none).

    Query block i sees k_last with all its queries iff its first query q_offset + i*bq >= k_last, i.e.
    i >= ceil((k_last - q_offset) / bq), clipped to [0, nq]. Pass the *last* key of a key block: from
    this query block on, the key block needs no causal mask. Example: q_offset=0, k_last=11, bq=4,
    nq=4 -> 3.
    """
    if not causal:
        return jnp.int32(0)
    d = jnp.asarray(k_last, jnp.int32) - q_offset
    return jnp.minimum(_nonneg_div(d + bq - 1, bq), nq).astype(jnp.int32)


def strided_key_offset(q_start, k_start, stride: int):
    """Local key offset ceil((k_start - q_start) / stride) between two runs of the same stride.

    Query i of a run at q_start + stride*i may see key j of a run at k_start + stride*j iff
    j + ceil((k_start - q_start) / stride) <= i: a plain causal mask between local indices with the keys
    shifted by this offset (derivation in `layout.py`). The ring passes it as `k_offset` (q_offset=0) to
    the block kernels and to `num_visible_k_blocks`. Any sign; int or int32 array.
    Example: striped, stride 2: q_start=1, k_start=0 -> 0 (key j at 2j <= query i at 2i+1 iff j <= i);
    q_start=0, k_start=1 -> 1 (key j at 2j+1 <= 2i iff j + 1 <= i).
    """
    return -((q_start - k_start) // stride)
