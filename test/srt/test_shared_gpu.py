"""The shared-GPU test mode (``SGLANG_DCP_SHARED_GPU=1``, ``sglang_dcp.test.shared_gpu``) on CPU.

The mode itself runs on a GPU (``gpu_check.sh`` picks it where a stage needs more GPUs than
the machine has); here: it is off unless the variable is ``1``, its hooks apply to SGLang
0.5.14 and are checked like the product's, it refuses what it cannot run in one line before
any scheduler starts, and its pieces do what they say. The plugin loads in a fresh process
per case, since SGLang applies hooks once per process.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from sglang_dcp.hooks import HOOKS, active_hooks
from sglang_dcp.test.models import write_dummy_gqa_model
from sglang_dcp.test.shared_gpu import HOOKS as SHARED_GPU_HOOKS
from sglang_dcp.test.shared_gpu import kv_budget_bytes

# Loads the plugins as SGLang's entry points do, then runs ARGV through SGLang's parser and
# the launching process's check; prints JSON.
PROBE = textwrap.dedent("""
    import json, sys
    from sglang.srt.plugins import load_plugins
    from sglang.srt.plugins.hook_registry import HookRegistry
    load_plugins()
    from sglang.srt.server_args import prepare_server_args
    from sglang_dcp.hooks import active_hooks, require_hooks_applied
    from sglang.srt.distributed import parallel_state
    require_hooks_applied()
    result = {"hooks": [h.target for h in active_hooks()], "backend": parallel_state.get_default_distributed_backend("cuda")}
    try:
        prepare_server_args(sys.argv[1:]).check_server_args()
        result["check"] = "ok"
    except Exception as e:
        result["check"] = f"{type(e).__name__}: {e}"
    print("RESULT " + json.dumps(result))
""")


def probe(env_value, argv):
    env = {k: v for k, v in os.environ.items() if k != "SGLANG_DCP_SHARED_GPU"}
    if env_value is not None:
        env["SGLANG_DCP_SHARED_GPU"] = env_value
    result = subprocess.run([sys.executable, "-c", PROBE, *argv], env=env,
                            capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, result.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_dummy_gqa_model(str(tmp_path_factory.mktemp("gqa1")), num_attention_heads=8,
                                 num_key_value_heads=1)


def test_off_unless_set(monkeypatch):
    monkeypatch.delenv("SGLANG_DCP_SHARED_GPU", raising=False)
    assert active_hooks() == HOOKS
    monkeypatch.setenv("SGLANG_DCP_SHARED_GPU", "0")
    assert active_hooks() == HOOKS


@pytest.mark.parametrize("env_value", [None, "1"], ids=["unset", "shared"])
def test_hooks_apply_and_gloo(model, env_value):
    result = probe(env_value, ["--model-path", model, "--device", "cuda", "--tp", "2", "--dcp", "2",
                               "--disable-cuda-graph", "--load-format", "dummy"])
    product = [h.target for h in HOOKS]
    assert result["check"] == "ok"
    if env_value == "1":  # and require_hooks_applied passed for both tables
        assert result["hooks"] == product + [h.target for h in SHARED_GPU_HOOKS]
        assert result["backend"] == "gloo"
    else:
        assert result["hooks"] == product
        assert result["backend"] == "nccl"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--device", "cuda", "--tp", "2", "--dcp", "2"],
         "SGLANG_DCP_SHARED_GPU=1 runs collectives on gloo, which CUDA graphs cannot capture; pass "
         "--disable-cuda-graph (disable_cuda_graph=True)."),
        (["--device", "cuda", "--tp", "2"], "CUDA graphs cannot capture"),
        (["--device", "cpu", "--tp", "2", "--disable-cuda-graph"],
         "SGLANG_DCP_SHARED_GPU=1 shares one CUDA device between ranks; unset it for --device cpu."),
    ],
    ids=["dcp2-graphs", "dcp1-graphs", "cpu"],
)
def test_refusals(model, argv, message):
    result = probe("1", ["--model-path", model, "--load-format", "dummy", *argv])
    assert result["check"].startswith("DCPConfigError: ")
    assert message in result["check"] and "\n" not in result["check"]


def test_kv_budget_is_a_share_of_the_engine_fraction():
    gib = 1 << 30
    # 0.6 of 140 GiB between 4 ranks, each holding 1 GiB of weights
    assert kv_budget_bytes(0.6, 140 * gib, 4, gib) == int(0.6 * 140 / 4 * gib) - gib
    # four such engines at 0.2 each fit in one device: 4 x 4 x (0.2 x 140 / 4) = 112 GiB
    assert 4 * 4 * (kv_budget_bytes(0.2, 140 * gib, 4, 0)) < 140 * gib


def test_groups_get_no_device_communicators():
    from sglang_dcp.test.shared_gpu import gloo_for_cuda, group_without_device_communicators

    seen = {}
    group_without_device_communicators(lambda *a, **k: seen.update(args=a, kwargs=k),
                                       [[0, 1]], 0, "gloo", use_pynccl=True, group_name="tp")
    assert seen["args"] == ([[0, 1]], 0, "gloo")
    assert seen["kwargs"] == dict(use_pynccl=False, use_custom_allreduce=False, use_mscclpp_allreduce=False,
                                  use_torch_symm_mem_allreduce=False, group_name="tp")
    assert gloo_for_cuda(lambda device: "nccl", "cuda") == "gloo"
    assert gloo_for_cuda(lambda device: "hccl", "npu") == "hccl"
