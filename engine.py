"""
Our batched generation with a KV cache, shaped for CUDA graphs (after nanochat's engine.py, gpt-fast and nano-vllm).

Rows (one per (prompt, sample)) stream through a fixed set of cache *slots*: a prompt is prefilled once, packed
without padding with the others admitted at the same time, and its keys/values copied into its rows' slots; then
every step feeds one token to each slot. A slot whose row has finished is refilled with the next row at the host's
next look (continuous batching), so the long tail of one batch overlaps the next batch's work. The decode step works
on static shapes, a row bucket and a column bound rounded up to a block, reads and writes only buffers allocated
once (kept across calls), and never syncs with the host: finished rows keep running, masked, until the host looks
(every `sync_every` steps), collects them and refills or compacts. On CUDA each (rows, columns) shape is captured
once as a CUDA graph and replayed; on CPU the same step runs eagerly.

Sampling (temperature, top-p) draws each token with one uniform number that depends only on (seed, sample, position),
a counter-based hash: a row's random numbers do not depend on its slot, the number of slots, the buckets or the batch
it ran in, nor do its tokens in float64; in fp32 or bf16 the logits round with the batch's shape, so a token on a
boundary of the inverse CDF moves, and the row differs from there: now and then in fp32, often in bf16.
token_shift.py's cross-sampling runs a second model in lock-step (generate's partner). sample_responses generates and
scores over a task's records: what sampling, evaluation and RL rollouts share.
"""
import functools
import math
import numbers
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel
from torch.utils._triton import has_triton

from common import MIN_TEMPERATURE, UserError, generation_stop_ids, out_of_memory, progress_bar
from model import (HALF, HAVE_FLASH_ATTN, LOOP_BACKENDS, Packed, apply_rope, flash_dtype, flash_inputs,
                   kv_bytes_per_token, pack, packed_positions, rms_norm, rope_cos_sin)
from parallel import full_tensor, is_sharded, reshard
from tasks import encode_prompts, reward_of

if HAVE_FLASH_ATTN:
    from flash_attn import flash_attn_with_kvcache

MASK32 = 0xFFFFFFFF
MAX_STOP_IDS = 8  # the stop ids live in a fixed-size buffer (padded with -1), so one captured graph serves any set


# -----------------------------------------------------------------------------
# sampling: no host sync, and each token's random number a function of (seed, sample, position)


def _mix32(x):
    """A 32-bit integer hash (two rounds of xor-shift-multiply) on int64 tensors holding values below 2**32; every
    product stays below 2**63, so it is exact and the same on every device."""
    for _ in range(2):
        x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
    return (x >> 16) ^ x


def sample_keys(seed, samples):
    """The half of keyed_uniforms' hash that depends on (seed, sample) only, int64 tensors seed (a scalar below
    2**32) and samples (rows,): computed once per row, when it is admitted."""
    return _mix32(seed ^ _mix32(samples & MASK32))


def keyed_uniforms(keys, positions):
    """One number in (0, 1) per (sample, position), a hash of (seed, sample, position): keys = sample_keys(seed,
    samples), positions (rows,); returns (rows, 1) fp32 with 24 random bits. What the decode step computes (one
    kernel in the fused ops). The one draw in 2**24 that hashes to 0 is taken at half a step, 2**-25: at 0, the
    inverse-CDF search drew the lowest-id token of non-zero probability however unlikely (log p -82 seen), where
    every other draw lands in its cell of the distribution; no other draw changes."""
    h = _mix32(keys ^ _mix32((positions + 0x5BD1E995) & MASK32))
    return ((h >> 8).float() * 2.0**-24).clamp_(min=2.0**-25)[:, None]


def seed32(seed):
    """The 32-bit key of a (64-bit) seed, for sample_keys. Seeds of one key draw the same samples (1 and 2**32: their
    halves XOR alike); of N derived seeds (common.derive_seed) two share a key with a chance of about N**2 / 2**33,
    1e-4 for a thousand."""
    return (seed ^ (seed >> 32)) & MASK32


def sampling_probs(logits, temperature, top_p):
    """The distribution sample_next draws from, for fp32 logits (rows, V) and temperature > 0: (log-probs of
    softmax(logits / T), its probabilities with everything outside the top-p nucleus set to 0, not renormalised).
    Tokens tied at the nucleus's edge are taken in id order (a stable sort: the CPU's other sort kept an arbitrary
    one of them, which bf16-rounded logits tie often, where CUDA's kept the lowest id)."""
    logp = torch.log_softmax(logits if temperature == 1 else logits / temperature, -1)  # x / 1 = x: one pass less
    probs = logp.exp()
    if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # the mass before a token already reaches top_p
        drop[..., 0] = False  # (the most likely token always stays)
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return logp, probs


def nucleus(logits, temperature, top_p):
    """softmax(logits / T) truncated to its top-p nucleus and renormalised: what a row is sampled from."""
    probs = sampling_probs(logits, temperature, top_p)[1]
    return probs / probs.sum(-1, keepdim=True)


def draw(probs, u):
    """Inverse CDF: for each row the first token whose cumulative mass exceeds u (in [0, 1)) times the row's mass;
    that token has non-zero probability."""
    return inverse_cdf(probs.cumsum(-1), u)


def inverse_cdf(cdf, u):
    """draw's search, over the rows' cumulative masses cdf (rows, V): (rows,) tokens."""
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)


def sample_next(logits, temperature, top_p, u):
    """Pick next tokens from fp32 logits (rows, V) with one uniform number per row, u (rows, 1); returns (tokens,
    their log-probs under softmax(logits / T), T = 1 when greedy)."""
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1)
    logp, probs = sampling_probs(logits, temperature, top_p)
    tok = draw(probs, u)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def sampler_block(vocab):
    """sample_blocked's block: the largest power of two up to 1,024 that divides the vocabulary (128 for Qwen2.5's
    151,936; 1 for a prime one, where the blocked sampler still draws right, only slowly)."""
    return max(b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if vocab % b == 0)


