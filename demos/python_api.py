# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # fem_anode from Python
#
# Everything the command line does, from a notebook: read a segmented image, measure it,
# solve Li diffusion in it and cycle a Si nanowire, with the results in memory and written
# only when asked. SI units throughout (m, s, mol/m^3). See `docs/api.md` for the reference.
#
# Run as a script (`python demos/python_api.py`, about 10 s; under MPI:
# `mpirun -n 2 python -m mpi4py demos/python_api.py`) or open it as a notebook with jupytext.

# %%
import tempfile
from pathlib import Path

import numpy as np
from mpi4py import MPI

import fem_anode as fa
from fem_anode.data import real_electrode
from fem_anode.imaging.synthetic import fib_sem_roi

comm = MPI.COMM_WORLD
root = comm.rank == 0
work = Path(comm.bcast(tempfile.mkdtemp(prefix="fem_anode_api_") if root else None, root=0))


def show(*args: object) -> None:
    """print on rank 0 only."""
    if root:
        print(*args)


# %% [markdown]
# ## 1. Images: a file with its voxel size and phase map
#
# The bundled real electrode volume (128^3 voxels, two phases, a nominal 0.5 um voxel), cropped
# to 64^3 and saved as a plain `.npy` without metadata, as a segmentation tool would leave it.
# `read_image` takes the voxel size (with units) and the phase map.

# %%
if root:
    np.save(work / "electrode.npy", real_electrode().array[:64, :64, :64])
comm.barrier()
img = fa.read_image(work / "electrode.npy", voxel_size="0.5um", phases="pore=0,solid=128")
show(img.shape, img.voxel_size, img.phases)

# %% [markdown]
# ## 2. Image metrics
#
# `compute_metrics` returns a `Metrics` object: the quantities as attributes, `to_dict()` (the
# layout of `metrics.json`), `plot()` and `save()`. The *geodesic* tortuosity (path length
# through the pores from the surface, an image measure) and the *tortuosity factor*
# eps D / D_eff (from a steady diffusion solve through the phase) are different quantities and
# have different names.

# %%
m = fa.compute_metrics(img, si_phase="solid", tortuosity_factor="pore", comm=comm)
show(m)
show("phase fractions:", {k: round(v, 4) for k, v in m.phase_fractions.items()})
show("pore surface area (m^2):", f"{m.pore_surface_area_m2:.4g}")
show("geodesic tortuosity, mean:", round(m.geodesic_tortuosity["mean"], 4))
show("tortuosity factor of the pores along z:", round(m.tortuosity_factor["pore"], 4))
figure = m.plot()

# %% [markdown]
# The tortuosity factor alone, with its solve details (every rank gets the same result):

# %%
tau = fa.tortuosity_factor(img, "pore", comm=comm)
show(f"tau = {tau.tau:.4f}, D_eff/D = {tau.relative_diffusivity:.4f}, {tau.iterations} CG iterations")
assert abs(tau.tau - m.tortuosity_factor["pore"]) <= 1e-9 * tau.tau

# %% [markdown]
# ## 3. Settings: objects or dicts, checked when made
#
# Every settings object is validated on construction, with the messages the TOML files get
# (and a hint for a misspelt key or choice). Sections can be given as objects or as dicts.

# %%
for attempt in (
    lambda: fa.DiffusionSettings(physics={"D": -3e-10}),
    lambda: fa.DiffusionSettings(solver={"type": "dirct"}),
    lambda: fa.DiffusionSettings(physics={"kf": 1e-3}),
):
    try:
        attempt()
    except fa.UsageError as err:
        show("UsageError:", err)

settings = fa.DiffusionSettings(
    time={"t_end": 10.0, "output_times": [0.01, 2.0, 10.0], "dt_initial": 1e-5},
    physics={"k_f": 1e-3},
)
assert fa.DiffusionSettings.from_dict(settings.to_dict()) == settings
show(settings.to_toml()[:200], "...")

# %% [markdown]
# ## 4. Li diffusion in a FIB-SEM region of interest, in memory
#
# A seeded synthetic 2D ROI (pores, Si, SEI/C/B at 40 nm pixels, as in the paper's Fig. 8),
# four regions from next to a pore (I) to deep in the SEI/C/B (IV). The model settings need no
# file: the image is passed in memory. The solve returns a `DiffusionRun`: t90 per region and
# for the whole domain, the mean c(t) per region, and c itself at the output times
# (distributed over the ranks, never gathered).

# %%
from fem_anode.fem.diffusion.run import suggest_regions  # noqa: E402

roi = fib_sem_roi(seed=0, pixel_size=40e-9)
settings = settings.replace(regions=suggest_regions(roi, settings))
res = fa.solve_diffusion(roi, settings, comm=comm)
show("t90 (s):", {k: None if v is None else round(v, 4) for k, v in res.t90.items()})
show("mean c at t_end (mol/m^3):", {k: round(float(v[-1]), 1) for k, v in res.region_means.items()})
c_final = res.concentration[10.0]  # a dolfinx Function (mol/m^3) on this rank's cells
show("unknowns per rank:", comm.allgather(c_final.x.array.size), "of", res.to_dict()["ndofs"])
assert res.t90["I"] < res.t90["IV"] and res.mass_balance_rel_error < 1e-6

# %% [markdown]
# `save` writes what `fem-anode diffusion --out DIR` writes: results.json, c.bp (VTX for
# ParaView), the mesh, figures and report.html.

# %%
out = res.save(work / "diffusion", render=False)
show(sorted(p.name for p in out.iterdir()))

# %% [markdown]
# ## 5. Phase field of a Si nanowire cross-section
#
# Two half-cycles (lithiation, delithiation) of a coarse 20 nm wire: the radius swells by about
# 1 + beta and returns. One record per half-cycle.

# %%
pf = fa.solve_phasefield(
    fa.PhaseFieldSettings(
        mesh={"size": 5e-9},
        material={"mobility_li": 10.0},
        cycling={"half_cycles": 2, "half_cycle_time": 0.05, "dt_initial": 0.002},
        output={"fields": False, "figures": False, "times": [0.004]},
    ),
    comm=comm,
)
radii = pf.series("outer_radius_m")
show("outer radius (nm):", [round(r * 1e9, 2) for r in radii], "ratio", round(radii[0] / radii[1], 3))

# %%
show("files in", work)
