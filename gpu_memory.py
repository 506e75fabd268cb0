"""
The per-GPU memory model of RL (train_rl.py) and SFT (redistill_sft.py) under FSDP2, in bytes computed from what
the code allocates: no GPU needed. `python bench.py --memory qwen2.5-1.5b qwen2.5-7b --world 8 --gpu_gib 80` prints
its table; tests/test_bench_memory.py checks it against peaks measured on CPU, docs/memory.md against an H100.
"""
import math
import os

import common
from common import UserError, check_positive
from model import ModelConfig, kv_bytes_per_token, read_config, tiny_config

# --memory presets: the Qwen2.5 base models' config.json fields that size memory (all Qwen2ForCausalLM, q/k/v biases)
MEMORY_PRESETS = {
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                         intermediate_size=8960, tie_word_embeddings=True, max_position_embeddings=131072),
    "qwen2.5-3b": dict(vocab_size=151936, hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=2,
                       intermediate_size=11008, tie_word_embeddings=True, max_position_embeddings=32768),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                       intermediate_size=18944, tie_word_embeddings=False, max_position_embeddings=131072),
    "qwen2.5-14b": dict(vocab_size=152064, hidden_size=5120, num_layers=48, num_heads=40, num_kv_heads=8,
                        intermediate_size=13824, tie_word_embeddings=False, max_position_embeddings=131072),
}
CUDA_CONTEXT_GIB = 1.5  # CUDA context + caching-allocator slack, added to every peak of --memory
# the settings chosen by memory (train_rl --keep_engine auto; --checkpoint_every auto in train_rl and redistill_sft)
# choose what keeps the computed peak at most this fraction of the GPU: the model has underestimated a whole RL update
# on an H100 by a quarter of its peak (docs/memory.md), and an out-of-memory costs the steps since the last checkpoint
AUTO_MEMORY_FRACTION = 0.75
RECOMPUTE_CHOICES = (0, 8, 4, 3, 2, 1)  # --checkpoint_every auto tries these in turn, least recompute first (0: none)

# -----------------------------------------------------------------------------
# per-GPU memory (python bench.py --memory CONFIG ...): bytes computed from what the code allocates, no GPU needed
#
# The scheme modelled (train_rl.py and redistill_sft.py under FSDP2): fully_shard on every block and on the root,
# MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), AdamW in fp32, gradient checkpointing per block,
# packed micro-batches (one row), the lm_head + fp32 log-softmax in checkpointed chunks (model.token_logprobs).


def param_counts(cfg):
    """Parameters of model.Transformer(cfg), counted from the config: embed, one block, final norm, lm_head, total."""
    H, V, hd = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    attn = H * q + 2 * H * kv + q * H + (q + 2 * kv if cfg.qkv_bias else 0) + (2 * hd if cfg.arch == "qwen3" else 0)
    block = attn + 3 * H * cfg.intermediate_size + 2 * H  # + gate/up/down, input and post-attention norms
    lm_head = 0 if cfg.tie_word_embeddings else V * H
    return {"embed": V * H, "block": block, "final_norm": H, "lm_head": lm_head,
            "total": V * H + cfg.num_layers * block + H + lm_head}


def kv_cache_bytes(cfg, rows, max_len, dtype_bytes=2):
    """engine.Slots' KV cache for rows slots of max_len columns: (layers, 2 (k and v), rows, kv_heads, max_len,
    head_dim)."""
    return rows * max_len * kv_bytes_per_token(cfg, dtype_bytes)


