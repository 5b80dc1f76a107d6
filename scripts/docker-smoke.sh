#!/usr/bin/env bash
# Build docker/Dockerfile and smoke-test the image without a Docker engine or a registry:
#
#   1. podman, buildah, runc and mmdebstrap (Debian packages) are installed when missing
#      (needs root or sudo; FEM_ANODE_SKIP_APT=1: never call apt, fail instead);
#   2. the base image debian:trixie-slim is made from the Debian mirror when the store lacks it:
#      `mmdebstrap --variant=minbase trixie` with the apt/dpkg settings of Docker's official
#      debian:*-slim images (delete .debs after each install, no translations, no docs, man
#      pages or locales), then `podman import` (about 81 MB, 25-40 s);
#   3. `buildah bud --isolation chroot --layers --pull=never -f docker/Dockerfile -t fem_anode .`
#      (4-6 min on 2 cores);
#   4. in a container: `fem-anode --version`, `fem-anode demo` serially and under `mpirun -n 2`,
#      and a quick test subset serially and under `mpirun -n 2`;
#   5. removes everything it stored (containers, images, layers) when it made the store itself.
#
# Usage: bash scripts/docker-smoke.sh        (from anywhere; exit status 0 only if all passed)
# Environment:
#   FEM_ANODE_SMOKE_ROOT   container store to use (--root/--runroot of podman and buildah).
#                          Default: a new folder under ${TMPDIR:-/var/tmp}, removed at the end.
#                          A folder you give is kept, so its base image and layers are reused.
#   FEM_ANODE_SMOKE_KEEP=1 keep the default store too (the script prints how to use it).
#   FEM_ANODE_SMOKE_RUNNER podman (default: `podman run --runtime runc`) or buildah
#                          (`buildah run --isolation chroot`).
#   FEM_ANODE_DEBIAN_MIRROR  Debian mirror for the base image (default http://deb.debian.org/debian;
#                          FEM_ANODE_DEBIAN_SECURITY_MIRROR: http://deb.debian.org/debian-security).
#   FEM_ANODE_SKIP_APT=1   never install the tools; fail if they are missing.
#
# Anything that stops the smoke from running (no tools and no way to install them, no mirror,
# no space) is a failure with a message, never a skip: CI relies on this.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
image=fem_anode
base=debian:trixie-slim
mirror="${FEM_ANODE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
runner="${FEM_ANODE_SMOKE_RUNNER:-podman}"
tools=(podman buildah runc mmdebstrap)

log() { printf '[docker-smoke] %s\n' "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }
t0=$(date +%s)
phase_start=$t0
phase() {  # phase NAME: print the time of the previous phase, start a new one
  local now; now=$(date +%s)
  [ -n "${phase_name:-}" ] && timings+=("$phase_name: $(( now - phase_start )) s")
  phase_name="$1"; phase_start=$now
  log "== $1 =="
}
timings=()

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else return 1; fi
}

# -- 1. tools ----------------------------------------------------------------------------------
phase "tools"
missing=()
for tool in "${tools[@]}"; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  [ "${FEM_ANODE_SKIP_APT:-0}" = 1 ] && die "missing ${missing[*]} and FEM_ANODE_SKIP_APT=1"
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]}; no apt-get to install them (install podman, buildah, runc, mmdebstrap yourself)"
  log "installing ${missing[*]} (Debian packages podman buildah runc mmdebstrap)"
  as_root apt-get update -qq || die "apt-get update failed (need root or sudo, and a Debian mirror)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    podman buildah runc mmdebstrap >/dev/null || die "could not install podman buildah runc mmdebstrap"
fi
log "$(podman --version), $(buildah --version | cut -d' ' -f1-3), $(runc --version | head -1), $(mmdebstrap --version)"

# -- the store ---------------------------------------------------------------------------------
made_store=0
if [ -n "${FEM_ANODE_SMOKE_ROOT:-}" ]; then
  store="$FEM_ANODE_SMOKE_ROOT"; mkdir -p "$store"
else
  store="$(mktemp -d "${TMPDIR:-/var/tmp}/fem_anode_smoke.XXXXXX")"; made_store=1
fi
store="$(cd "$store" && pwd)"
pm() { podman --root "$store/storage" --runroot "$store/run" "$@"; }
bh() { buildah --root "$store/storage" --runroot "$store/run" "$@"; }

