"""One layer's decode attention, plain TP against TP + DCP (a2a and lse), each against its memory floor.

    python benchmark/dcp/bench_attention.py --dcp 2 [--batches 1,8,32,64,128,256]
        [--contexts 4096,16384,32768,65536,131072] [--out benchmark/dcp/results]
    python benchmark/dcp/bench_attention.py --device cpu --smoke --out /tmp/attn_smoke

Shape per rank: the upstream PR's headline model (Qwen3-235B-A22B at TP8): ``Hq = 8`` query
heads, ``Hkv = 1`` KV head, head_dim 128, bf16 (float32 on CPU). Every request of a batch of
``B`` has ``C`` cached tokens, stored in contiguous KV rows (page size 1).

* ``tp``: one rank's decode attention of its ``Hq`` heads over all ``C`` tokens with
  FlashInfer's ``BatchDecodeWithPagedKVCacheWrapper``, planned like SGLang's flashinfer
  backend (tensor cores by ``should_use_tensor_core``); no communication.
* ``dcp``: ``DCPAttnBackend.forward_decode`` without the KV write, on each of ``D`` ranks:
  ``all_gather_along_dim`` of Q over heads (``Hq -> D*Hq``), decode with LSE planned like
  ``FlashInferDCPAttnBackend`` over the ``C // D + (r < C % D)`` tokens rank ``r`` holds,
  ``dcp_merge`` (``--dcp-comm a2a``).
* ``lse``: the same with ``--dcp-comm lse``: the rank's own ``D*Hq`` query heads (no Q
  all-gather), decode with LSE as above, ``scale_by_group_lse`` (one all-gather of
  ``B*D*Hq`` LSEs, the partials scaled). Not in the time: ``q_proj``/``o_proj`` over ``D``
  times the heads (``D - 1`` extra weight reads per layer at batch 1), which the serving
  sweep measures.

Floors, with ``KV bytes/token = 2 (K and V) * Hkv * head_dim * elem_size`` and ``BW`` the HBM
read bandwidth of a large sum (bytes read / time):

    tp_floor  = B * C * KV bytes/token / BW
    dcp_floor = B * ceil(C / D) * KV bytes/token / BW + t_collective

where ``t_collective`` is one small all-gather over the DCP group (Q at ``B = 1``) timed like a
step, and ``ceil(C / D)`` is the share of rank 0, the largest (the same floor for lse).
ratio = measured / floor (goal: dcp ratio <= 1.3 at B >= 32); speedup = tp time / dcp time.

Timing. CUDA: the whole run is in SGLang's graph-capture mode (``graph_capture`` plus
``dcp_graph_capture``: a side stream, pynccl on for the TP and DCP groups, as in SGLang's decode
CUDA-graph runner); a CUDA graph of ``--steps-per-graph`` back-to-back steps is captured and
``--repeats`` back-to-back replays are timed with CUDA events. CPU (gloo): the same steps run
eagerly with PyTorch partial attention (``attention_with_lse``), timed with ``perf_counter``.
A time is the median over repeats per step, the slowest rank's. Once per run, at one small
point with an uneven split, the DCP output must equal the tp kernel over all tokens (relative
Frobenius error < 2e-2), and so must the lse outputs summed over the group, else the run fails.

Results: a table, ``bench_attention.json`` and ``bench_attention.png`` in ``--out``.
"""

import argparse
import contextlib
import json
import os
import socket
import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed
import torch.multiprocessing as mp
from tqdm import tqdm

from bench_common import int_list, pyplot, utc_now

from sglang.srt.distributed.parallel_state import (
    destroy_distributed_environment,
    destroy_model_parallel,
    get_world_group,
    graph_capture,
    init_distributed_environment,
    initialize_model_parallel,
    set_custom_all_reduce,
)

