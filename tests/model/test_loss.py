"""The chunked cross-entropy (`lwm.model.loss`) against the full-logits reference: sums and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwm.model.loss import cross_entropy_sums



def reference_cross_entropy_sums(logits, targets, weights):
    """The plain full-logits reference: (B, T, V) logits, (B, T) targets and weights -> (weighted NLL sum,
    weighted correct count)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    correct = jnp.argmax(logits, axis=-1) == targets
    return jnp.sum(weights * nll), jnp.sum(weights * correct)


def _data(B=2, T=37, D=16, V=50, seed=0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((D, V)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    weights = jnp.asarray((rng.random((B, T)) > 0.3) * rng.random((B, T)) * 2, jnp.float32)
    return hidden, kernel, targets, weights


def _reference(hidden, kernel, targets, weights):
    with jax.default_matmul_precision("highest"):
        return reference_cross_entropy_sums(jnp.einsum("btd,dv->btv", hidden, kernel), targets, weights)


@pytest.mark.parametrize("chunk", [1, 8, 37, 64])  # 8 leaves a padded last chunk; 64 > T
def test_chunked_cross_entropy_matches_full_logits(chunk):
    hidden, kernel, targets, weights = _data()
    loss, correct = jax.jit(lambda h, k: cross_entropy_sums(h, k, targets, weights, chunk_size=chunk))(hidden, kernel)
    want_loss, want_correct = _reference(hidden, kernel, targets, weights)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    np.testing.assert_allclose(float(correct), float(want_correct), rtol=1e-6)

    grads = jax.jit(jax.grad(lambda h, k: cross_entropy_sums(h, k, targets, weights, chunk_size=chunk)[0],
                             argnums=(0, 1)))(hidden, kernel)
    want = jax.grad(lambda h, k: _reference(h, k, targets, weights)[0], argnums=(0, 1))(hidden, kernel)
    for got, ref in zip(grads, want):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-5)

    # Negative control: targets shifted by one position give a clearly different loss.
    shifted, _ = _reference(hidden, kernel, jnp.roll(targets, 1, axis=1), weights)
    assert abs(float(shifted) - float(loss)) > 1e-2 * abs(float(loss))


def test_accuracy_counts_weighted_argmax_hits():
    hidden, kernel, targets, weights = _data(seed=1)
    argmax = jnp.argmax(jnp.einsum("btd,dv->btv", hidden, kernel), axis=-1)
    targets = jnp.where(jnp.arange(targets.shape[1])[None] % 3 == 0, argmax, targets)  # every third a hit
    hit = np.asarray(argmax == targets)
    _, correct = cross_entropy_sums(hidden, kernel, targets, weights, chunk_size=8)
    assert 0 < hit.sum() < hit.size
    np.testing.assert_allclose(float(correct), float((np.asarray(weights) * hit).sum()), rtol=1e-6)
