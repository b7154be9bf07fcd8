"""KV capacity, batch-1 latency and a throughput sweep: TP against TP + DCP, through the
HTTP server and ``python -m sglang.bench_serving`` (random token ids, fixed lengths).

    python benchmark/dcp/bench_serving_sweep.py --tp 4 --dcp 2 [--shapes 32768x1024,8192x1024]
        [--concurrency 8,16,24,32] [--latency-inputs 8192,32768] [--out benchmark/dcp/results]

The model is a dummy-weight dense Qwen3 proxy with the per-rank attention shape of the
upstream PR's headline setting (Qwen3-235B-A22B at TP8: 8 query heads and 1 KV head per rank,
head_dim 128): ``8 * tp`` query heads and ``tp / dcp`` KV heads, hidden 2048, 24 layers,
intermediate 6144, vocab 32000 (at TP2: 16 query heads, 1 KV head). The KV
budget is ``--kv-rows`` physical tokens per rank for both runs, to mimic a large model whose
weights leave little room for KV. Each configuration runs on one server; per throughput
point the server log gives the most requests it held at once (``#running-req``).

``--engine upstream`` benchmarks the SGLang release on ``PYTHONPATH`` without this plugin
(upstream 0.5.16's own DCP, Triton attention backend) on the same model and settings:

    PYTHONPATH=/tmp/site-0.5.16:python python benchmark/dcp/bench_serving_sweep.py \\
        --engine upstream --configs dcp ...

Results go to ``serving_sweep_tp<TP>.json`` (``serving_sweep_upstream_tp<TP>.json``) in
``--out``, rewritten after every point, and a PNG at the end. ``--resume FILE`` keeps a copy in FILE and, when FILE
exists, continues the run saved there: a sweep cut short by a time limit goes on where it
stopped, on a new server, measuring only the missing points.
"""

import argparse
import json
import os
import re
import tempfile
import time

from tqdm import tqdm

from bench_common import int_list, pyplot, utc_now

from sglang_dcp.test.cpu_env import use_cpu_env
from sglang_dcp.test.models import write_dummy_gqa_model
from sglang_dcp.test.serving import (
    Server,
    bench_serving,
    device_server_args,
    http_json,
    write_byte_tokenizer,
)

PROXY = dict(hidden_size=2048, num_hidden_layers=24, intermediate_size=6144, vocab_size=32000)
# --smoke: the same heads on a tiny body, to check the whole flow quickly (e.g. on CPU)
SMOKE = dict(hidden_size=256, num_hidden_layers=2, intermediate_size=512, vocab_size=4096)
CONTEXT_LEN = 65536
UPSTREAM_ATTENTION_BACKEND = "triton"  # the only MHA/GQA backend with DCP in SGLang 0.5.16
CONFIG_LABELS = {"tp": "tp", "dcp": "tp+dcp", "dcp-lse": "tp+dcp-lse"}  # dcp: --dcp-comm a2a
# what a resumed run must share with the run it continues
SETTINGS = ("engine", "card", "tp_size", "dcp_size", "kv_rows_per_rank", "model")


def proxy_model(path, tp, dcp, body):
    write_dummy_gqa_model(
        path, num_attention_heads=8 * tp, num_key_value_heads=tp // dcp, head_dim=128,
        torch_dtype="bfloat16", max_position_embeddings=CONTEXT_LEN, **body,
    )
    write_byte_tokenizer(path, vocab_size=4096, model_vocab_size=body["vocab_size"])
    return path


def max_running_requests(log_text):
    """The largest ``#running-req`` of the scheduler's decode log lines."""
    return max((int(n) for n in re.findall(r"#running-req: (\d+)", log_text)), default=None)


