"""``ServerArgs`` with ``--dcp-size``: the flag, its validation and the defaults it implies.

Installed over ``sglang.srt.server_args.ServerArgs`` (see ``hooks``), so the flag appears
in ``python -m sglang.launch_server --help`` and ``sglang.Engine(dcp_size=...)`` works.
With ``dcp_size == 1`` nothing changes. With ``D > 1`` every check runs in the launching
process, before any model weight loads, and fails with one line that says what to change.
After validation ``page_size`` becomes the *logical* page ``P * D`` that the allocator,
radix cache and scheduler use; the physical KV pool keeps ``P = page_size // D``.
"""

import dataclasses
import logging
import os
from typing import Optional

import sglang.srt.server_args as sglang_server_args
from sglang.srt.arg_groups.arg_utils import A, Arg
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.model_executor.cuda_graph_config import Backend
from sglang.srt.utils import get_device

from sglang_dcp.hicache import hicache_refusal
from sglang_dcp.speculative import (
    DRAFT_MODEL_ALGORITHMS,
    speculative_graph_refusal,
    speculative_refusal,
)

logger = logging.getLogger(__name__)

# The attention backend that runs DCP on each device.
DCP_ATTENTION_BACKENDS = {"cuda": "flashinfer", "cpu": "torch_native"}
# SGLang 0.5.14 models whose attention layers call the backend with k=None, reading the new
# tokens' K/V from another layer's cache (at logical slots, which DCP does not store).
READS_ANOTHER_LAYERS_KV = {"IQuestLoopCoderForCausalLM"}
# --dcp-comm: all-to-all of the partials (the reference), or LSE all-gather (group heads).
DCP_COMM_CHOICES = ("a2a", "lse")


class DCPConfigError(ValueError):
    """A setting that DCP cannot run with; the message says what to change."""