def block_bytes_per_token(cfg, compute_bytes=2):
    """Peak bytes per token of one checkpointed block recomputed in backward: what autograd saves in the recompute
    (block_saved_bytes_per_token), plus the gradients in flight at the peak, the MLP's backward: two I-wide gradients
    more than the saved tensors it frees, and the block's output and input gradients (2 I + 2 H, in the compute
    dtype: compute_bytes each, 2 for bf16, 4 for fp32).
      per token = 8 H + 2 (6 H + 3 nh hd + 2 nkv hd + 6 I) [+ 6 (nh + nkv) hd for qwen3]   (bf16)
    Checked against the peak measured on CPU (tests/test_bench_memory.py) and on an H100 (docs/memory.md)."""
    in_flight = 2 * cfg.intermediate_size + 2 * cfg.hidden_size
    return block_saved_bytes_per_token(cfg, compute_bytes) + compute_bytes * in_flight


def block_saved_bytes_per_token(cfg, compute_bytes=2):
    """Bytes per token autograd saves in one block's forward: each RMSNorm's fp32 x.float() (2 x 4 H bytes; in an
    fp32 compute, the fp32 input itself); in the compute dtype (compute_bytes: 2 for bf16, 4 for fp32) each norm's
    normalised x and output (2 H), q and k after RoPE, v, the attention output and its (T, heads x hd) reshape
    (3 nh hd + 2 nkv hd; flash kernels keep O(T) more), gate, silu(gate), up and silu(gate) * up (4 I); Qwen3's
    q_norm / k_norm also keep fp32 q, k and their normalised copies (4 + compute_bytes) (nh + nkv) hd. A block that
    is not recomputed holds this from its forward to its backward."""
    H, hd, nh, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    qk_norm = (4 + compute_bytes) * (nh + nkv) * hd if cfg.arch == "qwen3" else 0
    return 8 * H + compute_bytes * (4 * H + 3 * nh * hd + 2 * nkv * hd + 4 * cfg.intermediate_size) + qk_norm


def kept_bytes_per_token(cfg, keep, compute_bytes=2):
    """(bytes a recomputed block keeps from its forward per token, bytes of those its recompute then need not
    allocate) under --checkpoint_keep (model.CHECKPOINT_KEEP). attention: the attention output (compute dtype) and
    its fp32 log-sum-exp per head. matmuls: also every projection's output: q, k, v, o, gate, up, down; of these
    v, gate and up are tensors the recompute would save, q and k are saved only after RoPE (recomputed)."""
    H, hd, nh, nkv, inter = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    c = compute_bytes
    if keep == "nothing":
        return 0, 0
    attention = c * nh * hd + 4 * nh
    if keep == "attention":
        return attention, c * nh * hd
    if keep == "matmuls":
        return attention + c * ((nh + 2 * nkv) * hd + 2 * H + 2 * inter), c * (nh * hd + nkv * hd + 2 * inter)
    raise ValueError(f"checkpoint_keep: {keep!r}")


def prefill_bytes_per_token(cfg, dtype_bytes=2):
    """Peak bytes per prompt token of generation's prefill (no grad, one block at a time): the MLP holds the block's
    input, the normed input, the fused gate_up (2 I), silu(gate) and its product with up (2 H + 4 I, in the engine's
    dtype: dtype_bytes each; 3 I where the fused ops make the product in one kernel), an RMSNorm its fp32 x.float()
    and x * rsqrt (8 H)."""
    return dtype_bytes * (2 * cfg.hidden_size + 4 * cfg.intermediate_size) + 8 * cfg.hidden_size


def decode_temp_bytes(dtype_bytes=2, top_p=1.0):
    """Peak bytes per (row, vocabulary entry) of a decode step's sampling (eager; the blocked sampler holds less):
    the logits in the engine's dtype (dtype_bytes), then fp32 logits, log-probs, probabilities and CDF (16); with
    top_p < 1 also the sorted probabilities, their int64 order and running sum (16 more)."""
    return dtype_bytes + 16 + (16 if top_p < 1 else 0)


