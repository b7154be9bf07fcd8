"""Merging partial attention results by their log-sum-exp (online softmax).

A partial result over a key subset ``S_i`` is ``(o_i, lse_i)`` with
``lse_i = log_b sum_{k in S_i} b^{s_k}`` (``b`` = 2 for FlashInfer, e for PyTorch) and
``o_i = sum_{k in S_i} b^{s_k - lse_i} v_k``. Over the union,
``lse = log_b sum_i b^{lse_i}`` and ``o = sum_i w_i o_i`` with ``w_i = b^{lse_i - lse}``.
An empty subset has ``lse_i = -inf`` and weight 0; if every subset is empty the merged
``lse`` is ``-inf`` and every weight is 0.

``dcp_merge`` applies this across a DCP group with one collective: every rank packs its
partial results for the gathered heads by owner (chunk ``c`` of the exchange buffer holds
``o`` and base-2 ``lse`` of the heads of rank ``c``, ``PartialLayout``), one all-to-all
hands each rank the D partials of its own heads, and a local merge combines them and
casts to the output dtype. Pack and merge are fused Triton kernels on CUDA, PyTorch
elsewhere.

``scale_by_group_lse`` is the other way (``--dcp-comm lse``): no merge at all. Rank ``r``
all-gathers only the group's LSEs and scales its own partial outputs of all heads,
``o_r * b^(lse_r - lse)``; ``sum_r`` of the scaled partials is the merged output, so a
linear map applied on each rank (``o_proj`` over the group's heads) and summed over the
ranks (the TP all-reduce) equals the map of the merged output.
"""

import dataclasses
import math
from typing import Sequence, Tuple

import torch

from sglang_dcp.distributed.parallel_state import all_gather_along_dim, all_to_all_chunks


def to_base2(lse: torch.Tensor, lse_base: float) -> torch.Tensor:
    """``lse`` as a float32 base-2 log-sum-exp (``log2(x) = ln(x) * log2(e)``)."""
    lse = lse.float()
    return lse if lse_base == 2.0 else lse * math.log2(lse_base)


def from_base2(lse2: torch.Tensor, lse_base: float) -> torch.Tensor:
    return lse2 if lse_base == 2.0 else lse2 / math.log2(lse_base)


