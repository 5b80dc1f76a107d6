"""Blur-aware label refinement: the labels whose blurred gray image best explains the data.

A tomogram is, to first order, the piecewise-constant phase image blurred by the point-spread
function (PSF) plus noise,

    g = K * f[L] + n,      f[L](x) = mu_{L(x)},      K = Gaussian of width s (voxels),

so a voxel's gray value mixes its neighbours' phases (partial volume): small particles and thin
shells take intermediate gray values, and a per-voxel threshold cannot recover them. This module
estimates ``s`` and the phase levels ``mu`` from the gray image and a first segmentation, and then
lowers the energy

    E(L) = |g - K * f[L]|^2 / (2 sigma_n^2)  +  beta * #{face-neighbour pairs with different labels}

(Gaussian likelihood of the blurred model, Potts prior; Geman & Geman 1984; optionally each pair
of classes with its own interface weight, ``beta w_ab``) by iterated
conditional modes (Besag 1986) that account for the blur: a label change at ``x`` changes the
model by ``delta K(. - x)``, so its data-energy change is

    dE(x) = ( delta^2 k - 2 delta c(x) ) / (2 sigma_n^2),     c = K * (g - K * f[L]),

(``k = sum K^2`` for a single voxel). Voxels are visited on the 27 sub-lattices of spacing 3 (one
sub-lattice at a time, all its voxels at once); for simultaneous changes on a sub-lattice the
cross terms are bounded by replacing ``k`` with the row sum of ``K*K`` over the sub-lattice
(reflecting borders included), so every sub-lattice step lowers E (a majorise-minimise step).
The noise ``sigma_n`` is estimated from the image
(:func:`~fem_anode.imaging.denoise.estimate_noise_sigma`); ``s`` and ``mu`` by least squares
(:func:`estimate_psf`).

Gray images are float arrays in any scale; ``s`` is in voxels (the same along every axis).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
from scipy import ndimage, optimize

from fem_anode.errors import InputError, UsageError
from fem_anode.imaging.partition import Slabs

__all__ = ["DEFAULT_POTTS_BETA", "fit_levels", "estimate_psf", "blur_aware_icm", "labels_energy"]

logger = logging.getLogger(__name__)

#: Potts weight per unlike face-neighbour pair, in units of the data term (residual^2 / (2 sigma_n^2)).
DEFAULT_POTTS_BETA: float = 1.0
#: Spacing of the sub-lattices visited at once (27 in 3D).
_SPACING: int = 3
#: Gaussian truncation (standard deviations) of the model blur K.
_TRUNCATE: float = 4.0
#: Largest block (voxels) on which the PSF width is fitted, and its margin (voxels) left out.
_PSF_BLOCK_VOXELS: int = 1_000_000
_PSF_MARGIN: int = 8


def _blur(a: np.ndarray, s: float, truncate: float = _TRUNCATE) -> np.ndarray:
    return ndimage.gaussian_filter(np.asarray(a, dtype=np.float32), s, mode="reflect", truncate=truncate)


def _radius(s: float) -> int:
    """Reach of the model blur ``K`` (voxels): ``gaussian_filter``'s ``int(truncate s + 0.5)``."""
    return int(_TRUNCATE * s + 0.5)