from sglang_dcp.distributed.parallel_state import (
    all_gather_along_dim,
    dcp_graph_capture,
    destroy_dcp_group,
    get_dcp_group,
    initialize_dcp_group,
)
from sglang_dcp.layers.attention.merge import dcp_merge, scale_by_group_lse
from sglang_dcp.layers.attention.torch_native_dcp_backend import (
    TorchNativeDCPAttnBackend,
    attention_with_lse,
)
from sglang_dcp.mem_cache.layout import local_seq_lens
from sglang_dcp.test.cpu_env import use_cpu_env

HEADS_PER_RANK = 8
KV_HEADS = 1
HEAD_DIM = 128
SM_SCALE = HEAD_DIM**-0.5
BATCHES, CONTEXTS = "1,8,32,64,128,256", "4096,16384,32768,65536,131072"
SMOKE_BATCHES, SMOKE_CONTEXTS = "1,2", "64,128"
CHECK_POINT = (3, 1001)  # (B, C) of the correctness check; C % D != 0 for D = 2, 4, 8
BF16_REL_TOL = 2e-2
GOAL_RATIO, GOAL_MIN_BATCH = 1.3, 32
HEADLINE = ("attn_floor_ratio_bs64_32k", 64, 32768)
WARMUP_STEPS = 2
DTYPES = {"cuda": torch.bfloat16, "cpu": torch.float32}


@dataclass
class Rank:
    """What every measurement on one rank needs."""

    args: argparse.Namespace
    group: object  # the DCP GroupCoordinator
    device: torch.device
    dtype: torch.dtype
    lse_base: float  # of the partial kernel's LSE
    workspace: Optional[torch.Tensor]  # FlashInfer's float workspace (CUDA only)


def kv_bytes_per_token(dtype) -> int:
    return 2 * KV_HEADS * HEAD_DIM * torch.tensor([], dtype=dtype).element_size()


def local_len(context: int, dcp_size: int, dcp_rank: int) -> int:
    """Tokens of a ``context``-token request stored on ``dcp_rank`` (the plugin's layout)."""
    return int(local_seq_lens(torch.tensor([context]), dcp_size, dcp_rank)[0])


def random_tensor(rank: Rank, *shape) -> torch.Tensor:
    return torch.empty(shape, dtype=rank.dtype, device=rank.device).normal_()


class TorchDecode:
    """The FlashInfer decode-wrapper calls used here, over PyTorch's ``attention_with_lse``
    (CPU): ``batch`` requests of ``seq_len`` contiguous KV rows each, natural-log LSE."""

    def __init__(self, batch: int, seq_len: int):
        self.rows = [slice(b * seq_len, (b + 1) * seq_len) for b in range(batch)]

    def forward_return_lse(self, q, kv, sm_scale):
        k, v = kv
        parts = [attention_with_lse(q[b : b + 1], k[rows], v[rows], sm_scale, causal=False)
                 for b, rows in enumerate(self.rows)]
        return torch.cat([o for o, _ in parts]), torch.cat([lse for _, lse in parts])

    def forward(self, q, kv, sm_scale):
        return self.forward_return_lse(q, kv, sm_scale)[0].to(q.dtype)


