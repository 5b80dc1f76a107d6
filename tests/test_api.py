"""The public Python API (``import fem_anode as fa``): the notebook workflow on small inputs, the
same results as the CLI on the same input, settings validated on construction with the TOML
path's messages, dict/object equivalence and TOML round trips. Runs serially and under
``mpirun -n 2``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest

import fem_anode as fa
from fem_anode.errors import InputError, UsageError
from fem_anode.fem.diffusion.settings import PhysicsSettings, Region, SolverSettings, TimeSettings
from fem_anode.fem.phasefield.settings import CyclingSettings

PHASES = "pore=0,si=1,sei=3"


def _volume() -> np.ndarray:
    """10 x 12 x 12 labels: a pore layer at the surface (z = 0) with pore channels into an SEI/C/B
    matrix, and a Si particle inside."""
    labels = np.full((10, 12, 12), 3, dtype=np.uint8)
    labels[:2] = 0
    labels[:, 2:4, 2:4] = 0  # straight channels through the whole depth
    labels[:7, 8:10, 6:9] = 0
    zz, yy, xx = np.mgrid[:10, :12, :12]
    labels[(zz - 6) ** 2 + (yy - 6) ** 2 + (xx - 5) ** 2 <= 4] = 1
    return labels


@pytest.fixture
def roi(shared_tmp_path, comm) -> Path:
    path = shared_tmp_path / "roi.npy"
    if comm.rank == 0:
        np.save(path, _volume())
    comm.barrier()
    return path


def _assert_close(actual, desired, where: str, rtol: float = 1e-10) -> None:
    """Nested dicts/lists equal, numbers to ``rtol`` (relative to the largest value of a list)."""
    if isinstance(desired, dict):
        assert isinstance(actual, dict) and set(actual) == set(desired), where
        for key in desired:
            _assert_close(actual[key], desired[key], f"{where}.{key}", rtol)
    elif isinstance(desired, list) and desired and all(isinstance(v, (int, float)) for v in desired):
        values = np.asarray(desired, dtype=float)
        np.testing.assert_allclose(actual, values, rtol=0, atol=rtol * np.abs(values).max(), err_msg=where)
    elif isinstance(desired, list):
        assert isinstance(actual, list) and len(actual) == len(desired), where
        for i, (a, d) in enumerate(zip(actual, desired)):
            _assert_close(a, d, f"{where}[{i}]", rtol)
    elif isinstance(desired, float):
        assert actual == pytest.approx(desired, rel=rtol), where
    else:
        assert actual == desired, where


DIFFUSION = {
    "time": {"t_end": 1.0, "output_times": [0.1, 1.0], "dt_initial": 1e-6},
    "regions": [{"name": "near", "box": [0.0, 0.0, 0.0, 240e-9, 240e-9, 60e-9]}],
}


# ----------------------------------------------------------------------- the workflow


def test_notebook_workflow_matches_the_cli(roi, shared_tmp_path, comm):
    """The issue's notebook snippet, then the CLI on the same input: the same numbers and files."""
    from fem_anode.cli import main

    img = fa.read_image(roi, voxel_size="20nm", phases=PHASES)
    assert img.voxel_size == pytest.approx((20e-9,) * 3) and img.phases == {"pore": 0, "si": 1, "sei": 3}

    m = fa.compute_metrics(img)
    assert isinstance(m, fa.Metrics)
    labels = _volume()
    for name, value in (("pore", 0), ("si", 1), ("sei", 3)):
        assert m.phase_fractions[name] == pytest.approx(np.mean(labels == value), rel=1e-12)
    # the straight channels reach every depth along a straight line: geodesic tortuosity 1 there
    assert m.geodesic_tortuosity["median"] == pytest.approx(1.0)
    assert m.geodesic_tortuosity is m.to_dict()["tortuosity"] and m.tortuosity_factor == {}
    rank, bounds = 0, [0, labels.shape[0]]
    if "layer_bounds" in m.fields:  # under MPI each rank holds its own layers
        from mpi4py import MPI

        rank, bounds = MPI.COMM_WORLD.rank, m.fields["layer_bounds"]
    assert m.fields["tortuosity"].shape == labels[bounds[rank] : bounds[rank + 1]].shape
    figure = m.plot()
    assert len(figure.axes) >= 4

    settings = fa.DiffusionSettings(**DIFFUSION)
    res = fa.solve_diffusion(img, settings, comm=comm)
    assert res.output_times == pytest.approx([0.0, 0.1, 1.0])
    assert set(res.t90) == {"near", "domain"}
    assert res.times[0] == 0.0 and res.times[-1] == pytest.approx(1.0)
    domain, c_bulk = res.domain_mean, settings.physics.c_bulk
    # 200 nm from the pores, the diffusion time is ~1e-4 s: saturated at t = 1 s; BDF2 may
    # overshoot c_bulk by round-off-sized amounts only
    assert domain[-1] == pytest.approx(c_bulk, rel=1e-6) and domain.max() <= c_bulk * (1 + 1e-4)
    assert 0 < res.t90["near"] < res.t90["domain"] < 1e-3  # next to the pores fills first
    assert res.mass_balance_rel_error < 1e-6
    # the fields at the output times, distributed: the global max over ranks is the reported one
    final = res.concentration[1.0].x.array
    from mpi4py import MPI

    top = comm.allreduce(float(final.max(initial=-np.inf)), op=MPI.MAX)
    assert top == pytest.approx(res.to_dict()["final_max_c"], rel=1e-12)
    i = int(np.searchsorted(res.times, res.t90["domain"]))  # t90: the domain mean first reaches 0.9 c_bulk
    assert domain[i - 1] < 0.9 * c_bulk <= domain[i] and np.all(domain[: i - 1] < 0.9 * c_bulk)

    out = res.save(shared_tmp_path / "api_out", render=False)
    config = shared_tmp_path / "run.toml"
    if comm.rank == 0:
        settings.replace(
            geometry=settings.geometry.replace(image=roi, pixel_size=20e-9, phases={"pore": 0, "si": 1, "sei": 3})
        ).to_toml(config)
    comm.barrier()
    cli_out = shared_tmp_path / "cli_out"
    assert main(["diffusion", str(config), "--out", str(cli_out), "--no-render", "-q"]) == 0
    api_json = json.loads((out / "results.json").read_text())
    cli_json = json.loads((cli_out / "results.json").read_text())
    for key in ("times", "regions", "domain_mean", "t90_s", "history", "ndofs", "ncells", "steps", "si_particles"):
        # the same path; several ranks' direct solves (MUMPS) differ between runs in the last bits
        _assert_close(api_json[key], cli_json[key], key)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in cli_out.iterdir())

    tau = fa.tortuosity_factor(img, "pore", comm=comm)
    assert tau.phase == "pore" and 1.0 <= tau.tau < 10.0 and tau.ranks == comm.size
    metrics_out = shared_tmp_path / "metrics_out"
    argv = ["metrics", str(roi), "--voxel-size", "20nm", "--phases", PHASES, "--tortuosity-factor", "pore"]
    assert main([*argv, "--out", str(metrics_out), "-q"]) == 0
    written = json.loads((metrics_out / "metrics.json").read_text())
    assert written["tortuosity_factor"]["pore"] == pytest.approx(tau.tau, rel=1e-12)
    api_metrics = json.loads(json.dumps(m.to_dict(), default=float))
    for key in ("phase_fractions", "per_slice", "si_particles", "pore_surface_area_m2", "connections_per_depth"):
        assert written[key] == api_metrics[key], key  # the same computation: the same numbers
    assert written["tortuosity"]["mean"] == pytest.approx(m.geodesic_tortuosity["mean"], rel=1e-12)
    again = fa.Metrics.from_json(metrics_out / "metrics.json")
    assert again.tortuosity_factor["pore"] == pytest.approx(tau.tau, rel=1e-12)
    assert again.tortuosity_factor_details["pore"].tau == pytest.approx(tau.tau, rel=1e-12)


