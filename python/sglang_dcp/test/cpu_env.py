"""The environment SGLang 0.5.14 needs to run on CPU (see ../shared/notes/sglang-on-cpu.md).

Set it before sglang is imported; engine and spawned processes inherit it.
"""

import os

CPU_ENV = {
    "SGLANG_USE_CPU_ENGINE": "1",
    "SGLANG_NCCL_SO_PATH": "/nonexistent/libnccl.so.2",  # no NCCL: gloo only
    "TORCHDYNAMO_DISABLE": "1",
    "OMP_NUM_THREADS": "1",  # one thread per rank
}


def use_cpu_env() -> None:
    """Add ``CPU_ENV`` to ``os.environ``, keeping values already set."""
    for name, value in CPU_ENV.items():
        os.environ.setdefault(name, value)