def activation_bytes(cfg, tokens, chunk, with_entropy, gathered, checkpoint_every=1, keep="nothing", compute_bytes=2):
    """Training activations of one packed micro-batch of `tokens` tokens:
      inputs  what the forward leaves for backward: each recomputed block's input (2 H bytes per token in bf16:
              compute_bytes, the compute dtype's size, for every "bf16" below and in the functions named) and what
              it keeps (kept_bytes_per_token); each block that is not recomputed, all it saves
              (block_saved_bytes_per_token). Blocks i with i % checkpoint_every == 0 are recomputed; checkpoint_every
              0 = none (no gradient checkpointing)
      head    the final norm (its fp32 input copy, bf16 normalised x and output: 4 + 2 + 2 bytes x T x H; RL also
              gathers the response positions' hidden states, + 2) and one lm_head chunk recomputed in backward:
              chunk x V x 4 bytes x 3 (the fp32 log-softmax, its gradient, the gradient of the fp32 logits), x 2 more
              with the entropy's graph (probs = exp(log-softmax) and their gradient; train_rl keeps it only
              with --entropy_coef > 0, its logged entropy is computed without graph)
      block   the backward of the blocks, last to first: when block j's backward runs, the blocks below still hold
              what they stored; block j holds its saved tensors (recomputed: less what it kept) and the gradients in
              flight (block_bytes_per_token). block = the largest such total, less `inputs`
    The head's backward (all lm_head chunks, then the final norm) finishes before the first block's, so the peak is
    inputs + max(head, block)."""
    H, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_layers
    recomputed = [bool(checkpoint_every) and i % checkpoint_every == 0 for i in range(L)]
    c = compute_bytes
    kept, not_recomputed = kept_bytes_per_token(cfg, keep, c)
    saved, peak = block_saved_bytes_per_token(cfg, c), block_bytes_per_token(cfg, c)
    stored = [c * H + kept if r else saved for r in recomputed]
    at_backward = [stored[j] + (peak - not_recomputed if recomputed[j] else peak - saved) for j in range(L)]
    inputs = tokens * sum(stored)
    block = tokens * max(sum(stored[:j]) + at_backward[j] for j in range(L)) - inputs
    head = tokens * H * (4 + c + c + (c if gathered else 0)) + min(tokens, chunk) * V * 4 * (3 + 2 * bool(with_entropy))
    return {"inputs": inputs, "head": head, "block": block, "total": inputs + max(head, block)}


