"""The environment SGLang 0.5.14 needs to run on CPU.

- ``SGLANG_USE_CPU_ENGINE=1``: required, else SGLang's rotary embedding imports vLLM's custom ops;
- ``SGLANG_NCCL_SO_PATH`` pointing to no file: the CUDA build of torch ships libnccl, and SGLang
  would build a PyNccl communicator that fails on CPU tensors; TP runs on gloo instead;
- ``TORCHDYNAMO_DISABLE=1``: no torch.compile (at tp > 1 it compiles C++ before the first
  generation, tens of seconds on 2 cores);
- ``OMP_NUM_THREADS=1``: one thread per rank (each rank is pinned to a core through
  ``SGLANG_CPU_OMP_THREADS_BIND``, see ``serving.bind_cpu_threads``).

Set it before sglang is imported; engine and spawned processes inherit it. On CPU, SGLang also
needs ``device="cpu"``, ``attention_backend="torch_native"`` and a small KV pool
(``mem_fraction_static``, ``max_total_tokens``); scripts that start an engine need an
``if __name__ == "__main__":`` guard (its workers are spawned).
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
