"""
Speed benchmarks. Generation: our KV-cache engine (engine.generate) against transformers' generate on
the same weights and prompts, both forced to stop each row at the same length.

  python bench.py                 # CPU: a ~28M-parameter Qwen2-architecture model, fp32
  python bench.py --gpu true      # GPU: the Qwen2.5-1.5B architecture with random bf16 weights
  python bench.py --rl true       # one GRPO step of train_rl.py: generation / scoring / training seconds
  python bench.py --gpu_suite true --json_out docs/gpu_h100.json   # everything on one GPU, one JSON (see gpu_suite)
  python bench.py --gpu_suite true --smoke true               # the same code on CPU with a tiny model
  python bench.py --memory qwen2.5-1.5b qwen2.5-7b --world 8 --gpu_gib 80   # per-GPU memory table (no GPU needed)
  python bench.py --memory path/to/config.json                # ... for any Hugging Face config.json (or its directory)

Workloads: "rl" = prompts of different lengths x 8 samples each, response lengths spread between a
minimum and a maximum as in real rollouts; "fixed" = every row the same length. Tokens/s counts new
tokens (EOS included); the median of --repeats runs is reported. On GPU it also prints the
memory-bandwidth floor of the decode (weights + KV cache bytes read per step / bandwidth) and our
fraction of it.
"""
import argparse
import functools
import json
import os
import random
import statistics
import tempfile
import time
import traceback
from contextlib import contextmanager

import torch

import common
from common import UserError, parse_settings, run_main
import engine
from engine import generate
from model import ModelConfig, load_model, read_config, save_model
from tiny_base import build_model, build_tokenizer, tiny_config

QWEN25_15B = dict(arch="Qwen2ForCausalLM", hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                  intermediate_size=8960, max_position_embeddings=32768, tie_word_embeddings=True,
                  rope_theta=1000000.0)
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # bytes/s (SXM parts)
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core FLOP/s (datasheets)
SUITE_SECTIONS = ("correctness", "generation", "sft", "rl")
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


