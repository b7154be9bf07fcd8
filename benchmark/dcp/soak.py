"""A bounded soak: the same stream of requests to a DCP server and to a reference server, then
every greedy request that completed on both must have the same output tokens.

    python benchmark/dcp/soak.py --reference-url http://127.0.0.1:30001 \\
        --candidate-url http://127.0.0.1:30002 --num-requests 1000 --time-limit 1800 --out soak.json

or, with no URLs, it serves a random-weight Qwen3 itself (tp 2, 1 KV head; ``--device cpu``
or ``cuda``) with ``--dcp-size 1`` and, beside it, ``--dcp-size 2`` once per ``--dcp-comm``
(``--dcp-comm a2a,lse``: two DCP servers, each compared with the reference). With
``SGLANG_DCP_SHARED_GPU=1`` every server's ranks share one GPU (eager, gloo).

The stream (seeded, ``input_ids`` only) comes in bursts of 1 to ``3 x --max-running-requests``
concurrent requests, so the scheduler queues: prompts from 1 token to several
``--chunk`` chunks, some extending a few shared prefixes (radix-cache hits), streaming or
not, mostly greedy with some seeded sampling, and a fraction aborted, by hanging up or by
``/abort_request``, at a random moment. Both servers get each burst at the same time. It
stops after ``--num-requests`` requests or ``--time-limit`` seconds, whichever is first,
prints a table and writes JSON.

A greedy pair differs either at a near-tie or for real. On CPU in float32 nothing ties, so
every difference counts. On GPU (bf16), ``--near-tie-gap G`` asks for the top-20 logprobs and
counts a difference only if the reference rated the candidate's token more than ``G`` below
its own at the first differing position (``engine_compare.divergence_gap``); run it with
more requests per burst than the largest captured CUDA-graph batch (``--burst``) so the
eager path runs too.
"""

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import random
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from typing import Dict, List, Optional, Tuple

from tqdm import tqdm

from sglang_dcp.test.engine_compare import RequestResult, divergence_gap
from sglang_dcp.test.serving import http_json, stream_generate

ABORT_BY = ("hang-up", "abort_request")
# With --near-tie-gap: the reference's best tokens per position that a split is judged by
TOP_LOGPROBS = 20


@dataclasses.dataclass
class Plan:
    """One request of the stream, the same for both servers."""

    index: int
    input_ids: List[int]
    max_new_tokens: int
    greedy: bool
    stream: bool
    abort_by: Optional[str]  # one of ABORT_BY, or None
    abort_after_s: float


@dataclasses.dataclass
class Outcome:
    status: int
    aborted: bool
    output_ids: List[int]
    top_logprobs: Optional[List[List[float]]] = None
    top_ids: Optional[List[List[int]]] = None
    error: str = ""


def make_bursts(args) -> List[List[Plan]]:
    rng = random.Random(args.seed)

    def vocab(n):
        return [rng.randrange(3, args.vocab_size) for _ in range(n)]

    prefixes = [vocab(rng.randrange(1, 3 * args.chunk)) for _ in range(4)]
    bursts, index = [], 0
    while index < args.num_requests:
        size = min(rng.randint(1, args.burst), args.num_requests - index)
        burst = []
        for _ in range(size):
            length = rng.choice([rng.randint(1, 8), rng.randint(1, args.chunk), rng.randint(1, args.max_prompt_chunks * args.chunk)])
            input_ids = (rng.choice(prefixes) + vocab(length)) if rng.random() < 0.3 else vocab(length)
            stream = rng.random() < 0.5
            abort_by = rng.choice(ABORT_BY if stream else ABORT_BY[1:]) if rng.random() < args.abort_fraction else None
            burst.append(Plan(index, input_ids, rng.randint(1, args.max_new_tokens), rng.random() < 0.9,
                              stream, abort_by, rng.uniform(0.0, args.abort_within_s)))
            index += 1
        bursts.append(burst)
    return bursts


