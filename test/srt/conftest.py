"""Without a CUDA GPU, run SGLang on CPU (the environment of ``sglang_dcp.test.cpu_env``)."""

import pytest
import torch

from sglang_dcp.test.cpu_env import use_cpu_env

if not torch.cuda.is_available():
    use_cpu_env()  # before sglang is imported; engine subprocesses inherit it


@pytest.fixture(scope="session")
def reference_runs():
    """dcp 1 runs shared by the a2a and lse cases of an e2e test: key -> what the test keeps."""
    return {}
