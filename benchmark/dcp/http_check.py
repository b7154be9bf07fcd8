"""HTTP server check: ``launch_server --tp T --dcp D --attention-backend flashinfer``
(torch_native with ``--device cpu``) answers ``/generate`` and ``/v1/completions``, and ``sglang.bench_serving`` (random
dataset, local tokenizer) completes against it. Writes ``http_check_<dcp-comm>.json`` to ``--out``.

    python benchmark/dcp/http_check.py --tp 2 --dcp 2 [--dcp-comm lse] --out /tmp/out
"""

import argparse
import json
import os
import sys
import tempfile

from sglang_dcp.test.models import write_random_gqa_model
from sglang_dcp.test.serving import (
    Server,
    bench_serving,
    device_server_args,
    http_json,
    write_byte_tokenizer,
    write_sharegpt_json,
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--dcp", type=int, default=2)
    parser.add_argument("--dcp-comm", choices=["a2a", "lse"], default="a2a")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--port", type=int, default=30010)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="dcp_http_")
    model = write_random_gqa_model(
        os.path.join(work, "model"), num_attention_heads=8 * args.tp,
        num_key_value_heads=args.tp // args.dcp, head_dim=128, hidden_size=1024,
        num_hidden_layers=4, intermediate_size=2048, vocab_size=4096,
        torch_dtype="bfloat16", max_position_embeddings=8192,
    )
    write_byte_tokenizer(model, vocab_size=2048)
    dataset = write_sharegpt_json(os.path.join(work, "sharegpt.json"), 4 * args.num_prompts)
    result = {"tp": args.tp, "dcp": args.dcp, "dcp_comm": args.dcp_comm}
    server_args = ["--model-path", model, "--tp-size", str(args.tp), "--dcp", str(args.dcp),
                   "--dcp-comm", args.dcp_comm,
                   *device_server_args(args.device, args.tp),
                   "--grammar-backend", "none", "--cuda-graph-max-bs-decode", "64"]
    if args.device == "cpu":  # a small pool: CPU memory is shared by all ranks
        server_args += ["--mem-fraction-static", "0.05", "--max-total-tokens", "16384"]
    with Server(server_args, args.port, os.path.join(args.out, f"http_server_{args.dcp_comm}.log")) as server:
        result["max_total_num_tokens"] = server.server_info()["max_total_num_tokens"]
        status, body = http_json(server.url + "/generate", {
            "text": "the model token cache", "sampling_params": {"max_new_tokens": 16, "temperature": 0}})
        result["generate"] = {"status": status, "text": body.get("text") if status == 200 else body}
        status, body = http_json(server.url + "/v1/completions", {
            "model": model, "prompt": "the decode rank group", "max_tokens": 16, "temperature": 0})
        result["completions"] = {"status": status, "usage": body.get("usage") if status == 200 else body}
        returncode, summary = bench_serving(
            server, model,
            ["--dataset-name", "random", "--dataset-path", dataset, "--num-prompts", str(args.num_prompts),
             "--random-input-len", "1024", "--random-output-len", "64"],
            os.path.join(args.out, f"http_bench_serving_{args.dcp_comm}.log"),
        )
        completed = summary and summary.get("completed")
        result["bench_serving"] = {"returncode": returncode, "completed": completed,
                                   "num_prompts": args.num_prompts}
    result["ok"] = (result["generate"]["status"] == 200 and result["completions"]["status"] == 200
                    and completed == args.num_prompts)
    with open(os.path.join(args.out, f"http_check_{args.dcp_comm}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
