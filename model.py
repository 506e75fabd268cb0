"""
The language model, in one file: a decoder-only transformer that reads and writes
Hugging Face checkpoints of Qwen2/Qwen2.5, Qwen3 and Llama-3.x, the training
forward (per-token log-probs, padded or packed), and our own batched generation
with a preallocated KV cache.

Parameter names equal the Hugging Face ones, so a checkpoint's tensors load by name.
"""
import json
import math
import os
import shutil
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common import UserError

try:  # FlashAttention kernels on CUDA when the package is installed; SDPA otherwise
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
    HAVE_FLASH_ATTN = True
except ImportError:
    HAVE_FLASH_ATTN = False

SUPPORTED = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama"}
STOP_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>")


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

    @staticmethod
    def from_hf(cfg: dict, where: str = "config.json") -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = next((SUPPORTED[a] for a in archs if a in SUPPORTED), None)
        if arch is None:
            raise UserError(f"{where}: unsupported architecture {archs or cfg.get('model_type')!r}; "
                            f"supported: {', '.join(SUPPORTED)}")
        rope = cfg.get("rope_parameters") or {}          # transformers >= 5 keeps RoPE settings here
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind != "llama3":
                raise UserError(f"{where}: unsupported rope scaling {kind!r} (supported: llama3)")
        heads = cfg["num_attention_heads"]
        try:
            return ModelConfig(
                arch=arch, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
                num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
                head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
                rope_scaling=scaling, tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                max_position_embeddings=cfg.get("max_position_embeddings", 32768), hf_config=cfg)
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
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig, device=None):
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device) / cfg.head_dim))
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


def apply_rope(x, cos, sin):
    # x: (..., T, head_dim); cos/sin broadcastable, rotate-half convention as in HF
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.arch == "qwen2" or cfg.hf_config.get("attention_bias", False)
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
# attention modes: a padded batch, a packed row of sequences, one decode step on the KV cache


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


class Causal:
    """Right-padded (B, T) batch: plain causal attention (padding sits after every real token)."""

    def attend(self, attn, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


class Packed:
    """Many sequences in one row (1, N), boundaries in cu_seqlens = [0, l1, l1+l2, ..., N].

    Each sequence attends only to itself. With a KV cache given, the keys and values of sequence i
    are also written into cache rows cache_rows[i] (the prefill of generation).
    """

    def __init__(self, cu_seqlens, cache=None, cache_rows=None):
        self.cu = cu_seqlens
        self.bounds = cu_seqlens.tolist()
        self.cache, self.cache_rows = cache, cache_rows

    def attend(self, attn, q, k, v):
        if self.cache is not None:
            self.cache.store_prefill(attn.layer_idx, k[0], v[0], self.bounds, self.cache_rows)
        dtype = flash_dtype(q, k, v)
        if dtype is not None:
            cu = self.cu.to(torch.int32)
            maxlen = max(b - a for a, b in zip(self.bounds[:-1], self.bounds[1:]))
            q1, k1, v1 = (t[0] for t in flash_inputs(dtype, q, k, v))  # varlen layout: (N, heads, hd)
            y = flash_attn_varlen_func(q1, k1, v1, cu, cu, maxlen, maxlen, causal=True)
            return y.transpose(0, 1).unsqueeze(0)
        gqa = q.shape[1] != k.shape[1]
        lens = [b - a for a, b in zip(self.bounds[:-1], self.bounds[1:])]
        # split (not slice in a loop): in backward, split's gradient is one cat instead of a zero-filled
        # full-size gradient per sequence
        out = [F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=gqa)
               for qi, ki, vi in zip(q.split(lens, 2), k.split(lens, 2), v.split(lens, 2))]
        return torch.cat(out, dim=2)


