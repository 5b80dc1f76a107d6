"""Benchmark 6: the compiled voxel kernels built for this processor against the portable build.

On the bundled 128^3 electrode (``solid`` transporting, P1 on the voxels: 996,509 rows, the
operator of ``fem-anode diffusion``'s default) the two fused CG passes of the grid stencil
(``cg_direction_backward`` then ``cg_forward_product``) are timed with the kernels compiled with
``-march=native`` (the default) and without (``FEM_ANODE_NATIVE=0``), alternately in one
process, so that the shared machine's drift hits both alike; the outputs are checked to be the
same bits. Prints medians and appends a record to ``benchmarks/results/kernels.json``.

    python benchmarks/bench_kernels.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="alternating repetitions (each 10 CG iterations)")
    args = parser.parse_args()
    from mpi4py import MPI

    from fem_anode.data import real_electrode
    from fem_anode.fem import voxel_sweeps
    from fem_anode.fem.diffusion.geometry import prepare_geometry
    from fem_anode.fem.diffusion.settings import DiffusionSettings
    from fem_anode.fem.diffusion.voxel_elements import VoxelP1Problem
    from fem_anode.fem.grid_stencil import GridStencilKernel
    from fem_anode.io.images import write_image

    comm = MPI.COMM_SELF
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_image(work / "electrode.npy", real_electrode())
        settings = DiffusionSettings.from_dict(
            {
                "geometry": {
                    "image": str(work / "electrode.npy"),
                    "transport_phase": "solid",
                    "pore_phase": "pore",
                    "pixel_size": 0.5e-6,
                    "phases": {"pore": 0, "solid": 128},
                },
                "output": {"fields": False, "figures": False},
            }
        )
        settings.check()
        problem = VoxelP1Problem(prepare_geometry(settings, None, work, comm).image, settings, comm)
        stencil = problem._stencil_solver()
        assert stencil is not None and isinstance(stencil.kernel, GridStencilKernel)
        stencil.prepare(1e3)
        reference = stencil.kernel
    libraries = {}
    for build, flag in (("native", "1"), ("portable", "0")):
        os.environ["FEM_ANODE_NATIVE"] = flag
        libraries[build] = voxel_sweeps._load_local()
    os.environ.pop("FEM_ANODE_NATIVE")
    rng = np.random.default_rng(0)
    n = reference.n
    r, p0, t0 = rng.standard_normal((3, n))
    d = reference.diagonal()
    mid = 1.0 - 2.0 / reference.omega
    times: dict[str, list[float]] = {build: [] for build in libraries}
    outputs = {}
    for _ in range(args.repeats):
        for build, library in libraries.items():
            reference.library = library  # the same stencil arrays, the other build's functions
            p, t, w = p0.copy(), t0.copy(), np.empty(n)
            start = time.perf_counter()
            for _ in range(10):
                reference.cg_direction_backward(r, d, 0.37, p, t)
                pw = reference.cg_forward_product(p, t, d, mid, w)
            times[build].append((time.perf_counter() - start) / 10)
            outputs[build] = (p, t, w, pw)
    same = all(np.array_equal(a, b) for a, b in zip(outputs["native"][:3], outputs["portable"][:3]))
    same = same and outputs["native"][3] == outputs["portable"][3]
    row = {
        "rows": n,
        "native_ms": 1e3 * statistics.median(times["native"]),
        "portable_ms": 1e3 * statistics.median(times["portable"]),
        "speedup": statistics.median(times["portable"]) / statistics.median(times["native"]),
        "same_bits": same,
        "repeats": args.repeats,
        "load": common.load(),
    }
    common.print_table([row], title="the two fused CG passes of the grid stencil (P1, 128^3 electrode), per iteration")
    common.append_results("kernels", [row], " ".join(["python", *sys.argv]))
    if not same:
        raise SystemExit("the native and the portable build gave different bits")


if __name__ == "__main__":
    main()
