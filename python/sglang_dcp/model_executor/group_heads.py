"""``--dcp-comm lse``: every rank computes the query heads of its whole DCP group.

After the weights load (``take_group_heads_after_load``), each attention module built from
``qkv_proj`` (``QKVParallelLinear``), ``o_proj`` (``RowParallelLinear``) and ``attn``
(``RadixAttention``) takes, by one all-gather each over the DCP group in rank order:

* the group's ``q`` rows of ``qkv_proj`` (weight and bias): its output becomes
  ``[q of D*Hq heads, k, v]``, head ``c*Hq + j`` being head ``j`` of DCP rank ``c`` (the
  order in which the a2a path gathers Q). q-norm and RoPE work per head, unchanged;
* the group's input columns of ``o_proj``: it takes ``D*Hq`` heads. Its bias stays on TP
  rank 0 only, and SGLang's TP all-reduce after it sums the DCP ranks' LSE-scaled partials
  (``merge.scale_by_group_lse``) along with the TP shards.

The module's ``num_heads`` and ``q_size``, the projections' partition sizes and the layer's
``tp_q_head_num`` grow ``D`` times to match, so the model's split and reshapes work
unchanged; ``layer.dcp_group_heads`` tells the attention backend. If any attention module
is not covered (a class not in ``VERIFIED_ATTENTION_CLASSES``, whose per-head state may lie
outside these three, a quantized or CPU-packed linear method, other names or shapes, LoRA,
torchao), the whole model stays on a2a, with one log line saying why. Each rank then holds
``D - 1`` extra copies of its ``q`` rows and ``o_proj`` columns (logged in MiB).

SGLang's weight APIs (``update_weights_from_disk`` / ``_tensor`` / ``_distributed`` /
``_ipc``, ``get_weights_by_name``, ``check_weights``, saving and sending weights) address
weights by checkpoint name and slice them by TP rank. They run inside ``tp_shapes``
(``at_tp_shapes`` hooks): every layer gives its group's heads back (TP's shapes and head
counts, its own rows and columns), and after the call takes the group's heads of the
weights the ranks then hold, written into the same storage.
"""

import contextlib
import logging
from typing import List, Optional, Tuple

import torch

from sglang.srt.layers.linear import QKVParallelLinear, RowParallelLinear
from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.utils import use_intel_amx_backend

from sglang_dcp.distributed.parallel_state import all_gather_along_dim, get_dcp_group

logger = logging.getLogger(__name__)

# The attention classes of SGLang 0.5.14 verified with --dcp-comm lse: all their per-head
# state is in qkv_proj, o_proj and attn (a q/k norm, if any, is per head_dim). Another class
# may hold state split by TP over the query heads (a per-head norm weight, an output gate, an
# attention sink) that widening would not widen, so it stays on a2a.
VERIFIED_ATTENTION_CLASSES = frozenset({
    "sglang.srt.models.llama.LlamaAttention",  # also Mistral and others built from it
    "sglang.srt.models.qwen2.Qwen2Attention",
    "sglang.srt.models.qwen3.Qwen3Attention",
    "sglang.srt.models.qwen3_moe.Qwen3MoeAttention",
    "sglang.srt.models.gemma.GemmaAttention",
    "sglang.srt.models.glm4.Glm4Attention",
})  # fmt: skip


def has_group_heads(layer: RadixAttention) -> bool:
    """Whether ``layer`` computes the query heads of its whole DCP group (``--dcp-comm lse``)."""
    return getattr(layer, "dcp_group_heads", False)


def uncovered_reason(module: torch.nn.Module) -> str:
    """Why ``module`` (whose ``attn`` is a RadixAttention) cannot take its group's heads, or ''."""
    cls = f"{type(module).__module__}.{type(module).__qualname__}"
    if cls not in VERIFIED_ATTENTION_CLASSES:
        return f"{cls} is not an attention class verified with lse (VERIFIED_ATTENTION_CLASSES)"
    qkv, o_proj, attn = module.qkv_proj, module.o_proj, module.attn
    if not (isinstance(qkv, QKVParallelLinear) and isinstance(o_proj, RowParallelLinear)):
        return "attention not built from qkv_proj (QKVParallelLinear) and o_proj (RowParallelLinear)"
    for linear in (qkv, o_proj):
        if type(linear.quant_method) is not UnquantizedLinearMethod or use_intel_amx_backend(linear):
            return f"{type(linear.quant_method).__name__} weights (an unquantized F.linear is needed)"
    heads = attn.tp_q_head_num
    if (
        getattr(module, "num_heads", None) != heads
        or getattr(module, "q_size", None) != heads * attn.qk_head_dim
        or (qkv.num_heads, qkv.head_size) != (heads, attn.qk_head_dim)
    ):
        return "no num_heads / q_size that match its qkv_proj and RadixAttention"
    if not o_proj.input_is_parallel or o_proj.input_size_per_partition != heads * attn.v_head_dim:
        return "o_proj does not take this rank's heads"
    return ""


