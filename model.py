"""
The language model, in one file: a decoder-only transformer that reads and writes
Hugging Face checkpoints of Qwen2/Qwen2.5, Qwen3 and Llama-3.x, and its packed
(padding-free) forward with the log-probs of response tokens, which every stage
trains or measures with. Generation lives in engine.py, FSDP2 sharding in parallel.py.

Parameter names equal the Hugging Face ones, so a checkpoint's tensors load by name.
"""
import contextlib
import functools
import inspect
import json
import math
import os
import shutil
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts,
                                    noop_context_fn)

from common import (UserError, file_stamps, finite_number, fsync_dir, fsync_tree, raise_refused_write, read_json,
                    run_dir_hint, stop_token_ids)

try:  # FlashAttention kernels on CUDA when the package is installed; SDPA otherwise
    from flash_attn import flash_attn_varlen_func
    HAVE_FLASH_ATTN = True
except ImportError:
    HAVE_FLASH_ATTN = False
# torch's own varlen attention (torch >= 2.10: FA2 kernels inside the torch wheel), imported on first use on a GPU
# (torch_varlen_available): its module imports torch._dynamo, seconds at every start on CPU
torch_varlen_attn = None

SUPPORTED = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama"}
# what a Llama 3.1 rope_scaling must give (rope_cos_sin)
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelConfig:
    arch: str                 # "qwen2" | "qwen3" | "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # llama3-type frequency scaling, or None
    tie_word_embeddings: bool
    max_position_embeddings: int
    hf_config: dict            # the config.json it came from, written back on save

    @property
    def qkv_bias(self) -> bool:
        """Qwen2's q/k/v projections have biases; no other bias is built (from_hf refuses configs asking for one)."""
        return self.arch == "qwen2"

    @staticmethod
    def from_hf(cfg: dict, where: str = "config.json") -> "ModelConfig":
        if not isinstance(cfg, dict):
            raise UserError(f"{where}: a JSON object expected, got {type(cfg).__name__}")
        archs = cfg.get("architectures") or []
        if not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
            raise UserError(f"{where}: field 'architectures' must be a list of names, got {archs!r}")
        arch = next((SUPPORTED[a] for a in archs if a in SUPPORTED), None)
        if not archs and cfg.get("model_type") in SUPPORTED.values():  # (none listed: model_type, as transformers)
            arch = cfg["model_type"]
        if arch is None:
            raise UserError(f"{where}: unsupported architecture {archs or cfg.get('model_type')!r}; "
                            f"supported: {', '.join(SUPPORTED)} (or, without 'architectures', model_type "
                            f"{', '.join(SUPPORTED.values())})")
        for field in ("rope_parameters", "rope_scaling"):
            if cfg.get(field) is not None and not isinstance(cfg[field], dict):
                raise UserError(f"{where}: field {field!r} must be an object, got {cfg[field]!r}")
        # types as transformers checks them: a text "false" for tie_word_embeddings would tie the head silently
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        for field in required + ("num_key_value_heads", "head_dim", "max_position_embeddings"):  # these: null = unset
            value = cfg.get(field)
            if field in cfg and (value is not None or field in required) and not (type(value) is int and value > 0):
                raise UserError(f"{where}: field {field!r} must be a positive integer, got {value!r}")
        numbers = [(f, cfg[f]) for f in ("rms_norm_eps", "rope_theta", "original_max_position_embeddings") if f in cfg]
        numbers += [(f"{field}.{k}", v) for field in ("rope_parameters", "rope_scaling") if cfg.get(field)
                    for k, v in cfg[field].items() if k in LLAMA3_ROPE_KEYS + ("rope_theta",)]
        for field, value in numbers:
            if not (finite_number(value) and value > 0):
                raise UserError(f"{where}: field {field!r} must be a positive number, got {value!r}")
        if cfg.get("tie_word_embeddings") is not None and not isinstance(cfg["tie_word_embeddings"], bool):
            raise UserError(f"{where}: field 'tie_word_embeddings' must be true or false, "
                            f"got {cfg['tie_word_embeddings']!r}")
        rope = cfg.get("rope_parameters") or {}          # transformers >= 5 keeps RoPE settings here
        # as transformers reads them: a v4 rope_scaling replaces rope_parameters, and the theta inside wins over a
        # top-level one (which a config from elsewhere may also hold)
        scaling = cfg.get("rope_scaling") or rope
        rope_theta = scaling.get("rope_theta", cfg.get("rope_theta", 10000.0))
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            scaling = None
        elif kind != "llama3":
            raise UserError(f"{where}: unsupported rope scaling {kind!r} (supported: llama3)")
        elif "original_max_position_embeddings" in cfg:  # (transformers: a top-level one wins over the dict's)
            scaling = {**scaling, "original_max_position_embeddings": cfg["original_max_position_embeddings"]}
        if scaling is not None and (missing := [k for k in LLAMA3_ROPE_KEYS if k not in scaling]):
            raise UserError(f"{where}: llama3 rope scaling without {', '.join(missing)}")
        # what the model here does not build is refused, not silently left out (it would give other logits)
        if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
            raise UserError(f"{where}: unsupported hidden_act {cfg['hidden_act']!r} (supported: silu)")
        # which layers slide, as transformers' Qwen2 and Qwen3 derive it when the config has no layer_types: those
        # from max_window_layers on (its default 28), where use_sliding_window is set and sliding_window is not null
        # (a config without the field slides over transformers' default 4,096); a layer_types naming a sliding
        # layer without them, transformers cannot run. (Llama has no sliding window: its fields are not read.)
        sliding = arch in ("qwen2", "qwen3") and cfg.get("use_sliding_window")  # (else transformers reads neither)
        if sliding and not (type(cfg.get("max_window_layers", 0)) is int and cfg.get("max_window_layers", 0) >= 0):
            raise UserError(f"{where}: field 'max_window_layers' must be an integer >= 0, "
                            f"got {cfg['max_window_layers']!r}")
        named = (cfg.get("layer_types") or []) if arch in ("qwen2", "qwen3") else []
        if not (isinstance(named, list) and all(isinstance(t, str) for t in named)):
            raise UserError(f"{where}: field 'layer_types' must be a list of names, got {cfg['layer_types']!r}")
        layer_types = [] if arch not in ("qwen2", "qwen3") else cfg.get("layer_types") or (
            ["sliding_attention" if i >= cfg.get("max_window_layers", 28) else "full_attention"
             for i in range(cfg.get("num_hidden_layers", 0))]
            if cfg.get("use_sliding_window") and cfg.get("sliding_window", 4096) else [])
        if "sliding_attention" in layer_types:
            raise UserError(f"{where}: sliding-window attention is not supported (use_sliding_window / layer_types)")
        if cfg.get("mlp_bias") or (arch != "qwen2" and cfg.get("attention_bias")):
            raise UserError(f"{where}: {'mlp_bias' if cfg.get('mlp_bias') else 'attention_bias'} is not supported "
                            f"(biases: Qwen2's q/k/v only)")
        # absent (not null) fields where transformers' Qwen defaults (32 kv heads; Qwen3's head_dim 128) are rarely
        # what the weights hold: refused, not guessed (a guess trains, then saves a config transformers cannot load)
        absent = [f for f, archs in (("num_key_value_heads", ("qwen2", "qwen3")), ("head_dim", ("qwen3",)))
                  if arch in archs and f not in cfg]
        if absent:
            raise UserError(f"{where}: missing field {absent[0]!r} (transformers' default for {arch} is rarely "
                            f"the checkpoint's: write it)")
        try:
            heads = cfg["num_attention_heads"]
            kv_heads = cfg.get("num_key_value_heads") or heads
            head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
            if heads % kv_heads:  # (each kv head serves a whole group of query heads)
                raise UserError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                                f"{kv_heads}")
            if head_dim % 2:  # (RoPE turns pairs of dimensions)
                derived = "" if cfg.get("head_dim") else " (hidden_size / num_attention_heads)"
                raise UserError(f"{where}: head_dim {head_dim}{derived} is odd; RoPE needs an even one")
            return ModelConfig(
                arch=arch, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
                num_heads=heads, num_kv_heads=kv_heads,
                head_dim=head_dim,
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=rope_theta,
                rope_scaling=scaling, tie_word_embeddings=bool(cfg.get("tie_word_embeddings")),
                max_position_embeddings=cfg.get("max_position_embeddings") or 32768, hf_config=cfg)
        except KeyError as e:
            raise UserError(f"{where}: missing field {e.args[0]!r}")