def memory_estimate(cfg, world=8, prompts_per_rank=16, group_size=8, gen_batch_size=32, prompt_tokens=512,
                    response_tokens=4096, rl_tokens=30000, sft_tokens=16384, logprob_chunk=4096, checkpoint_every=1,
                    checkpoint_keep="nothing", adam_8bit=False, gen_dtype_bytes=2, rl_entropy=False, compute_bytes=2,
                    top_p=1.0):
    """Per-GPU bytes of RL (train_rl.py) and SFT (redistill_sft.py) under FSDP2 on `world` ranks (see the section's
    comment); gen_dtype_bytes: the engine's weights and KV cache (train_rl --dtype); compute_bytes: the training
    compute dtype's size, of the activations and of the unsharded parameters (--dtype: 2 for bf16, 4 for fp32, where
    FSDP casts nothing); rl_entropy: the update keeps the entropy's graph (train_rl --entropy_coef > 0); top_p: the
    rollouts' (its nucleus sorts the vocabulary). Peaks include CUDA_CONTEXT_GIB."""
    n = param_counts(cfg)
    P, W = n["total"], world
    root = n["embed"] + n["lm_head"] + n["final_norm"]  # the root FSDP group: embed_tokens, lm_head if untied, norm
    # AdamW's two moments: fp32, or one byte each with bitsandbytes' 8-bit AdamW (its per-block scales: ~1 %)
    e = {"params": P, "master": 4 * P / W, "grads": 4 * P / W, "adam": (2 if adam_8bit else 8) * P / W,
         "slack": CUDA_CONTEXT_GIB * 2**30}
    e["persistent"] = e["master"] + e["grads"] + e["adam"]
    e["ref_model"] = reference_bytes(cfg, W)  # --kl_coef > 0 (of the policy's size: a --ref_model may be another's)
    # FSDP2 transients of forward + backward: the root unsharded in bf16 throughout, two blocks unsharded in bf16
    # (the current one + the prefetched one; an fp32 compute: both in fp32, compute_bytes), and in backward the
    # unsharded fp32 gradients of one block and of the root before their reduce-scatter. (This covers the lm_head's
    # gradient too: in the head's backward the root holds its bf16 params, the bf16 gradient being accumulated and
    # one chunk's V x H bf16 weight gradient before it is added in: at most 6 bytes per root parameter. A single-H100
    # check measured that chunk gradient on top of activation_bytes, which came within 1 % of the rest at the 1.5B
    # and 7B shapes; see docs/memory.md.)
    e["fsdp_transient"] = compute_bytes * (root + 2 * n["block"]) + 4 * n["block"] + 4 * root
    # RL generation: the training state stays sharded, without gradients (train_rl sets them to None after each
    # optimizer step; one H200's step-1 peaks plus AdamW's states matched this within 1 %, docs/memory.md); a plain
    # bf16 copy of all weights is gathered for the engine
    # (freed before the update unless train_rl --keep_engine keeps it), engine.generate's KV cache (rows x (prompt +
    # response) columns) and its temporaries: the prefill (prompts packed in one row, no grad, one block at a time)
    # or a decode step's sampling (rows x V: decode_temp_bytes), whichever is larger
    prompts = min(prompts_per_rank, gen_batch_size)
    e["gen_rows"], e["gen_len"] = prompts * group_size, prompt_tokens + response_tokens
    e["gen_copy"] = gen_dtype_bytes * P
    e["kv_cache"] = kv_cache_bytes(cfg, e["gen_rows"], e["gen_len"], gen_dtype_bytes)
    e["gen_temps"] = max(prefill_bytes_per_token(cfg, gen_dtype_bytes) * prompts * prompt_tokens,
                         e["gen_rows"] * cfg.vocab_size * decode_temp_bytes(gen_dtype_bytes, top_p))
    e["gen_peak"] = e["master"] + e["adam"] + e["gen_copy"] + e["kv_cache"] + e["gen_temps"] + e["slack"]
    # training: a micro-batch holds up to its token budget, or one longer sequence alone
    e["rl_tokens"] = max(rl_tokens, prompt_tokens + response_tokens)
    recompute = dict(checkpoint_every=checkpoint_every, keep=checkpoint_keep, compute_bytes=compute_bytes)
    e["rl_act"] = activation_bytes(cfg, e["rl_tokens"], logprob_chunk, with_entropy=rl_entropy, gathered=True,
                                   **recompute)
    e["update_peak"] = e["persistent"] + e["fsdp_transient"] + e["rl_act"]["total"] + e["slack"]
    e["engine_kept"] = engine_kept_bytes(cfg, P, e["gen_rows"], e["gen_len"], gen_dtype_bytes, top_p)
    e["update_peak_kept"] = e["update_peak"] + e["engine_kept"]
    e["rl_peak"] = max(e["gen_peak"], e["update_peak"])
    # the reference model's own log-prob pass (no grad) runs apart from the update: only its sharded state adds
    e["rl_kl_peak"] = e["rl_peak"] + e["ref_model"]
    e["sft_tokens"] = sft_tokens
    e["sft_act"] = activation_bytes(cfg, sft_tokens, logprob_chunk, with_entropy=False, gathered=True, **recompute)
    e["sft_peak"] = e["persistent"] + e["fsdp_transient"] + e["sft_act"]["total"] + e["slack"]
    return e


def reference_bytes(cfg, world):
    """train_rl --kl_coef > 0: the frozen reference model (config cfg), its fp32 weights sharded over `world` ranks
    as the policy's are, with no gradients or optimizer state."""
    return 4 * param_counts(cfg)["total"] / world


