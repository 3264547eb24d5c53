"""Blockwise (chunked) cross-entropy that never materialises the (B, T, V) logits.

The output projection and the softmax run over sequence chunks in a scan. The backward is fused into the
forward: since the loss is a weighted sum, d(loss)/d(logits) = w * (softmax - onehot) is known as soon as a
chunk's logits are, so each chunk also produces its d(hidden) and adds to d(kernel). The custom VJP then
only scales those by the incoming cotangent. Cost: the three matmuls of an ordinary forward+backward and
one exp pass; memory: one (B, C, V) chunk of logits plus d(hidden) (B, T, D) and d(kernel) (D, V).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _chunks(x, c):
    """(B, T, ...) -> (T // c, B, c, ...) taking every (T // c)-th token into one chunk. Strided chunks keep a
    sequence-sharded T evenly spread over the devices in every chunk (the loss is a sum: order is free)."""
    b, t = x.shape[:2]
    n = t // c
    return jnp.moveaxis(x.reshape(b, c, n, *x.shape[2:]), 2, 0)


def _unchunk(x):
    n, b, c = x.shape[:3]
    return jnp.moveaxis(x, 0, 2).reshape(b, c * n, *x.shape[3:])


def _chunk_stats(h, kernel, targets, weights):
    """h (B, C, D), kernel (D, V) -> logits (B, C, V) f32, log-sum-exp, weighted nll and correct sums."""
    logits = jnp.einsum("bcd,dv->bcv", h, kernel, preferred_element_type=jnp.float32)
    top = jnp.max(logits, axis=-1)
    lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    loss = jnp.sum(weights * (lse - target_logit))
    # The target is the argmax when its logit is the maximum (a tie counts as correct): this reuses the max
    # of the log-sum-exp instead of a separate argmax pass over the (B, C, V) logits.
    correct = jnp.sum(weights * (target_logit >= top))
    return logits, lse, loss, correct


def _pad_to_chunk(hidden, targets, weights, chunk_size):
    t = hidden.shape[1]
    c = min(chunk_size, t)
    pad = (-t) % c
    if pad:  # padded tokens carry zero weight
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    return hidden, targets, weights, c, t


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ce_sums(hidden, kernel, targets, weights, chunk_size):
    hidden, targets, weights, c, _ = _pad_to_chunk(hidden, targets, weights, chunk_size)

    def body(carry, xs):
        h, tg, w = xs
        _, _, loss, correct = _chunk_stats(h, kernel, tg, w)
        return (carry[0] + loss, carry[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    (loss, correct), _ = jax.lax.scan(body, (zero, zero),
                                      (_chunks(hidden, c), _chunks(targets, c), _chunks(weights, c)))
    return loss, correct


def _ce_fwd(hidden, kernel, targets, weights, chunk_size):
    t_orig = hidden.shape[1]
    hidden_p, targets_p, weights_p, c, _ = _pad_to_chunk(hidden, targets, weights, chunk_size)
    v = kernel.shape[1]

    def body(carry, xs):
        loss_acc, correct_acc, dkernel = carry
        h, tg, w = xs
        logits, lse, loss, correct = _chunk_stats(h, kernel, tg, w)
        dlogits = (jnp.exp(logits - lse[..., None]) - jax.nn.one_hot(tg, v, dtype=jnp.float32)) * w[..., None]
        dh = jnp.einsum("bcv,dv->bcd", dlogits.astype(kernel.dtype), kernel,
                        preferred_element_type=jnp.float32).astype(hidden.dtype)
        dkernel = dkernel + jnp.einsum("bcd,bcv->dv", h, dlogits.astype(h.dtype),
                                       preferred_element_type=jnp.float32)
        return (loss_acc + loss, correct_acc + correct, dkernel), dh

    zero = jnp.zeros((), jnp.float32)
    init = (zero, zero, jnp.zeros(kernel.shape, jnp.float32))
    (loss, correct, dkernel), dh = jax.lax.scan(
        body, init, (_chunks(hidden_p, c), _chunks(targets_p, c), _chunks(weights_p, c)))
    dhidden = _unchunk(dh)[:, :t_orig]
    return (loss, correct), (dhidden, dkernel.astype(kernel.dtype), targets, weights)


def _ce_bwd(chunk_size, res, cotangents):
    dhidden, dkernel, targets, weights = res
    g_loss = cotangents[0]  # the correct-count output is not differentiable
    return (dhidden * g_loss.astype(dhidden.dtype), dkernel * g_loss.astype(dkernel.dtype),
            None, jnp.zeros_like(weights))


_ce_sums.defvjp(_ce_fwd, _ce_bwd)


def cross_entropy_sums(hidden, kernel, targets, weights, *, chunk_size: int = 1024):
    """Weighted next-token cross-entropy without full logits.

    hidden: (B, T, D) final hidden states; kernel: (D, V) output projection; targets: (B, T) int;
    weights: (B, T) float (0 = no loss; per-example weights from the data pipeline).
    Returns (loss_sum, correct_sum) in float32: sum_t w_t * -log p(targets_t) and
    sum_t w_t * [target logit = max logit] (the argmax hit count; a tie counts as a hit).
    Differentiable in hidden and kernel (weights are treated as constants).
    """
    return _ce_sums(hidden, kernel, targets.astype(jnp.int32), weights.astype(jnp.float32), chunk_size)
