"""Settings of the detachment model, its default particle-size distribution and its fit.

One validated object, :class:`DetachmentSettings`, drives the CLI, the demo and the tests. Units
are SI: ``kappa0`` and ``delta0`` in metres, ``zeta0`` in 1/m (the paper quotes um and 1/um:
``kappa0 = 0.02 um = 2e-8 m``, ``zeta0 = 0.163 1/um = 1.63e5 1/m``). ``alpha0`` is dimensionless
(E/eta times the duration of one lithiation half-cycle).
"""

from __future__ import annotations

from dataclasses import dataclass

from fem_anode.errors import UsageError
from fem_anode.settings import Section, Settings, section, setting

__all__ = [
    "ModelParameters",
    "SizeDistribution",
    "FitSettings",
    "DetachmentSettings",
    "PAPER_PARAMETERS",
    "PARAMETER_NAMES",
]

#: Names of the four fitted parameters, in the order used by arrays in this package.
PARAMETER_NAMES: tuple[str, ...] = ("alpha0", "kappa0", "delta0", "zeta0")


@dataclass
class ModelParameters(Section):
    """Maxwell-material detachment model (Müller et al. 2018, Fig. 4b/c)."""

    alpha0: float = setting(
        0.83, "E/eta times the lithiation half-cycle duration (creep per half-cycle)", positive=True
    )
    kappa0: float = setting(
        2e-8, "adhesion length: critical tensile spring elongation before detachment", unit="m", nonnegative=True
    )
    delta0: float = setting(1.2e-7, "SEI thickness grown per lithiation", unit="m", nonnegative=True)
    zeta0: float = setting(
        1.63e5, "slope of the per-cycle disconnection probability p(d) = zeta0 * d", unit="1/m", nonnegative=True
    )
    cycles: int = setting(10, "number of (de)lithiation cycles to simulate", bounds=(1, 10_000))
    si_volume_change: float = setting(
        2.8,
        "relative volume increase of Si on full lithiation (2.8 = +280 %, as quoted in the paper)",
        bounds=(0.0, 10.0),
    )
    half_cycle_hours: float = setting(
        20.75,
        "duration of one lithiation half-cycle (C/20), only to convert alpha0 and delta0 to rates",
        unit="h",
        positive=True,
    )

    @property
    def linear_expansion(self) -> float:
        """Radial strain of a fully lithiated particle, ``(1 + dV/V)^(1/3) - 1``."""
        return (1.0 + self.si_volume_change) ** (1.0 / 3.0) - 1.0

    def values(self) -> tuple[float, float, float, float]:
        """``(alpha0, kappa0 [m], delta0 [m], zeta0 [1/m])``."""
        return (self.alpha0, self.kappa0, self.delta0, self.zeta0)


@dataclass
class SizeDistribution(Section):
    """Default Si particle-size distribution (log-normal in number, truncated), radii in metres.

    The paper's text gives no size distribution; the default (median 0.5 um, geometric standard
    deviation 1.5, kept between 0.1 and 4 um) describes sub-micrometre to few-micrometre SiOx
    particles and is chosen so that the paper's fitted parameters give its ~20 % Si capacity
    after 10 cycles (one number calibrated; the rest are predictions). See docs/detachment.md.
    """

    median_radius: float = setting(0.5e-6, "median particle radius (by number)", unit="m", positive=True)
    geometric_std: float = setting(1.5, "geometric standard deviation of the log-normal", bounds=(1.0, 10.0))
    min_radius: float = setting(0.1e-6, "smallest radius kept", unit="m", positive=True)
    max_radius: float = setting(4.0e-6, "largest radius kept", unit="m", positive=True)
    n_radii: int = setting(200, "number of quantile radii representing the distribution", bounds=(1, 100_000))

    def validate(self) -> None:
        if not self.min_radius < self.max_radius:
            raise UsageError(
                f"distribution.min_radius ({self.min_radius}) must be below max_radius ({self.max_radius})"
            )


@dataclass
class FitSettings(Section):
    """Least-squares fit and bootstrap."""

    n_bootstrap: int = setting(200, "bootstrap replicates (particles resampled with replacement)", bounds=(0, 100_000))
    confidence: float = setting(
        0.68, "central probability of the bootstrap ranges (0.68 as in the paper)", bounds=(0.01, 0.999)
    )
    seed: int = setting(0, "seed of the bootstrap resampling", nonnegative=True)
    gap_scale: float = setting(
        1e-7, "scale of the gap residuals (mean squared gap error is divided by its square)", unit="m", positive=True
    )
    capacity_scale: float = setting(0.02, "scale of the capacity-retention residuals", positive=True)
    capacity_weight: float = setting(1.0, "relative weight of the capacity term (0 fits gaps only)", nonnegative=True)
    max_iterations: int = setting(80, "Levenberg-Marquardt iterations per fit", bounds=(1, 10_000))
    radius_grid: int = setting(
        64, "radii (log-spaced) at which the model is evaluated and interpolated", bounds=(8, 10_000)
    )
    alpha0_bounds: list[float] = setting([0.01, 20.0], "search range of alpha0", positive=True)
    kappa0_bounds: list[float] = setting([0.0, 2e-6], "search range of kappa0", unit="m", nonnegative=True)
    delta0_bounds: list[float] = setting([0.0, 2e-6], "search range of delta0", unit="m", nonnegative=True)
    zeta0_bounds: list[float] = setting([0.0, 5e6], "search range of zeta0", unit="1/m", nonnegative=True)

    def validate(self) -> None:
        for name in PARAMETER_NAMES:
            low_high = getattr(self, f"{name}_bounds")
            if len(low_high) != 2 or not low_high[0] < low_high[1]:
                raise UsageError(f"fit.{name}_bounds must be [low, high] with low < high, got {low_high}")

    def bounds(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(lows, highs)`` in :data:`PARAMETER_NAMES` order, SI units."""
        pairs = [getattr(self, f"{name}_bounds") for name in PARAMETER_NAMES]
        return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)


@dataclass
class DetachmentSettings(Settings):
    """Everything the detachment model, its simulation and its fit need."""

    model: ModelParameters = section(ModelParameters)
    distribution: SizeDistribution = section(SizeDistribution)
    fit: FitSettings = section(FitSettings)


#: The paper's fitted values (SI units) with its asymmetric ranges ``(value, minus, plus)``.
PAPER_PARAMETERS: dict[str, tuple[float, float, float]] = {
    "alpha0": (0.83, 0.09, 0.23),
    "kappa0": (0.02e-6, 0.02e-6, 0.03e-6),
    "delta0": (0.12e-6, 0.05e-6, 0.02e-6),
    "zeta0": (0.163e6, 0.005e6, 0.006e6),
}