cleanup() {
  local status=$?
  set +e
  [ -n "${ctr:-}" ] && bh rm "$ctr" >/dev/null 2>&1
  if [ "$made_store" = 1 ] && [ "${FEM_ANODE_SMOKE_KEEP:-0}" != 1 ]; then
    log "removing the store $store"
    bh rm --all >/dev/null 2>&1
    pm rm --all --force >/dev/null 2>&1
    pm rmi --all --force >/dev/null 2>&1
    # Layers still mounted (an interrupted build) are unmounted before the folder goes.
    awk -v s="$store/" 'index($2, s) == 1 { print $2 }' /proc/self/mounts | sort -r \
      | while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
    rm -rf "$store" || log "could not remove $store"
  else
    log "store kept: $store  (e.g. podman --root $store/storage --runroot $store/run images)"
  fi
  local now; now=$(date +%s)
  [ -n "${phase_name:-}" ] && timings+=("$phase_name: $(( now - phase_start )) s")
  for t in "${timings[@]}"; do log "  $t"; done
  if [ $status -eq 0 ]; then log "passed in $(( now - t0 )) s"
  else log "FAILED (exit $status) after $(( now - t0 )) s"; fi
  exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# -- 2. base image -----------------------------------------------------------------------------
phase "base image"
if pm image exists "$base"; then
  log "$base is in the store"
else
  log "making $base with mmdebstrap from $mirror"
  cfg="$store/slim-config"
  mkdir -p "$cfg/etc/apt/apt.conf.d"
  # apt settings of the official debian:*-slim images (docker-debian-artifacts/debuerreotype).
  cat > "$cfg/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  echo 'Acquire::Languages "none";' > "$cfg/etc/apt/apt.conf.d/docker-no-languages"
  echo 'Apt::AutoRemove::SuggestsImportant "false";' > "$cfg/etc/apt/apt.conf.d/docker-autoremove-suggests"
  # dpkg excludes as options (mmdebstrap then also drops these paths from the essential set it
  # unpacks itself); they stay in /etc/dpkg/dpkg.cfg.d/99mmdebstrap for every later install.
  excludes=()
  for p in /usr/share/doc/ /usr/share/man/ /usr/share/groff/ /usr/share/info/ \
           /usr/share/lintian/ /usr/share/linda/ /usr/share/locale/; do
    excludes+=("--dpkgopt=path-exclude=${p}*")
  done
  excludes+=("--dpkgopt=path-include=/usr/share/doc/*/copyright")
  security="${FEM_ANODE_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
  mmdebstrap --variant=minbase --quiet "${excludes[@]}" \
    --setup-hook="sync-in $cfg /" \
    --customize-hook='rm -f "$1"/var/cache/apt/*.bin; rm -rf "$1"/var/lib/apt/lists/*' \
    trixie "$store/base.tar" \
    "deb $mirror trixie main" "deb $mirror trixie-updates main" "deb $security trixie-security main" \
    || die "mmdebstrap could not make $base (is $mirror reachable?)"
  pm import --quiet --change 'CMD ["bash"]' "$store/base.tar" "$base" >/dev/null \
    || die "podman import of $base failed"
  rm -f "$store/base.tar"
  log "$base: $(pm image inspect --format '{{.Size}}' "$base" | awk '{printf "%.0f MB", $1/1e6}')"
fi

# -- 3. build ----------------------------------------------------------------------------------
phase "build"
bh bud --isolation chroot --layers --pull=never -f docker/Dockerfile -t "$image" . \
  || die "buildah bud failed"
size_mb=$(pm image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f", $1/1e6}')
log "image $image: $size_mb MB"

# -- 4. run ------------------------------------------------------------------------------------
# Each check is a fresh container from the image; they share one folder for dolfinx's JIT cache
# (~/.cache/fenics) so that the forms are compiled once, not in every run.
mkdir -p "$store/jit-cache"
nofile=$(ulimit -Hn); [ "$nofile" = unlimited ] && nofile=1048576
case "$runner" in
  podman)
    in_image() {
      pm run --rm --runtime runc --network none --ulimit "nofile=$nofile:$nofile" \
        --ulimit nproc=8192:8192 --volume "$store/jit-cache:/root/.cache" "$image" "$@"
    } ;;
  buildah)
    ctr=$(bh from --pull-never "$image")
    in_image() { bh run --isolation chroot "$ctr" -- "$@"; } ;;  # chroot: host network only
  *) die "FEM_ANODE_SMOKE_RUNNER must be podman or buildah, not $runner" ;;
esac

# The quick test subset: every layer of the stack in about a minute per run -- the command
# line, settings and image I/O, voxel meshes, gmsh meshes read into dolfinx, real dolfinx
# solves (1 vs all ranks), checkpoints (MPI-IO, adios4dolfinx) with SIGTERM/SIGKILL and resume.
quick_tests=(
  tests/test_cli.py
  tests/test_units_settings.py
  tests/test_io_images.py
  tests/test_voxel_mesh.py
  tests/meshing/test_meshing_dolfinx.py
  tests/fem/test_fem_voxel_solve.py
  tests/fem/test_fem_diffusion.py
  tests/test_reliability_checkpoint.py
)
phase "fem-anode --version"
version=$(in_image fem-anode --version) || die "fem-anode --version"
log "$version"
phase "demo, serial"
in_image fem-anode demo --out /tmp/demo || die "fem-anode demo (serial)"
phase "demo, mpirun -n 2"
in_image mpirun -n 2 fem-anode demo --out /tmp/demo || die "mpirun -n 2 fem-anode demo"
phase "tests, serial"
in_image python -m pytest -q -p no:cacheprovider "${quick_tests[@]}" || die "quick tests (serial)"
phase "tests, mpirun -n 2"
in_image mpirun -n 2 python -m mpi4py -m pytest -q -p no:cacheprovider "${quick_tests[@]}" \
  || die "quick tests (mpirun -n 2)"
phase "clean-up"
log "image $image: $size_mb MB; all smoke checks passed"