def settings(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", type=common.str2bool, default=False, help="GPU mode: Qwen2.5-1.5B architecture, random bf16 weights")
    p.add_argument("--workloads", nargs="+", default=["rl", "fixed"], choices=["rl", "fixed"],
                   help="which workloads to run")
    p.add_argument("--prompts", type=int, nargs="+", default=None,
                   help="numbers of prompts to run (default: 8 on CPU; 32 and 128 on GPU)")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt")
    p.add_argument("--min_len", type=int, default=None, help="shortest response of the rl workload (default 64)")
    p.add_argument("--max_len", type=int, default=None, help="longest response (default 512 on CPU, 2048 on GPU)")
    p.add_argument("--fixed_len", type=int, default=256, help="response length of the fixed workload")
    p.add_argument("--repeats", type=int, default=3, help="runs per engine; the median is reported")
    p.add_argument("--skip_hf", type=common.str2bool, default=False, help="benchmark our engine only")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, prompts and lengths")
    p.add_argument("--rl", type=common.str2bool, default=False, help="benchmark one GRPO step of train_rl.py instead (CPU, tiny model)")
    p.add_argument("--rl_steps", type=int, default=4, help="RL steps to run (the first is a warm-up)")
    p.add_argument("--rl_prompts", type=int, default=16, help="prompts per RL step (x --samples rollouts)")
    p.add_argument("--rl_max_len", type=int, default=64, help="response length cap of the RL benchmark")
    p.add_argument("--gpu_suite", type=common.str2bool, default=False,
                   help="the GPU check: correctness against transformers, generation throughput, one RL step and SFT "
                        "at the Qwen2.5-1.5B shape with random weights; one JSON (--json_out)")
    p.add_argument("--smoke", type=common.str2bool, default=False, help="--gpu_suite on CPU with a tiny model and small sizes")
    p.add_argument("--sections", nargs="+", default=list(SUITE_SECTIONS), choices=SUITE_SECTIONS,
                   help="--gpu_suite: which sections to run, in this order")
    p.add_argument("--json_out", default="", help="--gpu_suite: write the results here (rewritten after each section)")
    p.add_argument("--suite_rl_response_tokens", type=int, default=4096,
                   help="--gpu_suite: response cap of the RL step (the paper's 4096; random weights run to it)")
    # --memory: the per-GPU memory table (defaults = train_rl.py's and redistill_sft.py's; a test checks they agree)
    p.add_argument("--memory", nargs="+", default=None, metavar="CONFIG",
                   help="print the per-GPU memory table of RL (train_rl.py) and SFT (redistill_sft.py) under FSDP2 "
                        "for these models: a Hugging Face config.json, its directory, or a preset ("
                        + ", ".join(MEMORY_PRESETS) + "); one column per model")
    p.add_argument("--world", type=int, default=8,
                   help="--memory: GPUs (FSDP ranks) the training state is sharded over")
    p.add_argument("--gpu_gib", type=float, default=80, help="--memory: memory of one GPU in GiB; fits = peak <= this")
    p.add_argument("--prompts_per_step", type=int, default=128,
                   help="--memory: RL prompts per step over all ranks (train_rl --prompts_per_step); each rank takes "
                        "its share")
    p.add_argument("--prompts_per_rank", type=int, default=None,
                   help="--memory: RL prompts per rank (default: --prompts_per_step / --world, rounded up)")
    p.add_argument("--samples_per_prompt", type=int, default=8, help="--memory: RL rollouts per prompt (train_rl --samples_per_prompt)")
    p.add_argument("--gen_batch_size", type=int, default=32,
                   help="--memory: prompts per generation call (train_rl --gen_batch_size): KV-cache rows = "
                        "min(prompts per rank, this) x --samples_per_prompt")
    p.add_argument("--prompt_tokens", type=int, default=512,
                   help="--memory: longest prompt of a generation call, tokens")
    p.add_argument("--response_tokens", type=int, default=4096,
                   help="--memory: response cap (train_rl --max_response_tokens)")
    p.add_argument("--rl_micro_batch_tokens", type=int, default=30000,
                   help="--memory: tokens of one packed RL training micro-batch (train_rl --micro_batch_tokens)")
    p.add_argument("--sft_micro_batch_tokens", type=int, default=16384,
                   help="--memory: tokens of one packed SFT micro-batch (redistill_sft --micro_batch_tokens)")
    p.add_argument("--logprob_chunk", type=int, default=4096,
                   help="--memory: tokens per chunk of the lm_head + fp32 log-softmax (train_rl --logprob_chunk)")
    return parse_settings(p, argv)


def make_workload(kind, n_prompts, samples, min_len, max_len, fixed_len, vocab, seed):
    """Prompts of 16..160 tokens and each row's response length, longest first (see run_ours)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (int(torch.randint(16, 161, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n_prompts)]
    rows = n_prompts * samples
    if kind == "fixed":
        lengths = [fixed_len] * rows
    else:
        lengths = sorted(torch.randint(min_len, max_len + 1, (rows,), generator=g).tolist(), reverse=True)
    return prompts, lengths


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_ours(model, prompts, lengths, samples, stop_id):
    """Our engine, with the stop token forced at each row's length. Rows come longest first (make_workload), so the
    rows that finish at a step are always the last live ones and no row moves (KVCache.drop): live row r is row r,
    and a wrapper around engine.sample_next can force the stop by row without the engine knowing."""
    assert lengths == sorted(lengths, reverse=True), "rows must come longest first"
    want = torch.tensor(lengths, device=model.lm_head.weight.device)
    pick, step = engine.sample_next, [0]

    def forced_pick(logits, *rest):
        at = want[:logits.shape[0]] == step[0] + 1
        logits[:, stop_id] = -float("inf")  # never earlier ...
        logits[at] = -float("inf")  # ... and exactly at the row's length
        logits[at, stop_id] = 0.0
        step[0] += 1
        return pick(logits, *rest)

    engine.sample_next = forced_pick
    try:
        out = engine.generate(model, prompts, n=samples, max_new_tokens=max(lengths), temperature=1.0,
                              stop_ids=[stop_id], seed=0)
    finally:
        engine.sample_next = pick
    assert [len(g.tokens) for g in out] == lengths
    return sum(lengths)


def run_hf(hf, prompts, lengths, samples, stop_id):
    """transformers generate: left-padded batch, num_return_sequences, the same forced stops."""
    from transformers import LogitsProcessor, LogitsProcessorList
    device = hf.device
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), stop_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    want = torch.tensor(lengths, device=device)

    class ForceStop(LogitsProcessor):
        def __call__(self, input_ids, scores):
            at = want == input_ids.shape[1] - width + 1
            scores[:, stop_id] = -float("inf")
            scores[at] = -float("inf")
            scores[at, stop_id] = 0.0
            return scores

    out = hf.generate(ids.to(device), attention_mask=mask.to(device), do_sample=True, temperature=1.0, top_k=0,
                      top_p=1.0, num_return_sequences=samples, max_new_tokens=max(lengths), eos_token_id=stop_id,
                      pad_token_id=stop_id, logits_processor=LogitsProcessorList([ForceStop()]))
    assert out.shape[0] == len(lengths)
    return sum(lengths)


def bandwidth_floor(cfg, model, prompts, lengths, samples, dtype_bytes, bandwidth):
    """Seconds a perfect decode needs just to read the weights and the live KV cache at every step."""
    weight_bytes = model.num_params() * dtype_bytes
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype_bytes
    prompt_len = [len(prompts[r // samples]) for r in range(len(lengths))]
    total = 0.0
    for step in range(max(lengths)):
        live = [prompt_len[r] + step for r in range(len(lengths)) if lengths[r] > step]
        total += weight_bytes + kv_per_token * sum(live)
    return total / bandwidth


def main(argv=None):
    args = settings(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rl:
        return bench_rl(args)
    if args.gpu_suite:
        return gpu_suite(args)
    if args.memory:
        return bench_memory(args)
    device = torch.device("cuda" if args.gpu else "cpu")
    if args.gpu:
        assert torch.cuda.is_available(), "--gpu needs CUDA"
        hf_cfg = tiny_config(151936, **QWEN25_15B)
        dtype = torch.bfloat16
        prompt_counts = args.prompts or [32, 128]
        max_len = args.max_len or 2048
    else:
        hf_cfg = tiny_config(8192, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1536,
                             max_position_embeddings=4096, tie_word_embeddings=True)
        dtype = torch.float32
        prompt_counts = args.prompts or [8]
        max_len = args.max_len or 512
    min_len = args.min_len or 64
    torch.manual_seed(args.seed)
    model = build_model(hf_cfg, seed=args.seed).to(device=device, dtype=dtype).eval()
    cfg = model.config
    hf = None
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM
        with tempfile.TemporaryDirectory() as d:  # the very same weights, through a checkpoint
            save_model(model, d + "/ckpt")
            hf = AutoModelForCausalLM.from_pretrained(d + "/ckpt", dtype=dtype).to(device).eval()
    name = torch.cuda.get_device_name() if args.gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; model: {cfg.arch} {model.num_params() / 1e6:.1f}M params, {dtype}")
    print(f"{'workload':>8} {'rows':>5} {'new tok':>8} | {'ours tok/s':>10} {'hf tok/s':>9} {'ratio':>6}"
          + (" | floor s  ours/floor" if args.gpu else ""))
    stop_id = 2
    for kind in args.workloads:
        for n_prompts in prompt_counts:
            prompts, lengths = make_workload(kind, n_prompts, args.samples, min_len, max_len, args.fixed_len,
                                             cfg.vocab_size, args.seed)
            run_ours(model, prompts[:2], lengths[:2 * args.samples], args.samples, stop_id)  # warm-up
            t_ours, t_hf = [], []
            for _ in range(args.repeats):  # interleaved, so a busy machine slows both engines alike
                t_ours.append(timed(lambda: run_ours(model, prompts, lengths, args.samples, stop_id), device))
                if hf is not None:
                    t_hf.append(timed(lambda: run_hf(hf, prompts, lengths, args.samples, stop_id), device))
            ours = statistics.median(t_ours)
            line = f"{kind:>8} {len(lengths):>5} {sum(lengths):>8} | {sum(lengths) / ours:>10.0f}"
            if hf is not None:
                t_hf = statistics.median(t_hf)
                line += f" {sum(lengths) / t_hf:>9.0f} {t_hf / ours:>5.2f}x"
            else:
                line += f" {'-':>9} {'-':>6}"
            if args.gpu:
                bw = next((v for k, v in PEAK_BANDWIDTH.items() if k in name), None)
                if bw:
                    floor = bandwidth_floor(cfg, model, prompts, lengths, args.samples, 2, bw)
                    line += f" | {floor:7.2f}  {floor / ours:6.1%}"
            print(line, flush=True)


# -----------------------------------------------------------------------------
# RL-step benchmark (python bench.py --rl true): train_rl.py's real loop on a fixed config


def bench_rl(args):
    """Seconds per GRPO step split into generation / scoring / training: train_rl.main on a random-weight
    model (responses run to the length cap, so every step does the same work) and the toy addition task.
    The first step (warm-up) is left out; the median of the others is reported."""
    import sys
    import train_rl
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))
    import toy_task
    steps, prompts, group, max_len = args.rl_steps, args.rl_prompts, args.samples, args.rl_max_len
    with tempfile.TemporaryDirectory() as d:
        recs = toy_task.make_records(max(prompts * steps, 64), seed=args.seed)
        tok = build_tokenizer([r["question"] + " " + toy_task.teacher_response(r) for r in recs] * 3
                              + [common.SYSTEM_PROMPT], vocab_size=400)
        cfg = tiny_config(len(tok), hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4)
        model = build_model(cfg, seed=args.seed)
        save_model(model, os.path.join(d, "init"), tok)
        common.write_jsonl(os.path.join(d, "train.jsonl"), recs)
        argv = ["--model", os.path.join(d, "init"), "--task", "toy_task", "--train_data", os.path.join(d, "train.jsonl"),
                "--test_data", "", "--out_dir", os.path.join(d, "run"), "--prompts_per_step", str(prompts),
                "--samples_per_prompt", str(group), "--max_response_tokens", str(max_len), "--max_steps", str(steps),
                "--save_every", str(steps), "--log_rollouts", "false", "--progress", "false", "--lr", "1e-5",
                "--seed", str(args.seed)]
        t0 = time.time()
        train_rl.main(argv)
        wall = time.time() - t0
        ms = common.read_jsonl(os.path.join(d, "run", "metrics.jsonl"))[1:]  # the first step warms up
        # the engine alone on the last step's prompts, same seed and weights: what the RL step's generation costs
        from model import load_tokenizer, stop_token_ids
        final, tok = load_model(os.path.join(d, "run", f"step_{steps:06d}")), load_tokenizer(os.path.join(d, "init"))
        recs = [recs[i] for i in train_rl.step_prompt_indices(len(recs), prompts, steps, args.seed)]
        ids = common.encode_prompts(tok, [toy_task.render_prompt(r, tok) for r in recs])
        t0 = time.time()
        gens = generate(final, sorted(ids, key=len), n=group, max_new_tokens=max_len, temperature=0.7,
                        stop_ids=stop_token_ids(tok), seed=1)
        alone = sum(len(g.tokens) for g in gens) / (time.time() - t0)
    med = sorted(ms, key=lambda m: m["step_s"])[len(ms) // 2]  # the median step, so its parts add up
    print(f"\nRL step ({model.num_params() / 1e6:.1f}M-param Qwen2-architecture model, random weights, fp32 CPU, "
          f"{torch.get_num_threads()} thread(s)); {prompts} prompts x {group} samples, responses {med['len_mean']:.0f} "
          f"tokens (cap {max_len}); the median step of 2..{steps} (whole run {wall:.1f}s):")
    print(f"  step {med['step_s']:.2f}s = generation {med['gen_s']:.2f}s ({med['gen_tok_s']:.0f} tok/s) + scoring "
          f"{med['score_s']:.3f}s + training {med['train_s']:.2f}s ({med['train_tok_s']:.0f} tok/s) + other "
          f"{med['step_s'] - med['gen_s'] - med['score_s'] - med['train_s']:.2f}s")
    print(f"  generation inside the step: {med['gen_tok_s']:.0f} tok/s = {med['gen_tok_s'] / alone:.0%} of the engine alone "
          f"on the same prompts ({alone:.0f} tok/s)")
    return dict(med, engine_alone_tok_s=alone)



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
    bias = cfg.arch == "qwen2" or cfg.hf_config.get("attention_bias", False)  # as model.Attention decides
    attn = H * q + 2 * H * kv + q * H + (q + 2 * kv if bias else 0) + (2 * hd if cfg.arch == "qwen3" else 0)
    block = attn + 3 * H * cfg.intermediate_size + 2 * H  # + gate/up/down, input and post-attention norms
    lm_head = 0 if cfg.tie_word_embeddings else V * H
    return {"embed": V * H, "block": block, "final_norm": H, "lm_head": lm_head,
            "total": V * H + cfg.num_layers * block + H + lm_head}


def kv_cache_bytes(cfg, rows, max_len, dtype_bytes=2):
    """engine.KVCache(cfg, rows, max_len, ...): k and v, each (layers, rows, kv_heads, max_len, head_dim)."""
    return 2 * cfg.num_layers * rows * cfg.num_kv_heads * max_len * cfg.head_dim * dtype_bytes


def block_bytes_per_token(cfg):
    """Peak bytes per token of one checkpointed block recomputed in backward: what autograd saves in the recompute,
    plus the gradients in flight. Saved: each RMSNorm's fp32 x.float() (2 x 4 H bytes); in bf16 (2 bytes) each
    norm's normalised x and output (4 H), q and k after RoPE, v, the attention output and its (T, heads x hd)
    reshape (3 nh hd + 2 nkv hd; flash attention keeps O(T) more), gate, silu(gate), up, silu(gate) * up (4 I);
    Qwen3's q_norm / k_norm also keep fp32 q, k and their normalised bf16 copies (6 (nh + nkv) hd bytes).
    In flight at the peak, the MLP's backward: two I-wide gradients more than the saved tensors it frees, and the
    block's output and input gradients (2 I + 2 H, bf16).
      per token = 8 H + 2 (6 H + 3 nh hd + 2 nkv hd + 6 I) [+ 6 (nh + nkv) hd for qwen3]
    Checked against the peak measured on CPU (tests/test_bench_memory.py) and on an H100 (docs/memory.md)."""
    H, hd, nh, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    qk_norm = 6 * (nh + nkv) * hd if cfg.arch == "qwen3" else 0
    return 8 * H + 2 * (6 * H + 3 * nh * hd + 2 * nkv * hd + 6 * cfg.intermediate_size) + qk_norm


def prefill_bytes_per_token(cfg):
    """Peak bytes per prompt token of generation's prefill (no grad, one block at a time): the MLP holds the block's
    input, the normed input, silu(gate), up and their product (2 H + 3 I, bf16), an RMSNorm its fp32 x.float() and
    x * rsqrt (8 H)."""
    return 2 * (2 * cfg.hidden_size + 3 * cfg.intermediate_size) + 8 * cfg.hidden_size


def activation_bytes(cfg, tokens, chunk, with_entropy, gathered):
    """Training activations of one packed micro-batch of `tokens` tokens with gradient checkpointing:
      inputs  every block's stored input, L x T x H bf16
      head    the final norm (its fp32 input copy, bf16 normalised x and output: 4 + 2 + 2 bytes x T x H; RL also
              gathers the response positions' hidden states, + 2) and one lm_head chunk recomputed in backward:
              chunk x V x 4 bytes x 3 (the fp32 log-softmax, its gradient, the gradient of the fp32 logits), x 2 more
              with the entropy's graph (probs = exp(log-softmax) and their gradient; train_rl keeps it only
              with --entropy_coef > 0, its logged entropy is computed without graph)
      block   one block recomputed in backward: block_bytes_per_token x T
    The head's backward (all lm_head chunks, then the final norm) finishes before the first block is recomputed,
    so the peak is inputs + max(head, block)."""
    H, V = cfg.hidden_size, cfg.vocab_size
    inputs = cfg.num_layers * tokens * H * 2
    head = tokens * H * (4 + 2 + 2 + (2 if gathered else 0)) + min(tokens, chunk) * V * 4 * (3 + 2 * bool(with_entropy))
    block = block_bytes_per_token(cfg) * tokens
    return {"inputs": inputs, "head": head, "block": block, "total": inputs + max(head, block)}


def memory_estimate(cfg, world=8, prompts_per_rank=16, group_size=8, gen_batch_size=32, prompt_tokens=512,
                    response_tokens=4096, rl_tokens=30000, sft_tokens=16384, logprob_chunk=4096):
    """Per-GPU bytes of RL (train_rl.py) and SFT (redistill_sft.py) under FSDP2 on `world` ranks (see the section's
    comment). Peaks include CUDA_CONTEXT_GIB."""
    n = param_counts(cfg)
    P, W = n["total"], world
    root = n["embed"] + n["lm_head"] + n["final_norm"]  # the root FSDP group: embed_tokens, lm_head if untied, norm
    e = {"params": P, "master": 4 * P / W, "grads": 4 * P / W, "adam": 8 * P / W, "slack": CUDA_CONTEXT_GIB * 2**30}
    e["persistent"] = e["master"] + e["grads"] + e["adam"]
    e["ref_model"] = 4 * P / W  # --kl_coef > 0: a frozen copy sharded the same way, no grads or optimizer
    # FSDP2 transients of forward + backward: the root unsharded in bf16 throughout, two blocks unsharded in bf16
    # (the current one + the prefetched one), and in backward the unsharded fp32 gradients of one block and of the
    # root before their reduce-scatter. (This covers the lm_head's gradient too: in the head's backward the root holds
    # its bf16 params, the bf16 gradient being accumulated and one chunk's V x H bf16 weight gradient before it is
    # added in: at most 6 bytes per root parameter. A single-H100 check measured that chunk gradient on top of
    # activation_bytes, which came within 1 % of the rest at the 1.5B and 7B shapes; see docs/memory.md.)
    e["fsdp_transient"] = 2 * root + 2 * 2 * n["block"] + 4 * n["block"] + 4 * root
    # RL generation: the training state stays sharded; a plain bf16 copy of all weights is gathered for the engine
    # (freed before the update), engine.generate's KV cache (rows x (prompt + response) columns) and its
    # temporaries: the prefill (prompts packed in one row, no grad, one block at a time) or a decode step's sampling
    # (rows x V fp32: logits, log-softmax, probs / cdf), whichever is larger
    prompts = min(prompts_per_rank, gen_batch_size)
    e["gen_rows"], e["gen_len"] = prompts * group_size, prompt_tokens + response_tokens
    e["gen_copy"] = 2 * P
    e["kv_cache"] = kv_cache_bytes(cfg, e["gen_rows"], e["gen_len"])
    e["gen_temps"] = max(prefill_bytes_per_token(cfg) * prompts * prompt_tokens, e["gen_rows"] * cfg.vocab_size * 4 * 3)
    e["gen_peak"] = e["persistent"] + e["gen_copy"] + e["kv_cache"] + e["gen_temps"] + e["slack"]
    # training: a micro-batch holds up to its token budget, or one longer sequence alone
    e["rl_tokens"] = max(rl_tokens, prompt_tokens + response_tokens)
    e["rl_act"] = activation_bytes(cfg, e["rl_tokens"], logprob_chunk, with_entropy=False, gathered=True)
    e["update_peak"] = e["persistent"] + e["fsdp_transient"] + e["rl_act"]["total"] + e["slack"]
    e["rl_peak"] = max(e["gen_peak"], e["update_peak"])
    # the reference model's own log-prob pass (no grad) runs apart from the update: only its sharded state adds
    e["rl_kl_peak"] = e["rl_peak"] + e["ref_model"]
    e["sft_tokens"] = sft_tokens
    e["sft_act"] = activation_bytes(cfg, sft_tokens, logprob_chunk, with_entropy=False, gathered=True)
    e["sft_peak"] = e["persistent"] + e["fsdp_transient"] + e["sft_act"]["total"] + e["slack"]
    return e


def memory_config(spec):
    """(column name, ModelConfig) for a --memory argument: a preset, a checkpoint directory or a config.json."""
    if spec.lower() in MEMORY_PRESETS:
        return spec.lower(), ModelConfig.from_hf(tiny_config(arch="Qwen2ForCausalLM", rope_theta=1000000.0,
                                                             **MEMORY_PRESETS[spec.lower()]), spec)
    if os.path.isdir(spec):
        return os.path.basename(os.path.normpath(spec)), read_config(spec)
    if not os.path.isfile(spec):
        raise UserError(f"{spec}: no such config.json or directory, and not a preset ({', '.join(MEMORY_PRESETS)})")
    try:
        with open(spec) as f:
            hf = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{spec}: cannot read a config.json ({e})")
    if not isinstance(hf, dict):
        raise UserError(f"{spec}: not a config.json (a JSON object expected)")
    return os.path.basename(os.path.dirname(os.path.abspath(spec))) or spec, ModelConfig.from_hf(hf, spec)


def memory_settings(args, world=None, gen_batch_size=None):
    world = world or args.world
    per_rank = args.prompts_per_rank or -(-args.prompts_per_step // world)
    return dict(world=world, prompts_per_rank=per_rank, group_size=args.samples_per_prompt,
                gen_batch_size=gen_batch_size or args.gen_batch_size, prompt_tokens=args.prompt_tokens,
                response_tokens=args.response_tokens, rl_tokens=args.rl_micro_batch_tokens,
                sft_tokens=args.sft_micro_batch_tokens, logprob_chunk=args.logprob_chunk)


def bench_memory(args):
    """One markdown table, a column per model, rows the per-GPU components and phase peaks in GiB; then a verdict."""
    for name in ("world", "samples_per_prompt", "gen_batch_size", "prompt_tokens", "response_tokens", "rl_micro_batch_tokens",
                 "sft_micro_batch_tokens", "logprob_chunk", "prompts_per_step"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if args.prompts_per_rank is not None and args.prompts_per_rank < 1:
        raise UserError("--prompts_per_rank must be at least 1")
    cols = [memory_config(spec) for spec in args.memory]
    est = [memory_estimate(cfg, **memory_settings(args)) for _, cfg in cols]
    gib, cap = 2**30, args.gpu_gib
    e0, s0 = est[0], memory_settings(args)

    def fmt(b):
        return f"{b / gib:.1f}"

    def yes(b):
        return "yes" if b / gib <= cap else "**no**"

    rows = [
        ("parameters P", lambda e: f"{e['params'] / 1e9:.2f}B"),
        ("fp32 master weights, 4P/W", lambda e: fmt(e["master"])),
        ("fp32 gradients, 4P/W", lambda e: fmt(e["grads"])),
        ("AdamW exp_avg + exp_avg_sq, 8P/W", lambda e: fmt(e["adam"])),
        ("**persistent (sharded), 16P/W**", lambda e: fmt(e["persistent"])),
        ("RL gen: gathered bf16 weights, 2P", lambda e: fmt(e["gen_copy"])),
        (f"RL gen: KV cache bf16, {e0['gen_rows']} rows x {e0['gen_len']} tokens", lambda e: fmt(e["kv_cache"])),
        ("RL gen: prefill / sampling temporaries", lambda e: fmt(e["gen_temps"])),
        ("**RL generation peak**", lambda e: fmt(e["gen_peak"])),
        ("FSDP2 transient: bf16 root + 2 blocks, fp32 grads of root + 1 block", lambda e: fmt(e["fsdp_transient"])),
        (f"RL act. ({e0['rl_tokens']} tokens): block inputs", lambda e: fmt(e["rl_act"]["inputs"])),
        ("RL act.: final norm + lm_head chunk", lambda e: fmt(e["rl_act"]["head"])),
        ("RL act.: one block recomputed", lambda e: fmt(e["rl_act"]["block"])),
        ("**RL update peak**", lambda e: fmt(e["update_peak"])),
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
          f"{args.world}, bf16 compute; gradient checkpointing); RL: {s0['prompts_per_rank']} prompts per rank x "
          f"{args.samples_per_prompt} rollouts, prompts {args.prompt_tokens} + responses {args.response_tokens} tokens; every "
          f"peak includes {CUDA_CONTEXT_GIB} GiB of CUDA context and allocator slack")
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


# -----------------------------------------------------------------------------
# the GPU suite (python bench.py --gpu_suite true): everything a lent GPU's few minutes should measure, one JSON


def gpu_suite(args):
    """Correctness, generation speed, one RL step and SFT at the Qwen2.5-1.5B shape with random weights.

    correctness  our logits vs transformers in fp32 and bf16; fp32 greedy decode vs transformers.generate;
                 logprob_gap: the sampler's log-probs vs the training forward's, in bf16 and fp32, at T 0.7
    generation   the RL-shaped workload (prompts x 8, responses 64..512): our tok/s vs transformers.generate,
                 our share of the decode's memory-bandwidth floor, peak memory; per decode step: kernel time
                 (torch.profiler) vs wall time, from the difference of two lengths (the prefill cancels)
    sft          redistill_sft.py at the paper's K&K batch (64 sequences, 16K-token micro-batches, max length
                 5000, gradient checkpointing, bf16 autocast, 8-bit AdamW when bitsandbytes is installed)
    rl           one train_rl.py step at one GPU's share of the paper preset: 16 prompts x 8 rollouts, responses
                 up to 4096 tokens (random weights do not stop: the worst case), gradient checkpointing
    Each section is a dict of the JSON; an error is recorded there and the next section still runs. The sft and
    rl sections skip checkpoint writes: they measure compute, and a 1.5B checkpoint's cost is the disk's.
    --smoke runs the same code on CPU with a tiny model, so a broken suite shows before a GPU is spent on it.
    """
    import transformers
    import kk_data
    if args.smoke:
        device = torch.device("cpu")
        cfg = tiny_config(2048, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=8192)
        sizes = dict(logits=(2, 32), greedy_new=8, gap_new=16, gen_prompts=[2, 4], gen_len=(4, 16), step_prompts=[2],
                     step_lens=(4, 12), sft_batch=8, sft_steps=2, sft_response=(20, 60), sft_micro=512, rl_prompts=4,
                     rl_group=2, rl_max=32)
    else:
        if not torch.cuda.is_available():
            raise UserError("--gpu_suite needs CUDA; --smoke true runs it on CPU with a tiny model")
        device = torch.device("cuda")
        cfg = tiny_config(151936, **QWEN25_15B)
        sizes = dict(logits=(4, 256), greedy_new=64, gap_new=256, gen_prompts=[16, 128], gen_len=(64, 512),
                     step_prompts=[16, 128], step_lens=(8, 24), sft_batch=64, sft_steps=3, sft_response=(500, 3000),
                     sft_micro=16384, rl_prompts=16, rl_group=8,
                     rl_max=args.suite_rl_response_tokens)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke)"
    result = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
              "bitsandbytes": package_version("bitsandbytes"), "flash_attn": package_version("flash_attn"),
              "model": {k: cfg[k] for k in ("architectures", "vocab_size", "hidden_size", "num_hidden_layers",
                                            "num_attention_heads", "num_key_value_heads", "intermediate_size")},
              "sizes": sizes}
    if device.type == "cuda":
        result["ceilings"] = device_ceilings(device)

    def write():
        if args.json_out:
            common.write_json(args.json_out, rounded(result))

    t_all = time.time()
    with tempfile.TemporaryDirectory() as d:
        records = [r for people in range(3, 8) for r in kk_data.generate(args.seed, people, 4, log=None)]
        tok = build_tokenizer([r["question"] + " " + kk_data.teacher_response(r) for r in records] * 4
                              + [common.SYSTEM_PROMPT], vocab_size=1024, pad_to=cfg["vocab_size"])
        base = os.path.join(d, "base")
        with torch.device(device):
            model = build_model(cfg, seed=args.seed)
        result["model"]["params"] = model.num_params()
        save_model(model, base, tok, dtype=torch.bfloat16)  # every section loads this bf16 checkpoint
        del model
        sections = {"correctness": suite_correctness, "generation": suite_generation, "sft": suite_sft, "rl": suite_rl}
        for section in args.sections:
            print(f"--- {section}", flush=True)
            t0 = time.time()
            try:
                result[section] = sections[section](base, tok, records, sizes, device, args.seed, d)
            except Exception as e:  # noqa: BLE001 -- recorded, and the next section still runs
                traceback.print_exc()
                result[section] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
            result[section]["seconds"] = time.time() - t0
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write()
            print(json.dumps(rounded(result[section])), flush=True)
    result["seconds"] = time.time() - t_all
    write()
    return result


def package_version(name):
    from importlib import metadata
    try:
        return metadata.version(name.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return None


def rounded(obj, digits=4):
    """Floats to `digits` significant digits, for a JSON a person reads."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


