"""Run a function on every rank of a DCP group of spawned processes on gloo (CPU), for tests
of the collectives and of the DCP backends without an engine."""

import os
import socket
from typing import Callable, Optional

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(target, rank, world, dcp, port, errors, args, group_kwargs):
    os.environ["SGLANG_NCCL_SO_PATH"] = "/nonexistent/libnccl.so.2"  # gloo only
    try:
        from sglang.srt.distributed.parallel_state import (
            init_distributed_environment,
            initialize_model_parallel,
        )

        from sglang_dcp.distributed.parallel_state import get_dcp_group, initialize_dcp_group

        init_distributed_environment(
            world_size=world, rank=rank, local_rank=rank, backend="gloo",
            distributed_init_method=f"tcp://127.0.0.1:{port}",
        )
        initialize_model_parallel(tensor_model_parallel_size=world, backend="gloo")
        initialize_dcp_group(dcp, **group_kwargs)
        target(rank, get_dcp_group(), *args)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        errors.put(f"rank {rank}: {type(e).__name__}: {e}")
        raise


def run_in_dcp_groups(target: Callable, world: int, dcp: int, *args, timeout: float = 240,
                      group_kwargs: Optional[dict] = None) -> None:
    """``target(rank, dcp_group, *args)`` in ``world`` spawned processes (one TP group of
    ``world`` ranks cut into DCP groups of ``dcp``, made by ``initialize_dcp_group(dcp,
    **group_kwargs)``); raises with every rank's error. ``target`` must be importable (a
    module-level function)."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(target, rank, world, dcp, port, errors, args, group_kwargs or {}))
        for rank in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert not messages, messages
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
