"""Load-balanced sequence layouts for context parallelism over `sp` (zigzag, striped).

Under a causal mask a plain contiguous split is unbalanced: device d of sp holds positions
[d * T/sp, (d+1) * T/sp) and has d + 1 of the sp key blocks to attend to. A layout reorders the tokens of
every row once, where a batch enters the model (`to_layout`), so that each device's contiguous shard holds
early and late positions alike; `from_layout` undoes it where per-token results leave. Inside, attention
never reads an array index as a position: every shard is described by its *runs* (below), computed from
the layout and carried with the key/value blocks (`lwm.attention.context_parallel`).

  none     device d holds tokens [d*c, (d+1)*c),            c = T / sp
  zigzag   the row is cut into 2*sp chunks of c = T/(2 sp); device d holds chunks d and 2*sp-1-d
           (Megatron / ring-flash-attention's zigzag). T=8, sp=2: [0 1 | 6 7 | 2 3 | 4 5]
  striped  token t goes to device t mod sp (Striped Attention, Brandon et al. 2023).
           T=8, sp=2: [0 2 4 6 | 1 3 5 7]

Runs: each device's shard is R runs of equal length n, run r holding positions start_r + stride * j for
j in [0, n). none: R=1, stride 1; zigzag: R=2, stride 1; striped: R=1, stride sp. Between a query run
(start a) and a key run (start b) of the same stride s the causal rule key_pos <= query_pos reads
j <= i + floor((a - b) / s): a causal mask between local indices with the key shifted by
ceil((b - a) / s), which is what every block kernel takes (`q_offset=0, k_offset=ceil((b-a)/s)`).
"""
from __future__ import annotations

import numpy as np
import jax.numpy as jnp

LOAD_BALANCES = ("none", "zigzag", "striped")


def check(balance: str, length: int, sp: int, what: str = "context parallelism") -> None:
    """Raises ValueError naming the numbers when `length` tokens cannot be laid out over sp devices."""
    if balance not in LOAD_BALANCES:
        raise ValueError(f"context_parallel_load_balance={balance!r}; choose one of {LOAD_BALANCES}")
    parts = 2 * sp if balance == "zigzag" else sp
    if length % parts:
        raise ValueError(f"{what}: sequence length {length} is not divisible by {parts} "
                         f"(load balance {balance!r} over sp={sp} needs {parts} equal parts)")


