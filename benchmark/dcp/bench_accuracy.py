"""GSM8K with and without DCP on a trained model: SmolLM2-135M-Instruct padded to 12 query heads
(3 KV heads; tp 6 puts each KV head on 2 ranks), served by ``python -m sglang.launch_server``.

    python benchmark/dcp/bench_accuracy.py [--device cpu|cuda] [--num-questions 200]
        [--runs dcp1,dcp2-a2a,dcp2-lse,dcp1-standalone,dcp2-standalone-a2a] [--concurrent 3]

The prompt is SGLang's ``few_shot_gsm8k`` format (5 solved questions from the top of the file,
then ``Question: ...\\nAnswer:``; stop at ``Question``), greedy, up to ``--max-new-tokens``; the
answer is the last number of the completion. Each request also returns its tokens' logprobs
and the ``TOP_LOGPROBS`` most likely tokens per position, so a differing answer is explained at
its first differing token: ``gap`` is how much less likely the reference found the candidate's
token than its own (a near-tie when small), ``spread`` the reference's top-1 minus its
``TOP_LOGPROBS``-th logprob there (``engine_compare.compare``).

Runs (any subset, ``--runs``): ``dcp1``; ``dcp{D}-{comm}`` per ``--dcp-comm``; with
``standalone`` in the name, STANDALONE speculative decoding with the model as its own draft
(``--speculative-num-steps`` chain). Compared: each DCP run against ``dcp1``, each speculative
run against the same settings at dcp 1 and against ``dcp1`` (speculation alone), with the
accept-length histograms side by side. Every server has the same memory settings.

Each finished run is kept in ``--work`` (rerunning the script skips it), so the runs can be
spread over several calls of a machine; ``--out`` gets the JSON, beside it a PNG. On a GPU with
fewer GPUs than ``--tp`` set ``SGLANG_DCP_SHARED_GPU=1`` (all ranks on one GPU, eager):
``benchmark/dcp/smollm2_gpu.sh`` does the whole GPU run.
"""

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import os
import re
import time
from typing import Dict, List

from sglang_dcp.test.cpu_env import use_cpu_env
from sglang_dcp.test.engine_compare import EngineRun, RequestResult, compare, eagle_settings
from sglang_dcp.test.gsm8k import gsm8k_path, gsm8k_rows
from sglang_dcp.test.models import build_padded_smollm2
from sglang_dcp.test.serving import Server, device_server_args, http_json

NUM_SHOTS = 5
STOP = ["Question", "Assistant:", "<|separator|>"]
TOP_LOGPROBS = 20
MODEL = "SmolLM2-135M-Instruct padded to 12 query heads"


def few_shot_prompts(rows: List[Dict]) -> List[str]:
    """``few_shot_gsm8k``'s prompts: the first ``NUM_SHOTS`` rows solved, then each question."""
    shots = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in rows[:NUM_SHOTS])
    return [f"{shots}Question: {r['question']}\nAnswer:" for r in rows]


def answer_value(text: str):
    """The last integer of ``text`` (commas dropped), ``None`` if it has none."""
    numbers = re.findall(r"\d+", text.replace(",", ""))
    return int(numbers[-1]) if numbers else None


def server_args(args, run: str, model: str) -> List[str]:
    dcp_size, comm = (1, "a2a") if run.startswith("dcp1") else (args.dcp, run.rsplit("-", 1)[-1])
    flags = ["--model-path", model, "--tp-size", str(args.tp), "--dcp-size", str(dcp_size),
             "--dcp-comm", comm, "--grammar-backend", "none", "--random-seed", "0",
             "--max-running-requests", str(args.max_running_requests),
             *device_server_args(args.device, args.tp), "--max-total-tokens", str(args.max_total_tokens)]
    if args.device == "cpu":  # six ranks share the host memory that SGLang profiles
        flags += ["--dtype", "float32", "--mem-fraction-static", "0.2"]
    if "standalone" in run:
        spec = eagle_settings(1, model, args.speculative_num_steps, "STANDALONE")
        flags += [x for k, v in spec.items() for x in (f"--{k.replace('_', '-')}", str(v))]
        flags += ["--disable-cuda-graph"]  # speculation under DCP runs eagerly; dcp 1 likewise
    return flags


