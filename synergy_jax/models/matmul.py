"""Matmuls with gradients XLA:CPU runs fast: the dense layers' (`dense_dot_general`, passed to flax's Dense and
DenseGeneral) and attention's (`batch_matmul`).

A gradient of the form x^T y, contracting the rows (tokens) of x and y, is where autodiff's own formulation is slow
on XLA:CPU: for a (batch, length, in) activation XLA transposes the whole output gradient in memory first, and Eigen
runs a product whose output has more rows than columns at half the rate of the transposed one (45-60 against 80-95
GFLOP/s at the shapes of docs/performance.md). On CPU these matmuls flatten dense activations to (tokens, features)
and carry a custom gradient that computes every such product in the faster orientation (`_contract_rows`: the
shorter side as rows, transposed back afterwards). The same products and sums, so the same values up to float
rounding. Elsewhere (TPU, GPU) they are `jax.lax.dot_general`, whose layouts those compilers choose well.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from synergy_jax.models.platform import traced_platform


def _contract_rows(x, y, precision):
    """x^T y over axis -2 of both (leading axes are batch), in the orientation Eigen runs faster: its output's rows
    the shorter side. The barrier keeps XLA from folding the transpose back into the product."""
    rows = x.ndim - 2
    if x.shape[-1] <= y.shape[-1]:
        return _product(x, y, (rows, rows), precision)
    return jnp.swapaxes(jax.lax.optimization_barrier(_product(y, x, (rows, rows), precision)), -1, -2)


def _product(a, b, contract: tuple[int, int], precision, preferred_element_type=None):
    """a and b contracted on axes contract[0] / contract[1], leading axes batch (as many as a has beyond two)."""
    batch = tuple(range(a.ndim - 2))
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), (batch, batch)), precision=precision,
                               preferred_element_type=preferred_element_type)  # fmt: skip


# ----------------------------------------------------------------------------------------------- dense layers


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """`jax.lax.dot_general` as flax's dense layers call it; on CPU, the flattened form with a custom gradient
    (module docstring) when the contraction is a dense layer's: the trailing dims of `lhs` against the leading
    dims of `rhs`, in order, with no batch dims."""
    (lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch) = dimension_numbers
    contracted = len(lhs_contracting)
    dense_layout = (
        not lhs_batch
        and not rhs_batch
        and tuple(lhs_contracting) == tuple(range(lhs.ndim - contracted, lhs.ndim))
        and tuple(rhs_contracting) == tuple(range(contracted))
    )
    if kwargs or not dense_layout or traced_platform() != "cpu":
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type, **kwargs)  # fmt: skip
    return _flat_dense(lhs, rhs, contracted, precision, preferred_element_type)


def _flatten(lhs, rhs, contracted: int):
    inner = math.prod(rhs.shape[:contracted])
    return lhs.reshape(-1, inner), rhs.reshape(inner, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _flat_dense(lhs, rhs, contracted, precision, preferred_element_type):
    x, w = _flatten(lhs, rhs, contracted)
    out = _product(x, w, (1, 0), precision, preferred_element_type)
    return out.reshape(lhs.shape[: lhs.ndim - contracted] + rhs.shape[contracted:])


def _flat_dense_forward(lhs, rhs, contracted, precision, preferred_element_type):
    return _flat_dense(lhs, rhs, contracted, precision, preferred_element_type), (lhs, rhs)


def _flat_dense_backward(contracted, precision, preferred_element_type, residuals, grad):
    lhs, rhs = residuals
    x, w = _flatten(lhs, rhs, contracted)
    g = grad.reshape(x.shape[0], w.shape[1])
    grad_lhs = _product(g, w, (1, 1), precision)
    grad_rhs = _contract_rows(x, g, precision)
    return grad_lhs.astype(lhs.dtype).reshape(lhs.shape), grad_rhs.astype(rhs.dtype).reshape(rhs.shape)


_flat_dense.defvjp(_flat_dense_forward, _flat_dense_backward)


# ----------------------------------------------------------------------------------------------- attention


def batch_matmul(a, b, transpose_b: bool = False, preferred_element_type=None):
    """a @ b, or a @ b^T with `transpose_b`, over (..., rows, columns) operands with the same leading batch axes:
    attention's q k^T and p v. On CPU with the custom gradient of the module docstring."""
    if traced_platform() != "cpu":
        return _plain_batch_matmul(a, b, transpose_b, preferred_element_type)
    return _batch_matmul(a, b, transpose_b, preferred_element_type)


def _plain_batch_matmul(a, b, transpose_b, preferred_element_type):
    return _product(a, b, (a.ndim - 1, b.ndim - (1 if transpose_b else 2)), None, preferred_element_type)


_batch_matmul = jax.custom_vjp(_plain_batch_matmul, nondiff_argnums=(2, 3))


def _batch_matmul_forward(a, b, transpose_b, preferred_element_type):
    return _batch_matmul(a, b, transpose_b, preferred_element_type), (a, b)


def _batch_matmul_backward(transpose_b, preferred_element_type, residuals, grad):
    a, b = residuals
    last = a.ndim - 1
    if transpose_b:  # out = a b^T: da = g b, db = g^T a
        grad_a = _product(grad, b.astype(grad.dtype), (last, last - 1), None)
        grad_b = _contract_rows(grad, a.astype(grad.dtype), None)
    else:  # out = a b: da = g b^T, db = a^T g
        grad_a = _product(grad, b.astype(grad.dtype), (last, last), None)
        grad_b = _contract_rows(a.astype(grad.dtype), grad, None)
    return grad_a.astype(a.dtype), grad_b.astype(b.dtype)


_batch_matmul.defvjp(_batch_matmul_forward, _batch_matmul_backward)
