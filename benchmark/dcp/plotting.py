"""matplotlib for the benchmarks (imported by the scripts beside this file)."""

import sys


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