def send(url: str, plan: Plan, logprobs: bool) -> Outcome:
    rid = f"soak-{plan.index}-{url.rsplit(':', 1)[1]}"
    sampling = {"max_new_tokens": plan.max_new_tokens, "temperature": 0.0} if plan.greedy else {
        "max_new_tokens": plan.max_new_tokens, "temperature": 0.8, "top_p": 0.9, "sampling_seed": plan.index}
    body = {"rid": rid, "input_ids": plan.input_ids, "sampling_params": sampling}
    if logprobs:
        body.update(return_logprob=True, top_logprobs_num=TOP_LOGPROBS)
    timer = None
    if plan.abort_by == "abort_request":
        timer = threading.Timer(plan.abort_after_s, http_json, (url + "/abort_request", {"rid": rid}))
        timer.start()
    try:
        if plan.stream:
            hang_up = plan.abort_after_s if plan.abort_by == "hang-up" else None
            status, events = stream_generate(url, body, hang_up_after_s=hang_up)
            out = events[-1] if events else None
        else:
            status, out = http_json(url + "/generate", body)
    finally:
        if timer is not None:
            timer.join()
    if out is None and plan.abort_by == "hang-up":  # hung up before the first event
        return Outcome(status, True, [])
    if status != 200 or not isinstance(out, dict) or "error" in out:
        return Outcome(status, True, [], error=str(out)[:200])
    reason = out["meta_info"].get("finish_reason")
    if reason is None or reason["type"] == "abort":
        return Outcome(status, True, list(out["output_ids"]))
    outcome = Outcome(status, False, list(out["output_ids"]))
    if logprobs:
        top = out["meta_info"]["output_top_logprobs"]
        outcome.top_logprobs = [[lp for lp, _, _ in t] for t in top]
        outcome.top_ids = [[i for _, i, _ in t] for t in top]
    return outcome


def judge(ref: Outcome, cand: Outcome, near_tie_gap: Optional[float]) -> Tuple[str, float]:
    """'same', 'near-tie' or 'mismatch' for a greedy request completed on both servers, and
    the reference's gap at the split (``engine_compare.divergence_gap``; 0 if the same)."""
    if ref.output_ids == cand.output_ids:
        return "same", 0.0
    if near_tie_gap is None:
        return "mismatch", math.inf
    split = next((i for i, (a, b) in enumerate(zip(ref.output_ids, cand.output_ids)) if a != b), None)
    if split is None:  # one output is a prefix of the other: no split to judge
        return "mismatch", math.inf
    result = RequestResult(ref.output_ids, [], ref.top_logprobs, ref.top_ids, greedy=True)
    gap = divergence_gap(result, split, cand.output_ids[split])
    return ("near-tie" if gap <= near_tie_gap else "mismatch"), gap


