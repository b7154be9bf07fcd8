"""Which DCP attention backend replaces which SGLang backend when ``dcp_size > 1``."""


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
