"""Under an SGLang release other than 0.5.14 the plugin stays out of the way (CPU, real install).

Makes a venv with ``sglang==VERSION`` (default 0.5.16, which shares torch 2.11 with 0.5.14;
several GB downloaded, ~9 GB on disk) in ``.runs/sglang-VERSION``, installs this repository
into it with ``--no-deps`` (its pin would put sglang 0.5.14 back), then, in that venv, on a
random float32 Llama (4 query heads, 1 KV head) at tp 2:

* ``load_plugins()`` in a fresh interpreter: the plugin's one warning line, no traceback, no
  hook in SGLang's ``HookRegistry``;
* ``python -m sglang.launch_server``: serves, one warning line for the whole server (its
  launcher and both schedulers load plugins), no traceback; ``--help`` shows SGLang's own
  ``--dcp-size`` and no ``--dcp-comm``;
* ``sglang.Engine``: the same, and the same greedy tokens as ``sglang.Engine`` with the plugin
  left out (``SGLANG_PLUGINS=none``): SGLang unchanged;
* ``--dcp-size 2``: parsed by SGLang's own ``ServerArgs``; ``launch_server --dcp-size 2`` ends in
  SGLang's own validation (0.5.16 runs its DCP on AMD HIP only), not in the plugin.

On CPU, SGLang 0.5.16 imports ``sgl_kernel`` when it builds its KV pool (for a CPU op of the
CPU ``sgl-kernel`` build, which is not on PyPI), and the PyPI ``sglang-kernel`` links
``libcuda.so.1``, which a machine without an NVIDIA driver lacks. The check compiles a stand-in
``libcuda.so.1`` into the venv (each driver function ``sgl_kernel`` names returns
``CUDA_ERROR_NO_DEVICE``; torch still sees no GPU) and puts it on ``LD_LIBRARY_PATH``: stock
SGLang 0.5.16 fails there without it, plugin or not.

Writes ``benchmark/dcp/results/other_release_VERSION.json``; exits 1 if a check failed. Not part
of ``make test`` (it downloads GBs)::

    python benchmark/dcp/other_release_check.py [--sglang-version 0.5.16]
"""

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TP_SIZE = 2
MAX_NEW_TOKENS = 16
WARNING_MARK = "sglang-dcp"  # the plugin's one line starts with it
PROMPTS = [[5, 6, 7, 8, 9], list(range(100, 160)), [3] * 40, list(range(900, 1000, 3))]

# In a fresh interpreter: SGLang's loader, then the hooks SGLang's HookRegistry holds (target ->
# the distributions that registered them; other plugins that the release ships may have some)
# and whether the plugin's hook table was imported.
LOAD_PLUGINS = """
import json, sys
from sglang.srt.plugins import load_plugins
from sglang.srt.plugins.hook_registry import HookRegistry
load_plugins()
hooks = {target: [source.dist_name if source else getattr(hook, "__module__", None)
                  for _, hook, source in registered] for target, registered in HookRegistry._hooks.items()}
print(json.dumps({"hooks": hooks, "hook_table_imported": "sglang_dcp.hooks" in sys.modules}))
"""

# SGLang's own argument parser on --dcp-size 2 and on the plugin's --dcp-comm.
PARSE_FLAGS = """
import argparse, contextlib, io, json, sys
from sglang.srt.plugins import load_plugins
load_plugins()
import sglang.srt.server_args as server_args
parser = argparse.ArgumentParser()
server_args.ServerArgs.add_cli_args(parser)
parsed = parser.parse_args(["--model-path", sys.argv[1], "--dcp-size", "2"])
err = io.StringIO()
with contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
    parser.parse_args(["--model-path", sys.argv[1], "--dcp-comm", "a2a"])
print(json.dumps({
    "server_args_class": f"{server_args.ServerArgs.__module__}.{server_args.ServerArgs.__qualname__}",
    "dcp_size": parsed.dcp_size, "has_dcp_comm": hasattr(parsed, "dcp_comm"),
    "dcp_comm_error": err.getvalue().strip().splitlines()[-1],
}))
"""