# -----------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x, weight, eps):
    """RMSNorm over the last dimension, computed in fp32 and scaled in x's dtype (as Hugging Face's Qwen2/Llama)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig, device=None):
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device)
                                         / cfg.head_dim))
    s = cfg.rope_scaling
    if s:  # Llama 3.1: stretch low frequencies by `factor`, interpolate the band between
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(cfg: ModelConfig, positions, dtype):
    """RoPE's cos and sin tables (..., head_dim) in dtype for integer positions (...): the model's forward and the
    engine's precomputed table both use this, so the two agree bit for bit."""
    freqs = positions.float()[..., None] * rope_inv_freq(cfg, positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    # x: (..., T, head_dim); cos/sin broadcastable, rotate-half convention as in HF
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)
        if cfg.arch == "qwen3":  # Qwen3 normalises q and k per head before RoPE
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, ctx):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = ctx.attend(self, q, k, v)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, ctx):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------
# attention: a packed row of sequences (engine.py adds one decode step on the KV cache)


HALF = (torch.float16, torch.bfloat16)


def flash_dtype(*tensors, device_type=None, flash_available=HAVE_FLASH_ATTN):
    """The dtype in which FlashAttention takes these attention inputs, or None: use the SDPA path.

    flash-attn runs only on CUDA, on inputs of one half dtype. Under autocast to a half dtype the inputs
    are cast to it (there q and k leave the fp32 rope multiply in fp32 while v is half); without autocast
    they must already share one half dtype, so fp32 and mixed dtypes stay on SDPA. device_type and
    flash_available let tests on CPU ask what a GPU with flash-attn installed would do.
    """
    device_type = device_type or tensors[0].device.type
    if not flash_available or device_type != "cuda":
        return None
    if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) in HALF:
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    return dtype if dtype in HALF and all(t.dtype == dtype for t in tensors) else None