def _layer_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``sum(a * b)`` per axis-0 layer in float64 (the same numbers on any slab partition)."""
    prod = np.asarray(a * b)
    return prod.reshape(prod.shape[0], int(np.prod(prod.shape[1:]))).sum(axis=1, dtype=np.float64)


def fit_levels(
    gray: np.ndarray, classes: np.ndarray, n_classes: int, s: float, *, slabs: Slabs | None = None
) -> tuple[np.ndarray, float]:
    """Least-squares phase levels of the blurred model (see :func:`_fit_levels`) over the whole image.

    With ``slabs`` (collective), ``gray`` and ``classes`` are this rank's layers.

    Returns:
        ``(levels, mean squared residual)``.
    """
    part = slabs if slabs is not None else Slabs.whole(np.shape(gray)[0])
    window_g, lo = part.window(np.asarray(gray, dtype=np.float32), _radius(s))
    window_c, _ = part.window(np.asarray(classes), _radius(s))
    rows = slice(part.z0 - lo, part.z1 - lo)
    levels, residual, _ = _fit_levels(window_g, window_c, n_classes, s, part, rows)
    return levels, residual


def _fit_levels(
    gray: np.ndarray,
    classes: np.ndarray,
    n_classes: int,
    s: float,
    slabs: Slabs,
    rows: slice,
    box: tuple[slice, ...] | None = None,
) -> tuple[np.ndarray, float, np.ndarray]:
    """Least-squares phase levels of the blurred model, ``min_mu |g - K * sum_k mu_k 1_k|^2``.

    The normal equations ``A mu = b`` with ``A_kl = <K 1_k, K 1_l>``, ``b_k = <K 1_k, g>``
    (``1_k`` the indicator of class ``k``). ``gray`` and ``classes`` are a window of the
    distributed image (layers of neighbouring ranks within ``int(4 s + 0.5)`` of the rows this
    rank sums over, reflecting borders at the image's own ends); the inner products run over
    this rank's ``rows`` of the window, cut to ``box`` (per-axis slices of the window; default
    all), are summed per layer and reduced exactly, so every rank count gives the same levels.
    Classes absent from every rank's ``rows`` get the level NaN.

    Returns:
        ``(levels, mean squared residual over the summed voxels, model K * f over the window)``.
    """
    if box is not None:
        r0 = max(rows.start, box[0].start)
        r1 = max(r0, min(rows.stop, box[0].stop))
        cut = (slice(r0, r1), *box[1:])
    else:
        cut = (rows,)
    present = [k for k in range(n_classes) if slabs.any(bool(np.any(classes[rows] == k)))]
    blurred = {k: _blur(classes == k, s) for k in present}
    g = np.asarray(gray, dtype=np.float32)
    parts = [blurred[k][cut] for k in present]
    gs = g[cut]
    m = len(present)
    dots = [_layer_dots(parts[i], parts[j]) for i in range(m) for j in range(i, m)]
    dots += [_layer_dots(p, gs) for p in parts]
    totals = slabs.sum_layers(np.stack(dots, axis=1) if dots else np.zeros((gs.shape[0], 0)))
    a = np.zeros((m, m))
    index = 0
    for i in range(m):
        for j in range(i, m):
            a[i, j] = a[j, i] = totals[index]
            index += 1
    sol = np.linalg.lstsq(a, totals[index:], rcond=None)[0] if m else np.zeros(0)
    levels = np.full(n_classes, np.nan)
    levels[present] = sol
    model = np.zeros(g.shape, dtype=np.float32)
    for mu, k in zip(sol, present):
        model += float(mu) * blurred[k]
    r = gs - model[cut]
    n_total = int(slabs.sum_int(int(r.size)))
    residual = float(slabs.sum_layers(_layer_dots(r, r)[:, None])[0]) / max(n_total, 1)
    return levels, residual, model


def estimate_psf(
    gray: np.ndarray,
    classes: np.ndarray,
    n_classes: int,
    *,
    bounds: tuple[float, float] = (0.3, 4.0),
    slabs: Slabs | None = None,
) -> dict[str, Any]:
    """PSF width ``s`` (voxels) and phase levels that best explain ``gray`` as blurred ``classes``.

    ``s = argmin_s min_mu |g - K_s * f_mu[classes]|^2`` (bounded scalar minimisation, tolerance
    0.02 voxel; the levels by :func:`fit_levels` for each ``s``), on the central block of at most
    10^6 voxels with an 8-voxel margin left out of the residual (the filters there see the block's
    edge). ``classes`` is a first segmentation (e.g. the multistage thresholds): its errors bias
    ``s`` low by 5-20 % on the synthetic volumes (partial-volume voxels assigned to the wrong
    side look like a sharper image), which the refinement tolerates (section 1.8 of
    ``docs/imaging.md``). With ``slabs`` (collective), ``gray`` and ``classes`` are this rank's
    layers; the block's layers come from their owners with a halo of ``int(4 bounds[1] + 0.5)``.

    Returns:
        ``{"psf_sigma_voxels", "levels", "rms_residual", "block_shape"}``.
    """
    part = slabs if slabs is not None else Slabs.whole(np.shape(gray)[0])
    g = np.asarray(gray, dtype=np.float32)
    shape = (part.n0, *g.shape[1:])
    side = max(2 * _PSF_MARGIN + 4, round(_PSF_BLOCK_VOXELS ** (1.0 / g.ndim)) + 2 * _PSF_MARGIN)
    block = tuple(slice(max(0, (n - side) // 2), max(0, (n - side) // 2) + min(n, side)) for n in shape)
    block_shape = tuple(b.stop - b.start for b in block)
    inner = tuple(slice(_PSF_MARGIN, n - _PSF_MARGIN) if n > 2 * _PSF_MARGIN + 2 else slice(0, n) for n in block_shape)
    wg, lo = part.window(g, _radius(bounds[1]))
    wc, _ = part.window(np.asarray(classes), _radius(bounds[1]))
    # this rank's window cut to the block (layers b0..b1-1), as the whole block would be filtered
    b0 = min(max(block[0].start, lo), block[0].stop)
    b1 = max(b0, min(block[0].stop, lo + wg.shape[0]))
    gb = np.ascontiguousarray(wg[(slice(b0 - lo, b1 - lo), *block[1:])])
    cb = np.ascontiguousarray(wc[(slice(b0 - lo, b1 - lo), *block[1:])])
    del wg, wc
    own0 = min(max(part.z0, b0), b1)
    own1 = max(own0, min(part.z1, b1))
    rows = slice(own0 - b0, own1 - b0)
    first = block[0].start - b0  # the block's first layer in this rank's block window
    box = (slice(max(0, first + inner[0].start), max(0, first + inner[0].stop)), *inner[1:])

    def cost(s: float) -> float:
        return _fit_levels(gb, cb, n_classes, s, part, rows, box)[1]

    result = optimize.minimize_scalar(cost, bounds=bounds, method="bounded", options={"xatol": 0.02})
    s = float(result.x)
    levels, residual = fit_levels(g, classes, n_classes, s, slabs=part)
    return {
        "psf_sigma_voxels": s,
        "levels": levels,
        "rms_residual": math.sqrt(residual),
        "block_shape": list(block_shape),
    }


def labels_energy(
    gray: np.ndarray,
    classes: np.ndarray,
    levels: np.ndarray,
    s: float,
    noise_sigma: float,
    beta: float,
    pair_weights: np.ndarray | None = None,
) -> tuple[float, float]:
    """``(data, prior)`` energy of a labelling: ``|g - K f|^2 / (2 sigma_n^2)`` and ``beta`` x the
    unlike face pairs, each weighted by ``pair_weights[a, b]`` (default 1)."""
    f = np.nan_to_num(np.asarray(levels, dtype=np.float32))[classes]
    r = np.asarray(gray, dtype=np.float32) - _blur(f, s)
    data = float(np.sum(r * r, dtype=np.float64)) / (2.0 * noise_sigma**2)
    w = _pair_weights(pair_weights, len(levels))
    return data, beta * float(np.sum(_pair_counts(np.asarray(classes), len(w), 0, np.shape(classes)[0]) * w))


def _pair_weights(pair_weights: np.ndarray | None, n: int) -> np.ndarray:
    """The checked ``n x n`` interface weights (default: Potts, 1 for every unlike pair)."""
    if pair_weights is None:
        return 1.0 - np.eye(n)
    w = np.asarray(pair_weights, dtype=np.float64)
    if w.shape != (n, n) or not np.all(np.isfinite(w)) or np.any(w < 0) or not np.array_equal(w, w.T):
        raise UsageError(
            f"interface weights must be a symmetric, finite, non-negative {n} x {n} matrix, got {w.tolist()}"
        )
    if np.any(np.diag(w) != 0):
        raise UsageError("interface weights of a class with itself must be 0")
    return w


def _pair_counts(cls: np.ndarray, n: int, r0: int, r1: int) -> np.ndarray:
    """Unlike face pairs ``(L(x), L(y))`` (``n x n`` integer counts, ordered) of layers ``r0 .. r1-1``
    (along axis 0 the pairs whose second voxel lies there, including the one with layer ``r0 - 1``)."""
    counts = np.zeros((n, n), dtype=np.int64)
    blocks = [(cls[max(r0 - 1, 0) : r1 - 1], cls[max(r0 - 1, 0) + 1 : r1])] if r1 - max(r0 - 1, 0) > 1 else []
    part = cls[r0:r1]
    for a in range(1, cls.ndim):
        lo = [slice(None)] * cls.ndim
        hi = [slice(None)] * cls.ndim
        lo[a], hi[a] = slice(0, -1), slice(1, None)
        blocks.append((part[tuple(lo)], part[tuple(hi)]))
    for x, y in blocks:
        m = x != y
        counts += np.bincount((x[m].astype(np.int64) * n + y[m]).ravel(), minlength=n * n).reshape(n, n)
    return counts


def _blur_kk(a: np.ndarray, s: float) -> np.ndarray:
    """``K * K * a``: the model blur applied twice (exactly the adjoint-times-forward operator)."""
    return _blur(_blur(a, s), s)


def _kk_stencil(s: float, ndim: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Offsets and weights of ``K*K`` (cut where below 1e-5 of its centre, for local updates),
    its centre value and its sum over the sub-lattice of spacing 3 through the centre."""
    r = 2 * int(_TRUNCATE * s + 0.5)
    delta = np.zeros((2 * r + 1,) * ndim, dtype=np.float64)
    delta[(r,) * ndim] = 1.0
    kk = ndimage.gaussian_filter(
        ndimage.gaussian_filter(delta, s, mode="constant", truncate=_TRUNCATE), s, mode="constant", truncate=_TRUNCATE
    )
    centre = float(kk[(r,) * ndim])
    sub = float(np.abs(kk[tuple(slice(r % _SPACING, None, _SPACING) for _ in range(ndim))]).sum())
    keep = kk > 1e-5 * centre
    offsets = np.argwhere(keep) - r
    weights = kk[keep]
    return offsets.astype(np.int64), weights.astype(np.float32), centre, sub