def test_tortuosity_factor_of_straight_channels_is_one(shared_tmp_path, comm):
    """Straight pore columns along z: tau = eps D / D_eff = 1 exactly (finite volumes)."""
    labels = np.ones((8, 6, 6), dtype=np.uint8)
    labels[:, 1:3, 1:3] = 0
    labels[:, 4, 4] = 0
    image = fa.VoxelImage(labels, (1e-8, 1e-8, 2e-8), {"pore": 0, "si": 1})
    tau = fa.tortuosity_factor(image, "pore", comm=comm)
    assert tau.tau == pytest.approx(1.0, rel=1e-6)
    assert tau.volume_fraction == pytest.approx(5 / 36, rel=1e-12)
    m = fa.compute_metrics(image, tortuosity_factor=True, comm=comm)
    assert m.tortuosity_factor["pore"] == pytest.approx(1.0, rel=1e-6)
    blocked = labels.copy()
    blocked[4] = 1  # a solid layer: the pores no longer percolate along z
    none = fa.tortuosity_factor(fa.VoxelImage(blocked, (1e-8,) * 3, {"pore": 0, "si": 1}), "pore", comm=comm)
    assert math.isinf(none.tau) and none.relative_diffusivity == 0.0


def test_phasefield_in_memory(comm):
    """A short lithiation/delithiation without files: the radius swells by 1 + beta and returns."""
    text = Path(__file__).with_name("phasefield").joinpath("test_phasefield_cli.py").read_text()
    data = tomllib.loads(text.split('CONFIG = """')[1].split('"""')[0])
    data["output"].update(fields=False, figures=False)
    pf = fa.solve_phasefield(fa.PhaseFieldSettings(**data), comm=comm)
    assert pf.status == "completed" and pf.series("kind") == ["lithiation", "delithiation"]
    lithiated, delithiated = pf.series("outer_radius_m")
    assert lithiated / delithiated == pytest.approx(1 + data["material"]["beta"], rel=0.02)
    with pytest.raises(UsageError, match="no 'radius'"):
        pf.series("radius")