@dataclasses.dataclass
class DCPServerArgs(sglang_server_args.ServerArgs):
    dcp_size: A[
        int,
        Arg(
            help="Decode context parallel size D: the D consecutive TP ranks that hold "
            "the same KV head split each sequence's KV cache between them (token slot loc "
            "on rank loc %% D), multiplying KV capacity by D. Needs (tp / num_kv_heads) %% D "
            "== 0 and the flashinfer attention backend (torch_native on CPU).",
            aliases=["--dcp", "--decode-context-parallel-size"],
        ),
    ] = 1
    # The physical page P once page_size holds the logical P * D: a second __post_init__
    # (e.g. ServerArgs(**dataclasses.asdict(args))) starts again from P.
    dcp_physical_page_size: A[Optional[int], Arg(no_cli=True)] = None
    dcp_comm: A[
        str,
        Arg(
            help="How a DCP group combines its partial attention. a2a: all-gather Q, one "
            "all-to-all of the partial outputs, merge (default until measured on 2 GPUs). "
            "lse: every rank computes the query heads of its whole group (the group's q_proj "
            "rows and o_proj columns, taken once at load), all-gathers only the LSEs and "
            "scales its partials before o_proj; falls back to a2a for models it does not "
            "cover. Ignored with --dcp-size 1.",
            choices=list(DCP_COMM_CHOICES),
        ),
    ] = "a2a"

    def __post_init__(self):
        if self.dcp_comm not in DCP_COMM_CHOICES:
            raise DCPConfigError(
                f"--dcp-comm must be one of {', '.join(DCP_COMM_CHOICES)}, got {self.dcp_comm!r}."
            )
        if self.dcp_size == 1:
            return super().__post_init__()
        from sglang_dcp.hooks import require_hooks_applied

        first_resolution = self.dcp_physical_page_size is None
        if not first_resolution:
            self.page_size = self.dcp_physical_page_size
        self._check_dcp_flags()
        require_hooks_applied()
        self._set_dcp_defaults()
        # Before SGLang's own model-specific checks, which would otherwise reject a model
        # for the backend DCP chose rather than for what DCP cannot run.
        self._check_dcp_model()
        super().__post_init__()
        self._check_dcp_resolved_args()
        self._set_logical_page()
        if first_resolution:
            self._warn_if_groups_span_nodes()

    def _set_logical_page(self):
        """``page_size`` becomes the logical page ``P * D``; a chunk holds whole logical pages."""
        self.dcp_physical_page_size = self.page_size
        self.page_size *= self.dcp_size
        chunk = self.chunked_prefill_size
        if 0 < chunk < self.page_size:
            raise DCPConfigError(
                f"--chunked-prefill-size {chunk} is smaller than the logical page "
                f"{self.page_size} (page size x dcp); set it to a multiple of {self.page_size}."
            )
        if chunk > 0 and chunk % self.page_size:
            self.chunked_prefill_size = chunk - chunk % self.page_size
            logger.warning(
                "DCP: chunked prefill size %d -> %d, a multiple of the logical page %d "
                "(page size %d x dcp %d)",
                chunk,
                self.chunked_prefill_size,
                self.page_size,
                self.dcp_physical_page_size,
                self.dcp_size,
            )
        logger.info(
            "DCP: dcp_size=%d, dcp_comm=%s, physical page %d, logical page %d",
            self.dcp_size,
            self.dcp_comm,
            self.dcp_physical_page_size,
            self.page_size,
        )

    def _check_dcp_flags(self):
        d = self.dcp_size
        if not isinstance(d, int) or d < 1:
            raise DCPConfigError(f"--dcp-size must be an integer >= 1, got {d!r}.")
        if self.tp_size % d != 0:
            raise DCPConfigError(
                f"--dcp-size {d} must divide --tp-size {self.tp_size}; choose a dcp size "
                f"that divides the TP size."
            )
        unsupported = {
            "--enable-dp-attention": self.enable_dp_attention,
            "--pp-size > 1": self.pp_size > 1,
            "--enable-lmcache": self.enable_lmcache,
            "--enable-hisparse": self.enable_hisparse,
            "--disaggregation-mode": self.disaggregation_mode != "null",
            "--attn-cp-size > 1": self.attn_cp_size > 1,
            "--enable-prefill-cp": self.enable_prefill_cp,
            "--enable-two-batch-overlap": self.enable_two_batch_overlap,
            "--enable-pdmux": self.enable_pdmux,
            "--enable-deterministic-inference": self.enable_deterministic_inference,
            # Attention variants the DCP backends do not implement
            "--enable-mis": self.enable_mis,
            "--dllm-algorithm": self.dllm_algorithm is not None,
            # The canary reads and writes KV pools at logical slots; DCP stores row loc // D
            "--kv-canary": self.kv_canary != "none",
            # Never run with DCP's collectives and per-pass KV write rows
            "--enable-torch-compile": self.enable_torch_compile,
            "--debug-cuda-graph": self.debug_cuda_graph,
        }
        refused = [flag for flag, is_set in unsupported.items() if is_set]
        refused.append(speculative_refusal(self))
        refused.append(hicache_refusal(self))
        for flag in refused:
            if flag is not None:
                raise DCPConfigError(
                    f"{flag} is not supported with --dcp-size {d}; remove it or use --dcp-size 1."
                )
        if self.dcp_comm == "lse" and self.enable_memory_saver:
            # lse gathers the group's q_proj rows / o_proj columns after load, outside the
            # memory saver's weights region: released memory would keep them, without backup.
            raise DCPConfigError(
                "--enable-memory-saver is not supported with --dcp-comm lse; use --dcp-comm "
                "a2a or remove --enable-memory-saver."
            )

    def _warn_if_groups_span_nodes(self):
        """One warning where a DCP group spans nodes of SGLang's multi-node launch.

        With ``--nnodes N`` and pp 1 (DCP requires it), SGLang's ``_calculate_rank_ranges``
        (``entrypoints/engine.py``) runs TP ranks ``[r * tp / N, (r + 1) * tp / N)`` on node
        ``r``; DCP group ``g`` is TP ranks ``[g * D, (g + 1) * D)``. Every group stays inside
        a node iff ``D`` divides ``tp / N``; otherwise the node boundary ``tp / N`` falls
        inside a group.
        """
        nnodes, tp, d = self.nnodes, self.tp_size, self.dcp_size
        if nnodes == 1 or tp % nnodes:  # SGLang's check_server_args refuses the latter
            return
        ranks_per_node = tp // nnodes
        if ranks_per_node % d:
            logger.warning(
                "DCP: --dcp-size %d groups span nodes (--tp-size %d over --nnodes %d is %d TP "
                "ranks a node): their decode collectives cross the network at every layer; a "
                "--dcp-size that divides %d keeps each group inside a node",
                d, tp, nnodes, ranks_per_node, ranks_per_node,
            )  # fmt: skip

    def _set_dcp_defaults(self):
        device = (self.device or get_device()).split(":")[0]
        backend = DCP_ATTENTION_BACKENDS.get(device)
        if backend is None:
            raise DCPConfigError(
                f"--dcp-size {self.dcp_size} runs on CUDA (flashinfer) or CPU "
                f"(torch_native), not on device {device!r}."
            )
        self._check_attention_backends(backend)
        self.attention_backend = backend
        # Captured prefill graphs take FlashInfer's paged-only extend path; DCP needs the
        # ragged + sharded-prefix path, so prefill runs eagerly (decode graphs stay on).
        self.disable_prefill_cuda_graph = True
        os.environ.setdefault("NCCL_GRAPH_MIXING_SUPPORT", "0")

    def _check_attention_backends(self, backend: str):
        """Every attention-backend setting is unset or ``backend``, DCP's on this device."""
        for name in ("attention_backend", "prefill_attention_backend", "decode_attention_backend",
                     "speculative_draft_attention_backend"):
            value = getattr(self, name)
            if value not in (None, backend):
                raise DCPConfigError(
                    f"--{name.replace('_', '-')} {value} has no DCP support; use "
                    f"--attention-backend {backend} with --dcp-size {self.dcp_size}."
                )

    def _check_dcp_resolved_args(self):
        d = self.dcp_size
        if self.cuda_graph_config.prefill.backend != Backend.DISABLED:
            raise DCPConfigError(
                f"--dcp-size {d} runs prefill without CUDA graphs; drop the prefill CUDA-graph "
                f"backend from --cuda-graph-backend-prefill / --cuda-graph-config."
            )
        decode_backend = self.cuda_graph_config.decode.backend
        if decode_backend not in (Backend.FULL, Backend.DISABLED):
            raise DCPConfigError(
                f"--dcp-size {d} captures decode CUDA graphs whole (full) or not at all, not "
                f"{decode_backend}; drop --cuda-graph-backend-decode {decode_backend}."
            )
        # SGLang's own defaults may set a per-phase backend (e.g. prefill for some models).
        self._check_attention_backends(DCP_ATTENTION_BACKENDS[self.device])
        # SGLang resolves algorithm aliases on the draft model (EAGLE or NEXTN with a Gemma4
        # assistant draft becomes FROZEN_KV_MTP): check the algorithm it will run.
        refused = speculative_refusal(self)
        if refused is not None:
            raise DCPConfigError(
                f"{refused}, as SGLang resolved it for this draft model, is not supported with "
                f"--dcp-size {d}; use another draft model or --dcp-size 1."
            )
        refused = speculative_graph_refusal(self)
        if refused is not None:
            raise DCPConfigError(f"--dcp-size {d} runs speculative decoding eagerly: no {refused}.")

    def _check_dcp_model(self):
        self._check_model_config(ModelConfig.from_server_args(self), "this model")
        draft_path = self.speculative_draft_model_path
        if draft_path is not None and self.speculative_algorithm.upper() in DRAFT_MODEL_ALGORITHMS:
            # The draft's KV is striped like the target's (sglang_dcp.speculative)
            draft_config = ModelConfig.from_server_args(
                self, model_path=draft_path, model_revision=self.speculative_draft_model_revision,
                is_draft_model=True,
            )
            self._check_model_config(draft_config, "the draft model")

    def _check_model_config(self, model_config, which: str):
        d = self.dcp_size
        if model_config.attention_arch.name != "MHA":
            raise DCPConfigError(
                f"--dcp-size {d} supports MHA/GQA models; {which} uses "
                f"{model_config.attention_arch.name} attention. Use --dcp-size 1."
            )
        hybrid = hybrid_attention_reason(model_config)
        if hybrid:
            raise DCPConfigError(
                f"--dcp-size {d} supports full-attention models only; {which} {hybrid}. "
                f"Use --dcp-size 1."
            )
        if model_config.is_multimodal:
            raise DCPConfigError(
                f"--dcp-size {d} does not support multimodal models; use --dcp-size 1."
            )
        if not model_config.is_generation:
            raise DCPConfigError(
                f"--dcp-size {d} splits the KV cache that decoding reads; {which} is an "
                f"embedding / classification model, which does not decode. Use --dcp-size 1."
            )
        reads_shared_kv = READS_ANOTHER_LAYERS_KV & set(model_config.hf_config.architectures)
        if reads_shared_kv:
            raise DCPConfigError(
                f"--dcp-size {d} does not support {sorted(reads_shared_kv)[0]}: its layers read "
                f"another layer's KV cache (k=None). Use --dcp-size 1."
            )
        num_kv_heads = model_config.get_total_num_kv_heads()
        tp = self.tp_size
        if model_config.num_attention_heads % tp != 0:
            raise DCPConfigError(
                f"--dcp-size {d} needs num_attention_heads ({model_config.num_attention_heads}) "
                f"of {which} divisible by --tp-size {tp}; choose a tp size that divides it."
            )
        if tp % (num_kv_heads * d) != 0:
            raise DCPConfigError(
                f"--dcp-size {d} needs every KV head of {which} replicated on a multiple of {d} "
                f"TP ranks ((tp / num_kv_heads) % dcp == 0): --tp-size must be a multiple of "
                f"num_kv_heads * dcp = {num_kv_heads * d}, got {tp}."
            )


def hybrid_attention_reason(model_config) -> str:
    """Why a model is not plain full attention (sliding window, linear/Mamba layers), or ''."""
    if model_config.is_hybrid_swa:
        return "mixes sliding-window and full-attention layers"
    text_config = model_config.hf_text_config
    layer_types = set(getattr(text_config, "layer_types", None) or ["full_attention"])
    if layer_types - {"full_attention", "attention"}:
        return f"has {sorted(layer_types)} layers"
    if getattr(text_config, "sliding_window", None) and getattr(
        text_config, "use_sliding_window", True
    ):
        return "uses sliding-window attention"
    state_space = [
        name
        for name in vars(text_config)
        if name.startswith(("mamba", "linear_", "ssm_")) or name == "hybrid_override_pattern"
    ]
    if state_space:
        return f"has linear-attention/Mamba layers ({state_space[0]})"
    return ""
