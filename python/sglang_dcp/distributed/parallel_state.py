"""The decode-context-parallel (DCP) process group and its collectives.

Each TP group of ``tp`` ranks is cut into ``tp / D`` DCP groups of ``D`` contiguous ranks
(``[0, D), [D, 2D), ...``). Contiguous ranks hold replicas of the same KV head
(``QKVParallelLinear`` uses ``shard = tp_rank // (tp / num_kv_heads)``), which is what
lets them split one KV head's tokens between them. A rank's place in its group is
``tp_rank % D``.
"""

import logging
from datetime import timedelta
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
# The allocator-replica check (``mem_cache.allocator``) runs on its own gloo group: every rank
# of a DCP group reaches it in the same idle loop, so a rank that does not arrive within this
# many seconds is out of step, and the check fails instead of waiting gloo's default 120 min.
REPLICA_CHECK_TIMEOUT_S = 60
_REPLICA_CHECK: Optional[torch.distributed.ProcessGroup] = None


def dcp_group_ranks(world_size: int, tp_size: int, dcp_size: int) -> List[List[int]]:
    """All DCP groups of the world: contiguous chunks of ``D`` ranks of each TP group.

    TP groups are the contiguous blocks ``[k * tp, (k + 1) * tp)`` and ``tp % D == 0``,
    so chunking the whole world by ``D`` never crosses a TP group.
    """
    assert tp_size % dcp_size == 0 and world_size % tp_size == 0
    return [list(range(start, start + dcp_size)) for start in range(0, world_size, dcp_size)]


def initialize_dcp_group(dcp_size: int, replica_check_timeout_s: float = REPLICA_CHECK_TIMEOUT_S) -> None:
    """Create this rank's DCP group and the gloo group of its allocator-replica check (with
    ``replica_check_timeout_s``); every rank of the world must call it."""
    global _DCP, _REPLICA_CHECK
    assert _DCP is None, "the DCP group is already initialized"
    tp_size = get_tp_group().world_size
    world = get_world_group()
    backend = torch.distributed.get_backend(world.device_group)
    groups = dcp_group_ranks(world.world_size, tp_size, dcp_size)
    _DCP = init_model_parallel_group(
        groups, world.local_rank, backend, use_custom_allreduce=False, group_name="dcp"
    )
    timeout = timedelta(seconds=replica_check_timeout_s)
    for ranks in groups:  # new_group is collective over the world: every rank creates every group
        check_group = torch.distributed.new_group(ranks, backend="gloo", timeout=timeout)
        if world.rank in ranks:
            _REPLICA_CHECK = check_group
    logger.info(
        "DCP group initialized: size=%d, rank in group=%d, ranks=%s",
        _DCP.world_size,
        _DCP.rank_in_group,
        _DCP.ranks,
    )


def destroy_dcp_group() -> None:
    global _DCP, _REPLICA_CHECK
    if _DCP is not None:
        _DCP.destroy()
    if _REPLICA_CHECK is not None:
        torch.distributed.destroy_process_group(_REPLICA_CHECK)
    _DCP = _REPLICA_CHECK = None


def get_dcp_group() -> GroupCoordinator:
    assert _DCP is not None, "the DCP group is not initialized"
    return _DCP


def get_replica_check_group() -> torch.distributed.ProcessGroup:
    """This rank's gloo group for the allocator-replica check (``REPLICA_CHECK_TIMEOUT_S``)."""
    assert _REPLICA_CHECK is not None, "the DCP group is not initialized"
    return _REPLICA_CHECK


def dcp_graph_capture(context):
    """Enter the DCP group's graph-capture mode (pynccl on) inside ``context``."""
    return get_dcp_group().graph_capture(context)


def dcp_is_initialized() -> bool:
    return _DCP is not None


def all_gather_along_dim(group: GroupCoordinator, x: torch.Tensor, dim: int) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in rank order (contiguous result)."""
    return group.all_gather(x.contiguous(), dim=dim).contiguous()


def all_to_all_chunks(group: GroupCoordinator, x: torch.Tensor) -> torch.Tensor:
    """Chunk ``c`` of ``x [D, ...]`` goes to rank ``c``; returns ``y [D, ...]`` with ``y[c]``
    the chunk rank ``c`` sent here.

    During CUDA-graph capture (pynccl on) one NCCL group of send/recv pairs, as SGLang's
    pynccl collectives are captured; otherwise ``torch.distributed.all_to_all_single``
    (NCCL, or gloo on CPU).
    """
    assert x.shape[0] == group.world_size, f"{tuple(x.shape)}: dim 0 must be the group size"
    x = x.contiguous()
    out = torch.empty_like(x)
    pynccl = group.pynccl_comm
    if pynccl is not None and not pynccl.disabled:
        pynccl.group_start()
        for peer in range(group.world_size):
            pynccl.send(x[peer], peer)
            pynccl.recv(out[peer], peer)
        pynccl.group_end()
    else:
        torch.distributed.all_to_all_single(out, x, group=group.device_group)
    return out