def measure(server, model, input_len, output_len, concurrency, num_prompts, log_path):
    """One bench_serving run and the most requests the server held meanwhile.

    The prompts go to the server as token ids (``--tokenize-prompt``): as text, random ids
    decode and re-tokenize to other lengths (1.33x longer with the proxy's tokenizer). The
    radix cache is flushed first: bench_serving draws every run's prompts from the same seed,
    so a point's first prompt would otherwise start with an earlier point's.
    """
    status, reply = http_json(server.url + "/flush_cache", {})
    if status != 200:
        raise RuntimeError(f"/flush_cache answered {status}: {reply}")
    with open(server.log_path) as f:
        f.seek(0, os.SEEK_END)
        returncode, summary = bench_serving(
            server, model,
            ["--dataset-name", "random-ids", "--random-input-len", str(input_len),
             "--random-output-len", str(output_len), "--random-range-ratio", "1", "--tokenize-prompt",
             "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--disable-tqdm"],
            log_path,
        )
        if summary is None:
            raise RuntimeError(f"bench_serving failed ({returncode}); see {log_path}")
        summary["max_running_requests"] = max_running_requests(f.read())
    return summary


def latency_point(summary):
    """Batch-1 TPOT and TTFT; both ``None`` (with the reason) where ``bench_serving`` saw no
    first token (it then counts the prefill into TPOT)."""
    if not summary["median_ttft_ms"]:
        return {"median_tpot_ms": None, "median_ttft_ms": None,
                "invalid": "no first token seen: TPOT would include the prefill"}
    return {"median_tpot_ms": summary["median_tpot_ms"], "median_ttft_ms": summary["median_ttft_ms"]}


def attention_backend(args):
    if args.engine == "upstream":
        return UPSTREAM_ATTENTION_BACKEND
    from sglang_dcp.server_args import DCP_ATTENTION_BACKENDS

    return DCP_ATTENTION_BACKENDS[args.device]


def server_args(model, args, dcp_size, config):
    if args.engine == "plugin":
        backend = device_server_args(args.device, args.tp)
        backend += ["--dcp-comm", "lse"] if config == "dcp-lse" else []
    else:
        backend = ["--attention-backend", UPSTREAM_ATTENTION_BACKEND]
    return ["--model-path", model, "--load-format", "dummy", "--tp-size", str(args.tp),
            "--dcp-size", str(dcp_size), *backend, "--grammar-backend", "none",
            "--max-total-tokens", str(args.kv_rows), "--context-length", str(args.context_length),
            "--cuda-graph-max-bs-decode", str(max(args.concurrency)),
            "--disable-prefill-cuda-graph", "--mem-fraction-static", str(args.mem_fraction)]


def logical_capacity(engine, dcp_size, max_total_num_tokens):
    """Logical KV tokens from a server's ``max_total_num_tokens``: this plugin reports the
    logical capacity, upstream 0.5.16 its physical per-rank pool (its scheduler hands over the
    model runner's count; only its allocator is widened to ``rows * dcp_size``)."""
    return max_total_num_tokens * dcp_size if engine == "upstream" else max_total_num_tokens


def shape_name(shape):
    return f"{shape[0]}x{shape[1]}"


WARM_UP_OUTPUT = 64  # tokens


def measured(result, kind, shape, concurrency):
    """Whether ``result`` (of a resumed run) already holds this point."""
    if kind == "latency":
        return str(shape[0]) in result["latency"]
    return str(concurrency) in result["throughput"].get(shape_name(shape), {})


