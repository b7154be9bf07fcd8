"""Without a CUDA GPU, run SGLang on CPU (see ../shared/notes/sglang-on-cpu.md)."""

import os

import torch

if not torch.cuda.is_available():
    # Set before sglang is imported; engine subprocesses inherit them.
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    os.environ.setdefault("SGLANG_NCCL_SO_PATH", "/nonexistent/libnccl.so.2")
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
