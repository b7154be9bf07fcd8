"""How much the GPU e2e models' greedy tokens move when only attention's rounding changes.

    python benchmark/dcp/bf16_sensitivity.py [--prompts 8] [--prompt-len 1024] [--out DIR]

The GPU e2e test (``test/srt/gpu/test_e2e_gpu.py``) compares random bf16 models with and
without DCP. This script asks, on CPU and without an SGLang engine, what such a comparison can expect:
the same random models (transformers, bf16 weights and activations) run one prefill of random
prompts with three attention variants that differ only in rounding:

* ``reference``: fp32 scores, fp32 softmax and fp32 ``P @ V``, cast to bf16 once;
* ``dcp2``: the DCP arithmetic: keys split by owner (position ``% 2``), each shard's partial
  output cast to bf16 (as FlashInfer returns it) with its fp32 LSE, merged in fp32 by the
  plugin's ``merge_states``;
* ``bf16-probs``: no split, but probabilities cast to bf16 before ``P @ V`` (transformers'
  eager attention): another kernel's rounding, no DCP.

At every position it compares each variant's next-token log-probabilities with the reference's:
the largest change of the reference's top token, the share of positions whose greedy token
changes, and how far from a tie the largest such flip was (the reference's log-probability
gap between its token and the variant's; a tie-breaking flip has a gap near 0). Models:
Qwen3 dense and Qwen3-MoE with 8 experts routed top-2 and top-8, the e2e test's shapes.
Results: a table and ``bf16_sensitivity.json`` in ``--out``.
"""

import argparse
import json
import math
import os
import tempfile

import torch
from tqdm import tqdm
from transformers import AttentionInterface, AutoModelForCausalLM

from bench_common import utc_now

from sglang_dcp.layers.attention.merge import merge_states
from sglang_dcp.test.models import write_random_gqa_model

# The e2e test's model shape (test_e2e_gpu.py), 1 KV head
MODEL = dict(num_attention_heads=16, num_key_value_heads=1, head_dim=128, hidden_size=1024,
             num_hidden_layers=4, intermediate_size=2048, vocab_size=4096, torch_dtype="bfloat16",
             initializer_range=0.1)
MODELS = {
    "qwen3-dense": dict(architecture="Qwen3ForCausalLM"),
    "qwen3-moe-top2": dict(architecture="Qwen3MoeForCausalLM", experts_per_token=2),
    "qwen3-moe-top8": dict(architecture="Qwen3MoeForCausalLM", experts_per_token=8),
}
NUM_SHARDS = 2


def causal_scores(query, key, scaling):
    """fp32 scores ``[B, H, Tq, Tk]`` of bf16 ``query [B, H, T, d]`` over ``key [B, 1, T, d]``,
    future keys at ``-inf``."""
    scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * scaling
    future = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
    return scores.masked_fill(future, -math.inf)


def reference_attention(module, query, key, value, attention_mask, scaling, **kwargs):
    probs = torch.softmax(causal_scores(query, key, scaling), dim=-1)
    return torch.matmul(probs, value.float()).to(query.dtype).transpose(1, 2).contiguous(), None


def bf16_probs_attention(module, query, key, value, attention_mask, scaling, **kwargs):
    probs = torch.softmax(causal_scores(query, key, scaling), dim=-1).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def dcp_attention(module, query, key, value, attention_mask, scaling, **kwargs):
    scores = causal_scores(query, key, scaling)
    outputs, lses = [], []
    for owner in range(NUM_SHARDS):  # keys at positions owner, owner + D, ...
        shard = scores[..., owner::NUM_SHARDS]
        lse = torch.logsumexp(shard, dim=-1)
        probs = torch.nan_to_num(torch.exp(shard - lse.unsqueeze(-1)))  # an empty shard: lse -inf
        outputs.append(torch.matmul(probs, value.float()[:, :, owner::NUM_SHARDS]).to(query.dtype))
        lses.append(lse)
    merged, _ = merge_states(outputs, lses, math.e)  # the plugin's merge
    return merged.to(query.dtype).transpose(1, 2).contiguous(), None


VARIANTS = {"reference": reference_attention, "dcp2": dcp_attention, "bf16-probs": bf16_probs_attention}


def log_probs(model, variant, prompts):
    model.config._attn_implementation = f"sensitivity-{variant}"
    with torch.no_grad():
        return torch.log_softmax(model(prompts).logits.float(), dim=-1)


def compare(reference, other):
    """Top-token change, greedy flips and the largest flip's distance from a tie."""
    top = reference.argmax(-1, keepdim=True)
    flipped = other.argmax(-1) != top[..., 0]
    gap = (reference.gather(-1, top) - reference.gather(-1, other.argmax(-1, keepdim=True)))[..., 0]
    return {
        "max_top_logprob_change": (other.gather(-1, top) - reference.gather(-1, top)).abs().max().item(),
        "flip_fraction": flipped.float().mean().item(),
        "max_flip_gap": gap[flipped].max().item() if flipped.any() else 0.0,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmark/dcp/results")
    args = parser.parse_args()
    for variant, fn in VARIANTS.items():
        AttentionInterface.register(f"sensitivity-{variant}", fn)
    prompts = torch.randint(0, MODEL["vocab_size"], (args.prompts, args.prompt_len),
                            generator=torch.Generator().manual_seed(args.seed))
    results = {"date_utc": utc_now(), "device": "cpu", "model": MODEL, "num_prompts": args.prompts,
               "prompt_len": args.prompt_len, "positions": args.prompts * args.prompt_len, "models": {}}
    with tempfile.TemporaryDirectory() as work:
        for name, extra in tqdm(MODELS.items(), desc="models"):
            path = write_random_gqa_model(os.path.join(work, name), **MODEL, **extra,
                                          max_position_embeddings=args.prompt_len)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
            reference = log_probs(model, "reference", prompts)
            results["models"][name] = {v: compare(reference, log_probs(model, v, prompts))
                                       for v in VARIANTS if v != "reference"}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bf16_sensitivity.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{args.prompts} prompts x {args.prompt_len} positions, bf16, CPU; against fp32 attention")
    print(f"{'model':16} {'variant':11} {'max |d top logprob|':>20} {'greedy flips':>13} {'max flip gap':>13}")
    for name, variants in results["models"].items():
        for variant, r in variants.items():
            print(f"{name:16} {variant:11} {r['max_top_logprob_change']:>20.4f} "
                  f"{r['flip_fraction']:>13.2%} {r['max_flip_gap']:>13.4f}")


if __name__ == "__main__":
    main()