def attention_modules(model: torch.nn.Module) -> Tuple[List[Tuple[str, torch.nn.Module]], str]:
    """The modules that own a RadixAttention as ``attn`` with ``qkv_proj`` and ``o_proj``,
    and why the model is not covered ('' if every one of them is)."""
    modules = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(getattr(module, "attn", None), RadixAttention)
    ]
    num_layers = sum(isinstance(module, RadixAttention) for module in model.modules())
    if len(modules) != num_layers or not modules:
        return modules, "a RadixAttention outside an attention module's `attn`"
    for name, module in modules:
        if not (hasattr(module, "qkv_proj") and hasattr(module, "o_proj")):
            return modules, f"{name}: no qkv_proj / o_proj"
        reason = uncovered_reason(module)
        if reason:
            return modules, f"{name}: {reason}"
    return modules, ""


def gather_q_rows(x: torch.Tensor, q_rows: int, group) -> torch.Tensor:
    """``[q; k; v]`` rows of a ``qkv_proj`` weight or bias -> ``[q of the group; k; v]``."""
    return torch.cat([all_gather_along_dim(group, x[:q_rows], dim=0), x[q_rows:]])


def set_query_heads(module: torch.nn.Module, heads: int) -> None:
    """Every count of query heads that ``module``, its ``qkv_proj``, ``o_proj`` and ``attn``
    keep, set for ``heads`` query heads of ``qk_head_dim`` / ``v_head_dim``."""
    qkv, o_proj, attn = module.qkv_proj, module.o_proj, module.attn
    q_rows = heads * attn.qk_head_dim
    qkv.output_size_per_partition += q_rows - qkv.output_partition_sizes[0]
    qkv.output_partition_sizes[0] = qkv.q_proj_shard_size = q_rows
    qkv.num_heads = module.num_heads = attn.tp_q_head_num = heads
    module.q_size = q_rows
    o_proj.input_size_per_partition = heads * attn.v_head_dim


def widened_params(module: torch.nn.Module) -> List[Optional[torch.nn.Parameter]]:
    """The parameters that ``take_group_heads`` widens: ``qkv_proj``'s weight and bias
    (``None`` without one) and ``o_proj``'s weight."""
    return [module.qkv_proj.weight, module.qkv_proj.bias, module.o_proj.weight]


def take_group_heads(
    module: torch.nn.Module, group, into: Optional[List[Optional[torch.Tensor]]] = None
) -> int:
    """Widen one covered attention module to its group's ``D*Hq`` heads (module doc); returns
    the extra bytes this rank now holds. With ``into`` (what ``give_back_group_heads``
    returned), the group's rows and columns are written into those tensors in place: their
    storage, which captured CUDA graphs read, stays the same."""
    d = group.world_size
    params = widened_params(module)
    before = sum(p.numel() * p.element_size() for p in params if p is not None)
    qkv_weight, qkv_bias, o_weight = (None if p is None else p.data for p in params)
    gathered = [
        gather_q_rows(qkv_weight, module.q_size, group),
        None if qkv_bias is None else gather_q_rows(qkv_bias, module.q_size, group),
        all_gather_along_dim(group, o_weight, dim=1),
    ]
    for param, new, old in zip(params, gathered, into or [None] * len(params)):
        if param is not None:
            param.data = new if old is None else old.copy_(new)
    set_query_heads(module, module.num_heads * d)
    module.attn.dcp_group_heads = True
    return sum(p.numel() * p.element_size() for p in params if p is not None) - before


