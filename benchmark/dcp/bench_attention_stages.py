"""Where a DCP decode layer's time goes: the local stages of one rank, one GPU.

    python benchmark/dcp/bench_attention_stages.py --dcp 2 --batches 1,32,64,256
        --contexts 4096,8192,32768,131072 --steps-per-graph 50
        --full benchmark/dcp/results/bench_attention.json
    python benchmark/dcp/bench_attention_stages.py --device cpu --smoke --out /tmp/stages_smoke

``bench_attention.py`` times the whole DCP decode layer on ``D`` GPUs. This script times the
work of rank 0 of that layer stage by stage on one GPU, with the same shapes (``Hq = 8``
query heads per rank, one KV head, head_dim 128, bf16), each stage in its own CUDA graph of
``--steps-per-graph`` steps, as there (use 50 or more: a graph of a few 2 us kernels is
shorter than the CPU's launch interval between replays, which it would then measure):

* ``reorder``: the copy behind the Q all-gather along heads, ``[D, B, Hq, d] -> [B, D*Hq, d]``
  (``GroupCoordinator.all_gather`` gathers along dim 0, then moves the rank dim; a view at
  ``B = 1``);
* ``attention``: the partial decode with LSE of the ``D*Hq`` gathered heads over the
  ``ceil(C / D)`` tokens of rank 0 (FlashInfer, planned as ``FlashInferDCPAttnBackend``);
* ``pack``: the partials ``(o, base-2 lse)`` by owner into the exchange buffer;
* ``merge``: the ``D`` received partials into this rank's ``Hq`` heads, bf16;
* ``local``: the four back to back in one graph: the layer without its two collectives;
* ``tp``: plain TP's decode of ``Hq`` heads over all ``C`` tokens, for scale.

``kv_floor = B * ceil(C / D) * KV bytes/token / BW`` (the HBM read bandwidth of a large sum)
is what rank 0's attention must read. With ``--full``, a ``bench_attention.json`` of the same
card model and ``D``, each point measured there also gets ``full`` (the whole layer on ``D``
GPUs) and ``comm = full - local``: the Q all-gather, the all-to-all of the partials and the
wait for the slowest rank. CPU (``--device cpu``): PyTorch attention, pack and merge, eager.

Results: a table, ``bench_attention_stages.json`` and ``bench_attention_stages.png`` in ``--out``.
"""

import json
import os

from tqdm import tqdm

from bench_attention import (
    HEAD_DIM,
    HEADS_PER_RANK,
    SM_SCALE,
    Rank,
    capture_mode,
    card_name,
    close_rank,
    decode_wrapper,
    free_port,
    grid,
    grid_parser,
    init_rank,
    kv_bytes_per_token,
    kv_cache,
    local_len,
    measure_bandwidth,
    parse_grid_args,
    random_tensor,
    time_step,
)
from bench_common import pyplot, utc_now

from sglang_dcp.layers.attention.merge import PartialLayout, packing_kernels, to_base2

STAGES = ("reorder", "attention", "pack", "merge")


def stage_steps(rank: Rank, kv, batch: int, context: int) -> dict:
    """The steps to time at ``(B, C)``: each stage alone on fixed inputs, and ``local``;
    ``None`` for a stage that launches no kernel (the reorder where it is a view, at B = 1)."""
    dcp_size = rank.args.dcp
    heads = dcp_size * HEADS_PER_RANK
    wrapper = decode_wrapper(rank, heads, batch, local_len(context, dcp_size, 0))
    pack_by_owner, merge_packed = packing_kernels(rank.device)
    gathered = random_tensor(rank, dcp_size, batch, HEADS_PER_RANK, HEAD_DIM)

    def reorder():
        return gathered.movedim(0, 1).reshape(batch, heads, HEAD_DIM).contiguous()

    def attention(q_all):
        return wrapper.forward_return_lse(q_all, kv, sm_scale=SM_SCALE)

    q_all = reorder()
    o, lse = attention(q_all)
    layout = PartialLayout(batch, HEADS_PER_RANK, HEAD_DIM, o.dtype)

    def pack(o, lse):
        return pack_by_owner(o, to_base2(lse, rank.lse_base), layout, dcp_size)

    def merge(buf):
        return merge_packed(buf, layout, rank.dtype)[0]

    buf = pack(o, lse)
    return {
        "reorder": None if q_all.data_ptr() == gathered.data_ptr() else reorder,
        "attention": lambda: attention(q_all),
        "pack": lambda: pack(o, lse),
        "merge": lambda: merge(buf),
        "local": lambda: merge(pack(*attention(reorder()))),
    }


def measure_stages(rank: Rank, kv, batch: int, context: int, bandwidth: float) -> dict:
    q = random_tensor(rank, batch, HEADS_PER_RANK, HEAD_DIM)
    tp = decode_wrapper(rank, HEADS_PER_RANK, batch, context)
    point = {"batch": batch, "context": context,
             "tp_us": time_step(rank, lambda: tp.forward(q, kv, sm_scale=SM_SCALE)) * 1e6}
    for name, step in stage_steps(rank, kv, batch, context).items():
        # no kernel, nothing to time: an empty graph's replay measures only the launch interval
        point[f"{name}_us"] = 0.0 if step is None else time_step(rank, step) * 1e6
    rank0_tokens = batch * local_len(context, rank.args.dcp, 0)
    point["kv_floor_us"] = rank0_tokens * kv_bytes_per_token(rank.dtype) / bandwidth * 1e6
    return point


