"""The detachment model: Maxwell ODE vs closed form, an independent time-stepping reference,
monotonicity, the kappa0 plateau, the disconnection statistics and the paper's numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.integrate import solve_ivp

from fem_anode.detachment import (
    ModelParameters,
    SizeDistribution,
    capacity_retention,
    default_radii,
    gap_statistics,
    gap_trajectories,
    ramp_compression,
    sample_gap_data,
    scenarios,
    simulate,
    time_to_tension,
)
from fem_anode.detachment.maxwell import maxwell_ode_rhs
from fem_anode.errors import InputError

PAPER = ModelParameters()  # alpha0 0.83, kappa0 0.02 um, delta0 0.12 um, zeta0 0.163 1/um
EXP = PAPER.linear_expansion


@pytest.mark.parametrize("alpha, x0, rate", [(0.83, 0.0, 1.0), (2.5, -0.3, -0.7), (0.05, 0.4, 0.2), (8.0, 1.0, -2.0)])
def test_ramp_closed_form_matches_maxwell_ode(alpha, x0, rate):
    tau = np.linspace(0, 1, 11)
    ode = solve_ivp(lambda t, x: [maxwell_ode_rhs(x[0], rate, alpha)], (0, 1), [x0], t_eval=tau, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(ramp_compression(x0, rate, alpha, tau), ode.y[0], rtol=1e-8, atol=1e-10)


def test_ramp_limits():
    # alpha -> 0: a pure spring follows the displacement; alpha -> inf: the damper relaxes the spring to rate/alpha.
    np.testing.assert_allclose(ramp_compression(0.3, 1.5, 0.0, 0.4), 0.3 + 1.5 * 0.4, rtol=1e-14)
    np.testing.assert_allclose(ramp_compression(0.3, 1.5, 1e-9, 0.4), 0.3 + 1.5 * 0.4, rtol=1e-8)
    np.testing.assert_allclose(ramp_compression(0.3, 1.5, 200.0, 1.0), 1.5 / 200.0, rtol=1e-10)


def test_time_to_tension_inverts_the_ramp():
    x0, shrink, alpha, kappa = (
        np.array([0.2, 0.0, -0.01]),
        np.array([1.0, 0.5, 0.3]),
        np.array([0.83, 0.0, 3.0]),
        np.array([0.02, 0.1, 0.05]),
    )
    tau = time_to_tension(x0, shrink, alpha, kappa)
    np.testing.assert_allclose(ramp_compression(x0, -shrink, alpha, tau), -kappa, atol=1e-12)
    # Creep relaxes the tension faster than the shrinkage builds it: never detaches.
    assert np.isinf(time_to_tension(0.0, 0.1, 2.0, 0.06))


def reference_gaps(r, alpha, kappa, delta, cycles, expansion, steps=20000):
    """Independent explicit time stepping of the contact/adhesion/Maxwell state machine."""
    grow = expansion * r
    dt = 1.0 / steps
    decay = math.exp(-alpha * dt)
    relax = (1.0 - decay) / alpha
    sei, rest, attached = 0.0, 0.0, True
    out = [0.0]
    for _ in range(cycles):
        for rate, sei_rate in ((grow + delta, delta), (-grow, 0.0)):
            u = sei + (grow if rate < 0 else 0.0)  # surface position at the start of the half-cycle
            for _ in range(steps):
                u_new = u + rate * dt
                if attached:
                    x = u - rest
                    # exact Maxwell step for a linear ramp (dx/dtau = rate - alpha x)
                    x_new = x * decay + rate * relax
                    rest = u_new - x_new
                    if x_new <= -kappa and rate < 0:
                        attached = False
                        rest = u_new + kappa
                elif u_new >= rest and rate > 0:
                    attached = True
                u = u_new
                sei += sei_rate * dt
        out.append(sei if attached else rest)
    return np.array(out)


@pytest.mark.parametrize("r_um", [0.05, 0.15, 0.4, 1.0, 2.5])
@pytest.mark.parametrize("alpha, kappa, delta", [(0.83, 0.02, 0.12), (0.3, 0.1, 0.05), (3.0, 0.0, 0.2)])
def test_gap_trajectories_match_time_stepping(r_um, alpha, kappa, delta):
    d = gap_trajectories(np.array([r_um]), alpha, kappa, delta, 6, EXP)[:, 0]
    ref = reference_gaps(r_um, alpha, kappa, delta, 6, EXP, steps=4000)
    np.testing.assert_allclose(d, ref, atol=2e-3 * max(1.0, r_um))


def test_first_cycle_gap_closed_form():
    # Large particle, x0 = 0: after lithiation x1 = (D + d)(1 - e^-a)/a; detachment at tau* where
    # x = -kappa; the gap is kappa + D (1 - tau*).
    a, k, dl, r = 0.83, 0.02, 0.12, 2.0
    D = EXP * r
    x1 = (D + dl) * (1 - np.exp(-a)) / a
    tau = np.log((a * x1 + D) / (D - a * k)) / a
    expected = dl + k + D * (1 - tau)  # wall position measured from the Si surface (SEI included)
    got = gap_trajectories(np.array([r]), a, k, dl, 1, EXP)[1, 0]
    assert got == pytest.approx(expected, rel=1e-12)


def test_gap_grows_with_radius_and_cycle_and_capacity_falls():
    result = simulate(PAPER.replace(cycles=10), np.geomspace(0.05e-6, 4e-6, 80))
    mean, det = result.gap_mean, result.gap_deterministic
    assert np.all(np.diff(det, axis=0) > 0), "deterministic gap must grow every cycle"
    assert np.all(np.diff(det[1:], axis=1) >= -1e-15), "gap must not shrink with radius"
    assert np.all(np.diff(mean[1:], axis=0) > 0)
    assert np.all(np.diff(mean[1:], axis=1) >= -1e-15)
    assert mean[10, -1] > 2 * mean[10, 0]  # large particles open much larger gaps
    cap = result.capacity_retention
    assert cap[0] == pytest.approx(1.0, abs=1e-12) and np.all(np.diff(cap) < 0)


def test_kappa0_plateau_for_small_particles():
    cycles, delta = 5, 0.1e-6
    radii = np.geomspace(0.01e-6, 3e-6, 300)
    for kappa in (0.02e-6, 0.05e-6, 0.1e-6):
        res = simulate(PAPER.replace(kappa0=kappa, delta0=delta, cycles=cycles), radii)
        r_c = res.detachment_radius()
        small = radii < r_c
        assert small.sum() > 5 and (~small).sum() > 5
        # Below r_c only the SEI separates Si and CBD: gap = n delta0 for every radius (flat).
        expected = np.broadcast_to((np.arange(cycles + 1) * delta)[:, None], res.gap_deterministic[:, small].shape)
        np.testing.assert_allclose(res.gap_deterministic[:, small], expected, rtol=1e-12)
        assert np.all(res.gap_deterministic[-1, ~small] > cycles * delta)
    # Without SEI the threshold is exactly proportional to kappa0 (all displacements scale with r).
    thresholds = [
        simulate(PAPER.replace(kappa0=k, delta0=0.0, cycles=3), radii).detachment_radius() for k in (0.02e-6, 0.04e-6)
    ]
    assert thresholds[1] / thresholds[0] == pytest.approx(2.0, rel=0.03)


def test_no_detachment_without_creep():
    # alpha0 -> 0: a purely elastic medium springs back; with SEI pushing outward it is never in tension.
    res = simulate(PAPER.replace(alpha0=1e-9, cycles=4), np.array([0.5e-6, 3e-6]))
    np.testing.assert_allclose(
        res.gap_deterministic, np.repeat((np.arange(5) * PAPER.delta0)[:, None], 2, axis=1), rtol=1e-6
    )


def test_gap_statistics_match_monte_carlo():
    p = PAPER.replace(cycles=10)
    rng = np.random.default_rng(3)
    dist = SizeDistribution(median_radius=1e-6, geometric_std=1.0001, min_radius=0.99e-6, max_radius=1.01e-6)
    sample = sample_gap_data(p, [10], 20000, rng, distribution=dist)
    d = gap_trajectories(np.array([1e-6]), p.alpha0, p.kappa0, p.delta0, 10, EXP)
    _, mean, std = gap_statistics(d, p.zeta0)
    assert std[10, 0] > 0.2e-6  # a real spread from the random number of active cycles
    # radii vary by 1 % in the sample: allow that plus 4 standard errors
    se = std[10, 0] / np.sqrt(20000)
    assert abs(sample.gap_m.mean() - mean[10, 0]) < 4 * se + 0.01 * mean[10, 0]
    assert sample.gap_m.std() == pytest.approx(std[10, 0], rel=0.05)


def test_capacity_is_volume_weighted_survival():
    r = np.array([0.2e-6, 2e-6])
    d = gap_trajectories(r, 0.83, 0.02e-6, 0.12e-6, 3, EXP)
    survival, _, _ = gap_statistics(d, 0.163e6)
    p = np.clip(0.163e6 * d, 0, 1)
    np.testing.assert_allclose(survival[3], np.prod(1 - p[1:4], axis=0), rtol=1e-12)
    cap = capacity_retention(survival, r)
    np.testing.assert_allclose(cap, (survival * r**3).sum(axis=1) / (r**3).sum(), rtol=1e-12)
    # counts act as number weights
    np.testing.assert_allclose(
        capacity_retention(survival, r, [2.0, 1.0]),
        (survival * [2, 1] * r**3).sum(axis=1) / (r**3 * [2, 1]).sum(),
        rtol=1e-12,
    )


def test_paper_discussion_numbers_with_default_distribution():
    """Discussion of Müller et al. (2018): ~20 % Si capacity after 10 cycles; all three improved -> almost 40 %."""
    runs = {name: simulate(p).capacity_retention[10] for name, p in scenarios(PAPER).items()}
    assert runs["fitted"] == pytest.approx(0.20, abs=0.02)
    assert runs["all three improved"] == pytest.approx(0.40, abs=0.03)
    # Fig. 4d: each single improvement helps; less SEI helps most, adhesion least.
    assert runs["delta0 -50%"] > runs["alpha0 -50%"] > runs["fitted"]
    assert runs["kappa0 +100%"] >= runs["fitted"]
    assert runs["kappa0 +100%"] - runs["fitted"] < runs["alpha0 -50%"] - runs["fitted"]


def test_paper_rate_conversions():
    # alpha0 0.83 per C/20 half-cycle <-> E/eta 0.04 1/h; delta0 0.12 um <-> 6 nm/h SEI growth.
    out = simulate(PAPER, [1e-6]).to_dict()["parameters_paper_units"]
    assert out["E_over_eta_per_h"] == pytest.approx(0.04, rel=0.03)
    assert out["sei_growth_nm_per_h"] == pytest.approx(6.0, rel=0.05)


def test_default_radii_follow_the_distribution():
    dist = SizeDistribution()
    r = default_radii(dist)
    assert r.size == dist.n_radii and np.all(np.diff(r) > 0)
    assert r.min() >= dist.min_radius and r.max() <= dist.max_radius
    assert np.median(r) == pytest.approx(dist.median_radius, rel=0.05)


@pytest.mark.parametrize("radii, text", [([], "no radii"), ([1e-6, -1e-6], "negative"), ([np.nan], "NaN")])
def test_simulate_rejects_bad_radii(radii, text):
    with pytest.raises(InputError, match=text):
        simulate(PAPER, radii)
