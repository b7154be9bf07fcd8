"""sglang-dcp: decode context parallelism for GQA models in SGLang, as a plugin."""

__version__ = "0.1.0"


def register() -> None:
    """The ``sglang.srt.plugins`` entry point (imports SGLang only when it is called)."""
    from sglang_dcp.hooks import register as register_hooks

    register_hooks()
