"""Small helpers of the benchmark scripts beside this file (they import it by name)."""

import sys
from datetime import datetime, timezone
from typing import List


def int_list(text: str) -> List[int]:
    """``"1,8,32"`` -> ``[1, 8, 32]``."""
    return [int(x) for x in text.split(",") if x]


def utc_now() -> str:
    """When a result was measured, e.g. ``2026-11-28T03:24:39+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend.

    The offline SGLang bundle of the GPU machine ships a stub ``IPython`` without
    ``version_info``, which matplotlib reads while creating any figure once IPython is
    imported (sglang imports it); the stub is dropped from ``sys.modules`` first.
    """
    ipython = sys.modules.get("IPython")
    if ipython is not None and not hasattr(ipython, "version_info"):
        del sys.modules["IPython"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