@functools.lru_cache(maxsize=None)
def device_ceilings(device):
    """The two ceilings measured on this card: device-to-device copy bandwidth (bytes read + written) and a
    large bf16 matrix product, each the median of 10 after warm-up."""
    def median_seconds(fn, reps=10):
        fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    a = torch.randn(2**28, device=device)  # 1 GiB of fp32
    b = torch.empty_like(a)
    copy = median_seconds(lambda: b.copy_(a))
    x = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm = median_seconds(lambda: x @ x)
    name = torch.cuda.get_device_name()
    return {"copy_bytes_per_s": 2 * a.numel() * 4 / copy, "bf16_matmul_flops": 2 * 8192**3 / mm,
            "datasheet_bytes_per_s": next((v for k, v in PEAK_BANDWIDTH.items() if k in name), None),
            "datasheet_bf16_flops": next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)}


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def compare(ours, ref):
    """Max absolute and relative (Frobenius) difference of two tensors, in float64."""
    ours, ref = ours.double(), ref.double()
    return {"max_abs": (ours - ref).abs().max().item(), "rel": ((ours - ref).norm() / ref.norm()).item()}


def train_flops(cfg, seq_lens, logprob_tokens):
    """Model FLOPs of one forward + backward over packed sequences (recomputation not counted, as MFU does):
    6 per weight per token for the blocks, 6 per lm_head weight per token whose log-prob is taken, and causal
    attention (QK^T and AV over half the square, x3 for the backward)."""
    d, L, width = cfg.hidden_size, cfg.num_layers, cfg.num_heads * cfg.head_dim
    block_weights = L * (2 * d * width + 2 * d * cfg.num_kv_heads * cfg.head_dim + 3 * d * cfg.intermediate_size)
    attention = sum(6 * L * width * s * s for s in seq_lens)
    return 6 * block_weights * sum(seq_lens) + 6 * cfg.vocab_size * d * logprob_tokens + attention


