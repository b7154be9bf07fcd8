"""SGLang's HiCache on CPU through the test mode ``SGLANG_DCP_TEST_CPU_HICACHE=1``
(``sglang_dcp.test.hicache_cpu``): off unless set; its PyTorch copies move the rows SGLang's
own page reading (``get_data_page``) finds, for each layout DCP accepts and pages 1, 2, 16."""

import pytest
import torch

from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.mem_cache.memory_pool_host import MHATokenToKVPoolHost

from sglang_dcp.hooks import HOOKS, active_hooks
from sglang_dcp.test import hicache_cpu

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
