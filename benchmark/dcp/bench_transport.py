"""The one small collective of ``--dcp-comm lse`` decode: the all-gather of the group's LSEs.

    python benchmark/dcp/bench_transport.py [--dcp-sizes 2,4]
        [--sizes 128,512,2048,8192,32768,65536] [--out benchmark/dcp/results]
    python benchmark/dcp/bench_transport.py --device cpu --smoke --out /tmp/transport_smoke

Each rank of a DCP group of ``D`` ranks contributes ``B * D * Hq`` float32 LSEs (``--sizes``:
bytes per rank, 128 B .. 64 KiB) and receives all ``D`` chunks as ``[D, n]`` in rank order,
as ``scale_by_group_lse`` does. Transports (``--transports``):

* ``nccl``: ``all_gather_along_dim`` on the DCP group, as DCP uses it today (CUDA: inside
  SGLang's ``graph_capture`` plus ``dcp_graph_capture``, pynccl on; CPU: gloo, eagerly).
* ``symm-pull``: torch symmetric memory, peer to peer, no multicast: the chunk is copied
  into this rank's symmetric buffer, one ``barrier`` of the group, then one ``torch.stack``
  reads the ``D`` buffers (peers' through NVLink). Two buffers used in turn, so a rank
  rewrites a buffer only after the next barrier, when every peer has read it
  (``--steps-per-graph`` must be even).
* ``symm-oneshot``: ``torch.ops.symm_mem.one_shot_all_reduce`` (peer-to-peer loads, one
  kernel with its own barrier) of a zero-padded ``[D, n]`` symmetric buffer whose row ``r``
  only rank ``r`` writes: the sum is the gather, exactly (``x + 0 = x``, ``-inf`` kept).
  Two buffers in turn, as above.
* ``custom-ar``: SGLang's custom all-reduce (IPC buffers) of a zero-padded ``[D, n]``
  tensor, the same exact sum; unregistered input (one copy into its IPC buffer).

Every process runs with ``NCCL_NVLS_ENABLE=0`` and ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``
(set here before torch loads; spawned ranks inherit them): NVLink multicast stays off.

Before timing, each transport's result must equal the reference exactly (``torch.equal``:
rank ``r``'s chunk holds ``n * r + i`` with one ``-inf``), and again after the timed graph
replays. A transport that fails to initialise is listed as unavailable with its reason; a
wrong result is listed as WRONG and the run exits with status 1 after the report.

Timing: ``bench_attention.py``'s ``time_step`` (CUDA: a graph of ``--steps-per-graph``
collectives, median over ``--repeats`` replays, the slowest rank's; CPU: eager). One group
of ``D`` processes per ``--dcp-sizes`` entry (``D`` at most the GPU count).

Results: a table (us per collective), ``bench_transport.json`` and ``bench_transport.png`` in
``--out``.
"""

import os

os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"

import argparse
import json

import torch
import torch.distributed
import torch.multiprocessing as mp
from tqdm import tqdm

from bench_attention import (
    capture_mode,
    card_name,
    close_rank,
    free_port,
    init_rank,
    max_over_ranks,
    time_step,
)
from bench_common import int_list, pyplot, utc_now

from sglang_dcp.distributed.parallel_state import all_gather_along_dim
from sglang_dcp.test.cpu_env import use_cpu_env

TRANSPORTS = "nccl,symm-pull,symm-oneshot,custom-ar"
SIZES, SMOKE_SIZES = "128,512,2048,8192,32768,65536", "128,512"
DCP_SIZES, SMOKE_DCP_SIZES = "2,4", "2"
FLOAT_BYTES = 4


class NcclGather:
    """DCP's all-gather today: ``all_gather_along_dim`` of ``[1, n]`` along dim 0."""

    def __init__(self, rank, n: int):
        self.group = rank.group

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather_along_dim(self.group, x.unsqueeze(0), dim=0)