def sample_blocked(logits, temperature, u):
    """sample_next at top_p = 1 from logits (rows, V) of any float dtype, reading them about once (generate's
    blocked_sampler, compiled with the fused ops): where the step casts the logits to fp32 and sample_next writes the
    full-vocabulary log-probs, probabilities and CDF (~36 bytes moved per logit: 5.6 GB a step at 1,024 rows x 152K
    entries, ~1.2 ms at an H200's datasheet bandwidth), this keeps per row only each block's maximum and its mass,
    draws the block by their inverse CDF, then the token inside it by the block's own. Exact arithmetic gives
    sample_next's token for the same u, and log-prob x - max - log(mass); fp32 rounds the sums in another order, so
    a token differs where u lies within that rounding of a boundary (never one of probability 0).
    Greedy (temperature 0): the argmax, and its log-prob -log(sum of exp(x - max))."""
    x = logits.float() if logits.dtype in HALF else logits  # (bf16 logits: the cast fused into the reads)
    if temperature not in (0, 1):  # x / 1 = x: one pass less
        x = x / temperature
    rows, vocab = x.shape
    if temperature == 0:
        m = x.amax(-1, keepdim=True)
        return x.argmax(-1), -(x - m).exp().sum(-1).log()
    block = sampler_block(vocab)
    blocks = x.view(rows, vocab // block, block)
    # each block's max and its mass under it: one read of the logits, a block being short enough for one pass; a
    # block of -inf only (banned tokens) gets a finite max, so that its mass is 0, not NaN
    peak = blocks.amax(-1).clamp(min=torch.finfo(torch.float32).min)
    m = peak.amax(-1, keepdim=True)
    cdf = ((blocks - peak[..., None]).exp().sum(-1) * (peak - m).exp()).cumsum(-1)
    b = inverse_cdf(cdf, u)  # the block, one of non-zero mass
    before = torch.where(b > 0, cdf.gather(-1, (b - 1).clamp(min=0)[:, None]).squeeze(-1), 0.0)
    rest = (u * cdf[:, -1:]).squeeze(-1) - before  # the mass left to walk inside the block
    cols = b[:, None] * block + torch.arange(block, device=x.device)
    within = (x.gather(-1, cols) - m).exp().cumsum(-1)
    # the block's own sum rounds differently from its mass in cdf: keep rest below it, so the token has mass
    rest = torch.minimum(rest, within[:, -1] * (1 - 2.0**-23))
    t = torch.searchsorted(within, rest[:, None], right=True).clamp_(max=block - 1).squeeze(-1)
    tok = b * block + t
    return tok, x.gather(-1, tok[:, None]).squeeze(-1) - m.squeeze(-1) - cdf[:, -1].log()


def cross_next(logits, partner_logits, temperature, top_p, u, switch):
    """Cross-sampling's pick: each row draws from its model's distribution, or, where switch(p, q) (p, q: the two
    renormalised nuclei) is True, from the partner's. Both draws use the row's one uniform number, as sample_next
    does, so a row that never switches gets exactly sample_next's tokens. Returns (tokens, their log-probs under
    the distribution each came from, switched, differs: switched and the own draw would have been another token)."""
    if temperature == 0:
        raise ValueError("cross-sampling needs temperature > 0")
    logp, probs = sampling_probs(logits, temperature, top_p)
    logq, partner_probs = sampling_probs(partner_logits, temperature, top_p)
    switched = switch(probs / probs.sum(-1, keepdim=True), partner_probs / partner_probs.sum(-1, keepdim=True))
    own, other = draw(probs, u), draw(partner_probs, u)
    tok = torch.where(switched, other, own)
    lp = torch.where(switched, logq.gather(-1, tok[:, None]).squeeze(-1), logp.gather(-1, tok[:, None]).squeeze(-1))
    return tok, lp, switched, switched & (other != own)


# -----------------------------------------------------------------------------
# the weights generation reads, and its buffers; both allocated once and kept across calls


def weight_layout(model):
    """name -> the model's tensors that generation reads as one: q/k/v and gate/up fused into one matrix each
    (one matmul instead of three or two), the rest as they are."""
    layout = {"embed": [model.model.embed_tokens.weight], "norm": [model.model.norm.weight]}
    if not model.config.tie_word_embeddings:
        layout["lm_head"] = [model.lm_head.weight]
    for i, block in enumerate(model.model.layers):
        a, m = block.self_attn, block.mlp
        layout[f"{i}.qkv"] = [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]
        if a.q_proj.bias is not None:
            layout[f"{i}.qkv_bias"] = [a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]
        layout[f"{i}.o"] = [a.o_proj.weight]
        layout[f"{i}.gate_up"] = [m.gate_proj.weight, m.up_proj.weight]
        layout[f"{i}.down"] = [m.down_proj.weight]
        layout[f"{i}.ln1"] = [block.input_layernorm.weight]
        layout[f"{i}.ln2"] = [block.post_attention_layernorm.weight]
        if hasattr(a, "q_norm"):
            layout[f"{i}.q_norm"], layout[f"{i}.k_norm"] = [a.q_norm.weight], [a.k_norm.weight]
    return layout


class GenWeights:
    """Generation's own copy of a model's weights in weight_layout, in dtype (default: the model's), with RoPE's cos/sin
    table over every position. The model may be FSDP-sharded: each tensor is then gathered in turn (a collective:
    every rank builds it), so no plain full copy of the model is made. load() refills it in place, so the CUDA graphs
    captured on it stay valid. generate() takes it in place of a model."""

    serials = iter(range(1, 2**62))  # each copy's number: captured graphs are tied to the copies they read

    def __init__(self, model, dtype=None):
        self.config = model.config
        self.dtype, self.device = dtype or model.lm_head.weight.dtype, model.lm_head.weight.device
        self.serial = next(GenWeights.serials)
        self.w = {name: torch.empty((sum(t.shape[0] for t in ts), *ts[0].shape[1:]), dtype=self.dtype,
                                    device=self.device) for name, ts in weight_layout(model).items()}
        positions = torch.arange(self.config.max_position_embeddings, device=self.device)
        self.rope = torch.stack(rope_cos_sin(self.config, positions, self.dtype), 1)  # (positions, 2: cos, sin, hd)
        self.load(model)

    def fits(self, model, dtype):
        return (model.config.hf_config == self.config.hf_config and dtype == self.dtype
                and model.lm_head.weight.device == self.device)

    @torch.no_grad()
    def load(self, model):
        sharded = is_sharded(model)
        if sharded:
            reshard(model)  # read shards, not the root group a no-grad forward left gathered
        for name, ts in weight_layout(model).items():
            at = 0
            for t in ts:
                self.w[name][at:at + t.shape[0]].copy_(full_tensor(t.detach().to(self.dtype)) if sharded else t)
                at += t.shape[0]
        self.lm_head = self.w.get("lm_head", self.w["embed"])
        self.layers = [{k.split(".", 1)[1]: t for k, t in self.w.items() if k.startswith(f"{i}.")}
                       for i in range(self.config.num_layers)]
        return self


def rope_qkv(qkv, cos, sin, heads):
    """RoPE on the query and key heads of one (N, heads + 2 * kv_heads, head_dim) q/k/v projection. Returns (q (N,
    heads, hd), kv (N, 2, kv_heads, hd)): the rotated keys and the values in one tensor, so the KV cache takes both
    in one write. The same element-wise arithmetic as rotating q and k apart, so the same bits."""
    n, width, hd = qkv.shape
    kv_heads = (width - heads) // 2
    qk = apply_rope(qkv[:, :heads + kv_heads], cos, sin)
    kv = torch.cat([qk[:, heads:], qkv[:, heads + kv_heads:]], 1)
    return qk[:, :heads], kv.view(n, 2, kv_heads, hd)


def add_rms_norm(x, y, weight, eps):
    """The residual stream x + y and its RMSNorm (the next sublayer's input): one kernel when fused."""
    x = x + y
    return x, rms_norm(x, weight, eps)


def silu_mul(gate_up):
    gate, up = gate_up.chunk(2, -1)
    return F.silu(gate) * up


def merge_splits(out, lse, used):
    """Flash-decoding's merge of one query's attention over the parts of its keys: out (rows, parts, heads, hd) each
    part's own softmax-weighted values, lse (heads, rows * parts) each part's log-sum-exp, used (rows, parts) its
    key count (a part with none is left out: FA2 marks its lse +inf). Each part weighs in by its share of the
    row's softmax mass, in lse's precision (fp32 from FA2). Returns (rows, heads, hd) in out's dtype."""
    empty = (used == 0)[..., None]  # (rows, parts, 1); part 0 of a row always has keys (its new one)
    lse = lse.view(lse.shape[0], *used.shape).permute(1, 2, 0).masked_fill(empty, -float("inf"))
    share = torch.softmax(lse, 1)  # (rows, parts, heads): exp(lse_s) over their sum
    # (and whatever the kernel left in an empty part's output is not read)
    return torch.where(empty[..., None], 0.0, share[..., None] * out.to(share.dtype)).sum(1).to(out.dtype)


# the step's small element-wise pieces: eagerly, several kernels each (RMSNorm 6-8, RoPE and the K/V join 6, the
# sampler's hash ~20, the blocked sampler ~20)
EAGER_OPS = SimpleNamespace(rms_norm=rms_norm, add_rms_norm=add_rms_norm, rope_qkv=rope_qkv,
                            silu_mul=silu_mul, keyed_uniforms=keyed_uniforms, sample_blocked=sample_blocked,
                            merge_splits=merge_splits)


@functools.cache
def fused_ops():
    """EAGER_OPS compiled by torch.compile, about one kernel each (compiled once, for any number of rows: dynamic
    shapes). generate(fused=True) uses them; the first call compiles (seconds on a GPU, ~20 s on a CPU)."""
    return SimpleNamespace(**{name: torch.compile(fn, dynamic=True, fullgraph=True)
                              for name, fn in vars(EAGER_OPS).items()})


def forward(gw, ids, positions, attend, ops=EAGER_OPS):
    """Final hidden states (N, hidden) of N tokens at these positions, attend(layer, q, kv) being the attention of
    (N, heads, head_dim) queries over (N, 2, kv_heads, head_dim) keys and values, which returns (N, heads *
    head_dim). The model's own forward (model.py) in generation's layout: prefill (packed prompts) and decode (one
    token per slot) both run it. ops: its element-wise pieces, eager or fused."""
    cfg = gw.config
    nh, nkv, hd, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    n = ids.shape[0]
    x = F.embedding(ids, gw.w["embed"])
    cos_sin = gw.rope[positions][:, :, None]
    cos, sin = cos_sin[:, 0], cos_sin[:, 1]  # (N, 1, hd): one table for every head
    h = ops.rms_norm(x, gw.layers[0]["ln1"], eps)
    for i, w in enumerate(gw.layers):
        qkv = F.linear(h, w["qkv"], w.get("qkv_bias")).view(n, nh + 2 * nkv, hd)
        if "q_norm" in w:  # Qwen3 normalises q and k per head before RoPE
            q, k, v = qkv.split([nh, nkv, nkv], 1)
            qkv = torch.cat([ops.rms_norm(q, w["q_norm"], eps), ops.rms_norm(k, w["k_norm"], eps), v], 1)
        q, kv = ops.rope_qkv(qkv, cos, sin, nh)
        x, h = ops.add_rms_norm(x, F.linear(attend(i, q, kv), w["o"]), w["ln2"], eps)
        after = gw.layers[i + 1]["ln1"] if i + 1 < len(gw.layers) else gw.w["norm"]  # the next norm
        x, h = ops.add_rms_norm(x, F.linear(ops.silu_mul(F.linear(h, w["gate_up"])), w["down"]), after, eps)
    return h


class Slots:
    """Everything the decode step reads and writes, allocated once: per model a KV cache (layers, 2, slots, kv_heads,
    max_len, head_dim), keys then values (one write stores a token's both), and per slot its sample id (-1: free)
    and its key (sample_keys), stored tokens (`lengths`), next input token, tokens generated (`pos`), whether it is
    still generating (`alive`) and ended on a stop id (`stopped`), and its output tokens / log-probs (cross-sampling:
    switched / differs) by position, with one spare column that rows past their end write into (so the step needs no
    branch)."""

    def __init__(self, cfgs, count, max_len, max_new, dtypes, device):
        self.count, self.max_len, self.width = count, max_len, max_new + 1
        self.caches = []
        for cfg, dtype in zip(cfgs, dtypes):
            # zeros, not empty: masked-out columns still enter attention as 0 * value, and uninitialised memory can
            # hold NaN/inf bit patterns (0 * NaN = NaN)
            self.caches.append(torch.zeros((cfg.num_layers, 2, count, cfg.num_kv_heads, max_len, cfg.head_dim),
                                           dtype=dtype, device=device))
        z = dict(device=device, dtype=torch.long)
        self.sample, self.lengths, self.tok, self.pos = (torch.zeros(count, **z) for _ in range(4))
        self.key = torch.zeros(count, **z)  # the sample's half of the sampler's hash (sample_keys)
        self.force = torch.zeros(count, **z)  # benchmarks: the length each row is forced to stop at
        self.alive, self.stopped = (torch.zeros(count, dtype=torch.bool, device=device) for _ in range(2))
        self.out_tok = torch.zeros(count, self.width, **z)
        self.out_lp = torch.zeros(count, self.width, dtype=torch.float32, device=device)
        self.out_switched, self.out_differs = (torch.zeros(count, self.width, dtype=torch.bool, device=device)
                                               for _ in range(2))
        self.rows, self.cols = torch.arange(count, device=device), torch.arange(max_len, device=device)
        self.seed, self.max_new = torch.zeros((), **z), torch.zeros((), **z)
        self.stop = torch.full((MAX_STOP_IDS,), -1, **z)
        self.graphs, self.graphs_read, self.pool = {}, (), None  # CUDA graphs by shape, the weights they read
        self.stream = None  # the side stream of the graphs' warm-up steps
        # generate sets these for each call
        self.forcing, self.ops, self.fa2, self.fa2_splits, self.blocked_sampler = False, EAGER_OPS, False, None, False

    def fits(self, cfgs, count, max_len, max_new, dtypes, device):
        return (len(cfgs) == len(self.caches) and count <= self.count and max_len <= self.max_len
                and max_new < self.width and self.rows.device == device
                and all((kv.dtype, kv.shape[0], kv.shape[3], kv.shape[5])
                        == (d, c.num_layers, c.num_kv_heads, c.head_dim)
                        for kv, c, d in zip(self.caches, cfgs, dtypes)))

    def move(self, holes, movers, span):
        """Slots movers -> slots holes (index tensors): caches up to column span (the columns beyond are zeroed: what a
        hole's earlier row left there would be read under the mask), and every per-slot buffer."""
        for kv in self.caches:
            kv[:, :, holes, :, :span] = kv[:, :, movers, :, :span]
            kv[:, :, holes, :, span:] = 0
        for t in (self.sample, self.key, self.lengths, self.tok, self.pos, self.force, self.alive, self.stopped,
                  self.out_tok, self.out_lp, self.out_switched, self.out_differs):
            t[holes] = t[movers]
        self.alive[movers] = False


_kept = {}  # "weights0", "weights1" (the partner), "slots": what generation allocated, kept for the next call
# CUDA graphs captured since the process started, and the host's seconds in their warm-ups and captures (each
# capture synchronizes first; a process's first calls compile the fused ops, in its first prefill and partly in its
# first warm-up; train_rl logs both per step)
stats = {"graph_captures": 0, "capture_s": 0.0}


def release():
    """Free generation's kept weights, KV caches and CUDA graphs (train_rl.py does before each update)."""
    _kept.clear()


def kept_weights(model, role, dtype):
    """A GenWeights as is; for a model, the kept copy of its role refilled with it in place (allocated on first use),
    so the CUDA graphs captured on it stay valid. A sharded model is gathered: every rank must call this together."""
    if isinstance(model, GenWeights):
        return model
    gw = _kept.get(f"weights{role}")
    if gw is not None and gw.fits(model, dtype or model.lm_head.weight.dtype):
        return gw.load(model)
    _kept.pop(f"weights{role}", None)
    gw = None  # the old copy is freed before the new one is allocated (no reference left to it)
    gw = _kept[f"weights{role}"] = GenWeights(model, dtype)
    return gw


def kept_slots(cfgs, count, max_len, max_new, dtypes, device):
    slots = _kept.get("slots")
    if slots is None or not slots.fits(cfgs, count, max_len, max_new, dtypes, device):
        if slots is not None:  # grow to cover both, so alternating calls do not reallocate every time
            count, max_len = max(count, slots.count), max(max_len, slots.max_len)
            max_new = max(max_new, slots.width - 1)
        _kept["slots"] = slots = None  # the old cache and its graphs are freed before the new one is allocated
        try:
            slots = _kept["slots"] = Slots(cfgs, count, max_len, max_new, dtypes, device)
        except Exception as e:  # noqa: BLE001 -- only the allocator's refusal is said otherwise
            if not out_of_memory(e):
                raise
            gib = sum(kv_bytes_per_token(c, d.itemsize) for c, d in zip(cfgs, dtypes)) * count * max_len / 2**30
            raise UserError(f"the KV cache of {count} rows x {max_len} tokens ({gib:.1f} GiB) does not fit in "
                            f"{device.type} memory: generate fewer rows at once (the stage's batch size x samples "
                            f"per prompt) or fewer tokens") from None
    return slots


# -----------------------------------------------------------------------------
# prefill, the decode step and its pick


def flash_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, seqused_k):
    """aten's FA2 varlen forward (inside the torch wheel; CUDA sm80+, half precision), no dropout, not causal:
    sequence b's queries q[cu_q[b]:cu_q[b + 1]] attend to keys k[cu_k[b]:cu_k[b] + seqused_k[b]] (cu_k[b + 1] is
    not used), seqused_k[b] <= max_k; (tokens, heads, hd) inputs, fewer key/value heads than query heads allowed.
    Returns (out (total_q, heads, hd), lse (heads, total_q) fp32): lse is each query's log-sum-exp of its scaled
    scores, +inf for a sequence with no keys (FA2's mark; its out is 0). Tests stand in for it."""
    if q.device.type != "cuda":
        raise ValueError("fa2_decode_attention runs FA2's CUDA kernel (sm80+, half precision), not on "
                         f"{q.device.type}")
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, False, False,
                                                   seqused_k=seqused_k)[:2]