class Decode:
    """One new token per cache row: write its key/value at the row's length, attend to the row's prefix."""

    def __init__(self, cache, span=None):
        self.cache = cache
        n = cache.rows
        self.lengths = cache.lengths[:n]
        # columns any row can see this step: generate passes a bound it knows on the host (no GPU sync)
        self.span = span or int(self.lengths.max().item()) + 1
        # decided once, from the cache: it cannot be cast, so flash runs only in the cache's own dtype
        # (the new token's q/k/v are cast to it; the SDPA path stores k/v in it too)
        dtype = flash_dtype(cache.k, cache.v)
        self.flash = dtype if dtype == cache.k.dtype else None
        if self.flash is None:
            cols = torch.arange(self.span, device=cache.k.device)
            self.mask = (cols[None, :] <= self.lengths[:, None])[:, None, None, :]  # (n, 1, 1, span)

    def attend(self, attn, q, k, v):
        c, n, i = self.cache, self.cache.rows, attn.layer_idx
        kc, vc = c.k[i, :n], c.v[i, :n]  # (n, nkv, max_len, hd)
        if self.flash is not None:  # writes k, v into the cache at self.lengths
            y = flash_attn_with_kvcache(*flash_inputs(self.flash, q, kc, vc, k, v),
                                        cache_seqlens=self.lengths.to(torch.int32), causal=True)
            return y.transpose(1, 2)
        rows = torch.arange(n, device=q.device)
        kc[rows, :, self.lengths] = k[:, :, 0]
        vc[rows, :, self.lengths] = v[:, :, 0]
        # attention of one query per row, written out: the query heads that share a kv head form one
        # matrix (no copies of the cache to repeat kv heads, as SDPA's GQA fallback makes)
        nh, nkv, hd = q.shape[1], kc.shape[1], q.shape[-1]
        scores = (q.view(n, nkv, nh // nkv, hd) @ kc[:, :, :self.span].transpose(-1, -2)).float() / math.sqrt(hd)
        scores.masked_fill_(~self.mask, float("-inf"))
        y = torch.softmax(scores, dim=-1).to(q.dtype) @ vc[:, :, :self.span]  # (n, nkv, group, hd)
        return y.view(n, nh, 1, hd)


class KVCache:
    """Preallocated keys/values for all layers: (layers, rows, kv_heads, max_len, head_dim).

    Row r holds its sequence from column 0; lengths[r] = tokens stored. Only the first `rows` rows
    are live: finished rows are dropped by moving live rows into their places (`drop`).
    """

    def __init__(self, cfg: ModelConfig, rows, max_len, dtype, device):
        shape = (cfg.num_layers, rows, cfg.num_kv_heads, max_len, cfg.head_dim)
        # zeros, not empty: masked-out columns still enter attention as 0 * value, and uninitialised
        # memory can hold NaN/inf bit patterns (0 * NaN = NaN), which made greedy outputs nondeterministic
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.rows, self.max_len = rows, max_len

    def store_prefill(self, layer, k, v, bounds, cache_rows):
        # k, v: (nkv, N, hd) for the packed prompts; sequence i goes to every row in cache_rows[i]
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            self.k[layer, cache_rows[i], :, : b - a] = k[:, a:b]
            self.v[layer, cache_rows[i], :, : b - a] = v[:, a:b]

    def drop(self, done, num_done=None, span=None):
        """Remove finished rows (done: bool per live row; num_done = their count and span a bound on the live
        lengths, when the caller knows them). The last live rows move into the holes, so a step copies only as
        many rows as finished. Returns each remaining row's previous index."""
        m = self.rows
        kept = m - (int(done.sum()) if num_done is None else num_done)
        order = torch.arange(kept, device=done.device)
        holes = done[:kept].nonzero().squeeze(-1)
        if holes.numel():
            movers = (~done[kept:]).nonzero().squeeze(-1) + kept
            span = span or int(self.lengths[movers].max())
            self.k[:, holes, :, :span] = self.k[:, movers, :, :span]
            self.v[:, holes, :, :span] = self.v[:, movers, :, :span]
            self.lengths[holes] = self.lengths[movers]
            order[holes] = movers
        self.rows = kept
        return order


# -----------------------------------------------------------------------------
# the model


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
        self.gradient_checkpointing = False  # recompute each block in backward to save activation memory

    def init_weights(self, seed=0, std=0.02):
        """Fresh weights like HF's initialisation (normal(0, std) matrices, zero biases, unit norms)."""
        device = self.lm_head.weight.device  # drawn where the weights live (fast for a 1.5B model on GPU)
        g = torch.Generator(device=device).manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("bias"):
                    p.zero_()
                elif p.ndim == 1:
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g, device=device) * std)
        return self

    def rope(self, positions, dtype):
        inv_freq = rope_inv_freq(self.config, positions.device)
        freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, idx, positions=None, cu_seqlens=None, ctx=None):
        """Final hidden states (B, T, hidden) for token ids idx (B, T).

        Padded mode (default): right-padded rows, positions 0..T-1.
        Packed mode: idx is (1, N) holding several sequences, cu_seqlens their boundaries.
        """
        if ctx is None:
            ctx = Packed(cu_seqlens) if cu_seqlens is not None else Causal()
        if positions is None:
            if cu_seqlens is not None:
                positions = packed_positions(cu_seqlens)[None]
            else:
                positions = torch.arange(idx.shape[1], device=idx.device)[None].expand(idx.shape[0], -1)
        x = self.model.embed_tokens(idx)
        cos, sin = self.rope(positions, x.dtype)
        for block in self.model.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, ctx, use_reentrant=False)
            else:
                x = block(x, cos, sin, ctx)
        return self.model.norm(x)

    def logits(self, idx, **kw):
        return self.lm_head(self.forward(idx, **kw)).float()

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
        logp = torch.log_softmax(self.lm_head(h).float() / temperature, dim=-1)
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