def flash_inputs(dtype, *tensors):
    """(batch, heads, seqlen, hd) tensors as flash-attn takes them: (batch, seqlen, heads, hd), in dtype,
    last dimension contiguous. Copies only where needed: a KV cache must stay the memory flash writes into."""
    out = []
    for t in tensors:
        t = t.transpose(1, 2).to(dtype)
        out.append(t if t.stride(-1) == 1 else t.contiguous())
    return out


def torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, repeat_kv=None):
    """torch.nn.attention.varlen.varlen_attn (FA2 kernels shipped inside the torch wheel), called as flash-attn's
    flash_attn_varlen_func is: (N, heads, hd) inputs, causal, query heads grouped over fewer key/value heads.
    torch 2.10 took is_causal and no GQA, 2.11 window_size=(-1, 0) for causal and no GQA, 2.13 also enable_gqa.
    Always causal (the only attention packed rows need): causal is there for the shared signature. Without
    enable_gqa, repeat_kv=None decides by signature: 2.11's function hands the key/value heads as they are to its
    FA2 kernel, which groups the query heads itself (measured on an H200 with torch 2.11, bench.py's attention A/B in
    docs/gpu_h200_stage1.json: the same outputs, gradients and speed as with the heads repeated, and no repeated
    copy saved for the backward, ~2.8 GB at 16K tokens without recompute at the 1.5B shape); 2.10's is unmeasured,
    so its heads are repeated. repeat_kv=True or False forces the choice (the A/B)."""
    params = varlen_parameters(torch_varlen_attn)
    kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        elif repeat_kv or (repeat_kv is None and "window_size" not in params):
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    return torch_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


@functools.lru_cache(maxsize=None)
def varlen_parameters(fn):
    """The parameter names of a varlen function's signature, read once (torch_varlen runs per layer and pass)."""
    return frozenset(inspect.signature(fn).parameters)


@functools.lru_cache(maxsize=None)
def torch_varlen_available(device_index):
    """Whether torch's own varlen kernel runs here: the installed torch has it and the GPU is sm80 or newer (FA2)."""
    global torch_varlen_attn
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    torch_varlen_attn = torch_varlen_attn or varlen_attn
    return torch.cuda.get_device_capability(device_index)[0] >= 8


