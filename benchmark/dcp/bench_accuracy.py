"""GSM8K accuracy with and without DCP: SGLang's own ``python -m sglang.test.few_shot_gsm8k``
against a server at ``--tp`` with ``--dcp-size 1`` and with ``--dcp-size D``, on the padded
SmolLM2-135M-Instruct (12 query heads, 3 KV heads; tp=6 puts each KV head on 2 ranks).

    python benchmark/dcp/bench_accuracy.py [--gsm8k-path PATH] [--num-questions 100] [--device cpu]

``--gsm8k-path`` defaults to ``GSM8K_PATH`` or the repository's ``data/gsm8k_test_200.jsonl``.

Reports the accuracy of each run and the fraction of questions whose generated answer text
is identical (goal: 100%). Writes ``accuracy.json`` to ``--out``.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

from sglang_dcp.test.gsm8k import gsm8k_path
from sglang_dcp.test.models import build_padded_smollm2
from sglang_dcp.test.serving import Server, device_server_args

STATE_HEADER = re.compile(r"^={40} \d+ ={40}$", re.MULTILINE)


def run_gsm8k(args, model, dcp_size, work):
    """Serve ``model`` with ``dcp_size`` and run few_shot_gsm8k; returns metrics and texts."""
    run_dir = os.path.join(work, f"dcp{dcp_size}")
    os.makedirs(run_dir, exist_ok=True)
    server_args = ["--model-path", model, "--tp-size", str(args.tp), "--dcp-size", str(dcp_size),
                   "--grammar-backend", "none", "--random-seed", "0",
                   *device_server_args(args.device, args.tp)]
    if args.device == "cpu":  # six ranks share the host memory that SGLang profiles
        server_args += ["--dtype", "float32", "--mem-fraction-static", "0.2",
                        "--max-total-tokens", "65536"]
    with Server(server_args, args.port, os.path.join(run_dir, "server.log")):
        eval_run = subprocess.run(
            [sys.executable, "-m", "sglang.test.few_shot_gsm8k", "--data-path", args.gsm8k_path,
             "--num-questions", str(args.num_questions), "--max-new-tokens", str(args.max_new_tokens),
             "--parallel", str(args.parallel), "--port", str(args.port)],
            cwd=run_dir, stdout=subprocess.PIPE, text=True, check=True,
        )
    metrics = {
        key.lower().replace(" ", "_"): float(value.split()[0])
        for key, value in re.findall(r"^(Accuracy|Invalid|Latency|Output throughput): (.+)$",
                                     eval_run.stdout, re.MULTILINE)
    }
    with open(os.path.join(run_dir, "tmp_output_gsm8k.txt")) as f:
        texts = [t.rsplit("=" * 80, 1)[0] for t in STATE_HEADER.split(f.read())[1:]]
    return metrics, texts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gsm8k-path", default=gsm8k_path())
    parser.add_argument("--num-questions", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--parallel", type=int, default=32)
    parser.add_argument("--tp", type=int, default=6)
    parser.add_argument("--dcp", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--port", type=int, default=30030)
    parser.add_argument("--model-cache", default=".models")
    parser.add_argument("--out", default="benchmark/dcp/results")
    args = parser.parse_args()
    args.gsm8k_path = os.path.abspath(args.gsm8k_path)
    model = build_padded_smollm2(os.path.join(args.model_cache, "smollm2-135m-instruct-12qh"))
    work = tempfile.mkdtemp(prefix="dcp_gsm8k_")
    base, base_texts = run_gsm8k(args, model, 1, work)
    dcp, dcp_texts = run_gsm8k(args, model, args.dcp, work)
    identical = sum(a == b for a, b in zip(base_texts, dcp_texts))
    result = {
        "model": "SmolLM2-135M-Instruct padded to 12 query heads",
        "device": args.device, "tp": args.tp, "dcp": args.dcp,
        "num_questions": args.num_questions, "max_new_tokens": args.max_new_tokens,
        "tp_only": base, "tp_dcp": dcp,
        "identical_answers": identical,
        "gsm8k_identical_fraction": identical / len(base_texts),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "accuracy.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{'':16} {'accuracy':>8} {'invalid':>8} {'latency s':>9}")
    for name, m in (("tp" + str(args.tp), base), (f"tp{args.tp}+dcp{args.dcp}", dcp)):
        print(f"{name:16} {m['accuracy']:>8.3f} {m['invalid']:>8.3f} {m['latency']:>9.1f}")
    print(f"identical answers: {identical}/{len(base_texts)} (logs in {work})")


if __name__ == "__main__":
    main()
