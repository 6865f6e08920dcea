"""ops.dropout: 16-bit keep masks, the quantised rate, the unbiased scale, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import ops


def test_mask_is_the_uint16_threshold_of_the_keys_bits():
    key, rate, shape = jax.random.key(3), 0.1, (4, 5, 6)
    bits = np.asarray(jax.random.bits(key, shape, jnp.uint16)).astype(np.int64)
    expected = bits >= int(round(0.1 * 65536))  # 6554
    np.testing.assert_array_equal(np.asarray(ops.keep_mask(key, rate, shape)), expected)


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5])
def test_keep_rate_and_unbiased_scale(rate):
    x = jnp.ones((200_000,), jnp.float32)
    y = np.asarray(jax.jit(lambda k: ops.dropout(x, rate, k))(jax.random.key(0)))
    dropped = (y == 0).mean()
    # 4.5 standard deviations of a binomial proportion over 200k draws.
    assert abs(dropped - rate) < 4.5 * np.sqrt(rate * (1 - rate) / y.size)
    np.testing.assert_allclose(np.unique(y), [0.0, ops.keep_scale(rate)], rtol=1e-6)
    assert ops.keep_scale(rate) == pytest.approx(1 / (1 - rate), rel=1e-4)
    assert abs(y.mean() - 1.0) < 0.01  # E[mask * scale] = 1


def test_deterministic_per_key_and_identity_cases():
    x = jnp.arange(1.0, 65.0)
    a, b = ops.dropout(x, 0.5, jax.random.key(1)), ops.dropout(x, 0.5, jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, ops.dropout(x, 0.5, jax.random.key(2)))
    assert ops.dropout(x, 0.5, None) is x and ops.dropout(x, 0.0, jax.random.key(0)) is x
    with pytest.raises(ValueError, match="dropout rate must be in"):
        ops.keep_mask(jax.random.key(0), 1.0, (3,))


def test_bf16_inputs_keep_their_dtype():
    x = jnp.ones((64,), jnp.bfloat16)
    y = ops.dropout(x, 0.25, jax.random.key(0))
    assert y.dtype == jnp.bfloat16
    assert set(np.unique(np.asarray(y, np.float32))) <= {0.0, np.float32(jnp.bfloat16(4 / 3))}