# Packed rows on CUDA never reach cuDNN attention: its plan cache is keyed on sizes and strides, so one SDPA call per
# packed sequence (every length different) builds a new plan in the forward, the recompute and the backward (on an
# H200: 3.2 s for a micro-batch's first call, 0.85 s for each new set of lengths, against 4 ms for the varlen kernel;
# docs/gpu_h200_stage1.json). The per-sequence loop is pinned to these; math is the last resort only.
LOOP_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def packed_backend(q, k, v, device_type=None, flash_available=HAVE_FLASH_ATTN, varlen_available=None):
    """(backend, dtype) of the causal attention of a packed row, the one place that chooses it:
      "flash_attn"    flash-attn's flash_attn_varlen_func, one call per layer (when installed)
      "torch_varlen"  torch.nn.attention.varlen, one call per layer (FA2 inside the torch wheel, sm80+)
      "sdpa_pinned"   one SDPA call per sequence, pinned to LOOP_BACKENDS (never cuDNN): CUDA otherwise
      "sdpa"          one SDPA call per sequence, any backend: CPU
    The varlen kernels take CUDA inputs of one half dtype (dtype: see flash_dtype); fp32 and CPU take the loop.
    device_type, flash_available and varlen_available let tests on CPU ask what a GPU would do."""
    device_type = device_type or q.device.type
    if varlen_available is None:
        varlen_available = device_type == "cuda" and torch_varlen_available(q.device.index or 0)
    dtype = flash_dtype(q, k, v, device_type=device_type, flash_available=flash_available or varlen_available)
    if dtype is None:
        return ("sdpa_pinned" if device_type == "cuda" else "sdpa"), None
    return ("flash_attn" if flash_available else "torch_varlen"), dtype


def packed_backend_name(device, dtype):
    """What packed attention runs on for compute in dtype on device, in words (the training scripts print it)."""
    t = torch.empty(1, 1, 1, 8, dtype=dtype, device=device)
    backend, _ = packed_backend(t, t, t)
    return {"flash_attn": "flash-attn varlen, one call per layer",
            "torch_varlen": "torch.nn.attention.varlen (FA2 in the torch wheel), one call per layer",
            "sdpa_pinned": "one SDPA call per sequence (flash/efficient/math, never cuDNN)",
            "sdpa": "one SDPA call per sequence"}[backend] + f", {str(dtype).replace('torch.', '')}"


def packed_attention(q, k, v, cu_seqlens, lens, backend="sdpa", dtype=None, repeat_kv=None):
    """Causal attention of each sequence of a packed row over itself. q (1, nh, N, hd); k, v (1, nkv, N, hd) with
    nkv dividing nh; cu_seqlens = [0, l1, l1+l2, ..., N] and lens = [l1, l2, ...] (a list: no host sync). Returns
    (1, nh, N, hd). backend and dtype: see packed_backend (dtype: what a varlen kernel is handed); repeat_kv: see
    torch_varlen."""
    if backend in ("flash_attn", "torch_varlen"):
        kernel = (flash_attn_varlen_func if backend == "flash_attn"
                  else functools.partial(torch_varlen, repeat_kv=repeat_kv))
        cu, maxlen = cu_seqlens.to(torch.int32), max(lens)
        q1, k1, v1 = (t[0] for t in flash_inputs(dtype or q.dtype, q, k, v))  # varlen layout: (N, heads, hd)
        return kernel(q1, k1, v1, cu, cu, maxlen, maxlen, causal=True).transpose(0, 1).unsqueeze(0)
    gqa = q.shape[1] != k.shape[1]
    pinned = backend == "sdpa_pinned"
    if pinned and gqa:  # the efficient kernel takes no GQA, flash's takes it only in some versions: heads repeated,
        # so that neither falls back to math (O(T^2) memory per sequence)
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        gqa = False
    with sdpa_kernel(LOOP_BACKENDS) if pinned else contextlib.nullcontext():
        # split (not slice in a loop): in backward, split's gradient is one cat instead of a zero-filled
        # full-size gradient per sequence
        out = [F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=gqa)
               for qi, ki, vi in zip(q.split(lens, 2), k.split(lens, 2), v.split(lens, 2))]
    return torch.cat(out, dim=2)


class Packed:
    """Many sequences in one row (1, N), boundaries in cu_seqlens = [0, l1, l1+l2, ..., N]; each sequence attends
    only to itself."""

    def __init__(self, cu_seqlens):
        self.cu = cu_seqlens
        bounds = cu_seqlens.tolist()
        self.lens = [b - a for a, b in zip(bounds[:-1], bounds[1:])]

    def attend(self, attn, q, k, v):
        return packed_attention(q, k, v, self.cu, self.lens, *packed_backend(q, k, v))


def compile_blocks(model):
    """--compile: each block's forward compiled with dynamic shapes, the module's hooks (FSDP's) left eager and the
    parameter names unchanged. The packed attention between the compiled parts stays eager: its per-sequence lengths
    change with every micro-batch (torch.compiler.disable imports torch._dynamo, so only here)."""
    if not hasattr(Packed, "eager_attend"):
        Packed.eager_attend = Packed.attend
        Packed.attend = torch.compiler.disable(Packed.attend)
    for block in model.model.layers:
        block.forward = torch.compile(block.forward, dynamic=True)
    return model


# -----------------------------------------------------------------------------
# the model


