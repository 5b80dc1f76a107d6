#!/usr/bin/env bash
# Run every benchmark as reported in benchmarks/README.md (about 30-40 min on 2 busy cores).
# Results are appended to benchmarks/results/*.json; logs go to benchmarks/scratch/ (git-ignored).
# Needs the peers venv for the comparisons: benchmarks/setup_peers.sh.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=.venv/bin/python
mpi=(env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=self,sm mpirun -n 2)
mkdir -p benchmarks/scratch
run() { local log=$1; shift; echo "== $* (load $(cut -d' ' -f1-3 /proc/loadavg))"; "$@" > "benchmarks/scratch/$log.log" 2>&1 || echo "   FAILED: see benchmarks/scratch/$log.log"; tail -n 25 "benchmarks/scratch/$log.log"; }
run tortuosity       $py benchmarks/bench_tortuosity.py --sizes 50,100
run tortuosity_mpi1  $py benchmarks/bench_tortuosity.py --sizes 100 --no-peer
run tortuosity_mpi2  "${mpi[@]}" $py benchmarks/bench_tortuosity.py --sizes 100 --no-peer
run metrics          $py benchmarks/bench_metrics.py --sizes 100,200
run diffusion_small  $py benchmarks/bench_diffusion.py --cases roi1-p1,roi1-p2,vol30-p1,vol60-p1,vol20-p2,vol30-p2
run diffusion_large  $py benchmarks/bench_diffusion.py --cases roi2-p1,vol60-p1,vol20-p2,vol100-p1
run diffusion_1M_2d  $py benchmarks/bench_diffusion.py --cases roi2-p2 --peer-max-dofs 2000000
run diffusion_mpi1   $py benchmarks/bench_diffusion.py --cases roi2-p1,vol60-p1,vol100-p1 --no-peer
run diffusion_mpi2   "${mpi[@]}" $py benchmarks/bench_diffusion.py --cases roi2-p1,vol60-p1,vol100-p1 --no-peer
run meshing          $py benchmarks/bench_meshing.py --roi-sizes 2,4,8 --volumes 50,100
run kernels          $py benchmarks/bench_kernels.py
run phasefield       $py benchmarks/bench_phasefield.py --sizes 2e-9,1e-9,5e-10
run phasefield_mpi2  "${mpi[@]}" $py benchmarks/bench_phasefield.py --sizes 1e-9
run seg_robust       $py benchmarks/bench_segmentation_robustness.py --seeds 24