def generate(url: str, prompt: str, max_new_tokens: int) -> Dict:
    status, out = http_json(url + "/generate", {
        "text": prompt, "return_logprob": True, "top_logprobs_num": TOP_LOGPROBS,
        "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new_tokens, "stop": STOP},
    })
    if status != 200:
        raise RuntimeError(f"/generate answered {status}: {out}")
    meta = out["meta_info"]
    return {
        "text": out["text"],
        "output_ids": [tid for _, tid, _ in meta["output_token_logprobs"]],
        "token_logprobs": [lp for lp, _, _ in meta["output_token_logprobs"]],
        "top_logprobs": [[lp for lp, _, _ in top] for top in meta["output_top_logprobs"]],
        "top_ids": [[tid for _, tid, _ in top] for top in meta["output_top_logprobs"]],
        "spec_verify_ct": meta.get("spec_verify_ct", 0),
        "spec_accept_histogram": list(meta.get("spec_correct_drafts_histogram") or []),
    }


def serve_and_ask(args, run: str, model: str, prompts: List[str], port: int) -> Dict:
    """One server for ``run``: every prompt at once (``--parallel`` in flight), its answers."""
    from tqdm import tqdm

    log = os.path.join(args.work, f"{run}.log")
    with Server(server_args(args, run, model), port, log, progress_s=30) as server:
        capacity = server.server_info()["max_total_num_tokens"]
        start = time.time()
        with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
            futures = [pool.submit(generate, server.url, p, args.max_new_tokens) for p in prompts]
            for _ in tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc=run):
                pass
        answers = [f.result() for f in futures]
        return {"run": run, "capacity": capacity, "latency_s": time.time() - start, "answers": answers}


def run_figures(run: Dict, labels: List[int]) -> Dict:
    preds = [answer_value(a["text"]) for a in run["answers"]]
    histogram: List[int] = []
    for a in run["answers"]:
        for accepted, count in enumerate(a["spec_accept_histogram"]):
            histogram += [0] * (accepted + 1 - len(histogram))
            histogram[accepted] += count
    verify_passes = sum(a["spec_verify_ct"] for a in run["answers"])
    output_tokens = sum(len(a["output_ids"]) for a in run["answers"])
    return {
        "accuracy": sum(p == l for p, l in zip(preds, labels)) / len(labels),
        "invalid": sum(p is None for p in preds) / len(labels),
        "latency_s": round(run["latency_s"], 1), "output_tokens": output_tokens, "capacity": run["capacity"],
        **({"verify_passes": verify_passes, "accepted_drafts_histogram": histogram,
            # tokens per verify pass: the accepted drafts and the verified token
            "mean_accept_length": round(output_tokens / verify_passes, 3)} if verify_passes else {}),
    }


def as_engine_run(run: Dict) -> EngineRun:
    results = [RequestResult(a["output_ids"], a["token_logprobs"], a["top_logprobs"], a["top_ids"], greedy=True)
               for a in run["answers"]]
    return EngineRun(run["capacity"], results)


def comparison(reference: Dict, candidate: Dict) -> Dict:
    agreement = compare(as_engine_run(reference), as_engine_run(candidate))
    same_text = sum(a["text"] == b["text"] for a, b in zip(reference["answers"], candidate["answers"]))
    return {
        "reference": reference["run"], "candidate": candidate["run"],
        "identical_answers": agreement.identical_requests, "identical_texts": same_text,
        "compared": agreement.num_requests, "max_logprob_diff": round(agreement.max_logprob_diff, 4),
        "max_gap": agreement.max_divergence_gap,
        "capacity_ratio": candidate["capacity"] / reference["capacity"],
        "splits": [dataclasses.asdict(s) for s in agreement.splits],
    }


def comparisons_of(runs: Dict[str, Dict]) -> List[Dict]:
    pairs = []
    for name in runs:
        if name.startswith("dcp1") and "standalone" in name:
            pairs.append(("dcp1", name))
        elif not name.startswith("dcp1"):
            pairs.append(("dcp1-standalone" if "standalone" in name else "dcp1", name))
            if "standalone" in name:
                pairs.append(("dcp1", name))
    return [comparison(runs[a], runs[b]) for a, b in pairs if a in runs]


