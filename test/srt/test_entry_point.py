"""The ``sglang.srt.plugins`` entry point under SGLang releases other than 0.5.14.

SGLang loads the plugin in every process of any installed release; under another one it must
log one warning line naming the supported version, register no hook and import nothing of
SGLang (``benchmark/dcp/other_release_check.py`` runs a real SGLang 0.5.16). The installed
version is faked here through ``importlib.metadata``, which is where the plugin reads it.
"""

import json
import logging
import os
import re
import subprocess
import sys
import textwrap

import sglang_dcp

# Loads the plugin the way SGLang does (its entry point), under a faked sglang version, and
# prints what it logged and which modules of SGLang or of the plugin's hooks it imported.
LOAD_UNDER_VERSION = textwrap.dedent("""
    import importlib.metadata, json, logging, sys
    real_version = importlib.metadata.version
    importlib.metadata.version = lambda name: sys.argv[1] if name == "sglang" else real_version(name)
    records = []
    logging.getLogger().addHandler(logging.Handler())
    logging.getLogger().handlers[-1].emit = lambda record: records.append(record.getMessage())
    (dcp,) = [ep for ep in importlib.metadata.entry_points(group="sglang.srt.plugins") if ep.name == "dcp"]
    dcp.load()()
    imported = sorted(m for m in sys.modules if m.split(".")[0] == "sglang" or m == "sglang_dcp.hooks")
    print(json.dumps({"logged": records, "imported": imported}))
""")


def load_under_version(version: str, **env) -> dict:
    result = subprocess.run([sys.executable, "-c", LOAD_UNDER_VERSION, version], capture_output=True,
                            text=True, timeout=120, env={**os.environ, **env})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_other_release_warns_once_and_imports_no_sglang():
    env = {"SGLANG_DCP_UNSUPPORTED_SGLANG_WARNED": ""}
    loaded = load_under_version("0.5.16", **env)
    assert loaded == {"imported": [], "logged": [
        f"sglang-dcp {sglang_dcp.__version__} supports sglang==0.5.14 only, not the installed "
        "0.5.16: not applied, SGLang runs as stock (any --dcp-size is SGLang's own)"
    ]}  # fmt: skip
    # A child process of one that warned (SGLang's schedulers load plugins again) stays silent
    assert load_under_version("0.5.16", SGLANG_DCP_UNSUPPORTED_SGLANG_WARNED="0.5.16")["logged"] == []


def test_supported_release_registers_the_hooks():
    loaded = load_under_version("0.5.14", SGLANG_DCP_UNSUPPORTED_SGLANG_WARNED="")
    assert loaded["logged"] == [] and "sglang_dcp.hooks" in loaded["imported"]


def test_register_calls_the_hook_table_only_under_0_5_14(monkeypatch, caplog):
    import sglang_dcp.hooks

    calls = []
    monkeypatch.setattr(sglang_dcp.hooks, "register", lambda: calls.append(1))
    monkeypatch.delenv("SGLANG_DCP_UNSUPPORTED_SGLANG_WARNED", raising=False)
    for version in ("0.5.14", "0.5.23", "0.5.14.post1", "unknown"):
        monkeypatch.setattr(sglang_dcp, "installed_sglang_version", lambda: version)
        with caplog.at_level(logging.WARNING, logger="sglang_dcp"):
            sglang_dcp.register()
    assert calls == [1]
    named = [re.search(r"not the installed (\S+): not applied", r.getMessage()) for r in caplog.records]
    assert [match and match.group(1) for match in named] == ["0.5.23", "0.5.14.post1", "unknown"]
