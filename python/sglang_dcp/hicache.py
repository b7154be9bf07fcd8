"""HiCache (``--enable-hierarchical-cache``) under DCP: what is hooked, why, and what is accepted.

What SGLang 0.5.14 does, read in its code (``mem_cache/hiradix_cache.py``,
``managers/cache_controller.py``, ``mem_cache/memory_pool_host.py``, ``pool_host/base.py``,
``mem_cache/hicache_storage.py``):

* ``HiRadixCache`` builds its host pool with ``get_mha_host_pool_cls(device_pool)(device_pool,
  hicache_ratio, hicache_size, page_size, layout)`` at the scheduler's (logical) page; the pool
  allocates host slots itself, and a radix node keeps ``host_value`` beside ``value``. The
  controller hands both index tensors, always whole pages, to the pool's copy kernels and its
  L3 page I/O (``host_indices[i * page_size]``). Under DCP those are logical slots: as rows
  they would be wrong, or past the physical pool.
* Its decisions are all-reduced over the TP CPU group (write and load acknowledgements and
  the storage control queues with MIN, the storage hit length with MIN, prefetch termination
  with MAX), which holds every DCP group: the ranks of a group take the same decisions.
* The ``file`` backend keys a page by a chained SHA-256 of its ``page_size`` tokens plus
  ``_{model}_{tp_rank}_{tp_size}``; ``HiCacheFile.get`` reads a file into a smaller buffer
  without an error. A dcp 2 / page 16 server (logical page 32) and a dcp 1 / page 32 server of
  the same model and TP size would read each other's files as their own: silent wrong KV.
* ``HiCacheController.attach_storage_backend`` sets ``prefetch_capacity_limit`` to 80% of the
  host pool's size less the device pool's, which under DCP mixes logical and physical slots.
* A speculative draft's host pool is sized ``primary.size / draft_pool.size`` times its
  device pool (``kv_cache_builder.maybe_register_hicache_draft``): under DCP, ``D`` times the
  rows it needs.

What the plugin hooks (``hooks.py``):

* ``memory_pool_host.get_mha_host_pool_cls`` (around): the host pool is striped
  (``mem_cache.host_pool.StripedHostPool``: logical slots for the allocator, the radix cache
  and the metrics; each rank's copies and L3 pages move only its own rows);
* ``HiCacheController.attach_storage_backend`` (around, at start-up and for the admin API):
  only ``file`` is accepted; its keys are salted with the DCP size and the physical page
  (``storage_model_name``); the prefetch capacity limit is counted in logical slots;
* ``Scheduler.on_idle`` (the allocator-replica check): the host pools' free counts agree over
  the DCP group and no host slot leaked.

Accepted with ``--dcp-size > 1``: layouts ``layer_first``, ``page_first`` and
``page_first_direct``, I/O backends ``kernel`` and ``direct``, write policies
``write_through`` and ``write_through_selective``, every prefetch policy, ``--hicache-ratio``
and ``--hicache-size``, L3 storage ``file``. Refused in one line before loading
(``hicache_refusal``): other layouts, other I/O backends, other storage backends,
``write_back`` (SGLang 0.5.14's own accounting fails at dcp 1) and HiCache with speculative
decoding.
"""

from typing import Optional

from sglang_dcp.mem_cache.host_pool import StripedHostPool

DCP_HICACHE_LAYOUTS = ("layer_first", "page_first", "page_first_direct")
DCP_HICACHE_IO_BACKENDS = ("kernel", "direct")
DCP_HICACHE_STORAGE_BACKENDS = ("file",)


def hicache_refusal(args) -> Optional[str]:
    """The HiCache setting of ``args`` that DCP does not run, as a flag and a reason, or
    ``None`` (no HiCache, or an accepted setting)."""
    if not args.enable_hierarchical_cache:
        return None
    if args.hicache_mem_layout not in DCP_HICACHE_LAYOUTS:
        return f"--hicache-mem-layout {args.hicache_mem_layout} (DCP runs {', '.join(DCP_HICACHE_LAYOUTS)})"
    if args.hicache_io_backend not in DCP_HICACHE_IO_BACKENDS:
        return f"--hicache-io-backend {args.hicache_io_backend} (DCP runs {', '.join(DCP_HICACHE_IO_BACKENDS)})"
    backend = args.hicache_storage_backend
    if backend is not None and backend not in DCP_HICACHE_STORAGE_BACKENDS:
        return f"--hicache-storage-backend {backend} (DCP runs {', '.join(DCP_HICACHE_STORAGE_BACKENDS)})"
    if args.hicache_write_policy == "write_back":
        # At dcp 1 SGLang 0.5.14's write-back eviction fails its own strict busy memory check
        # (available + evictable + protected over the pool) and ran out of memory on CPU
        return "--hicache-write-policy write_back (SGLang 0.5.14 miscounts its device pool; use write_through)"
    if args.speculative_algorithm is not None:
        return "--enable-hierarchical-cache with --speculative-algorithm"
    return None


def storage_model_name(model_name: Optional[str], dcp_size: int, physical_page: int) -> str:
    """The model name L3 keys carry, salted: ``{model_name}_dcp{D}_page{P}``. A page's file
    holds one rank's ``P`` rows of a logical page of ``P * D`` tokens, so a server of another
    ``D`` or ``P`` (and dcp 1, unsalted) never reads it."""
    return f"{model_name or ''}_dcp{dcp_size}_page{physical_page}"


def attach_storage_to_stripes(original, controller, storage_backend: str, prefetch_threshold: int = 256,
                              model_name: Optional[str] = None, storage_backend_extra_config=None, **kwargs):
    """Around ``HiCacheController.attach_storage_backend``: with a striped host pool, ``file``
    only (raised as SGLang's own attach errors are), keys salted by ``storage_model_name``,
    and the prefetch capacity limit in logical slots."""
    pool = controller.mem_pool_host
    if not isinstance(pool, StripedHostPool):
        return original(controller, storage_backend=storage_backend, prefetch_threshold=prefetch_threshold,
                        model_name=model_name, storage_backend_extra_config=storage_backend_extra_config,
                        **kwargs)  # fmt: skip
    if storage_backend not in DCP_HICACHE_STORAGE_BACKENDS:
        raise ValueError(
            f"HiCache storage backend {storage_backend!r} is not supported with --dcp-size {pool.dcp_size}; "
            f"use {', '.join(DCP_HICACHE_STORAGE_BACKENDS)}."
        )
    original(controller, storage_backend=storage_backend, prefetch_threshold=prefetch_threshold,
             model_name=storage_model_name(model_name, pool.dcp_size, pool.stripe.page_size),
             storage_backend_extra_config=storage_backend_extra_config, **kwargs)  # fmt: skip
    controller.prefetch_capacity_limit = pool.prefetch_capacity_limit(controller.mem_pool_device)