def test_solve_diffusion_input_errors(shared_tmp_path, comm):
    no_sei = fa.VoxelImage(np.array([[0, 1], [1, 1]], dtype=np.uint8), (1e-8, 1e-8), {"pore": 0, "si": 1})
    with pytest.raises(InputError, match="transport_phase 'sei' is not in the phase map"):
        fa.solve_diffusion(no_sei, comm=comm)
    with pytest.raises(UsageError, match="exactly one of 'image' or 'mesh'"):
        fa.solve_diffusion(None, fa.DiffusionSettings(), comm=comm)
    with pytest.raises(UsageError, match="must be a VoxelImage, ImageLayers, TaggedMesh or a path"):
        fa.solve_diffusion(np.zeros((4, 4)), comm=comm)
    with pytest.raises(InputError, match="image not found"):
        fa.solve_diffusion(shared_tmp_path / "missing.npy", comm=comm)
    settings = fa.DiffusionSettings()
    settings.physics.D = -3e-10  # changed after construction: checked again before any work
    with pytest.raises(UsageError, match=r"physics\.D must be positive"):
        fa.solve_diffusion(no_sei, settings, comm=comm)


# ------------------------------------------------------------------ settings (no solver)


def _toml_message(cls, text: str, tmp_path: Path) -> str:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        cls.from_toml(path)
    return str(info.value).removeprefix(f"{path}: ")


