"""compute_einsum: float32 equals einsum in value and gradient; bfloat16 multiplies bfloat16 operands and
sums in float32 in both passes, with the result in the asked dtype and gradients in each operand's dtype."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2l_jax.models.layers import compute_einsum

SPECS = {
    "...d,df->...f": ((2, 3, 5), (5, 4)),
    "bkgts,bksd->bkgtd": ((2, 3, 2, 4, 6), (2, 3, 6, 5)),
    "lcmrh,lmrhd->lcmrd": ((2, 3, 1, 2, 4), (2, 1, 2, 4, 5)),
}


def operands(spec):
    shape_x, shape_y = SPECS[spec]
    kx, ky, kc = jax.random.split(jax.random.key(0), 3)
    return jax.random.normal(kx, shape_x), jax.random.normal(ky, shape_y), kc


@pytest.mark.parametrize("spec", SPECS)
def test_float32_equals_einsum_in_value_and_gradient(spec):
    x, y, key = operands(spec)
    weights = jax.random.normal(key, jnp.einsum(spec, x, y).shape)
    loss = lambda f: lambda x, y: (f(x, y) * weights).sum()
    ours = jax.value_and_grad(loss(lambda x, y: compute_einsum(spec, x, y, jnp.float32)), argnums=(0, 1))(x, y)
    plain = jax.value_and_grad(loss(lambda x, y: jnp.einsum(spec, x, y)), argnums=(0, 1))(x, y)
    chex.assert_trees_all_close(ours, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS)
def test_bfloat16_rounds_operands_and_sums_in_float32(spec):
    x, y, key = operands(spec)
    cotangent = jax.random.normal(key, jnp.einsum(spec, x, y).shape).astype(jnp.bfloat16)
    out, vjp = jax.vjp(lambda x, y: compute_einsum(spec, x, y, jnp.bfloat16), x, y)
    dx, dy = vjp(cotangent)
    chex.assert_type([out, dx, dy], [jnp.bfloat16, jnp.float32, jnp.float32])
    rounded = lambda a: np.asarray(a.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    xr, yr, cr = rounded(x), rounded(y), rounded(cotangent)
    lhs, rhs_out = spec.replace("...", "YZ").split(",")  # numpy's einsum does not sum over an ellipsis
    rhs, out_spec = rhs_out.split("->")
    # Exact products of the rounded operands summed in float64; float32 sums differ by a few ulps only.
    np.testing.assert_allclose(out.astype(jnp.float32), rounded(np.einsum(f"{lhs},{rhs}->{out_spec}", xr, yr)), rtol=1e-2, atol=1e-2)
    wide = compute_einsum(spec, x, y, jnp.bfloat16, jnp.float32)
    chex.assert_type(wide, jnp.float32)
    np.testing.assert_allclose(wide, np.einsum(f"{lhs},{rhs}->{out_spec}", xr, yr), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, np.einsum(f"{out_spec},{rhs}->{lhs}", cr, yr), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dy, np.einsum(f"{lhs},{out_spec}->{rhs}", xr, cr), rtol=1e-5, atol=1e-5)


def test_an_index_of_one_operand_only_is_rejected():
    with pytest.raises(ValueError, match="index found nowhere else"):
        compute_einsum("ij,jk->k", jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.float32)
