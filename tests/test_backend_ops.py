"""Upstream test-backend-ops on the patched CPU kernels: optimised CPU path vs its reference path.

Our cases (SparseK-style FLASH_ATTN_EXT masks with the n_kv_max hint, and the SparseK mask-building
ops) run by default; the whole upstream FLASH_ATTN_EXT suite (~7 minutes on 2 cores) is opt-in:
`pytest -m full_op_suite`.
"""

from __future__ import annotations

import platform
import re
import subprocess

import pytest

from llama_sparsek import tools


def run_backend_ops(*args: str, timeout: int) -> tuple[int, int]:
    """Run `test-backend-ops test -b CPU ...`; (passed, total) from its summary line."""
    exe = tools.tool_path("test-backend-ops")
    proc = subprocess.run([str(exe), "test", "-b", "CPU", *args], text=True,
                          capture_output=True, timeout=timeout)  # fmt: skip
    out = proc.stdout + proc.stderr
    failed = [line for line in out.splitlines() if "FAIL" in line]
    assert proc.returncode == 0, "\n".join(failed[:20]) or out[-3000:]
    found = re.search(r"(\d+)/(\d+) tests passed", out)
    assert found, out[-3000:]
    return int(found.group(1)), int(found.group(2))


def test_sparsek_flash_attn_cases() -> None:
    # our FLASH_ATTN_EXT cases are the ones whose parameters name a top_k
    passed, total = run_backend_ops("-o", "FLASH_ATTN_EXT", "-p", "top_k=", timeout=1200)
    assert total >= 50
    assert passed == total


def test_sparsek_mask_ops_case() -> None:
    passed, total = run_backend_ops("-o", "SPARSEK_MASK", timeout=600)
    assert total >= 1
    assert passed == total


def test_repack_mul_mat_cases() -> None:
    # MUL_MAT/MUL_MAT_ID with the weights in CPU_REPACK (Q4_0, and Q4_1 of patch 0010); a CPU
    # without a kernel for the type skips its cases, x86-64 (AVX2) has kernels for both types
    passed, total = run_backend_ops(
        "-o", "MUL_MAT,MUL_MAT_ID", "-p", "buft=CPU_REPACK", timeout=600
    )
    assert total >= (16 if platform.machine() in ("x86_64", "AMD64") else 1)
    assert passed == total


@pytest.mark.full_op_suite
def test_full_upstream_flash_attn_suite() -> None:
    passed, total = run_backend_ops("-o", "FLASH_ATTN_EXT", timeout=3600)
    assert total > 5000
    assert passed == total