def engine_kept_bytes(cfg, params, rows, columns, dtype_bytes=2, top_p=1.0):
    """What train_rl --keep_engine holds through the update, so that the next step refills it in place and replays
    its CUDA graphs: generation's weight copy, its KV cache of rows x columns, and the graphs' memory pool (a decode
    step's sampling temporaries)."""
    return (dtype_bytes * params + kv_cache_bytes(cfg, rows, columns, dtype_bytes)
            + rows * cfg.vocab_size * decode_temp_bytes(dtype_bytes, top_p))


def keeps_engine(update_peak_kept, gpu_bytes):
    """train_rl --keep_engine auto: keep when the update's computed peak with generation's buffers (and the
    reference model's shards, if any) is at most AUTO_MEMORY_FRACTION of the GPU."""
    return update_peak_kept <= AUTO_MEMORY_FRACTION * gpu_bytes


def least_recompute(peak_of, gpu_bytes):
    """--checkpoint_every auto on a GPU: the first of RECOMPUTE_CHOICES (no recompute, every 8th block, ..., every
    block) whose computed peak peak_of(every) is at most AUTO_MEMORY_FRACTION of the GPU; every block (1, the least
    memory) if none is."""
    return next((k for k in RECOMPUTE_CHOICES if peak_of(k) <= AUTO_MEMORY_FRACTION * gpu_bytes), 1)


def auto_recompute(cfg, settings, gpu_bytes):
    """What --checkpoint_every auto chooses under memory_estimate's settings on a GPU of gpu_bytes: (train_rl's,
    redistill_sft's). train_rl's is chosen with generation's buffers in the update's peak where --keep_engine auto
    keeps them (when they fit with every block recomputed), as train_rl.recompute_setting does."""
    est = {every: memory_estimate(cfg, **dict(settings, checkpoint_every=every)) for every in RECOMPUTE_CHOICES}
    kept = keeps_engine(est[1]["update_peak_kept"], gpu_bytes)
    return (least_recompute(lambda every: est[every]["update_peak_kept" if kept else "update_peak"], gpu_bytes),
            least_recompute(lambda every: est[every]["sft_peak"], gpu_bytes))


def recompute_fields(every):
    """A recompute setting (0: none, k: every k-th block) as the settings prepare_training reads."""
    return {"gradient_checkpointing": every > 0, "checkpoint_every": max(every, 1)}


def recompute_words(every):
    """A recompute setting in words: 0 none, 1 every block, k every k-th block."""
    suffix = {2: "nd", 3: "rd"}.get(every, "th")
    return {0: "no recompute", 1: "every block"}.get(every, f"every {every}{suffix} block")


def resolve_recompute(args, peak_of, gpu_bytes):
    """--checkpoint_every auto, written into args before parallel.prepare_training reads them: with
    --gradient_checkpointing true, on a GPU (gpu_bytes: its memory) least_recompute's choice (0: gradient
    checkpointing off), on a CPU every block (the tiny preset's runs stay as they were). peak_of(every): the
    script's computed peak for that setting. Returns the line to print once, or None when there was nothing to
    choose."""
    if args.checkpoint_every != "auto":
        return None
    args.checkpoint_every = 1
    if not args.gradient_checkpointing:
        return None
    if gpu_bytes is None:
        return "--checkpoint_every auto: every block, on CPU"
    every = least_recompute(peak_of, gpu_bytes)
    vars(args).update(recompute_fields(every))
    peak = peak_of(every)
    return (f"--checkpoint_every auto: {recompute_words(every)}, the computed peak {peak / 2**30:.1f} GiB "
            f"{'<=' if peak <= AUTO_MEMORY_FRACTION * gpu_bytes else '>'} {AUTO_MEMORY_FRACTION:.0%} of the GPU's "
            f"{gpu_bytes / 2**30:.1f} GiB")