# Selective activation checkpointing (--checkpoint_keep): what a recomputed block keeps from its first forward, so
# that backward does not run it again. "attention": the attention kernels' outputs (O(T) with flash kernels, and
# the one op whose cost grows with the sequence's length); "matmuls": those and every projection's output (the
# op-level policy of torchtitan; Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
# Models", likewise keep the matmuls). Then only norms, RoPE and SiLU are recomputed: about a third of a block's
# activation memory for nearly none of its recompute flops.
ATTENTION_OPS = {"aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
                 "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention",
                 "aten::_flash_attention_forward", "aten::_efficient_attention_forward", "torch_attn::_varlen_attn",
                 "flash_attn::_flash_attn_varlen_forward"}
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
CHECKPOINT_KEEP = {"nothing": set(), "attention": ATTENTION_OPS, "matmuls": ATTENTION_OPS | MATMUL_OPS}


@functools.lru_cache(maxsize=None)
def checkpoint_context(keep):
    """torch.utils.checkpoint's context_fn for a CHECKPOINT_KEEP policy."""
    if keep not in CHECKPOINT_KEEP:
        raise ValueError(f"checkpoint_keep must be one of {', '.join(CHECKPOINT_KEEP)}, not {keep!r}")
    if keep == "nothing":
        return noop_context_fn
    kept = CHECKPOINT_KEEP[keep]

    def policy(ctx, op, *args, **kwargs):  # op: an OpOverload; a higher-order op (under compile) has no schema
        name = getattr(getattr(op, "_schema", None), "name", None)
        return CheckpointPolicy.MUST_SAVE if name in kept else CheckpointPolicy.PREFER_RECOMPUTE
    return functools.partial(create_selective_checkpoint_contexts, policy)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()  # HF names: model.embed_tokens, model.layers.N..., model.norm, lm_head
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        for i, block in enumerate(self.model.layers):
            block.self_attn.layer_idx = i
        self.gradient_checkpointing = False  # recompute blocks in backward to save activation memory
        self.checkpoint_every = 1  # with it, recompute every k-th block only (the others keep their activations)
        self.checkpoint_keep = "nothing"  # what a recomputed block keeps from its forward: CHECKPOINT_KEEP

    def rope(self, positions, dtype):
        cos, sin = rope_cos_sin(self.config, positions, dtype)  # (B, T, hd)
        return cos[:, None], sin[:, None]  # (B, 1, T, hd): one table for every head

    def forward(self, idx, positions=None, cu_seqlens=None, ctx=None):
        """Final hidden states (1, N, hidden) for token ids idx (1, N) holding several sequences packed in one row,
        cu_seqlens their boundaries (default: one sequence). ctx and positions: another attention mode (engine.py)."""
        if cu_seqlens is None and positions is None:
            cu_seqlens = torch.tensor([0, idx.shape[1]], device=idx.device)
        ctx = ctx or Packed(cu_seqlens)
        if positions is None:
            positions = packed_positions(cu_seqlens)[None]
        x = self.model.embed_tokens(idx)
        cos, sin = self.rope(positions, x.dtype)
        for i, block in enumerate(self.model.layers):
            if self.gradient_checkpointing and torch.is_grad_enabled() and i % self.checkpoint_every == 0:
                x = checkpoint(block, x, cos, sin, ctx, use_reentrant=False,
                               context_fn=checkpoint_context(self.checkpoint_keep))
            else:
                x = block(x, cos, sin, ctx)
        return self.model.norm(x)

    def token_logprobs(self, hidden, targets, temperature=1.0, chunk_size=4096, with_entropy=False):
        """log p(targets) (and optionally the entropy) for hidden states (..., hidden) and targets (...).

        Runs the lm_head + fp32 log-softmax over chunks of tokens, recomputed in backward, so a 152K
        vocabulary never holds fp32 logits for the whole batch at once. with_entropy: False; True (differentiable:
        an entropy bonus); "detached" (for logging: no graph, so backward holds no probabilities).
        """
        shape = targets.shape
        h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        lps, ents = [], []
        for s in range(0, t.numel(), chunk_size):
            args = (h[s:s + chunk_size], t[s:s + chunk_size])
            if torch.is_grad_enabled():
                lp, ent = checkpoint(self._chunk_logprobs, *args, temperature, with_entropy, use_reentrant=False)
            else:
                lp, ent = self._chunk_logprobs(*args, temperature, with_entropy)
            lps.append(lp)
            ents.append(ent)
        lp = torch.cat(lps).view(shape)
        return (lp, torch.cat(ents).view(shape)) if with_entropy else lp

    def _chunk_logprobs(self, h, t, temperature, with_entropy):
        logits = self.lm_head(h)  # (bf16 up to float32; a float64 model's stay float64, for its exact checks)
        logp = torch.log_softmax((logits if logits.dtype == torch.float64 else logits.float()) / temperature, dim=-1)
        lp = logp.gather(-1, t[:, None]).squeeze(-1)
        if not with_entropy:
            return lp, torch.zeros_like(lp)
        with torch.set_grad_enabled(torch.is_grad_enabled() and with_entropy != "detached"):
            return lp, -(logp.exp() * logp).sum(-1)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