# -----------------------------------------------------------------------------
# generation


@dataclass
class Generation:
    prompt_index: int     # which prompt this sample answers
    tokens: list          # new token ids, including the stop token when finished
    logprobs: list        # log-prob of each new token under softmax(logits / temperature) (T=1 when greedy)
    finished: bool        # True when it ended with a stop token, False when it hit max_new_tokens
    switched: list | None = None  # cross-sampling: per token, True where it was drawn from the partner's distribution
    differs: list | None = None   # cross-sampling: per token, True where switched and the model's own distribution
    #                               would have given another token with the same random number


def stop_token_ids(tokenizer):
    """The ids that end a response: the tokenizer's EOS plus the usual chat terminators it knows."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in STOP_TOKENS if t in vocab}
    return sorted(ids)


def sampling_probs(logits, temperature, top_p):
    """The distribution sample_next draws from, for fp32 logits (rows, V) and temperature > 0: (log-probs of
    softmax(logits / T), its probabilities with everything outside the top-p nucleus set to 0, not renormalised)."""
    logp = torch.log_softmax(logits / temperature, -1)
    probs = logp.exp()
    if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return logp, probs


def nucleus(logits, temperature, top_p):
    """softmax(logits / T) truncated to its top-p nucleus and renormalised: what a row is sampled from."""
    probs = sampling_probs(logits, temperature, top_p)[1]
    return probs / probs.sum(-1, keepdim=True)


def js_divergence(p, q):
    """Jensen-Shannon divergence in nats of each row of p from the same row of q (distributions over the last
    dimension): KL(p || m) / 2 + KL(q || m) / 2 with m = (p + q) / 2, between 0 and ln 2. Zero entries add nothing,
    so distributions of different supports (top-p truncated) are fine. In float64: near-equal rows cancel."""
    p, q = p.double(), q.double()
    m = 0.5 * (p + q)

    def kl_to_m(a):  # where a > 0, m >= a / 2 > 0
        return torch.where(a > 0, a * (a.log() - m.log()), 0.0).sum(-1)
    return 0.5 * kl_to_m(p) + 0.5 * kl_to_m(q)


def draw(probs, u):
    """Inverse CDF: for each row the first token whose cumulative mass exceeds u (in [0, 1)) times the row's mass;
    that token has non-zero probability."""
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.shape[-1] - 1).squeeze(-1)


def sample_next(logits, temperature, top_p, generator):
    """Pick next tokens from fp32 logits (rows, V); returns (tokens, their log-probs)."""
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1)
    logp, probs = sampling_probs(logits, temperature, top_p)
    # one uniform number per row (far cheaper than torch.multinomial on CPU, no host sync on GPU)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)
    tok = draw(probs, u)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def cross_next(logits, partner_logits, temperature, top_p, generator, switch):
    """Cross-sampling's pick: each row draws from its model's distribution, or, where switch(p, q) (p, q: the two
    renormalised nuclei) is True, from the partner's. Both draws use the row's one uniform number, as sample_next
    does, so a row that never switches gets exactly sample_next's tokens. Returns (tokens, their log-probs under
    the distribution each came from, switched, differs: switched and the own draw would have been another token)."""
    if temperature == 0:
        raise ValueError("cross-sampling needs temperature > 0")
    logp, probs = sampling_probs(logits, temperature, top_p)
    logq, partner_probs = sampling_probs(partner_logits, temperature, top_p)
    switched = switch(probs / probs.sum(-1, keepdim=True), partner_probs / partner_probs.sum(-1, keepdim=True))
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)
    own, other = draw(probs, u), draw(partner_probs, u)
    tok = torch.where(switched, other, own)
    lp = torch.where(switched, logq.gather(-1, tok[:, None]).squeeze(-1), logp.gather(-1, tok[:, None]).squeeze(-1))
    return tok, lp, switched, switched & (other != own)


def prefill(model, prompts, n, cache):
    """Run the prompts packed in one row, storing each one's keys/values in its n cache rows; returns the fp32
    logits of every row's first new token (rows, V)."""
    device = model.lm_head.weight.device
    ids, cu = pack(prompts, device)
    cache_rows = [torch.arange(i * n, (i + 1) * n, device=device) for i in range(len(prompts))]
    hidden = model.forward(ids, cu_seqlens=cu, ctx=Packed(cu, cache, cache_rows))
    last = hidden[0, cu[1:] - 1]  # (P, hidden)
    cache.lengths[:] = torch.tensor([len(p) for p in prompts], device=device).repeat_interleave(n)
    return model.lm_head(last).float().repeat_interleave(n, 0)