@pytest.mark.parametrize(
    ("build", "toml", "message"),
    [
        (lambda: PhysicsSettings(D=-3e-10), "[physics]\nD = -3e-10", r"^physics\.D must be positive, got -3e-10$"),
        (
            lambda: SolverSettings(type="dirct"),
            '[solver]\ntype = "dirct"',
            r"solver\.type must be one of .*, got 'dirct'; did you mean 'direct'\?$",
        ),
        (
            lambda: SolverSettings(typ="direct"),
            '[solver]\ntyp = "direct"',
            r"unknown setting 'solver\.typ'; did you mean 'type'\?",
        ),
        (lambda: fa.DiffusionSettings(physics={"kf": 1e-3}), "[physics]\nkf = 1e-3", r"did you mean 'k_f'\?"),
        (
            lambda: fa.DiffusionSettings(time={"t_end": "long"}),
            '[time]\nt_end = "long"',
            r"time\.t_end must be a number",
        ),
        (
            lambda: TimeSettings(t_end=1.0, output_times=[2.0, 10.0]),
            "[time]\nt_end = 1.0\noutput_times = [2.0, 10.0]",
            r"output_times \[2\.0, 10\.0\] lie beyond t_end",
        ),
        (
            lambda: fa.DiffusionSettings(physics={"k_f": 1e40}),
            "[physics]\nk_f = 1e40",
            r"physics\.k_f = 1e\+40 .* outside",
        ),
        (
            lambda: fa.PhaseFieldSettings(cycling={"half_cycle": 2}),
            "[cycling]\nhalf_cycle = 2",
            r"unknown setting 'cycling\.half_cycle'; did you mean 'half_cycles'\?",
        ),
        (
            lambda: CyclingSettings(half_cycles=0),
            "[cycling]\nhalf_cycles = 0",
            r"^cycling\.half_cycles must be positive",
        ),
    ],
)
def test_settings_validate_on_construction_like_toml(build, toml, message, tmp_path):
    with pytest.raises(UsageError, match=message) as info:
        build()
    cls = fa.PhaseFieldSettings if ("cycling" in toml) else fa.DiffusionSettings
    assert _toml_message(cls, toml, tmp_path) == str(info.value)


def test_dict_and_object_settings_are_equal_and_round_trip_toml(tmp_path):
    from_dicts = fa.DiffusionSettings(
        physics={"D": 1e-10, "k_f": 2e-3},
        time={"t_end": 2, "output_times": [1, 2]},  # integers become floats
        regions=[{"name": "I", "box": [0, 0, 1e-6, 1e-6]}],
        mesh={"method": "voxel", "discretisation": "fv"},
    )
    from_objects = fa.DiffusionSettings(
        physics=PhysicsSettings(D=1e-10, k_f=2e-3),
        time=TimeSettings(t_end=2.0, output_times=[1.0, 2.0]),
        regions=[Region(name="I", box=[0.0, 0.0, 1e-6, 1e-6])],
        mesh={"method": "voxel", "discretisation": "fv"},
    )
    assert from_dicts == from_objects and isinstance(from_dicts.time.t_end, float)
    assert fa.DiffusionSettings.from_dict(from_dicts.to_dict()) == from_objects
    from_objects.to_toml(tmp_path / "d.toml")
    assert fa.DiffusionSettings.from_toml(tmp_path / "d.toml") == from_dicts
    assert "[geometry]" in (tmp_path / "d.toml").read_text() and "\nimage =" not in (tmp_path / "d.toml").read_text()
    pf = fa.PhaseFieldSettings(cycling={"half_cycles": 2})
    assert pf == fa.PhaseFieldSettings(cycling=CyclingSettings(half_cycles=2))
    pf.to_toml(tmp_path / "p.toml")
    assert fa.PhaseFieldSettings.from_toml(tmp_path / "p.toml") == pf
    # a model needs no path; a run from files needs exactly one
    fa.DiffusionSettings().check()
    with pytest.raises(UsageError, match="exactly one of 'image' or 'mesh'"):
        fa.DiffusionSettings().check_source()
    with pytest.raises(UsageError, match="got both"):
        fa.DiffusionSettings(geometry={"image": "a.npy", "mesh": "b.msh"})


def test_defaults_listing_still_works(capsys):
    from fem_anode.cli import main

    assert main(["diffusion", "--defaults"]) == 0
    listing = capsys.readouterr().out
    assert "physics.D" in listing and "geometry.image" in listing and "m^2/s" in listing


