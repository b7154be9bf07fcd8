"""KV capacity, batch-1 latency and a throughput sweep: TP against TP + DCP, through the
HTTP server and ``python -m sglang.bench_serving`` (random token ids, fixed lengths).

    python benchmark/dcp/bench_serving_sweep.py --tp 4 --dcp 2 [--shapes 32768x1024,8192x1024]
        [--concurrency 8,16,24,32,48] [--latency-inputs 8192,32768] [--out benchmark/dcp/results]

The model is a dummy-weight dense Qwen3 proxy with the per-rank attention shape of the
upstream PR's headline setting (Qwen3-235B-A22B at TP8: 8 query heads and 1 KV head per rank,
head_dim 128): ``8 * tp`` query heads and ``tp / dcp`` KV heads, hidden 2048, 24 layers,
intermediate 6144, vocab 32000 (the proxy of ../shared/notes/gpu-anchors.md at TP2). The KV
budget is ``--kv-rows`` physical tokens per rank for both runs, to mimic a large model whose
weights leave little room for KV. Each run starts one server per configuration; results go to
``serving_sweep.json`` and ``serving_sweep.png`` in ``--out``.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

from tqdm import tqdm

from sglang_dcp.test.models import write_dummy_gqa_model
from sglang_dcp.test.serving import Server, device_server_args, write_byte_tokenizer


PROXY = dict(hidden_size=2048, num_hidden_layers=24, intermediate_size=6144, vocab_size=32000)
# --smoke: the same heads on a tiny body, to check the whole flow quickly (e.g. on CPU)
SMOKE = dict(hidden_size=256, num_hidden_layers=2, intermediate_size=512, vocab_size=4096)
CONTEXT_LEN = 65536


def proxy_model(path, tp, dcp, body):
    write_dummy_gqa_model(
        path, num_attention_heads=8 * tp, num_key_value_heads=tp // dcp, head_dim=128,
        torch_dtype="bfloat16", max_position_embeddings=CONTEXT_LEN, **body,
    )
    write_byte_tokenizer(path, vocab_size=4096)
    return path


def bench(server, model, args, input_len, output_len, concurrency, num_prompts, log):
    """One bench_serving run; returns its JSON summary line."""
    out_file = tempfile.mktemp(suffix=".jsonl")
    cmd = [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang",
           "--base-url", server.url, "--tokenizer", model, "--dataset-name", "random-ids",
           "--random-input-len", str(input_len), "--random-output-len", str(output_len),
           "--random-range-ratio", "1", "--num-prompts", str(num_prompts),
           "--max-concurrency", str(concurrency), "--output-file", out_file, "--disable-tqdm"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    log.write(run.stdout + run.stderr)
    if run.returncode != 0:
        raise RuntimeError(f"bench_serving failed ({run.returncode}): {run.stderr[-2000:]}")
    with open(out_file) as f:
        return json.loads(f.read().splitlines()[-1])


def run_config(model, args, dcp_size, work):
    """Everything measured on one server (``dcp_size`` 1 = plain TP)."""
    server_args = ["--model-path", model, "--load-format", "dummy", "--tp-size", str(args.tp),
                   "--dcp-size", str(dcp_size), *device_server_args(args.device, args.tp),
                   "--grammar-backend", "none",
                   "--max-total-tokens", str(args.kv_rows), "--context-length", str(args.context_length),
                   "--cuda-graph-max-bs-decode", str(max(args.concurrency)),
                   "--disable-prefill-cuda-graph", "--mem-fraction-static", str(args.mem_fraction)]
    label = "tp" if dcp_size == 1 else "tp+dcp"
    result = {"dcp": dcp_size, "latency": {}, "throughput": {}}
    with Server(server_args, args.port, os.path.join(work, f"server_dcp{dcp_size}.log")) as server, \
            open(os.path.join(work, f"bench_dcp{dcp_size}.log"), "w") as log:
        result["capacity_tokens"] = server.server_info()["max_total_num_tokens"]
        points = [("latency", n, args.latency_output, 1) for n in args.latency_inputs]
        points += [("throughput", shape, None, c) for shape in args.shapes for c in args.concurrency]
        for kind, shape, output_len, concurrency in tqdm(points, desc=label):
            if kind == "latency":
                summary = bench(server, model, args, shape, output_len, 1, args.latency_prompts, log)
                result["latency"][str(shape)] = {
                    "median_tpot_ms": summary["median_tpot_ms"],
                    "median_ttft_ms": summary["median_ttft_ms"],
                }
            else:
                input_len, output_len = shape
                summary = bench(server, model, args, input_len, output_len, concurrency,
                                args.prompts_per_concurrency * concurrency, log)
                result["throughput"].setdefault(f"{input_len}x{output_len}", {})[str(concurrency)] = {
                    "output_throughput": summary["output_throughput"],
                    "median_tpot_ms": summary["median_tpot_ms"],
                }
    return result


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in ("tp", "tp+dcp"):
        for shape, points in results[name]["throughput"].items():
            conc = sorted(points, key=int)
            ax.plot([int(c) for c in conc], [points[c]["output_throughput"] for c in conc],
                    marker="o", label=f"{name} {shape}")
    ax.set_xlabel("max concurrency")
    ax.set_ylabel("output tokens/s")
    ax.set_title(results["title"])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, default=4)
    parser.add_argument("--dcp", type=int, default=2)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--kv-rows", type=int, default=400_000, help="physical KV tokens per rank")
    parser.add_argument("--mem-fraction", type=float, default=0.8)
    parser.add_argument("--shapes", default="32768x1024,8192x1024")
    parser.add_argument("--concurrency", default="8,16,24,32,48")
    parser.add_argument("--prompts-per-concurrency", type=int, default=2)
    parser.add_argument("--latency-inputs", default="8192,32768")
    parser.add_argument("--latency-output", type=int, default=512)
    parser.add_argument("--latency-prompts", type=int, default=3)
    parser.add_argument("--port", type=int, default=30040)
    parser.add_argument("--card", default="", help="GPU name for the results (e.g. 4x H200)")
    parser.add_argument("--smoke", action="store_true", help="tiny model and context (flow check)")
    parser.add_argument("--out", default="benchmark/dcp/results")
    args = parser.parse_args()
    args.shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",") if s]
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    args.latency_inputs = [int(n) for n in args.latency_inputs.split(",") if n]

    work = tempfile.mkdtemp(prefix="dcp_sweep_")
    body = SMOKE if args.smoke else PROXY
    model = proxy_model(os.path.join(work, "model"), args.tp, args.dcp, body)
    args.context_length = 4096 if args.smoke else CONTEXT_LEN
    results = {
        "title": f"TP{args.tp} vs TP{args.tp}+DCP{args.dcp}, {args.card or args.device}",
        "card": args.card, "tp_size": args.tp, "dcp_size": args.dcp, "kv_rows_per_rank": args.kv_rows,
        "model": {"kind": "dummy-weight Qwen3 proxy, bf16", "num_attention_heads": 8 * args.tp,
                  "num_key_value_heads": args.tp // args.dcp, "head_dim": 128, **body},
        "tp": run_config(model, args, 1, work),
        "tp+dcp": run_config(model, args, args.dcp, work),
    }
    tp, dcp = results["tp"], results["tp+dcp"]
    results["capacity_ratio"] = dcp["capacity_tokens"] / tp["capacity_tokens"]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "serving_sweep.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(args.out, "serving_sweep.png"))

    print(f"\n{results['title']} (logs in {work})")
    print(f"capacity (logical KV tokens): tp {tp['capacity_tokens']}, tp+dcp "
          f"{dcp['capacity_tokens']} ({results['capacity_ratio']:.2f}x)")
    print(f"\n{'batch 1':10} {'TPOT tp':>9} {'TPOT dcp':>9} {'overhead':>9} {'TTFT tp':>9} {'TTFT dcp':>9}")
    for n in tp["latency"]:
        a, b = tp["latency"][n], dcp["latency"][n]
        print(f"{n:10} {a['median_tpot_ms']:>9.2f} {b['median_tpot_ms']:>9.2f} "
              f"{b['median_tpot_ms'] / a['median_tpot_ms'] - 1:>+9.1%} "
              f"{a['median_ttft_ms']:>9.0f} {b['median_ttft_ms']:>9.0f}")
    print(f"\n{'shape':12} {'conc':>5} {'tp tok/s':>10} {'dcp tok/s':>10} {'gain':>7}")
    for shape, points in tp["throughput"].items():
        for c, point in points.items():
            other = dcp["throughput"][shape][c]["output_throughput"]
            print(f"{shape:12} {c:>5} {point['output_throughput']:>10.0f} {other:>10.0f} "
                  f"{other / point['output_throughput'] - 1:>+7.1%}")


if __name__ == "__main__":
    main()
