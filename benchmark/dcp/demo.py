"""Serve a model at the same TP with and without DCP: the same answers, D times the KV capacity.

    python benchmark/dcp/demo.py                        # SmolLM2-135M-Instruct, tp=6, dcp=2, CPU
    python benchmark/dcp/demo.py --random-model --tp 2  # a small random-weight model (smoke run)
    python benchmark/dcp/demo.py --model-path Qwen/Qwen3-30B-A3B --tp 8 --dcp 2 --device cuda

By default it builds SmolLM2-135M-Instruct padded to 12 query heads (3 KV heads, so tp=6 puts
every KV head on 2 ranks; cached under ``--model-cache``), starts ``python -m
sglang.launch_server`` once with ``--dcp-size 1`` and once with ``--dcp-size D`` at the same
memory settings, and sends each all the questions at once (it batches them) through
``/v1/chat/completions`` at temperature 0: a few everyday questions and the first GSM8K
questions of ``data/gsm8k_test_200.jsonl`` (or ``GSM8K_PATH``). It prints both answers side by
side, the logical KV capacity of each server (``max_total_num_tokens`` of ``/get_server_info``)
and how many requests of ``--long-prompt`` tokens plus ``--max-new-tokens`` each could hold at
once.
``--random-model`` serves a random-weight Qwen3 (4 * tp query heads, tp / dcp KV heads, a
byte-level tokenizer) and sends raw text to ``/generate`` instead: its answers are noise, only
their agreement counts. Exits with 1 unless every answer is identical and the capacity is D x.
"""

import argparse
import concurrent.futures
import os
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from typing import List, Tuple

from sglang_dcp.test.cpu_env import use_cpu_env
from sglang_dcp.test.gsm8k import gsm8k_questions
from sglang_dcp.test.models import build_padded_smollm2, write_random_gqa_model
from sglang_dcp.test.serving import Server, device_server_args, http_json, write_byte_tokenizer

EVERYDAY_QUESTIONS = [
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "List three fruits that are red.",
    "How many days are there in a week?",
]
RANDOM_MODEL_PROMPTS = [
    "the cache of the decode rank",
    "two first people number",
    "water table system year after " * 8,
    "model layer head group batch memory token " * 20,
]


@dataclass
class ServedRun:
    """What one server answered, and its logical KV capacity (``max_total_num_tokens``)."""

    name: str
    capacity: int
    answers: List[str]


def one_line(text: str) -> str:
    """``text`` on one line: each run of whitespace (newlines too) becomes a single space."""
    return " ".join(text.split())


def compare_runs(questions: List[str], base: ServedRun, dcp: ServedRun, dcp_size: int,
                 tokens_per_request: int, width: int = 100, answer_lines: int = 3) -> Tuple[List[str], bool]:
    """The printed comparison of two runs, and whether DCP passed.

    Per question: the question, both answers in two columns (each wrapped to at most
    ``answer_lines`` lines of ``(width - 3) // 2`` characters, "..." where cut) and whether they
    are identical; then each run's capacity and ``capacity // tokens_per_request``, the number of
    such requests it holds at once. Passed: every answer identical and
    ``dcp.capacity == dcp_size * base.capacity``.
    """
    column = (width - 3) // 2

    def wrap(text: str) -> List[str]:
        return textwrap.wrap(one_line(text) or "(empty)", column, max_lines=answer_lines,
                             placeholder=" ...")

    lines, identical = [], 0
    for i, (question, a, b) in enumerate(zip(questions, base.answers, dcp.answers), 1):
        same = a == b
        identical += same
        lines.append(f"[{i}/{len(questions)}] {textwrap.shorten(one_line(question), width - 8)}")
        lines.append(f"{base.name:<{column}} | {dcp.name}")
        left, right = wrap(a), wrap(b)
        for row in range(max(len(left), len(right))):
            cell = left[row] if row < len(left) else ""
            lines.append(f"{cell:<{column}} | {right[row] if row < len(right) else ''}".rstrip())
        lines.append(f"identical: {'yes' if same else 'NO'}")
        lines.append("")
    ratio = dcp.capacity / base.capacity
    lines.append(f"identical answers: {identical}/{len(questions)}")
    lines.append("")
    held = f"requests of {tokens_per_request} tokens at once"
    lines.append(f"{'':14} {'KV capacity (tokens)':>20}  {held}")
    for run, note in ((base, ""), (dcp, f"  ({ratio:.2f}x)")):
        lines.append(f"{run.name:14} {run.capacity:>20}  {run.capacity // tokens_per_request:>{len(held)}}{note}")
    passed = identical == len(questions) and dcp.capacity == dcp_size * base.capacity
    return lines, passed


