"""The main job on one machine: serve a GQA model at the same TP with and without DCP,
and show that DCP multiplies the KV capacity while the answers stay the same.

    python benchmark/dcp/demo.py [--device cpu|cuda] [--tp 2] [--dcp 2]

It writes a small random-weight Qwen3 model (tp / dcp KV heads, so each KV head sits on
dcp ranks) with a byte-level tokenizer, starts ``python -m sglang.launch_server`` once
with ``--dcp-size 1`` and once with ``--dcp-size D`` at the same memory settings, sends the
same greedy ``/generate`` requests to both and prints capacity and agreement.
"""

import argparse
import os
import tempfile

from sglang_dcp.test.models import write_random_gqa_model
from sglang_dcp.test.serving import (
    Server,
    device_server_args,
    http_json,
    write_byte_tokenizer,
)

PROMPTS = [
    "the cache of the decode rank",
    "two first people number",
    "water table system year after " * 8,
    "model layer head group batch memory token " * 20,
]


def serve_and_ask(model, args, dcp_size, log_path):
    server_args = ["--model-path", model, "--tp-size", str(args.tp), "--dcp-size", str(dcp_size),
                   "--grammar-backend", "none", "--random-seed", "0",
                   *device_server_args(args.device, args.tp)]
    if args.device == "cpu":
        server_args += ["--dtype", "float32", "--mem-fraction-static", "0.05",
                        "--max-total-tokens", "8192"]
    else:
        server_args += ["--mem-fraction-static", "0.5"]
    with Server(server_args, args.port, log_path) as server:
        capacity = server.server_info()["max_total_num_tokens"]
        status, outputs = http_json(server.url + "/generate", {
            "text": PROMPTS, "sampling_params": {"max_new_tokens": 24, "temperature": 0}})
        assert status == 200, outputs
    return capacity, [o["text"] for o in outputs]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--dcp", type=int, default=2)
    parser.add_argument("--port", type=int, default=30020)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="dcp_demo_")
    model = write_random_gqa_model(
        os.path.join(work, "model"), num_attention_heads=4 * args.tp,
        num_key_value_heads=args.tp // args.dcp, vocab_size=2048,
        torch_dtype="float32" if args.device == "cpu" else "bfloat16",
    )
    write_byte_tokenizer(model, vocab_size=2048)
    print(f"model: {model} ({4 * args.tp} query heads, {args.tp // args.dcp} KV heads), "
          f"tp={args.tp}, device={args.device}; server logs in {work}")
    base_capacity, base_texts = serve_and_ask(model, args, 1, os.path.join(work, "dcp1.log"))
    dcp_capacity, dcp_texts = serve_and_ask(model, args, args.dcp, os.path.join(work, "dcpN.log"))
    same = sum(a == b for a, b in zip(base_texts, dcp_texts))
    print(f"\n{'':12} {'KV capacity (tokens)':>21}")
    print(f"{'tp only':12} {base_capacity:>21}")
    print(f"{'tp + dcp':12} {dcp_capacity:>21}   ({dcp_capacity / base_capacity:.2f}x)")
    print(f"\nidentical greedy answers: {same}/{len(PROMPTS)}")
    for prompt, text in zip(PROMPTS, dcp_texts):
        print(f"  {prompt[:40]!r:44} -> {text[:48]!r}")
    raise SystemExit(0 if same == len(PROMPTS) and dcp_capacity == args.dcp * base_capacity else 1)


if __name__ == "__main__":
    main()