def packed_positions(cu_seqlens):
    """Positions that restart at 0 at each sequence boundary of a packed row."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    starts = torch.repeat_interleave(cu_seqlens[:-1], lengths)
    return torch.arange(int(cu_seqlens[-1]), device=cu_seqlens.device) - starts


def pack(sequences, device="cpu"):
    """Concatenate token lists into one (1, N) row; returns (ids, cu_seqlens)."""
    lengths = torch.tensor([len(s) for s in sequences])
    cu = torch.zeros(len(sequences) + 1, dtype=torch.long)
    cu[1:] = torch.cumsum(lengths, 0)
    ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long)
    return ids[None].to(device), cu.to(device)


def response_positions(cu_seqlens, prompt_lens, response_lens):
    """The positions of a packed row (pack) whose hidden states predict the response tokens, sequence after sequence:
    hidden state t predicts token t + 1, and sequence i's response tokens sit at cu[i] + prompt_len_i ... cu[i+1] - 1,
    so its positions are one earlier. An empty prompt has no position before its first response token (cu[i] - 1
    would be the previous sequence's last token, or wrap to the row's end): an error."""
    if prompt_lens and min(prompt_lens) < 1:
        raise ValueError("every sequence needs a prompt of at least one token (the first response token is "
                         "predicted from the position before it)")
    device = cu_seqlens.device
    starts = cu_seqlens[:-1] + torch.tensor(prompt_lens, device=device)
    lens = torch.tensor(response_lens, device=device)
    return torch.repeat_interleave(starts - 1, lens) + (torch.arange(int(lens.sum()), device=device)
                                                        - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens))


def response_logprobs(model, prompts, responses, temperature=1.0, chunk_size=4096, with_entropy=False):
    """Teacher-forced log-probs (and entropies: see token_logprobs) of every response token given its prompt and
    the response before it, for sequences packed into one padding-free row: flat tensors over all response tokens,
    sequence after sequence. The lm_head runs only on the response positions. GRPO, SFT's NLL, the sample effect
    and token_shift.py all use this one function."""
    device = model.lm_head.weight.device
    ids, cu = pack([p + r for p, r in zip(prompts, responses)], device)
    hidden = model(ids, cu_seqlens=cu)
    pos = response_positions(cu, [len(p) for p in prompts], [len(r) for r in responses])
    return model.token_logprobs(hidden[0, pos], ids[0, pos + 1], temperature=temperature, chunk_size=chunk_size,
                                with_entropy=with_entropy)


# -----------------------------------------------------------------------------
# Hugging Face checkpoints


def dtype_name(dtype):
    """A torch dtype as settings, identities and configs write it: "bfloat16", not "torch.bfloat16"."""
    return str(dtype).replace("torch.", "")


def parse_dtype(dtype, device=None, training=False):
    """A torch dtype from a --dtype setting; "auto" is bfloat16 on CUDA and float32 elsewhere (the one rule).
    training: the dtype gradients are computed in, where float16 is refused (nothing here scales the loss)."""
    if isinstance(dtype, torch.dtype):
        found = dtype
    elif dtype == "auto":
        found = torch.bfloat16 if torch.device(device or "cpu").type == "cuda" else torch.float32
    else:
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16,
                 "float64": torch.float64, "fp64": torch.float64}  # (exact checks on a CPU)
        if dtype not in names:
            raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(names)}")
        found = names[dtype]
    if training and found == torch.float16:
        raise UserError("--dtype float16 cannot train here: nothing scales the loss, and the per-token gradients of a "
                        "loss normalised over the whole batch (~1e-5 and less) underflow in float16; bfloat16 has "
                        "float32's range: use bfloat16 (or float32)")
    return found


def check_checkpoint(path):
    """A Hugging Face checkpoint directory (it holds config.json and weights whose headers match it: check_weights),
    or a UserError naming the path. For a checkpoint a stage loads only later in its run."""
    if not os.path.isdir(path):
        raise UserError(f"checkpoint {path}: no such directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"checkpoint {path}: not a Hugging Face checkpoint directory (no config.json)"
                        + run_dir_hint(path))
    check_weights(path)


def read_config(path) -> ModelConfig:
    if not os.path.isdir(path):
        raise UserError(f"{path}: checkpoint directory not found")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise UserError(f"{cfg_path}: not found (not a Hugging Face checkpoint directory){run_dir_hint(path)}")
    return ModelConfig.from_hf(read_json(cfg_path, "a model config", repeated_keys=True), cfg_path)


def weight_files(path):
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        weight_map = read_json(index, "a shard index", repeated_keys=True).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise UserError(f"{index}: unreadable shard index (field 'weight_map' is not an object of file names)")
        files = sorted(set(weight_map.values()))
        if os.path.exists(single) and "model.safetensors" not in files:  # transformers would read the single file
            raise UserError(f"{path}: holds both model.safetensors and a shard index that does not name it (saved "
                            f"twice, one layout over the other?); transformers loads model.safetensors, this index "
                            f"{len(files)} other file(s): remove the stale one")
        return [os.path.join(path, f) for f in files]
    if os.path.exists(single):
        return [single]
    raise UserError(f"{path}: no model.safetensors or model.safetensors.index.json")


def checkpoint_stamps(path, other_files=()):
    """[size, modification time] of a checkpoint's files by real path: its weights, config and those of other_files
    (names) it holds (tasks.TOKENIZER_FILES). A checkpoint rebuilt under the same path (a re-run stage, a chat
    template fixed in place) gives other numbers."""
    others = [os.path.join(path, name) for name in other_files if os.path.isfile(os.path.join(path, name))]
    return file_stamps(weight_files(path) + [os.path.join(path, "config.json")] + others)


def empty_model(cfg: ModelConfig, dtype, device) -> Transformer:
    """A Transformer allocated once, in dtype on device, with uninitialised weights."""
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty breaks the sharing; tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


# safetensors' names of the dtypes a header can give, as torch names them; the weights load_model takes
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
FLOAT_WEIGHTS = ("float32", "bfloat16", "float16", "float64")


def check_weights(path, cfg=None):
    """That a checkpoint's weight files hold what its config.json implies, read from their headers alone (no tensor
    is read, so eval.py checks every checkpoint before the first one's generation): each tensor a floating-point one
    (copy_ would cast an integer or fp8 tensor without a word: a damaged or quantized export) of its parameter's
    shape, none unexpected, none missing. Returns the tensor names per file. load_model calls it first."""
    from safetensors import SafetensorError, safe_open
    cfg = cfg or read_config(path)
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in Transformer(cfg).named_parameters()}  # (tied: no lm_head)
    embed, found, names = "model.embed_tokens.weight", set(), {}
    for file in weight_files(path):
        if not os.path.exists(file):
            raise UserError(f"{file}: weight shard listed in the index is missing")
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                names[file] = list(f.keys())
                for name in names[file]:
                    if name.endswith("rotary_emb.inv_freq"):
                        continue
                    into = embed if name == "lm_head.weight" and cfg.tie_word_embeddings else name
                    if into not in shapes:
                        raise UserError(f"{file}: unexpected tensor {name!r} for {cfg.arch}")
                    stored = f.get_slice(name)
                    dtype = SAFETENSORS_DTYPES.get(stored.get_dtype(), stored.get_dtype())
                    if dtype not in FLOAT_WEIGHTS:
                        raise UserError(f"{file}: tensor {name!r} has dtype {dtype}; expected a floating-point "
                                        f"weight ({', '.join(FLOAT_WEIGHTS)})")
                    if tuple(stored.get_shape()) != shapes[into]:
                        raise UserError(f"{file}: tensor {name!r} has shape {tuple(stored.get_shape())}, "
                                        f"config.json implies {shapes[into]}")
                    found.add(into)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{file}: cannot read weights ({e})")
    missing = sorted(set(shapes) - found)
    if missing:
        raise UserError(f"{path}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    return names


def load_model(path, dtype=torch.float32, device="cpu") -> Transformer:
    """Load a HF checkpoint directory, checked first (check_weights). Tensors are copied one at a time into the
    allocated model."""
    from safetensors import SafetensorError, safe_open
    cfg = read_config(path)
    names = check_weights(path, cfg)
    model = empty_model(cfg, parse_dtype(dtype), device)
    params = dict(model.named_parameters())
    tied_head = None  # (file, tensor): an lm_head.weight stored beside a tied config, settled after the embedding
    for file, file_names in names.items():
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in file_names:
                    if name.endswith("rotary_emb.inv_freq"):
                        continue
                    if name not in params:  # (check_weights: the head of a tied config)
                        tied_head = (file, f.get_tensor(name))
                        continue
                    with torch.no_grad():
                        params[name].copy_(f.get_tensor(name))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{file}: cannot read weights ({e})")
    if tied_head is not None:  # as transformers reads it: a head stored alone is the embedding; one beside it stays
        file, head = tied_head  # its own (untied, with a warning), which a tied model cannot be: refused unless equal
        embed = "model.embed_tokens.weight"
        if not any(embed in file_names for file_names in names.values()):
            with torch.no_grad():
                params[embed].copy_(head)
        elif not torch.equal(head.to(params[embed].dtype).to(params[embed].device), params[embed].detach()):
            raise UserError(f"{file}: tensor 'lm_head.weight' differs from {embed!r}, but config.json sets "
                            f"tie_word_embeddings true (transformers keeps both, untied): set tie_word_embeddings "
                            f"false in {os.path.join(path, 'config.json')}, or drop the tensor")
    return model


def save_model(model: Transformer, path, tokenizer=None, max_shard_bytes=5 * 2**30, dtype=None):
    """Write a HF checkpoint directory atomically: into a temporary directory, then renamed into place (a path that
    exists is first renamed aside, so a kill between the two renames leaves only that NAME.oldPID)."""
    path = os.path.abspath(path.rstrip("/"))
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write_model_files(model, tmp, tokenizer, max_shard_bytes, dtype)
        fsync_tree(tmp)  # the files on disk before the name (a resume trusts what the name holds)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_refused_write(path, e, "nothing was replaced")
        raise
    if os.path.exists(path):  # replace an older checkpoint of the same name
        old = f"{path}.old{os.getpid()}"
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)
    fsync_dir(os.path.dirname(path))


def write_model_files(model, tmp, tokenizer, max_shard_bytes, dtype):
    """save_model's files, written into directory tmp."""
    from safetensors.torch import save_file
    state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    shards, size = [{}], 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    cfg = dict(model.config.hf_config)
    cfg["dtype" if "dtype" in cfg else "torch_dtype"] = dtype_name(next(iter(state.values())).dtype)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
        # the ids our engine stops at, so transformers and vLLM stop there too (a base model's own config knows only
        # its EOS, and a chat-trained one would run past <|im_end|>)
        stop = stop_token_ids(tokenizer)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": tokenizer.bos_token_id, "eos_token_id": stop,
                       "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                       else (stop[0] if stop else None)},
                      f, indent=2)


