"""The Mamba baseline: transformers' MambaForCausalLM with the official parameterisation.

The model is the library's, not a re-implementation; what this module adds is
- the official mamba-ssm initialisation where transformers' defaults differ from it,
- kernel selection (config["mamba"]["kernel"]): mamba-ssm's CUDA kernels where they can run,
  otherwise our chunked O(N) selective scan (fairlm.ops.selective_scan) computed from each
  mixer's own weights, or, on request, transformers' mambapy or sequential paths,
- a record of which kernel actually ran (kernel_description), for system.json,
- optional sizing of expand (else d_model) to match ResNet-BK's non-embedding parameters.
"""

from __future__ import annotations

import functools
import importlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MambaConfig, MambaForCausalLM
from transformers.models.mamba.modeling_mamba import MambaMixer, apply_mask_to_padding_states

from fairlm.config import section
from fairlm.ops.selective_scan import selective_scan_chunked

KERNEL_CUDA = "mamba-ssm CUDA kernels"
KERNEL_CHUNKED_CPU = "chunked selective scan (CPU)"
KERNEL_CHUNKED_TORCH = "chunked selective scan (torch ops on {device})"
KERNEL_MAMBAPY = "mambapy parallel scan"
KERNEL_SEQUENTIAL = "sequential"

KERNEL_SETTINGS = ("auto", "cuda", "chunked", "mambapy", "sequential")
MATCH_TOLERANCE = 0.05


@functools.lru_cache(maxsize=1)
def mamba_ssm_available() -> bool:
    """True where transformers can call mamba-ssm's kernels (they exist for CUDA only)."""
    try:
        interface = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    except Exception:  # a broken CUDA build fails with errors other than ImportError
        return False
    return hasattr(interface, "mamba_inner_fn") and hasattr(interface, "selective_scan_fn")


def mambapy_available() -> bool:
    try:
        importlib.import_module("mambapy.pscan")
    except ImportError:
        return False
    return True


def mamba_settings(config: dict) -> dict:
    return section(config, "mamba")


def dt_rank(d_model: int) -> int:
    return math.ceil(d_model / 16)


def mamba_non_embedding_params(
    d_model: int, n_layers: int, expand: int, d_state: int, d_conv: int
) -> int:
    """Non-embedding parameters of MambaForCausalLM (tied head: the embedding is counted apart)."""
    inner, rank = expand * d_model, dt_rank(d_model)
    per_layer = (
        d_model  # RMSNorm
        + d_model * 2 * inner  # in_proj (no bias)
        + inner * d_conv
        + inner  # depthwise conv1d with bias
        + inner * (rank + 2 * d_state)  # x_proj -> (dt, B, C)
        + rank * inner
        + inner  # dt_proj with bias
        + inner * d_state
        + inner  # A_log, D
        + inner * d_model  # out_proj (no bias)
    )
    return n_layers * per_layer + d_model  # + final RMSNorm


def match_mamba_size(config: dict, target_non_embedding: int, vocab_size: int) -> dict:
    """Choose expand (integers 1..8 first), else d_model, so Mamba's non-embedding parameter
    count is within 5% of `target_non_embedding`. vocab_size does not enter the non-embedding
    count; it is accepted so that callers size both models from the same arguments."""
    del vocab_size
    settings = mamba_settings(config)
    d_model, n_layers = config["model"]["d_model"], config["model"]["n_layers"]

    def count(d: int, e: int) -> int:
        return mamba_non_embedding_params(d, n_layers, e, settings["d_state"], settings["d_conv"])

    expand = min(range(1, 9), key=lambda e: abs(count(d_model, e) / target_non_embedding - 1))
    ratio = count(d_model, expand) / target_non_embedding
    if abs(ratio - 1) <= MATCH_TOLERANCE:
        how = f"expand {expand} (d_model {d_model} kept)"
    else:
        # no integer expand is close enough: keep the configured expand, move d_model
        expand = settings["expand"]
        d_model = min(
            range(1, 8 * d_model + 1),
            key=lambda d: abs(count(d, expand) / target_non_embedding - 1),
        )
        ratio = count(d_model, expand) / target_non_embedding
        how = f"d_model {d_model} (expand {expand} kept; no expand in 1..8 within 5%)"
    return {
        "expand": expand,
        "d_model": d_model,
        "non_embedding": count(d_model, expand),
        "target_non_embedding": target_non_embedding,
        "ratio": ratio,
        "within_tolerance": abs(ratio - 1) <= MATCH_TOLERANCE,
        "note": (
            f"matched to ResNet-BK's {target_non_embedding} non-embedding parameters"
            f" by {how}: ratio {ratio:.4f}"
        ),
    }


