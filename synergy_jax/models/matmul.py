"""Matmuls with gradients XLA:CPU runs fast: the dense layers' (`dense`, which `layers.Dense` calls),
attention's (`batch_matmul`), and the layer norms' parameter gradients (`scale_and_shift`) as matrix-vector
products.

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


def _column_sums(rows):
    """ones^T rows over a (tokens, features) array, in float32: a matrix-vector product. Autodiff's sum over the
    tokens runs on XLA:CPU as a windowed tree reduction, several times slower."""
    ones = jnp.ones((rows.shape[0],), rows.dtype)
    return jax.lax.dot_general(ones, rows, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------------------------- dense layers


def dense(x, kernel, bias=None, contracted: int = 1, precision=None):
    """x's trailing `contracted` axes against `kernel`'s leading ones, plus `bias` (shaped as the kernel's other
    axes; None for none): a dense layer. On CPU, the flattened form with the custom gradient of the module
    docstring, whose bias gradient is ones^T g, a matrix-vector product: autodiff's sum over the tokens runs on
    XLA:CPU as a windowed tree reduction, several times slower."""
    if traced_platform() != "cpu":
        dims = ((tuple(range(x.ndim - contracted, x.ndim)), tuple(range(contracted))), ((), ()))
        out = jax.lax.dot_general(x, kernel, dims, precision=precision)
        return out if bias is None else out + bias
    return _flat_dense(x, kernel, bias, contracted, precision)


def _flatten(x, kernel, contracted: int):
    inner = math.prod(kernel.shape[:contracted])
    return x.reshape(-1, inner), kernel.reshape(inner, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flat_dense(x, kernel, bias, contracted, precision):
    rows, w = _flatten(x, kernel, contracted)
    out = _product(rows, w, (1, 0), precision)
    if bias is not None:
        out = out + bias.reshape(1, -1)
    return out.reshape(x.shape[: x.ndim - contracted] + kernel.shape[contracted:])


def _flat_dense_forward(x, kernel, bias, contracted, precision):
    return _flat_dense(x, kernel, bias, contracted, precision), (x, kernel, bias)


def _flat_dense_backward(contracted, precision, residuals, grad):
    x, kernel, bias = residuals
    rows, w = _flatten(x, kernel, contracted)
    g = grad.reshape(rows.shape[0], w.shape[1])
    grad_x = _product(g, w, (1, 1), precision)
    grad_kernel = _contract_rows(rows, g, precision)
    grad_bias = None if bias is None else _column_sums(g).astype(bias.dtype).reshape(bias.shape)
    return grad_x.astype(x.dtype).reshape(x.shape), grad_kernel.astype(kernel.dtype).reshape(kernel.shape), grad_bias


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


def row_sums(x):
    """x summed over its last axis, keepdims: the softmax's denominators. On CPU a matrix-vector product x ones,
    with the broadcast as its gradient, instead of XLA:CPU's windowed tree reduction."""
    if traced_platform() != "cpu":
        return x.sum(axis=-1, keepdims=True)
    return _row_sums(x)


@jax.custom_vjp
def _row_sums(x):
    ones = jnp.ones((x.shape[-1],), x.dtype)
    return jax.lax.dot_general(x, ones, (((x.ndim - 1,), (0,)), ((), ())))[..., None]


def _row_sums_forward(x):
    return _row_sums(x), x.shape


def _row_sums_backward(shape, grad):
    return (jnp.broadcast_to(grad, shape),)


_row_sums.defvjp(_row_sums_forward, _row_sums_backward)


# ----------------------------------------------------------------------------------------------- layer norms


def scale_and_shift(x, scale, bias):
    """x * scale + bias, `scale` and `bias` shaped (x's last axis,): a layer norm's affine part. On CPU with a
    custom gradient whose parameter gradients are column sums over the tokens (`_column_sums`) of g x and g."""
    if traced_platform() != "cpu":
        return x * scale + bias
    return _scale_and_shift(x, scale, bias)


@jax.custom_vjp
def _scale_and_shift(x, scale, bias):
    return x * scale + bias


def _scale_and_shift_forward(x, scale, bias):
    return _scale_and_shift(x, scale, bias), (x, scale, bias)


def _scale_and_shift_backward(residuals, grad):
    x, scale, bias = residuals
    rows = grad.reshape(-1, grad.shape[-1])
    grad_scale = _column_sums(rows * x.reshape(rows.shape).astype(rows.dtype))
    return (grad * scale).astype(x.dtype), grad_scale.astype(scale.dtype), _column_sums(rows).astype(bias.dtype)


_scale_and_shift.defvjp(_scale_and_shift_forward, _scale_and_shift_backward)
