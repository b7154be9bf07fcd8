"""HiCache under DCP without an engine: the CPU HiCache test mode's copies, the striped host
pool's index translation and copies for D = 1..4, pages 1, 2, 16 and each accepted layout,
its L3 pages, its capacity, the L3 key salt, the storage attach rules and the host leak check.

The D ranks of a DCP group are simulated in one process: each has its own device pool of
physical rows and its own ``StripedHostPool`` over SGLang's ``MHATokenToKVPoolHost`` (built on
CPU unpinned, its copies those of ``sglang_dcp.test.hicache_cpu``). The logical KV of slot
``loc`` is a value of its own, stored on rank ``loc % D`` at row ``loc // D``.
"""

import dataclasses
import types

import pytest
import torch

from sglang.srt.mem_cache.hicache_storage import HiCacheFile, HiCacheStorageConfig
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.mem_cache.memory_pool_host import MHATokenToKVPoolHost
from sglang.srt.mem_cache.utils import get_hash_str

from sglang_dcp.hicache import attach_storage_to_stripes, storage_model_name
from sglang_dcp.hooks import HOOKS, active_hooks
from sglang_dcp.mem_cache.allocator import DCPTokenToKVPoolAllocator
from sglang_dcp.mem_cache.host_pool import StripedHostPool, host_pool_class_with_dcp, host_slot_leak
from sglang_dcp.server_args import DCPConfigError
from sglang_dcp.mem_cache.layout import local_page_rows, local_slot_rows
from sglang_dcp.test import hicache_cpu

DCP_SIZES = [1, 2, 3, 4]
PAGE_SIZES = [1, 2, 16]
LAYOUTS = ["layer_first", "page_first", "page_first_direct"]
LAYERS, HEADS, DIM = 2, 1, 4
ROWS = 256  # device rows per rank


@pytest.fixture(autouse=True)
def copies_in_torch(monkeypatch):
    """SGLang's copy kernels need CUDA; these are the CPU test mode's, as its hooks install them."""
    monkeypatch.setattr(MHATokenToKVPoolHost, "load_to_device_per_layer", hicache_cpu.load_layer_in_torch)
    monkeypatch.setattr(MHATokenToKVPoolHost, "backup_from_device_all_layer", hicache_cpu.backup_all_layers_in_torch)


def device_pool(rows: int, page: int) -> MHATokenToKVPool:
    return MHATokenToKVPool(rows, page, torch.float32, HEADS, DIM, LAYERS, "cpu", False)


def host_pool(device, page: int, layout: str, ratio: float = 2.0, host_size: int = 0) -> MHATokenToKVPoolHost:
    return MHATokenToKVPoolHost(device, ratio, host_size, page, layout, pin_memory=False)


def kv_value(loc: torch.Tensor, layer: int, which: int) -> torch.Tensor:
    """The logical K (``which`` 0) or V (1) of slots ``loc`` at ``layer``, ``[n, HEADS, DIM]``."""
    base = loc.to(torch.float32) * 100 + layer * 10 + which * 5
    return (base[:, None, None] + torch.arange(HEADS * DIM, dtype=torch.float32).view(HEADS, DIM) / 10)


def test_mode_off_unless_set(monkeypatch):
    monkeypatch.delenv(hicache_cpu.ENV, raising=False)
    assert active_hooks() == HOOKS
    monkeypatch.setenv(hicache_cpu.ENV, "0")
    assert active_hooks() == HOOKS
    monkeypatch.setenv(hicache_cpu.ENV, "1")
    assert active_hooks() == HOOKS + hicache_cpu.HOOKS


def test_mode_refuses_other_devices():
    message = f"^{hicache_cpu.ENV}=1 replaces HiCache's CUDA copies for CPU tests; unset it for --device cuda.$"
    with pytest.raises(DCPConfigError, match=message):
        hicache_cpu.check_cpu_hicache_args(None, types.SimpleNamespace(device="cuda"))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("page", PAGE_SIZES)