def card_model(card: str) -> str:
    """``"4x NVIDIA H200"`` -> ``"NVIDIA H200"``."""
    return card.split("x ", 1)[-1]


def load_full(args):
    """The ``bench_attention.json`` of ``--full``, checked against this run's card and D."""
    if not args.full:
        return None
    with open(args.full) as f:
        full = json.load(f)
    here = card_name(args.device)
    if card_model(full["card"]) != card_model(here) or full["config"]["dcp"] != args.dcp:
        raise SystemExit(
            f"--full {args.full} was measured on {full['card']} with --dcp {full['config']['dcp']}; "
            f"this run is {here} with --dcp {args.dcp}: pass a result of the same card model and D"
        )
    return full


def add_full(points, full) -> None:
    """``full_us`` and ``comm_us = full_us - local_us`` where ``full`` measured the point."""
    if full is None:
        return
    whole = {(p["batch"], p["context"]): p["dcp_us"] for p in full["points"]}
    for point in points:
        key = (point["batch"], point["context"])
        if key in whole:
            point["full_us"] = whole[key]
            point["comm_us"] = whole[key] - point["local_us"]


def report(args, bandwidth, points, skipped, full) -> None:
    card = card_name(args.device)
    out = {
        "title": f"DCP{args.dcp} decode layer by stage, rank 0, {card}"
                 + (f" (whole layer: {full['card']})" if full else ""),
        "card": card,
        "date_utc": utc_now(),
        "config": {**vars(args), "heads_per_rank": HEADS_PER_RANK, "head_dim": HEAD_DIM},
        "hbm_bandwidth_gbps": bandwidth / 1e9,
        "full": full and {k: full[k] for k in ("card", "date_utc", "collective_latency_us")},
        "points": points,
        "skipped_over_kv_budget": skipped,
    }
    columns = ["tp", *STAGES, "local", "kv_floor"] + (["full", "comm"] if full else [])
    print(f"\n{out['title']}, us per layer (HBM read bandwidth {bandwidth / 1e9:.0f} GB/s)")
    if full:
        print(f"full, comm: the whole layer on {full['card']} ({full['date_utc']}), minus local")
    print(f"{'B':>4} {'C':>7} " + " ".join(f"{c:>9}" for c in columns))
    for p in points:
        print(f"{p['batch']:>4} {p['context']:>7} "
              + " ".join(f"{p[c + '_us']:>9.1f}" if c + "_us" in p else f"{'-':>9}" for c in columns))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_attention_stages.json"), "w") as f:
        json.dump(out, f, indent=1)
    plot(out, os.path.join(args.out, "bench_attention_stages.png"))
    print(f"results in {args.out}")


def tokens_label(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def plot(out, path) -> None:
    """One bar per point: its stages (and ``comm``) as fractions of the whole layer."""
    plt = pyplot()
    points = out["points"]
    parts = [*STAGES, "gaps", "comm"]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(points)), 4.5))
    bottoms = [0.0] * len(points)
    for part in parts:
        values = []
        for p in points:
            total = p.get("full_us", p["local_us"])
            stages_us = sum(p[f"{s}_us"] for s in STAGES)
            us = max(p["local_us"] - stages_us, 0.0) if part == "gaps" else p.get(f"{part}_us", 0.0)
            values.append(max(us, 0.0) / total)
        ax.bar(range(len(points)), values, bottom=bottoms, label=part)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    for i, p in enumerate(points):
        mark = "" if "full_us" in p else "*"
        ax.text(i, 1.02, f"{p.get('full_us', p['local_us']):.0f}{mark}", ha="center", fontsize=7)
    if any("full_us" not in p for p in points):
        fig.text(0.01, 0.01, "*: no whole-layer time at this point, local stages only", fontsize=7)
    ax.set_xticks(range(len(points)))
    ax.set_xticklabels([f"B={p['batch']}\nC={tokens_label(p['context'])}" for p in points], fontsize=7)
    ax.set_ylabel("fraction of the layer (number: us)")
    ax.set_ylim(0, 1.12)
    ax.legend(fontsize=8, ncol=len(parts), loc="lower center", bbox_to_anchor=(0.5, -0.32))
    ax.set_title(out["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = grid_parser(__doc__, "the DCP size whose rank-0 shapes are timed (on one GPU)")
    parser.add_argument("--full", help="bench_attention.json of the same card model and --dcp: "
                        "adds each shared point's whole layer and comm = full - local")
    args = parse_grid_args(parser)
    full = load_full(args)
    rank = init_rank(0, 1, args, free_port())
    points, skipped = grid(args, rank.dtype)
    with capture_mode(rank.device):
        bandwidth = measure_bandwidth(rank)
        kv = kv_cache(rank, points)
        results = [measure_stages(rank, kv, batch, context, bandwidth)
                   for batch, context in tqdm(points, desc=f"DCP{args.dcp} stages")]
    close_rank()
    add_full(results, full)
    report(args, bandwidth, results, skipped, full)


if __name__ == "__main__":
    main()
