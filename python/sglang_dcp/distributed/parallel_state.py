"""The decode-context-parallel (DCP) process group and its collectives.

Each TP group of ``tp`` ranks is cut into ``tp / D`` DCP groups of ``D`` contiguous ranks
(``[0, D), [D, 2D), ...``). Contiguous ranks hold replicas of the same KV head
(``QKVParallelLinear`` uses ``shard = tp_rank // (tp / num_kv_heads)``), which is what
lets them split one KV head's tokens between them. A rank's place in its group is
``tp_rank % D``.
"""

import logging
from typing import List, Optional

import torch
import torch.distributed

from sglang.srt.distributed.parallel_state import (
    GroupCoordinator,
    get_tp_group,
    get_world_group,
    init_model_parallel_group,
)

logger = logging.getLogger(__name__)

# Strong reference: SGLang's custom-op registry keeps groups only through weak refs.
_DCP: Optional[GroupCoordinator] = None


def dcp_group_ranks(world_size: int, tp_size: int, dcp_size: int) -> List[List[int]]:
    """All DCP groups of the world: contiguous chunks of ``D`` ranks of each TP group.

    TP groups are the contiguous blocks ``[k * tp, (k + 1) * tp)`` and ``tp % D == 0``,
    so chunking the whole world by ``D`` never crosses a TP group.
    """
    assert tp_size % dcp_size == 0 and world_size % tp_size == 0
    return [list(range(start, start + dcp_size)) for start in range(0, world_size, dcp_size)]


def initialize_dcp_group(dcp_size: int) -> None:
    """Create this rank's DCP group; every rank of the world must call it."""
    global _DCP
    assert _DCP is None, "the DCP group is already initialized"
    tp_size = get_tp_group().world_size
    world = get_world_group()
    backend = torch.distributed.get_backend(world.device_group)
    _DCP = init_model_parallel_group(
        dcp_group_ranks(world.world_size, tp_size, dcp_size),
        world.local_rank,
        backend,
        use_custom_allreduce=False,
        group_name="dcp",
    )
    logger.info(
        "DCP group initialized: size=%d, rank in group=%d, ranks=%s",
        _DCP.world_size,
        _DCP.rank_in_group,
        _DCP.ranks,
    )


def destroy_dcp_group() -> None:
    global _DCP
    if _DCP is not None:
        _DCP.destroy()
    _DCP = None


def get_dcp_group() -> GroupCoordinator:
    assert _DCP is not None, "the DCP group is not initialized"
    return _DCP


def dcp_graph_capture(context):
    """Enter the DCP group's graph-capture mode (pynccl on) inside ``context``."""
    return get_dcp_group().graph_capture(context)


def dcp_is_initialized() -> bool:
    return _DCP is not None


def all_gather_along_dim(group: GroupCoordinator, x: torch.Tensor, dim: int) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in rank order (contiguous result)."""
    return group.all_gather(x.contiguous(), dim=dim).contiguous()


def reduce_scatter_along_dim(
    group: GroupCoordinator, x: torch.Tensor, dim: int
) -> torch.Tensor:
    """Sum ``x`` over the group and keep chunk ``rank_in_group`` of ``dim``.

    NCCL: one reduce-scatter of ``x`` with ``dim`` moved first. gloo has no
    reduce-scatter; there it is an all-reduce followed by taking the own chunk.
    """
    world = group.world_size
    assert x.shape[dim] % world == 0, f"dim {dim} of {tuple(x.shape)} not divisible by {world}"
    moved = x.movedim(dim, 0).contiguous()
    if moved.is_cpu:
        torch.distributed.all_reduce(moved, group=group.device_group)
        chunk = moved.chunk(world, dim=0)[group.rank_in_group]
    else:
        chunk = moved.new_empty((moved.shape[0] // world,) + moved.shape[1:])
        group.reduce_scatter_tensor(chunk, moved)
    return chunk.movedim(0, dim).contiguous()