def decode_step(model, tok, cache, span=None):
    """Feed one token per live cache row; returns the fp32 logits of the next one (rows, V). span: a bound on the
    columns any row can see (see Decode)."""
    hidden = model.forward(tok[:, None], positions=cache.lengths[: cache.rows, None], ctx=Decode(cache, span))
    cache.lengths[: cache.rows] += 1
    return model.lm_head(hidden[:, -1]).float()


@torch.no_grad()
def generate(model, prompts, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, stop_ids=(), seed=0,
             max_seq_len=None, cache_dtype=None, logits_hook=None, partner=None, switch=None):
    """Sample n responses for each prompt (lists of token ids, any lengths) in one batch.

    Each prompt is prefilled once (packed, no padding) and its keys/values copied into its n cache rows.
    Then one token per live row per step; a row that emits a stop id is finished and removed from the
    batch, so it costs nothing further. temperature=0 is greedy. Returns a list of Generation, prompt-major
    (all samples of prompt 0, then prompt 1, ...). logits_hook(logits, rows, step) -> logits, if given, edits the
    fp32 logits of the live rows (rows = their indices in the output) before each token is picked.

    Cross-sampling (token_shift.py): partner, a second model of the same vocabulary, decodes in lock-step with
    its own KV cache and is fed the same tokens; switch(p, q, rows, step) -> bool per live row chooses the rows
    that draw their next token from the partner's distribution q instead of the model's p (cross_next). Each
    Generation then also holds `switched` and `differs` per token. A switch that is never True gives exactly
    the model's own samples of the same seed, one that is always True the partner's.
    """
    if is_sharded(model):  # FSDP's forward would all-gather every block at every decode step
        raise ValueError("generate() needs full weights: pass full_copy(model, dtype), not the sharded model")
    models = [model] if partner is None else [model, partner]
    device = model.lm_head.weight.device
    if partner is not None and (switch is None or temperature == 0 or is_sharded(partner)
                                or partner.config.vocab_size != model.config.vocab_size
                                or partner.lm_head.weight.device != device):
        raise ValueError("cross-sampling needs a switch, temperature > 0 and an unsharded partner of the same "
                         "vocabulary on the same device")
    max_seq_len = max_seq_len or min(m.config.max_position_embeddings for m in models)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise UserError(f"prompt {i} is empty")
        if len(p) + max_new_tokens > max_seq_len:
            raise UserError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it needs "
                            f"{len(p) + max_new_tokens} > the model's {max_seq_len}-token context")
    rows = len(prompts) * n
    longest = max(map(len, prompts))
    caches = [KVCache(m.config, rows, longest + max_new_tokens, cache_dtype or m.lm_head.weight.dtype, device)
              for m in models]
    gen = torch.Generator(device=device).manual_seed(seed)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)

    # prefill: all prompts packed in one row; sample n first tokens from each prompt's last position
    logits = [prefill(m, prompts, n, c) for m, c in zip(models, caches)]

    out_tokens = torch.zeros(rows, max_new_tokens, dtype=torch.long, device=device)
    out_logprobs = torch.zeros(rows, max_new_tokens, dtype=torch.float32, device=device)
    out_switched = torch.zeros(rows, max_new_tokens, dtype=torch.bool, device=device)
    out_differs = torch.zeros(rows, max_new_tokens, dtype=torch.bool, device=device)
    out_len = torch.zeros(rows, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    live = torch.arange(rows, device=device)  # original row index of each live cache row
    for step in range(max_new_tokens):
        if logits_hook is not None:
            logits[0] = logits_hook(logits[0], live, step)
        if partner is None:
            tok, lp = sample_next(logits[0], temperature, top_p, gen)
        else:
            tok, lp, switched, differs = cross_next(logits[0], logits[1], temperature, top_p, gen,
                                                    lambda p, q: switch(p, q, live, step))
            out_switched[live, step], out_differs[live, step] = switched, differs
        out_tokens[live, step] = tok
        out_logprobs[live, step] = lp
        out_len[live] = step + 1
        done = torch.isin(tok, stop)
        finished[live] = done
        if step == max_new_tokens - 1:
            break
        span = longest + step + 1  # every live row holds its prompt + `step` tokens: a bound known on the host
        num_done = int(done.sum())  # the step's one host sync
        if num_done:  # drop finished rows from the batch (and their cache rows, in every cache alike)
            order = [c.drop(done, num_done, span) for c in caches][0]
            if order.numel() == 0:
                break
            live, tok = live[order], tok[order]
        logits = [decode_step(m, tok, c, span) for m, c in zip(models, caches)]

    out_tokens, out_logprobs, out_switched, out_differs, out_len, finished = (
        t.cpu() for t in (out_tokens, out_logprobs, out_switched, out_differs, out_len, finished))
    cross = partner is not None
    return [Generation(r // n, out_tokens[r, :out_len[r]].tolist(), out_logprobs[r, :out_len[r]].tolist(),
                       bool(finished[r]), out_switched[r, :out_len[r]].tolist() if cross else None,
                       out_differs[r, :out_len[r]].tolist() if cross else None) for r in range(rows)]


# -----------------------------------------------------------------------------
# sharding: FSDP2 for training, a full copy for generation
#
# Training scripts shard the model with PyTorch's FSDP2: each rank keeps 1/world of the fp32 weights (the
# master copy the optimizer updates), of the gradients and of the AdamW state; a block's weights are
# all-gathered in the compute dtype just before it runs and freed after. Every forward and backward is
# therefore a collective that all ranks must join. Generation instead runs on a plain full copy gathered
# once (full_copy): no collective inside the decode loop, and ranks may generate different lengths.


def shard_model(model: Transformer, compute_dtype=torch.float32) -> Transformer:
    """Shard an fp32 model over all ranks with FSDP2: each block, then the rest (embeddings, final norm, lm_head).

    Forward and backward run in compute_dtype; gradients are reduce-scattered in fp32 and SUMMED over ranks
    (FSDP's default is the mean): every loss in this project is already normalised over the global batch, so
    the sum of the ranks' gradients is the gradient of the global loss. Works on 1 rank, N GPUs (NCCL), several
    nodes, and CPU ranks under gloo. One fp32 rank (the CPU preset) keeps the plain model."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    import common
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("shard_model expects fp32 weights (they are the master copy); compute_dtype sets the compute")
    if common.world_size() == 1 and compute_dtype == torch.float32:
        return model  # nothing to shard and nothing to cast: FSDP's hooks would only cost time (~20% on CPU)
    policy = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                                  reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    return model


def full_tensor(t):
    """The whole of a parameter or gradient, FSDP-sharded or not (a collective when sharded: every rank calls it)."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_tensor(t):
    """This rank's part of a parameter, gradient or optimizer state: a sharded tensor's local shard, else all of it."""
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(model.lm_head.weight, DTensor)


@torch.no_grad()
def full_copy(model: Transformer, dtype, device=None, on_rank=None):
    """A plain, unsharded Transformer holding the full weights of `model` (sharded or not) in dtype.

    Each tensor is cast to dtype, then gathered (every rank must call this); peak extra memory is the copy plus
    one full tensor. With on_rank, only that rank keeps the copy and the others get None (checkpoints)."""
    import common
    keep = on_rank is None or common.rank() == on_rank
    device = device or model.lm_head.weight.device
    copy = empty_model(model.config, dtype, device).requires_grad_(False) if keep else None
    for name, p in model.named_parameters():
        full = full_tensor(p.detach().to(dtype))
        if keep:
            copy.get_parameter(name).copy_(full)
    return copy.eval() if keep else None


def idle_pass(model: Transformer, backward=True):
    """A forward (and backward) on a 2-token dummy that adds nothing to any gradient. A rank that has run out of
    micro-batches runs it so that it still joins the collectives of FSDP's forward and backward."""
    device = model.lm_head.weight.device
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    hidden = model(ids, cu_seqlens=torch.tensor([0, 2], device=device))
    lp = model.token_logprobs(hidden[0, :1], ids[0, 1:])
    if backward:
        (lp.sum() * 0.0).backward()


# -----------------------------------------------------------------------------
# Hugging Face checkpoints


def parse_dtype(dtype):
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(names)}")
    return names[dtype]