def flashinfer_decode(rank: Rank, num_heads: int, batch: int, seq_len: int):
    """A CUDA-graph decode wrapper over ``batch`` requests of ``seq_len`` contiguous KV rows,
    built and planned as ``FlashInferDCPAttnBackend`` does for a captured batch size."""
    from flashinfer import BatchDecodeWithPagedKVCacheWrapper
    from sglang.srt.layers.attention.flashinfer_backend import should_use_tensor_core

    from sglang_dcp.layers.attention.flashinfer_dcp_backend import (
        KV_INDICES_PADDING,
        PAGED_KERNEL_BACKEND,
    )

    num_rows = batch * seq_len
    indptr_cpu = torch.arange(batch + 1, dtype=torch.int32) * seq_len
    indices = torch.arange(num_rows, dtype=torch.int32, device=rank.device)
    last_page_len = torch.ones(batch, dtype=torch.int32, device=rank.device)
    wrapper = BatchDecodeWithPagedKVCacheWrapper(
        rank.workspace,
        "NHD",
        backend=PAGED_KERNEL_BACKEND,
        use_tensor_cores=should_use_tensor_core(
            kv_cache_dtype=rank.dtype, num_attention_heads=num_heads, num_kv_heads=KV_HEADS
        ),
        use_cuda_graph=True,
        paged_kv_indptr_buffer=indptr_cpu.to(rank.device),
        paged_kv_indices_buffer=torch.zeros(
            num_rows + KV_INDICES_PADDING, dtype=torch.int32, device=rank.device
        ),
        paged_kv_last_page_len_buffer=last_page_len,
    )
    wrapper.plan(
        indptr_cpu, indices, last_page_len.cpu(), num_qo_heads=num_heads,
        num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, page_size=1, data_type=rank.dtype,
        q_data_type=rank.dtype, non_blocking=True,
    )
    return wrapper


def decode_wrapper(rank: Rank, num_heads: int, batch: int, seq_len: int):
    if rank.device.type == "cuda":
        return flashinfer_decode(rank, num_heads, batch, seq_len)
    return TorchDecode(batch, seq_len)


def dcp_decode(rank: Rank, wrapper, q: torch.Tensor, kv) -> torch.Tensor:
    """``DCPAttnBackend.forward_decode`` without the KV write: ``q [B, Hq, d] -> o [B, Hq, d]``."""
    q_all = all_gather_along_dim(rank.group, q, dim=1)
    o, lse = wrapper.forward_return_lse(q_all, kv, sm_scale=SM_SCALE)
    return dcp_merge(rank.group, o, lse, rank.lse_base, out_dtype=q.dtype)[0]


def lse_decode(rank: Rank, wrapper, q_all: torch.Tensor, kv) -> torch.Tensor:
    """``--dcp-comm lse`` decode without the KV write: ``q_all [B, D*Hq, d]`` (computed on
    this rank) -> this rank's LSE-scaled partials ``[B, D*Hq, d]`` (summed by ``o_proj``'s
    all-reduce)."""
    o, lse = wrapper.forward_return_lse(q_all, kv, sm_scale=SM_SCALE)
    return scale_by_group_lse(rank.group, o, lse, rank.lse_base, out_dtype=q_all.dtype)


def max_over_ranks(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(
        tensor, op=torch.distributed.ReduceOp.MAX, group=get_world_group().cpu_group
    )
    return tensor.item()


def time_graph(step, steps: int, repeats: int) -> float:
    """Seconds per step: a CUDA graph of ``steps`` steps, ``repeats`` back-to-back replays."""
    for _ in range(WARMUP_STEPS):
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=torch.cuda.current_stream()):
        for _ in range(steps):
            step()
    graph.replay()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(repeats + 1)]
    events[0].record()
    for event in events[1:]:
        graph.replay()
        event.record()
    events[-1].synchronize()
    return statistics.median(
        start.elapsed_time(end) / 1e3 / steps for start, end in zip(events, events[1:])
    )


def time_eager(step, steps: int, repeats: int) -> float:
    """Seconds per step: ``repeats`` runs of ``steps`` eager steps (CPU)."""
    for _ in range(WARMUP_STEPS):
        step()
    times = []
    for _ in range(repeats):
        torch.distributed.barrier(group=get_world_group().cpu_group)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def time_step(rank: Rank, step) -> float:
    """Median seconds of one ``step``, the slowest rank's."""
    timer = time_graph if rank.device.type == "cuda" else time_eager
    return max_over_ranks(timer(step, rank.args.steps_per_graph, rank.args.repeats))