def test_read_image_and_metrics_errors(tmp_path):
    with pytest.raises(InputError, match="image not found"):
        fa.read_image(tmp_path / "none.npy")
    np.save(tmp_path / "gray.npy", np.random.default_rng(0).random((6, 6)))
    gray = fa.read_image(tmp_path / "gray.npy", voxel_size=1e-8)  # no phase map: not checked as labels
    assert gray.phases is None and gray.voxel_size == (1e-8, 1e-8)
    with pytest.raises(UsageError, match="kind must be one of"):
        fa.read_image(tmp_path / "gray.npy", kind="label")
    image = fa.VoxelImage(_volume()[5], (1e-8, 1e-8), {"pore": 0, "si": 1, "sei": 3})
    with pytest.raises(UsageError, match="bins must be a positive integer"):
        fa.compute_metrics(image, bins=0)
    with pytest.raises(UsageError, match="tortuosity factor: graphite not in the phase map"):
        fa.compute_metrics(image, tortuosity_factor="graphite")
    with pytest.raises(UsageError, match="needs a 3D volume"):
        fa.tortuosity_factor(image, "pore")
    m = fa.compute_metrics(image, tortuosity_factor=True)  # 2D: said, not computed
    assert "tortuosity_factor" in m.not_applicable and m.pore_perimeter_m > 0
    with pytest.raises(InputError, match="metrics file not found"):
        fa.Metrics.from_json(tmp_path / "none.json")


