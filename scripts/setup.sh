#!/usr/bin/env bash
# Set up everything fem_anode needs on a fresh Debian/Ubuntu machine, idempotently.
#
#   1. FEniCSx 0.9 stack from Debian trixie packages (installed only when missing; needs root
#      or sudo). On bookworm the trixie suite is added with a low pin priority so nothing else
#      comes from it unless asked for.
#      OpenBLAS (serial: no threads competing with MPI ranks) replaces the reference BLAS that
#      CHOLMOD, MUMPS and NumPy otherwise get: sparse Cholesky/LU factorisations 2-2.5x faster.
#   2. A virtual environment (.venv by default) made from /usr/bin/python3 with
#      --system-site-packages, so Debian's dolfinx/petsc4py/VTK stay visible.
#   3. fem_anode installed editable with --no-deps (pip must not pull a PyPI vtk/numpy that
#      would shadow Debian's).
#   4. The lint tools of `make lint`: mypy from Debian (python3-mypy, in the list below) and ruff,
#      pinned, from PyPI into the venv (Debian trixie has no ruff package). Without network the
#      setup goes on and `make lint` says ruff is missing.
#
# Re-running is fast (a few seconds) when everything is in place.
# Environment: FEM_ANODE_VENV (venv path), FEM_ANODE_SKIP_APT=1 (never call apt).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FEM_ANODE_VENV:-$here/.venv}"
py=/usr/bin/python3

log() { printf '[setup] %s\n' "$*" >&2; }

# Debian packages (trixie names). Python modules FEniCSx, meshing, imaging and tests need;
# gcc compiles dolfinx's forms and fem_anode's voxel sweep kernels (dolfinx pulls it in anyway).
apt_packages=(
  python3-dolfinx-real python3-dolfinx python3-gmsh python3-vtk9 python3-pyvista
  python3-skimage python3-meshio python3-scipy python3-matplotlib python3-pytest
  python3-tifffile python3-imageio python3-hypothesis python3-adios4dolfinx
  python3-setuptools python3-wheel python3-venv python3.13-venv python3-pip
  openmpi-bin xvfb xauth libopenblas0-serial
  python3-sklearn python3-scifem chromium
  python3-mypy
  gcc
)

# The ruff version `make lint` runs (pyproject.toml [project.optional-dependencies] lint pins the same).
ruff_version=0.17.6

# Packages of the list above that are not installed (a machine set up by an older checkout
# has the stack but not the packages added since).
missing_packages() {
  local p
  for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || printf '%s ' "$p"
  done
}

stack_ok() {
  [ -x "$py" ] && "$py" - <<'PY' 2>/dev/null
import sys
import dolfinx, gmsh, meshio, skimage, scipy, tifffile, imageio, matplotlib, mpi4py, petsc4py, adios4dolfinx  # noqa: F401
major, minor = (int(x) for x in dolfinx.__version__.split(".")[:2])
sys.exit(0 if (major, minor) == (0, 9) and sys.version_info >= (3, 11) else 1)
PY
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else log "need root (or sudo) to install Debian packages: $*"; exit 1; fi
}

install_stack() {
  if [ "${FEM_ANODE_SKIP_APT:-0}" = 1 ]; then
    log "FEniCSx 0.9 stack missing and FEM_ANODE_SKIP_APT=1: install it yourself (see README)"; exit 1
  fi
  . /etc/os-release
  local target=()
  if [ "${VERSION_CODENAME:-}" = bookworm ]; then
    log "Debian bookworm: adding the trixie suite with pin priority 100"
    as_root tee /etc/apt/sources.list.d/trixie.sources >/dev/null <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    as_root tee /etc/apt/preferences.d/trixie-pin >/dev/null <<'PIN'
Package: *
Pin: release n=trixie
Pin-Priority: 100
PIN
  fi
  # A bookworm system that installed the stack once reads "trixie" in /etc/os-release (its base
  # packages came from trixie) but keeps the pin: trixie must still be the target release.
  if [ -f /etc/apt/preferences.d/trixie-pin ]; then target=(-t trixie); fi
  log "installing the FEniCSx stack from Debian packages (about 2 minutes)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${target[@]}" \
    --no-install-recommends "${apt_packages[@]}" >/dev/null
}

missing="$(missing_packages)"
if stack_ok && [ -z "$missing" ]; then
  log "FEniCSx stack present"
elif stack_ok && [ "${FEM_ANODE_SKIP_APT:-0}" = 1 ]; then
  log "FEniCSx stack present; FEM_ANODE_SKIP_APT=1, so not installing: $missing"
else
  [ -n "$missing" ] && log "Debian packages to install: $missing"
  install_stack
  stack_ok || { log "FEniCSx 0.9 stack still not importable from $py after install"; exit 1; }
fi

# A stack installed earlier (or by hand) may still use the reference BLAS: add OpenBLAS, which
# only speeds things up, and go on without it where apt is not available.
if ! dpkg-query -W -f='${Status}' libopenblas0-serial 2>/dev/null | grep -q "install ok installed"; then
  if [ "${FEM_ANODE_SKIP_APT:-0}" != 1 ] && { [ "$(id -u)" -eq 0 ] || command -v sudo >/dev/null 2>&1; }; then
    log "installing OpenBLAS (libopenblas0-serial): 2x faster sparse factorisations"
    as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends libopenblas0-serial >/dev/null \
      || log "could not install libopenblas0-serial; continuing with the reference BLAS (slower)"
  else
    log "libopenblas0-serial is not installed: sparse factorisations use the reference BLAS (about 2x slower)"
  fi
fi

# The venv is rebuilt when missing or when it was made from another interpreter.
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import dolfinx" 2>/dev/null; then
  log "creating virtual environment $venv (system site packages)"
  rm -rf "$venv"
  "$py" -m venv --system-site-packages "$venv"
fi

# Editable install, only when pyproject.toml changed since the last one.
stamp="$venv/.fem_anode-installed"
digest="$(sha256sum "$here/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ] || ! "$venv/bin/python" -c "import fem_anode" 2>/dev/null; then
  log "installing fem_anode (editable, --no-deps)"
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$here"
  echo "$digest" > "$stamp"
fi
"$venv/bin/python" -c "import fem_anode" || { log "fem_anode does not import from $venv"; exit 1; }

if [ "$("$venv/bin/ruff" --version 2>/dev/null)" != "ruff $ruff_version" ]; then
  log "installing ruff $ruff_version (PyPI) into $venv for make lint"
  "$venv/bin/python" -m pip install -q "ruff==$ruff_version" \
    || log "could not install ruff $ruff_version from PyPI: make lint will fail until it is installed"
fi
log "ready: $venv/bin/fem-anode"
