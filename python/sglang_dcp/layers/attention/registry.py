"""Which DCP attention backend replaces which SGLang backend when ``dcp_size > 1``: the
model's, and the draft model's (its decode steps and its extend) under speculative decoding."""

from sglang_dcp.layers.attention.dcp_backend import DCPMultiStepDraftBackend


def create_dcp_attention_backend(backend_name: str, runner):
    if backend_name == "torch_native":
        from sglang_dcp.layers.attention.torch_native_dcp_backend import (
            TorchNativeDCPAttnBackend,
        )

        return TorchNativeDCPAttnBackend(runner)
    if backend_name == "flashinfer":
        from sglang_dcp.layers.attention.flashinfer_dcp_backend import (
            FlashInferDCPAttnBackend,
        )

        return FlashInferDCPAttnBackend(runner)
    raise ValueError(f"attention backend {backend_name!r} has no DCP implementation")


def create_dcp_draft_decode_backend(factory):
    """The draft's decode steps (``DraftBackendFactory.create_decode_backend``): none for a
    single step, which drafts from the draft extend's output alone."""
    if factory.speculative_num_steps <= 1:
        return None
    backend_name, runner = factory.server_args.attention_backend, factory.draft_model_runner
    return DCPMultiStepDraftBackend(
        lambda: create_dcp_attention_backend(backend_name, runner),
        factory.topk,
        factory.speculative_num_steps,
    )


def create_dcp_draft_extend_backend(factory):
    """The draft's extend (``DraftBackendFactory.create_draft_extend_backend``)."""
    return create_dcp_attention_backend(factory.server_args.attention_backend, factory.draft_model_runner)