def lse_weights(lse2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weights ``w_i = 2^(lse_i - lse)`` and merged ``lse`` for base-2 ``lse2 [N, ...]``.

    Returns ``(w [N, ...], lse [...])`` in float32; ``-inf`` entries get weight 0.
    """
    lse_max = lse2.amax(dim=0)
    finite_max = torch.where(torch.isinf(lse_max), torch.zeros_like(lse_max), lse_max)
    unnormalized = torch.exp2(lse2 - finite_max)
    total = unnormalized.sum(dim=0)
    weights = torch.nan_to_num(unnormalized / total, nan=0.0)
    return weights, finite_max + torch.log2(total)


def weighted(o: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight * o`` in float32, exactly 0 where the weight is 0 (an empty shard's
    output is never read, so garbage or NaN there cannot leak into the merge)."""
    weight = weight.unsqueeze(-1)
    return torch.where(weight > 0, o.float() * weight, 0.0)


def merge_states(
    outputs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor], lse_base: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge local partial results ``(o_i [T, H, dv], lse_i [T, H])``; float32 output."""
    weights, lse2 = lse_weights(torch.stack([to_base2(x, lse_base) for x in lses]))
    merged = sum(weighted(o, w) for w, o in zip(weights, outputs))
    return merged, from_base2(lse2, lse_base)


@dataclasses.dataclass(frozen=True)
class PartialLayout:
    """One chunk of the exchange buffer (``uint8 [D, chunk_bytes]``): the partial results
    for one owner's ``heads`` -- ``o [T, Hq, dv]`` in ``o_dtype``, then base-2
    ``lse [T, Hq]`` in float32."""

    tokens: int
    heads: int
    head_dim: int
    o_dtype: torch.dtype

    @property
    def o_bytes(self) -> int:
        return self.tokens * self.heads * self.head_dim * self.o_dtype.itemsize

    @property
    def chunk_bytes(self) -> int:
        return self.o_bytes + self.tokens * self.heads * 4

    def new_buffer(self, num_ranks: int, device) -> torch.Tensor:
        return torch.empty((num_ranks, self.chunk_bytes), dtype=torch.uint8, device=device)

    def views(self, buf: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(o [D, T, Hq, dv], lse [D, T, Hq])``: typed views into ``buf``."""
        shape = (buf.shape[0], self.tokens, self.heads)
        o = buf[:, : self.o_bytes].view(self.o_dtype).view(*shape, self.head_dim)
        return o, buf[:, self.o_bytes :].view(torch.float32).view(shape)


def owner_view(x: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """``x [T, D*Hq, ...]`` (rank-major heads) viewed as ``[D, T, Hq, ...]``: index ``c``
    holds the heads of rank ``c`` (no copy)."""
    tokens, heads = x.shape[:2]
    return x.view(tokens, num_ranks, heads // num_ranks, *x.shape[2:]).transpose(0, 1)


def pack_by_owner_torch(
    o: torch.Tensor, lse2: torch.Tensor, layout: PartialLayout, num_ranks: int
) -> torch.Tensor:
    """PyTorch reference of the pack step: ``o [T, D*Hq, dv]`` and base-2 ``lse2 [T, D*Hq]``
    into a new exchange buffer, chunk ``c`` holding the heads of rank ``c``."""
    buf = layout.new_buffer(num_ranks, o.device)
    o_buf, lse_buf = layout.views(buf)
    o_buf.copy_(owner_view(o.contiguous(), num_ranks))
    lse_buf.copy_(owner_view(lse2.contiguous(), num_ranks))
    return buf


def merge_packed_torch(
    buf: torch.Tensor, layout: PartialLayout, out_dtype: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of the merge step: the ``D`` partials of ``buf`` (one per rank)
    merged into ``o [T, Hq, dv]`` (``out_dtype``) and base-2 ``lse [T, Hq]``."""
    o_all, lse2_all = layout.views(buf)
    merged, lse2 = merge_states(list(o_all), list(lse2_all), 2.0)
    return merged.to(out_dtype), lse2


def packing_kernels(device: torch.device):
    """``(pack_by_owner, merge_packed)`` for ``device``: the fused Triton kernels on CUDA,
    the PyTorch references elsewhere."""
    if device.type == "cuda":
        from sglang_dcp.layers.attention.triton_ops import (
            merge_packed_triton,
            pack_by_owner_triton,
        )

        return pack_by_owner_triton, merge_packed_triton
    return pack_by_owner_torch, merge_packed_torch


def dcp_merge(
    group, o: torch.Tensor, lse: torch.Tensor, lse_base: float, out_dtype: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge the group's partial attention over disjoint token shards.

    ``o [T, D*Hq, dv]`` and ``lse [T, D*Hq]`` are this rank's results for the gathered
    heads (rank-major: rank ``r`` owns heads ``[r*Hq, (r+1)*Hq)``). Returns the merged
    ``o [T, Hq, dv]`` (``out_dtype``) and ``lse [T, Hq]`` (``lse_base``) of this rank's heads.
    """
    num_ranks = group.world_size
    tokens, heads, head_dim = o.shape
    layout = PartialLayout(tokens, heads // num_ranks, head_dim, o.dtype)
    pack_by_owner, merge_packed = packing_kernels(o.device)
    sent = pack_by_owner(o, to_base2(lse, lse_base), layout, num_ranks)
    merged, lse2 = merge_packed(all_to_all_chunks(group, sent), layout, out_dtype)
    return merged, from_base2(lse2, lse_base)


def scale_by_lse_torch(
    o: torch.Tensor, lse2_all: torch.Tensor, rank: int, out_dtype: torch.dtype
) -> torch.Tensor:
    """PyTorch reference of the scale step: this rank's ``o [T, H, dv]`` times its weight
    ``2^(lse2_all[rank] - lse)`` among the group's base-2 ``lse2_all [D, T, H]``, in
    ``out_dtype`` (0 where the weight is 0: an empty shard, or every shard empty)."""
    weights, _ = lse_weights(lse2_all)
    return weighted(o, weights[rank]).to(out_dtype)


def scaling_kernel(device: torch.device):
    """``scale_by_lse``: the fused Triton kernel on CUDA, the PyTorch reference elsewhere."""
    if device.type == "cuda":
        from sglang_dcp.layers.attention.triton_ops import scale_by_lse_triton

        return scale_by_lse_triton
    return scale_by_lse_torch


def scale_by_group_lse(
    group, o: torch.Tensor, lse: torch.Tensor, lse_base: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """This rank's share of the group's merged attention, without a merge.

    ``o [T, H, dv]`` and ``lse [T, H]`` (``lse_base``) are this rank's partial results over
    the tokens it stores, for all ``H = D*Hq`` heads of the group. One all-gather of the
    base-2 LSEs (``T * H`` floats per rank) gives ``lse = log2 sum_r 2^lse_r``; returns
    ``o * 2^(lse_r - lse)`` in ``out_dtype``, whose sum over the group's ranks is the merged
    output of every head (an empty shard contributes 0; every shard empty gives 0).
    """
    lse2_all = all_gather_along_dim(group, to_base2(lse, lse_base).unsqueeze(0), dim=0)
    return scaling_kernel(o.device)(o, lse2_all, group.rank_in_group, out_dtype)
