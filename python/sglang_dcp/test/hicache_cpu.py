"""CPU HiCache test mode (``SGLANG_DCP_TEST_CPU_HICACHE=1``): SGLang's hierarchical cache on CPU.

Test support only. SGLang 0.5.14 runs ``--enable-hierarchical-cache`` on GPUs: its host pool
pins its buffer with ``cudaHostRegister``, its device <-> host copies are ``sgl_kernel``
``transfer_kv_*`` / JIT ``transfer_hicache_*`` kernels (not even imported without CUDA), and it
keeps 10 GiB of host memory free beside the pool. With the variable set, in every process of
the engine (``hooks.register`` adds this module's ``HOOKS`` and logs a warning):

* the host pool is not pinned (``pin_memory=False``);
* its copies are PyTorch indexing of the same rows the kernels move, for the layouts DCP
  accepts: host row ``h`` of layer ``l`` is ``[l, h]`` (``layer_first``), ``[h, l]``
  (``page_first``) or ``[h // P, l, h % P]`` (``page_first_direct``, host page ``P``); the
  ``kernel`` and ``direct`` I/O backends move the same rows, so one copy serves both;
* the host-memory reserve is ``HOST_MEMORY_RESERVE_BYTES`` (256 MiB) instead of 10 GiB.

Everything else (the radix tree's host tier, the cache controller, its streams and events,
L3 storage) is SGLang's. Any device but CPU is refused before the engine starts. Turn it on
like ``SGLANG_DCP_TEST_CPU_SPECULATION``: set it in the environment of the engine's process.
"""

import logging

import torch

from sglang.srt.plugins.hook_registry import HookType

from sglang_dcp.hooks import Hook
from sglang_dcp.server_args import DCPConfigError

logger = logging.getLogger(__name__)

ENV = "SGLANG_DCP_TEST_CPU_HICACHE"
HOST_MEMORY_RESERVE_BYTES = 256 << 20
_HOST_POOL = "sglang.srt.mem_cache.memory_pool_host.MHATokenToKVPoolHost"


def check_cpu_hicache_args(_result, server_args) -> None:
    """In the launching process, before any scheduler starts: CPU only, loud in the log."""
    from sglang_dcp.hooks import require_hooks_applied

    if server_args.device != "cpu":
        raise DCPConfigError(
            f"{ENV}=1 replaces HiCache's CUDA copies for CPU tests; unset it for --device {server_args.device}."
        )
    require_hooks_applied()
    logger.warning("%s=1 (test mode): HiCache's host pool unpinned, its copies in PyTorch", ENV)


def unpinned_host_pool(original, pool, *args, **kwargs):
    kwargs["pin_memory"] = False
    return original(pool, *args, **kwargs)


def host_row_index(pool, layer_id: int, rows: torch.Tensor) -> tuple:
    """Where host rows ``rows`` of layer ``layer_id`` sit in ``pool.k_buffer`` / ``v_buffer``."""
    if pool.layout == "layer_first":
        return layer_id, rows
    if pool.layout == "page_first":
        return rows, layer_id
    if pool.layout == "page_first_direct":
        return rows // pool.page_size, layer_id, rows % pool.page_size
    raise ValueError(f"{ENV}=1 copies layouts layer_first, page_first and page_first_direct, not {pool.layout}")


def load_layer_in_torch(pool, device_pool, host_indices, device_indices, layer_id, io_backend) -> None:
    """``load_to_device_per_layer``: host rows -> device rows of one layer."""
    host = host_row_index(pool, layer_id, host_indices.to("cpu", torch.int64))
    device_rows = device_indices.to(torch.int64)
    device_pool.k_buffer[layer_id][device_rows] = pool.k_buffer[host].to(device_pool.device)
    device_pool.v_buffer[layer_id][device_rows] = pool.v_buffer[host].to(device_pool.device)


def backup_all_layers_in_torch(pool, device_pool, host_indices, device_indices, io_backend) -> None:
    """``backup_from_device_all_layer``: device rows -> host rows of every layer."""
    host_rows = host_indices.to("cpu", torch.int64)
    device_rows = device_indices.to(torch.int64)
    for layer_id in range(pool.layer_num):
        host = host_row_index(pool, layer_id, host_rows)
        pool.k_buffer[host] = device_pool.k_buffer[layer_id][device_rows].to("cpu")
        pool.v_buffer[host] = device_pool.v_buffer[layer_id][device_rows].to("cpu")


HOOKS = (
    Hook("sglang.srt.server_args.ServerArgs.check_server_args", check_cpu_hicache_args,
         HookType.AFTER, "CPU HiCache: CPU only, loud in the log"),
    Hook(f"{_HOST_POOL}.__init__", unpinned_host_pool, HookType.AROUND,
         "CPU HiCache: no cudaHostRegister"),
    Hook(f"{_HOST_POOL}.load_to_device_per_layer", load_layer_in_torch, HookType.REPLACE,
         "CPU HiCache: host -> device copies in PyTorch"),
    Hook(f"{_HOST_POOL}.backup_from_device_all_layer", backup_all_layers_in_torch, HookType.REPLACE,
         "CPU HiCache: device -> host copies in PyTorch"),
)


def on_enable() -> None:
    """Before the hooks apply, in every process of the engine."""
    import sglang.srt.mem_cache.pool_host.base as host_pool_base

    logger.warning("%s=1 (test mode): HiCache's CUDA copies are replaced by PyTorch indexing", ENV)
    host_pool_base.HICACHE_HOST_MEMORY_RESERVE_BYTES = HOST_MEMORY_RESERVE_BYTES
