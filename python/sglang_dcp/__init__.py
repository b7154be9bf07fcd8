"""sglang-dcp: decode context parallelism for GQA models in SGLang, as a plugin.

SGLang loads ``register`` (entry point group ``sglang.srt.plugins``) in every process of every
installed release. The hooks are written against private names of one release, so under any
other this module stays out of the way: it reads the installed version from the package
metadata (no SGLang import), logs one warning line and registers nothing.
"""

import importlib.metadata
import logging
import os

__version__ = "0.1.0"

SUPPORTED_SGLANG = "0.5.14"
# Set by the first process that warns; its children (SGLang's schedulers load plugins again)
# inherit it and stay silent, so a server prints the warning once.
_WARNED_ENV = "SGLANG_DCP_UNSUPPORTED_SGLANG_WARNED"

logger = logging.getLogger(__name__)


def installed_sglang_version() -> str:
    """The installed ``sglang`` distribution's version, or ``"unknown"``."""
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def register() -> None:
    """The ``sglang.srt.plugins`` entry point: register the hooks under SGLang 0.5.14 only
    (``hooks`` imports SGLang's internals, so it is imported only then)."""
    version = installed_sglang_version()
    if version != SUPPORTED_SGLANG:
        if os.environ.get(_WARNED_ENV) != version:
            logger.warning(
                "sglang-dcp %s supports sglang==%s only, not the installed %s: not applied, "
                "SGLang runs as stock (any --dcp-size is SGLang's own)",
                __version__, SUPPORTED_SGLANG, version,
            )  # fmt: skip
            os.environ[_WARNED_ENV] = version
        return
    from sglang_dcp.hooks import register as register_hooks

    register_hooks()
