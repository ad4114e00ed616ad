"""Triton kernels for LayerNorm, RMSNorm and DyT over the last dim: jit code only.

Launch logic and the torch custom ops live in `triton_ops.py`, the modules in
`triton_norm.py`. One set of kernels serves both norms (`IS_RMS`), every input
dtype (statistics in `ACC`: fp32, or fp64 for fp64 inputs) and the optional
weight / bias (`HAS_WEIGHT`, `HAS_BIAS`).

Row statistics. Each row is described by three numbers, saved for backward:

    scale  a power of two: 1 for ordinary rows, else about max|x| of the row
    mean   mean of (x - x[0]) / scale               (LayerNorm; 0 for RMSNorm)
    rstd   1 / sqrt(var((x - x[0]) / scale) + eps / scale^2)
                                                    (RMSNorm: mean square, no pivot)
    x_hat  = ((x - x[0]) / scale - mean) * rstd

* The pivot x[0] makes a large common offset cancel exactly before any sum
  (1e8 + multiples of 8 in fp32: the mean itself is not representable, but
  x - x[0] is exact), and it costs nothing in accuracy otherwise:
  |x[0] - mean| <= sqrt(N) * std, so centring loses at most ~sqrt(N) ulps of std.
* Variance is always the mean of squared deviations from the mean (two passes
  over registers), never E[x^2] - E[x]^2.
* The plain statistics (scale = 1) are kept when var + eps lies in
  [2^-96, 2^96]: no square overflowed or lost precision to underflow. Other rows
  (|x| ~ 1e30 in bf16, inf/NaN, tiny rows with eps = 0) are recomputed divided by
  a power of two near max|x| - exact, so nothing is rounded - which only
  costs time on such rows.
* Padding lanes are zeroed before every reduction.

DyT (gamma * tanh(alpha * x) + beta) keeps no statistics; its kernels are at the end.
"""

import triton
import triton.language as tl

_PLAIN_RANGE = tl.constexpr(2.0**96)  # var + eps in [1/_PLAIN_RANGE, _PLAIN_RANGE]: plain statistics suffice


@triton.jit
def _pow2_scale(amax):
    """2^floor(log2(amax)) read off the exponent bits, clamped so that it and its inverse are normal."""
    if amax.dtype == tl.float64:
        bits = amax.to(tl.int64, bitcast=True) & 0x7FF0000000000000
        bits = tl.minimum(tl.maximum(bits, 23 << 52), 2023 << 52)  # 2^-1000 .. 2^1000
        return bits.to(tl.float64, bitcast=True)
    else:
        bits = amax.to(tl.int32, bitcast=True) & 0x7F800000
        bits = tl.minimum(tl.maximum(bits, 1 << 23), 253 << 23)  # 2^-126 .. 2^126
        return bits.to(tl.float32, bitcast=True)


@triton.jit
def _plain(var, eps):
    """Rows whose unscaled statistics can be kept (see the module docstring); NaN is not plain."""
    return (var + eps >= 1.0 / _PLAIN_RANGE) & (var <= _PLAIN_RANGE)


@triton.jit
def _any(flags):
    return tl.max(flags.to(tl.int32), axis=0) == 1


@triton.jit
def _rstd(var, scale, eps):
    """1/sqrt(var + eps/scale^2) for a row divided by `scale`, without forming scale^2."""
    inv_scale = 1.0 / scale
    eps_scaled = eps * inv_scale * inv_scale  # overflows only when eps dwarfs the row's variance
    return tl.where(
        eps_scaled < 2.0**100,
        tl.rsqrt(var + eps_scaled),
        scale * tl.rsqrt(eps + var * scale * scale),
    )


@triton.jit
def _centered(x, pivot, mean, scale, mask):
    """(x - pivot)/scale - mean on a [rows, cols] tile, 0 in padding lanes.

    x/scale and pivot/scale are exact (power-of-two scale); subtracting the scaled
    values cannot overflow even for |x| near the dtype's maximum.
    """
    inv_scale = 1.0 / scale
    d = x * inv_scale[:, None] - (pivot * inv_scale)[:, None]
    return tl.where(mask, d - mean[:, None], 0.0)


