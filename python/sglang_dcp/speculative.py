"""Speculative decoding under DCP: the draft-KV design and what is accepted.

**Draft KV is striped like the target's, through the same allocator.** SGLang's draft model
(EAGLE, EAGLE3, STANDALONE) has a KV pool of its own but shares the target's request table and
allocator: a draft token's K/V sits at the same logical slot as the target's. Under DCP the
draft's pool holds, like the target's, ``N`` physical rows per rank, slot ``loc`` at row
``loc // D`` of rank ``loc % D``, and the draft's attention runs through the DCP backends
(its extend like an extend, its decode steps like a decode whose keys are the committed
prefix plus the branch's own draft tokens, ``dcp_backend.DCPMultiStepDraftBackend``).

Per token and rank, a layer stores ``c = 2 * H_kv * d * s`` bytes (``H_kv`` KV heads of the
rank, head dim ``d``, KV dtype size ``s``). The target's ``L`` layers cost ``L * c / D``;
the striped draft's ``L_d`` layers ``L_d * c_d / D``, the same share of the capacity gain.
A replicated draft (a full pool indexed by logical slots on every rank, stock attention) would
cost ``L_d * c_d``, ``D`` times that, and SGLang's pool planner, which inflates the target's
cell size by ``(1 + L_d / L)`` for ``N`` draft rows, would not have budgeted its ``N * D``
rows. Qwen3-32B (64 layers, 8 KV heads, d 128, bf16) at tp 16, dcp 2 stores 1 KV head per
rank, ``c = 512`` B: the target 16384 B per token and rank; an EAGLE3 draft (1 layer, 8 KV
heads) 256 B striped, 512 B replicated; a STANDALONE Qwen3-0.6B draft (28 layers, 8 KV heads)
7168 B striped, 14336 B replicated (87.5% of the target's own). What striping needs: the
draft's KV heads replicated over the DCP group like the target's, ``tp % (draft KV heads * D)
== 0`` (checked with the target's rules before loading, ``server_args``).

Moves of K/V between slots (the accepted path of a tree, a draft branch's copy of the prefix
tail) may cross ranks; ``mem_cache.kv_move`` exchanges them.

**Every rank of a DCP group takes the same decisions**, as each holds a replica of the
allocator (checked at idle, ``allocator.check_replicas_at_idle``): the logits are the same on
every TP rank after the all-reduce; greedy verify and the drafts' top-k are deterministic;
SGLang broadcasts a sampled verify's result from TP rank 0 (``eagle_utils.eagle_sample``);
NGRAM's corpus is built from the same tokens on every rank.

Accepted with ``--dcp-size > 1``: NGRAM, EAGLE (NEXTN), EAGLE3 and STANDALONE, chains and
trees (topk 1 and > 1), page size 1 and > 1, greedy and sampled, both ``--dcp-comm`` paths,
eagerly (decode CUDA graphs for the verify and draft passes are not implemented under DCP).
``speculative_refusal`` and ``speculative_graph_refusal`` name what is not
(docs/speculative-decoding.md: which combination is proven where).
"""

from typing import Optional

from sglang.srt.model_executor.cuda_graph_config import Backend

# Algorithms proven under DCP (NEXTN is SGLang's alias of EAGLE)
DCP_SPECULATIVE_ALGORITHMS = ("EAGLE", "EAGLE3", "NEXTN", "STANDALONE", "NGRAM")
# Algorithms with a draft model whose attention runs under DCP
DRAFT_MODEL_ALGORITHMS = ("EAGLE", "EAGLE3", "NEXTN", "STANDALONE")


def speculative_refusal(args) -> Optional[str]:
    """The speculative setting of ``args`` that DCP does not run, as a flag and a reason, or
    ``None`` (no speculation, or a proven one)."""
    if args.speculative_algorithm is None:
        return None
    algorithm = args.speculative_algorithm.upper()
    if algorithm not in DCP_SPECULATIVE_ALGORITHMS:
        return (
            f"--speculative-algorithm {args.speculative_algorithm} (DCP runs "
            f"{', '.join(DCP_SPECULATIVE_ALGORITHMS)})"
        )
    unsupported = {
        "--enable-multi-layer-eagle": args.enable_multi_layer_eagle,
        "--speculative-use-rejection-sampling": args.speculative_use_rejection_sampling,
        "--speculative-adaptive": args.speculative_adaptive,
        # the drafter's sliding window: DCP runs full attention only
        "--speculative-draft-window-size": args.speculative_draft_window_size is not None,
        # selects between two backends; DCP runs verify and draft extend on its one
        "--speculative-attention-mode decode": args.speculative_attention_mode != "prefill",
    }
    for flag, is_set in unsupported.items():
        if is_set:
            return flag
    return None


def speculative_graph_refusal(args) -> Optional[str]:
    """Decode CUDA graphs would capture the verify and draft passes, which DCP runs eagerly."""
    if (
        args.speculative_algorithm is not None
        and args.device == "cuda"
        and args.cuda_graph_config.decode.backend != Backend.DISABLED
    ):
        return "decode CUDA graphs with --speculative-algorithm (pass --disable-cuda-graph)"
    return None