@functools.cache
def fa2_op_takes(argument):
    """Whether this torch's FA2 op (aten::_flash_attention_forward) takes the named argument (read once)."""
    return argument in str(torch.ops.aten._flash_attention_forward.default._schema)


def fa2_runs(device, dtypes):
    """Whether flash_varlen_forward runs here: CUDA sm80+ (Ampere and later), half-precision weights and a torch
    whose FA2 op takes per-row key counts (seqused_k)."""
    return (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
            and all(d in HALF for d in dtypes)
            and fa2_op_takes("seqused_k"))


def fa2_layout(seqused, kv_heads, columns, max_k, splits=1):
    """What fa2_decode hands FA2 for a cache of `columns` per row and these per-row key counts (rows,) int32 (<=
    max_k), made once per decode step for all layers. Each row's keys are cut into `splits` parts of `width`
    columns (flash-decoding: each part its own sequence of one query, so its own thread blocks); part s of row r is
    sequence r * splits + s, starting at token (r * kv_heads * columns + s * width) of fa2_decode's view of the
    cache, `used` (rows, splits) of its keys counted (0 past the row's end). splits=1: one sequence per row. Rows x
    parts are the sequences of one FA2 launch, at most FA2_MAX_SEQUENCES: fewer parts where rows are many."""
    rows = seqused.shape[0]
    splits = max(1, min(splits, FA2_MAX_SEQUENCES // rows))
    width = -(-max_k // splits)
    device = seqused.device
    # (a part starting past max_k, when the parts outnumber the columns, starts at max_k: inside the view, no keys)
    firsts = (torch.arange(splits, dtype=torch.int32, device=device) * width).clamp(max=max_k)
    used = (seqused[:, None] - firsts).clamp(0, width).to(torch.int32)
    starts = (torch.arange(rows, dtype=torch.int32, device=device)[:, None] * (kv_heads * columns) + firsts)
    cu_k = torch.cat([starts.view(-1), starts.new_zeros(1)])  # (the last entry is not read)
    cu_q = torch.arange(rows * splits + 1, dtype=torch.int32, device=device)
    return SimpleNamespace(splits=splits, width=width, cu_q=cu_q, cu_k=cu_k, used=used)


def fa2_decode(q, kc, vc, layout, merge=merge_splits):
    """One query per row (q (rows, heads, hd)) over that row's first seqused[r] columns of one layer's cache kc, vc
    (rows, kv_heads, columns, hd), as fa2_layout(seqused, ...) cut them, by flash_varlen_forward, which reads no
    other column: the cache seen as tokens of (kv_heads, hd) with a stride of hd and its heads columns * hd apart,
    row r starting at token r * kv_heads * columns (and the view ending where the last row's first head does, inside
    the rows' slots). With splits, each row's query is repeated for its parts and their outputs merged by
    `merge` (merge_splits, or its compiled copy in the fused ops)."""
    rows, nkv, cols, hd = kc.shape
    assert kc.stride() == vc.stride() == (nkv * cols * hd, cols * hd, hd, 1), "a slice of the cache's slots"
    tokens = ((rows - 1) * nkv + 1) * cols
    k, v = (t.as_strided((tokens, nkv, hd), (hd, cols * hd, 1)) for t in (kc, vc))
    parts = layout.splits
    if parts > 1:
        q = q[:, None].expand(rows, parts, *q.shape[1:]).reshape(rows * parts, *q.shape[1:])
    out, lse = flash_varlen_forward(q, k, v, layout.cu_q, layout.cu_k, 1, layout.width, layout.used.view(-1))
    if parts == 1:
        return out
    return merge(out.view(rows, parts, *out.shape[1:]), lse, layout.used)


FA2_MAX_SPLITS = 128  # the most parts a row's keys are cut into (FA2's own limit on its splits, kept)
FA2_MAX_SEQUENCES = 65535  # FA2 launches a thread block row per sequence: a CUDA grid's y dimension at most


@functools.cache
def multiprocessors(device):
    """A GPU's streaming multiprocessors (1 on a CPU); read once per device (the eager decode step asks each step)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def fa2_split_count(rows, kv_heads, max_k, sms):
    """generate(fa2_splits="auto"): the parts each row's keys are cut into (flash-decoding: each part its own
    sequence, so its own thread blocks, their outputs merged after), for a decode step over `rows` rows reading up
    to max_k columns on a GPU of `sms` multiprocessors: about 8 blocks per multiprocessor, each part at least 256
    columns. FA2's own rule splits only while the rows x kv heads blocks number under 80 % of two per
    multiprocessor: 128 rows x 2 kv heads on an H200's 132 are not split, ~2 blocks per multiprocessor walking up
    to 4,096 columns each, where FA2 read the cache at 29 % of its floor (docs/gpu_h200.json). A first guess, until
    bench.py --gpu_suite --sections decode_attention measures the split counts side by side."""
    return max(1, min(-(-8 * sms // (rows * kv_heads)), max_k // 256, FA2_MAX_SPLITS))


def decode_attention(slots, cache, rows, spans, flash):
    """The decode step's attention for one model's cache: each of the first `rows` slots writes its new key/value at
    its length and attends to its prefix. spans: ((end, span), ...) cuts the rows into groups, rows up to `end` (from
    the previous group's end) reading the first `span` columns (slots.fa2: each row reads only its own columns)."""
    lengths, at = slots.lengths[:rows], slots.rows[:rows]
    flash = None if slots.fa2 else flash
    if slots.fa2:  # each row's column count and where its query and keys start, for all layers
        # (a finished row still in the bucket can be longer than the span; FA2 asks for counts <= max_k, and what
        # such a row computes is thrown away)
        max_k = max(span for _, span in spans)
        seqused = (lengths + 1).clamp(max=max_k).to(torch.int32)
        splits = (fa2_split_count(rows, cache.shape[3], max_k, multiprocessors(cache.device))
                  if slots.fa2_splits == "auto" else slots.fa2_splits or 1)
        layout = fa2_layout(seqused, cache.shape[3], cache.shape[4], max_k, splits)
    elif flash is None:  # per group: its rows, columns and additive mask (rows, 1, 1, span), built once for all layers
        starts = [0] + [end for end, _ in spans[:-1]]
        groups = [(a, b, span, torch.zeros((b - a, 1, 1, span), dtype=cache.dtype, device=cache.device).masked_fill_(
                   slots.cols[:span] > lengths[a:b, None, None, None], float("-inf")))
                  for a, (b, span) in zip(starts, spans)]
    else:
        seqlens = lengths.to(torch.int32)

    # On CUDA where FA2 cannot run (fp32, pre-Ampere) this SDPA call runs the memory-efficient kernel (fmha_cutlassF,
    # tiles of 64 queries for our 6 per kv head): on one H200 the longest kernel of a graph-replayed step at 128 and
    # 1,024 rows (docs/gpu_h200_stage1.json), which is why FA2 is the default where it runs
    def attend(i, q, kv):  # q (rows, heads, hd), kv (rows, 2, kv_heads, hd)
        kc, vc = cache[i, 0, :rows], cache[i, 1, :rows]  # (rows, nkv, max_len, hd)
        if flash is not None:  # writes k, v into the cache at lengths
            y = flash_attn_with_kvcache(*flash_inputs(flash, q[:, :, None], kc, vc, kv[:, 0, :, None],
                                                      kv[:, 1, :, None]), cache_seqlens=seqlens, causal=True)
            return y.reshape(rows, -1)
        cache[i][:, at, :, lengths] = kv  # the keys and values of every row, one write
        if slots.fa2:
            return fa2_decode(q, kc, vc, layout, slots.ops.merge_splits).reshape(rows, -1)
        # SDPA on the cache, one query per row: the query heads that share a kv head take the place of query
        # positions, all seeing the row's columns (no copies of the cache to repeat kv heads, as SDPA's GQA makes)
        nh, nkv, hd = q.shape[1], kc.shape[1], q.shape[-1]
        q = q.view(rows, nkv, nh // nkv, hd)
        y = [F.scaled_dot_product_attention(q[a:b], kc[a:b, :, :span], vc[a:b, :, :span], attn_mask=mask)
             for a, b, span, mask in groups]  # (rows, nkv, group, hd)
        return (y[0] if len(y) == 1 else torch.cat(y)).reshape(rows, nh * hd)
    return attend


def decode_flash(cache):
    """flash-attn's dtype for this (layers, 2, slots, kv_heads, max_len, head_dim) cache, or None (the written-out
    attention): flash runs only in the cache's own dtype, as it cannot cast the cache."""
    dtype = flash_dtype(cache[:, 0], cache[:, 1])
    return dtype if dtype == cache.dtype else None


def decode_step(weights, slots, rows, spans, temperature, top_p, switch=None):
    """One token for each of the first `rows` slots; spans bound the columns they can see (decode_attention). Reads
    and writes only slots' buffers, with no host sync: what a CUDA graph captures."""
    logits = []
    # SDPA never on cuDNN (model.LOOP_BACKENDS): sm90 would prefer it, building a plan for each new (rows, columns)
    # shape; the memory-efficient kernel takes the additive mask (flash declines masks). CPU: its flash kernel, as ever
    with sdpa_kernel(LOOP_BACKENDS):
        for gw, cache in zip(weights, slots.caches):
            attend = decode_attention(slots, cache, rows, spans, decode_flash(cache))
            hidden = forward(gw, slots.tok[:rows], slots.lengths[:rows], attend, slots.ops)
            logits.append(F.linear(hidden, gw.lm_head))  # in the weights' dtype: pick casts what it must
    slots.lengths[:rows] += slots.alive[:rows]  # finished rows stay where they are
    pick(slots, slice(0, rows), logits, temperature, top_p, switch)


def pick(slots, idx, logits, temperature, top_p, switch=None):
    """Sample the next token of slots idx from their logits (one (rows, V) tensor per model, any float dtype) and
    record it. idx: a slice of slots (the decode step: every read a view, every write a copy), or an index tensor
    (admitted rows)."""
    at = slots.rows[idx]  # the slots, as indices
    pos, alive = slots.pos[idx], slots.alive[idx]
    first = logits[0]
    if slots.forcing:  # benchmarks: the one stop id banned before the row's forced length, and forced at it
        # (in place: the logits are this step's own)
        stop, now = slots.stop[:1], (pos + 1 == slots.force[idx])[:, None]
        first.masked_fill_(now, -float("inf")).index_copy_(1, stop, torch.where(now, 0.0, -float("inf")).to(first))
    u = slots.ops.keyed_uniforms(slots.key[idx], pos) if temperature > 0 else None
    col = torch.where(alive, pos, slots.width - 1)  # the spare column for rows past their end
    blocked = len(logits) == 1 and slots.blocked_sampler and top_p == 1
    logits = [x if blocked and x.dtype in HALF else x.float() for x in logits]  # the blocked sampler casts as it reads
    if blocked:
        tok, lp = slots.ops.sample_blocked(logits[0], temperature, u)
    elif len(logits) == 1:
        tok, lp = sample_next(logits[0], temperature, top_p, u)
    else:
        sample = slots.sample[idx]
        tok, lp, switched, differs = cross_next(logits[0], logits[1], temperature, top_p, u,
                                                lambda p, q: switch(p, q, sample, pos))
        slots.out_switched[at, col], slots.out_differs[at, col] = switched, differs
    slots.out_tok[at, col], slots.out_lp[at, col] = tok, lp
    stop = (tok[:, None] == slots.stop).any(-1)
    # every new value before any write: with a slice, pos and alive are views of what is written
    stopped, moved, alive = slots.stopped[idx] | (alive & stop), pos + alive, alive & ~stop & (pos + 1 < slots.max_new)
    slots.stopped[idx], slots.pos[idx], slots.alive[idx], slots.tok[idx] = stopped, moved, alive, tok


def prefill(weights, slots, prompts, slot_groups):
    """Run the prompts packed in one row through every model, store their keys/values in their slots (slot_groups[i]:
    the slots of prompt i) and return each model's logits (in its weights' dtype: pick casts them) of each prompt's
    first new token (prompts, V)."""
    device = slots.rows.device
    ids, cu = pack(prompts, device)
    positions = packed_positions(cu)
    packed, bounds = Packed(cu), cu.tolist()
    logits = []
    for gw, cache in zip(weights, slots.caches):
        def attend(i, q, kv):  # q (N, heads, hd), kv (N, 2, kv_heads, hd)
            for (a, b), where in zip(zip(bounds[:-1], bounds[1:]), slot_groups):
                cache[i][:, where, :, :b - a] = kv[a:b].permute(1, 2, 0, 3)[:, None].to(cache.dtype)
                # the columns beyond, zeroed: a masked-out column still enters SDPA's sum as 0 * value, and what an
                # earlier row (of this call or an earlier one) left there may be inf or NaN (0 * NaN = NaN)
                cache[i][:, where, :, b - a:] = 0
            k, v = kv[:, 0].transpose(0, 1)[None], kv[:, 1].transpose(0, 1)[None]
            y = packed.attend(None, q.transpose(0, 1)[None], k, v)
            return y[0].transpose(0, 1).reshape(q.shape[0], -1)
        hidden = forward(gw, ids[0], positions, attend, slots.ops)
        logits.append(F.linear(hidden[cu[1:] - 1], gw.lm_head))
    return logits


def run_step(weights, slots, rows, spans, temperature, top_p, switch, graphs):
    """decode_step, eagerly or by replaying the CUDA graph captured for this shape (captured on first use)."""
    if not graphs:
        return decode_step(weights, slots, rows, spans, temperature, top_p, switch)
    serials = tuple(gw.serial for gw in weights)
    if slots.graphs_read != serials:  # captured on other weights: their addresses are stale
        # and a fresh pool: the allocator refuses to capture into a pool whose every graph was dropped
        slots.graphs, slots.graphs_read, slots.pool = {}, serials, None
    key = (rows, spans, temperature, top_p, slots.forcing, slots.ops is not EAGER_OPS, slots.fa2, slots.fa2_splits,
           slots.blocked_sampler)
    with torch.cuda.device(slots.rows.device):  # capture and replay on the slots' GPU, whichever is current
        graph = slots.graphs.get(key)
        if graph is None:
            # one eager warm-up step first (kernels' lazy initialisation must not happen during capture); it would
            # advance the rows, so their per-slot state is put back (the outputs and cache columns it wrote are
            # rewritten by the real step)
            t0 = time.perf_counter()
            saved = [t.clone() for t in (slots.lengths, slots.tok, slots.pos, slots.alive, slots.stopped)]
            slots.stream = slots.stream or torch.cuda.Stream()  # one side stream (each has its own cuBLAS workspace)
            slots.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(slots.stream):
                decode_step(weights, slots, rows, spans, temperature, top_p)
            torch.cuda.current_stream().wait_stream(slots.stream)
            for t, s in zip((slots.lengths, slots.tok, slots.pos, slots.alive, slots.stopped), saved):
                t.copy_(s)
            slots.pool = slots.pool or torch.cuda.graph_pool_handle()  # one memory pool for every shape's graph
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=slots.pool):
                decode_step(weights, slots, rows, spans, temperature, top_p)
            slots.graphs[key] = graph
            stats["graph_captures"] += 1
            stats["capture_s"] += time.perf_counter() - t0
        graph.replay()


# -----------------------------------------------------------------------------
# the host's loop: admit rows into free slots, step, look every few steps, collect, refill or compact


@dataclass
class Generation:
    prompt_index: int     # which prompt this sample answers
    tokens: list          # new token ids, including the stop token when finished
    logprobs: list        # log-prob of each new token under softmax(logits / temperature) (T=1 when greedy)
    finished: bool        # True when it ended with a stop token, False when it hit max_new_tokens
    switched: list | None = None  # cross-sampling: per token, True where it was drawn from the partner's distribution
    differs: list | None = None   # cross-sampling: per token, True where switched and the model's own distribution
    #                               would have given another token with the same random number


def weights_device(model):
    return model.device if isinstance(model, GenWeights) else model.lm_head.weight.device


def round_up(x, multiple):
    return -(-x // multiple) * multiple


def column_bound(lengths, steps, block, max_len):
    """The columns rows of these stored lengths can see over the next `steps` steps, rounded up to a block."""
    return min(round_up(max(lengths, default=0) + steps, block), max_len)


def row_bucket(rows, slots, buckets):
    """The smallest bucket (a sorted tuple of slot counts) holding rows; buckets None: exactly rows. Never more than
    the slots there are."""
    if buckets is None:
        return rows
    return min(next((b for b in buckets if b >= rows), slots), slots)


GPU_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


def is_int(value):
    """An integer setting: a Python or NumPy integer, not a bool (which Python counts an int) and not a float."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def token_ids_ok(ids):
    """Token ids that are integers (a float id was cut to its integer part without a word)."""
    if isinstance(ids, torch.Tensor):
        return not (ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool)
    return all(type(t) is int or is_int(t) for t in ids)  # (the first test: fast for the usual lists)


def check_generate_arguments(prompts, n, max_new_tokens, temperature, top_p, stop_ids, partner, switch,
                             prompt_numbers, reserve):
    """generate()'s arguments of the wrong kind, refused with one line before any work (not a TypeError deep inside,
    or a value silently cut: 2.5 new tokens, a token id 1.9 read as 1). The prompts' own: generate's loop over them."""
    for name, value in dict(n=n, max_new_tokens=max_new_tokens).items():
        if not (is_int(value) and value >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    for name, value in dict(temperature=temperature, top_p=top_p).items():
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {value!r}")
    if isinstance(stop_ids, (str, bytes)) or not hasattr(stop_ids, "__len__") or not token_ids_ok(stop_ids):
        raise ValueError(f"stop_ids must be a list of integer token ids (or an empty one), got {stop_ids!r}")
    if switch is not None and partner is None:  # (the samples would be the model's own, switched=None)
        raise ValueError("a switch needs a partner to switch to (cross-sampling)")
    if prompt_numbers is not None:
        numbers_ = list(prompt_numbers)
        if len(numbers_) != len(prompts) or not all(is_int(x) and x >= 0 for x in numbers_) \
                or len(set(numbers_)) != len(numbers_):  # (two prompts of one number would draw the same samples)
            raise ValueError(f"prompt_numbers: one distinct integer >= 0 per prompt, got {prompt_numbers!r} for "
                             f"{len(prompts)} prompts")
    if reserve is not None and not (len(reserve) == 3 and all(is_int(x) and x >= 0 for x in reserve)):
        raise ValueError(f"reserve: (slots, columns, new tokens), three integers >= 0, got {reserve!r}")


@torch.no_grad()
def generate(model, prompts, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, stop_ids=(), seed=0,
             max_seq_len=None, partner=None, switch=None, slots=None, buckets="auto",
             sync_every=None, block=None, attention_groups=None, graphs=None, fused=None, forced_lengths=None,
             on_finish=None, dtype=None, reserve=None, fa2_decode_attention=None, fa2_splits=None,
             blocked_sampler=False, prompt_numbers=None):
    """Sample n responses for each prompt (lists of token ids, any lengths). Returns a list of Generation,
    prompt-major (all samples of prompt 0, then prompt 1, ...); temperature=0 is greedy. model: a plain Transformer
    (copied into generation's kept GenWeights, in dtype: default its own) or a GenWeights (e.g. of a sharded model).

    Sample j of prompt i is row i * n + j; its k-th token is drawn with a random number that depends only on (seed,
    i * n + j, k), so what a row generates does not depend on the settings below (test_engine.py checks it in float64;
    in fp32 or bf16 their other batch shapes round the logits differently, which now and then moves a token).
    prompt_numbers: the number each prompt's rows are keyed by in place of i (default: i): a caller that shards its
    prompts over ranks passes their indices in the whole list, so that a prompt's samples do not depend on the number
    of ranks (as the switch's `samples` then do not either).

    slots: rows decoded at once (default: all). More rows than slots stream through them: a finished row's slot is
    refilled with the next row (its prompt prefilled) when the host next looks. buckets: the row counts the decode
    step runs at ("auto": GPU_BUCKETS on CUDA, on CPU exactly the slots up to the last one in use; None: exactly).
    sync_every: decode steps between the host's looks (default 16 on CUDA, 1 on CPU). block: the attention's column
    bound is rounded up to a multiple of it (default 256 on CUDA, 1 on CPU). attention_groups: the rows cut into this
    many groups, each attending over its own rows' column bound (default 1 on CUDA, one kernel; 4 on CPU, ~5 % faster
    there, as longer prompts are admitted into lower slots). graphs: capture each (rows, columns) decode step as a
    CUDA graph and replay it (default and only: on CUDA without a partner). fused: RMSNorm (with the residual add
    before it), RoPE and SiLU * up each as one kernel compiled by torch.compile (fused_ops); default: on CUDA without
    a partner, where Triton is installed (on one H200 13-39 % faster than graphs alone, docs/engine_and_speed.md; on
    CPU 6 % slower, and there the first call's compile would cost ~20 s). They round fp32 differently from the eager
    ops, so now and then a sampled token differs where its random number lies within that rounding of a boundary of
    the inverse CDF. forced_lengths: benchmarks only, one length per row at which the one stop id is forced (banned
    before). on_finish(count): called as rows finish (a progress bar). reserve: (slots, columns, new tokens) that the
    kept KV cache and per-slot buffers are allocated for at least: a caller that knows its largest call (train_rl)
    keeps them from growing, which would reallocate them and drop their CUDA graphs. fa2_decode_attention: the decode
    step's attention by the FA2 kernel inside the torch wheel with per-row lengths (fa2_decode; CUDA sm80+, half
    precision), each row reading only its own columns where SDPA reads its group's span under a mask; default: where
    it can run (fa2_runs) and without a partner. On one H200 the attention ran at 51 % of its bandwidth floor at
    1,024 rows x 4,096 columns against SDPA's 27 %, and whole runs were 7-15 % faster (docs/gpu_h200.json).
    fa2_splits: the parts FA2's decode attention cuts each row's keys into (flash-decoding by hand: each part its
    own sequence of FA2's call, so its own thread blocks, merged by merge_splits; any torch whose FA2 takes
    seqused_k). None: one part (FA2's own rule may still split inside the kernel; it leaves 128 rows unsplit); an
    int; "auto": fa2_split_count, more parts where rows are few and spans long. Off by default until a GPU measures
    it; it rounds bf16 otherwise (each part's output is rounded before the merge).
    blocked_sampler: at top_p = 1 (and greedy) the decode step draws with sample_blocked, which reads the logits (in
    the weights' dtype) about once and writes nothing of their size, where sample_next writes the full-vocabulary
    log-probs, probabilities and CDF; compiled with the fused ops. Off until a GPU measures it (bench.py --gpu_suite
    --sections sampler generation); like the fused ops, it rounds fp32 otherwise, so a token flips now and then.

    Cross-sampling (token_shift.py): partner, a second model of the same vocabulary, decodes in lock-step with
    its own KV cache and is fed the same tokens; switch(p, q, samples, positions) -> bool per row chooses the rows
    that draw their next token from the partner's distribution q instead of the model's p (cross_next). Each
    Generation then also holds `switched` and `differs` per token. A switch that is never True gives exactly
    the model's own samples of the same seed, one that is always True the partner's.
    """
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__iter__"):
        raise ValueError(f"prompts must be a list of token-id lists (or tensors), got {type(prompts).__name__}")
    prompts = list(prompts)  # (a 2-D tensor's rows, or a generator, read once)
    check_generate_arguments(prompts, n, max_new_tokens, temperature, top_p, stop_ids, partner, switch,
                             prompt_numbers, reserve)
    n, max_new_tokens = int(n), int(max_new_tokens)  # (a NumPy integer would become the rows' prompt_index)
    models = [model] if partner is None else [model, partner]
    if any(is_sharded(m) for m in models):  # its copy would be a collective, in calls the ranks make unevenly
        raise ValueError("generate() needs full weights: pass engine.kept_weights(model, 0, dtype) or "
                         "engine.GenWeights(model, dtype), gathered on every rank, not the sharded model")
    device = weights_device(model)
    if partner is not None and (switch is None or temperature == 0
                                or partner.config.vocab_size != model.config.vocab_size
                                or weights_device(partner) != device):
        raise ValueError("cross-sampling needs a switch, temperature > 0 and a partner of the same vocabulary on the "
                         "same device")
    if dtype is not None and isinstance(model, GenWeights) and dtype != model.dtype:
        raise ValueError(f"dtype {dtype} asked of GenWeights in {model.dtype}: make them in the dtype wanted")
    context = min(m.config.max_position_embeddings for m in models)  # (the RoPE tables' rows)
    if max_seq_len is not None and not (is_int(max_seq_len) and 1 <= max_seq_len <= context):
        raise ValueError(f"max_seq_len {max_seq_len!r} is not an integer in 1..{context}, the model's context")
    limit = f"the model's {context}-token context" if max_seq_len is None else f"max_seq_len {max_seq_len}"
    max_seq_len = context if max_seq_len is None else max_seq_len
    vocab = model.config.vocab_size
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not hasattr(p, "__len__") or getattr(p, "ndim", 1) != 1 \
                or not token_ids_ok(p):
            raise ValueError(f"prompt {i} must be a list (or 1-D tensor) of integer token ids, got {p!r:.80}")
        if len(p) == 0:
            raise UserError(f"prompt {i} is empty")
        low, high = (int(p.min()), int(p.max())) if hasattr(p, "min") else (min(p), max(p))
        if low < 0 or high >= vocab:  # (an embedding lookup's index error; on a GPU, a device-side assert)
            raise UserError(f"prompt {i} holds token id {low if low < 0 else high}, outside the model's vocabulary "
                            f"of {vocab} (a tokenizer larger than the model's embedding?)")
        if len(p) + max_new_tokens > max_seq_len:
            raise UserError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it needs "
                            f"{len(p) + max_new_tokens} > {limit}")
    for name, value in dict(slots=slots, sync_every=sync_every, block=block, attention_groups=attention_groups).items():
        if value is not None and not (is_int(value) and value >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not 0 <= temperature < math.inf or not 0 <= top_p <= 1:  # (inf: every token uniform)
        raise ValueError(f"temperature must be >= 0 and top_p in [0, 1], got {temperature!r} and {top_p!r}")
    if 0 < temperature < MIN_TEMPERATURE:  # (logits / temperature would overflow float32)
        raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {temperature!r}")
    # (a float failed in seed32's shift; seed32 folds -k-1 onto k: seed -1 would repeat seed 0's samples)
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if not prompts:
        return []
    stop_ids = sorted(set(int(t) for t in stop_ids))
    if len(stop_ids) > MAX_STOP_IDS:
        raise ValueError(f"at most {MAX_STOP_IDS} stop ids, got {len(stop_ids)}")
    if stop_ids and not 0 <= stop_ids[0] <= stop_ids[-1] < vocab:  # (never sampled: no response would end)
        raise UserError(f"stop token ids {stop_ids} are not all in the model's vocabulary of {vocab} (a tokenizer "
                        f"larger than the model's embedding?)")
    if forced_lengths is not None and (len(stop_ids) != 1 or len(forced_lengths) != len(prompts) * n
                                       or not all(1 <= x <= max_new_tokens for x in forced_lengths)
                                       or partner is not None):
        raise ValueError("forced_lengths needs one stop id (another could end a row early), one length in "
                         "1..max_new_tokens per row, and no partner (it forces the model's own logits only)")
    cuda = device.type == "cuda"
    total = len(prompts) * n
    count = min(slots or total, total)
    buckets = (GPU_BUCKETS if cuda else None) if buckets == "auto" else buckets
    sync_every = sync_every or (16 if cuda else 1)
    block = block or (256 if cuda else 1)
    attention_groups = attention_groups or (1 if cuda else 4)
    graphs = (cuda and partner is None) if graphs is None else graphs
    fused = (cuda and partner is None and has_triton()) if fused is None else fused  # (Triton: Inductor's GPU code)
    if graphs and (not cuda or partner is not None):
        raise ValueError("graphs=True needs CUDA and no partner (cross-sampling's switch runs eagerly)")
    size = (count, max(map(len, prompts)) + max_new_tokens, max_new_tokens)  # slots, columns, new tokens
    if reserve is not None:
        size = tuple(map(max, size, reserve))
    weights = [kept_weights(m, role, dtype) for role, m in enumerate(models)]
    state = kept_slots([gw.config for gw in weights], *size, [gw.dtype for gw in weights], device)
    state.seed.fill_(seed32(seed))
    state.max_new.fill_(max_new_tokens)
    state.stop.fill_(-1)
    state.stop[:len(stop_ids)] = torch.tensor(stop_ids, dtype=torch.long)
    state.forcing = forced_lengths is not None
    state.ops = fused_ops() if fused else EAGER_OPS
    if fa2_decode_attention is None:
        fa2_decode_attention = partner is None and fa2_runs(device, [gw.dtype for gw in weights])
    if fa2_decode_attention and cuda and any(gw.dtype not in HALF for gw in weights):
        raise ValueError("fa2_decode_attention needs a half-precision engine (dtype bfloat16 or float16)")
    state.fa2 = fa2_decode_attention
    if fa2_splits is not None and (not fa2_decode_attention or not (fa2_splits == "auto" or (
            is_int(fa2_splits) and 1 <= fa2_splits <= FA2_MAX_SPLITS))):
        raise ValueError(f"fa2_splits needs fa2_decode_attention and is 'auto' or 1..{FA2_MAX_SPLITS}, got "
                         f"{fa2_splits!r}")
    state.fa2_splits = fa2_splits
    state.blocked_sampler = blocked_sampler and partner is None
    state.alive.zero_()
    state.sample.fill_(-1)

    holder = [-1] * count   # the host's view: which row each slot holds (-1: free)
    stored = [0] * count    # ... and a bound on its stored tokens
    results = [None] * total
    next_row = 0
    # the host's loop: 1. admit rows into free slots (prefill, first token); 2. sync_every decode steps on the row
    # bucket, with no host sync; 3. look: collect the rows that ended, and once nothing is left to admit, compact the
    # live rows into a smaller bucket
    while True:
        # admit the next rows into free slots, lowest first: each prompt prefilled once for its rows admitted now
        free = [s for s in range(count) if holder[s] < 0]
        admit = sorted(range(next_row, min(total, next_row + len(free))), key=lambda r: -len(prompts[r // n]))
        new = list(zip(free, admit))  # longer prompts in lower slots: attention groups of similar lengths
        if new:
            next_row += len(new)
            by_prompt = {}
            for s, r in new:
                by_prompt.setdefault(r // n, []).append((s, r))
            groups = list(by_prompt.values())
            firsts = prefill(weights, state, [prompts[i] for i in by_prompt],
                             [torch.tensor([s for s, _ in g], device=device) for g in groups])
            taken, admitted = [s for g in groups for s, _ in g], [r for g in groups for _, r in g]
            idx = torch.tensor(taken, device=device)
            state.sample[idx] = torch.tensor(admitted if prompt_numbers is None else
                                             [prompt_numbers[r // n] * n + r % n for r in admitted], device=device)
            state.key[idx] = sample_keys(state.seed, state.sample[idx])
            state.lengths[idx] = torch.tensor([len(prompts[r // n]) for r in admitted], device=device)
            state.pos[idx], state.alive[idx], state.stopped[idx] = 0, True, False
            if forced_lengths is not None:
                state.force[idx] = torch.tensor([forced_lengths[r] for r in admitted], device=device)
            per_prompt = torch.tensor([len(g) for g in groups], device=device)
            pick(state, idx, [lg.repeat_interleave(per_prompt, 0) for lg in firsts], temperature, top_p, switch)
            for s, r in zip(taken, admitted):
                holder[s], stored[s] = r, len(prompts[r // n])
        occupied = [s for s in range(count) if holder[s] >= 0]
        if not occupied:
            break
        rows = row_bucket(occupied[-1] + 1, count, buckets)
        # each group of rows reads the columns up to a bound on its rows' lengths over the next sync_every steps
        size = -(-rows // attention_groups)
        spans = tuple((min(a + size, rows), column_bound([stored[s] for s in range(a, min(a + size, rows))
                                                          if holder[s] >= 0], sync_every, block, state.max_len))
                      for a in range(0, rows, size))
        for _ in range(sync_every):
            run_step(weights, state, rows, spans, temperature, top_p, switch, graphs)
        # the host's look: which rows ended, and a bound on the others' lengths
        alive, lengths = torch.stack([state.alive[:rows].long(), state.lengths[:rows]]).tolist()
        ended = [s for s in occupied if not alive[s]]
        if ended:
            collect(state, ended, holder, results, n, partner is not None)
            for s in ended:
                holder[s] = -1
            if on_finish:
                on_finish(len(ended))
        for s in occupied:
            stored[s] = lengths[s]
        live = [s for s in range(rows) if holder[s] >= 0]
        if next_row == total and live:  # nothing left to admit: compact into a smaller bucket when the live rows fit
            smaller = row_bucket(len(live), count, buckets)
            movers = [s for s in live if s >= smaller]
            if smaller < rows and movers:
                holes = [s for s in range(smaller) if holder[s] < 0][:len(movers)]
                state.move(torch.tensor(holes, device=device), torch.tensor(movers, device=device),
                           max(stored[s] for s in movers))
                for h, m in zip(holes, movers):
                    holder[h], stored[h], holder[m] = holder[m], stored[m], -1
    return results


def collect(slots, ended, holder, results, n, cross):
    """Copy the ended rows' outputs to the host, as Generations in their rows' places."""
    idx = torch.tensor(ended, device=slots.rows.device)
    length, stopped = slots.pos[idx].tolist(), slots.stopped[idx].tolist()
    width = max(length)  # only the columns the longest of them wrote cross to the host
    tokens, logprobs = slots.out_tok[idx, :width].tolist(), slots.out_lp[idx, :width].tolist()
    if cross:
        switched, differs = slots.out_switched[idx, :width].tolist(), slots.out_differs[idx, :width].tolist()
    for j, s in enumerate(ended):
        m = length[j]
        results[holder[s]] = Generation(holder[s] // n, tokens[j][:m], logprobs[j][:m], stopped[j],
                                        switched[j][:m] if cross else None, differs[j][:m] if cross else None)


# -----------------------------------------------------------------------------
# generation over task records (sampling, evaluation, RL rollouts and validation share this)


def sample_responses(model, tokenizer, task, records, n=1, temperature=0.0, top_p=1.0, max_new_tokens=512,
                     seed=0, template="auto", batch_size=64, desc="generate", progress=True, partner=None, switch=None,
                     timings=None, reserve=None, prompt_numbers=None):
    """Generate n responses for each record with our KV-cache engine and score them with task.score.

    One generate call streams every record's rows through batch_size x n slots (the KV cache's rows), so what each
    sample is does not depend on batch_size (but for the logits' rounding: generate). Returns one dict per (record,
    sample), in record order then sample order: {"id", "prompt", "response", "tokens", "logprobs", "finished",
    "length", "reward", "sample"}.
    partner, switch: cross-sampling with a second model (engine.generate); each dict then also holds
    "switched" and "differs", one bool per token. timings: a dict whose "score_s" gains the seconds spent scoring.
    reserve, prompt_numbers (one per record): engine.generate's.
    """
    stop = generation_stop_ids(tokenizer)
    prompts = [task.render_prompt(r, tokenizer, template) for r in records]
    prompt_ids = encode_prompts(tokenizer, prompts)
    bar = progress_bar(len(records) * n, desc, progress)
    gens = generate(model, prompt_ids, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    stop_ids=stop, seed=seed, partner=partner, switch=switch, slots=batch_size * n,
                    on_finish=bar.update, reserve=reserve, prompt_numbers=prompt_numbers)
    bar.close()
    results = []
    for row, g in enumerate(gens):
        i = g.prompt_index
        text = tokenizer.decode(g.tokens[:-1] if g.finished else g.tokens, skip_special_tokens=False)
        t_score = time.time()
        reward = reward_of(task, text, records[i], g.finished)
        if timings is not None:
            timings["score_s"] = timings.get("score_s", 0.0) + time.time() - t_score
        results.append({"id": records[i]["id"], "prompt": prompts[i], "response": text, "tokens": g.tokens,
                        "logprobs": g.logprobs, "finished": g.finished, "length": len(g.tokens), "reward": reward,
                        "sample": row % n,
                        **({"switched": g.switched, "differs": g.differs} if partner is not None else {})})
    return results
