#!/usr/bin/env bash
# Run the whole test suite serially, then under `mpirun -n 2` (python -m mpi4py: a failing
# rank aborts all instead of hanging). Does its own setup on a fresh machine.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k io -x`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
bash scripts/setup.sh
venv="${FEM_ANODE_VENV:-$here/.venv}"
ranks="${FEM_ANODE_TEST_RANKS:-2}"
export MPLBACKEND=Agg
# Open MPI refuses root and probes TCP in sandboxes; these make `mpirun` work as root on one host.
if [ "$(id -u)" -eq 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
export OMPI_MCA_btl="${OMPI_MCA_btl:-self,sm}" OMPI_MCA_rmaps_base_oversubscribe=1

start=$(date +%s)
echo "== tests, serial =="
"$venv/bin/python" -m pytest -p no:cacheprovider "$@"
echo "== tests, mpirun -n $ranks =="
# Open MPI 5 refuses to start when $TMPDIR holds a session directory of the same name left over
# from a killed mpirun whose pid was reused (PMIX_ERR_EXISTS): give this one a fresh TMPDIR.
mpi_tmp="$(mktemp -d /tmp/fa-mpi-XXXXXX)"
trap 'rm -rf "$mpi_tmp"' EXIT
# A rank that leaves a test early (an assertion on one rank only) makes the others wait in the next
# collective for ever: pytest's faulthandler_timeout prints every rank's stack after 900 s in one
# test, and the whole run is stopped after FEM_ANODE_MPI_TEST_TIMEOUT seconds (default 2400; the
# suite takes about 4 minutes on 2 cores), so a hang fails the run instead of using up CI's time.
mpi_limit="${FEM_ANODE_MPI_TEST_TIMEOUT:-2400}"
status=0
TMPDIR="$mpi_tmp" timeout --kill-after=30 "$mpi_limit" \
  mpirun -n "$ranks" "$venv/bin/python" -m mpi4py -m pytest -p no:cacheprovider "$@" || status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
  echo "== the tests under mpirun -n $ranks did not finish in $mpi_limit s (a hang?); stopped ==" >&2
fi
[ "$status" -eq 0 ] || exit "$status"
echo "== all tests passed (serial and $ranks ranks) in $(( $(date +%s) - start )) s =="
