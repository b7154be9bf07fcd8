"""Merging partial attention results by their log-sum-exp (online softmax).

A partial result over a key subset ``S_i`` is ``(o_i, lse_i)`` with
``lse_i = log_b sum_{k in S_i} b^{s_k}`` (``b`` = 2 for FlashInfer, e for PyTorch) and
``o_i = sum_{k in S_i} b^{s_k - lse_i} v_k``. Over the union,
``lse = log_b sum_i b^{lse_i}`` and ``o = sum_i w_i o_i`` with ``w_i = b^{lse_i - lse}``.
An empty subset has ``lse_i = -inf`` and weight 0; if every subset is empty the merged
``lse`` is ``-inf`` and every weight is 0.

``dcp_merge`` applies this across a DCP group: every rank scales its own partial output
by its weight (the only device-specific step: a fused Triton kernel on CUDA, PyTorch
elsewhere), laid out by owner (``[D, T, Hq, dv]``: chunk ``c`` holds the heads of rank
``c``), and one reduce-scatter over that first dim sums the scaled parts, handing each rank
the heads it owns without a transposing copy.
"""

import math
from typing import Sequence, Tuple

import torch

from sglang_dcp.distributed.parallel_state import (
    all_gather_along_dim,
    reduce_scatter_along_dim,
)

LOG2_E = math.log2(math.e)


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


def by_owner(x: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """``x [T, D*Hq, ...]`` (rank-major heads) as ``[D, T, Hq, ...]``: chunk ``c`` holds
    the heads of rank ``c``."""
    tokens, heads = x.shape[:2]
    x = x.reshape(tokens, num_ranks, heads // num_ranks, *x.shape[2:])
    return x.transpose(0, 1).contiguous()


def from_owner(x: torch.Tensor) -> torch.Tensor:
    """The inverse of ``by_owner``: ``[D, T, Hq, ...] -> [T, D*Hq, ...]``."""
    num_ranks, tokens, heads = x.shape[:3]
    return x.transpose(0, 1).reshape(tokens, num_ranks * heads, *x.shape[3:])


def scale_own_partial_torch(
    o: torch.Tensor, lse2_all: torch.Tensor, rank: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of the DCP correction step.

    ``o [T, H, dv]`` is this rank's partial output, ``lse2_all [D, T, H]`` every rank's
    base-2 LSE. Returns ``(w_rank * o`` in float32 ``by_owner`` (``[D, T, H/D, dv]``),
    merged base-2 ``lse [T, H])``.
    """
    weights, lse2 = lse_weights(lse2_all)
    return by_owner(weighted(o, weights[rank]), lse2_all.shape[0]), lse2


def scale_own_partial(
    o: torch.Tensor, lse2_all: torch.Tensor, rank: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The DCP correction step: fused Triton kernel on CUDA, PyTorch elsewhere."""
    if o.is_cuda:
        from sglang_dcp.layers.attention.triton_ops import scale_own_partial_triton

        return scale_own_partial_triton(o, lse2_all, rank)
    return scale_own_partial_torch(o, lse2_all, rank)


def dcp_merge(
    group, o: torch.Tensor, lse: torch.Tensor, lse_base: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge the group's partial attention over disjoint token shards.

    ``o [T, D*Hq, dv]`` and ``lse [T, D*Hq]`` are this rank's results for the gathered
    heads (rank-major: rank ``r`` owns heads ``[r*Hq, (r+1)*Hq)``). Returns the merged
    ``o [T, Hq, dv]`` (float32) and ``lse [T, Hq]`` (``lse_base``) of this rank's heads.
    """
    rank = group.rank_in_group
    lse2_all = all_gather_along_dim(group, to_base2(lse, lse_base).unsqueeze(0), dim=0)
    scaled, lse2 = scale_own_partial(o, lse2_all, rank)
    merged = reduce_scatter_along_dim(group, scaled, dim=0)[0]
    own_heads = lse2.shape[1] // group.world_size
    own_lse2 = lse2[:, rank * own_heads : (rank + 1) * own_heads]
    return merged, from_base2(own_lse2, lse_base)


def merge_states(
    outputs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor], lse_base: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge local partial results ``(o_i [T, H, dv], lse_i [T, H])``; float32 output."""
    weights, lse2 = lse_weights(torch.stack([to_base2(x, lse_base) for x in lses]))
    merged = sum(weighted(o, w) for w, o in zip(weights, outputs))
    return merged, from_base2(lse2, lse_base)
