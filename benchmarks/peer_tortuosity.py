"""Tortuosity factors of binary volumes by the peers TauFactor and PoreSpy (run in the peers venv).

Runs in ``benchmarks/.peers-venv`` (Python 3.11 with taufactor, porespy; see setup_peers.sh),
never imports fem_anode. Usage::

    .peers-venv/bin/python peer_tortuosity.py VOLUME.npy [...] [--conv-crit 1e-4] [--no-porespy] [--spacing 1.5,1,0.8]

Each VOLUME.npy is a boolean (z, y, x) array, True = the phase; the transport axis is 0. Prints
one JSON object: {path: {"taufactor": {...}, "porespy": {...}}} with tau, relative diffusivity
(D_eff / D), volume fractions and wall times (s). TauFactor's tau uses the whole phase fraction;
PoreSpy's the fraction left after trimming non-percolating voxels.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import time
import warnings

import numpy as np


def run_taufactor(
    mask: np.ndarray, conv_crit: float, iter_limit: int, spacing: tuple[float, ...] | None = None
) -> dict:
    import taufactor
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if spacing is None:
            solver = taufactor.Solver(mask.astype(np.uint8), device="cpu")
        else:  # TauFactor's (x, y, z) are our array axes (0, 1, 2); axis 0 is the transport axis
            solver = taufactor.AnisotropicSolver(
                mask.astype(np.uint8), spacing=tuple(spacing), device=torch.device("cpu")
            )
        solver.solve(verbose=False, conv_crit=conv_crit, iter_limit=iter_limit)
    tau = float(np.asarray(solver.tau).ravel()[0])
    return {
        "tau": tau if tau > 0 and np.isfinite(tau) else None,
        "relative_diffusivity": float(np.asarray(solver.D_rel).ravel()[0]),
        "volume_fraction": float(np.asarray(solver.VF).ravel()[0]),
        "iterations": int(solver.iter),
        "converged": bool(solver.converged),
        "time_s": time.perf_counter() - start,
    }


def run_porespy(mask: np.ndarray) -> dict:
    logging.disable(logging.WARNING)
    import porespy

    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = porespy.simulations.tortuosity_fd(mask, axis=0)
    except Exception as err:  # PoreSpy raises plain Exception when nothing percolates
        return {"tau": None, "error": str(err), "time_s": time.perf_counter() - start}
    return {
        "tau": float(result.tortuosity),
        "relative_diffusivity": float(1.0 / result.formation_factor),
        "effective_porosity": float(result.effective_porosity),
        "volume_fraction": float(result.original_porosity),
        "converged": bool(getattr(result, "converged", True)),
        "time_s": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("volumes", nargs="+")
    parser.add_argument("--conv-crit", type=float, default=1e-4, help="TauFactor flux-uniformity criterion")
    parser.add_argument("--iter-limit", type=int, default=200_000)
    parser.add_argument("--no-porespy", action="store_true")
    parser.add_argument("--spacing", default=None, help="voxel size per array axis (TauFactor's AnisotropicSolver)")
    parser.add_argument("--no-taufactor", action="store_true")
    args = parser.parse_args()
    out = {}
    for path in args.volumes:
        mask = np.load(path).astype(bool)
        entry = {}
        if not args.no_taufactor:
            spacing = tuple(float(v) for v in args.spacing.split(",")) if args.spacing else None
            entry["taufactor"] = run_taufactor(mask, args.conv_crit, args.iter_limit, spacing)
        if not args.no_porespy:
            entry["porespy"] = run_porespy(mask)
        out[path] = entry
    print(json.dumps(out))


if __name__ == "__main__":
    main()