def plot(result: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, hist) = plt.subplots(1, 2, figsize=(12, 4))
    names = list(result["runs"])
    acc.bar(names, [result["runs"][n]["accuracy"] for n in names])
    acc.set_ylabel("GSM8K accuracy")
    acc.tick_params(axis="x", rotation=30)
    spec = [n for n in names if "accepted_drafts_histogram" in result["runs"][n]]
    for i, name in enumerate(spec):
        h = result["runs"][name]["accepted_drafts_histogram"]
        hist.bar([k + 0.8 * i / len(spec) for k in range(len(h))], h, width=0.8 / len(spec), label=name)
    hist.set_xlabel("drafts accepted per verify pass")
    hist.set_ylabel("verify passes")
    if spec:
        hist.legend()
    fig.suptitle(f"{MODEL}, tp {result['tp']}, {result['card']}, {result['date']}")
    fig.tight_layout()
    fig.savefig(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gsm8k-path", default=gsm8k_path())
    parser.add_argument("--num-questions", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--parallel", type=int, default=64, help="requests in flight per server")
    parser.add_argument("--tp", type=int, default=6)
    parser.add_argument("--dcp", type=int, default=2)
    parser.add_argument("--runs", default="dcp1,dcp2-a2a,dcp2-lse",
                        help="dcp1, dcp{D}-{a2a,lse}, dcp1-standalone, dcp{D}-standalone-{a2a,lse}")
    parser.add_argument("--concurrent", type=int, default=1, help="servers at once (each its own port)")
    parser.add_argument("--speculative-num-steps", type=int, default=3)
    parser.add_argument("--max-running-requests", type=int, default=200)
    parser.add_argument("--max-total-tokens", type=int, default=98304, help="physical rows per rank")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--card", default="CPU", help="what ran it, for the record (e.g. '1x NVIDIA H200')")
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--port", type=int, default=30030)
    parser.add_argument("--model-cache", default=".models")
    parser.add_argument("--work", default=".runs/gsm8k", help="each finished run's answers, reused")
    parser.add_argument("--out", default="benchmark/dcp/results/accuracy.json")
    args = parser.parse_args()
    if args.device == "cpu":
        use_cpu_env()  # before any SGLang import; the servers inherit it
    os.makedirs(args.work, exist_ok=True)
    rows = gsm8k_rows(args.num_questions, os.path.abspath(args.gsm8k_path))
    labels = [answer_value(r["answer"].rsplit("####", 1)[-1]) for r in rows]
    prompts = few_shot_prompts(rows)
    model = build_padded_smollm2(os.path.join(args.model_cache, "smollm2-135m-instruct-12qh"))

    names = args.runs.split(",")
    todo = [n for n in names if not os.path.exists(os.path.join(args.work, f"{n}.json"))]
    failed = []
    with concurrent.futures.ThreadPoolExecutor(args.concurrent) as pool:
        futures = {pool.submit(serve_and_ask, args, n, model, prompts, args.port + 10 * i): n
                   for i, n in enumerate(todo)}
        for future in concurrent.futures.as_completed(futures):
            if future.exception() is not None:
                failed.append(f"{futures[future]}: {future.exception()}")
                continue
            with open(os.path.join(args.work, f"{futures[future]}.json"), "w") as f:
                json.dump(future.result(), f)
    runs = {}
    for name in sorted(os.listdir(args.work)):
        if name.endswith(".json"):
            with open(os.path.join(args.work, name)) as f:
                runs[name[:-5]] = json.load(f)
    result = {
        "model": MODEL, "device": args.device, "card": args.card, "commit": args.commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "tp": args.tp, "dcp": args.dcp, "num_questions": args.num_questions,
        "max_new_tokens": args.max_new_tokens, "prompt": f"few_shot_gsm8k format, {NUM_SHOTS} shots, greedy",
        "runs": {n: run_figures(r, labels) for n, r in runs.items()},
        "comparisons": comparisons_of(runs),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.splitext(args.out)[0] + ".png")

    print(f"\n{'run':24} {'accuracy':>8} {'invalid':>8} {'latency s':>9} {'capacity':>9} {'accept len':>10}")
    for name, m in result["runs"].items():
        print(f"{name:24} {m['accuracy']:>8.3f} {m['invalid']:>8.3f} {m['latency_s']:>9.1f} {m['capacity']:>9} "
              f"{m.get('mean_accept_length', '-'):>10}")
    print(f"\n{'reference':16} {'candidate':24} {'identical':>9} {'max |dlogp|':>11} {'max gap':>8} {'capacity':>8}")
    for c in result["comparisons"]:
        print(f"{c['reference']:16} {c['candidate']:24} {c['identical_answers']:>5}/{c['compared']:<3} "
              f"{c['max_logprob_diff']:>11} {c['max_gap']:>8.4f} {c['capacity_ratio']:>8.2f}")
        for s in c["splits"]:
            print(f"    question {s['request']}: first split at token {s['position']}, gap {s['gap']:.4f}, "
                  f"spread {s['spread']:.3f}")
    for name, m in result["runs"].items():
        if "accepted_drafts_histogram" in m:
            print(f"{name}: drafts accepted per verify pass {m['accepted_drafts_histogram']}")
    if failed:
        raise SystemExit("runs that failed (see their logs in --work): " + "; ".join(failed))


if __name__ == "__main__":
    main()
