"""Collect the latest benchmark results into ``results/summary.json`` (and print it).

    python benchmark/dcp/summarize.py [--results benchmark/dcp/results]

Reads ``serving_sweep_tp<TP>.json`` and ``serving_sweep_upstream_tp<TP>.json``
(bench_serving_sweep.py; each headline serving figure comes from the largest TP that measured
it, every TP's are under ``serving_by_tp``), ``bench_attention.json`` (bench_attention.py),
``bench_attention_stages.json`` (bench_attention_stages.py), ``accuracy.json`` and
``accuracy_gpu.json`` (bench_accuracy.py on CPU and on a GPU) when present; a figure whose benchmark has not run is ``null``.
"""

import argparse
import datetime
import glob
import json
import os


def load(results_dir, name):
    path = os.path.join(results_dir, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


# what an upstream run must share with ours to stand beside it
PEER_SETTINGS = ("card", "tp_size", "dcp_size", "kv_rows_per_rank", "model")


def load_sweeps(results_dir, engine):
    """``{tp_size: sweep}`` of ``serving_sweep[_upstream]_tp<TP>.json``."""
    prefix = "serving_sweep_upstream" if engine == "upstream" else "serving_sweep"
    sweeps = (load(results_dir, os.path.basename(path))
              for path in glob.glob(os.path.join(results_dir, f"{prefix}_tp*.json")))
    return {sweep["tp_size"]: sweep for sweep in sweeps if sweep["engine"] == engine}


def batch1_tpot(run, input_len):
    """A batch-1 point's median TPOT (ms); ``None`` where the run has no valid point."""
    return run["latency"].get(input_len, {}).get("median_tpot_ms")


def output_throughput(run, shape, concurrency):
    """A throughput point's output tok/s; ``None`` where the run did not measure it."""
    return run["throughput"].get(shape, {}).get(concurrency, {}).get("output_throughput")


def serving_figures(sweep):
    """Capacity ratio, batch-1 TPOT overhead (at 32k and at every measured input length; ``null``
    where a run had no valid point), best throughput gain at 32k input."""
    tp, dcp = sweep["tp"], sweep["tp+dcp"]
    overheads = {}
    for n in tp["latency"]:
        tpots = batch1_tpot(tp, n), batch1_tpot(dcp, n)
        overheads[n] = tpots[1] / tpots[0] - 1 if all(tpots) else None
    gains = [  # the points both configurations ran
        output_throughput(dcp, shape, c) / point["output_throughput"] - 1
        for shape, points in tp["throughput"].items() if shape.startswith("32768x")
        for c, point in points.items() if output_throughput(dcp, shape, c)
    ]
    return {
        "capacity_ratio": sweep["capacity_ratio"],
        "tpot_overhead_bs1_32k": overheads.get("32768"),
        "tpot_overhead_bs1": overheads,
        "throughput_gain_32k_max": max(gains) if gains else None,
        "serving_card": sweep.get("card"),
        "serving_date_utc": max(run.get("date_utc", "") for run in (tp, dcp)),
        "serving_config": {k: sweep[k] for k in ("tp_size", "dcp_size", "model", "kv_rows_per_rank")},
    }


HEADLINE_KEYS = ("capacity_ratio", "tpot_overhead_bs1_32k", "throughput_gain_32k_max")


def headline(by_tp):
    """Each headline serving figure from the largest TP size that measured it, with that size
    and its card under ``headline_sources`` (``null`` where no run measured it)."""
    figures, sources = {}, {}
    for key in HEADLINE_KEYS:
        tp = max((tp for tp, run in by_tp.items() if run[key] is not None), default=None)
        run = by_tp.get(tp)
        figures[key] = run and run[key]
        sources[key] = run and {"tp_size": tp, "card": run["serving_card"],
                                "date_utc": run["serving_date_utc"]}
    return {**figures, "headline_sources": sources}


def upstream_figures(sweep, upstream):
    """Ours against upstream 0.5.16's DCP on the same points: logical capacity, batch-1 TPOT,
    output tok/s; ``None`` unless both ran with the same card, sizes and model."""
    if sweep is None or upstream is None or any(sweep[k] != upstream[k] for k in PEER_SETTINGS):
        return None
    ours, theirs = sweep["tp+dcp"], upstream["tp+dcp"]
    return {
        "card": upstream["card"],
        "tp_size": upstream["tp_size"],
        "capacity_tokens": {"tp": sweep["tp"]["capacity_tokens"], "dcp": ours["capacity_tokens"],
                            "upstream_dcp": theirs["capacity_tokens"]},
        "tpot_bs1_ms": {n: {"tp": batch1_tpot(sweep["tp"], n), "dcp": batch1_tpot(ours, n),
                            "upstream_dcp": batch1_tpot(theirs, n)}
                        for n in theirs["latency"]},
        "output_throughput": {shape: {c: {"tp": output_throughput(sweep["tp"], shape, c),
                                          "dcp": output_throughput(ours, shape, c),
                                          "upstream_dcp": point["output_throughput"]}
                                      for c, point in points.items()}
                              for shape, points in theirs["throughput"].items()},
    }


# (B, C) of the layer's stage breakdown in the summary: batch-1 TPOT at 8k and 32k input, the
# attention goal's headline point and its worst one
STAGE_POINTS = ((1, 8192), (1, 32768), (64, 4096), (64, 32768))


def attention_stages(stages):
    """``{"BxC": {stage: us}}`` at ``STAGE_POINTS``, with the cards the times come from."""
    if stages is None:
        return None
    points = {(p["batch"], p["context"]): p for p in stages["points"]}
    return {
        "card": stages["card"],
        "date_utc": stages["date_utc"],
        "whole_layer_card": stages["full"] and stages["full"]["card"],
        "us": {f"{b}x{c}": {k[:-3]: round(v, 1) for k, v in points[b, c].items() if k.endswith("_us")}
               for b, c in STAGE_POINTS if (b, c) in points},
    }


def gsm8k_identical_fraction(accuracy: dict) -> float:
    """The least share of identical answers of a DCP run against dcp 1 (bench_accuracy.py)."""
    return min(c["identical_texts"] / c["compared"] for c in accuracy["comparisons"] if c["reference"] == "dcp1")


def gsm8k_figures(accuracy: dict) -> dict:
    return {
        **{k: accuracy[k] for k in ("model", "card", "date", "tp", "dcp", "num_questions")},
        "accuracy": {name: run["accuracy"] for name, run in accuracy["runs"].items()},
        "identical_texts": {f"{c['candidate']} vs {c['reference']}": f"{c['identical_texts']}/{c['compared']}"
                            for c in accuracy["comparisons"]},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="benchmark/dcp/results")
    args = parser.parse_args()
    accuracy = load(args.results, "accuracy.json")
    gpu_accuracy = load(args.results, "accuracy_gpu.json")
    sweeps, upstream = load_sweeps(args.results, "plugin"), load_sweeps(args.results, "upstream")
    by_tp = {tp: serving_figures(sweep) for tp, sweep in sorted(sweeps.items())}
    attention = load(args.results, "bench_attention.json")
    summary = {
        "date": datetime.date.today().isoformat(),
        **headline(by_tp),
        "serving_by_tp": by_tp,
        "attn_floor_ratio_bs64_32k": attention and attention["attn_floor_ratio_bs64_32k"],
        "attention_card": attention and attention["card"],
        "attention_floor_bandwidth_gbps": attention and attention["hbm_bandwidth_gbps"],
        "attention_stages": attention_stages(load(args.results, "bench_attention_stages.json")),
        "upstream_peer": {tp: upstream_figures(sweeps.get(tp), run) for tp, run in sorted(upstream.items())},
        "gsm8k_identical_fraction": accuracy and gsm8k_identical_fraction(accuracy),
        "gsm8k": accuracy and gsm8k_figures(accuracy),
        "gsm8k_gpu": gpu_accuracy and gsm8k_figures(gpu_accuracy),
    }
    with open(os.path.join(args.results, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
