"""Shared helpers of the benchmarks and of the peer cross-validation test.

* the peers virtual environment (TauFactor, PoreSpy, scikit-fem on Python 3.11), made by
  ``benchmarks/setup_peers.sh`` and used through subprocesses on ``.npy``/``.npz`` files;
* machine load and memory-copy bandwidth, recorded next to every timing;
* results: each benchmark prints a table and appends a record to ``benchmarks/results/NAME.json``;
* seeded test volumes and Richardson extrapolation of voxel-refinement sequences.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
sys.stdout.reconfigure(line_buffering=True)  # tables appear as they are computed, also in logs
SETUP_PEERS = HERE / "setup_peers.sh"


def peers_venv() -> Path:
    """Folder of the peers venv (``FEM_ANODE_PEERS_VENV`` or ``benchmarks/.peers-venv``)."""
    return Path(os.environ.get("FEM_ANODE_PEERS_VENV", HERE / ".peers-venv"))


def peers_python(install: bool = False) -> tuple[Path | None, str]:
    """Python of the peers venv, or ``(None, reason)``; ``install`` runs setup_peers.sh first.

    Returns:
        ``(python, message)``: message says how long an install took, or why there is no venv.
    """
    python = peers_venv() / "bin" / "python"
    if install:
        start = time.perf_counter()
        proc = subprocess.run(["bash", str(SETUP_PEERS)], capture_output=True, text=True)
        if proc.returncode != 0:
            return None, f"setup_peers.sh failed: {proc.stderr.strip()[-500:]}"
        return python, f"peers venv ready after {time.perf_counter() - start:.0f} s ({proc.stdout.strip()})"
    if not python.exists():
        return None, f"peers venv {peers_venv()} not found: run benchmarks/setup_peers.sh (or set FEM_ANODE_PEERS=1)"
    check = subprocess.run(
        [str(python), "-c", "import taufactor, porespy, openpnm, skfem"], capture_output=True, text=True
    )
    if check.returncode != 0:
        return (
            None,
            f"peers venv {peers_venv()} is incomplete ({check.stderr.strip().splitlines()[-1:]}); rerun benchmarks/setup_peers.sh",
        )
    return python, "peers venv found"


def run_peer(python: Path, script: str, args: Sequence[str], timeout: float = 3600) -> Any:
    """Run ``benchmarks/SCRIPT`` in the peers venv; return its JSON stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_"))}
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [str(python), str(HERE / script), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{script} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load() -> list[float]:
    """1, 5 and 15 minute load averages (the machine is shared: note them with every timing)."""
    return [round(x, 2) for x in os.getloadavg()]


def copy_bandwidth(n_bytes: int = 400_000_000, repeats: int = 5) -> float:
    """Measured memory-copy bandwidth (bytes/s moved: read + write) of one core, best of ``repeats``."""
    src = np.ones(n_bytes // 8)
    dst = np.empty_like(src)
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None, title: str = "") -> None:
    """Print ``rows`` as an aligned text table."""
    if not rows:
        print(f"{title}: no rows")
        return
    columns = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def append_results(name: str, rows: list[dict[str, Any]], command: str, extra: dict[str, Any] | None = None) -> Path:
    """Append one run (rows plus machine info) to ``benchmarks/results/NAME.json``."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    runs.append(
        {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command,
            "host": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "load_start_end": extra.pop("load", None) if extra else None,
            },
            **(extra or {}),
            "rows": rows,
        }
    )
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(runs, indent=1, default=float) + "\n")
    tmp.replace(path)
    return path


def blob_volume(shape: tuple[int, int, int], sigma: float, fraction: float, seed: int) -> np.ndarray:
    """Seeded random two-phase volume: Gaussian-filtered noise thresholded at ``fraction`` (True phase)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return field < np.quantile(field, fraction)


def upsample(mask: np.ndarray, k: int) -> np.ndarray:
    """Each voxel split into k^3 (the same geometry, finer discretisation)."""
    return mask.repeat(k, 0).repeat(k, 1).repeat(k, 2)


def richardson(values: Sequence[float]) -> tuple[float, float]:
    """Extrapolate ``values`` at voxel sizes h = 1, 1/2, 1/3 to h -> 0 assuming ``t = t0 + C h^p``
    (the package's :func:`fem_anode.fem.tortuosity.richardson_limit`): ``(t0, p)``."""
    from fem_anode.fem.tortuosity import richardson_limit

    return richardson_limit(tuple(values))  # type: ignore[arg-type]