def run_config(model, args, config, work, result, save):
    """Measure configuration ``tp``, ``dcp`` or ``dcp-lse`` on one server into ``result``,
    calling ``save()`` after each point; points ``result`` already holds (a resumed run) are
    not measured again."""
    dcp_size = 1 if config == "tp" else args.dcp
    result["dcp"] = dcp_size
    result.setdefault("latency", {})
    result.setdefault("throughput", {})
    points = [("latency", (n, args.latency_output), 1) for n in args.latency_inputs]
    points += [("throughput", shape, c) for shape in args.shapes for c in args.concurrency]
    todo = [point for point in points if not measured(result, *point)]
    if not todo:
        return
    log_path = os.path.join(work, f"bench_{config}.log")
    started = time.monotonic()
    with Server(server_args(model, args, dcp_size, config), args.port,
                os.path.join(work, f"server_{config}.log")) as server:
        result["server_start_seconds"] = round(time.monotonic() - started, 1)
        capacity = logical_capacity(args.engine, dcp_size, server.server_info()["max_total_num_tokens"])
        if result.setdefault("capacity_tokens", capacity) != capacity:
            raise RuntimeError(f"{config}: capacity {capacity} != {result['capacity_tokens']} of the resumed run")
        # one unmeasured request first: the first prefill with a chunked prefix and the first
        # decode steps after start-up compile and warm what the measured points then reuse
        measure(server, model, max(args.latency_inputs), WARM_UP_OUTPUT, 1, 1, log_path)
        for kind, (input_len, output_len), concurrency in tqdm(todo, desc=CONFIG_LABELS[config]):
            num_prompts = args.latency_prompts if kind == "latency" else args.prompts_per_concurrency * concurrency
            started = time.monotonic()
            summary = measure(server, model, input_len, output_len, concurrency, num_prompts, log_path)
            if kind == "latency":
                point = result["latency"][str(input_len)] = latency_point(summary)
            else:
                point = result["throughput"].setdefault(shape_name((input_len, output_len)), {})[str(concurrency)] = {
                    "output_throughput": summary["output_throughput"],
                    "median_tpot_ms": summary["median_tpot_ms"],
                    "max_running_requests": summary["max_running_requests"],
                }
            point["seconds"] = round(time.monotonic() - started, 1)  # to plan device time
            result["date_utc"] = utc_now()
            save()


