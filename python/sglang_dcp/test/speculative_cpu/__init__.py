"""CPU speculative decoding test mode (``SGLANG_DCP_TEST_CPU_SPECULATION=1``).

How to turn it on: set ``SGLANG_DCP_TEST_CPU_SPECULATION=1`` in the environment before the
engine starts (every process of the engine inherits it; ``hooks.register`` then adds this
package's ``HOOKS``, and logs a warning in every process), and run on CPU with the
torch_native backend, e.g.::

    SGLANG_DCP_TEST_CPU_SPECULATION=1 python -c '...sglang.Engine(model_path=..., device="cpu",
        attention_backend="torch_native", speculative_algorithm="EAGLE",
        speculative_draft_model_path=..., speculative_num_steps=3, speculative_eagle_topk=1,
        speculative_num_draft_tokens=4, ...)'

Test support only: SGLang 0.5.14 runs speculative decoding on CUDA only. With the variable set,
NGRAM, EAGLE / EAGLE3 (topk 1 and > 1, page size 1) and STANDALONE run on CPU through:

* PyTorch versions of the ``sgl_kernel`` tree kernels (``tree``) in place of
  ``build_tree_kernel_efficient`` and ``verify_tree_greedy``, and, for the ones SGLang imports
  from ``sgl_kernel`` inside functions (NGRAM's tree reconstruction, sampled verification), a
  stand-in ``sgl_kernel`` module where the real one cannot load (no CUDA);
* PyTorch versions of the Triton kernels of the speculative path (``kernels``);
* TARGET_VERIFY with the tree mask and the draft's multi-step decode for the torch_native
  backend at dcp 1 (``attention``); under DCP the product's backends run them;
* under DCP, page size > 1 with topk > 1 allowed on torch_native (DCP's backend handles it);
* the n-gram corpus compiled with ``<cstddef>`` (GCC 12), NGRAM allowed on CPU and its worker
  on the engine's device, KV moves in PyTorch (``SGLANG_NATIVE_MOVE_KV_CACHE``), no
  ``torch.cuda.synchronize`` when a draft shares the target's embeddings, no
  ``record_stream`` on CPU tensors in the overlap scheduler.

Any device but CPU is refused before the engine starts.
"""

import contextlib
import logging
import os
import sys
import types

import torch

from sglang.srt.plugins.hook_registry import HookType

from sglang_dcp.hooks import Hook
from sglang_dcp.layers.attention.dcp_backend import DCPMultiStepDraftBackend
from sglang_dcp.server_args import DCPConfigError
from sglang_dcp.test.speculative_cpu import attention, kernels, tree

logger = logging.getLogger(__name__)

ENV = "SGLANG_DCP_TEST_CPU_SPECULATION"
_SPEC = "sglang.srt.speculative"
_CACHE_LOCS = f"{_SPEC}.triton_ops.cache_locs"
_DRAFT_FACTORY = f"{_SPEC}.draft_utils.DraftBackendFactory"


@contextlib.contextmanager
def replaced(owner, name: str, value):
    """``owner.name = value`` inside the block."""
    previous = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, previous)


def check_cpu_speculation_args(_result, server_args) -> None:
    """In the launching process, before any scheduler starts: CPU only, loud in the log."""
    from sglang_dcp.hooks import require_hooks_applied

    if server_args.device != "cpu":
        raise DCPConfigError(f"{ENV}=1 replaces CUDA kernels for CPU tests; unset it for --device {server_args.device}.")
    require_hooks_applied()
    logger.warning("%s=1 (test mode): speculative decoding through the CPU test stand-ins", ENV)


def ngram_on_cpu(original, server_args):
    """SGLang refuses NGRAM on any device but CUDA (``_handle_ngram``'s first check)."""
    if server_args.device != "cpu":
        return original(server_args)
    with replaced(server_args, "device", "cuda"):
        return original(server_args)


def paged_trees_on_torch_native_dcp(original, server_args):
    """SGLang refuses ``--page-size > 1`` with ``--speculative-eagle-topk > 1`` on any backend
    but flashinfer, fa3 and triton (``_handle_eagle_family``). DCP's torch_native backend reads
    the paged draft-tree layout token by token, so under DCP the check sees flashinfer."""
    paged_tree = server_args.page_size > 1 and (server_args.speculative_eagle_topk or 1) > 1
    if server_args.attention_backend != "torch_native" or server_args.dcp_size == 1 or not paged_tree:
        return original(server_args)
    with replaced(server_args, "attention_backend", "flashinfer"):
        return original(server_args)