def measure_bandwidth(rank: Rank) -> float:
    """HBM read bytes/s of a large sum: bytes read / time. Decode attention streams the KV
    and writes next to nothing, so a read-only pass is its floor (a copy, which also writes,
    measured 2.8 TB/s on an H200 where this kernel's KV reads reached 4.5 TB/s)."""
    num_bytes = (16 << 20) if rank.args.smoke else (4 << 30)
    src = torch.randn(num_bytes // 4, device=rank.device)
    return num_bytes / time_step(rank, lambda: src.sum())


def measure_collective(rank: Rank) -> float:
    """Seconds of one small all-gather over the DCP group: the Q all-gather at B = 1."""
    q = random_tensor(rank, 1, HEADS_PER_RANK, HEAD_DIM)
    return time_step(rank, lambda: all_gather_along_dim(rank.group, q, dim=1))


def check_correctness(rank: Rank) -> dict:
    """At ``CHECK_POINT``, rank ``r`` holds positions ``r, r + D, ...`` of every request; its
    DCP output must equal the tp kernel over all tokens for its own heads, and the group's
    sum of lse outputs the tp kernel for all ``D*Hq`` heads."""
    batch, context = CHECK_POINT
    dcp_size, dcp_rank = rank.group.world_size, rank.group.rank_in_group
    gen = torch.Generator().manual_seed(0)  # the same problem on every rank
    k, v = (torch.randn(batch, context, KV_HEADS, HEAD_DIM, generator=gen) for _ in range(2))
    q_all = torch.randn(batch, dcp_size * HEADS_PER_RANK, HEAD_DIM, generator=gen)

    def on_device(x):
        return x.to(rank.device, rank.dtype).contiguous()

    own_heads = slice(dcp_rank * HEADS_PER_RANK, (dcp_rank + 1) * HEADS_PER_RANK)
    q = on_device(q_all[:, own_heads])
    full_kv = (on_device(k.flatten(0, 1)), on_device(v.flatten(0, 1)))
    local_kv = (on_device(k[:, dcp_rank::dcp_size].flatten(0, 1)),
                on_device(v[:, dcp_rank::dcp_size].flatten(0, 1)))
    expected = decode_wrapper(rank, HEADS_PER_RANK, batch, context).forward(
        q, full_kv, sm_scale=SM_SCALE
    )
    local = local_len(context, dcp_size, dcp_rank)
    local_wrapper = decode_wrapper(rank, dcp_size * HEADS_PER_RANK, batch, local)
    got = dcp_decode(rank, local_wrapper, q, local_kv)
    err = max_over_ranks(rel_err(got, expected))
    expected_all = decode_wrapper(rank, dcp_size * HEADS_PER_RANK, batch, context).forward(
        on_device(q_all), full_kv, sm_scale=SM_SCALE
    )
    got_all = lse_decode(rank, local_wrapper, on_device(q_all), local_kv).float()
    torch.distributed.all_reduce(got_all, group=rank.group.device_group)
    lse_err = max_over_ranks(rel_err(got_all, expected_all))
    for name, value in (("DCP", err), ("DCP-lse (summed over the group)", lse_err)):
        if not value < BF16_REL_TOL:  # also fails on NaN
            raise AssertionError(
                f"{name} output differs from full attention at B={batch}, C={context}: "
                f"relative error {value:.3e} >= {BF16_REL_TOL}"
            )
    return {"batch": batch, "context": context, "rel_err": err, "lse_rel_err": lse_err,
            "tol": BF16_REL_TOL}


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def measure_point(rank: Rank, kv, batch: int, context: int, bandwidth: float, latency: float) -> dict:
    dcp_size = rank.group.world_size
    q = random_tensor(rank, batch, HEADS_PER_RANK, HEAD_DIM)
    tp = decode_wrapper(rank, HEADS_PER_RANK, batch, context)
    tp_s = time_step(rank, lambda: tp.forward(q, kv, sm_scale=SM_SCALE))
    local = local_len(context, dcp_size, rank.group.rank_in_group)
    dcp = decode_wrapper(rank, dcp_size * HEADS_PER_RANK, batch, local)
    dcp_s = time_step(rank, lambda: dcp_decode(rank, dcp, q, kv))
    q_all = random_tensor(rank, batch, dcp_size * HEADS_PER_RANK, HEAD_DIM)
    lse_s = time_step(rank, lambda: lse_decode(rank, dcp, q_all, kv))
    token_bytes = kv_bytes_per_token(rank.dtype)
    tp_floor = batch * context * token_bytes / bandwidth
    dcp_floor = batch * local_len(context, dcp_size, 0) * token_bytes / bandwidth + latency
    return {
        "batch": batch, "context": context,
        "tp_us": tp_s * 1e6, "tp_floor_us": tp_floor * 1e6, "tp_ratio": tp_s / tp_floor,
        "dcp_us": dcp_s * 1e6, "dcp_floor_us": dcp_floor * 1e6, "dcp_ratio": dcp_s / dcp_floor,
        "dcp_speedup": tp_s / dcp_s,
        "lse_us": lse_s * 1e6, "lse_ratio": lse_s / dcp_floor, "lse_speedup": tp_s / lse_s,
    }


def fits(args, batch: int, context: int, dtype) -> bool:
    return batch * context * kv_bytes_per_token(dtype) <= args.max_kv_gib * 2**30


def grid(args, dtype):
    """``(points, skipped)``: the ``(B, C)`` pairs of ``--batches x --contexts`` that fit
    ``--max-kv-gib``, and those that do not."""
    pairs = [(b, c) for b in args.batches for c in args.contexts]
    points = [(b, c) for b, c in pairs if fits(args, b, c, dtype)]
    return points, [pair for pair in pairs if pair not in points]


def kv_cache(rank: Rank, points):
    """Random ``(k, v)`` rows, enough for the largest point's ``B * C`` tokens."""
    max_rows = max(b * c for b, c in points)
    return tuple(random_tensor(rank, max_rows, KV_HEADS, HEAD_DIM) for _ in range(2))


@contextlib.contextmanager
def capture_mode(device: torch.device):
    """CUDA: SGLang's graph-capture mode with the DCP group's (pynccl on, side stream)."""
    if device.type != "cuda":
        yield
        return
    with graph_capture() as context, dcp_graph_capture(context):
        yield


def init_rank(rank_id: int, world_size: int, args, port: int) -> Rank:
    """torch.distributed + SGLang's world and TP groups (TP = DCP = world) + the DCP group."""
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank_id)
    set_custom_all_reduce(False)
    init_distributed_environment(
        world_size=world_size, rank=rank_id, local_rank=rank_id,
        backend="nccl" if cuda else "gloo", distributed_init_method=f"tcp://127.0.0.1:{port}",
    )
    initialize_model_parallel(tensor_model_parallel_size=world_size)
    initialize_dcp_group(world_size)
    torch.manual_seed(rank_id)
    if cuda:
        from sglang.srt.environ import envs

        from sglang_dcp.layers.attention.flashinfer_dcp_backend import FlashInferDCPAttnBackend

        device = torch.device("cuda", rank_id)
        workspace = torch.zeros(
            envs.SGLANG_FLASHINFER_WORKSPACE_SIZE.get(), dtype=torch.uint8, device=device
        )
        return Rank(args, get_dcp_group(), device, DTYPES["cuda"],
                    FlashInferDCPAttnBackend.lse_base, workspace)
    return Rank(args, get_dcp_group(), torch.device("cpu"), DTYPES["cpu"],
                TorchNativeDCPAttnBackend.lse_base, None)


