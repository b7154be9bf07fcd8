"""HiCache under DCP at the same memory: a multi-turn workload several times the device pool.

Conversations come back: ``--conversations`` of them take turns round-robin; each turn sends the
whole conversation so far (earlier user turns and the model's own greedy answers) plus
``--turn-tokens`` new user tokens and asks for ``--answer-tokens``. By the last turns the
working set is several times the device pool, so the radix cache evicts older conversations to
the host tier (and, with ``--l3``, to L3 ``file`` storage) and loads them back when they return.

dcp 1 and dcp D run with the same memory per rank (``--rows-per-rank`` device rows,
``--hicache-ratio``): the dcp D engine holds D x the logical tokens on device and host. Per run:
the prompt tokens sent, the tokens found cached (prefill saved) and computed, the tokens loaded
back from the host tier and prefetched from L3 (SGLang's counters), device evictions, the
logical device and host capacity, and the KV bytes per rank on device and host (the same for
both: physical rows x bytes per row), with the cached fraction per turn. JSON (``--out``), a
PNG beside it and a table.

    python benchmark/dcp/bench_hicache.py --device cuda --tp 8 --dcp 2 --model-path M ...
    python benchmark/dcp/bench_hicache.py --device cpu   # tiny random model, CPU HiCache test mode

On CPU the engines run in the CPU HiCache test mode (``SGLANG_DCP_TEST_CPU_HICACHE=1``: PyTorch
copies, unpinned host pool) on a random float32 model: its figures are the cache's behaviour,
not speeds.
"""

import argparse
import dataclasses
import json
import os
import random
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from bench_common import pyplot, utc_now  # noqa: E402

from sglang_dcp.test.cpu_env import use_cpu_env  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--model-path", help="default: a random Llama with one KV head (written to a temp folder)")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--dcp", type=int, default=2)
    p.add_argument("--dcp-comm", default="a2a", choices=["a2a", "lse"])
    p.add_argument("--page-size", type=int, default=1)
    p.add_argument("--rows-per-rank", type=int, default=None, help="device KV rows per rank (cpu 512, cuda 16384)")
    p.add_argument("--hicache-ratio", type=float, default=2.0)
    p.add_argument("--layout", default="page_first")
    p.add_argument("--l3", action="store_true", help="also L3 file storage")
    p.add_argument("--conversations", type=int, default=None, help="cpu 12, cuda 64")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--turn-tokens", type=int, default=None, help="new user tokens per turn (cpu 48, cuda 1024)")
    p.add_argument("--answer-tokens", type=int, default=8)
    p.add_argument("--card", default=None, help="what ran it, e.g. '2x H200' (default: CPU or the CUDA device)")
    p.add_argument("--out", default=None, help="JSON path (default results/hicache_<device>.json)")
    p.add_argument("--run", help=argparse.SUPPRESS)  # internal: one engine, in a child process
    args = p.parse_args()
    cpu = args.device == "cpu"
    for name, cpu_value, cuda_value in (("rows_per_rank", 512, 16384), ("conversations", 12, 64),
                                        ("turn_tokens", 48, 1024)):  # fmt: skip
        if getattr(args, name) is None:
            setattr(args, name, cpu_value if cpu else cuda_value)
    args.out = args.out or os.path.join(os.path.dirname(__file__), "results", f"hicache_{args.device}.json")
    return args


def engine_kwargs(args, dcp_size: int, l3_dir: str) -> dict:
    from sglang_dcp.test.engine_compare import hicache_settings

    kwargs = dict(tp_size=args.tp, dcp_size=dcp_size, page_size=args.page_size, max_total_tokens=args.rows_per_rank,
                  skip_tokenizer_init=True, grammar_backend="none", random_seed=0, log_level="error",
                  enable_metrics=True,
                  **hicache_settings(args.layout, "kernel" if args.layout != "page_first_direct" else "direct",
                                     "write_through", "wait_complete", args.hicache_ratio))  # fmt: skip
    if not args.l3:
        kwargs["hicache_storage_backend"] = None
        kwargs.pop("hicache_storage_backend_extra_config")
    if dcp_size > 1:
        kwargs["dcp_comm"] = args.dcp_comm
    if args.device == "cpu":
        kwargs.update(device="cpu", dtype="float32", mem_fraction_static=0.3, chunked_prefill_size=64,
                      max_running_requests=8, disable_cuda_graph=True)  # fmt: skip
    else:
        kwargs.update(attention_backend="flashinfer", chunked_prefill_size=8192, disable_cuda_graph=True)
    return kwargs


def conversation_turns(args, engine, vocab_size: int):
    """Run the workload on ``engine``; per request (turn, prompt tokens, cached tokens)."""
    rng = random.Random(0)
    history = [[] for _ in range(args.conversations)]
    records = []
    for turn in range(args.turns):
        prompts = []
        for conv in history:
            conv += [rng.randrange(3, vocab_size) for _ in range(args.turn_tokens)]
            prompts.append(list(conv))
        # conversations of one turn go one after another, so each turn revisits all of them
        for conv, prompt in zip(history, prompts):
            out = engine.generate(input_ids=prompt, sampling_params={"max_new_tokens": args.answer_tokens,
                                                                     "temperature": 0.0})  # fmt: skip
            conv += out["output_ids"]
            cached = out["meta_info"]["cached_tokens"]
            records.append({"turn": turn, "prompt_tokens": len(prompt), "cached_tokens": cached})
    return records


