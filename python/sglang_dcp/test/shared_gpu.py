"""Shared-GPU test mode (``SGLANG_DCP_SHARED_GPU=1``): every rank of an engine on one GPU.

Test support only. A DCP engine needs ``tp >= D`` ranks, and NCCL refuses two ranks on one
device, so on a machine with fewer GPUs than ranks nothing of DCP could run on a GPU. In this
mode SGLang runs all its process groups on **gloo**, which takes CUDA tensors (through host
memory): every collective of TP and DCP is exact, only slow. What it proves on one GPU: the
FlashInfer kernels, the KV layout, the merges, the allocator and the scheduler under DCP,
eagerly. What it cannot: CUDA graphs (gloo collectives cannot be captured) and any speed figure.

With the variable set, ``hooks.register`` adds this module's ``HOOKS`` to the plugin's table;
every process of the engine inherits the variable and logs a warning that the mode is on:

* every TP rank's scheduler runs on ``--base-gpu-id`` (``gpu_id = base_gpu_id``);
* the torch.distributed backend for CUDA is gloo, and groups get no pynccl, custom all-reduce,
  mscclpp or torch symmetric memory communicator (each would open NCCL/IPC per device);
* each rank's KV budget is its share of the engine's: ``mem_fraction_static * device memory /
  ranks on the device``, less the memory this rank already holds (weights). SGLang's profile
  would give every rank the device's whole free memory. Engines that share the device at
  once must keep their ``mem_fraction_static`` summed below 1;
* SGLang's TP memory-imbalance check is a warning only: every rank measures the same device,
  so it compares the device with itself at two moments (other engines start and stop between);
* CUDA graphs are refused before the engine starts (``--disable-cuda-graph`` is required), as
  is any device but CUDA.
"""

import logging
import os

import torch

from sglang.srt.plugins.hook_registry import HookType

from sglang_dcp.hooks import Hook
from sglang_dcp.server_args import DCPConfigError

logger = logging.getLogger(__name__)

ENV = "SGLANG_DCP_SHARED_GPU"
_MODEL_RUNNER_KV = "sglang.srt.model_executor.model_runner_kv_cache_mixin.ModelRunnerKVCacheMixin"


def shared_gpu_enabled() -> bool:
    return os.environ.get(ENV) == "1"


def check_shared_gpu_args(_result, server_args) -> None:
    """In the launching process, before any scheduler starts: CUDA, no CUDA graphs."""
    from sglang_dcp.hooks import require_hooks_applied

    require_hooks_applied()
    if server_args.device != "cuda":
        raise DCPConfigError(f"{ENV}=1 shares one CUDA device between ranks; unset it for --device {server_args.device}.")
    if not server_args.disable_cuda_graph:
        raise DCPConfigError(
            f"{ENV}=1 runs collectives on gloo, which CUDA graphs cannot capture; pass "
            f"--disable-cuda-graph (disable_cuda_graph=True)."
        )
    logger.warning(
        "%s=1 (test mode): all %d ranks on GPU %d, collectives on gloo, eager; no speed figure "
        "from this engine means anything",
        ENV,
        server_args.tp_size * server_args.pp_size,
        server_args.base_gpu_id,
    )


def scheduler_on_base_gpu(original, scheduler, server_args, port_args, gpu_id, *args, **kwargs):
    return original(scheduler, server_args, port_args, server_args.base_gpu_id, *args, **kwargs)


def gloo_for_cuda(original, device: str) -> str:
    return "gloo" if device == "cuda" else original(device)


def group_without_device_communicators(original, group_ranks, local_rank, backend, *args, **kwargs):
    kwargs.update(use_pynccl=False, use_custom_allreduce=False, use_mscclpp_allreduce=False,
                  use_torch_symm_mem_allreduce=False)
    return original(group_ranks, local_rank, backend, *args, **kwargs)


def kv_budget_bytes(mem_fraction_static: float, device_bytes: int, ranks: int, held_bytes: int) -> int:
    """One rank's KV budget: ``mem_fraction_static * device_bytes / ranks - held_bytes``."""
    return int(mem_fraction_static * device_bytes / ranks - held_bytes)


def rank_share_of_device(runner, pre_model_load_memory) -> int:
    """Replaces ``_profile_available_bytes``: ``kv_budget_bytes`` of this rank (DCP's extend
    reserve, an AFTER hook of the same target, still applies on top)."""
    ranks = runner.tp_size * runner.pp_size
    budget = kv_budget_bytes(
        runner.mem_fraction_static,
        torch.cuda.get_device_properties(runner.gpu_id).total_memory,
        ranks,
        torch.cuda.memory_reserved(runner.gpu_id),
    )
    if budget <= 0:
        raise ValueError(
            f"{ENV}=1: this rank's share of --mem-fraction-static {runner.mem_fraction_static} "
            f"(split between {ranks} ranks on one GPU) is smaller than its weights; raise it."
        )
    return budget


HOOKS = (
    Hook("sglang.srt.server_args.ServerArgs.check_server_args", check_shared_gpu_args,
         HookType.AFTER, "shared GPU: CUDA only, no CUDA graphs, loud in the log"),
    Hook("sglang.srt.managers.scheduler.Scheduler.__init__", scheduler_on_base_gpu,
         HookType.AROUND, "shared GPU: every rank on --base-gpu-id"),
    Hook("sglang.srt.distributed.parallel_state.get_default_distributed_backend", gloo_for_cuda,
         HookType.AROUND, "shared GPU: gloo process groups for CUDA tensors"),
    Hook("sglang.srt.distributed.parallel_state.init_model_parallel_group",
         group_without_device_communicators, HookType.AROUND,
         "shared GPU: no pynccl / custom all-reduce / mscclpp / symmetric memory"),
    Hook(f"{_MODEL_RUNNER_KV}._profile_available_bytes", rank_share_of_device, HookType.REPLACE,
         "shared GPU: each rank's share of the engine's memory fraction"),
)


def on_enable() -> None:
    """Environment that the mode needs in every process of the engine (inherited by spawn)."""
    os.environ["SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK"] = "0"
