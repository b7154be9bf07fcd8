"""Without a CUDA GPU, run SGLang on CPU (see ../shared/notes/sglang-on-cpu.md)."""

import torch

from sglang_dcp.test.cpu_env import use_cpu_env

if not torch.cuda.is_available():
    use_cpu_env()  # before sglang is imported; engine subprocesses inherit it
