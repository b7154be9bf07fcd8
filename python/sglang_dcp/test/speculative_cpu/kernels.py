"""PyTorch stand-ins for the Triton kernels on SGLang's speculative path, for CPU tests.

SGLang launches them as ``kernel[grid](*args)``. Each stand-in is a class (a hook may replace
a module attribute with a class as it is) whose ``kernel[grid]`` returns ``launch``, a PyTorch
function of the same arguments that ignores the grid and the kernel's block-size constants.
"""

from typing import List, Optional

import torch


class TritonLaunch:
    """``Kernel[grid](*args)`` calls ``Kernel.launch(*args)``."""

    def __class_getitem__(cls, grid):
        return cls.launch


def request_spans(start: torch.Tensor, end: torch.Tensor) -> List[tuple]:
    """Per request ``(start, end, offset)``: the span ``[start, end)`` of its ``req_to_token``
    row and where it begins in a flat buffer that holds the spans request after request."""
    starts, ends = start.tolist(), end.tolist()
    offsets = [0]
    for s, e in zip(starts, ends):
        offsets.append(offsets[-1] + e - s)
    return list(zip(starts, ends, offsets))


class AssignReqToTokenPool(TritonLaunch):
    """``cache_locs.assign_req_to_token_pool``: ``req_to_token[r_b, start_b:end_b]`` = the
    ``b``-th span of ``out_cache_loc``."""

    @staticmethod
    def launch(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, pool_len=None,
               bs_upper=None):
        for row, (start, end, offset) in zip(req_pool_indices.tolist(), request_spans(start_offset, end_offset)):
            req_to_token[row, start:end] = out_cache_loc[offset : offset + end - start].to(req_to_token.dtype)


class AssignExtendCacheLocs(TritonLaunch):
    """``cache_locs.assign_extend_cache_locs``: the ``b``-th span of ``out_cache_loc`` =
    ``req_to_token[r_b, start_b:end_b]``."""

    @staticmethod
    def launch(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, pool_len=None,
               bs_upper=None):
        for row, (start, end, offset) in zip(req_pool_indices.tolist(), request_spans(start_offset, end_offset)):
            out_cache_loc[offset : offset + end - start] = req_to_token[row, start:end].to(out_cache_loc.dtype)


def assign_extend_cache_locs_func(
    req_pool_indices, req_to_token, start_offset, end_offset, batch_size, draft_token_num, device,
) -> torch.Tensor:
    """``cache_locs.assign_extend_cache_locs_func`` (it returns None on CPU): the slots of
    ``draft_token_num`` tokens per request, ``req_to_token[r_b, start_b:end_b]``."""
    out_cache_loc = torch.empty((batch_size * draft_token_num,), dtype=torch.int64, device=device)
    AssignExtendCacheLocs.launch(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc)
    return out_cache_loc


class AssignDraftCacheLocsContiguous(TritonLaunch):
    """``cache_locs.assign_draft_cache_locs_contiguous``: request ``b``'s ``topk * steps``
    draft slots ``req_to_token[r_b, seq_len_b : seq_len_b + topk * steps]``."""

    @staticmethod
    def launch(req_pool_indices, req_to_token, seq_lens, out_cache_loc, pool_len, topk, speculative_num_steps):
        width = topk * speculative_num_steps
        for b, (row, start) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
            out_cache_loc[b * width : (b + 1) * width] = req_to_token[row, start : start + width]


class FillAcceptOutCacheLoc(TritonLaunch):
    """``eagle.fill_accept_out_cache_loc``: ``out_cache_loc`` of the accepted nodes
    (``accept_index`` entries other than -1, in order), packed at the front."""

    @staticmethod
    def launch(accept_index, out_cache_loc, accept_out_cache_loc, size_upper=None):
        accepted = accept_index.flatten()
        accepted = accepted[accepted != -1].to(torch.int64)
        accept_out_cache_loc[: accepted.numel()] = out_cache_loc[accepted].to(accept_out_cache_loc.dtype)


class FillBonusTokens(TritonLaunch):
    """``eagle.fill_bonus_tokens``: ``bonus[b]`` = the last accepted token of request ``b``,
    ``accept_tokens.flat[stride * b + accept_lens[b] - 1]``."""

    @staticmethod
    def launch(accept_tokens, accept_lens, bonus_tokens, accept_stride):
        index = torch.arange(accept_lens.numel(), device=accept_lens.device) * accept_stride + accept_lens - 1
        bonus_tokens.copy_(accept_tokens.flatten()[index.to(torch.int64)].to(bonus_tokens.dtype))


def gather_spec_extras(
    indices: torch.Tensor,
    topk_p_buf: torch.Tensor,
    topk_index_buf: torch.Tensor,
    output_tokens_buf: torch.Tensor,
    hidden_states_buf: Optional[torch.Tensor],
):
    """``gather_spec_extras.gather_spec_extras``: rows ``indices`` of each buffer."""
    return (
        topk_p_buf[indices],
        topk_index_buf[indices],
        output_tokens_buf[indices],
        None if hidden_states_buf is None else hidden_states_buf[indices],
    )
