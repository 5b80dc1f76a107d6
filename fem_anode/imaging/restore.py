"""Blur-aware label refinement: the labels whose blurred gray image best explains the data.

A tomogram is, to first order, the piecewise-constant phase image blurred by the point-spread
function (PSF) plus noise,

    g = K * f[L] + n,      f[L](x) = mu_{L(x)},      K = Gaussian of width s (voxels),

so a voxel's gray value mixes its neighbours' phases (partial volume): small particles and thin
shells take intermediate gray values, and a per-voxel threshold cannot recover them. This module
estimates ``s`` and the phase levels ``mu`` from the gray image and a first segmentation, and then
lowers the energy

    E(L) = |g - K * f[L]|^2 / (2 sigma_n^2)  +  beta * #{face-neighbour pairs with different labels}

(Gaussian likelihood of the blurred model, Potts prior; Geman & Geman 1984) by iterated
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
from typing import Any

import numpy as np
from scipy import ndimage, optimize

from fem_anode.errors import InputError, UsageError

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


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum(a * b, dtype=np.float64))


def fit_levels(
    gray: np.ndarray, classes: np.ndarray, n_classes: int, s: float, mask: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """Least-squares phase levels of the blurred model (see :func:`_fit_levels`).

    Returns:
        ``(levels, mean squared residual)``.
    """
    levels, residual, _ = _fit_levels(gray, classes, n_classes, s, mask)
    return levels, residual


def _fit_levels(
    gray: np.ndarray, classes: np.ndarray, n_classes: int, s: float, mask: np.ndarray | None = None
) -> tuple[np.ndarray, float, np.ndarray]:
    """Least-squares phase levels of the blurred model, ``min_mu |g - K * sum_k mu_k 1_k|^2``.

    The normal equations ``A mu = b`` with ``A_kl = <K 1_k, K 1_l>``, ``b_k = <K 1_k, g>``
    (``1_k`` the indicator of class ``k``), over the voxels of ``mask`` (default all). Classes that
    are absent get the level NaN.

    Returns:
        ``(levels, mean squared residual, model K * f over the voxels of mask)``.
    """
    blurred = [_blur(classes == k, s) if np.any(classes == k) else None for k in range(n_classes)]
    present = [k for k in range(n_classes) if blurred[k] is not None]
    g = np.asarray(gray, dtype=np.float32)
    sel = (lambda a: a[mask]) if mask is not None else (lambda a: a)
    parts = [sel(blurred[k]) for k in present]
    gs = sel(g)
    a = np.array([[_dot(p, q) for q in parts] for p in parts])
    b = np.array([_dot(p, gs) for p in parts])
    sol = np.linalg.lstsq(a, b, rcond=None)[0]
    levels = np.full(n_classes, np.nan)
    levels[present] = sol
    model = sum(float(m) * p for m, p in zip(sol, parts))
    residual = float(np.mean((gs - model) ** 2, dtype=np.float64))
    return levels, residual, model


def estimate_psf(
    gray: np.ndarray, classes: np.ndarray, n_classes: int, *, bounds: tuple[float, float] = (0.3, 4.0)
) -> dict[str, Any]:
    """PSF width ``s`` (voxels) and phase levels that best explain ``gray`` as blurred ``classes``.

    ``s = argmin_s min_mu |g - K_s * f_mu[classes]|^2`` (bounded scalar minimisation, tolerance
    0.02 voxel; the levels by :func:`fit_levels` for each ``s``), on the central block of at most
    10^6 voxels with an 8-voxel margin left out of the residual (the filters there see the block's
    edge). ``classes`` is a first segmentation (e.g. the multistage thresholds): its errors bias
    ``s`` low by 5-20 % on the synthetic volumes (partial-volume voxels assigned to the wrong
    side look like a sharper image), which the refinement tolerates (section 1.8 of
    ``docs/imaging.md``).

    Returns:
        ``{"psf_sigma_voxels", "levels", "rms_residual", "block_shape"}``.
    """
    g = np.asarray(gray, dtype=np.float32)
    side = max(2 * _PSF_MARGIN + 4, round(_PSF_BLOCK_VOXELS ** (1.0 / g.ndim)) + 2 * _PSF_MARGIN)
    block = tuple(slice(max(0, (n - side) // 2), max(0, (n - side) // 2) + min(n, side)) for n in g.shape)
    gb, cb = g[block], classes[block]
    mask = np.zeros(gb.shape, dtype=bool)
    inner = tuple(slice(_PSF_MARGIN, n - _PSF_MARGIN) if n > 2 * _PSF_MARGIN + 2 else slice(None) for n in gb.shape)
    mask[inner] = True

    def cost(s: float) -> float:
        return fit_levels(gb, cb, n_classes, s, mask)[1]

    result = optimize.minimize_scalar(cost, bounds=bounds, method="bounded", options={"xatol": 0.02})
    s = float(result.x)
    levels, residual = fit_levels(g, classes, n_classes, s)
    return {
        "psf_sigma_voxels": s,
        "levels": levels,
        "rms_residual": math.sqrt(residual),
        "block_shape": list(gb.shape),
    }


def labels_energy(
    gray: np.ndarray, classes: np.ndarray, levels: np.ndarray, s: float, noise_sigma: float, beta: float
) -> tuple[float, float]:
    """``(data, prior)`` energy of a labelling: ``|g - K f|^2 / (2 sigma_n^2)`` and ``beta`` x unlike face pairs."""
    f = np.nan_to_num(np.asarray(levels, dtype=np.float32))[classes]
    r = np.asarray(gray, dtype=np.float32) - _blur(f, s)
    data = float(np.sum(r * r, dtype=np.float64)) / (2.0 * noise_sigma**2)
    pairs = sum(int(np.count_nonzero(np.diff(classes, axis=a))) for a in range(classes.ndim))
    return data, beta * pairs


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


def _sublattice_bound(shape: tuple[int, ...], off: tuple[int, ...], operators: list[np.ndarray]) -> np.ndarray:
    """Row sums of ``K*K`` over the sub-lattice through each of its voxels, borders included.

    ``K*K`` with reflecting borders is the product of its 1D operators ``M_a`` (``n_a x n_a``,
    the filter applied twice to the unit vectors), so the sum over the sub-lattice voxels ``j``
    of ``(K*K)(x_i, x_j)`` is ``prod_a sum_{j_a = o_a mod 3} M_a[i_a, j_a]``: in the interior the
    plain sub-lattice sum, near a border more (the mirrored kernel adds to it)."""
    bound = np.ones((1,) * len(shape), dtype=np.float32)
    for axis, (m, o) in enumerate(zip(operators, off)):
        rows = np.abs(m[o::_SPACING, o::_SPACING]).sum(axis=1).astype(np.float32)
        bound = bound * rows.reshape([-1 if a == axis else 1 for a in range(len(shape))])
    return bound


def _scatter_update(
    c: np.ndarray, points: np.ndarray, amounts: np.ndarray, offsets: np.ndarray, weights: np.ndarray
) -> None:
    """``c -= sum_p amount_p KK(. - p)`` with reflected borders (as ``gaussian_filter``'s 'reflect')."""
    shape = np.array(c.shape)
    flat = c.reshape(-1)
    strides = np.cumprod([*c.shape[1:], 1][::-1])[::-1]
    reach = int(np.abs(offsets).max()) if len(offsets) else 0
    inner = np.all((points >= reach) & (points < shape - reach), axis=1)
    flat_offsets = offsets @ strides
    chunk = max(1, 4_000_000 // max(len(weights), 1))
    # points whose stencil stays inside the image: one flat index per stencil entry
    p_in, a_in = points[inner] @ strides, amounts[inner]
    for start in range(0, len(p_in), chunk):
        idx = (p_in[start : start + chunk, None] + flat_offsets[None, :]).ravel()
        np.subtract.at(flat, idx, (a_in[start : start + chunk, None] * weights[None, :]).ravel())
    # points near a border: the stencil reflected per axis through a lookup table
    p_out, a_out = points[~inner], amounts[~inner]
    if len(p_out) == 0:
        return
    tables = []
    for n in c.shape:
        t = np.arange(-reach, n + reach)
        t = np.where(t < 0, -t - 1, t)
        tables.append(np.where(t >= n, 2 * n - t - 1, t))
    for start in range(0, len(p_out), chunk):
        p = p_out[start : start + chunk]
        idx = np.zeros((len(p), len(weights)), dtype=np.int64)
        for axis, (table, stride) in enumerate(zip(tables, strides)):
            idx += table[p[:, axis, None] + offsets[None, :, axis] + reach] * stride
        np.subtract.at(flat, idx.ravel(), (a_out[start : start + chunk, None] * weights[None, :]).ravel())


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
) -> tuple[np.ndarray, dict[str, Any]]:
    """Iterated conditional modes on ``E(L) = |g - K f[L]|^2 / (2 sigma_n^2) + beta Potts(L)``.

    Each sweep visits the 27 sub-lattices of spacing 3 (9 in 2D) in a fixed order; on a
    sub-lattice every voxel moves to the class of lowest

        dE_l(x) = ( delta^2 k_3 - 2 delta c(x) ) / (2 sigma_n^2) - beta (n_l(x) - n_L(x)(x)),

    ``delta = mu_l - mu_L(x)``, ``c = K * g - (K*K) * f`` kept up to date after every sub-lattice
    (a full Gaussian filter of the change, or a local stencil update when few voxels changed),
    ``n_l`` the number of face neighbours of class ``l``, ``k_3(x)`` the row sum of ``K*K`` over
    the sub-lattice through ``x``, borders included (:func:`_sublattice_bound`; it bounds the
    cross terms of simultaneous changes, so E never rises). After
    each sweep the levels are refitted by least squares (``refit_levels``: the same energy
    minimised over ``mu``). Stops when fewer than ``tol`` of the voxels changed in a sweep.

    Args:
        gray: raw gray image (white noise; not the denoised one), 2D or 3D.
        classes: initial class index per voxel, ``0 .. n-1`` (``n = len(levels)``).
        levels: gray level per class (NaN: class not used).
        psf_sigma: Gaussian PSF width, voxels.
        noise_sigma: noise standard deviation, gray units.
        beta: Potts weight per unlike face pair (data-term units).
        max_sweeps: sweep limit.
        tol: stop when a sweep changes fewer than this fraction of the voxels.
        refit_levels: refit the levels after each sweep.

    Returns:
        ``(classes, info)``: info has the sweeps, voxels changed per sweep, the energy
        (data + prior) before and after every sweep, the final levels and the constants used.
    """
    g = np.asarray(gray, dtype=np.float32)
    cls = np.array(classes, dtype=np.int8, copy=True)
    n = len(levels)
    if cls.shape != g.shape:
        raise InputError(f"labels shape {cls.shape} differs from the gray image {g.shape}")
    if cls.size and (int(cls.min()) < 0 or int(cls.max()) >= n):
        raise InputError(f"class indices must be 0..{n - 1} (one level each), got {int(cls.min())}..{int(cls.max())}")
    if not (np.isfinite(psf_sigma) and psf_sigma > 0):
        raise UsageError(f"PSF width must be positive (voxels), got {psf_sigma}")
    if not (np.isfinite(noise_sigma) and noise_sigma > 0):
        raise UsageError(f"noise sigma must be positive for the blur-aware refinement, got {noise_sigma}")
    if not (np.isfinite(beta) and beta >= 0):
        raise UsageError(f"Potts weight beta must be >= 0, got {beta}")
    ndim = g.ndim
    mu = np.asarray(levels, dtype=np.float64).copy()
    usable = np.isfinite(mu)
    offsets, weights, kk_centre, k_sub = _kk_stencil(psf_sigma, ndim)
    inv = np.float32(1.0 / (2.0 * noise_sigma**2))
    beta32 = np.float32(beta)
    colours = list(np.ndindex(*(_SPACING,) * ndim))
    operators = []
    for n_axis in g.shape:
        m = ndimage.gaussian_filter1d(np.eye(n_axis), psf_sigma, axis=0, mode="reflect", truncate=_TRUNCATE)
        operators.append(ndimage.gaussian_filter1d(m, psf_sigma, axis=0, mode="reflect", truncate=_TRUNCATE))
    bounds = {off: _sublattice_bound(g.shape, off, operators) for off in colours}
    del operators
    model = _blur(np.nan_to_num(mu).astype(np.float32)[cls], psf_sigma)  # K * f

    def energy() -> float:
        data = float(np.sum((g - model) ** 2, dtype=np.float64)) / (2.0 * noise_sigma**2)
        return data + beta * sum(int(np.count_nonzero(np.diff(cls, axis=a))) for a in range(ndim))

    energies = [energy()]
    changed_per_sweep: list[int] = []
    levels_per_sweep: list[list[float]] = []
    for _sweep in range(max_sweeps):
        mu32 = np.nan_to_num(mu).astype(np.float32)
        c = _blur(g - model, psf_sigma)  # K * (g - K * f)
        padded = np.pad(cls, 1, mode="constant", constant_values=n)
        changed_total = 0
        for off in colours:
            sl = tuple(slice(o, None, _SPACING) for o in off)
            current = cls[sl]
            if current.size == 0:
                continue
            neighbours = []
            for axis in range(ndim):
                for step in (-1, 1):
                    psl = tuple(slice(o + 1 + (step if a == axis else 0), None, _SPACING) for a, o in enumerate(off))
                    neighbours.append(padded[psl][tuple(slice(0, size) for size in current.shape)])
            same = []
            for k in range(n):
                count = np.zeros(current.shape, dtype=np.int8)
                for view_nb in neighbours:
                    count += view_nb == k
                same.append(count)
            same_arr = np.stack(same)
            own = np.take_along_axis(same_arr, current[None].astype(np.intp), 0)[0].astype(np.float32)
            f_now = mu32[current]
            c_now = c[sl]
            k_here = bounds[off]
            best = np.zeros(current.shape, dtype=np.float32)
            choice = current.copy()
            for k in range(n):
                if not usable[k]:
                    continue
                delta = mu32[k] - f_now
                d_e = (delta * delta * k_here - 2.0 * delta * c_now) * inv - beta32 * (same_arr[k] - own)
                better = d_e < best - np.float32(1e-6)
                best = np.where(better, d_e, best)
                choice = np.where(better, np.int8(k), choice)
            moved = choice != current
            m = int(np.count_nonzero(moved))
            if m == 0:
                continue
            amounts = (mu32[choice] - f_now)[moved]
            local = np.argwhere(moved)
            points = local * _SPACING + np.asarray(off)
            view = cls[sl]
            view[moved] = choice[moved]
            padded[tuple(slice(1, -1) for _ in range(ndim))][sl][moved] = choice[moved]
            if m * len(weights) < 4 * g.size:  # local update cheaper than two full filters
                _scatter_update(c, points, amounts, offsets, weights)
            else:
                change = np.zeros(g.shape, dtype=np.float32)
                change[tuple(points.T)] = amounts
                c -= _blur_kk(change, psf_sigma)
            changed_total += m
        changed_per_sweep.append(changed_total)
        if refit_levels:
            fitted, _, model = _fit_levels(g, cls, n, psf_sigma)  # absent classes: no voxels, no term
            mu = np.where(np.isfinite(fitted), fitted, mu)
        else:
            model = _blur(mu32[cls], psf_sigma)
        levels_per_sweep.append([float(v) for v in mu])
        energies.append(energy())
        logger.debug("blur-aware ICM sweep %d: %d voxels changed, energy %.6g", _sweep, changed_total, energies[-1])
        if changed_total < tol * g.size:
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
        "kk_centre": kk_centre,
        "kk_sublattice_sum": k_sub,
    }
    return cls, info