def _sublattice_bound(
    shape: tuple[int, ...], off: tuple[int, ...], operators: list[np.ndarray], first: slice | None = None
) -> np.ndarray:
    """Row sums of ``K*K`` over the sub-lattice through each of its voxels, borders included.

    ``K*K`` with reflecting borders is the product of its 1D operators ``M_a`` (``n_a x n_a``,
    the filter applied twice to the unit vectors), so the sum over the sub-lattice voxels ``j``
    of ``(K*K)(x_i, x_j)`` is ``prod_a sum_{j_a = o_a mod 3} M_a[i_a, j_a]``: in the interior the
    plain sub-lattice sum, near a border more (the mirrored kernel adds to it). ``first`` selects
    the sub-lattice indices along axis 0 (a slab's layers; default all)."""
    bound = np.ones((1,) * len(shape), dtype=np.float32)
    for axis, (m, o) in enumerate(zip(operators, off)):
        rows = np.abs(m[o::_SPACING, o::_SPACING]).sum(axis=1).astype(np.float32)
        if axis == 0 and first is not None:
            rows = rows[first]
        bound = bound * rows.reshape([-1 if a == axis else 1 for a in range(len(shape))])
    return bound


def _scatter_update(
    c: np.ndarray,
    points: np.ndarray,
    amounts: np.ndarray,
    offsets: np.ndarray,
    weights: np.ndarray,
    *,
    shape: tuple[int, ...] | None = None,
    lo: int = 0,
) -> None:
    """``c -= sum_p amount_p KK(. - p)`` with reflected borders (as ``gaussian_filter``'s 'reflect').

    ``c`` holds the layers ``lo ... lo + len(c) - 1`` of an image of ``shape`` (default: all of
    it); ``points`` are in whole-image coordinates, in raster order; contributions to layers
    outside ``c`` are dropped. The additions to every voxel come in the order of ``points``
    (stencil-inside points first, then those near a border), whatever the window."""
    full = np.array(shape if shape is not None else c.shape)
    nw = c.shape[0]
    clipped = nw < full[0]
    flat = c.reshape(-1)
    strides = np.cumprod([*c.shape[1:], 1][::-1])[::-1]
    reach = int(np.abs(offsets).max()) if len(offsets) else 0
    inner = np.all((points >= reach) & (points < full - reach), axis=1)
    flat_offsets = offsets @ strides
    chunk = max(1, 4_000_000 // max(len(weights), 1))
    shift = np.zeros(c.ndim, dtype=np.int64)
    shift[0] = lo
    # points whose stencil stays inside the image: one flat index per stencil entry
    p_in, a_in = points[inner] - shift, amounts[inner]
    for start in range(0, len(p_in), chunk):
        p = p_in[start : start + chunk]
        idx = (p @ strides)[:, None] + flat_offsets[None, :]
        values = a_in[start : start + chunk, None] * weights[None, :]
        if clipped:
            z = p[:, 0, None] + offsets[None, :, 0]
            keep = (z >= 0) & (z < nw)
            np.subtract.at(flat, idx[keep], values[keep])
        else:
            np.subtract.at(flat, idx.ravel(), values.ravel())
    # points near a border: the stencil reflected per axis through a lookup table
    p_out, a_out = points[~inner], amounts[~inner]
    if len(p_out) == 0:
        return
    tables = []
    for axis, n in enumerate(full):
        t = np.arange(-reach, n + reach)
        t = np.where(t < 0, -t - 1, t)
        t = np.where(t >= n, 2 * n - t - 1, t)
        tables.append(t - lo if axis == 0 else t)
    for start in range(0, len(p_out), chunk):
        p = p_out[start : start + chunk]
        idx = np.zeros((len(p), len(weights)), dtype=np.int64)
        keep = np.ones(idx.shape, dtype=bool)
        for axis, (table, stride) in enumerate(zip(tables, strides)):
            target = table[p[:, axis, None] + offsets[None, :, axis] + reach]
            if axis == 0 and clipped:
                keep = (target >= 0) & (target < nw)
            idx += target * stride
        values = a_out[start : start + chunk, None] * weights[None, :]
        np.subtract.at(flat, idx[keep], values[keep])


#: Sweeps of :func:`blur_aware_icm` that take longer than this (s) are logged at INFO level.
PROGRESS_SECONDS = 5.0


def blur_aware_icm(
    gray: np.ndarray,
    classes: np.ndarray,
    levels: np.ndarray,
    *,
    psf_sigma: float,
    noise_sigma: float,
    beta: float = DEFAULT_POTTS_BETA,
    max_sweeps: int = 8,
    tol: float = 1e-4,
    refit_levels: bool = True,
    slabs: Slabs | None = None,
    excluded: dict[int, np.ndarray] | None = None,
    pair_weights: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Iterated conditional modes on ``E(L) = |g - K f[L]|^2 / (2 sigma_n^2) + beta Potts(L)``.

    Each sweep visits the 27 sub-lattices of spacing 3 (9 in 2D) in a fixed order; on a
    sub-lattice every voxel moves to the class of lowest

        dE_l(x) = ( delta^2 k_3 - 2 delta c(x) ) / (2 sigma_n^2) + beta sum_j (w_lj - w_L(x)j) n_j(x),

    ``delta = mu_l - mu_L(x)``, ``c = K * g - (K*K) * f`` kept up to date after every sub-lattice
    (a full Gaussian filter of the change, or a local stencil update when few voxels changed),
    ``n_j`` the number of face neighbours of class ``j``, ``w`` the interface weights (Potts:
    ``w_lj = 1`` for ``l != j``), ``k_3(x)`` the row sum of ``K*K`` over
    the sub-lattice through ``x``, borders included (:func:`_sublattice_bound`; it bounds the
    cross terms of simultaneous changes, so E never rises). After
    each sweep the levels are refitted by least squares (``refit_levels``: the same energy
    minimised over ``mu``). Stops when fewer than ``tol`` of the voxels changed in a sweep.

    On slabs (``slabs``, collective) every rank decides the voxels of its own layers, holding a
    halo of ``max(1, 2 int(4 s + 0.5))`` layers (the reach of ``K*K``); after every sub-lattice
    step the ranks send each other the changes that fall into their halos, so labels, ``c`` and
    the refitted levels (reduced exactly) are those of one process, bit for bit.

    Args:
        gray: raw gray image (white noise; not the denoised one), 2D or 3D; with ``slabs``,
            this rank's layers.
        classes: initial class index per voxel, ``0 .. n-1`` (``n = len(levels)``).
        levels: gray level per class (NaN: class not used).
        psf_sigma: Gaussian PSF width, voxels.
        noise_sigma: noise standard deviation, gray units.
        beta: Potts weight per unlike face pair (data-term units).
        max_sweeps: sweep limit.
        tol: stop when a sweep changes fewer than this fraction of the voxels.
        refit_levels: refit the levels after each sweep.
        slabs: the layers each MPI rank holds (default: one process, the whole image).
        excluded: class index -> boolean mask (this rank's layers) of voxels that may not move
            to that class (a shape constraint, e.g. no graphite on one-voxel-thin structures).
        pair_weights: ``n x n`` symmetric interface weights ``w`` (zero diagonal) multiplying
            ``beta`` per unlike face pair of each pair of classes; default Potts (all 1).

    Returns:
        ``(classes, info)`` (the classes of this rank's layers): info has the sweeps, voxels
        changed per sweep, the energy (data + prior) before and after every sweep, the final
        levels and the constants used (the same on every rank).
    """
    g_own = np.asarray(gray, dtype=np.float32)
    part = slabs if slabs is not None else Slabs.whole(g_own.shape[0])
    cls_own = np.array(classes, dtype=np.int8, copy=True)
    n = len(levels)
    if part.any(cls_own.shape != g_own.shape):
        raise InputError(f"labels shape {cls_own.shape} differs from the gray image {g_own.shape}")
    low = part.min(float(cls_own.min()) if cls_own.size else np.inf)
    high = part.max(float(cls_own.max()) if cls_own.size else -np.inf)
    if np.isfinite(low) and (low < 0 or high >= n):
        raise InputError(f"class indices must be 0..{n - 1} (one level each), got {int(low)}..{int(high)}")
    if not (np.isfinite(psf_sigma) and psf_sigma > 0):
        raise UsageError(f"PSF width must be positive (voxels), got {psf_sigma}")
    if not (np.isfinite(noise_sigma) and noise_sigma > 0):
        raise UsageError(f"noise sigma must be positive for the blur-aware refinement, got {noise_sigma}")
    if not (np.isfinite(beta) and beta >= 0):
        raise UsageError(f"Potts weight beta must be >= 0, got {beta}")
    w_pairs = _pair_weights(pair_weights, len(levels))
    w32 = (beta * w_pairs).astype(np.float32)
    ndim = g_own.ndim
    shape = (part.n0, *g_own.shape[1:])
    size = int(np.prod(shape))
    mu = np.asarray(levels, dtype=np.float64).copy()
    usable = np.isfinite(mu)
    offsets, weights, kk_centre, k_sub = _kk_stencil(psf_sigma, ndim)
    halo = max(1, 2 * _radius(psf_sigma))
    g, lo = part.window(g_own, halo)
    cls, _ = part.window(cls_own, halo)
    cls = np.array(cls, dtype=np.int8, copy=True)
    r0, r1 = part.z0 - lo, part.z1 - lo
    inv = np.float32(1.0 / (2.0 * noise_sigma**2))
    colours = list(np.ndindex(*(_SPACING,) * ndim))
    operators = []
    for n_axis in shape:
        m = ndimage.gaussian_filter1d(np.eye(n_axis), psf_sigma, axis=0, mode="reflect", truncate=_TRUNCATE)
        operators.append(ndimage.gaussian_filter1d(m, psf_sigma, axis=0, mode="reflect", truncate=_TRUNCATE))
    # this rank's voxels of each sub-lattice: layers z0 <= z < z1 with z = o (mod 3)
    starts = {o: part.z0 + (o - part.z0) % _SPACING for o in range(_SPACING)}
    bounds = {
        off: _sublattice_bound(shape, off, operators, slice((starts[off[0]] - off[0]) // _SPACING, None))[
            : len(range(starts[off[0]], part.z1, _SPACING))
        ]
        for off in colours
    }
    del operators
    model = _blur(np.nan_to_num(mu).astype(np.float32)[cls], psf_sigma)  # K * f

    def energy() -> float:
        r = (g - model)[r0:r1]
        data = float(part.sum_layers(_layer_dots(r, r)[:, None])[0]) / (2.0 * noise_sigma**2)
        pairs = part.sum_int(_pair_counts(cls, n, r0, r1))
        return data + beta * float(np.sum(pairs * w_pairs))

    def exchange(points: np.ndarray, amounts: np.ndarray, new: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
        """Send every rank this rank's number of changes and the changes in its halo (one
        all-to-all); return the number of changes of all ranks and all changes in this window,
        in raster order."""
        if not part.distributed:
            return len(points), points, amounts
        outgoing: list[Any] = []
        for r in range(part.comm.size):
            a, b = part.window_range(halo, r)
            pick = (points[:, 0] >= a) & (points[:, 0] < b) if r != part.rank else np.zeros(len(points), dtype=bool)
            outgoing.append((len(points), (points[pick], amounts[pick], new[pick]) if pick.any() else None))
        incoming = part.alltoall(outgoing)
        below: list[tuple[np.ndarray, np.ndarray]] = []
        above: list[tuple[np.ndarray, np.ndarray]] = []
        for r, (_, item) in enumerate(incoming):
            if item is None or r == part.rank:
                continue
            got_points, got_amounts, got_classes = item
            cls[tuple((got_points - shift).T)] = got_classes
            padded[tuple((got_points - shift + 1).T)] = got_classes
            (below if r < part.rank else above).append((got_points, got_amounts))
        pieces = [*below, (points, amounts), *above]
        total = sum(count for count, _ in incoming)
        return total, np.concatenate([p for p, _ in pieces]), np.concatenate([a for _, a in pieces])

    shift = np.zeros(ndim, dtype=np.int64)
    shift[0] = lo
    energies = [energy()]
    changed_per_sweep: list[int] = []
    levels_per_sweep: list[list[float]] = []
    for _sweep in range(max_sweeps):
        sweep_start = time.perf_counter()
        mu32 = np.nan_to_num(mu).astype(np.float32)
        c = _blur(g - model, psf_sigma)  # K * (g - K * f)
        padded = np.pad(cls, 1, mode="constant", constant_values=n)
        changed_total = 0
        for off in colours:
            ws = starts[off[0]] - lo
            sl = (slice(ws, r1, _SPACING), *(slice(o, None, _SPACING) for o in off[1:]))
            current = cls[sl]
            own_sl = (slice(starts[off[0]] - part.z0, None, _SPACING), *sl[1:])
            neighbours = []
            for axis in range(ndim):
                for step in (-1, 1):
                    psl = tuple(
                        slice((ws if a == 0 else o) + 1 + (step if a == axis else 0), None, _SPACING)
                        for a, o in enumerate(off)
                    )
                    neighbours.append(padded[psl][tuple(slice(0, size_a) for size_a in current.shape)])
            same = []
            for k in range(n):
                count = np.zeros(current.shape, dtype=np.int8)
                for view_nb in neighbours:
                    count += view_nb == k
                same.append(count)
            same_arr = np.stack(same).astype(np.float32)
            # prior cost of each class here: beta sum_j w_kj n_j (exact small integers times w)
            cost = np.zeros(same_arr.shape, dtype=np.float32)
            for k in range(n):  # elementwise in a fixed order: the same bits on any slab
                for j in range(n):
                    if w32[k, j] != 0:
                        cost[k] += w32[k, j] * same_arr[j]
            own = np.take_along_axis(cost, current[None].astype(np.intp), 0)[0]
            f_now = mu32[current]
            c_now = c[sl]
            k_here = bounds[off]
            best = np.zeros(current.shape, dtype=np.float32)
            choice = current.copy()
            for k in range(n):
                if not usable[k]:
                    continue
                delta = mu32[k] - f_now
                d_e = (delta * delta * k_here - 2.0 * delta * c_now) * inv + (cost[k] - own)
                if excluded is not None and k in excluded:
                    d_e = np.where(excluded[k][own_sl], np.float32(np.inf), d_e)
                better = d_e < best - np.float32(1e-6)
                best = np.where(better, d_e, best)
                choice = np.where(better, np.int8(k), choice)
            moved = choice != current
            amounts = (mu32[choice] - f_now)[moved]
            new = choice[moved]
            points = np.argwhere(moved) * _SPACING + np.asarray([starts[off[0]], *off[1:]])
            if len(points):
                view = cls[sl]
                view[moved] = new
                padded[tuple(slice(1, -1) for _ in range(ndim))][sl][moved] = new
            m, points, amounts = exchange(points, amounts, new)
            if m == 0:
                continue
            if m * len(weights) < 4 * size:  # local update cheaper than two full filters
                _scatter_update(c, points, amounts, offsets, weights, shape=shape, lo=lo)
            else:
                change = np.zeros(g.shape, dtype=np.float32)
                change[tuple((points - shift).T)] = amounts
                c -= _blur_kk(change, psf_sigma)
            changed_total += m
        changed_per_sweep.append(changed_total)
        if refit_levels:
            fitted, _, model = _fit_levels(g, cls, n, psf_sigma, part, slice(r0, r1))  # absent classes: no term
            mu = np.where(np.isfinite(fitted), fitted, mu)
        else:
            model = _blur(mu32[cls], psf_sigma)
        levels_per_sweep.append([float(v) for v in mu])
        energies.append(energy())
        logger.log(
            # progress of long runs (a large volume); short ones only at debug level
            logging.INFO if time.perf_counter() - sweep_start > PROGRESS_SECONDS else logging.DEBUG,
            "blur-aware ICM sweep %d of at most %d: %d voxels changed, energy %.6g",
            _sweep + 1,
            max_sweeps,
            changed_total,
            energies[-1],
        )
        if changed_total < tol * size:
            break
    info = {
        "sweeps": len(changed_per_sweep),
        "changed_per_sweep": changed_per_sweep,
        "energy_per_sweep": energies,
        "levels": [float(v) for v in mu],
        "levels_per_sweep": levels_per_sweep,
        "psf_sigma_voxels": float(psf_sigma),
        "noise_sigma": float(noise_sigma),
        "beta": float(beta),
        "pair_weights": w_pairs.tolist(),
        "kk_centre": kk_centre,
        "kk_sublattice_sum": k_sub,
        "halo_layers": halo,
    }
    return cls[r0:r1].copy(), info
