"""Without a CUDA GPU, run SGLang on CPU (the environment of ``sglang_dcp.test.cpu_env``)."""

import torch

from sglang_dcp.test.cpu_env import use_cpu_env

if not torch.cuda.is_available():
    use_cpu_env()  # before sglang is imported; engine subprocesses inherit it