def test_mode_copies_the_rows_sglang_pages_read(layout, page):
    """Device rows backed up to host pages read back, through SGLang's own ``get_data_page``,
    as the rows in order; loaded into other device rows, they are the same K/V."""
    device = device_pool(ROWS, page)
    host = host_pool(device, page, layout)
    src = torch.arange(page, 5 * page)  # device pages 1..4
    for layer in range(LAYERS):
        device.k_buffer[layer][src] = kv_value(src, layer, 0)
        device.v_buffer[layer][src] = kv_value(src, layer, 1)
    host_rows = torch.cat([torch.arange(p * page, (p + 1) * page) for p in (3, 0, 2, 1)])
    host.backup_from_device_all_layer(device, host_rows, src, "kernel")
    for i, start in enumerate(host_rows[::page].tolist()):
        data = host.get_data_page(start, flat=False)
        rows = src[i * page:(i + 1) * page]
        for layer in range(LAYERS):
            for which in (0, 1):
                if layout == "layer_first":
                    got = data[which, layer]
                elif layout == "page_first":
                    got = data[which, :, layer]
                else:
                    got = data[which, 0, layer]
                assert torch.equal(got, kv_value(rows, layer, which))
    dst = torch.arange(8 * page, 12 * page)
    for layer in range(LAYERS):
        host.load_to_device_per_layer(device, host_rows, dst, layer, "direct")
        assert torch.equal(device.k_buffer[layer][dst], kv_value(src, layer, 0))
        assert torch.equal(device.v_buffer[layer][dst], kv_value(src, layer, 1))


def logical_pages(allocator, num_pages: int) -> torch.Tensor:
    return allocator.alloc(num_pages * allocator.page_size)


@pytest.mark.parametrize("dcp", DCP_SIZES)
@pytest.mark.parametrize("page", PAGE_SIZES)
def test_local_page_rows_are_the_owned_rows(dcp, page):
    """On whole logical pages in any order, ``local_page_rows`` picks exactly the rows the
    mask picks (``local_slot_rows``), in order, and they fill whole physical pages."""
    allocator = DCPTokenToKVPoolAllocator(ROWS * dcp, page_size=page * dcp, dtype=torch.float32,
                                          device="cpu", kvcache=None, need_sort=False)  # fmt: skip
    slots = logical_pages(allocator, 5)
    slots = slots.view(5, -1)[torch.randperm(5, generator=torch.Generator().manual_seed(dcp))].reshape(-1)
    for rank in range(dcp):
        rows = local_page_rows(slots, dcp, rank)
        assert torch.equal(rows, local_slot_rows(slots, dcp, rank))
        pages = rows.view(-1, page)
        assert torch.equal(pages - pages[:, :1], torch.arange(page).expand_as(pages))
        assert torch.all(pages[:, 0] % page == 0)