def symm_mem_module(rank):
    """``torch.distributed._symmetric_memory`` on its CUDA (peer-to-peer) backend."""
    if rank.device.type != "cuda":
        raise RuntimeError("symmetric memory needs CUDA")
    from torch.distributed import _symmetric_memory as symm_mem

    if symm_mem.get_backend(rank.device) != "CUDA":
        symm_mem.set_backend("CUDA")  # raises once another backend has allocated
    return symm_mem


class SymmPullGather:
    """Copy into this rank's symmetric buffer, barrier, stack the ``D`` ranks' buffers."""

    def __init__(self, rank, n: int):
        symm_mem = symm_mem_module(rank)
        group_name = rank.group.device_group.group_name
        self.buffers = [symm_mem.empty(n, dtype=torch.float32, device=rank.device) for _ in range(2)]
        self.handles = [symm_mem.rendezvous(buf, group_name) for buf in self.buffers]
        self.peers = [[hdl.get_buffer(peer, (n,), torch.float32) for peer in range(hdl.world_size)]
                      for hdl in self.handles]
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        turn = self.calls % 2
        self.calls += 1
        self.buffers[turn].copy_(x)
        self.handles[turn].barrier(channel=0)
        return torch.stack(self.peers[turn])


class SymmOneShotGather:
    """Row ``r`` of a zero-padded ``[D, n]`` symmetric buffer, summed by the one-shot kernel."""

    def __init__(self, rank, n: int):
        symm_mem = symm_mem_module(rank)
        self.group_name = rank.group.device_group.group_name
        self.rank_in_group = rank.group.rank_in_group
        size = rank.group.world_size
        self.buffers = [symm_mem.empty(size, n, dtype=torch.float32, device=rank.device).zero_()
                        for _ in range(2)]
        for buf in self.buffers:
            symm_mem.rendezvous(buf, self.group_name)
        torch.cuda.synchronize()
        torch.distributed.barrier(group=rank.group.cpu_group)  # every row zero before use
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        buf = self.buffers[self.calls % 2]
        self.calls += 1
        buf[self.rank_in_group].copy_(x)
        return torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", self.group_name)


class CustomArGather:
    """Row ``r`` of a zero-padded ``[D, n]`` tensor, summed by SGLang's custom all-reduce."""

    def __init__(self, rank, n: int):
        if rank.device.type != "cuda":
            raise RuntimeError("custom all-reduce needs CUDA")
        from sglang.srt.distributed.device_communicators.custom_all_reduce import CustomAllreduce

        self.comm = CustomAllreduce(group=rank.group.cpu_group, device=rank.device)
        self.padded = torch.zeros(rank.group.world_size, n, dtype=torch.float32, device=rank.device)
        if not self.comm.should_custom_ar(self.padded):
            self.comm.close()
            raise RuntimeError("CustomAllreduce disabled (no sgl_kernel custom_ar op, no full "
                               "NVLink or an unsupported world size; see its log) or size refused")
        self.row = self.padded[rank.group.rank_in_group]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.row.copy_(x)
        return self.comm.custom_all_reduce(self.padded)

    def close(self):
        self.comm.close()


GATHERS = {"nccl": NcclGather, "symm-pull": SymmPullGather, "symm-oneshot": SymmOneShotGather,
           "custom-ar": CustomArGather}


def reference(size: int, n: int, device) -> torch.Tensor:
    """The gathered LSEs ``[D, n]``: rank ``r``'s chunk is ``n * r + i``, element 0 of the
    last rank's ``-inf`` (an empty shard)."""
    ref = torch.arange(size * n, dtype=torch.float32).view(size, n)
    ref[-1, 0] = float("-inf")
    return ref.to(device)


def attempt(rank, action):
    """``(action(), "")``, or ``(None, error)`` with the first rank's error of the group (the
    same on every rank) where any rank's ``action`` raised."""
    result, error = None, ""
    try:
        result = action()
    except Exception as exc:  # reported in the table, never a crash
        text = str(exc).strip().splitlines()
        error = f"{type(exc).__name__}: {text[0] if text else ''}"[:200]
    errors = [None] * rank.group.world_size
    torch.distributed.all_gather_object(errors, error, group=rank.group.cpu_group)
    error = next((e for e in errors if e), "")
    return (None if error else result), error