def run(args) -> Dict:
    bursts = make_bursts(args)
    urls = {"reference": args.reference_url, **args.candidate_urls}
    candidates = list(args.candidate_urls)
    outcomes: Dict[str, Dict[int, Outcome]] = {name: {} for name in urls}
    plans: List[Plan] = []
    logprobs = args.near_tie_gap is not None
    start = time.time()
    workers = concurrent.futures.ThreadPoolExecutor(len(urls) * args.burst)
    with tqdm(total=args.num_requests, desc="soak", unit="req", file=sys.stdout) as bar:
        for burst in bursts:
            if time.time() - start > args.time_limit:
                break
            futures = {(name, plan.index): workers.submit(send, url, plan, logprobs)
                       for plan in burst for name, url in urls.items()}
            for (name, index), future in futures.items():
                outcomes[name][index] = future.result()
            plans += burst
            bar.update(len(burst))
    workers.shutdown()
    wall_s = time.time() - start

    verdicts = {name: {"same": 0, "near-tie": 0, "mismatch": 0} for name in candidates}
    failures = {name: [] for name in candidates}
    max_gap = {name: 0.0 for name in candidates}
    for plan in plans:
        ref = outcomes["reference"][plan.index]
        for name in candidates:
            cand = outcomes[name][plan.index]
            if plan.greedy and not ref.aborted and not cand.aborted:
                verdict, gap = judge(ref, cand, args.near_tie_gap)
                verdicts[name][verdict] += 1
                max_gap[name] = max(max_gap[name], gap)
                if verdict == "mismatch":
                    failures[name].append({"index": plan.index, "prompt_len": len(plan.input_ids),
                                           "reference": ref.output_ids, "candidate": cand.output_ids})
    summary = {
        "sent": len(plans),
        "wall_s": round(wall_s, 1),
        "streaming": sum(p.stream for p in plans),
        "greedy": sum(p.greedy for p in plans),
        "abort_planned": sum(p.abort_by is not None for p in plans),
        "completed": {n: sum(not o.aborted for o in outcomes[n].values()) for n in urls},
        "aborted": {n: sum(o.aborted for o in outcomes[n].values()) for n in urls},
        "errors": {n: sum(bool(o.error) for o in outcomes[n].values()) for n in urls},
        "error_examples": {n: [dataclasses.asdict(o) for o in outcomes[n].values() if o.error][:5] for n in urls},
        "candidates": {name: {"compared": sum(verdicts[name].values()), "identical": verdicts[name]["same"],
                              "near_ties": verdicts[name]["near-tie"], "mismatched": verdicts[name]["mismatch"],
                              "max_gap": max_gap[name],
                              "mismatches": failures[name][:10]} for name in candidates},
        "config": vars(args),
    }
    print(f"\n{'':10} {'sent':>6} {'completed':>10} {'aborted':>8} {'errors':>7}")
    for name in urls:
        print(f"{name:10} {len(plans):>6} {summary['completed'][name]:>10} {summary['aborted'][name]:>8} "
              f"{summary['errors'][name]:>7}")
    for name, c in summary["candidates"].items():
        print(f"{name}: greedy completed on both it and the reference: {c['compared']}, identical "
              f"{c['identical']}, near-ties {c['near_ties']}, mismatched {c['mismatched']}")
    print(f"{wall_s:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def serve_all(args, stack: ExitStack) -> None:
    """Start a random-weight model's dcp 1 server and a dcp 2 server per ``--dcp-comm``; set
    the args' URLs."""
    from sglang_dcp.test.cpu_env import use_cpu_env
    from sglang_dcp.test.models import write_random_gqa_model
    from sglang_dcp.test.serving import Server, device_server_args, write_byte_tokenizer

    if args.device == "cpu":
        use_cpu_env()
    work = tempfile.mkdtemp(prefix="dcp_soak_")
    model = write_random_gqa_model(
        os.path.join(work, "model"), num_attention_heads=4, num_key_value_heads=1,
        vocab_size=args.vocab_size, max_position_embeddings=16384,
        **(dict(torch_dtype="float32") if args.device == "cpu" else dict(torch_dtype="bfloat16", head_dim=128)))
    write_byte_tokenizer(model, vocab_size=args.vocab_size, model_vocab_size=args.vocab_size)
    os.environ.setdefault("SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE", "1")
    common = ["--model-path", model, "--tp-size", "2", "--chunked-prefill-size", str(args.chunk),
              "--max-running-requests", str(args.max_running_requests), "--grammar-backend", "none",
              "--random-seed", "0"]
    if args.device == "cpu":
        common += ["--dtype", "float32", "--mem-fraction-static", "0.3", "--max-total-tokens", "4096"]
    else:
        common += ["--mem-fraction-static", "0.3", "--cuda-graph-max-bs-decode", str(args.max_running_requests // 2)]
    common += device_server_args(args.device, 2)  # last: the shared-GPU mode's settings win
    comms = args.dcp_comm.split(",")
    servers = [Server(common + ["--dcp-size", "1"], args.port, os.path.join(work, "dcp1.log"))]
    servers += [Server(common + ["--dcp-size", "2", "--dcp-comm", comm], args.port + 1 + i,
                       os.path.join(work, f"dcp2-{comm}.log")) for i, comm in enumerate(comms)]
    print(f"starting the dcp 1 server and {len(comms)} dcp 2 server(s); logs in {work}")
    with concurrent.futures.ThreadPoolExecutor(len(servers)) as pool:
        for future in [pool.submit(stack.enter_context, s) for s in servers]:
            future.result()
    args.reference_url = servers[0].url
    args.candidate_urls = {f"dcp2-{comm}": server.url for comm, server in zip(comms, servers[1:])}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-url", help="dcp 1 server (default: start one)")
    parser.add_argument("--candidate-url", help="DCP server (default: start one)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="for servers it starts")
    parser.add_argument("--port", type=int, default=30400, help="servers it starts use port, port + 1, ...")
    parser.add_argument("--dcp-comm", default="a2a", help="servers it starts: one DCP server per value (a2a,lse)")
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--time-limit", type=float, default=1800, help="seconds; no burst starts after it")
    parser.add_argument("--chunk", type=int, default=64, help="the servers' --chunked-prefill-size")
    parser.add_argument("--max-prompt-chunks", type=int, default=4)
    parser.add_argument("--max-running-requests", type=int, default=8)
    parser.add_argument("--burst", type=int, help="largest burst (default 3x --max-running-requests)")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--abort-fraction", type=float, default=0.1)
    parser.add_argument("--abort-within-s", type=float, default=1.0)
    parser.add_argument("--vocab-size", type=int, default=1024, help="prompt ids are drawn below it")
    parser.add_argument("--near-tie-gap", type=float, help="GPU: forgive splits this close to a tie")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON results")
    args = parser.parse_args(argv)
    args.burst = args.burst or 3 * args.max_running_requests
    args.candidate_urls = {"candidate": args.candidate_url} if args.candidate_url else {}
    return args


def main():
    args = parse_args()
    for url in (args.reference_url, args.candidate_url):
        if url and not url.startswith(("http://127.0.0.1:", "http://localhost:")):
            raise SystemExit(f"--reference-url / --candidate-url must be on 127.0.0.1, got {url}")
    with ExitStack() as stack:
        if not (args.reference_url and args.candidate_url):
            serve_all(args, stack)
        summary = run(args)
    mismatched = any(c["mismatched"] for c in summary["candidates"].values())
    raise SystemExit(0 if not mismatched and not any(summary["errors"].values()) else 1)


if __name__ == "__main__":
    main()