@pytest.mark.skipif("OMPI_COMM_WORLD_SIZE" in os.environ, reason="spawns its own Python; run serially only")
def test_api_without_fenicsx_or_mpi(tmp_path):
    """Settings, images and metrics through ``import fem_anode`` where dolfinx, PETSc and MPI are absent."""
    script = textwrap.dedent(
        f"""
        import sys, importlib.abc
        import numpy as np
        BLOCKED = {{"dolfinx", "gmsh", "ufl", "basix", "ffcx", "petsc4py", "mpi4py", "pyvista", "vtk"}}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(name + " blocked for this test")
        sys.meta_path.insert(0, Block())
        import fem_anode as fa
        s = fa.DiffusionSettings(time={{"t_end": 1.0, "output_times": [1.0]}})
        p = fa.PhaseFieldSettings(cycling={{"half_cycles": 2}})
        labels = np.zeros((4, 6, 6), dtype=np.uint8); labels[:, :3] = 1
        np.save({str(tmp_path / "v.npy")!r}, labels)
        img = fa.read_image({str(tmp_path / "v.npy")!r}, voxel_size="20nm", phases="pore=0,si=1")
        m = fa.compute_metrics(img)
        assert abs(m.phase_fractions["pore"] - 0.5) < 1e-12, m.phase_fractions
        m.save({str(tmp_path / "out")!r}, render=False)
        try:
            fa.solve_diffusion(img, s)
        except fa.UsageError as err:
            assert "needs FEniCSx" in str(err), err
        bad = [name for name in sys.modules if name.split(".")[0] in BLOCKED]
        assert not bad, bad
        print("OK")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "MPLBACKEND": "Agg"}
    )
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and (tmp_path / "out" / "metrics.json").is_file()


def test_python_api_demo_runs(comm):
    """demos/python_api.py as a script (it asserts its own numbers: tau from both calls, t90 I < IV)."""
    import runpy
    import shutil

    demo = Path(__file__).resolve().parents[1] / "demos" / "python_api.py"
    namespace = runpy.run_path(str(demo), run_name="__main__")
    res, pf = namespace["res"], namespace["pf"]
    assert res.status == "completed" and res.t90["I"] < res.t90["IV"]
    ratio = pf.series("outer_radius_m")[0] / pf.series("outer_radius_m")[1]
    assert ratio == pytest.approx(1.5874, rel=0.02)  # 1 + beta of the default material
    comm.barrier()
    if comm.rank == 0:
        assert (namespace["work"] / "diffusion" / "results.json").is_file()
        shutil.rmtree(namespace["work"])


def _strip() -> fa.VoxelImage:
    """A 2D strip: pores along the left edge (x = 0), SEI/C/B to the right, a Si disc inside."""
    labels = np.full((16, 24), 3, dtype=np.uint8)
    labels[:, :3] = 0
    yy, xx = np.mgrid[:16, :24]
    labels[(yy - 8) ** 2 + (xx - 16) ** 2 <= 9] = 1
    return fa.VoxelImage(labels, (20e-9, 20e-9), {"pore": 0, "si": 1, "sei": 3})


STRIP_TIME = {"t_end": 2e-3, "output_times": [1e-4, 2e-3], "dt_initial": 1e-7}


def test_other_discretisations_in_memory_and_saved(shared_tmp_path, comm):
    """The same strip by finite volumes and on a smooth (gmsh) P2 mesh: in memory, then the
    CLI's files; the three discretisations agree on t90 of the domain to 1 %."""
    voxel = fa.solve_diffusion(_strip(), {"time": STRIP_TIME}, comm=comm)
    # finite volumes against P1 on the strip with its Si turned into SEI (no Si sink)
    no_si = fa.VoxelImage(np.where(_strip().array == 1, 3, _strip().array), (20e-9, 20e-9), {"pore": 0, "sei": 3})
    fv = fa.solve_diffusion(no_si, {"time": STRIP_TIME, "mesh": {"discretisation": "fv"}}, comm=comm)
    fe_no_si = fa.solve_diffusion(no_si, {"time": STRIP_TIME, "output": {"fields": False}}, comm=comm)
    assert fe_no_si.concentration == {}  # fields not written are not kept either
    smooth = fa.solve_diffusion(
        _strip(),
        {"time": STRIP_TIME, "mesh": {"method": "smooth", "order": 2}, "output": {"figures": False}},
        comm=comm,
    )
    reference = voxel.t90["domain"]
    assert reference is not None and 0 < reference < 2e-3
    assert fv.t90["domain"] == pytest.approx(fe_no_si.t90["domain"], rel=0.01)
    assert smooth.t90["domain"] == pytest.approx(reference, rel=0.01)
    assert fv.to_dict()["ncells"] == int(np.count_nonzero(no_si.array == 3))  # one unknown per voxel
    fv_out = fv.save(shared_tmp_path / "fv", render=False)
    smooth_out = smooth.save(shared_tmp_path / "smooth", render=False)
    assert (fv_out / "c.pvd").is_file() and (fv_out / "c_2.vti").is_file()  # t = 0 and two output times
    assert (smooth_out / "mesh.msh").is_file() and (smooth_out / "c.bp").is_dir()
    assert not (smooth_out / "c_fields.png").exists()  # [output] figures = false
    # the mesh file saved is one the solver can read again: a .msh path is a geometry too
    again = fa.solve_diffusion(smooth_out / "mesh.msh", {"time": STRIP_TIME, "mesh": {"order": 2}}, comm=comm)
    assert again.t90["domain"] == pytest.approx(smooth.t90["domain"], rel=1e-8)


def test_a_failed_solve_raises_with_the_partial_run(shared_tmp_path, comm):
    """CG limited to one iteration and no retries: SolverError, with the partial run attached
    (saved, its results.json says failed)."""
    settings = {
        "time": STRIP_TIME,
        "solver": {
            "type": "iterative",
            "preconditioner": "ssor",
            "max_retries": 0,
            "petsc_options": {"ksp_max_it": "1"},
        },
    }
    with pytest.raises(fa.SolverError) as info:
        fa.solve_diffusion(_strip(), settings, comm=comm)
    run = info.value.run
    assert run.status == "failed" and run.to_dict()["failure"] is not None
    out = run.save(shared_tmp_path / "failed", render=False)
    assert json.loads((out / "results.json").read_text())["status"] == "failed"


def test_memory_check_is_an_argument(monkeypatch, comm):
    """With 1 kB available the solves are refused before any work; memory_check=False (the CLI's
    --no-memory-check) passes the choice down instead of an environment variable."""
    monkeypatch.setenv("FEM_ANODE_MEMORY_LIMIT", "1kB")
    with pytest.raises(InputError, match="memory"):
        fa.solve_diffusion(_strip(), {"time": STRIP_TIME}, comm=comm)
    with pytest.raises(InputError, match="memory"):
        fa.compute_metrics(_strip())
    run = fa.solve_diffusion(_strip(), {"time": STRIP_TIME}, comm=comm, memory_check=False)
    assert run.status == "completed"
    assert fa.compute_metrics(_strip(), memory_check=False).phase_fractions["pore"] == pytest.approx(3 / 24)
