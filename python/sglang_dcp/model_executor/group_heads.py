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
is not covered (a quantized or CPU-packed linear method, other names or shapes, LoRA,
torchao), the whole model stays on a2a, with one log line saying why. Each rank then holds
``D - 1`` extra copies of its ``q`` rows and ``o_proj`` columns (logged in MiB). Weight
updates after load (``update_weights_from_*``) are not re-gathered.
"""

import logging
from typing import List, Tuple

import torch

from sglang.srt.layers.linear import QKVParallelLinear, RowParallelLinear
from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.utils import use_intel_amx_backend

from sglang_dcp.distributed.parallel_state import all_gather_along_dim, get_dcp_group

logger = logging.getLogger(__name__)


def has_group_heads(layer: RadixAttention) -> bool:
    """Whether ``layer`` computes the query heads of its whole DCP group (``--dcp-comm lse``)."""
    return getattr(layer, "dcp_group_heads", False)


def uncovered_reason(module: torch.nn.Module) -> str:
    """Why ``module`` (whose ``attn`` is a RadixAttention) cannot take its group's heads, or ''."""
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


def take_group_heads(module: torch.nn.Module, group) -> int:
    """Widen one covered attention module to its group's ``D*Hq`` heads (module doc); returns
    the extra bytes this rank now holds."""
    d = group.world_size
    qkv, o_proj, attn = module.qkv_proj, module.o_proj, module.attn
    q_rows = module.q_size
    before = sum(p.numel() * p.element_size() for p in (*qkv.parameters(), *o_proj.parameters()))
    qkv.weight.data = gather_q_rows(qkv.weight.data, q_rows, group)
    if qkv.bias is not None:
        qkv.bias.data = gather_q_rows(qkv.bias.data, q_rows, group)
    o_proj.weight.data = all_gather_along_dim(group, o_proj.weight.data, dim=1)

    qkv.num_heads *= d
    qkv.q_proj_shard_size *= d
    qkv.output_size_per_partition += (d - 1) * q_rows
    qkv.output_partition_sizes[0] *= d
    o_proj.input_size_per_partition *= d
    module.num_heads *= d
    module.q_size *= d
    attn.tp_q_head_num *= d
    attn.dcp_group_heads = True
    after = sum(p.numel() * p.element_size() for p in (*qkv.parameters(), *o_proj.parameters()))
    return after - before


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
