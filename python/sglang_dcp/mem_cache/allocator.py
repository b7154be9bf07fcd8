"""The logical-slot allocator of DCP: SGLang's paged allocator, widened by D.

It hands out logical slots in pages of ``page_size * D`` over ``N * D`` slots while each
rank's physical pool keeps ``N`` rows of ``page_size``-row pages (``layout`` maps slot
``loc`` to rank ``loc % D``, row ``loc // D``). SGLang launches Triton kernels in
``alloc_extend``/``alloc_decode``; this class computes the same slots in PyTorch on CPU,
and for ``alloc_extend`` also where the logical page is not a power of two (e.g. D = 3):
SGLang's extend kernel spans a page with ``tl.arange``, which needs one.
"""

import torch

from sglang.srt.mem_cache.allocator.paged import (
    PagedTokenToKVPoolAllocator,
    alloc_extend_naive,
)
from sglang.srt.utils import get_num_new_pages, next_power_of_2


class DCPTokenToKVPoolAllocator(PagedTokenToKVPoolAllocator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.use_triton_kernels(self.device != "cpu")

    def use_triton_kernels(self, triton: bool) -> None:
        """Decode with SGLang's Triton kernel if ``triton``; extend too if the logical page is
        a power of two (the extend kernel spans a page with ``tl.arange``)."""
        self.decode_in_torch = not triton
        self.extend_in_torch = not triton or next_power_of_2(self.page_size) != self.page_size

    def alloc_extend(
        self,
        prefix_lens,
        prefix_lens_cpu,
        seq_lens,
        seq_lens_cpu,
        last_loc,
        extend_num_tokens,
        num_new_pages=None,
    ):
        if not self.extend_in_torch:
            return super().alloc_extend(
                prefix_lens, prefix_lens_cpu, seq_lens, seq_lens_cpu,
                last_loc, extend_num_tokens, num_new_pages,
            )
        if num_new_pages is None:
            num_new_pages = get_num_new_pages(
                seq_lens=seq_lens_cpu, page_size=self.page_size, prefix_lens=prefix_lens_cpu
            )
        if self.need_sort and num_new_pages > len(self.free_pages):
            self.merge_and_sort_free()
        if num_new_pages > len(self.free_pages):
            return None
        out_indices = torch.empty((extend_num_tokens,), dtype=torch.int64, device=self.device)
        alloc_extend_naive(
            prefix_lens, seq_lens, last_loc, self.free_pages, out_indices,
            self.page_size, self.device,
        )
        self.free_pages = self.free_pages[num_new_pages:]
        return out_indices

    def alloc_decode(self, seq_lens, seq_lens_cpu, last_loc):
        if not self.decode_in_torch:
            return super().alloc_decode(seq_lens, seq_lens_cpu, last_loc)
        # The new token sits at position seq_len - 1; it opens a page iff that is a page start.
        opens_page = (seq_lens - 1) % self.page_size == 0
        num_new_pages = int(opens_page.sum())
        if self.need_sort and num_new_pages > len(self.free_pages):
            self.merge_and_sort_free()
        if num_new_pages > len(self.free_pages):
            return None
        out_indices = (last_loc + 1).to(torch.int64)
        out_indices[opens_page] = self.free_pages[:num_new_pages] * self.page_size
        self.free_pages = self.free_pages[num_new_pages:]
        return out_indices