def run_one(args, dcp_size: int) -> dict:
    """One engine (this process is a child of ``main``)."""
    import sglang
    import torch
    from transformers import AutoConfig

    from sglang_dcp.test.engine_compare import SchedulerCounts, prometheus_dir, read_prometheus_counters

    config = AutoConfig.from_pretrained(args.model_path)
    with tempfile.TemporaryDirectory() as l3_dir, prometheus_dir(True) as metrics_dir:
        os.environ["SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR"] = l3_dir
        engine = sglang.Engine(model_path=args.model_path, **engine_kwargs(args, dcp_size, l3_dir))
        try:
            info = engine.get_server_info()
            records = conversation_turns(args, engine, config.vocab_size)
        finally:
            engine.shutdown()
        counts = SchedulerCounts()
        read_prometheus_counters(metrics_dir, counts)
    kv_heads_per_rank = max(1, config.num_key_value_heads // args.tp)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = torch.float32.itemsize if args.device == "cpu" else torch.bfloat16.itemsize
    row_bytes = 2 * kv_heads_per_rank * head_dim * config.num_hidden_layers * itemsize
    prompt, cached = sum(r["prompt_tokens"] for r in records), sum(r["cached_tokens"] for r in records)
    return {
        "dcp_size": dcp_size, "device_capacity": info["max_total_num_tokens"], "host_capacity": counts.host_capacity,
        "device_kv_bytes_per_rank": args.rows_per_rank * row_bytes,
        "host_kv_bytes_per_rank": counts.host_capacity // dcp_size * row_bytes,
        "prompt_tokens": prompt, "cached_tokens": cached, "computed_tokens": prompt - cached,
        "loaded_back_tokens": counts.loaded_back_tokens, "prefetched_tokens": counts.prefetched_tokens,
        "evicted_tokens": counts.evicted_tokens,
        "cached_fraction_by_turn": [
            sum(r["cached_tokens"] for r in turn) / sum(r["prompt_tokens"] for r in turn)
            for turn in ([r for r in records if r["turn"] == t] for t in range(args.turns))],
    }  # fmt: skip


def plot(result: dict, path: str) -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    runs = result["runs"]
    for run in runs:
        ax1.plot(range(1, len(run["cached_fraction_by_turn"]) + 1), run["cached_fraction_by_turn"], marker="o",
                 label=f"dcp {run['dcp_size']}")  # fmt: skip
    ax1.set(xlabel="turn", ylabel="prompt tokens found cached", ylim=(0, 1), title="prefill saved per turn",
            xticks=range(1, result["workload"]["turns"] + 1))
    ax1.legend()
    labels = [f"dcp {run['dcp_size']}" for run in runs]
    x = range(len(runs))
    ax2.bar([i - 0.2 for i in x], [run["device_capacity"] for run in runs], 0.4, label="device (logical tokens)")
    ax2.bar([i + 0.2 for i in x], [run["host_capacity"] for run in runs], 0.4, label="host (logical tokens)")
    ax2.set(xticks=list(x), xticklabels=labels, title=f"capacity at the same memory ({result['card']})")
    ax2.legend()
    fig.suptitle(f"HiCache, {result['workload']['conversations']} conversations x {result['workload']['turns']} turns, "
                 f"working set {result['workload']['working_set_tokens']} tokens")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    args = parse_args()
    if args.device == "cpu":
        use_cpu_env()
        os.environ["SGLANG_DCP_TEST_CPU_HICACHE"] = "1"
    if args.run is not None:
        print("RESULT " + json.dumps(run_one(args, int(args.run))), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_path is None:
            from sglang_dcp.test.models import write_random_gqa_model

            args.model_path = write_random_gqa_model(os.path.join(tmp, "model"), num_attention_heads=2 * args.tp,
                                                     num_key_value_heads=1, vocab_size=1024,
                                                     architecture="LlamaForCausalLM")  # fmt: skip
        if args.device == "cpu":
            from sglang_dcp.test.serving import bind_cpu_threads

            bind_cpu_threads(args.tp)
        runs = []
        for dcp_size in (1, args.dcp):
            argv = [sys.executable, __file__, *sys.argv[1:], "--model-path", args.model_path, "--run", str(dcp_size)]
            out = subprocess.run(argv, capture_output=True, text=True, env=os.environ)
            if out.returncode:
                sys.exit(f"dcp {dcp_size} run failed:\n{out.stderr[-4000:]}")
            runs.append(json.loads([line for line in out.stdout.splitlines() if line.startswith("RESULT ")][-1][7:]))
    if args.card is None:
        import torch

        args.card = "CPU, HiCache test mode" if args.device == "cpu" else torch.cuda.get_device_name()
    working_set = args.conversations * args.turns * (args.turn_tokens + args.answer_tokens)
    result = {"date": utc_now(), "card": args.card,
              "settings": {k: v for k, v in vars(args).items() if k not in ("run", "out", "card")},
              "workload": {"conversations": args.conversations, "turns": args.turns, "working_set_tokens": working_set,
                           "device_pool_logical_dcp1": runs[0]["device_capacity"]},
              "runs": runs}  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.splitext(args.out)[0] + ".png")
    print(f"HiCache at the same memory ({args.card}, {result['date']}): working set {working_set} tokens, "
          f"{working_set / runs[0]['device_capacity']:.1f}x dcp 1's device pool")
    columns = ("dcp_size", "device_capacity", "host_capacity", "device_kv_bytes_per_rank", "host_kv_bytes_per_rank",
               "prompt_tokens", "cached_tokens", "computed_tokens", "loaded_back_tokens", "prefetched_tokens",
               "evicted_tokens")  # fmt: skip
    print(" | ".join(columns))
    for run in runs:
        print(" | ".join(str(run[c]) for c in columns))


if __name__ == "__main__":
    main()