def ngram_corpus_with_cstddef(original, *args, **kwargs):
    """The n-gram corpus sources use ``size_t`` without ``<cstddef>``, which GCC 12 needs."""
    if args[:1] == ("ngram_corpus",):
        kwargs["extra_cflags"] = [*(kwargs.get("extra_cflags") or []), "-include", "cstddef"]
    return original(*args, **kwargs)


def ngram_worker_on_engine_device(_result, worker, *args, **kwargs):
    """The NGRAM worker hard-codes ``cuda:<gpu_id>``; its buffers are made later, on this."""
    worker.device = worker.server_args.device


def no_cuda_synchronize(original, *args, **kwargs):
    """Around a model's ``set_embed_and_head`` / ``set_embed``, which end with
    ``torch.cuda.synchronize()`` (no CUDA here)."""
    with replaced(torch.cuda, "synchronize", lambda *_, **__: None):
        return original(*args, **kwargs)


def record_stream_skips_cpu(original, *args, **kwargs):
    """Around ``FutureMap._resolve_spec_extras``: ``record_stream`` fails on CPU tensors,
    whose memory no stream reuses."""
    record_stream = torch.Tensor.record_stream

    def on_device_only(tensor, stream):
        if tensor.device.type != "cpu":
            record_stream(tensor, stream)

    with replaced(torch.Tensor, "record_stream", on_device_only):
        return original(*args, **kwargs)


def no_triton_kv_copy_warmup(original, pool):
    """The pool warms its Triton KV-copy kernel up; moves run in PyTorch here
    (``SGLANG_NATIVE_MOVE_KV_CACHE``)."""
    if pool.device != "cpu":
        return original(pool)
    pool._kv_copy_config = None


def uses_stock_torch_native(factory) -> bool:
    """Whether the draft's attention is stock torch_native (dcp 1): its backends come from here."""
    names = {factory.draft_attn_backend or name for name in factory.server_args.get_attention_backends()}
    return names == {"torch_native"} and factory.server_args.dcp_size == 1


def torch_native_draft_decode(original, factory):
    if not uses_stock_torch_native(factory):
        return original(factory)
    if factory.speculative_num_steps <= 1:
        return None
    return DCPMultiStepDraftBackend(
        lambda: attention.TorchNativeDraftStepBackend(factory.draft_model_runner),
        factory.topk,
        factory.speculative_num_steps,
    )


def torch_native_draft_extend(original, factory):
    if not uses_stock_torch_native(factory):
        return original(factory)
    return attention.TorchNativeAttnBackend(factory.draft_model_runner)


def install_sgl_kernel_stand_in() -> None:
    """Where ``sgl_kernel`` cannot load (no CUDA), a module with the PyTorch versions of the
    kernels SGLang imports from it at call time: ``sgl_kernel.speculative``'s
    ``reconstruct_indices_from_tree_mask`` (NGRAM) and the sampled verification's three."""
    try:
        import sgl_kernel  # noqa: F401

        return
    except ImportError:
        pass
    stand_in = types.ModuleType("sgl_kernel")
    stand_in.__doc__ = f"CPU test stand-in ({__name__}); not the sgl_kernel package."
    for name in ("tree_speculative_sampling_target_only", "top_k_renorm_prob", "top_p_renorm_prob",
                 "reconstruct_indices_from_tree_mask"):
        setattr(stand_in, name, getattr(tree, name))
    stand_in.speculative = stand_in
    sys.modules["sgl_kernel"] = sys.modules["sgl_kernel.speculative"] = stand_in


