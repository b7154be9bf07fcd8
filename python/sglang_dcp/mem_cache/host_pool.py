"""HiCache's host tier under DCP: each rank's host pool holds its stripe of every logical page.

SGLang's host pool (``MHATokenToKVPoolHost``) is a buffer of host rows with an allocator of
its own; the radix cache keeps a node's host slots (``host_value``) beside its device slots,
and the cache controller hands both to the pool's copies (``backup_from_device_all_layer``,
``load_to_device_per_layer``) and to L3 page I/O (``get_data_page``,
``set_from_flat_data_page``). Under DCP the device slots are logical (slot ``loc`` on rank
``loc % D`` at row ``loc // D``), so the host tier is striped the same way:

* ``StripedHostPool`` wraps SGLang's pool of ``S`` physical rows per rank in pages of ``P``
  (its buffer, layout and copy kernels: the *stripe*) and gives the allocator side ``S * D``
  logical slots in pages of ``P * D``: SGLang's own ``alloc``/``free``/``available_size``/
  ``clear`` on logical slots, and logical ``size`` and ``page_size`` for the radix cache,
  the controller and the metrics. Host slot ``h`` is row ``h // D`` of rank ``h % D``.
* Every index tensor the controller hands the pool (host and device alike) is made of whole
  logical pages, so this rank's rows are ``layout.local_page_rows`` (``idx.view(-1, D)[:,
  rank] // D``) of both, paired in order: the stripe's copy moves exactly its own rows, with
  no device sync and no traffic between ranks. A logical page's rows on a rank fill one
  physical page, so ``page_first_direct`` and the direct I/O backend see whole pages.
* L3: the logical page starting at host slot ``h`` is the stripe's page starting at row
  ``h // D``: a rank stores and reads its ``P`` rows of it, under its own TP rank's key.
* Sizing: ``--hicache-ratio r`` gives the stripe SGLang's ``r * N`` rows (``N`` the device
  pool's physical rows, rounded up to a page), ``--hicache-size`` GB per rank its rows at this
  rank's bytes per row; the logical host capacity is ``S * D``, ``D`` times that of dcp 1 at
  the same memory, logged at start-up.

Every decision over host slots (allocate, evict, load back, prefetch) is the same on every
rank of a DCP group: the radix cache's inputs are, and SGLang all-reduces the rest (write
and load acknowledgements, storage hits, prefetch progress) with MIN/MAX over the TP group,
which holds every DCP group; MIN is the rule stripes need (a page hits where every rank's
stripe of it exists). A rank's host slots are its own storage: what must agree is how many
are free (checked at idle with the device allocator, ``allocator.check_replicas_at_idle``),
and that none leaked (``host_slot_leak``).
"""

import functools
import logging
import threading
from typing import Optional

import torch

from sglang.srt.mem_cache.pool_host import HostKVCache

from sglang_dcp.distributed.parallel_state import dcp_is_initialized, get_dcp_group
from sglang_dcp.mem_cache.layout import local_page_rows

logger = logging.getLogger(__name__)


def _of_stripe(name: str) -> property:
    return property(lambda pool: getattr(pool.stripe, name), doc=f"The stripe's ``{name}``.")