def kv_bytes_per_token(cfg: ModelConfig, dtype_bytes=2) -> int:
    """KV-cache bytes of one token: a key and a value per layer and KV head."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype_bytes


# -----------------------------------------------------------------------------
# small models built offline (the tiny CPU preset, the tests, the memory model's presets)


def tiny_config(vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=None,
                max_position_embeddings=2048, tie_word_embeddings=True, arch="Qwen2ForCausalLM", **extra) -> dict:
    """A HF config.json dict for a small model of one of the supported architectures."""
    cfg = {"architectures": [arch],
           "model_type": {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "llama"}[SUPPORTED[arch]],
           "vocab_size": vocab_size, "hidden_size": hidden_size,
           "intermediate_size": intermediate_size or 3 * hidden_size,
           "num_hidden_layers": num_layers, "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
           "head_dim": hidden_size // num_heads, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
           "max_position_embeddings": max_position_embeddings, "tie_word_embeddings": tie_word_embeddings,
           "attention_dropout": 0.0, "use_sliding_window": False, "bos_token_id": None, "eos_token_id": None}
    if SUPPORTED[arch] == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    if SUPPORTED[arch] == "qwen3":
        cfg.update(attention_bias=False)
    cfg.update(extra)
    return cfg


def build_model(hf_config: dict, seed=0, std=0.02) -> Transformer:
    """A Transformer of this config.json dict with fresh weights like HF's initialisation: normal(0, std)
    matrices, zero biases, unit norms. The numbers are drawn on the CPU whatever the default device (a `with
    torch.device("cuda")` around this would otherwise draw on the GPU with the CPU generator: an error), so a seed
    gives the same weights on every device."""
    model = Transformer(ModelConfig.from_hf(hf_config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, device="cpu") * std)
    return model