def measure(rank, transport: str, num_bytes: int) -> dict:
    """One point: set up, check, time, check again. ``us`` None with ``status`` why."""
    size, n = rank.group.world_size, num_bytes // FLOAT_BYTES
    point = {"dcp": size, "bytes": num_bytes, "floats": n, "transport": transport}
    expected = reference(size, n, rank.device)
    x = expected[rank.group.rank_in_group].clone()
    gather, error = attempt(rank, lambda: GATHERS[transport](rank, n))
    try:
        return {**point, **check_and_time(rank, gather, x, expected, error)}
    finally:
        if hasattr(gather, "close"):
            gather.close()


def check_and_time(rank, gather, x, expected, error) -> dict:
    """``{"us", "status"}`` of one set-up transport (``error``: why it could not be set up)."""
    first, error = attempt(rank, lambda: gather(x)) if gather else (None, error)
    if error:
        return {"us": None, "status": f"unavailable: {error}"}
    if max_over_ranks(float(not torch.equal(first, expected))):
        return {"us": None, "status": "WRONG: differs from the gathered reference before timing"}
    last = [first]

    def step():
        last[0] = gather(x)  # under CUDA, the captured output: rewritten by every replay

    seconds, error = attempt(rank, lambda: time_step(rank, step))
    if error:
        return {"us": None, "status": f"unavailable: timing failed: {error}"}
    if max_over_ranks(float(not torch.equal(last[0], expected))):
        return {"us": None, "status": "WRONG: differs from the reference after the timed replays"}
    return {"us": seconds * 1e6, "status": "ok"}


def run_rank(rank_id: int, dcp_size: int, args, port: int, results) -> None:
    """One spawned process per rank of a DCP group of ``dcp_size`` (= world); rank 0 sends
    the group's points to ``results``."""
    rank = init_rank(rank_id, dcp_size, args, port)
    cases = [(t, b) for t in args.transports for b in args.sizes]
    points = []
    with capture_mode(rank.device):
        for transport, num_bytes in tqdm(cases, desc=f"D={dcp_size}", disable=rank_id != 0):
            points.append(measure(rank, transport, num_bytes))
    if rank_id == 0:
        results.put(points)
    close_rank()


def cell(point) -> str:
    if point is None:
        return "-"
    if point["us"] is not None:
        return f"{point['us']:.2f}"
    return "WRONG" if point["status"].startswith("WRONG") else "unavailable"


def print_table(out) -> None:
    points, transports = out["points"], out["config"]["transports"]
    print(f"\n{out['title']}")
    print(f"{'D':>2} {'bytes':>6} {'floats':>6}" + "".join(f"{t:>14}" for t in transports))
    for dcp, num_bytes in sorted({(p["dcp"], p["bytes"]) for p in points}):
        row = {p["transport"]: p for p in points if (p["dcp"], p["bytes"]) == (dcp, num_bytes)}
        print(f"{dcp:>2} {num_bytes:>6} {num_bytes // FLOAT_BYTES:>6}"
              + "".join(f"{cell(row.get(t)):>14}" for t in transports))
    print("us per collective: median over replays, the slowest rank's")
    for dcp, transport, status in sorted({(p["dcp"], p["transport"], p["status"])
                                          for p in points if p["status"] != "ok"}):
        print(f"D={dcp} {transport}: {status}")
    for dcp in out["skipped_dcp_sizes"]:
        print(f"D={dcp}: skipped, more ranks than GPUs")


def fastest(points) -> dict:
    """``{"D=<d>,<bytes>": transport}``: the fastest correct transport of every point."""
    best = {}
    for p in points:
        key = f"D={p['dcp']},{p['bytes']}"
        if p["us"] is not None and (key not in best or p["us"] < best[key][1]):
            best[key] = (p["transport"], p["us"])
    return {key: name for key, (name, _) in best.items()}


