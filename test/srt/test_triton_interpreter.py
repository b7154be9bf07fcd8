"""The Triton kernels of the CUDA path on CPU: ``gpu/test_gpu_kernels.py``'s Triton-only tests
under Triton's interpreter (``TRITON_INTERPRET=1``), in a child process so that no other test
(and no SGLang engine) runs with the interpreter switched on."""

import os
import subprocess
import sys

import pytest
import torch

KERNEL_TESTS = os.path.join(os.path.dirname(__file__), "gpu", "test_gpu_kernels.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels run natively")
def test_triton_kernels_in_the_interpreter():
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", KERNEL_TESTS,
         "-k", "pack_and_merge_kernels or scale_kernel or kv_indices_kernel"],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "10 passed" in run.stdout, run.stdout[-2000:]
