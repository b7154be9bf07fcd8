"""Layers that the DCP attention path refuses at their first call (no engine needed).

``--dcp-size`` refuses the known models and flags before loading (``test_server_args.py``);
this is the net for any other model: a layer that is not causal decoder attention, or that
does not bring and store its own new K/V, stops with a message instead of reading or
writing K/V at logical slots that DCP does not store.
"""

import types

import pytest
import torch
from sglang.srt.layers.radix_attention import AttentionType

from sglang_dcp.layers.attention.dcp_backend import DCPAttnBackend


def backend():
    dcp = object.__new__(DCPAttnBackend)  # only what begin_layer reads
    dcp.dcp_size, dcp.dcp_rank, dcp.first_layer_id = 2, 0, 0
    return dcp


def layer(attn_type=AttentionType.DECODER):
    return types.SimpleNamespace(layer_id=0, attn_type=attn_type)


BATCH = types.SimpleNamespace(out_cache_loc=torch.tensor([4, 5, 6]))
K = torch.zeros(3, 1, 8)


@pytest.mark.parametrize(
    "attn_type, k, save_kv_cache, phrase",
    [
        (AttentionType.ENCODER_ONLY, K, True, "layer 0 is encoder_only attention"),
        (AttentionType.DECODER_BIDIRECTIONAL, K, True, "is decoder_bidirectional attention"),
        (AttentionType.DECODER, None, True, "with k=None"),
        (AttentionType.DECODER, K, False, "save_kv_cache=False"),
    ],
    ids=["encoder-only", "bidirectional", "k-none", "no-kv-store"],
)
def test_refused_layers(attn_type, k, save_kv_cache, phrase):
    with pytest.raises(NotImplementedError, match=phrase) as excinfo:
        backend().begin_layer(layer(attn_type), k, save_kv_cache, BATCH)
    assert str(excinfo.value).endswith("Use --dcp-size 1.")


def test_decoder_layer_gets_its_write_rows():
    dcp = backend()
    dcp.begin_layer(layer(), K, True, BATCH)
    assert dcp.write_rows.tolist()[::2] == [2, 3]  # owned slots 4, 6 -> rows 4 // 2, 6 // 2