class Group:
    """The D ranks of one DCP group in this process: a device pool and a striped host pool each,
    and one device allocator (every rank holds the same replica)."""

    def __init__(self, dcp: int, page: int, layout: str, ratio: float = 2.0):
        self.dcp, self.page = dcp, page
        self.devices = [device_pool(ROWS, page) for _ in range(dcp)]
        self.hosts = [StripedHostPool(host_pool(d, page, layout, ratio), dcp, r) for r, d in enumerate(self.devices)]
        self.allocator = DCPTokenToKVPoolAllocator(ROWS * dcp, page_size=page * dcp, dtype=torch.float32,
                                                   device="cpu", kvcache=None, need_sort=False)  # fmt: skip

    def store(self, slots: torch.Tensor, kv_of: torch.Tensor) -> None:
        """Each rank stores the K/V of ``kv_of[i]`` at its own slots ``slots[i]``."""
        for rank, device in enumerate(self.devices):
            mine = slots % self.dcp == rank
            for layer in range(LAYERS):
                device.k_buffer[layer][slots[mine] // self.dcp] = kv_value(kv_of[mine], layer, 0)
                device.v_buffer[layer][slots[mine] // self.dcp] = kv_value(kv_of[mine], layer, 1)

    def holds(self, slots: torch.Tensor, kv_of: torch.Tensor) -> bool:
        for rank, device in enumerate(self.devices):
            mine = slots % self.dcp == rank
            for layer in range(LAYERS):
                if not (torch.equal(device.k_buffer[layer][slots[mine] // self.dcp], kv_value(kv_of[mine], layer, 0))
                        and torch.equal(device.v_buffer[layer][slots[mine] // self.dcp],
                                        kv_value(kv_of[mine], layer, 1))):  # fmt: skip
                    return False
        return True


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dcp", DCP_SIZES)
@pytest.mark.parametrize("page", PAGE_SIZES)
def test_striped_backup_load_and_l3_pages(layout, dcp, page):
    """Logical device pages backed up to logical host slots (the striped allocator's) and loaded
    back into other device pages hold the same K/V on every rank; a logical page's L3 data
    (each rank's ``get_data_page``) written into another host page and loaded back too."""
    group = Group(dcp, page, layout)
    logical_page = page * dcp
    src = logical_pages(group.allocator, 4)
    group.store(src, src)
    host_slots = [host.alloc(len(src)) for host in group.hosts]
    assert all(torch.equal(h, host_slots[0]) for h in host_slots)  # the replicas agree
    assert host_slots[0].numel() == len(src) and group.hosts[0].page_size == logical_page
    for host, slots, device in zip(group.hosts, host_slots, group.devices):
        host.backup_from_device_all_layer(device, slots, src, "kernel")
    group.store(src, torch.zeros_like(src))  # the device copy is gone (evicted, reused)
    dst = logical_pages(group.allocator, 4)
    for host, slots, device in zip(group.hosts, host_slots, group.devices):
        for layer in range(LAYERS):
            host.load_to_device_per_layer(device, slots, dst, layer, "kernel")
    assert group.holds(dst, src)

    # L3: each rank's rows of the logical page at host slot h, into another host page
    stored = [[host.get_data_page(h).clone() for h in slots[::logical_page].tolist()]
              for host, slots in zip(group.hosts, host_slots)]  # fmt: skip
    assert stored[0][0].numel() == 2 * LAYERS * page * HEADS * DIM  # P rows of the rank
    assert stored[0][0].numel() == group.hosts[0].get_dummy_flat_data_page().numel()
    fetched = [host.alloc(len(src)) for host in group.hosts]
    for host, slots, pages in zip(group.hosts, fetched, stored):
        for start, data in zip(slots[::logical_page].tolist(), pages):
            host.set_from_flat_data_page(start, data)
    again = logical_pages(group.allocator, 4)
    for host, slots, device in zip(group.hosts, fetched, group.devices):
        for layer in range(LAYERS):
            host.load_to_device_per_layer(device, slots, again, layer, "direct")
    assert group.holds(again, src)


def test_dcp1_keeps_sglangs_host_pool():
    """Without a DCP group (dcp 1) the hook hands back SGLang's class itself."""
    assert host_pool_class_with_dcp(lambda pool: MHATokenToKVPoolHost, device_pool(ROWS, 1)) is MHATokenToKVPoolHost


def test_copies_refuse_slots_that_are_not_whole_pages():
    group = Group(2, 2, "layer_first")
    with pytest.raises(ValueError, match="not whole logical pages of 4"):
        group.hosts[0].backup_from_device_all_layer(group.devices[0], torch.arange(6), torch.arange(4, 10), "kernel")


@pytest.mark.parametrize("dcp", DCP_SIZES)
@pytest.mark.parametrize("page", PAGE_SIZES)
def test_host_capacity_is_d_times_at_the_same_memory(dcp, page):
    """``--hicache-ratio`` and ``--hicache-size``: the stripe has what dcp 1 has at the
    physical page, the logical capacity is exactly D x, in logical pages of ``P * D``."""
    for ratio, gigabytes in ((2.0, 0), (3.5, 0), (2.0, 1e-4)):
        plain = host_pool(device_pool(ROWS, page), page, "page_first", ratio, gigabytes)
        striped = StripedHostPool(host_pool(device_pool(ROWS, page), page, "page_first", ratio, gigabytes), dcp, 0)
        assert striped.size == dcp * plain.size and striped.page_size == dcp * page
        assert striped.available_size() == striped.size and striped.size % striped.page_size == 0


def test_prefetch_capacity_limit_counts_logical_slots():
    device = device_pool(ROWS, 1)
    striped = StripedHostPool(host_pool(device, 1, "layer_first", 2.0), 4, 0)
    # SGLang's 80% of host beyond device, both logical: (4 * 129 - 4 * 64) * 0.8
    assert striped.prefetch_capacity_limit(device) == int(0.8 * (striped.size - 4 * ROWS))


# ---- L3 keys ------------------------------------------------------------------------------


def file_backend(tmp_path, model_name: str) -> HiCacheFile:
    config = HiCacheStorageConfig(tp_rank=0, tp_size=2, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
                                  is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=True,
                                  model_name=model_name)  # fmt: skip
    return HiCacheFile(config, file_path=str(tmp_path))


def test_l3_keys_of_dcp2_page16_and_dcp1_page32_differ(tmp_path):
    """Both servers hash a page of 32 tokens (dcp 1's page, dcp 2's logical page) to the same
    key; the file backend's suffix (model, TP rank, TP size) is the same; its ``get`` fills a
    buffer of dcp 2's 16 rows from dcp 1's 32-row file without an error. Salted, the keys differ."""
    model = "org/model"
    page_hash = get_hash_str(list(range(100, 132)), None)
    dcp1, unsalted_dcp2 = file_backend(tmp_path, model), file_backend(tmp_path, model)
    assert dcp1._get_suffixed_key(page_hash) == unsalted_dcp2._get_suffixed_key(page_hash)
    row = HEADS * DIM * LAYERS * 2
    assert dcp1.set(page_hash, torch.arange(32 * row, dtype=torch.float32))
    smaller = torch.zeros(16 * row)
    assert unsalted_dcp2.get(page_hash, smaller) is not None  # silently half of another layout's page

    dcp2 = file_backend(tmp_path, storage_model_name(model, 2, 16))
    assert dcp2._get_suffixed_key(page_hash) != dcp1._get_suffixed_key(page_hash)
    assert not dcp2.exists(page_hash)
    other = {(2, 8), (4, 8), (4, 16), (2, 32)}  # other D or P: other keys again
    keys = {file_backend(tmp_path, storage_model_name(model, d, p))._get_suffixed_key(page_hash) for d, p in other}
    assert len(keys) == len(other) and dcp2._get_suffixed_key(page_hash) not in keys


def fake_controller(pool):
    return types.SimpleNamespace(mem_pool_host=pool, mem_pool_device=types.SimpleNamespace(size=ROWS))


def test_attach_storage_salts_keys_and_refuses_other_backends():
    striped = StripedHostPool(host_pool(device_pool(ROWS, 16), 16, "page_first"), 2, 1)
    calls = []

    def original(controller, **kwargs):
        calls.append(kwargs)
        controller.prefetch_capacity_limit = 0.8 * (controller.mem_pool_host.size - ROWS)  # SGLang's mix

    controller = fake_controller(striped)
    attach_storage_to_stripes(original, controller, storage_backend="file", model_name="m")
    assert calls[-1]["model_name"] == "m_dcp2_page16" == storage_model_name("m", 2, 16)
    assert controller.prefetch_capacity_limit == striped.prefetch_capacity_limit(controller.mem_pool_device)
    for backend in ("mooncake", "hf3fs", "nixl", "aibrix", "dynamic", "eic", "simm"):
        with pytest.raises(ValueError, match=f"'{backend}' is not supported with --dcp-size 2; use file"):
            attach_storage_to_stripes(original, controller, storage_backend=backend, model_name="m")
    assert len(calls) == 1
    plain = fake_controller(host_pool(device_pool(ROWS, 16), 16, "page_first"))  # dcp 1: SGLang's own
    attach_storage_to_stripes(original, plain, storage_backend="mooncake", model_name="m")
    assert calls[-1]["model_name"] == "m" and calls[-1]["storage_backend"] == "mooncake"


# ---- host slots at idle ---------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Node:
    host_value: object = None
    children: dict = dataclasses.field(default_factory=dict)


def tree_cache(pool, held, queued=()):
    """A radix tree whose nodes hold ``held`` host slots, with ``queued`` pending release."""
    root = Node(children={i: Node(host_value=h) for i, h in enumerate(held)})
    queue = types.SimpleNamespace(queue=list(queued))
    controller = types.SimpleNamespace(enable_storage=True, host_mem_release_queue=queue)
    return types.SimpleNamespace(token_to_kv_pool_host=pool, root_node=root, cache_controller=controller)


def test_host_slot_leak():
    striped = StripedHostPool(host_pool(device_pool(ROWS, 1), 1, "layer_first"), 2, 0)
    a, b, c = striped.alloc(4), striped.alloc(6), striped.alloc(2)
    assert host_slot_leak(tree_cache(striped, [a, b], [c])) is None
    message = host_slot_leak(tree_cache(striped, [a], [c]))
    assert message == (f"DCP host pool leak at idle: {striped.size - 12} free + 4 held by the radix cache + 2 "
                       f"queued for release != {striped.size} logical host slots")  # fmt: skip
    assert host_slot_leak(tree_cache(host_pool(device_pool(ROWS, 1), 1, "layer_first"), [])) is None  # dcp 1
