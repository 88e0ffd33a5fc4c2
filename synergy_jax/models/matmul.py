"""The dense layers' matmul (`dense_dot_general`, passed to flax's Dense / DenseGeneral), with a weight gradient
XLA:CPU runs fast.

Autodiff of `x @ W` over a (batch, length, in) activation gives XLA a three-dimensional contraction for the weight
gradient, which XLA:CPU lays out with a transposed copy of the output gradient and runs at 45-60 GFLOP/s. On CPU the
layers here compute with the activation flattened to (tokens, in) and a custom gradient: dx = g W^T, and dW as the
two-dimensional product in the orientation Eigen runs faster (its output's rows no more than its columns, transposed
back afterwards when W is taller than wide). The same products and sums; docs/performance.md has the timings.
Elsewhere (TPU, GPU) it is `jax.lax.dot_general`, whose layouts those compilers choose well.
"""

from __future__ import annotations

import functools
import math

import jax

from synergy_jax.models.attention import traced_platform


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


def _matmul(a, b, precision, preferred_element_type, contract=((1,), (0,))):
    return jax.lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                               preferred_element_type=preferred_element_type)  # fmt: skip


def _flatten(lhs, rhs, contracted: int):
    inner = math.prod(rhs.shape[:contracted])
    return lhs.reshape(-1, inner), rhs.reshape(inner, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _flat_dense(lhs, rhs, contracted, precision, preferred_element_type):
    x, w = _flatten(lhs, rhs, contracted)
    out = _matmul(x, w, precision, preferred_element_type)
    return out.reshape(lhs.shape[: lhs.ndim - contracted] + rhs.shape[contracted:])


def _flat_dense_forward(lhs, rhs, contracted, precision, preferred_element_type):
    return _flat_dense(lhs, rhs, contracted, precision, preferred_element_type), (lhs, rhs)


def _flat_dense_backward(contracted, precision, preferred_element_type, residuals, grad):
    lhs, rhs = residuals
    x, w = _flatten(lhs, rhs, contracted)
    g = grad.reshape(x.shape[0], w.shape[1])
    grad_lhs = _matmul(g, w, precision, None, contract=((1,), (1,))).astype(lhs.dtype)
    if w.shape[0] > w.shape[1]:  # a tall W: Eigen's faster orientation is g^T x, transposed back
        grad_rhs = jax.lax.optimization_barrier(_matmul(g, x, precision, None, contract=((0,), (0,)))).T
    else:
        grad_rhs = _matmul(x, g, precision, None, contract=((0,), (0,)))
    return grad_lhs.reshape(lhs.shape), grad_rhs.astype(rhs.dtype).reshape(rhs.shape)


_flat_dense.defvjp(_flat_dense_forward, _flat_dense_backward)
