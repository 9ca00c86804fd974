"""Every Triton kernel compiles for an H100 (sm_90) on this CPU, as a launch there would
specialise it: ``benchmarks/kernel_resources.py`` drives every fused path with Triton's
driver naming that GPU and every launch turned into a compile. Triton's interpreter, which
the other kernel tests use, never compiles a kernel, so this is the CPU's only check that
the GPU path builds."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _ptxas() -> bool:
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return False
    return (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.heavy  # about 30 s with Triton's cache cold
@pytest.mark.skipif(not _ptxas(), reason="needs triton with its CUDA assembler (ptxas)")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--arch", "90"],
                            env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    compiled = re.search(r"sm_90: (\d+) kernels compiled", result.stdout)
    assert compiled and int(compiled.group(1)) >= 17, result.stdout[-2000:]  # every kernel, some in variants
    # both of ODConv's gated variants of the dense and depthwise kernels, in bf16
    for kernel in ("_forward_kernel", "_grad_input_kernel", "_grad_weight_kernel", "_depthwise_forward_kernel"):
        assert re.search(rf"^{kernel}\s+bf16 .*GATED=True", result.stdout, re.M), kernel
