"""Every place where sglang-dcp touches SGLang 0.5.14, as one table of HookRegistry hooks.

Each hook is a no-op pass-through unless ``--dcp-size`` > 1. SGLang only logs a hook that
fails to apply, so ``require_hooks_applied`` checks the table against the registry and
raises; it runs in the launching process (``DCPServerArgs``) and in every scheduler
process (when the DCP group is created).

Test modes add tables of their own from ``sglang_dcp.test`` (``TEST_MODES``), each only in
processes whose environment sets its variable to ``1``; a product run never has them.
"""

import contextlib
import importlib
import os
from typing import Callable, NamedTuple, Union

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_dcp.configs.update_config import keep_kv_heads_replicated
from sglang_dcp.distributed.parallel_state import (
    dcp_graph_capture,
    dcp_is_initialized,
    destroy_dcp_group,
    get_dcp_group,
    initialize_dcp_group,
)
from sglang_dcp.layers.attention.registry import (
    create_dcp_attention_backend,
    create_dcp_draft_decode_backend,
    create_dcp_draft_extend_backend,
)
from sglang_dcp.hicache import attach_storage_to_stripes
from sglang_dcp.mem_cache.allocator import check_replicas_at_idle
from sglang_dcp.mem_cache.host_pool import host_pool_class_with_dcp
from sglang_dcp.mem_cache.kv_move import move_kv_in_group
from sglang_dcp.model_executor.group_heads import (
    at_tp_shapes,
    take_group_heads_after_load,
    update_weights_from_disk_at_tp_shapes,
)
from sglang_dcp.model_executor.kv_cache import init_pools_with_dcp, reserve_extend_memory
from sglang_dcp.server_args import DCPServerArgs

_MODEL_RUNNER = "sglang.srt.model_executor.model_runner.ModelRunner"
# ModelRunner methods that read or write weights by checkpoint name at TP's shapes (besides
# update_weights_from_disk): under --dcp-comm lse they run with the layers at TP's shapes.
_WEIGHTS_BY_NAME = (
    "update_weights_from_tensor",
    "update_weights_from_distributed",
    "update_weights_from_ipc",
    "get_weights_by_name",
    "check_weights",
    "save_sharded_model",
    "save_remote_model",
    "send_weights_to_remote_instance",
)


def create_dcp_group(_result, runner):
    # A draft model's runner joins the target's process groups (it creates none)
    if runner.server_args.dcp_size > 1 and not runner.is_draft_worker:
        require_hooks_applied()
        initialize_dcp_group(runner.server_args.dcp_size)


def destroy_dcp_group_after(_result, *args, **kwargs):
    destroy_dcp_group()


@contextlib.contextmanager
def graph_capture_with_dcp(original_graph_capture, *args, **kwargs):
    with original_graph_capture(*args, **kwargs) as context:
        with dcp_graph_capture(context) if dcp_is_initialized() else contextlib.nullcontext():
            yield context


def attention_backend_from_str(original, runner, backend_str, init_new_workspace=False):
    if runner.server_args.dcp_size == 1:
        return original(runner, backend_str, init_new_workspace)
    runner.init_new_workspace = init_new_workspace
    return create_dcp_attention_backend(backend_str, runner)


def draft_decode_backend_with_dcp(original, factory):
    if factory.server_args.dcp_size == 1:
        return original(factory)
    return create_dcp_draft_decode_backend(factory)


def draft_extend_backend_with_dcp(original, factory):
    if factory.server_args.dcp_size == 1:
        return original(factory)
    return create_dcp_draft_extend_backend(factory)


def move_kv_with_dcp(original, pool, tgt_loc, src_loc):
    """Slots are logical under DCP, rows physical: moves may cross ranks (``kv_move``)."""
    if not dcp_is_initialized():
        return original(pool, tgt_loc, src_loc)
    move_kv_in_group(pool, tgt_loc, src_loc, get_dcp_group())


def no_fused_kv_store_with_dcp(original, forward_batch):
    """The fused RoPE + KV store writes raw logical slots; DCP writes owned rows only."""
    return False if dcp_is_initialized() else original(forward_batch)


def check_allocator_replicas_after_idle(_result, scheduler):
    if dcp_is_initialized():
        check_replicas_at_idle(scheduler, get_dcp_group())


class Hook(NamedTuple):
    target: str
    hook: Union[type, Callable]
    kind: HookType
    why: str


