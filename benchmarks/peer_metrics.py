"""PoreSpy's equivalents of fem_anode's image metrics, timed (run in the peers venv).

Usage::

    .peers-venv/bin/python peer_metrics.py LABELS.npy --pore 0 --si 1 [--voxel-size 2e-8] [--skip regionprops]

Prints one JSON object: metric -> {"time_s": ..., "value": ...} for phase fractions
(``porespy.metrics.phase_fraction``), per-slice pore fraction (``porosity_profile``), pore
surface area (``porespy.tools.mesh_region`` + ``porespy.metrics.mesh_surface_area``: marching
cubes) and Si particle properties (``scipy.ndimage.label`` + ``porespy.metrics.regionprops_3D``),
plus the peak memory (MB) of the process.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
import warnings

import numpy as np


def main() -> None:
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    import porespy as ps
    from scipy import ndimage

    parser = argparse.ArgumentParser()
    parser.add_argument("labels")
    parser.add_argument("--pore", type=int, default=0)
    parser.add_argument("--si", type=int, default=1)
    parser.add_argument("--voxel-size", type=float, default=1.0)
    parser.add_argument("--skip", default="")
    args = parser.parse_args()
    skip = set(args.skip.split(","))
    labels = np.load(args.labels)
    pore = labels == args.pore
    out = {}

    def timed(name, func):
        if name in skip:
            return
        t = time.perf_counter()
        value = func()
        out[name] = {"time_s": time.perf_counter() - t, "value": value}

    timed("phase_fractions", lambda: {str(k): float(v) for k, v in ps.metrics.phase_fraction(labels).items()})
    timed("per_slice", lambda: float(np.mean(ps.metrics.porosity_profile(pore, axis=0).porosity)))

    def area():
        mesh = ps.tools.mesh_region(pore)
        return float(ps.metrics.mesh_surface_area(mesh)) * args.voxel_size**2

    timed("pore_surface_area_m2", area)

    def regions():
        si_labels, n = ndimage.label(labels == args.si)
        props = ps.metrics.regionprops_3D(si_labels)
        return {"count": int(n), "mean_volume_voxels": float(np.mean([p.volume for p in props])) if props else 0.0}

    timed("si_particles", regions)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # ru_maxrss survives execve on Linux (it can be the benchmark's memory at the fork): VmHWM is
    # this process's own peak.
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                out["peak_rss_mb"] = int(line.split()[1]) / 1024
    print(json.dumps(out))


if __name__ == "__main__":
    main()
