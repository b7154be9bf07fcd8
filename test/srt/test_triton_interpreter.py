"""The Triton kernels of the CUDA path on CPU, under Triton's interpreter (``TRITON_INTERPRET=1``),
in a child process so that no other test (and no SGLang engine) runs with the interpreter on:
``gpu/test_gpu_kernels.py``'s Triton-only tests (pack, merge, local KV indices) and
``gpu/test_gpu_allocator.py`` (SGLang's allocator kernels for every kind of ``(page, dcp)``)."""

import os
import subprocess
import sys

import pytest
import torch

GPU_TESTS = os.path.join(os.path.dirname(__file__), "gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels run natively")
def test_triton_kernels_in_the_interpreter():
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         os.path.join(GPU_TESTS, "test_gpu_kernels.py"), os.path.join(GPU_TESTS, "test_gpu_allocator.py"),
         "-k", "pack_and_merge_kernels or scale_kernel or kv_indices_kernel or allocator"],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "21 passed" in run.stdout, run.stdout[-2000:]