# sglang.Engine on the model; prints the greedy output ids.
ENGINE = """
import json, sys
import sglang

if __name__ == "__main__":
    engine = sglang.Engine(model_path=sys.argv[1], tp_size=%(tp)d, device="cpu",
                           attention_backend="torch_native", dtype="float32",
                           mem_fraction_static=0.3, max_total_tokens=2048, skip_tokenizer_init=True,
                           grammar_backend="none", random_seed=0)
    outs = engine.generate(input_ids=json.loads(sys.argv[2]),
                           sampling_params={"max_new_tokens": %(new)d, "temperature": 0})
    engine.shutdown()
    print("OUTPUT_IDS " + json.dumps([out["output_ids"] for out in outs]))
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sglang-version", default="0.5.16")
    parser.add_argument("--venv", help="default: .runs/sglang-VERSION in the repository")
    parser.add_argument("--out", help="default: benchmark/dcp/results/other_release_VERSION.json")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)  # the checks, in the venv
    return parser.parse_args(argv)


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def prepare_venv(version: str, venv: str) -> str:
    """The venv's python, with sglang==version and this repository (no dependencies) in it."""
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    installed = run([python, "-c", "import importlib.metadata as m; print(m.version('sglang'))"])
    if installed.stdout.strip() != version:
        print(f"installing sglang=={version} into {venv} (several GB)", flush=True)
        subprocess.run([python, "-m", "pip", "install", "-q", f"sglang=={version}"], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", REPO], check=True)
    return python


def stand_in_libcuda(venv: str, python: str) -> str:
    """A folder with a ``libcuda.so.1`` defining every driver function (``cu[A-Z]*``) that
    ``sgl_kernel``'s libraries import, each returning ``CUDA_ERROR_NO_DEVICE`` (100)."""
    folder = os.path.join(venv, "stand-in-libcuda")
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    names = set()
    for root, _, files in os.walk(os.path.join(site, "sgl_kernel")):
        for name in files:
            if name.endswith(".so"):
                symbols = run(["nm", "-D", "--undefined-only", os.path.join(root, name)]).stdout
                names.update(re.findall(r"\bU (cu[A-Z]\w*)$", symbols, re.MULTILINE))
    os.makedirs(folder, exist_ok=True)
    source = os.path.join(folder, "libcuda.c")
    with open(source, "w") as f:
        f.writelines(f"int {name}(void) {{ return 100; }}\n" for name in sorted(names))
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", os.path.join(folder, "libcuda.so.1"), source], check=True)
    return folder


def log_figures(text: str) -> dict:
    """What a run printed: the plugin's lines, tracebacks, SGLang's plugin-failure lines."""
    return {
        "plugin_lines": [line.strip() for line in text.splitlines() if WARNING_MARK in line],
        "tracebacks": text.count("Traceback (most recent call last)"),
        "plugin_failures": len(re.findall(r"Failed to (load|execute general) plugin", text)),
    }


def clean(figures: dict, version: str) -> bool:
    """Exactly one plugin line, the expected warning, and no traceback or plugin failure."""
    lines = figures["plugin_lines"]
    return (len(lines) == 1 and f"supports sglang==0.5.14 only, not the installed {version}" in lines[0]
            and figures["tracebacks"] == 0 and figures["plugin_failures"] == 0)


def check_load_plugins(version: str) -> dict:
    result = run([sys.executable, "-c", LOAD_PLUGINS])
    figures = log_figures(result.stderr)
    registry = json.loads(result.stdout.splitlines()[-1]) if result.returncode == 0 else None
    ours = registry and [target for target, dists in registry["hooks"].items()
                         if any(dist and dist.replace("_", "-").startswith("sglang-dcp") for dist in dists)]
    figures.update(registry=registry, plugin_hooks=ours, passed=clean(figures, version) and ours == []
                   and registry["hook_table_imported"] is False)
    return figures


def check_help() -> dict:
    text = run([sys.executable, "-m", "sglang.launch_server", "--help"], env=dict(os.environ, COLUMNS="200")).stdout
    dcp_lines = [line.strip() for line in text.splitlines() if "--dcp" in line or "decode context" in line.lower()]
    has_dcp_comm = "--dcp-comm" in text
    return {"dcp_lines": dcp_lines, "has_dcp_comm": has_dcp_comm,
            "passed": any("--dcp-size" in line for line in dcp_lines) and not has_dcp_comm}


def check_parse(model: str) -> dict:
    result = run([sys.executable, "-c", PARSE_FLAGS, model])
    figures = json.loads(result.stdout.splitlines()[-1]) if result.returncode == 0 else {"error": result.stderr[-2000:]}
    figures["passed"] = (figures.get("server_args_class") == "sglang.srt.server_args.ServerArgs"
                         and figures.get("dcp_size") == 2 and figures.get("has_dcp_comm") is False)
    return figures


def server_args(model: str, *extra: str) -> list:
    return ["--model-path", model, "--tp-size", str(TP_SIZE), "--device", "cpu", "--attention-backend",
            "torch_native", "--dtype", "float32", "--mem-fraction-static", "0.3", "--max-total-tokens", "2048",
            "--skip-tokenizer-init", "--grammar-backend", "none", "--random-seed", "0", *extra]


def check_launch_server(model: str, work: str, version: str) -> dict:
    from sglang_dcp.test.serving import Server, http_json

    log_path = os.path.join(work, "launch_server.log")
    with Server(server_args(model), 31501, log_path) as server:
        outputs = []
        for input_ids in PROMPTS:
            body = {"input_ids": input_ids, "sampling_params": {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0}}
            status, out = http_json(server.url + "/generate", body)
            outputs.append(out["output_ids"] if status == 200 else None)
    with open(log_path) as f:
        figures = log_figures(f.read())
    figures.update(output_ids=outputs, passed=clean(figures, version) and None not in outputs)
    return figures


def check_engine(model: str, work: str, version: str, plugins: str = "") -> dict:
    script = os.path.join(work, "engine_check.py")
    with open(script, "w") as f:
        f.write(textwrap.dedent(ENGINE % {"tp": TP_SIZE, "new": MAX_NEW_TOKENS}))
    env = dict(os.environ, SGLANG_PLUGINS=plugins) if plugins else None
    result = run([sys.executable, script, model, json.dumps(PROMPTS)], env=env, timeout=900)
    figures = log_figures(result.stdout + result.stderr)
    marked = [line for line in result.stdout.splitlines() if line.startswith("OUTPUT_IDS ")]
    figures["output_ids"] = json.loads(marked[-1].split(" ", 1)[1]) if marked else None
    expected_lines = 0 if plugins else 1
    figures["passed"] = (figures["output_ids"] is not None and figures["tracebacks"] == 0
                         and (clean(figures, version) if expected_lines else not figures["plugin_lines"]))
    return figures


def check_upstream_dcp(model: str, work: str) -> dict:
    """launch_server --dcp-size 2: SGLang's own validation decides, the plugin is not involved."""
    result = run([sys.executable, "-m", "sglang.launch_server", *server_args(model, "--dcp-size", "2"),
                  "--port", "31502"], timeout=600)
    text = result.stdout + result.stderr
    with open(os.path.join(work, "upstream_dcp.log"), "w") as f:
        f.write(text)
    last = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")
    frames = re.findall(r'File "([^"]+)", line \d+', text)
    figures = {
        "returncode": result.returncode, "last_line": last,
        "raised_in": frames[-1].split("site-packages/")[-1] if frames else None,
        "plugin_in_traceback": any("sglang_dcp" in frame for frame in frames),
        "plugin_lines": log_figures(text)["plugin_lines"],
    }
    figures["passed"] = (figures["raised_in"] == "sglang/srt/server_args.py"
                         and not figures["plugin_in_traceback"] and "dcp" in last.lower())
    return figures


def run_checks(version: str, out: str) -> bool:
    """In the venv: every check, the result JSON; True if all passed."""
    from sglang_dcp.test.cpu_env import use_cpu_env
    from sglang_dcp.test.models import write_random_gqa_model
    from sglang_dcp.test.serving import bind_cpu_threads

    use_cpu_env()
    bind_cpu_threads(TP_SIZE)
    os.environ.pop("SGLANG_DCP_UNSUPPORTED_SGLANG_WARNED", None)
    work = tempfile.mkdtemp(prefix="other_release_")
    model = write_random_gqa_model(os.path.join(work, "model"), architecture="LlamaForCausalLM",
                                   num_attention_heads=4, num_key_value_heads=1, vocab_size=1024)
    checks = {}
    for name, check in [
        ("load_plugins", lambda: check_load_plugins(version)),
        ("launch_server_help", check_help),
        ("parse_dcp_size", lambda: check_parse(model)),
        ("launch_server", lambda: check_launch_server(model, work, version)),
        ("engine", lambda: check_engine(model, work, version)),
        ("engine_without_plugin", lambda: check_engine(model, work, version, plugins="none")),
        ("launch_server_dcp_size_2", lambda: check_upstream_dcp(model, work)),
    ]:
        print(f"{name} ...", flush=True)
        checks[name] = check()
        print(f"  {json.dumps(checks[name])[:400]}", flush=True)
    tokens = [checks[name].get("output_ids") for name in ("launch_server", "engine", "engine_without_plugin")]
    checks["same_tokens_with_and_without_plugin"] = {"passed": tokens[0] is not None and tokens.count(tokens[0]) == 3}
    commit = run(["git", "-C", REPO, "describe", "--always", "--dirty", "--abbrev=7"]).stdout.strip()
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "sglang_version": version, "plugin_commit": commit, "device": "cpu", "tp_size": TP_SIZE,
        "model": "random float32 Llama, 4 query heads, 1 KV head, 2 layers", "work_dir": work,
        "stand_in_libcuda": os.environ.get("LD_LIBRARY_PATH", "").split(":")[0],
        "checks": checks, "passed": all(check["passed"] for check in checks.values()),
    }  # fmt: skip
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'PASSED' if result['passed'] else 'FAILED'}: " + ", ".join(
        f"{name} {'ok' if check['passed'] else 'FAILED'}" for name, check in checks.items()) + f"; {out}")
    return result["passed"]


def main(argv=None) -> int:
    args = parse_args(argv)
    version = args.sglang_version
    out = os.path.abspath(args.out or os.path.join(REPO, "benchmark", "dcp", "results", f"other_release_{version}.json"))
    if args.inside:
        return 0 if run_checks(version, out) else 1
    venv = os.path.abspath(args.venv or os.path.join(REPO, ".runs", f"sglang-{version}"))
    python = prepare_venv(version, venv)
    libcuda = stand_in_libcuda(venv, python)
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(filter(None, [libcuda, os.environ.get("LD_LIBRARY_PATH")])))
    return subprocess.run([python, os.path.abspath(__file__), "--inside", "--sglang-version", version,
                           "--out", out], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