HOOKS = (
    Hook("sglang.srt.server_args.ServerArgs", DCPServerArgs, HookType.REPLACE,
         "--dcp-size flag, validation, logical page size"),
    Hook("sglang.srt.entrypoints.engine.Engine.server_args_class", DCPServerArgs,
         HookType.REPLACE, "sglang.Engine(dcp_size=...)"),
    Hook(f"{_MODEL_RUNNER}.init_torch_distributed", create_dcp_group, HookType.AFTER,
         "create the DCP process groups"),
    Hook(f"{_MODEL_RUNNER}.load_model", take_group_heads_after_load, HookType.AFTER,
         "--dcp-comm lse: the group's q_proj rows and o_proj columns"),
    Hook(f"{_MODEL_RUNNER}.update_weights_from_disk", update_weights_from_disk_at_tp_shapes,
         HookType.AROUND, "--dcp-comm lse: SGLang's loaders see TP's shapes; re-gather after"),
    *(Hook(f"{_MODEL_RUNNER}.{name}", at_tp_shapes, HookType.AROUND,
           "--dcp-comm lse: SGLang's loaders see TP's shapes; re-gather after")
      for name in _WEIGHTS_BY_NAME),
    Hook("sglang.srt.distributed.parallel_state.destroy_model_parallel",
         destroy_dcp_group_after, HookType.AFTER, "tear the DCP group down"),
    Hook("sglang.srt.distributed.parallel_state.graph_capture", graph_capture_with_dcp,
         HookType.AROUND, "DCP collectives inside CUDA graphs"),
    Hook("sglang.srt.model_executor.model_runner_kv_cache_mixin.ModelRunnerKVCacheMixin._init_pools",
         init_pools_with_dcp, HookType.AROUND, "physical pool, logical allocator and capacity"),
    Hook("sglang.srt.model_executor.model_runner_kv_cache_mixin.ModelRunnerKVCacheMixin."
         "_profile_available_bytes", reserve_extend_memory, HookType.AFTER,
         "room for DCP's extend activations beside the KV pool"),
    Hook(f"{_MODEL_RUNNER}._get_attention_backend_from_str", attention_backend_from_str,
         HookType.AROUND, "DCP attention backends"),
    Hook("sglang.srt.configs.update_config.adjust_config_with_unaligned_cpu_tp",
         keep_kv_heads_replicated, HookType.AROUND, "no KV-head padding on CPU under DCP"),
    Hook("sglang.srt.speculative.draft_utils.DraftBackendFactory.create_decode_backend",
         draft_decode_backend_with_dcp, HookType.AROUND, "DCP backends for the draft's decode steps"),
    Hook("sglang.srt.speculative.draft_utils.DraftBackendFactory.create_draft_extend_backend",
         draft_extend_backend_with_dcp, HookType.AROUND, "DCP backend for the draft's extend"),
    Hook("sglang.srt.mem_cache.memory_pool.MHATokenToKVPool.move_kv_cache", move_kv_with_dcp,
         HookType.AROUND, "speculative KV moves between logical slots of two ranks"),
    Hook("sglang.srt.models.utils.enable_fused_set_kv_buffer", no_fused_kv_store_with_dcp,
         HookType.AROUND, "no fused RoPE + KV store under DCP"),
    Hook("sglang.srt.managers.scheduler.Scheduler.on_idle", check_allocator_replicas_after_idle,
         HookType.AFTER, "DCP ranks' allocator replicas agree at idle (device and host)"),
    Hook("sglang.srt.mem_cache.memory_pool_host.get_mha_host_pool_cls", host_pool_class_with_dcp,
         HookType.AROUND, "HiCache: each rank's host pool holds its stripe of the logical slots"),
    Hook("sglang.srt.managers.cache_controller.HiCacheController.attach_storage_backend",
         attach_storage_to_stripes, HookType.AROUND,
         "HiCache L3: file only, keys salted by DCP size and physical page"),
)


# Test-only hook tables: environment variable -> module with ``HOOKS`` and ``on_enable()``.
TEST_MODES = {
    "SGLANG_DCP_SHARED_GPU": "sglang_dcp.test.shared_gpu",
    "SGLANG_DCP_TEST_CPU_SPECULATION": "sglang_dcp.test.speculative_cpu",
    "SGLANG_DCP_TEST_CPU_HICACHE": "sglang_dcp.test.hicache_cpu",
}


def enabled_test_modes() -> list:
    return [importlib.import_module(module) for env, module in TEST_MODES.items() if os.environ.get(env) == "1"]


def active_hooks() -> tuple:
    """``HOOKS`` and the tables of the test modes enabled in this process."""
    return HOOKS + tuple(hook for mode in enabled_test_modes() for hook in mode.HOOKS)


def register() -> None:
    """Register every hook of the table (and of the test modes the environment enables);
    called by the entry point ``sglang_dcp.register`` under SGLang 0.5.14 only."""
    for mode in enabled_test_modes():
        mode.on_enable()
    for hook in active_hooks():
        HookRegistry.register(hook.target, hook.hook, hook.kind)


def require_hooks_applied() -> None:
    missing = [hook.target for hook in active_hooks() if hook.target not in HookRegistry._patched]
    if missing:
        raise RuntimeError(
            "sglang-dcp: these SGLang hooks did not apply (see the 'Failed to apply hooks' "
            f"log above; sglang must be 0.5.14): {', '.join(missing)}"
        )
