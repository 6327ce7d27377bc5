"""The shortcuts taken for speed give the same answers as the slow, obvious computations."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch

from adaptermerge import lowrank, safetensors_io
from adaptermerge.adapter import all_finite
from adaptermerge.safetensors_io import SafetensorsWriter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_agrees_with_the_elementwise_check(dtype):
    big = torch.finfo(dtype).max
    cases = {
        "small": torch.randn(64, 8),
        "sum overflows, every value finite": torch.full((16,), big),
        "nan": torch.tensor([1.0, float("nan"), 2.0]),
        "inf": torch.tensor([1.0, float("inf")]),
        "inf and -inf": torch.tensor([float("inf"), float("-inf")]),
        "huge and inf": torch.tensor([big, big, float("-inf")]),
        "empty": torch.empty(0, 4),
    }
    for what, t in cases.items():
        t = t.to(dtype)
        assert all_finite(t) == bool(torch.isfinite(t).all()), what


def _dense_rel_error(d: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    d64 = d.double()
    return float(torch.linalg.norm(d64 - b.double() @ a.double()) / torch.linalg.norm(d64))


@pytest.mark.parametrize("shape", [(300, 80), (80, 300)])
@pytest.mark.parametrize("method", ["randomized", "exact"])
def test_reported_error_equals_the_measured_residual(shape, method):
    g = torch.Generator().manual_seed(0)
    # a decaying spectrum, so the error is neither 0 nor 1
    u = torch.linalg.qr(torch.randn(shape[0], 60, generator=g))[0]
    v = torch.linalg.qr(torch.randn(shape[1], 60, generator=g))[0]
    s = torch.logspace(0, -3, 60)
    d = (u * s) @ v.T
    for rank in (1, 7, 30):
        b, a, err = lowrank.truncate_dense(d, rank, method=method, seed=5)
        assert abs(err - _dense_rel_error(d, b, a)) < 1e-5, (rank, err)
        optimal = float((s[rank:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
        assert err >= optimal * (1 - 1e-4)


def test_tiny_errors_are_measured_not_read_off_the_singular_values():
    """An exactly rank-4 matrix truncated to rank 4: the closed form would give round-off noise of ~1e-4; the
    residual is formed instead and the reported error is the true one (tiny)."""
    g = torch.Generator().manual_seed(1)
    d = torch.randn(200, 4, generator=g) @ torch.randn(4, 150, generator=g)
    b, a, err = lowrank.truncate_dense(d, 4, seed=0)
    assert err < 1e-5
    assert abs(err - _dense_rel_error(d, b, a)) < 1e-6


def test_frobenius2_falls_back_to_float64_when_a_row_overflows():
    x = torch.full((3, 4), 1e30)
    assert math.isclose(lowrank.frobenius2(x), 12 * 1e60, rel_tol=1e-6)
    assert lowrank.frobenius2(torch.empty(0, 3)) == 0.0


def _write(path, tensors, metadata):
    w = SafetensorsWriter(path)
    for k, t in tensors.items():
        w.add(k, t)
    w.commit(metadata)
    return path.read_bytes()


def test_commit_without_copy_file_range_writes_the_same_bytes(tmp_path, monkeypatch):
    tensors = {f"t{i}": torch.randn(257, 33 + i) for i in range(5)}
    meta = {"format": "pt", "k": "v"}
    fast = _write(tmp_path / "fast.safetensors", tensors, meta)
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    slow = _write(tmp_path / "slow.safetensors", tensors, meta)
    assert fast == slow
    from safetensors.torch import load_file

    back = load_file(tmp_path / "slow.safetensors")
    for k, t in tensors.items():
        np.testing.assert_array_equal(back[k].numpy(), t.numpy())
    assert sorted(os.listdir(tmp_path)) == ["fast.safetensors", "slow.safetensors"]  # no temporaries left


def test_memory_limit_is_read_once_and_can_be_reread(tmp_path, monkeypatch):
    """The limit is min(physical RAM, cgroup v2/v1 limit, RLIMIT_AS), read once and re-read after cache_clear."""
    import os
    import resource

    phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    monkeypatch.setattr(safetensors_io, "CGROUP_MEMORY_FILES", (str(v2), str(v1)))
    monkeypatch.setattr(resource, "getrlimit", lambda what: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    safetensors_io.memory_limit_bytes.cache_clear()
    try:
        assert safetensors_io.memory_limit_bytes() == phys  # no cgroup file, no rlimit
        v2.write_text("max\n")  # cgroup v2 without a limit
        v1.write_text("9223372036854771712\n")  # cgroup v1's "unlimited"
        assert safetensors_io.memory_limit_bytes() == phys  # cached: not re-read
        safetensors_io.memory_limit_bytes.cache_clear()
        assert safetensors_io.memory_limit_bytes() == phys
        v2.write_text("1073741824\n")
        safetensors_io.memory_limit_bytes.cache_clear()
        first = safetensors_io.memory_limit_bytes()
        assert first == 1 << 30 and safetensors_io.memory_limit_bytes() is first
        monkeypatch.setattr(resource, "getrlimit", lambda what: (123_456_789, resource.RLIM_INFINITY))
        assert safetensors_io.memory_limit_bytes() == 1 << 30  # still the cached value
        safetensors_io.memory_limit_bytes.cache_clear()
        assert safetensors_io.memory_limit_bytes() == 123_456_789  # RLIMIT_AS below the cgroup limit
    finally:
        monkeypatch.undo()
        safetensors_io.memory_limit_bytes.cache_clear()
    assert safetensors_io.memory_limit_bytes() > 0


_MMAP_DRIVER = """
import ctypes, sys
import torch
from adaptermerge.engine import retain_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "retain":
    assert retain_freed_memory() is True
def mmapped_bytes_of_one_temporary():
    before = libc.mallinfo2().hblkhd
    x = torch.ones(8192, 2048)  # 64 MiB, one float32 delta of an 8192 x 2048 module
    during = libc.mallinfo2().hblkhd
    del x
    return during - before
print(max(mmapped_bytes_of_one_temporary() for _ in range(3)))
"""


def _glibc_with_mallinfo2() -> bool:
    name, version = platform.libc_ver()
    return sys.platform.startswith("linux") and name == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 33)


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="glibc malloc tuning (mallinfo2 needs glibc >= 2.33)")
def test_retained_heap_serves_big_temporaries_from_the_heap_not_mmap():
    """By default glibc gives every 64 MiB temporary its own mmap (unmapped on free, so every use faults all 16k
    pages in again); after retain_freed_memory() it comes from the heap, where a freed block is reused. Run in child
    processes: the setting is process-wide."""
    def mmapped(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _MMAP_DRIVER, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    assert mmapped("default") >= 64 << 20
    assert mmapped("retain") == 0