def plot(results, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label in CONFIG_LABELS.values():
        for shape, points in results.get(label, {}).get("throughput", {}).items():
            conc = sorted(points, key=int)
            ax.plot([int(c) for c in conc], [points[c]["output_throughput"] for c in conc],
                    marker="o", label=f"{label} {shape}")
    ax.set_xlabel("max concurrency")
    ax.set_ylabel("output tokens/s")
    ax.set_title(results["title"])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_tables(results):
    runs = {label: results[label] for label in CONFIG_LABELS.values() if label in results}
    print(f"\n{results['title']}")
    for label, run in runs.items():
        print(f"capacity (max_total_num_tokens) {label}: {run['capacity_tokens']}")
    if "capacity_ratio" in results:
        print(f"capacity ratio: {results['capacity_ratio']:.2f}x")
    print(f"\n{'batch 1':10}" + "".join(f" {'TPOT ' + l:>12} {'TTFT ' + l:>12}" for l in runs))
    for n in next(iter(runs.values()))["latency"]:
        points = [r["latency"][n] for r in runs.values()]
        print(f"{n:10}" + "".join(
            f" {p['median_tpot_ms']:>12.2f} {p['median_ttft_ms']:>12.0f}" if p["median_tpot_ms"] else
            f" {'invalid':>12} {'-':>12}" for p in points))
    print(f"\n{'shape':12} {'conc':>5}" + "".join(f" {l + ' tok/s':>13} {'running':>7}" for l in runs)
          + (f" {'gain':>7}" if len(runs) == 2 else ""))
    shapes = {shape: points for run in runs.values() for shape, points in run["throughput"].items()}
    for shape, points in shapes.items():
        for c in points:
            cells = [r["throughput"].get(shape, {}).get(c) for r in runs.values()]
            line = f"{shape:12} {c:>5}" + "".join(
                f" {p['output_throughput']:>13.0f} {p['max_running_requests'] or '-':>7}" if p else
                f" {'-':>13} {'-':>7}" for p in cells)
            if len(cells) == 2 and all(cells):
                line += f" {cells[1]['output_throughput'] / cells[0]['output_throughput'] - 1:>+7.1%}"
            print(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, default=4)
    parser.add_argument("--dcp", type=int, default=2)
    parser.add_argument("--engine", choices=["plugin", "upstream"], default="plugin",
                        help="plugin: SGLang 0.5.14 with this plugin (flashinfer); upstream: the SGLang "
                             "on PYTHONPATH with its own DCP (triton backend)")
    parser.add_argument("--configs", default="tp,dcp",
                        help="comma list of tp (plain TP), dcp (--dcp-comm a2a) and dcp-lse")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--kv-rows", type=int, default=200_000, help="physical KV tokens per rank")
    parser.add_argument("--mem-fraction", type=float, default=0.8)
    parser.add_argument("--shapes", default="32768x1024,8192x1024")
    parser.add_argument("--concurrency", default="8,16,24,32")
    parser.add_argument("--prompts-per-concurrency", type=int, default=1)
    parser.add_argument("--latency-inputs", default="8192,32768")
    parser.add_argument("--latency-output", type=int, default=512)
    parser.add_argument("--latency-prompts", type=int, default=3)
    parser.add_argument("--port", type=int, default=30040)
    parser.add_argument("--card", default="", help="GPU name for the results (e.g. 2x H100)")
    parser.add_argument("--smoke", action="store_true", help="tiny model and context (flow check)")
    parser.add_argument("--out", default="benchmark/dcp/results")
    parser.add_argument("--resume", metavar="JSON",
                        help="continue the run saved in JSON (kept up to date after each point): "
                             "points already there are not measured again")
    args = parser.parse_args()
    args.shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",") if s]
    args.concurrency = int_list(args.concurrency)
    args.latency_inputs = int_list(args.latency_inputs)
    if args.device == "cpu":
        use_cpu_env()  # inherited by the servers
    configs = [c for c in args.configs.split(",") if c]
    if not configs or set(configs) - set(CONFIG_LABELS):
        parser.error(f"--configs must list some of {sorted(CONFIG_LABELS)}, got {args.configs!r}")

    work = tempfile.mkdtemp(prefix="dcp_sweep_")
    body = SMOKE if args.smoke else PROXY
    model = proxy_model(os.path.join(work, "model"), args.tp, args.dcp, body)
    args.context_length = 4096 if args.smoke else CONTEXT_LEN
    engine = "SGLang 0.5.14 + sglang-dcp" if args.engine == "plugin" else "upstream SGLang"
    engine += f" ({attention_backend(args)})"
    results = {
        "title": f"TP{args.tp} vs TP{args.tp}+DCP{args.dcp}, {engine}, {args.card or args.device}",
        "engine": args.engine, "card": args.card, "tp_size": args.tp, "dcp_size": args.dcp,
        "kv_rows_per_rank": args.kv_rows,
        "model": {"kind": "dummy-weight Qwen3 proxy, bf16", "num_attention_heads": 8 * args.tp,
                  "num_key_value_heads": args.tp // args.dcp, "head_dim": 128, **body},
    }
    name = ("serving_sweep" if args.engine == "plugin" else "serving_sweep_upstream") + f"_tp{args.tp}"
    os.makedirs(args.out, exist_ok=True)
    if args.resume and os.path.exists(args.resume):
        with open(args.resume) as f:
            previous = json.load(f)
        changed = [k for k in SETTINGS if previous.get(k) != results[k]]
        if changed:
            parser.error(f"--resume {args.resume}: measured with other {', '.join(changed)}; drop --resume or move it")
        results = previous

    def save():
        if {"tp", "tp+dcp"} <= results.keys():
            results["capacity_ratio"] = results["tp+dcp"]["capacity_tokens"] / results["tp"]["capacity_tokens"]
        for path in {os.path.join(args.out, f"{name}.json"), args.resume} - {None}:
            with open(path, "w") as f:
                json.dump(results, f, indent=1)

    for config in configs:
        run_config(model, args, config, work, results.setdefault(CONFIG_LABELS[config], {}), save)
    save()
    plot(results, os.path.join(args.out, f"{name}.png"))
    print(f"(logs in {work})")
    print_tables(results)


if __name__ == "__main__":
    main()
