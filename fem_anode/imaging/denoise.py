"""Edge-preserving denoising of gray images before segmentation (NumPy/scikit-image).

* :func:`estimate_noise_sigma` -- the standard deviation of additive white noise, estimated
  from the data alone (Donoho & Johnstone's median absolute deviation of the finest wavelet
  sub-band, here the Haar "all-details" sub-band of the 2D/3D image; no PyWavelets needed).
* :func:`denoise_gray` -- non-local means (``skimage.restoration.denoise_nl_means``, fast mode,
  3D patches for volumes) or total variation (``denoise_tv_chambolle``), with the filter
  strength tied to the estimated noise.
* :func:`flatten_illumination` -- optional removal of a smooth additive in-plane background
  (uneven illumination, cupping) per slice, so that real depth gradients of the composition are
  kept.

Gray images are float arrays in any scale; every parameter in gray units scales with them.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Literal

import numpy as np

from fem_anode.errors import InputError, UsageError
from fem_anode.imaging.partition import Slabs
from fem_anode.imaging.settings import DENOISE_METHODS

__all__ = ["DENOISE_METHODS", "denoise_gray", "estimate_noise_sigma", "flatten_illumination"]

logger = logging.getLogger(__name__)

DenoiseMethod = Literal["nl_means", "tv", "none"]

#: MAD of a standard normal variable: sigma = MAD / 0.6745.
_MAD_NORMAL = 0.6744897501960817


def estimate_noise_sigma(gray: np.ndarray, slabs: Slabs | None = None) -> float:
    r"""Standard deviation of additive white Gaussian noise in a 2D/3D gray image.

    The finest Haar wavelet coefficient that differences along every axis,

    .. math:: d = 2^{-n/2} \sum_{\epsilon \in \{0,1\}^n} (-1)^{|\epsilon|} g(2k + \epsilon),

    has the variance of the noise and almost nothing of a piecewise smooth image, so
    :math:`\hat\sigma = \mathrm{median}(|d|) / 0.6745` (Donoho & Johnstone, Biometrika 81, 425
    (1994); the estimate of ``skimage.restoration.estimate_sigma`` with the Haar wavelet).
    Correlated noise (e.g. after a reconstruction filter) is underestimated.

    Args:
        gray: 2D or 3D gray image (any scale); at least 2 voxels per axis. With ``slabs``: this
            rank's layers of it.
        slabs: the layers of the image each MPI rank holds (collective; the exact median of the
            coefficients of all ranks, the same number on any number of ranks).

    Returns:
        The noise standard deviation in the image's gray units.
    """
    a = np.asarray(gray, dtype=np.float64)
    part = slabs if slabs is not None else Slabs.whole(a.shape[0] if a.ndim else 0)
    shape = (part.n0, *a.shape[1:])
    if a.ndim not in (2, 3) or min(shape) < 2:
        raise InputError(f"noise estimate needs a 2D/3D image with at least 2 voxels per axis, got shape {shape}")
    window, lo = part.window(a, 1)
    # axis 0: the pairs (2k, 2k + 1) whose first layer this rank owns
    first = part.z0 + part.z0 % 2
    stop = min(part.z1, part.n0 // 2 * 2)
    if stop > first:
        d = (window[first - lo : stop - lo : 2] - window[first - lo + 1 : stop - lo + 1 : 2]) / np.sqrt(2.0)
    else:
        d = np.zeros((0, *a.shape[1:]))
    for axis in range(1, a.ndim):
        n = d.shape[axis] // 2 * 2
        even = [slice(None)] * a.ndim
        odd = [slice(None)] * a.ndim
        even[axis], odd[axis] = slice(0, n, 2), slice(1, n, 2)
        d = (d[tuple(even)] - d[tuple(odd)]) / np.sqrt(2.0)
    return float(part.median(np.abs(d)) / _MAD_NORMAL)


def flatten_illumination(gray: np.ndarray, degree: int = 2) -> np.ndarray:
    """Remove a smooth in-plane background (uneven illumination, cupping) from every slice.

    Per slice (a 2D image is one slice; a volume's z-slices one by one): the least-squares
    polynomial surface ``P(y, x)`` of total degree ``degree`` through the slice's gray values is
    subtracted and the slice mean added back, ``g - P + mean(g)``. A linear ramp (``degree`` 1)
    or a ramp plus cupping (2) is removed exactly, the structure (which has no trend over the
    field of view) and the mean gray value of every slice are kept, so a real depth gradient of
    the composition survives and slabs of a volume are corrected exactly as the whole.

    Args:
        gray: 2D ``(y, x)`` or 3D ``(z, y, x)`` gray image.
        degree: polynomial degree, 1..4.
    """
    if not 1 <= int(degree) <= 4:
        raise UsageError(f"illumination polynomial degree must be 1..4, got {degree}")
    a = np.asarray(gray, dtype=np.float64)
    stack = a if a.ndim == 3 else a[None]
    ny, nx = stack.shape[1:]
    y, x = np.meshgrid(np.linspace(-1.0, 1.0, ny), np.linspace(-1.0, 1.0, nx), indexing="ij")
    terms = [y**i * x**j for i in range(degree + 1) for j in range(degree + 1 - i) if i + j > 0]
    basis = np.stack([t.ravel() - t.mean() for t in terms], axis=1)  # zero-mean terms: the mean is kept
    coeffs, *_ = np.linalg.lstsq(basis, stack.reshape(stack.shape[0], -1).T, rcond=None)
    out = stack - (basis @ coeffs).T.reshape(stack.shape)
    return out if a.ndim == 3 else out[0]


def _box_sum(a: np.ndarray, axis: int, radius: int) -> np.ndarray:
    """Sum of ``2 radius + 1`` neighbours along ``axis`` (the result is ``2 radius`` shorter there),
    added term by term in a fixed order, so a value never depends on where the array starts."""
    n = a.shape[axis] - 2 * radius

    def part(k: int) -> np.ndarray:
        index = [slice(None)] * a.ndim
        index[axis] = slice(k, k + n)
        return a[tuple(index)]

    out = np.array(part(0), copy=True)
    for k in range(1, 2 * radius + 1):
        out += part(k)
    return out


def _nl_means_padded(padded: np.ndarray, *, h: float, sigma: float, patch_size: int, patch_distance: int) -> np.ndarray:
    """Non-local means of the interior of ``padded`` (padded by ``patch_size // 2 + patch_distance``).

    For every shift ``t`` of the search window (half of them; the other half by symmetry), the
    patch distance ``d_t(x) = mean_{|q| <= o} (g(x + q) - g(x + t + q))^2`` and the weight
    ``w = exp(-max(d_t - 2 sigma^2, 0) / h^2)`` are formed for all voxels at once (Darbon et al.
    2008), and ``w g(x + t)`` is added to ``x``, ``w g(x)`` to ``x + t``. Patch sums are added
    term by term (no running sums), so every output voxel depends only on the voxels within
    ``o + patch_distance`` of it, bit for bit: slabs with that halo give the whole image's result.
    """
    p = np.asarray(padded, dtype=np.float32)
    o, dist = patch_size // 2, patch_distance
    halo = o + dist
    nd = p.ndim
    result = np.zeros(p.shape, dtype=np.float32)
    weights = np.zeros(p.shape, dtype=np.float32)
    inv_h2 = np.float32(1.0 / (h * h))
    two_var = np.float32(2.0 * sigma * sigma)
    inv_count = np.float32(1.0 / (2 * o + 1) ** nd)
    for t in itertools.product(range(-dist, dist + 1), repeat=nd):
        if t < (0,) * nd:
            continue  # the shift -t gives the same pairs
        ya = [max(0, -ti) for ti in t]
        yb = [n - max(0, ti) for n, ti in zip(p.shape, t)]
        here = tuple(slice(a, b) for a, b in zip(ya, yb))
        there = tuple(slice(a + ti, b + ti) for a, b, ti in zip(ya, yb, t))
        diff = p[here] - p[there]
        diff *= diff
        for axis in range(nd):
            diff = _box_sum(diff, axis, o)
        diff *= inv_count
        diff -= two_var
        np.maximum(diff, np.float32(0.0), out=diff)
        diff *= -inv_h2
        w = np.exp(diff, out=diff)
        xs = tuple(slice(a + o, b - o) for a, b in zip(ya, yb))
        xt = tuple(slice(a + o + ti, b - o + ti) for a, b, ti in zip(ya, yb, t))
        result[xs] += w * p[xt]
        weights[xs] += w
        if any(t):
            result[xt] += w * p[xs]
            weights[xt] += w
    inner = tuple(slice(halo, n - halo) for n in p.shape)
    return result[inner] / weights[inner]


def denoise_gray(
    gray: np.ndarray,
    method: DenoiseMethod = "nl_means",
    *,
    noise_sigma: float | None = None,
    strength: float = 0.8,
    patch_size: int = 3,
    patch_distance: int = 2,
    slabs: Slabs | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    r"""Edge-preserving denoising, 3D-aware for volumes, strength set by the data's noise.

    * ``"nl_means"``: non-local means (Buades et al., 2005), in the form with the outer loop on
      the shifts (Darbon et al., 2008; the fast mode of ``skimage.restoration.denoise_nl_means``):
      each voxel becomes the weighted mean of the voxels ``x'`` within ``patch_distance`` whose
      patches ``P`` (cubes of ``2 (patch_size // 2) + 1`` voxels) look alike,
      :math:`w = \exp(-\max(\|P(x) - P(x')\|^2 / N - 2\hat\sigma^2, 0) / h^2)` with
      :math:`h = \mathrm{strength}\,\hat\sigma`; reflecting borders; float32 arithmetic
      whose every output voxel depends only on its neighbourhood (slab-exact).
    * ``"tv"``: total-variation denoising (Chambolle 2004),
      :math:`\min_u \|u - g\|^2 / 2 + \lambda \,\mathrm{TV}(u)` with
      :math:`\lambda = \mathrm{strength}\,\hat\sigma`, isotropic in 3D (one process only: its
      iterations couple the whole image).
    * ``"none"``: the input, unchanged.

    Args:
        gray: 2D/3D gray image (finite values); with ``slabs``, this rank's layers of it.
        method: ``"nl_means"``, ``"tv"`` or ``"none"``.
        noise_sigma: noise standard deviation in gray units; default
            :func:`estimate_noise_sigma` of the image.
        strength: filter strength relative to the noise (``h`` or ``lambda`` above, / sigma).
        patch_size: non-local means patch width (voxels, odd).
        patch_distance: non-local means search radius (voxels).
        slabs: the layers each MPI rank holds (collective): every rank denoises its own layers
            with a halo of ``patch_size // 2 + patch_distance`` layers from its neighbours; the
            result equals the whole image's voxel for voxel.

    Returns:
        ``(denoised float64 array, info)`` with the method, the noise sigma used and whether it
        was estimated.
    """
    if method not in DENOISE_METHODS:
        raise UsageError(f"denoising method must be one of {', '.join(DENOISE_METHODS)}, got {method!r}")
    a = np.asarray(gray, dtype=np.float64)
    part = slabs if slabs is not None else Slabs.whole(a.shape[0] if a.ndim else 0)
    info: dict[str, Any] = {"method": method}
    if method == "none":
        return a, info
    if not (np.isfinite(strength) and strength > 0):
        raise UsageError(f"denoising strength must be positive, got {strength}")
    if patch_size < 1 or patch_distance < 1:
        raise UsageError(
            f"non-local means patch size and distance must be >= 1 voxel, got {patch_size}, {patch_distance}"
        )
    if method == "tv" and part.distributed:
        raise UsageError(
            "--denoise tv couples the whole image in its iterations and runs on one process only; "
            "use nl_means (slab-exact) on several MPI ranks"
        )
    estimated = noise_sigma is None
    sigma = estimate_noise_sigma(a, part) if noise_sigma is None else float(noise_sigma)
    if not (np.isfinite(sigma) and sigma >= 0):
        raise UsageError(f"noise sigma must be >= 0 gray units, got {sigma}")
    info.update({"noise_sigma": sigma, "noise_sigma_estimated": estimated, "strength": strength})
    if sigma == 0:
        return a, info
    if method == "nl_means":
        halo = int(patch_size) // 2 + int(patch_distance)
        window, lo = part.window(a, halo)
        if part.layers:
            hi = lo + window.shape[0]
            pad = [(halo - (part.z0 - lo), halo - (hi - part.z1))] + [(halo, halo)] * (a.ndim - 1)
            padded = np.pad(window.astype(np.float32), pad, mode="reflect")
            out = _nl_means_padded(
                padded, h=strength * sigma, sigma=sigma, patch_size=int(patch_size), patch_distance=int(patch_distance)
            )
        else:
            out = np.zeros(a.shape, dtype=np.float32)
        info.update({"patch_size": int(patch_size), "patch_distance": int(patch_distance)})
    else:
        from skimage import restoration

        out = restoration.denoise_tv_chambolle(a, weight=strength * sigma, channel_axis=None)
    logger.info("denoised (%s) with noise sigma %.4g (%s)", method, sigma, "estimated" if estimated else "given")
    return np.asarray(out, dtype=np.float64), info