def mfu(flops, seconds, device):
    if device.type != "cuda":
        return None
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name()), None)
    return flops / seconds / peak if peak else None


def suite_correctness(base, tok, records, sizes, device, seed, tmp):
    from transformers import AutoModelForCausalLM
    from model import response_logprobs
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here (train_rl turns TF32 on later)
    torch.backends.cudnn.allow_tf32 = False
    g = torch.Generator().manual_seed(seed)
    batch, width = sizes["logits"]
    idx = torch.randint(3, len(tok), (batch, width), generator=g).to(device)
    prompts = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (8, 40, 100, 200)]
    out, logits = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        tag = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
        ours = load_model(base, dtype=dtype, device=device).eval()
        hf = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device).eval()
        with torch.no_grad():
            rows = torch.arange(0, batch * width + 1, width, device=device)  # the batch's rows as packed sequences
            ours_logits = ours.lm_head(ours(idx.reshape(1, -1), cu_seqlens=rows)).float().view(batch, width, -1)
            logits[tag] = (ours_logits, hf(idx).logits.float())
        if dtype == torch.float32:  # greedy decode, token for token, against transformers
            n = sizes["greedy_new"]
            mine = generate(ours, prompts, max_new_tokens=n, temperature=0)
            same, first_diff = 0, []
            for p, gen in zip(prompts, mine):
                ref = hf.generate(torch.tensor([p], device=device), attention_mask=torch.ones(1, len(p), dtype=torch.long,
                                  device=device), max_new_tokens=n, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
                same += gen.tokens == ref
                first_diff.append(next((i for i, (a, b) in enumerate(zip(gen.tokens, ref)) if a != b), None))
            out["greedy_fp32"] = {"prompts": len(prompts), "new_tokens": n, "identical": same, "first_difference": first_diff}
        # logprob_gap: what the sampler recorded vs what the training forward computes for the same tokens
        gens = generate(ours, prompts, n=4, max_new_tokens=sizes["gap_new"], temperature=0.7, seed=seed)
        with torch.no_grad():
            teacher = response_logprobs(ours, [prompts[x.prompt_index] for x in gens], [x.tokens for x in gens], 0.7,
                                        4096, with_entropy=False).float().cpu()
        sampler = torch.tensor([v for x in gens for v in x.logprobs])
        out[f"logprob_gap_{tag}"] = {"mean_abs": (teacher - sampler).abs().mean().item(),
                                     "max_abs": (teacher - sampler).abs().max().item(), "tokens": sampler.numel()}
        del ours, hf
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["logits_fp32_vs_transformers"] = compare(*logits["fp32"])
    out["logits_bf16_vs_transformers"] = compare(*logits["bf16"])
    out["logits_bf16_vs_fp32"] = {"ours": compare(logits["bf16"][0], logits["fp32"][1]),
                                  "transformers": compare(logits["bf16"][1], logits["fp32"][1])}
    out["logits_scale"] = logits["fp32"][1].abs().max().item()
    return out


def suite_generation(base, tok, records, sizes, device, seed, tmp):
    from transformers import AutoModelForCausalLM
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(base, dtype=dtype, device=device).eval()
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device).eval()
    cfg, samples, stop_id = model.config, 8, tok.eos_token_id
    ceilings = device_ceilings(device) if device.type == "cuda" else {}
    workloads = []
    min_len, max_len = sizes["gen_len"]
    for n_prompts in sizes["gen_prompts"]:
        prompts, lengths = make_workload("rl", n_prompts, samples, min_len, max_len, 0, cfg.vocab_size, seed)
        run_ours(model, prompts[:2], lengths[:2 * samples], samples, stop_id)  # warm-ups
        run_hf(hf, prompts[:2], lengths[:2 * samples], samples, stop_id)
        reset_peak(device)
        t_ours = timed(lambda: run_ours(model, prompts, lengths, samples, stop_id), device)
        mem_ours = peak_gb(device)
        reset_peak(device)
        t_hf = timed(lambda: run_hf(hf, prompts, lengths, samples, stop_id), device)
        w = {"prompts": n_prompts, "rows": len(lengths), "new_tokens": sum(lengths), "ours_s": t_ours, "hf_s": t_hf,
             "ours_tok_s": sum(lengths) / t_ours, "hf_tok_s": sum(lengths) / t_hf, "speedup_vs_hf": t_hf / t_ours,
             "peak_mem_gb_ours": mem_ours, "peak_mem_gb_hf": peak_gb(device)}
        for kind in ("datasheet", "measured"):
            bandwidth = ceilings.get("datasheet_bytes_per_s" if kind == "datasheet" else "copy_bytes_per_s")
            if bandwidth:
                floor = bandwidth_floor(cfg, model, prompts, lengths, samples, 2, bandwidth)
                w[f"floor_s_{kind}_bandwidth"] = floor
                w[f"ours_fraction_of_floor_{kind}"] = floor / t_ours
        workloads.append(w)
        print(w, flush=True)
    hf = None  # free its memory before the profiled runs
    return {"workloads": workloads, "decode_step": [decode_step_profile(model, n, samples, sizes["step_lens"], stop_id,
                                                                        device, seed) for n in sizes["step_prompts"]]}