class StripedHostPool:
    """A host pool of logical slots over ``stripe``, this rank's pool of physical rows."""

    # SGLang's host-slot allocator, here on the S * D logical slots
    clear = HostKVCache.clear
    available_size = HostKVCache.available_size
    alloc = HostKVCache.alloc
    free = HostKVCache.free
    # what is not about slots is the stripe's
    layout = _of_stripe("layout")
    dtype = _of_stripe("dtype")
    device = _of_stripe("device")
    layer_num = _of_stripe("layer_num")
    start_layer = _of_stripe("start_layer")
    end_layer = _of_stripe("end_layer")
    can_use_write_back_jit = _of_stripe("can_use_write_back_jit")

    def __init__(self, stripe, dcp_size: int, dcp_rank: int):
        self.stripe = stripe
        self.dcp_size, self.dcp_rank = dcp_size, dcp_rank
        self.size = stripe.size * dcp_size
        self.page_size = stripe.page_size * dcp_size
        self.lock = threading.RLock()
        self.clear()

    @classmethod
    def build(cls, pool_cls, device_pool, host_to_device_ratio, host_size, page_size, layout, **kwargs):
        """What SGLang's ``pool_cls(device_pool, ratio, size, page_size, layout, ...)`` builds,
        striped: the stripe is ``pool_cls`` at the physical page ``page_size // D``."""
        group = get_dcp_group()
        stripe = pool_cls(device_pool, host_to_device_ratio, host_size, page_size // group.world_size, layout,
                          **kwargs)  # fmt: skip
        pool = cls(stripe, group.world_size, group.rank_in_group)
        logger.info(
            "DCP host KV cache (%s): %d physical rows per rank (page %d) x dcp %d = %d logical "
            "tokens (page %d)", layout, stripe.size, stripe.page_size, pool.dcp_size, pool.size, pool.page_size,
        )  # fmt: skip
        return pool

    def local_rows(self, slots: torch.Tensor) -> torch.Tensor:
        """This rank's physical rows of ``slots`` (whole logical pages, host or device)."""
        if slots.numel() % self.page_size:
            raise ValueError(
                f"DCP host pool: {slots.numel()} slots are not whole logical pages of {self.page_size}"
            )
        return local_page_rows(slots, self.dcp_size, self.dcp_rank)

    def backup_from_device_all_layer(self, device_pool, host_indices, device_indices, io_backend) -> None:
        self.stripe.backup_from_device_all_layer(
            device_pool, self.local_rows(host_indices), self.local_rows(device_indices), io_backend
        )

    def load_to_device_per_layer(self, device_pool, host_indices, device_indices, layer_id, io_backend) -> None:
        self.stripe.load_to_device_per_layer(
            device_pool, self.local_rows(host_indices), self.local_rows(device_indices), layer_id, io_backend
        )

    def get_data_page(self, index, flat: bool = True) -> torch.Tensor:
        """This rank's rows of the logical page starting at host slot ``index``."""
        return self.stripe.get_data_page(index // self.dcp_size, flat)

    def set_from_flat_data_page(self, index, data_page: torch.Tensor) -> None:
        self.stripe.set_from_flat_data_page(index // self.dcp_size, data_page)

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return self.stripe.get_dummy_flat_data_page()

    def prefetch_capacity_limit(self, device_pool) -> int:
        """The most logical tokens L3 prefetches may hold: SGLang's 80% of what the host tier
        holds beyond the device pool, here in logical slots on both sides (``N * D``)."""
        return max(0, int(0.8 * (self.size - device_pool.size * self.dcp_size)))


def host_pool_class_with_dcp(original, device_pool):
    """Around ``get_mha_host_pool_cls``: under DCP, a builder of SGLang's class striped."""
    pool_cls = original(device_pool)
    if not dcp_is_initialized():
        return pool_cls
    return functools.partial(StripedHostPool.build, pool_cls)


def striped_host_pool(tree_cache) -> Optional[StripedHostPool]:
    pool = getattr(tree_cache, "token_to_kv_pool_host", None)
    return pool if isinstance(pool, StripedHostPool) else None


def host_slot_leak(tree_cache) -> Optional[str]:
    """At idle, every host slot is free, held by a radix node or queued for release; else a
    message. SGLang checks the device pool at idle, not the host pool."""
    pool = striped_host_pool(tree_cache)
    if pool is None:
        return None
    held, stack = 0, [tree_cache.root_node]
    while stack:
        node = stack.pop()
        stack.extend(node.children.values())
        if node.host_value is not None:
            held += len(node.host_value)
    controller = tree_cache.cache_controller
    queued = sum(t.numel() for t in controller.host_mem_release_queue.queue) if controller.enable_storage else 0
    if pool.available_size() + held + queued == pool.size:
        return None
    return (
        f"DCP host pool leak at idle: {pool.available_size()} free + {held} held by the radix cache + "
        f"{queued} queued for release != {pool.size} logical host slots"
    )