def read_config(path) -> ModelConfig:
    if not os.path.isdir(path):
        raise UserError(f"{path}: checkpoint directory not found")
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path) as f:
            return ModelConfig.from_hf(json.load(f), cfg_path)
    except FileNotFoundError:
        raise UserError(f"{cfg_path}: not found (not a Hugging Face checkpoint directory)")
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_path}: not valid JSON ({e.msg})")


def weight_files(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise UserError(f"{index}: unreadable shard index ({e})")
        return [os.path.join(path, f) for f in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise UserError(f"{path}: no model.safetensors or model.safetensors.index.json")


def empty_model(cfg: ModelConfig, dtype, device) -> Transformer:
    """A Transformer allocated once, in dtype on device, with uninitialised weights."""
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty breaks the sharing; tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def load_model(path, dtype=torch.float32, device="cpu") -> Transformer:
    """Load a HF checkpoint directory. Tensors are copied one at a time into the allocated model."""
    from safetensors import SafetensorError, safe_open
    cfg = read_config(path)
    model = empty_model(cfg, parse_dtype(dtype), device)
    params = dict(model.named_parameters())
    loaded = set()
    for file in weight_files(path):
        if not os.path.exists(file):
            raise UserError(f"{file}: weight shard listed in the index is missing")
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name not in params:
                        if name == "lm_head.weight" and cfg.tie_word_embeddings:
                            continue
                        if name.endswith("rotary_emb.inv_freq"):
                            continue
                        raise UserError(f"{file}: unexpected tensor {name!r} for {cfg.arch}")
                    t = f.get_tensor(name)
                    if t.shape != params[name].shape:
                        raise UserError(f"{file}: tensor {name!r} has shape {tuple(t.shape)}, "
                                        f"config.json implies {tuple(params[name].shape)}")
                    with torch.no_grad():
                        params[name].copy_(t)
                    loaded.add(name)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{file}: cannot read weights ({e})")
    missing = sorted(set(params) - loaded - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    if missing:
        raise UserError(f"{path}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    return model


def load_tokenizer(path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load tokenizer ({e})")


def save_model(model: Transformer, path, tokenizer=None, max_shard_bytes=5 * 2**30, dtype=None):
    """Write a HF checkpoint directory atomically: into a temporary directory, then renamed into place."""
    from safetensors.torch import save_file
    path = os.path.abspath(path.rstrip("/"))
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
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
    cfg["dtype" if "dtype" in cfg else "torch_dtype"] = str(next(iter(state.values())).dtype).replace("torch.", "")
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
        # the ids our engine stops at, so transformers and vLLM stop there too (a base model's own config knows only
        # its EOS, and a chat-trained one would run past <|im_end|>)
        stop = stop_token_ids(tokenizer)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": tokenizer.bos_token_id, "eos_token_id": stop,
                       "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]}, f, indent=2)
    if os.path.exists(path):  # replace an older checkpoint of the same name
        old = f"{path}.old{os.getpid()}"
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)


# -----------------------------------------------------------------------------
# tiny models for tests and the CPU preset (built offline)

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


# Qwen2's pre-tokenizer split (digits one by one). Our tiny tokenizers use it too, so a tokenizer folder
# tokenizes the same whether transformers loads it alone or, beside a qwen2 config.json, as Qwen2Tokenizer.
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def build_tokenizer(texts, vocab_size=1024, path=None, pad_to=None):
    """Train a small byte-level BPE on `texts` with Qwen2's normaliser and pre-tokenizer, Qwen-style special
    tokens (<|endoftext|> = EOS, <|im_start|>, <|im_end|>) and chat template. Saved in HF format if path.

    pad_to: pad the vocabulary with entries that encoding never produces ("<unused_N>") up to this size, so
    that a random model of a real vocabulary (151,936 for Qwen2.5) can decode every id it samples."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if pad_to and pad_to > tok.get_vocab_size():
        spec = json.loads(tok.to_str())
        vocab = spec["model"]["vocab"]
        for i in range(pad_to):
            if len(vocab) == pad_to:
                break
            vocab.setdefault(f"<unused_{i}>", len(vocab))
        tok = Tokenizer.from_str(json.dumps(spec))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                 additional_special_tokens=specials[1:])
    hf.chat_template = CHAT_TEMPLATE
    if path:
        hf.save_pretrained(path)
    return hf


def tiny_config(vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=None,
                max_position_embeddings=2048, tie_word_embeddings=True, arch="Qwen2ForCausalLM", **extra) -> dict:
    """A HF config.json dict for a small model of one of the supported architectures."""
    cfg = {"architectures": [arch], "model_type": {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "llama"}[SUPPORTED[arch]],
           "vocab_size": vocab_size, "hidden_size": hidden_size, "intermediate_size": intermediate_size or 3 * hidden_size,
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


def build_model(hf_config: dict, seed=0) -> Transformer:
    return Transformer(ModelConfig.from_hf(hf_config)).init_weights(seed)