@triton.jit
def _load_rows(ptr, rows, stride, cols, mask, ACC: tl.constexpr):
    """A [rows, cols] tile of a row-major matrix with unit column stride, in ACC."""
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(ACC)


@triton.jit
def _store_rows(ptr, rows, stride, cols, value, mask):
    tl.store(ptr + rows[:, None] * stride + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_pivot(X, rows, stride_x, row_mask, IS_RMS: tl.constexpr, ACC: tl.constexpr):
    """Each row's first element (LayerNorm); 0 for RMSNorm, which is not shift-invariant."""
    if IS_RMS:
        return tl.zeros(rows.shape, ACC)
    else:
        return tl.load(X + rows * stride_x, mask=row_mask, other=0.0).to(ACC)


@triton.jit
def _load_stats(Mean, Rstd, Scale, rows, row_mask, IS_RMS: tl.constexpr):
    """Saved (mean, rstd, scale); padding rows get finite values so they never make NaNs."""
    rstd = tl.load(Rstd + rows, mask=row_mask, other=1.0)
    scale = tl.load(Scale + rows, mask=row_mask, other=1.0)
    if IS_RMS:
        mean = tl.zeros(rows.shape, rstd.dtype)
    else:
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
    return mean, rstd, scale


@triton.jit
def _store_stats(Mean, Rstd, Scale, rows, row_mask, mean, rstd, scale, IS_RMS: tl.constexpr):
    tl.store(Rstd + rows, rstd, mask=row_mask)
    tl.store(Scale + rows, scale, mask=row_mask)
    if not IS_RMS:
        tl.store(Mean + rows, mean, mask=row_mask)


@triton.jit
def _load_vector(ptr, cols, col_mask, ACC: tl.constexpr):
    return tl.load(ptr + cols, mask=col_mask, other=0.0).to(ACC)


@triton.jit
def _weight_or_ones(W, cols, col_mask, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    if HAS_WEIGHT:
        return _load_vector(W, cols, col_mask, ACC)
    else:
        return tl.full(cols.shape, 1.0, ACC)


@triton.jit
def _affine(x_hat, W, B, cols, col_mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    y = x_hat
    if HAS_WEIGHT:
        y = y * _load_vector(W, cols, col_mask, ACC)[None, :]
    if HAS_BIAS:
        y = y + _load_vector(B, cols, col_mask, ACC)[None, :]
    return y


@triton.jit
def _store_partials(DW_PARTIAL, DB_PARTIAL, pid, N, cols, col_mask, dw, db,
                    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Row `pid` of the [programs, N] partial dweight / dbias: this program's accumulators summed over rows."""
    offset = tl.cast(pid, tl.int64) * N
    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + offset + cols, tl.sum(dw, axis=0), mask=col_mask)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + offset + cols, tl.sum(db, axis=0), mask=col_mask)


@triton.jit
def _input_grad(g, x_hat, mean_g, mean_gx, rstd, scale, IS_RMS: tl.constexpr):
    """dx from g = dy * weight and the row means of g and g * x_hat."""
    t = g - x_hat * mean_gx[:, None]
    if not IS_RMS:
        t = t - mean_g[:, None]
    return t * (rstd / scale)[:, None]


# ---------------------------------------------------------------------------------------------
# Fused path: whole rows (N <= BLOCK_N) held in registers, BLOCK_M rows per program.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tile_moments(x, pivot, scale, mask, n, IS_RMS: tl.constexpr):
    """Per-row (mean, variance) of a [rows, cols] tile divided by `scale`, two-pass."""
    zero = tl.zeros(pivot.shape, pivot.dtype)
    if IS_RMS:
        mean = zero
    else:
        mean = tl.sum(_centered(x, pivot, zero, scale, mask), axis=1) / n
    c = _centered(x, pivot, mean, scale, mask)
    return mean, tl.sum(c * c, axis=1) / n


@triton.jit
def norm_fwd_fused_kernel(
    X, Y, W, B, Mean, Rstd, Scale,
    stride_x, stride_y, M, N, eps,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # 64-bit offsets
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    eps = tl.cast(eps, ACC)
    n = tl.cast(N, ACC)

    x = _load_rows(X, rows, stride_x, cols, mask, ACC)
    pivot = _load_pivot(X, rows, stride_x, row_mask, IS_RMS, ACC)
    scale = tl.full([BLOCK_M], 1.0, ACC)
    mean, var = _tile_moments(x, pivot, scale, mask, n, IS_RMS)
    plain = _plain(var, eps)
    if _any(plain == 0):
        amax = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=1)
        scale = tl.where(plain, scale, _pow2_scale(amax))
        mean, var = _tile_moments(x, pivot, scale, mask, n, IS_RMS)
    rstd = _rstd(var, scale, eps)

    y = _affine(_centered(x, pivot, mean, scale, mask) * rstd[:, None], W, B, cols, col_mask, HAS_WEIGHT, HAS_BIAS, ACC)
    _store_rows(Y, rows, stride_y, cols, y, mask)
    _store_stats(Mean, Rstd, Scale, rows, row_mask, mean, rstd, scale, IS_RMS)


@triton.jit
def norm_bwd_fused_kernel(
    X, DY, DX, W, Mean, Rstd, Scale, DW_PARTIAL, DB_PARTIAL,
    stride_x, stride_dy, stride_dx, M, N,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    """Persistent: program p takes tiles p, p + P, ... and writes row p of the [P, N]
    fp32 partial dweight / dbias, which the host reduces in a fixed order (no atomics)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    n = tl.cast(N, ACC)
    w = _weight_or_ones(W, cols, col_mask, HAS_WEIGHT, ACC)
    dw = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    db = tl.zeros([BLOCK_M, BLOCK_N], ACC)

    for tile in range(pid, tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        rows = tl.cast(tile, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        x = _load_rows(X, rows, stride_x, cols, mask, ACC)
        dy = _load_rows(DY, rows, stride_dy, cols, mask, ACC)
        mean, rstd, scale = _load_stats(Mean, Rstd, Scale, rows, row_mask, IS_RMS)
        pivot = _load_pivot(X, rows, stride_x, row_mask, IS_RMS, ACC)
        x_hat = _centered(x, pivot, mean, scale, mask) * rstd[:, None]
        g = dy * w[None, :]
        mean_gx = tl.sum(g * x_hat, axis=1) / n
        mean_g = tl.sum(g, axis=1) / n
        _store_rows(DX, rows, stride_dx, cols, _input_grad(g, x_hat, mean_g, mean_gx, rstd, scale, IS_RMS), mask)
        dw += dy * x_hat
        db += dy
    _store_partials(DW_PARTIAL, DB_PARTIAL, pid, N, cols, col_mask, dw, db, HAS_WEIGHT, HAS_BIAS)


# ---------------------------------------------------------------------------------------------
# Looped path: rows longer than one block, processed in BLOCK_N chunks. Same formulas; each
# row is a [1, BLOCK_N] tile so the helpers above apply unchanged.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _looped_moments(X, row, stride_x, pivot, scale, N, n,
                    IS_RMS: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    """_tile_moments of one long row, accumulated chunk by chunk (one pass for the mean, one for the variance)."""
    zero = tl.zeros([1], ACC)
    mean = zero
    if not IS_RMS:
        acc = tl.zeros([1, BLOCK_N], ACC)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = (cols < N)[None, :]
            acc += _centered(_load_rows(X, row, stride_x, cols, mask, ACC), pivot, zero, scale, mask)
        mean = tl.sum(acc, axis=1) / n
    acc = tl.zeros([1, BLOCK_N], ACC)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = (cols < N)[None, :]
        c = _centered(_load_rows(X, row, stride_x, cols, mask, ACC), pivot, mean, scale, mask)
        acc += c * c
    return mean, tl.sum(acc, axis=1) / n


@triton.jit
def norm_fwd_looped_kernel(
    X, Y, W, B, Mean, Rstd, Scale,
    stride_x, stride_y, N, eps,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    """One program per row."""
    row = tl.program_id(0).to(tl.int64) + tl.zeros([1], tl.int64)
    row_mask = row >= 0
    eps = tl.cast(eps, ACC)
    n = tl.cast(N, ACC)

    pivot = _load_pivot(X, row, stride_x, row_mask, IS_RMS, ACC)
    scale = tl.full([1], 1.0, ACC)
    mean, var = _looped_moments(X, row, stride_x, pivot, scale, N, n, IS_RMS, BLOCK_N, ACC)
    if _any(_plain(var, eps) == 0):
        amax = tl.zeros([1, BLOCK_N], ACC)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            amax = tl.maximum(amax, tl.abs(_load_rows(X, row, stride_x, cols, (cols < N)[None, :], ACC)))
        scale = _pow2_scale(tl.max(amax, axis=1))
        mean, var = _looped_moments(X, row, stride_x, pivot, scale, N, n, IS_RMS, BLOCK_N, ACC)
    rstd = _rstd(var, scale, eps)

    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        mask = col_mask[None, :]
        x = _load_rows(X, row, stride_x, cols, mask, ACC)
        x_hat = _centered(x, pivot, mean, scale, mask) * rstd[:, None]
        y = _affine(x_hat, W, B, cols, col_mask, HAS_WEIGHT, HAS_BIAS, ACC)
        _store_rows(Y, row, stride_y, cols, y, mask)
    _store_stats(Mean, Rstd, Scale, row, row_mask, mean, rstd, scale, IS_RMS)


@triton.jit
def _looped_tile(X, DY, W, Mean, Rstd, Scale, row, stride_x, stride_dy, cols, col_mask,
                 IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    """x_hat, g = dy * weight and dy on one [1, BLOCK_N] chunk of a long row, plus the row's stats."""
    row_mask = row >= 0
    mask = col_mask[None, :]
    mean, rstd, scale = _load_stats(Mean, Rstd, Scale, row, row_mask, IS_RMS)
    pivot = _load_pivot(X, row, stride_x, row_mask, IS_RMS, ACC)
    x_hat = _centered(_load_rows(X, row, stride_x, cols, mask, ACC), pivot, mean, scale, mask) * rstd[:, None]
    dy = _load_rows(DY, row, stride_dy, cols, mask, ACC)
    g = dy
    if HAS_WEIGHT:
        g = dy * _load_vector(W, cols, col_mask, ACC)[None, :]
    return x_hat, g, dy, rstd, scale


@triton.jit
def norm_bwd_coeffs_looped_kernel(
    X, DY, W, Mean, Rstd, Scale, MEAN_G, MEAN_GX,
    stride_x, stride_dy, N,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    """Pass 1 of the looped backward, one program per row: the row means of g and g * x_hat."""
    row = tl.program_id(0).to(tl.int64) + tl.zeros([1], tl.int64)
    acc_g = tl.zeros([1, BLOCK_N], ACC)
    acc_gx = tl.zeros([1, BLOCK_N], ACC)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        x_hat, g, dy, rstd, scale = _looped_tile(X, DY, W, Mean, Rstd, Scale, row, stride_x, stride_dy, cols, cols < N,
                                                 IS_RMS, HAS_WEIGHT, ACC)
        acc_g += g
        acc_gx += g * x_hat
    n = tl.cast(N, ACC)
    tl.store(MEAN_G + row, tl.sum(acc_g, axis=1) / n)
    tl.store(MEAN_GX + row, tl.sum(acc_gx, axis=1) / n)


@triton.jit
def norm_bwd_looped_kernel(
    X, DY, DX, W, Mean, Rstd, Scale, MEAN_G, MEAN_GX, DW_PARTIAL, DB_PARTIAL,
    stride_x, stride_dy, stride_dx, M, N,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    """Pass 2, grid (P, chunks): program (p, c) takes rows p, p + P, ... of column chunk c,
    writes dx there and chunk c of row p of the fp32 partial dweight / dbias."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    dw = tl.zeros([1, BLOCK_N], ACC)
    db = tl.zeros([1, BLOCK_N], ACC)
    for r in range(pid, M, tl.num_programs(0)):
        row = tl.cast(r, tl.int64) + tl.zeros([1], tl.int64)
        x_hat, g, dy, rstd, scale = _looped_tile(X, DY, W, Mean, Rstd, Scale, row, stride_x, stride_dy, cols, col_mask,
                                                 IS_RMS, HAS_WEIGHT, ACC)
        dx = _input_grad(g, x_hat, tl.load(MEAN_G + row), tl.load(MEAN_GX + row), rstd, scale, IS_RMS)
        _store_rows(DX, row, stride_dx, cols, dx, col_mask[None, :])
        dw += dy * x_hat
        db += dy
    _store_partials(DW_PARTIAL, DB_PARTIAL, pid, N, cols, col_mask, dw, db, HAS_WEIGHT, HAS_BIAS)


# ---------------------------------------------------------------------------------------------
# DyT: elementwise tiles of BLOCK_M rows x BLOCK_N columns, grid (row tiles, column chunks).
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tanh_sech2(u):
    """(tanh(u), 1 - tanh(u)^2) to a few ulps from one exp (the interpreter has no libdevice tanh).
    With e = exp(-2|u|): tanh = (1 - e) / (1 + e) and sech^2 = 4e / (1 + e)^2, which never cancels,
    so the gradient stays accurate where tanh rounds to 1. Below |u| = `small`, 1 - e loses the leading
    bits, so tanh is its odd Taylor series there (the first term left out is < 0.15 ulp)."""
    if u.dtype == tl.float64:
        small = 0.01
    else:
        small = 0.25
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    s = tl.where(a < small, a, 0.0)  # the series only where it is used: no overflow elsewhere
    s2 = s * s
    near = s + s * s2 * (-1.0 / 3 + s2 * (2.0 / 15 + s2 * (-17.0 / 315 + s2 * (62.0 / 2835))))
    t = tl.where(a < small, near, (1.0 - e) / (1.0 + e))
    return tl.where(u < 0, -t, t), 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def dyt_fwd_kernel(
    X, Y, ALPHA, W, B,
    stride_x, stride_y, M, N,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = (rows < M)[:, None] & col_mask[None, :]
    alpha = tl.load(ALPHA).to(ACC)
    t, _ = _tanh_sech2(_load_rows(X, rows, stride_x, cols, mask, ACC) * alpha)
    _store_rows(Y, rows, stride_y, cols, _affine(t, W, B, cols, col_mask, HAS_WEIGHT, HAS_BIAS, ACC), mask)


@triton.jit
def dyt_bwd_kernel(
    X, DY, DX, ALPHA, W, DW_PARTIAL, DB_PARTIAL, DALPHA_PARTIAL,
    stride_x, stride_dy, stride_dx, M, N,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    """Persistent, grid (P, column chunks): program (p, c) takes row tiles p, p + P, ... of chunk c,
    writes dx there, chunk c of row p of the [P, N] partial dweight / dbias and element (p, c) of the
    [P, chunks] partial dalpha, all of which the host reduces in a fixed order (no atomics).

    With u = alpha * x and g = dy * gamma: dx = g * alpha * sech^2(u), dalpha = sum of g * x * sech^2(u),
    dgamma = column sums of dy * tanh(u), dbeta = column sums of dy."""
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    alpha = tl.load(ALPHA).to(ACC)
    w = _weight_or_ones(W, cols, col_mask, HAS_WEIGHT, ACC)
    dw = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    db = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    dalpha = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for tile in range(pid, tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        rows = tl.cast(tile, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_mask[None, :]
        x = _load_rows(X, rows, stride_x, cols, mask, ACC)
        dy = _load_rows(DY, rows, stride_dy, cols, mask, ACC)
        t, sech2 = _tanh_sech2(x * alpha)
        g_sech2 = dy * w[None, :] * sech2
        _store_rows(DX, rows, stride_dx, cols, g_sech2 * alpha, mask)
        dalpha += g_sech2 * x  # padding lanes: x = dy = 0
        dw += dy * t
        db += dy
    _store_partials(DW_PARTIAL, DB_PARTIAL, pid, N, cols, col_mask, dw, db, HAS_WEIGHT, HAS_BIAS)
    tl.store(DALPHA_PARTIAL + pid * tl.num_programs(1) + chunk, tl.sum(tl.sum(dalpha, axis=1), axis=0))
