"""The causal block rule (lwm/attention/causal_blocks.py) against brute-force enumeration.

For every (offsets, block size, number of blocks) in a grid, the mask k_pos <= q_pos is enumerated position
by position and each of the four answers is recomputed from it; the functions must agree everywhere,
for Python ints, int32 arrays and traced scalars. Off-by-one variants of each function must fail the same
enumeration (negative control), so the check cannot pass by accident.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwm.attention import causal_blocks as cb
from lwm.attention import ring

OFFSETS = np.arange(-13, 14, dtype=np.int32)  # relative offsets: negative, zero and positive
SIZES = (1, 2, 3, 4, 5, 8)
COUNTS = (1, 2, 3, 5)


def _blocks(offset: int, b: int, n: int):
    """(n, b) positions of n blocks of size b starting at `offset`."""
    return offset + np.arange(n * b).reshape(n, b)


def brute(kind: str, rel: int, b: int, n: int) -> int:
    """The answer of `kind` by enumeration; the single query/key sits at 0, the grid starts at `rel`."""
    if kind == "num_visible_k_blocks":  # q_last = 0, key grid at rel: count of leading blocks with a key <= 0
        vis = [(blk <= 0).any() for blk in _blocks(rel, b, n)]
        count = sum(vis)
        assert vis == [True] * count + [False] * (n - count)  # the visible blocks are leading ones
        return count
    if kind == "num_whole_k_blocks":  # q_first = 0: leading blocks with every key <= 0
        whole = [(blk <= 0).all() for blk in _blocks(rel, b, n)]
        count = sum(whole)
        assert whole == [True] * count + [False] * (n - count)
        return count
    if kind == "first_visible_q_block":  # k_first = 0, query grid at rel: first block with a query >= 0
        vis = [(blk >= 0).any() for blk in _blocks(rel, b, n)]
        return next((i for i, v in enumerate(vis) if v), n)
    if kind == "first_whole_q_block":  # k_last = 0: first block whose every query >= 0
        whole = [(blk >= 0).all() for blk in _blocks(rel, b, n)]
        return next((i for i, v in enumerate(whole) if v), n)
    raise ValueError(kind)


KINDS = ("num_visible_k_blocks", "num_whole_k_blocks", "first_visible_q_block", "first_whole_q_block")


def _grid_q_arg(kind):
    """num_*_k_blocks take (q_pos, k_offset, ...); first_*_q_block take (q_offset, k_pos, ...): reorder."""
    if kind.startswith("num_"):
        return lambda fn: (lambda pos, grid, b, n: fn(pos, grid, b, n))
    return lambda fn: (lambda pos, grid, b, n: fn(grid, pos, b, n))


def mismatches(kind: str, fn) -> list:
    """(rel, b, n, got, want) for every case where fn disagrees with the enumeration.

    The position of the single query/key is 0, 7 and -5 (global offsets shift both sides alike)."""
    wrap = _grid_q_arg(kind)(fn)
    bad = []
    for b, n in itertools.product(SIZES, COUNTS):
        want = np.array([brute(kind, int(r), b, n) for r in OFFSETS])
        for pos in (0, 7, -5):
            got = np.asarray(wrap(jnp.full(OFFSETS.shape, pos, jnp.int32), pos + OFFSETS, b, n))
            for r, g, w in zip(OFFSETS, got, want):
                if g != w:
                    bad.append((int(r), b, n, int(g), int(w)))
    return bad


@pytest.mark.parametrize("kind", KINDS)
def test_matches_enumeration(kind):
    assert mismatches(kind, getattr(cb, kind)) == []


# Off-by-one variants, one per function, each a plausible slip: must fail the same enumeration.
OFF_BY_ONE = {
    "num_visible_k_blocks": lambda q, k, b, n: jnp.clip((q - k) // b, 0, n),  # forgot the + 1
    "num_whole_k_blocks": lambda q, k, b, n: jnp.clip((q - k) // b, 0, n),  # forgot the + 1 (last key <= q)
    "first_visible_q_block": lambda q, k, b, n: jnp.clip(-((q - k) // b), 0, n),  # ceil for floor
    "first_whole_q_block": lambda q, k, b, n: jnp.clip((k - q) // b, 0, n),  # floor for ceil
}


@pytest.mark.parametrize("kind", KINDS)
def test_off_by_one_variant_fails(kind):
    assert mismatches(kind, OFF_BY_ONE[kind]), f"the enumeration check cannot tell {kind} from an off-by-one"


def test_python_ints_traced_scalars_and_not_causal():
    """Python ints, traced int32 scalars (the ring's offsets) give the same answers; causal=False opens all."""
    for kind in KINDS:
        fn = getattr(cb, kind)
        traced = jax.jit(fn, static_argnums=(2, 3))
        for a, c, b, n in [(11, 0, 4, 4), (8, 0, 4, 4), (0, 8, 4, 4), (0, 11, 4, 4), (-3, 9, 2, 3), (40, 1, 3, 5)]:
            assert int(fn(a, c, b, n)) == int(traced(jnp.int32(a), jnp.int32(c), b, n))
        full = 0 if kind.startswith("first_") else 5
        assert int(fn(-100, 100, 3, 5, causal=False)) == full


def test_docstring_example():
    assert int(cb.num_visible_k_blocks(11, 0, 4, 4)) == 3
    assert int(cb.num_whole_k_blocks(8, 0, 4, 4)) == 2
    assert int(cb.first_visible_q_block(0, 8, 4, 4)) == 2
    assert int(cb.first_whole_q_block(0, 11, 4, 4)) == 3


@pytest.mark.parametrize("stride", [1, 2, 3, 4])
def test_strided_runs_and_ring_pair(stride):
    """Between runs of one stride, key j may be seen by query i iff j + strided_key_offset <= i, and the
    ring's `_pair` skips exactly the run pairs with no allowed (query, key) pair."""
    for run_len in (1, 2, 4):
        geo = ring.Geometry(num_runs=1, stride=stride, run_len=run_len)
        cfg = ring.RingConfig(causal=True)
        i = np.arange(run_len)[:, None]
        j = np.arange(run_len)[None, :]
        for a, b in itertools.product(range(-9, 10), repeat=2):
            allowed = b + stride * j <= a + stride * i
            off = cb.strided_key_offset(a, b, stride)
            np.testing.assert_array_equal(allowed, j + off <= i)
            k_offset, masked = ring._pair(cfg, geo, jnp.int32(a), jnp.int32(b))
            assert int(k_offset) == off
            assert bool(masked) == (not allowed.any()), (a, b, stride, run_len)


def test_strided_off_by_one_fails():
    """Negative control: floor instead of ceil in the strided offset breaks the enumeration."""
    stride, run_len = 2, 3
    i, j = np.arange(run_len)[:, None], np.arange(run_len)[None, :]
    wrong = [(a, b) for a, b in itertools.product(range(-6, 7), repeat=2)
             if not np.array_equal(b + stride * j <= a + stride * i, j + (b - a) // stride <= i)]
    assert wrong
