"""KV pools under DCP: a physical pool of ``N`` rows per rank, ``N * D`` logical slots.

``ModelRunner`` sizes its pool in pages of the logical ``page_size = P * D`` and gets ``N``
rows (a multiple of ``P * D``). The pool is built with the physical page ``P``; the
allocator hands out ``N * D`` logical slots in pages of ``P * D`` (slot ``loc`` -> rank
``loc % D``, row ``loc // D``), and ``max_total_num_tokens`` becomes ``N * D``, so the
scheduler, radix cache, logs and ``get_server_info`` all count logical tokens. A speculative
draft model's runner gets the target's ``N`` and allocator from SGLang: its pool of ``N``
physical rows is striped by the same logical slots (``sglang_dcp.speculative``).

The pool's memory budget leaves room for what DCP's extend pass over a cached prefix
allocates beyond TP's (``extend_prefix_reserve_bytes``, a2a or lse), which SGLang's planning
does not know.
"""

import logging

from sglang_dcp.mem_cache.allocator import DCPTokenToKVPoolAllocator
from sglang_dcp.model_executor.group_heads import group_head_modules

logger = logging.getLogger(__name__)


def init_pools_with_dcp(original_init_pools, runner) -> None:
    dcp_size = runner.server_args.dcp_size
    if dcp_size == 1:
        return original_init_pools(runner)
    logical_page = runner.page_size
    physical_rows = runner.max_total_num_tokens
    runner.page_size = logical_page // dcp_size
    try:
        original_init_pools(runner)
    finally:
        runner.page_size = logical_page
    runner.max_total_num_tokens = physical_rows * dcp_size
    if runner.is_draft_worker:
        # A draft model's pool (physical rows, striped like the target's) is indexed by the
        # target's allocator, which SGLang hands it: nothing else to set up
        return
    runner.token_to_kv_pool_allocator = DCPTokenToKVPoolAllocator(
        physical_rows * dcp_size,
        page_size=logical_page,
        dtype=runner.kv_cache_dtype,
        device=runner.device,
        kvcache=runner.token_to_kv_pool,
        need_sort=False,  # only PD disaggregation sorts, and DCP rejects it
    )
    if runner.token_to_kv_pool_allocator.extend_in_torch and runner.device != "cpu":
        logger.info(
            "DCP: logical page %d is not a power of two; prefill slots are allocated in "
            "PyTorch (SGLang's Triton allocator needs a power of two)",
            logical_page,
        )
    logger.info(
        "DCP KV cache: %d physical rows per rank (page %d) x dcp %d = %d logical tokens "
        "(page %d)",
        physical_rows,
        logical_page // dcp_size,
        dcp_size,
        runner.max_total_num_tokens,
        logical_page,
    )


def extend_prefix_reserve_bytes(
    tokens: int,
    heads: int,
    head_dim: int,
    v_head_dim: int,
    dcp_size: int,
    itemsize: int,
    group_heads: bool = False,
) -> int:
    """A bound on what one layer's DCP extend pass over a cached prefix allocates beyond TP's,
    for a chunk of ``T = tokens`` new tokens and ``Hq = heads`` query heads per rank, as if
    every buffer were live at once (``itemsize`` of the model dtype, ``G = D*Hq`` heads):

    * a2a: the gathered queries ``[T, G, d]``, the prefix partials ``[T, G, dv]`` with their
      float32 LSE and the two exchange buffers of that size, and four float32 merges
      ``[T, Hq, dv]`` with their LSE;
    * lse (``group_heads``, every rank computes the ``G`` heads of its group): the group's
      queries ``[T, G, d]`` (in ``qkv_proj``'s output), the partials ``[T, G, dv]`` of the new
      tokens and of the prefix and the output in the model dtype, ``merge_states``' three
      float32 ``[T, G, dv]`` buffers and the float32 scaled output, and float32 LSEs
      ``[T, G]``: twelve (partials, ``merge_states``' weights and temporaries) and the ``D``
      all-gathered.
    """
    gathered = tokens * dcp_size * heads
    if group_heads:
        return gathered * (
            (head_dim + 3 * v_head_dim) * itemsize + 4 * 4 * v_head_dim + (12 + dcp_size) * 4
        )
    partials = v_head_dim * itemsize + 4
    merges = tokens * heads * (4 * v_head_dim + 4)
    return gathered * (head_dim * itemsize + 3 * partials) + 4 * merges


def largest_extend_tokens(args, context_len: int) -> int:
    """The most new tokens one extend-like batch holds: the chunked-prefill size, or without
    chunked prefill (``--chunked-prefill-size -1``) ``--max-prefill-tokens``, or the context
    length if longer (SGLang admits a first request longer than ``max_prefill_tokens`` into a
    batch); with speculative decoding, a verify pass's ``max_running_requests x
    speculative_num_draft_tokens`` or a draft extend's ``max_running_requests x
    (speculative_num_steps + 1)`` where more (SGLang has set ``max_running_requests`` by then)."""
    if args.chunked_prefill_size > 0:
        tokens = args.chunked_prefill_size
    else:
        tokens = max(args.max_prefill_tokens, context_len)
    if args.speculative_algorithm is not None:
        per_request = max(args.speculative_num_draft_tokens or 0, (args.speculative_num_steps or 0) + 1)
        tokens = max(tokens, args.max_running_requests * per_request)
    return tokens


def reserve_extend_memory(available_bytes: int, runner, pre_model_load_memory) -> int:
    """The KV pool's budget (``_profile_available_bytes``) less ``extend_prefix_reserve_bytes``
    for the largest extend batch (``largest_extend_tokens``), by the formula of the path the
    model's layers run (lse where they hold their group's heads, else a2a)."""
    args = runner.server_args
    if args.dcp_size == 1:
        return available_bytes
    config = runner.model_config
    tokens = largest_extend_tokens(args, config.context_len)
    heads = config.num_attention_heads // args.tp_size
    group_heads = bool(group_head_modules(runner))
    reserve = extend_prefix_reserve_bytes(
        tokens, heads, config.head_dim, config.v_head_dim, args.dcp_size, runner.dtype.itemsize,
        group_heads,
    )
    logger.info(
        "DCP: %.1f MiB kept out of the KV pool for the extend pass over a cached prefix "
        "(%d tokens, %d x %d query heads, --dcp-comm %s)",
        reserve / (1 << 20),
        tokens,
        args.dcp_size,
        heads,
        "lse" if group_heads else "a2a",
    )
    return available_bytes - reserve
