"""The mesh-convergence study of the void story on a small case. Every void
metric of every half-cycle is reported with an observed order where the three levels converge
monotonically, and without one (no invented order or limit) where they do not."""

from __future__ import annotations

import math

import pytest

dolfinx = pytest.importorskip("dolfinx")

from fem_anode.fem.convergence import format_table, richardson, run_phasefield_study  # noqa: E402
from fem_anode.fem.phasefield.settings import (
    CyclingSettings,
    GeometrySettings,
    MeshSettings,
    OutputSettings,
    PhaseFieldSettings,
)  # noqa: E402

VOID_METRICS = (
    "void_fraction",
    "electrolyte_fraction",
    "sei_penetration_depth_m",
    "core_connectivity",
    "new_void_fraction",
)


def test_void_metrics_get_an_order_or_are_reported_as_not_converging(shared_tmp_path, comm):
    settings = PhaseFieldSettings(
        geometry=GeometrySettings(radius=10e-9),
        mesh=MeshSettings(size=4e-9),
        cycling=CyclingSettings(half_cycles=2, half_cycle_time=0.5),
        output=OutputSettings(times=[]),
    )
    report = run_phasefield_study(settings, levels=3, workdir=shared_tmp_path, comm=comm)
    quantities = next(iter(report["orders"].values()))["quantities"]
    for name in VOID_METRICS:
        record = quantities[f"{name}[half-cycle 2]"]
        assert len(record["values"]) == 3, name
        assert record == pytest.approx({**record, **richardson(record["h"], record["values"])}, nan_ok=True)
        if record["converging"] == "monotone":
            assert record["observed_order"] > 0 and math.isfinite(record["extrapolated"]), name
        elif record["converging"] != "exact":  # oscillatory or diverging: said so, no order, no limit
            assert math.isnan(record["observed_order"]) and math.isnan(record["extrapolated"]), name
    assert quantities["void_fraction[half-cycle 2]"]["values"][-1] > 0  # voids formed on the delithiation
    # the log table: each void metric with its three values and its behaviour (order or not)
    table = format_table(report)
    for name in VOID_METRICS:
        record = quantities[f"{name}[half-cycle 2]"]
        label = f"{name}[half-cycle 2]"
        row = next(line.strip() for line in table.splitlines() if line.strip().startswith(label + " "))
        assert row[len(label) :].split()[:3] == [f"{v:.5g}" for v in record["values"]], row
        assert row.split()[-1] == record["converging"], row