def _resnet_bk_non_embedding(config: dict, vocab_size: int) -> int:
    from fairlm.models import build_model, parameter_counts

    try:
        with torch.device("meta"):  # counting needs shapes only
            reference = build_model("resnet_bk", config, vocab_size)
    except Exception:
        reference = build_model("resnet_bk", config, vocab_size)
    return parameter_counts(reference)["non_embedding"]


def _official_initialisation(model: MambaForCausalLM) -> None:
    """Re-initialise what transformers' _init_weights does differently from mamba-ssm.

    transformers draws in_proj and x_proj from N(0, initializer_range) and zeroes the conv
    bias; mamba-ssm leaves those modules at PyTorch's defaults (Kaiming-uniform weights, conv
    bias uniform). Δ bias, dt_proj weight, A_log, D, the Kaiming out_proj scaled by
    1/sqrt(n_layers), N(0, 0.02) embeddings and unit norms already match (config below).
    """
    for module in model.modules():
        if isinstance(module, MambaMixer):
            module.in_proj.reset_parameters()
            module.x_proj.reset_parameters()
            module.conv1d.reset_parameters()


class _DispatchingMambaMixer(MambaMixer):
    """MambaMixer whose forward picks the kernel per call (by the device of its input)."""

    fairlm_kernel = "auto"
    fairlm_last_kernel: str | None = None

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        path = planned_kernel(
            self.fairlm_kernel, hidden_states.device, self.use_mambapy, cache is not None
        )
        self.fairlm_last_kernel = path
        if path.startswith("chunked"):
            return _chunked_mixer_forward(self, hidden_states, attention_mask)
        return super().forward(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)


def planned_kernel(
    kernel: str,
    device: torch.device,
    use_mambapy: bool,
    has_cache: bool = False,
    strict: bool = True,
) -> str:
    """The kernel a mixer runs for inputs on `device` under setting `kernel`."""
    cuda_kernels = torch.device(device).type == "cuda" and mamba_ssm_available()
    if kernel == "cuda" and not strict:
        return KERNEL_CUDA
    if kernel == "cuda" and not cuda_kernels:
        raise RuntimeError(
            "mamba.kernel=cuda needs CUDA tensors and mamba-ssm (with causal-conv1d) installed"
        )
    if cuda_kernels and kernel in ("auto", "cuda", "mambapy", "sequential"):
        # transformers calls mamba-ssm by itself for CUDA tensors whenever it is installed
        return KERNEL_CUDA
    if kernel in ("auto", "chunked") and not has_cache:
        if torch.device(device).type == "cpu":
            return KERNEL_CHUNKED_CPU
        return KERNEL_CHUNKED_TORCH.format(device=torch.device(device).type)
    return KERNEL_MAMBAPY if use_mambapy else KERNEL_SEQUENTIAL


def _chunked_mixer_forward(
    mixer: MambaMixer, hidden_states: torch.Tensor, attention_mask=None
) -> torch.Tensor:
    """transformers' MambaMixer forward without cache, with the scan done by selective_scan_chunked.

    Same steps as transformers' torch path: in_proj -> (x, z); causal depthwise conv (pad k-1,
    keep the first N outputs) and SiLU; x_proj -> (Δ rank, B, C); Δ = softplus(dt_proj(Δ rank));
    h = exp(ΔA) h + ΔBx; y = C·h + D x; y * SiLU(z); out_proj.
    """
    dtype = hidden_states.dtype
    hidden_states = apply_mask_to_padding_states(hidden_states, attention_mask)
    x, gate = mixer.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)
    n_tokens = x.shape[-1]
    x = mixer.act(mixer.conv1d(x)[..., :n_tokens])
    x = apply_mask_to_padding_states(x.transpose(1, 2), attention_mask)  # [b, N, inner]
    time_step, B, C = torch.split(
        mixer.x_proj(x), [mixer.time_step_rank, mixer.ssm_state_size, mixer.ssm_state_size], dim=-1
    )
    delta = F.softplus(
        mixer.dt_proj.weight @ time_step.transpose(1, 2) + mixer.dt_proj.bias.float()[:, None]
    )
    A = -torch.exp(mixer.A_log.float())
    x = x.transpose(1, 2)
    y = selective_scan_chunked(x, delta, A, B, C)
    y = y + x * mixer.D.float()[None, :, None]
    y = y * F.silu(gate)
    return mixer.out_proj(y.transpose(1, 2).to(dtype))