def permutation(length: int, sp: int, balance: str) -> np.ndarray:
    """(T,) int32: slot i of the layout holds original token perm[i]. `positions` of the layout.

    Example: permutation(8, 2, 'zigzag') -> [0 1 6 7 2 3 4 5]; permutation(8, 2, 'striped') -> [0 2 4 6 1 3 5 7].
    """
    check(balance, length, sp)
    t = np.arange(length, dtype=np.int32)
    if balance == "none" or sp == 1:
        return t
    if balance == "striped":
        return t.reshape(length // sp, sp).T.reshape(-1)
    chunks = t.reshape(2 * sp, length // (2 * sp))
    return np.concatenate([np.concatenate([chunks[d], chunks[2 * sp - 1 - d]]) for d in range(sp)])


def runs(balance: str, sp: int, local_len: int, group: int = 1):
    """(num_runs, stride, run_len, starts_of(d)): the run description of device d's shard.

    starts_of(d) works on Python ints and on traced int32 scalars (lax.axis_index) alike and returns a list
    of num_runs start positions.

    group > 1 (the two-level 'ulysses_ring' strategy): describes instead the union of the shards of the
    `group` consecutive devices g*group .. g*group+group-1 (inner group g of sp/group), as the inner
    all-to-all concatenates them (member by member) and `to_group_order` then reorders them; local_len is
    that union's length (group * T/sp) and starts_of takes the group index g. The layout stays the one of
    sp devices; seen by groups it is:
      none     the group holds [g*L, (g+1)*L), L = local_len: one run, as 'none' over sp/group
      zigzag   chunks g*group .. g*group+group-1 and their mirrors: after `to_group_order`, two runs of
               group*c tokens at g*group*c and (2*sp/group-1-g)*group*c, i.e. exactly 'zigzag' over
               sp/group devices with chunks group times longer (as balanced as zigzag over sp/group)
      striped  residues g*group + u (mod sp), u < group: `group` runs of stride sp, one per member (not
               'striped' over sp/group, whose residues mod sp/group would differ); per query the causal
               work differs between groups by at most one stripe
    Example: T=16, sp=4, group=2, zigzag: devices hold [0 1|14 15], [2 3|12 13], [4 5|10 11], [6 7|8 9];
    group 0 gathers [0 1 14 15 2 3 12 13], reordered to [0 1 2 3 | 12 13 14 15]: runs at 0 and 12, length 4.
    """
    if group > 1:
        if balance == "striped":
            n = local_len // group
            return group, sp, n, lambda g: [g * group + u for u in range(group)]
        return runs(balance, sp // group, local_len)
    if balance == "none" or sp == 1:
        return 1, 1, local_len, lambda d: [d * local_len]
    if balance == "striped":
        return 1, sp, local_len, lambda d: [d]
    if balance == "zigzag":
        c = local_len // 2
        return 2, 1, c, lambda d: [d * c, (2 * sp - 1 - d) * c]
    raise ValueError(f"context_parallel_load_balance={balance!r}; choose one of {LOAD_BALANCES}")


def to_group_order(x, group: int, balance: str, axis: int = 1):
    """The union of a group's shards (member-major, as the inner all-to-all concatenates them) -> the run
    order of `runs(..., group=group)`. Only zigzag moves anything: (group, 2, c) -> (2, group, c) with the
    second half's members reversed, so each half is one ascending run. Local (no communication);
    differentiable, inverse `from_group_order`. Example: group 0 of T=16, sp=4, group=2:
    [0 1 14 15 2 3 12 13] -> [0 1 2 3 12 13 14 15]."""
    if balance != "zigzag" or group == 1:
        return x
    axis = axis % x.ndim
    pre, post, L = x.shape[:axis], x.shape[axis + 1:], x.shape[axis]
    y = jnp.swapaxes(x.reshape(*pre, group, 2, L // (2 * group), *post), axis, axis + 1)  # (.., 2, group, c, ..)
    first, second = y[(slice(None),) * axis + (0,)], y[(slice(None),) * axis + (1,)]
    return jnp.stack([first, jnp.flip(second, axis)], axis).reshape(x.shape)


def from_group_order(x, group: int, balance: str, axis: int = 1):
    """The inverse of `to_group_order`: run order -> member-major."""
    if balance != "zigzag" or group == 1:
        return x
    axis = axis % x.ndim
    pre, post, L = x.shape[:axis], x.shape[axis + 1:], x.shape[axis]
    y = x.reshape(*pre, 2, group, L // (2 * group), *post)
    first, second = y[(slice(None),) * axis + (0,)], y[(slice(None),) * axis + (1,)]
    y = jnp.stack([first, jnp.flip(second, axis)], axis)  # (.., 2, group, c, ..)
    return jnp.swapaxes(y, axis, axis + 1).reshape(x.shape)


def to_layout(x, sp: int, balance: str, axis: int = 1):
    """Natural order -> layout order along `axis` (a reshape/transpose, so an all-to-all when sharded).

    x: (..., T, ...) with T on `axis`. Identity for 'none' or sp == 1. Differentiable (its transpose is
    `from_layout`)."""
    if balance == "none" or sp == 1:
        return x
    axis = axis % x.ndim
    T = x.shape[axis]
    check(balance, T, sp)
    pre, post = x.shape[:axis], x.shape[axis + 1:]
    if balance == "striped":  # (.., T/sp, sp, ..) -> (.., sp, T/sp, ..)
        y = x.reshape(*pre, T // sp, sp, *post)
        return jnp.swapaxes(y, axis, axis + 1).reshape(x.shape)
    c = T // (2 * sp)  # zigzag: chunks (2, sp, c); second half reversed; device d takes (0, d), (1, d)
    y = x.reshape(*pre, 2, sp, c, *post)
    y = jnp.concatenate([y[(slice(None),) * axis + (slice(0, 1),)],
                         jnp.flip(y[(slice(None),) * axis + (slice(1, 2),)], axis + 1)], axis)
    return jnp.swapaxes(y, axis, axis + 1).reshape(x.shape)


def from_layout(x, sp: int, balance: str, axis: int = 1):
    """Layout order -> natural order along `axis`; the inverse of `to_layout`."""
    if balance == "none" or sp == 1:
        return x
    axis = axis % x.ndim
    T = x.shape[axis]
    check(balance, T, sp)
    pre, post = x.shape[:axis], x.shape[axis + 1:]
    if balance == "striped":
        y = x.reshape(*pre, sp, T // sp, *post)
        return jnp.swapaxes(y, axis, axis + 1).reshape(x.shape)
    c = T // (2 * sp)
    y = jnp.swapaxes(x.reshape(*pre, sp, 2, c, *post), axis, axis + 1)  # (.., 2, sp, c, ..)
    y = jnp.concatenate([y[(slice(None),) * axis + (slice(0, 1),)],
                         jnp.flip(y[(slice(None),) * axis + (slice(1, 2),)], axis + 1)], axis)
    return y.reshape(x.shape)