def run_rank(rank_id: int, args, port: int) -> None:
    """One spawned process per DCP rank; rank 0 reports."""
    rank = init_rank(rank_id, args.dcp, args, port)
    points, skipped = grid(args, rank.dtype)
    with capture_mode(rank.device):
        bandwidth = measure_bandwidth(rank)
        latency = measure_collective(rank)
        check = check_correctness(rank)
        kv = kv_cache(rank, points)
        results = []
        for batch, context in tqdm(points, desc=f"DCP{args.dcp}", disable=rank_id != 0):
            results.append(measure_point(rank, kv, batch, context, bandwidth, latency))
    if rank_id == 0:
        report(args, rank.dtype, bandwidth, latency, check, results, skipped)
    close_rank()


def close_rank() -> None:
    destroy_dcp_group()
    destroy_model_parallel()
    destroy_distributed_environment()


def card_name(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"cpu ({os.cpu_count()} cores)"


def summarize(results) -> dict:
    """The headline ratio and the goal: dcp ratio <= GOAL_RATIO at every B >= GOAL_MIN_BATCH."""
    name, batch, context = HEADLINE
    headline = [p["dcp_ratio"] for p in results if (p["batch"], p["context"]) == (batch, context)]
    goal_points = [p for p in results if p["batch"] >= GOAL_MIN_BATCH]
    worst = max(goal_points, key=lambda p: p["dcp_ratio"], default=None)
    return {
        name: headline[0] if headline else None,
        "goal": f"dcp ratio <= {GOAL_RATIO} at batch >= {GOAL_MIN_BATCH}",
        "goal_met": None if worst is None else worst["dcp_ratio"] <= GOAL_RATIO,
        "goal_worst_point": worst and {k: worst[k] for k in ("batch", "context", "dcp_ratio")},
    }


def report(args, dtype, bandwidth, latency, check, results, skipped) -> None:
    card = card_name(args.device)
    summary = summarize(results)
    out = {
        "title": f"decode attention, one layer: TP vs TP + DCP{args.dcp}, {card}",
        "card": card, "gpu_count": torch.cuda.device_count() if args.device == "cuda" else 0,
        "date_utc": utc_now(),
        "config": {**vars(args), "heads_per_rank": HEADS_PER_RANK, "kv_heads": KV_HEADS,
                   "head_dim": HEAD_DIM, "dtype": str(dtype).replace("torch.", ""),
                   "kv_bytes_per_token": kv_bytes_per_token(dtype)},
        "hbm_bandwidth_gbps": bandwidth / 1e9,
        "collective_latency_us": latency * 1e6,
        "correctness": check,
        **summary,
        "points": results,
        "skipped_over_kv_budget": skipped,
    }
    print(f"\n{out['title']} ({out['config']['dtype']}, Hq={HEADS_PER_RANK}/rank, "
          f"Hkv={KV_HEADS}, d={HEAD_DIM})")
    print(f"HBM bandwidth {out['hbm_bandwidth_gbps']:.0f} GB/s, collective latency "
          f"{out['collective_latency_us']:.1f} us, DCP vs full attention rel err "
          f"{check['rel_err']:.2e} (a2a), {check['lse_rel_err']:.2e} (lse) at "
          f"B={check['batch']}, C={check['context']}")
    print(f"\n{'B':>4} {'C':>7} {'tp us':>9} {'tp floor':>9} {'tp ratio':>9} "
          f"{'dcp us':>9} {'dcp floor':>9} {'dcp ratio':>9} {'speedup':>8} "
          f"{'lse us':>9} {'lse ratio':>9} {'speedup':>8}")
    for p in results:
        print(f"{p['batch']:>4} {p['context']:>7} {p['tp_us']:>9.1f} {p['tp_floor_us']:>9.1f} "
              f"{p['tp_ratio']:>9.2f} {p['dcp_us']:>9.1f} {p['dcp_floor_us']:>9.1f} "
              f"{p['dcp_ratio']:>9.2f} {p['dcp_speedup']:>8.2f} {p['lse_us']:>9.1f} "
              f"{p['lse_ratio']:>9.2f} {p['lse_speedup']:>8.2f}")
    for batch, context in skipped:
        print(f"{batch:>4} {context:>7}  skipped: KV over --max-kv-gib {args.max_kv_gib}")
    name = HEADLINE[0]
    print(f"\n{name}: {summary[name] if summary[name] is None else round(summary[name], 3)}")
    print(f"goal ({summary['goal']}): {summary['goal_met']}, worst {summary['goal_worst_point']}")

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_attention.json"), "w") as f:
        json.dump(out, f, indent=1)
    plot(out, os.path.join(args.out, "bench_attention.png"))
    print(f"results in {args.out}")


def plot(out, path) -> None:
    plt = pyplot()
    points = out["points"]
    batches = sorted({p["batch"] for p in points})
    fig, (ratio_ax, time_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for batch in batches:
        line = [p for p in points if p["batch"] == batch]
        ratio_ax.plot([p["context"] for p in line], [p["dcp_ratio"] for p in line],
                      marker="o", label=f"B={batch}")
    ratio_ax.axhline(GOAL_RATIO, color="gray", linestyle=":", label=f"goal {GOAL_RATIO}x")
    ratio_ax.set_ylabel("dcp time / floor")
    for batch in sorted({batches[0], batches[-1]} | ({32} & set(batches))):
        line = [p for p in points if p["batch"] == batch]
        contexts = [p["context"] for p in line]
        shown = time_ax.plot(contexts, [p["tp_us"] for p in line], linestyle="--", marker="o",
                             label=f"tp B={batch}")
        time_ax.plot(contexts, [p["dcp_us"] for p in line], marker="o",
                     color=shown[0].get_color(), label=f"dcp B={batch}")
        time_ax.plot(contexts, [p["lse_us"] for p in line], linestyle="-.", marker="x",
                     color=shown[0].get_color(), label=f"dcp-lse B={batch}")
    time_ax.set_yscale("log")
    time_ax.set_ylabel("us per layer")
    for ax in (ratio_ax, time_ax):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens per request")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(out["title"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def grid_parser(doc: str, dcp_help: str) -> argparse.ArgumentParser:
    """The options of a timing grid, shared with ``bench_attention_stages.py``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--dcp", type=int, default=2, help=dcp_help)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (flow check, e.g. on CPU)")
    parser.add_argument("--batches", help=f"comma list (default {BATCHES}; smoke {SMOKE_BATCHES})")
    parser.add_argument("--contexts", help=f"comma list (default {CONTEXTS}; smoke {SMOKE_CONTEXTS})")
    parser.add_argument("--steps-per-graph", type=int, help="steps per CUDA graph (default 10; smoke 2)")
    parser.add_argument("--repeats", type=int, help="timed replays per point (default 5; smoke 2)")
    parser.add_argument("--max-kv-gib", type=float, default=40.0, help="skip points whose KV is larger")
    parser.add_argument("--out", default="benchmark/dcp/results")
    return parser


def parse_grid_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse, fill the smoke/full defaults and check that a point fits; on CPU, set SGLang's
    CPU environment (inherited by spawned processes)."""
    args = parser.parse_args()
    args.batches = int_list(args.batches or (SMOKE_BATCHES if args.smoke else BATCHES))
    args.contexts = int_list(args.contexts or (SMOKE_CONTEXTS if args.smoke else CONTEXTS))
    args.steps_per_graph = args.steps_per_graph or (2 if args.smoke else 10)
    args.repeats = args.repeats or (2 if args.smoke else 5)
    if args.device == "cpu":
        use_cpu_env()
    assert grid(args, DTYPES[args.device])[0], "no point fits --max-kv-gib"
    return args


def main():
    args = parse_grid_args(grid_parser(__doc__, "DCP size = processes = GPUs"))
    if args.device == "cuda":
        assert torch.cuda.device_count() >= args.dcp, f"--dcp {args.dcp} needs {args.dcp} GPUs"
    mp.spawn(run_rank, args=(args, free_port()), nprocs=args.dcp, join=True)


if __name__ == "__main__":
    main()
