"""KV pools under DCP: a physical pool of ``N`` rows per rank, ``N * D`` logical slots.

``ModelRunner`` sizes its pool in pages of the logical ``page_size = P * D`` and gets ``N``
rows (a multiple of ``P * D``). The pool is built with the physical page ``P``; the
allocator hands out ``N * D`` logical slots in pages of ``P * D`` (slot ``loc`` -> rank
``loc % D``, row ``loc // D``), and ``max_total_num_tokens`` becomes ``N * D``, so the
scheduler, radix cache, logs and ``get_server_info`` all count logical tokens.
"""

import logging

from sglang_dcp.mem_cache.allocator import DCPTokenToKVPoolAllocator

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
    runner.token_to_kv_pool_allocator = DCPTokenToKVPoolAllocator(
        physical_rows * dcp_size,
        page_size=logical_page,
        dtype=runner.kv_cache_dtype,
        device=runner.device,
        kvcache=runner.token_to_kv_pool,
        need_sort=False,  # only PD disaggregation sorts, and DCP rejects it
    )
    runner.max_total_num_tokens = physical_rows * dcp_size
    logger.info(
        "DCP KV cache: %d physical rows per rank (page %d) x dcp %d = %d logical tokens "
        "(page %d)",
        physical_rows,
        logical_page // dcp_size,
        dcp_size,
        runner.max_total_num_tokens,
        logical_page,
    )
