"""FlashInfer kernels compiled ahead of a GPU session, so that a fresh GPU machine does not spend
its first ~9 minutes compiling them (measured on 1x H100, 2026-12-07: 5.5 min before the first
engine, ~4 min more before the first speculative one).

FlashInfer 0.6.12 loads a module from its AOT folder (``flashinfer/data/aot/<name>/<name>.so``)
before it would JIT-compile it, by the module's name alone. ``build`` compiles the modules that
the GPU checks use (batch decode, fa2 and fa3 batch prefill, for bf16 and each head dim; the
sampling module) with this machine's ``nvcc`` for one architecture (default ``9.0a``: H100,
H200) and copies each ``.so`` to ``--out``; it needs no GPU. The link step wants a CUDA home with
``lib64/libcudart.so`` and ``lib64/stubs/libcuda.so``: ``--cuda-home`` (default: one built in
the temporary folder from ``/usr/local/cuda``, with an empty ``libcuda.so.1`` stub, the GPU
machine's driver providing the real one, and the headers of ``--extra-include``: cuRAND's,
which fa3 and sampling include, from the ``nvidia-curand`` wheel's ``nvidia/cu13/include``).
``install`` (on the GPU machine, after ``gpu_check.sh install``) copies them into the installed
FlashInfer's AOT folder and loads each once, removing any that fails to load, so that FlashInfer
compiles that one itself::

    pip download --no-deps -d /tmp/curand "nvidia-curand>=10.4,<10.5" && unzip -q /tmp/curand/*.whl -d /tmp/curand
    python benchmark/dcp/flashinfer_prebuild.py build --extra-include /tmp/curand/nvidia/cu13/include  # here
    python3 benchmark/dcp/flashinfer_prebuild.py install --src .carry/flashinfer-aot   # GPU machine
"""

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from typing import Dict


def module_specs(head_dims) -> Dict[str, object]:
    """The JIT specs of the modules the GPU checks load, by a short label."""
    import torch
    from flashinfer.jit.attention.modules import gen_batch_decode_module, gen_batch_prefill_module
    from flashinfer.jit.sampling import gen_sampling_module

    bf16, i32 = torch.bfloat16, torch.int32
    specs = {"sampling": gen_sampling_module()}
    for d in head_dims:
        specs[f"decode-d{d}"] = gen_batch_decode_module(bf16, bf16, bf16, i32, d, d, 0, False, False)
        for backend in ("fa2", "fa3"):
            specs[f"prefill-{backend}-d{d}"] = gen_batch_prefill_module(
                backend, bf16, bf16, bf16, i32, d, d, 0, False, False, False)
    return specs


def link_each(src_dir: str, dst_dir: str) -> None:
    os.makedirs(dst_dir, exist_ok=True)
    for name in os.listdir(src_dir):
        if not os.path.lexists(os.path.join(dst_dir, name)):
            os.symlink(os.path.join(src_dir, name), os.path.join(dst_dir, name))


def stub_cuda_home(root: str, extra_include) -> str:
    """A CUDA home for linking without a driver: /usr/local/cuda's bin, headers (and those of
    ``extra_include``) and lib64, and an empty ``libcuda.so`` (soname ``libcuda.so.1``) under
    lib64/stubs."""
    home = os.path.join(root, "flashinfer-prebuild-cuda-home")
    if not os.path.lexists(os.path.join(home, "bin")):
        os.makedirs(home, exist_ok=True)
        os.symlink("/usr/local/cuda/bin", os.path.join(home, "bin"))
    for src in ["/usr/local/cuda/include"] + ([extra_include] if extra_include else []):
        link_each(os.path.abspath(src), os.path.join(home, "include"))
    link_each("/usr/local/cuda/lib64", os.path.join(home, "lib64"))
    os.makedirs(os.path.join(home, "lib64", "stubs"), exist_ok=True)
    stub = os.path.join(home, "lib64", "stubs", "libcuda.so")
    if not os.path.exists(stub):
        subprocess.run(["gcc", "-shared", "-x", "c", "-", "-Wl,-soname,libcuda.so.1", "-o", stub],
                       input=b"", check=True)
    return home


def build(args) -> None:
    os.environ.setdefault("FLASHINFER_CUDA_ARCH_LIST", args.arch)
    os.environ.setdefault("CUDA_HOME", args.cuda_home or stub_cuda_home(tempfile.gettempdir(), args.extra_include))
    for label, spec in module_specs(args.head_dims).items():
        target = os.path.join(args.out, spec.name, f"{spec.name}.so")
        if os.path.exists(target):
            print(f"{label:16} kept   {os.path.getsize(target):>9} B  {spec.name}", flush=True)
            continue
        start = time.time()
        spec.build(verbose=False)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy(spec.jit_library_path, target)
        print(f"{label:16} {time.time() - start:5.0f} s {os.path.getsize(target):>9} B  {spec.name}", flush=True)


def install(args) -> None:
    import tvm_ffi
    from flashinfer.jit.env import FLASHINFER_AOT_DIR

    for name in sorted(os.listdir(args.src)):
        target = os.path.join(FLASHINFER_AOT_DIR, name, f"{name}.so")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy(os.path.join(args.src, name, f"{name}.so"), target)
        try:
            tvm_ffi.load_module(target)
            print(f"prebuilt {name}: loads", flush=True)
        except Exception as e:  # FlashInfer compiles this one itself
            shutil.rmtree(os.path.dirname(target))
            print(f"prebuilt {name}: removed, it does not load here ({type(e).__name__}: {e})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile the modules here (nvcc, no GPU)")
    b.add_argument("--out", default=".carry/flashinfer-aot")
    b.add_argument("--arch", default="9.0a", help="FLASHINFER_CUDA_ARCH_LIST")
    b.add_argument("--head-dims", type=lambda s: [int(x) for x in s.split(",")], default=[128, 64],
                   help="the GPU checks' models use 128, SmolLM2 64")
    b.add_argument("--cuda-home", help="a CUDA home with lib64/libcudart.so and lib64/stubs/libcuda.so")
    b.add_argument("--extra-include", help="more headers for the default CUDA home (cuRAND's)")
    i = sub.add_parser("install", help="into the installed FlashInfer's AOT folder (GPU machine)")
    i.add_argument("--src", default=".carry/flashinfer-aot")
    args = parser.parse_args()
    if args.command == "build":
        build(args)
    else:
        install(args)


if __name__ == "__main__":
    main()
