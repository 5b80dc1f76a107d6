"""Kernels compiled on first use (fem_anode.fem.compiled): builds for this processor are cached
under a name keyed by the processor, ``FEM_ANODE_NATIVE=0`` and compilers that refuse
``-march=native`` get the portable build, and both builds compute the same numbers."""

from __future__ import annotations

import ctypes
import os
import shutil
import stat

import numpy as np
import pytest

from fem_anode.fem import compiled
from fem_anode.fem.compiled import NATIVE_FLAGS, CompileError, compiled_library, cpu_identity

SOURCE = "double fa_scaled_sum(const double *x, long n, double a) { double s = 0; for (long i = 0; i < n; ++i) s += a * x[i]; return s; }\n"
FLAGS = ("-O2", "-std=c99", "-fPIC", "-shared")


@pytest.fixture
def source(tmp_path, monkeypatch):
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("FEM_ANODE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "kernel.c"
    path.write_text(SOURCE)
    return path


def built(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "cache").glob("kernel-*.so"))


def call(library: ctypes.CDLL) -> float:
    function = library.fa_scaled_sum
    function.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_double]
    function.restype = ctypes.c_double
    x = np.linspace(0.1, 1.7, 1001)
    return function(x.ctypes.data, x.size, 0.3)


def test_cpu_identity_names_the_processor_and_is_stable():
    identity = cpu_identity()
    assert identity and identity == cpu_identity()
    if os.path.exists("/proc/cpuinfo"):  # one line per key of the first processor's block only
        keys = [line.split(":")[0].strip() for line in identity.splitlines()]
        assert len(keys) == len(set(keys)), keys


def test_native_and_portable_builds_are_separate_files_with_the_same_result(source, tmp_path, monkeypatch):
    portable = call(compiled_library(source, os.environ.get("CC", "cc"), FLAGS))
    assert len(built(tmp_path)) == 1
    native = call(compiled_library(source, os.environ.get("CC", "cc"), FLAGS, native=True))
    assert len(built(tmp_path)) == 2  # keyed by the flags and the processor: not the portable file
    assert native == portable  # no fast-math, no contraction under -std=c99: the same bits
    compiled_library(source, os.environ.get("CC", "cc"), FLAGS, native=True)
    assert len(built(tmp_path)) == 2  # cached
    monkeypatch.setenv("FEM_ANODE_NATIVE", "0")
    compiled_library(source, os.environ.get("CC", "cc"), FLAGS, native=True)
    assert len(built(tmp_path)) == 2  # the portable file again


def test_another_processor_gets_its_own_native_build(source, tmp_path, monkeypatch):
    compiled_library(source, os.environ.get("CC", "cc"), FLAGS, native=True)
    monkeypatch.setattr(compiled, "cpu_identity", lambda: "model name : another processor")
    compiled_library(source, os.environ.get("CC", "cc"), FLAGS, native=True)
    assert len(built(tmp_path)) == 2


def test_a_compiler_refusing_march_native_gets_the_portable_build(source, tmp_path):
    wrapper = tmp_path / "cc-without-native"
    real = shutil.which(os.environ.get("CC", "cc"))
    refused = " ".join(f'"{flag}"' for flag in NATIVE_FLAGS)
    wrapper.write_text(
        "#!/bin/sh\n"
        f'for a in "$@"; do for r in {refused}; do [ "$a" = "$r" ] && {{ echo "unknown option $a" >&2; exit 1; }}; done; done\n'
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    library = compiled_library(source, str(wrapper), FLAGS, native=True)
    assert call(library) == pytest.approx(0.3 * np.linspace(0.1, 1.7, 1001).sum(), rel=1e-12)
    assert len(built(tmp_path)) == 1
    compiled_library(source, str(wrapper), FLAGS)  # the portable build: that very file, no new one
    assert len(built(tmp_path)) == 1
    with pytest.raises(CompileError, match="cannot compile|failed on"):
        compiled_library(source, str(tmp_path / "no-such-compiler"), FLAGS, native=True)


def test_a_node_without_a_compiler_loads_the_cached_portable_build(source, tmp_path, monkeypatch):
    """A cluster's compute node without a compiler, sharing the cache with a login node that built
    the portable kernels (``FEM_ANODE_NATIVE=0``): the native build fails, the cached portable one loads."""
    monkeypatch.setenv("FEM_ANODE_NATIVE", "0")
    expected = call(compiled_library(source, os.environ.get("CC", "cc"), FLAGS, native=True))
    monkeypatch.delenv("FEM_ANODE_NATIVE")

    def no_compiler(*args, **kwargs):
        raise FileNotFoundError("no compiler on this node")

    monkeypatch.setattr(compiled.subprocess, "run", no_compiler)
    assert call(compiled_library(source, os.environ.get("CC", "cc"), FLAGS, native=True)) == expected
    assert len(built(tmp_path)) == 1
    monkeypatch.setenv("FEM_ANODE_CACHE_DIR", str(tmp_path / "empty"))
    with pytest.raises(CompileError, match="no compiler on this node"):
        compiled_library(source, os.environ.get("CC", "cc"), FLAGS, native=True)