def decode_step_profile(model, n_prompts, samples, step_lens, stop_id, device, seed):
    """One decode step's wall time and GPU kernel time (and kernel count), from two runs of different lengths:
    their difference over the extra steps leaves the prefill out. Kernel time well under wall time = launch-bound."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    prompts, _ = make_workload("fixed", n_prompts, samples, 1, 1, 1, model.config.vocab_size, seed)
    wall, kernel, count = {}, {}, {}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for length in step_lens:
        lengths = [length] * (n_prompts * samples)
        run_ours(model, prompts, lengths, samples, stop_id)
        wall[length] = statistics.median(timed(lambda: run_ours(model, prompts, lengths, samples, stop_id), device)
                                         for _ in range(3))
        with profile(activities=activities) as prof:
            run_ours(model, prompts, lengths, samples, stop_id)
            if device.type == "cuda":
                torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        kernel[length] = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
        count[length] = len(kernels)
    a, b = step_lens
    steps = b - a
    step_wall, step_kernel = (wall[b] - wall[a]) / steps, (kernel[b] - kernel[a]) / steps
    return {"rows": n_prompts * samples, "step_ms_wall": step_wall * 1e3, "step_ms_kernels": step_kernel * 1e3,
            "kernels_per_step": (count[b] - count[a]) / steps, "gpu_busy_fraction": step_kernel / step_wall}


@contextmanager
def checkpoints_skipped():
    """sft and rl measure compute: checkpoint writes (3 to 18 GB at 1.5B, timed by the disk) become no-ops."""
    import model as model_module
    saved = common.save_checkpoint, model_module.save_model
    common.save_checkpoint = model_module.save_model = lambda *a, **k: None
    try:
        yield
    finally:
        common.save_checkpoint, model_module.save_model = saved


def suite_sft(base, tok, records, sizes, device, seed, tmp):
    import kk_data
    import redistill_sft
    batch, steps = sizes["sft_batch"], sizes["sft_steps"]
    rng = random.Random(seed)
    words = " ".join(r["question"] for r in records).split()
    data = []
    for i in range(batch * steps):  # K&K prompts; responses of random words, 500..3000 tokens (long CoT)
        target = rng.randint(*sizes["sft_response"])
        ids = tok(" ".join(rng.choice(words) for _ in range(target)), add_special_tokens=False)["input_ids"][:target]
        data.append({"id": f"sft-{i}", "task": "kk", "prompt": kk_data.render_prompt(records[i % len(records)], tok),
                     "response": tok.decode(ids)})
    path, out = os.path.join(tmp, "sft.jsonl"), os.path.join(tmp, "sft_run")
    common.write_jsonl(path, data)
    lengths = [len(e["input_ids"]) for e in common.load_sft_examples([path], tok, 5000)]  # as SFT sees them
    argv = ["--init", base, "--data", path, "--out_dir", out, "--epochs", "1", "--global_batch", str(batch),
            "--micro_batch_tokens", str(sizes["sft_micro"]), "--max_length", "5000", "--gradient_checkpointing", "true",
            "--bf16", "true", "--stop_at_step", str(steps), "--progress", "false", "--seed", str(seed)]
    reset_peak(device)
    with checkpoints_skipped():
        redistill_sft.main(argv)
    mem = peak_gb(device)
    ms = [m for m in common.read_jsonl(os.path.join(out, "metrics.jsonl")) if "loss" in m][1:]  # step 1 warms up
    order = common.epoch_order(len(data), seed, 0)
    cfg = read_config(base)
    flops = sum(train_flops(cfg, [lengths[i] for i in order[(m["step"] - 1) * batch:m["step"] * batch]],
                            sum(lengths[i] for i in order[(m["step"] - 1) * batch:m["step"] * batch])) for m in ms)
    seconds, tokens = sum(m["time_s"] for m in ms), sum(m["tokens"] for m in ms)
    return {"sequences_per_step": batch, "tokens_per_step": tokens / len(ms), "step_s": seconds / len(ms),
            "tokens_per_s": tokens / seconds, "mfu": mfu(flops, seconds, device), "peak_mem_gb": mem,
            "optimizer": "torch AdamW, FSDP-sharded", "measured_steps": [m["step"] for m in ms]}


def suite_rl(base, tok, records, sizes, device, seed, tmp):
    import kk_data
    import train_rl
    path, out = os.path.join(tmp, "rl_train.jsonl"), os.path.join(tmp, "rl_run")
    common.write_jsonl(path, records[:sizes["rl_prompts"]])
    argv = ["--model", base, "--task", "kk", "--train_data", path, "--test_data", "", "--out_dir", out,
            "--prompts_per_step", str(sizes["rl_prompts"]), "--samples_per_prompt", str(sizes["rl_group"]),
            "--max_response_tokens", str(sizes["rl_max"]), "--max_steps", "1", "--gradient_checkpointing", "true",
            "--micro_batch_tokens", "30000", "--log_rollouts", "true", "--progress", "false", "--seed", str(seed)]
    reset_peak(device)
    with checkpoints_skipped():
        train_rl.main(argv)
    mem = peak_gb(device)
    m = common.read_jsonl(os.path.join(out, "metrics.jsonl"))[-1]
    rollouts = common.read_jsonl(os.path.join(out, "rollouts", "step_000001.jsonl"))
    prompt_len = {r["id"]: len(ids) for r, ids in zip(records, common.encode_prompts(
        tok, [kk_data.render_prompt(r, tok) for r in records]))}
    seq_lens = [prompt_len[r["id"]] + r["length"] for r in rollouts]
    flops = train_flops(read_config(base), seq_lens, sum(r["length"] for r in rollouts))
    return {"rollouts": len(rollouts), "max_response_tokens": sizes["rl_max"], "len_mean": m["len_mean"],
            "truncated": m["truncated"], "step_s": m["step_s"], "gen_s": m["gen_s"], "score_s": m["score_s"],
            "train_s": m["train_s"], "gather_s": m["gather_s"], "mem_gen_gib": m["mem_gen_gib"],
            "mem_held_gib": m["mem_held_gib"], "mem_train_gib": m["mem_train_gib"],
            "log_s": m["step_s"] - m["gen_s"] - m["score_s"] - m["train_s"] - m["gather_s"],
            "gen_tok_s": m["gen_tok_s"], "train_tok_s": m["train_tok_s"], "train_tokens": sum(seq_lens),
            "train_mfu": mfu(flops, m["train_s"], device), "logprob_gap": m["logprob_gap"], "peak_mem_gb": mem}


if __name__ == "__main__":
    run_main(main)