class MambaLM(nn.Module):
    """ids [B, N] -> logits [B, N, V] through transformers' MambaForCausalLM."""

    def __init__(self, lm: MambaForCausalLM, kernel: str, size_note: str):
        super().__init__()
        self.lm = lm
        self.kernel = kernel
        self.size_note = size_note
        for module in self.lm.modules():
            if isinstance(module, MambaMixer):
                module.__class__ = _DispatchingMambaMixer
                module.fairlm_kernel = kernel

    def _mixers(self) -> list[_DispatchingMambaMixer]:
        return [m for m in self.lm.modules() if isinstance(m, _DispatchingMambaMixer)]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, use_cache=False, return_dict=True).logits

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        """The final-normed hidden states [B, N, D] that the (bias-free, tied) head maps."""
        return self.lm.backbone(input_ids=ids, use_cache=False, return_dict=True).last_hidden_state

    def output_weight(self) -> torch.Tensor:
        return self.lm.lm_head.weight

    def kernel_description(self) -> str:
        """The kernel(s) the last forward ran; before any forward, the one it would run."""
        ran = sorted({m.fairlm_last_kernel for m in self._mixers() if m.fairlm_last_kernel})
        if ran:
            return ", ".join(ran)
        device = next(self.lm.parameters()).device
        # strict=False: a kernel=cuda model may be asked before it is moved to the GPU
        return planned_kernel(self.kernel, device, self.lm.config.use_mambapy, strict=False)

    def set_grad_checkpointing(self, flag: bool) -> None:
        """Recompute each block's activations in backward (transformers' checkpointing)."""
        if not hasattr(self.lm, "activation_checkpointing_enable"):  # transformers < 5.x names
            if flag:
                self.lm.gradient_checkpointing_enable({"use_reentrant": False})
            else:
                self.lm.gradient_checkpointing_disable()
        elif flag:
            self.lm.activation_checkpointing_enable({"use_reentrant": False})
        else:
            self.lm.activation_checkpointing_disable()


def hf_config(
    config: dict, vocab_size: int, d_model: int | None = None, expand: int | None = None
) -> MambaConfig:
    settings = mamba_settings(config)
    return MambaConfig(
        vocab_size=vocab_size,
        hidden_size=d_model or config["model"]["d_model"],
        num_hidden_layers=config["model"]["n_layers"],
        state_size=settings["d_state"],
        conv_kernel=settings["d_conv"],
        expand=expand or settings["expand"],
        time_step_rank="auto",
        time_step_min=settings["dt_min"],
        time_step_max=settings["dt_max"],
        tie_word_embeddings=True,
        use_mambapy=settings["kernel"] == "mambapy",
        use_cache=False,
        # mamba-ssm's defaults, where transformers' differ (0.1 and False)
        initializer_range=0.02,
        rescale_prenorm_residual=True,
    )


def build(config: dict, vocab_size: int) -> MambaLM:
    settings = mamba_settings(config)
    kernel = settings["kernel"]
    if kernel not in KERNEL_SETTINGS:
        raise ValueError(f"mamba.kernel must be one of {KERNEL_SETTINGS}, got {kernel!r}")
    if kernel == "mambapy" and not mambapy_available():
        raise RuntimeError(
            "mamba.kernel=mambapy needs the mambapy package"
            " (without it transformers silently runs the sequential loop)"
        )
    if kernel == "cuda" and not mamba_ssm_available():
        raise RuntimeError(
            "mamba.kernel=cuda needs mamba-ssm and causal-conv1d installed on a CUDA machine"
        )

    d_model, expand = config["model"]["d_model"], settings["expand"]
    size_note = f"as configured: d_model {d_model}, expand {expand}"
    if settings["match_params"]:
        match = match_mamba_size(config, _resnet_bk_non_embedding(config, vocab_size), vocab_size)
        if not match["within_tolerance"]:
            raise ValueError(f"could not size Mamba within 5% of ResNet-BK: {match['note']}")
        d_model, expand, size_note = match["d_model"], match["expand"], match["note"]

    lm = MambaForCausalLM(hf_config(config, vocab_size, d_model=d_model, expand=expand))
    _official_initialisation(lm)
    return MambaLM(lm, kernel, size_note)