def server_args(args, dcp_size: int) -> List[str]:
    """``launch_server`` arguments for ``args.model`` at ``args.tp`` and ``dcp_size``."""
    cli = ["--model-path", args.model, "--tp-size", str(args.tp), "--dcp-size", str(dcp_size),
           "--grammar-backend", "none", "--random-seed", "0", *device_server_args(args.device, args.tp)]
    if args.device == "cpu":  # the ranks share the host memory that SGLang profiles
        cli += ["--dtype", "float32", "--mem-fraction-static", "0.2"]
    if args.max_total_tokens:
        cli += ["--max-total-tokens", str(args.max_total_tokens)]
    return cli


def ask(server: Server, questions: List[str], args) -> List[str]:
    """Greedy answers: one chat completion per question, all sent at once, or one ``/generate`` batch."""
    if args.random_model:
        status, outputs = http_json(server.url + "/generate", {
            "text": questions, "sampling_params": {"max_new_tokens": args.max_new_tokens, "temperature": 0}})
        assert status == 200, outputs
        return [output["text"] for output in outputs]

    def chat(question: str) -> str:
        status, reply = http_json(server.url + "/v1/chat/completions", {
            "model": "default", "messages": [{"role": "user", "content": question}],
            "max_tokens": args.max_new_tokens, "temperature": 0})
        assert status == 200, reply
        return reply["choices"][0]["message"]["content"]

    with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:  # the server batches them
        return list(pool.map(chat, questions))


def serve_and_ask(args, dcp_size: int, questions: List[str], work: str) -> ServedRun:
    name = f"tp={args.tp}" + (f", dcp={dcp_size}" if dcp_size > 1 else "")
    log_path = os.path.join(work, f"dcp{dcp_size}.log")
    print(f"starting the server at {name} (log: {log_path})", flush=True)
    start = time.time()
    with Server(server_args(args, dcp_size), args.port, log_path, progress_s=10) as server:
        print(f"  ready after {time.time() - start:.0f} s; asking {len(questions)} questions", flush=True)
        capacity = server.server_info()["max_total_num_tokens"]
        answers = ask(server, questions, args)
    print(f"  done after {time.time() - start:.0f} s", flush=True)
    return ServedRun(name, capacity, answers)


def prepare_model(args, work: str) -> None:
    """Set ``args.model``: the padded SmolLM2 (built once), a random model, or ``--model-path``."""
    if args.model_path:
        args.model = args.model_path
    elif args.random_model:
        args.model = write_random_gqa_model(
            os.path.join(work, "model"), num_attention_heads=4 * args.tp,
            num_key_value_heads=args.tp // args.dcp, vocab_size=2048,
            torch_dtype="float32" if args.device == "cpu" else "bfloat16")
        write_byte_tokenizer(args.model, vocab_size=2048)
    else:
        print("building SmolLM2-135M-Instruct with 12 query heads (once; cached)", flush=True)
        args.model = build_padded_smollm2(os.path.join(args.model_cache, "smollm2-135m-instruct-12qh"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model-path", help="serve this model (HF id or folder) instead of SmolLM2")
    model.add_argument("--random-model", action="store_true",
                       help="a small random-weight model: a quick smoke run, its answers are noise")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tp", type=int, default=6)
    parser.add_argument("--dcp", type=int, default=2)
    parser.add_argument("--gsm8k-questions", type=int, default=3, help="GSM8K questions after the everyday ones")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--long-prompt", type=int, default=1024,
                        help="prompt tokens of the long request whose concurrency is printed")
    parser.add_argument("--max-total-tokens", type=int, default=None,
                        help="each rank's physical KV pool (default: 8192 on CPU, SGLang's own on CUDA)")
    parser.add_argument("--model-cache", default=".models")
    parser.add_argument("--port", type=int, default=30020)
    args = parser.parse_args(argv)
    if args.dcp < 2 or args.tp % args.dcp:
        parser.error(f"--dcp must be at least 2 and divide --tp ({args.tp}), got {args.dcp}")
    if args.max_total_tokens is None and args.device == "cpu":
        args.max_total_tokens = 8192
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        use_cpu_env()  # before any SGLang import; the servers inherit it
    work = tempfile.mkdtemp(prefix="dcp_demo_")
    prepare_model(args, work)
    questions = (RANDOM_MODEL_PROMPTS if args.random_model
                 else EVERYDAY_QUESTIONS + gsm8k_questions(args.gsm8k_questions))
    print(f"model: {args.model}, device={args.device}, {len(questions)} questions, "
          f"at most {args.max_new_tokens} new tokens each", flush=True)
    base = serve_and_ask(args, 1, questions, work)
    dcp = serve_and_ask(args, args.dcp, questions, work)
    lines, passed = compare_runs(questions, base, dcp, args.dcp, args.long_prompt + args.max_new_tokens)
    print("\n" + "\n".join(lines))
    print("\nDCP passed: same answers, " if passed else "\nDCP FAILED: ", end="")
    print(f"{dcp.capacity / base.capacity:.2f}x the KV capacity (expected {args.dcp}x)")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