def give_back_group_heads(module: torch.nn.Module, group) -> List[Optional[torch.Tensor]]:
    """Undo ``take_group_heads``: ``module`` holds this rank's ``Hq`` heads again (TP's
    shapes: its own ``q`` rows before the ``k``/``v`` rows, its own ``o_proj`` columns, the
    latter a view into the group's). Returns the group's tensors, for ``take_group_heads``."""
    d, rank = group.world_size, group.rank_in_group
    heads = module.num_heads // d
    q_rows = heads * module.attn.qk_head_dim
    own_q = slice(rank * q_rows, (rank + 1) * q_rows)
    params = widened_params(module)
    widened = [None if p is None else p.data for p in params]
    for param in params[:2]:
        if param is not None:
            param.data = torch.cat([param.data[own_q], param.data[d * q_rows :]])
    columns = params[2].shape[1] // d
    params[2].data = params[2].data[:, rank * columns : (rank + 1) * columns]
    set_query_heads(module, heads)
    module.attn.dcp_group_heads = False
    return widened


def group_head_modules(runner) -> List[torch.nn.Module]:
    """The attention modules of ``runner.model`` that hold their group's heads (none unless
    ``--dcp-size > 1 --dcp-comm lse``)."""
    args = runner.server_args
    if args.dcp_size == 1 or args.dcp_comm != "lse":
        return []
    return [
        module
        for module in runner.model.modules()
        if isinstance(getattr(module, "attn", None), RadixAttention) and has_group_heads(module.attn)
    ]


@contextlib.contextmanager
def tp_shapes(runner):
    """Inside, every attention module of ``runner.model`` holds this rank's heads at TP's shapes
    (``give_back_group_heads``); on the way out, the group's again, gathered from what each
    rank then holds (``take_group_heads`` into the same storage). Every rank of the DCP
    group must enter (it is collective on the way out). Inside, each rank holds a copy of
    its own ``q``/``k``/``v`` rows besides the group's."""
    modules = group_head_modules(runner)
    group = get_dcp_group() if modules else None
    widened = [give_back_group_heads(module, group) for module in modules]
    try:
        yield
    finally:
        for module, tensors in zip(modules, widened):
            take_group_heads(module, group, into=tensors)


def at_tp_shapes(original, runner, *args, **kwargs):
    """Around a ``ModelRunner`` method that reads or writes weights by their checkpoint names
    and TP shards (``update_weights_from_*``, ``get_weights_by_name``, ...): it runs with
    every layer at TP's shapes (``tp_shapes``), so SGLang's loaders slice the TP rank's rows
    and columns as without ``--dcp-comm lse``; the layers then take the group's heads of the
    new weights."""
    with tp_shapes(runner):
        return original(runner, *args, **kwargs)


def update_weights_from_disk_at_tp_shapes(original, runner, *args, recapture_cuda_graph=False, **kwargs):
    """``at_tp_shapes`` for ``update_weights_from_disk``, whose CUDA graphs (if asked to
    recapture) are captured after the layers hold their group's heads again."""
    if not group_head_modules(runner):
        return original(runner, *args, recapture_cuda_graph=recapture_cuda_graph, **kwargs)
    success, message = at_tp_shapes(original, runner, *args, **kwargs)
    if success and recapture_cuda_graph and runner.device == "cuda":
        runner.init_decode_cuda_graph()
    return success, message


def take_group_heads_after_load(_result, runner) -> None:
    """After ``ModelRunner.load_model`` with ``--dcp-size > 1 --dcp-comm lse``: every covered
    attention module takes its group's heads, or none does (a2a, logged)."""
    args = runner.server_args
    if args.dcp_size == 1 or args.dcp_comm != "lse":
        return
    modules, reason = attention_modules(runner.model)
    if args.enable_lora:
        reason = "LoRA adapters wrap qkv_proj / o_proj"
    elif args.torchao_config:
        reason = "torchao quantizes the linear layers after load"
    if reason:
        logger.warning("DCP: --dcp-comm lse falls back to a2a for this model: %s", reason)
        return
    group = get_dcp_group()
    extra = sum(take_group_heads(module, group) for _, module in modules)
    logger.info(
        "DCP: --dcp-comm lse: %d attention layers compute the %d query heads of their DCP "
        "group; extra weight memory per rank %.2f MiB (the group's q_proj rows and o_proj "
        "columns, %d extra copies)",
        len(modules),
        modules[0][1].attn.tp_q_head_num,
        extra / 2**20,
        group.world_size - 1,
    )