def memory_config(spec):
    """(column name, ModelConfig) for a --memory argument: a preset, a checkpoint directory or a config.json."""
    if spec.lower() in MEMORY_PRESETS:
        return spec.lower(), ModelConfig.from_hf(tiny_config(arch="Qwen2ForCausalLM", rope_theta=1000000.0,
                                                             **MEMORY_PRESETS[spec.lower()]), spec)
    if os.path.isdir(spec):
        return os.path.basename(os.path.normpath(spec)), read_config(spec)
    if not os.path.isfile(spec):
        raise UserError(f"{spec}: no such config.json or directory, and not a preset ({', '.join(MEMORY_PRESETS)})")
    hf = common.read_json(spec, "a model config", repeated_keys=True)
    return os.path.basename(os.path.dirname(os.path.abspath(spec))) or spec, ModelConfig.from_hf(hf, spec)


def memory_settings(args, gen_batch_size=None):
    world = args.world
    per_rank = args.prompts_per_rank or -(-args.prompts_per_step // world)
    return dict(world=world, prompts_per_rank=per_rank, group_size=args.samples_per_prompt,
                gen_batch_size=gen_batch_size or args.gen_batch_size, prompt_tokens=args.prompt_tokens,
                response_tokens=args.response_tokens, rl_tokens=args.rl_micro_batch_tokens,
                sft_tokens=args.sft_micro_batch_tokens, logprob_chunk=args.logprob_chunk,
                checkpoint_every=args.checkpoint_every, checkpoint_keep=args.checkpoint_keep, adam_8bit=args.adam_8bit)


def memory_table(args):
    """One markdown table, a column per model, rows the per-GPU components and phase peaks in GiB; then a verdict."""
    check_positive(args, "world", "samples_per_prompt", "gen_batch_size", "prompt_tokens", "response_tokens",
                   "rl_micro_batch_tokens", "sft_micro_batch_tokens", "logprob_chunk", "prompts_per_step",
                   "prompts_per_rank")
    if args.checkpoint_every < 0:
        raise UserError(f"--checkpoint_every: 0 (no gradient checkpointing) or more, not {args.checkpoint_every}")
    if not 0 < args.gpu_gib < math.inf:
        raise UserError(f"--gpu_gib: a GPU's memory in GiB, more than 0, not {args.gpu_gib}")
    recompute = ("no gradient checkpointing" if args.checkpoint_every == 0 else
                 f"gradient checkpointing of every {args.checkpoint_every} block(s), keeping {args.checkpoint_keep}")
    cols = [memory_config(spec) for spec in args.memory]
    s0 = memory_settings(args)
    est = [dict(memory_estimate(cfg, **s0), cfg=cfg) for _, cfg in cols]  # (its config: the auto recompute row)
    gib, cap = 2**30, args.gpu_gib
    e0 = est[0]

    def fmt(b):
        return f"{b / gib:.1f}"

    def yes(b):
        return "yes" if b / gib <= cap else "**no**"

    rows = [
        ("parameters P", lambda e: f"{e['params'] / 1e9:.2f}B"),
        ("fp32 master weights, 4P/W", lambda e: fmt(e["master"])),
        ("fp32 gradients, 4P/W", lambda e: fmt(e["grads"])),
        ("AdamW exp_avg + exp_avg_sq, " + ("2P/W (8-bit)" if args.adam_8bit else "8P/W"), lambda e: fmt(e["adam"])),
        ("**persistent (sharded), " + ("10P/W" if args.adam_8bit else "16P/W") + "**", lambda e: fmt(e["persistent"])),
        ("RL gen: gathered bf16 weights, 2P", lambda e: fmt(e["gen_copy"])),
        (f"RL gen: KV cache bf16, {e0['gen_rows']} rows x {e0['gen_len']} tokens", lambda e: fmt(e["kv_cache"])),
        ("RL gen: prefill / sampling temporaries", lambda e: fmt(e["gen_temps"])),
        ("**RL generation peak**", lambda e: fmt(e["gen_peak"])),
        ("FSDP2 transient: bf16 root + 2 blocks, fp32 grads of root + 1 block", lambda e: fmt(e["fsdp_transient"])),
        (f"RL act. ({e0['rl_tokens']} tokens): block inputs", lambda e: fmt(e["rl_act"]["inputs"])),
        ("RL act.: final norm + lm_head chunk", lambda e: fmt(e["rl_act"]["head"])),
        ("RL act.: one block recomputed", lambda e: fmt(e["rl_act"]["block"])),
        ("**RL update peak**", lambda e: fmt(e["update_peak"])),
        ("RL update peak, generation's copy + KV cache + graphs kept (train_rl --keep_engine true)",
         lambda e: fmt(e["update_peak_kept"])),
        (f"kept by --keep_engine auto (<= {AUTO_MEMORY_FRACTION:.0%} of {cap:g} GiB): RL / RL+KL",
         lambda e: " / ".join("yes" if keeps_engine(e["update_peak_kept"] + ref, cap * gib) else "no"
                              for ref in (0, e["ref_model"]))),
        (f"--checkpoint_every auto (<= {AUTO_MEMORY_FRACTION:.0%} of {cap:g} GiB): RL / SFT",
         lambda e: " / ".join(map(recompute_words, auto_recompute(e["cfg"], s0, cap * gib)))),
        (f"SFT act. ({e0['sft_tokens']} tokens): block inputs", lambda e: fmt(e["sft_act"]["inputs"])),
        ("SFT act.: final norm + lm_head chunk", lambda e: fmt(e["sft_act"]["head"])),
        ("SFT act.: one block recomputed", lambda e: fmt(e["sft_act"]["block"])),
        ("**SFT peak**", lambda e: fmt(e["sft_peak"])),
        ("reference model if --kl_coef > 0, 4P/W", lambda e: fmt(e["ref_model"])),
        ("**RL peak with --kl_coef > 0**", lambda e: fmt(e["rl_kl_peak"])),
        (f"fits {cap:g} GiB: RL / RL+KL / SFT",
         lambda e: f"{yes(e['rl_peak'])} / {yes(e['rl_kl_peak'])} / {yes(e['sft_peak'])}"),
    ]
    print(f"per-GPU memory, GiB, on {args.world} x {cap:g} GiB (FSDP2: fp32 master + grads + AdamW sharded over "
          f"{args.world}, bf16 compute; {recompute}); RL: {s0['prompts_per_rank']} prompts per rank x "
          f"{args.samples_per_prompt} rollouts, prompts {args.prompt_tokens} + responses {args.response_tokens} "
          f"tokens; every peak includes {CUDA_CONTEXT_GIB} GiB of CUDA context and allocator slack")
    print()
    print("| per GPU, GiB | " + " | ".join(name for name, _ in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for label, cell in rows:
        print(f"| {label} | " + " | ".join(cell(e) for e in est) + " |")
    print()
    verdict = []
    for (name, cfg), e in zip(cols, est):
        said = []
        for mode, key in (("RL", "rl_peak"), ("SFT", "sft_peak")):
            if e[key] / gib <= cap:
                said.append(f"{mode} fits")
                continue
            phase = "generation" if mode == "RL" and e["gen_peak"] >= e["update_peak"] else "update"
            line = f"{mode} does not ({phase} peak {fmt(e[key])} GiB"
            if mode == "RL" and e["update_peak"] / gib <= cap:  # only generation is too big: a smaller call?
                fitting = [b for b in range(min(s0["prompts_per_rank"], args.gen_batch_size) - 1, 0, -1)
                           if memory_estimate(cfg, **memory_settings(args, gen_batch_size=b))["gen_peak"] / gib <= cap]
                line += (f"; fits with --gen_batch_size {fitting[0]}" if fitting
                         else "; not even one prompt per call fits")
            said.append(line + ")")
        verdict.append(f"{name}: " + ", ".join(said))
    print(f"verdict on {args.world} x {cap:g} GiB: " + "; ".join(verdict) + ".")
    return [dict(e, name=name) for (name, _), e in zip(cols, est)]