def report(args, points, skipped) -> dict:
    card = card_name(args.device)
    out = {
        "title": f"DCP LSE all-gather, transports, {card}",
        "card": card, "gpu_count": torch.cuda.device_count() if args.device == "cuda" else 0,
        "date_utc": utc_now(),
        "config": {**vars(args), "dtype": "float32"},
        "env": {k: os.environ[k] for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")},
        "fastest": fastest(points),
        "points": points,
        "skipped_dcp_sizes": skipped,
    }
    print_table(out)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_transport.json"), "w") as f:
        json.dump(out, f, indent=1)
    plot(out, os.path.join(args.out, "bench_transport.png"))
    print(f"results in {args.out}")
    return out


def plot(out, path) -> None:
    plt = pyplot()
    sizes = sorted({p["dcp"] for p in out["points"]})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
    for ax, dcp in zip(axes[0], sizes):
        for transport in out["config"]["transports"]:
            line = [p for p in out["points"]
                    if p["dcp"] == dcp and p["transport"] == transport and p["us"] is not None]
            if line:
                ax.plot([p["bytes"] for p in line], [p["us"] for p in line], marker="o",
                        label=transport)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bytes per rank (float32 LSEs)")
        ax.set_ylabel("us per all-gather")
        ax.set_title(f"D = {dcp}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(out["title"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (flow check, e.g. on CPU)")
    parser.add_argument("--dcp-sizes", help=f"comma list of D (default {DCP_SIZES}; smoke {SMOKE_DCP_SIZES})")
    parser.add_argument("--sizes", help=f"bytes per rank, comma list (default {SIZES}; smoke {SMOKE_SIZES})")
    parser.add_argument("--transports", help=f"comma list of {TRANSPORTS} (default: all; CPU: nccl)")
    parser.add_argument("--steps-per-graph", type=int, help="collectives per CUDA graph, even (default 50; smoke 2)")
    parser.add_argument("--repeats", type=int, help="timed replays per point (default 20; smoke 2)")
    parser.add_argument("--out", default="benchmark/dcp/results")
    args = parser.parse_args()
    args.dcp_sizes = int_list(args.dcp_sizes or (SMOKE_DCP_SIZES if args.smoke else DCP_SIZES))
    args.sizes = int_list(args.sizes or (SMOKE_SIZES if args.smoke else SIZES))
    args.transports = (args.transports or (TRANSPORTS if args.device == "cuda" else "nccl")).split(",")
    args.steps_per_graph = args.steps_per_graph or (2 if args.smoke else 50)
    args.repeats = args.repeats or (2 if args.smoke else 20)
    unknown = sorted(set(args.transports) - set(GATHERS))
    if unknown:
        parser.error(f"--transports: unknown {unknown}; choose from {TRANSPORTS}")
    if bad := [b for b in args.sizes if b <= 0 or b % 16]:
        parser.error(f"--sizes {bad}: bytes per rank must be positive multiples of 16")
    if bad := [d for d in args.dcp_sizes if d < 2]:
        parser.error(f"--dcp-sizes {bad}: a DCP group has at least 2 ranks")
    if args.steps_per_graph % 2:
        parser.error("--steps-per-graph must be even (the symmetric buffers are used in turn)")
    if args.device == "cpu":
        use_cpu_env()
    return args


def main():
    args = parse_args()
    gpus = torch.cuda.device_count() if args.device == "cuda" else None
    run_sizes = [d for d in args.dcp_sizes if gpus is None or d <= gpus]
    skipped = [d for d in args.dcp_sizes if d not in run_sizes]
    assert run_sizes, f"--dcp-sizes {args.dcp_sizes}: this machine has {gpus} GPUs"
    context = mp.get_context("spawn")
    points = []
    for dcp_size in run_sizes:
        results = context.SimpleQueue()
        mp.spawn(run_rank, args=(dcp_size, args, free_port(), results), nprocs=dcp_size, join=True)
        points += results.get()
    out = report(args, points, skipped)
    if any(p["status"].startswith("WRONG") for p in out["points"]):
        raise SystemExit("a transport gave a wrong result (see the table)")


if __name__ == "__main__":
    main()