HOOKS = (
    Hook("sglang.srt.server_args.ServerArgs.check_server_args", check_cpu_speculation_args,
         HookType.AFTER, "CPU speculation: CPU only, loud in the log"),
    Hook("sglang.srt.arg_groups.speculative_hook._handle_ngram", ngram_on_cpu, HookType.AROUND,
         "CPU speculation: NGRAM allowed on CPU"),
    Hook("sglang.srt.arg_groups.speculative_hook._handle_eagle_family", paged_trees_on_torch_native_dcp,
         HookType.AROUND, "CPU speculation: paged draft trees on DCP's torch_native backend"),
    Hook("sglang.jit_kernel.utils.load_jit", ngram_corpus_with_cstddef, HookType.AROUND,
         "CPU speculation: the n-gram corpus builds with GCC 12"),
    Hook(f"{_SPEC}.ngram_worker.NGRAMWorker.__init__", ngram_worker_on_engine_device, HookType.AFTER,
         "CPU speculation: the NGRAM worker on the engine's device"),
    Hook(f"{_SPEC}.eagle_utils.build_tree_kernel_efficient", tree.build_tree_kernel_efficient,
         HookType.REPLACE, "CPU speculation: EAGLE's verify tree in PyTorch"),
    Hook(f"{_SPEC}.eagle_utils.verify_tree_greedy_func", tree.verify_tree_greedy_func, HookType.REPLACE,
         "CPU speculation: greedy tree verification in PyTorch"),
    Hook(f"{_CACHE_LOCS}.assign_req_to_token_pool", kernels.AssignReqToTokenPool, HookType.REPLACE,
         "CPU speculation: Triton kernel in PyTorch"),
    Hook(f"{_CACHE_LOCS}.assign_extend_cache_locs", kernels.AssignExtendCacheLocs, HookType.REPLACE,
         "CPU speculation: Triton kernel in PyTorch"),
    Hook(f"{_CACHE_LOCS}.assign_extend_cache_locs_func", kernels.assign_extend_cache_locs_func,
         HookType.REPLACE, "CPU speculation: verify slots on CPU"),
    Hook(f"{_CACHE_LOCS}.assign_draft_cache_locs_contiguous", kernels.AssignDraftCacheLocsContiguous,
         HookType.REPLACE, "CPU speculation: Triton kernel in PyTorch"),
    Hook(f"{_SPEC}.triton_ops.eagle.fill_accept_out_cache_loc", kernels.FillAcceptOutCacheLoc,
         HookType.REPLACE, "CPU speculation: Triton kernel in PyTorch"),
    Hook(f"{_SPEC}.triton_ops.eagle.fill_bonus_tokens", kernels.FillBonusTokens, HookType.REPLACE,
         "CPU speculation: Triton kernel in PyTorch"),
    Hook(f"{_SPEC}.triton_ops.gather_spec_extras.gather_spec_extras", kernels.gather_spec_extras,
         HookType.REPLACE, "CPU speculation: Triton kernel in PyTorch"),
    Hook("sglang.srt.managers.overlap_utils.FutureMap._resolve_spec_extras", record_stream_skips_cpu,
         HookType.AROUND, "CPU speculation: no record_stream on CPU tensors"),
    Hook("sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._init_kv_copy_and_warmup",
         no_triton_kv_copy_warmup, HookType.AROUND, "CPU speculation: no Triton KV-copy warm-up"),
    Hook("sglang.srt.models.llama.LlamaForCausalLM.set_embed_and_head", no_cuda_synchronize,
         HookType.AROUND, "CPU speculation: no torch.cuda.synchronize"),
    Hook("sglang.srt.models.llama.LlamaForCausalLM.set_embed", no_cuda_synchronize, HookType.AROUND,
         "CPU speculation: no torch.cuda.synchronize"),
    Hook("sglang.srt.models.qwen2.Qwen2ForCausalLM.set_embed_and_head", no_cuda_synchronize,
         HookType.AROUND, "CPU speculation: no torch.cuda.synchronize"),
    Hook("sglang.srt.models.qwen3.Qwen3ForCausalLM.set_embed_and_head", no_cuda_synchronize,
         HookType.AROUND, "CPU speculation: no torch.cuda.synchronize"),
    Hook("sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend.forward_extend",
         attention.verify_with_tree_mask, HookType.AROUND, "CPU speculation: TARGET_VERIFY on torch_native"),
    Hook(f"{_DRAFT_FACTORY}.create_decode_backend", torch_native_draft_decode, HookType.AROUND,
         "CPU speculation: torch_native draft decode steps"),
    Hook(f"{_DRAFT_FACTORY}.create_draft_extend_backend", torch_native_draft_extend, HookType.AROUND,
         "CPU speculation: torch_native draft extend"),
)


def on_enable() -> None:
    """Before the hooks apply, in every process of the engine."""
    logger.warning("%s=1 (test mode): SGLang's speculative kernels are replaced by CPU stand-ins", ENV)
    os.environ["SGLANG_NATIVE_MOVE_KV_CACHE"] = "1"
    install_sgl_kernel_stand_in()
