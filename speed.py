"""
Measuring speed: the decode workloads and timers of bench.py, the memory-bandwidth and FLOP floors, and the GPU
suite (`python bench.py --gpu_suite true`): correctness, generation, SFT and RL on one card, one JSON.
"""
import collections
import functools
import gc
import json
import os
import random
import shutil
import statistics
import tempfile
import time
import traceback
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

import ckpt
import common
import engine
import gpu_memory
import kk_data
import parallel
import tasks
from common import UserError
from engine import generate
from model import (build_model, dtype_name, kv_bytes_per_token, load_model, parse_dtype, read_config, save_model,
                   tiny_config)
from tiny_base import build_tokenizer

QWEN25_15B = dict(arch="Qwen2ForCausalLM", hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                  intermediate_size=8960, max_position_embeddings=32768, tie_word_embeddings=True,
                  rope_theta=1000000.0)
QWEN25_3B = dict(QWEN25_15B, hidden_size=2048, num_layers=36, num_heads=16, intermediate_size=11008)
SUITE_SECTIONS = ("correctness", "attention", "decode_attention", "sampler", "train_step", "generation", "sft", "rl",
                  "rl_larger")
# datasheets, by a part of the device's name (the longest that matches: "NVIDIA H200" is the SXM part; a GH200's
# bandwidth is 4.0 or 4.9 TB/s by its memory, not the H200's: unknown)
PEAK_BANDWIDTH = {"H100": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H200": 4.8e12, "H200 NVL": 4.8e12,
                  "A100": 2.039e12, "A100 80GB PCIe": 1.935e12, "A100-SXM4-40GB": 1.555e12,
                  "A100-PCIE-40GB": 1.555e12,
                  "GH200": None}  # bytes/s ("A100": the 80 GB SXM4 part)
PEAK_BF16_FLOPS = {"H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "H200 NVL": 835e12,
                   "A100": 312e12}  # dense bf16 tensor-core FLOP/s


def datasheet(table, device_name):
    """The entry of PEAK_BANDWIDTH or PEAK_BF16_FLOPS whose key is the longest part of device_name; None if none, or
    if the device is a MIG slice ("... MIG 1g.10gb"): it has a share of the card's, which the name does not give."""
    if " MIG " in f" {device_name} ":
        return None
    keys = [k for k in table if k in device_name]
    return table[max(keys, key=len)] if keys else None


def datasheet_bandwidth(device):
    """The datasheet's memory bandwidth of this device (bytes/s); None on a CPU or a card not in PEAK_BANDWIDTH."""
    return datasheet(PEAK_BANDWIDTH, torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def make_workload(kind, n_prompts, samples, min_len, max_len, fixed_len, vocab, seed):
    """Prompts of 16..160 tokens and each row's response length (prompt-major rows)."""
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


def run_ours(model, prompts, lengths, samples, stop_id, **engine_settings):
    """Our engine, with the stop token forced at each row's length (generate's forced_lengths)."""
    out = generate(model, prompts, n=samples, max_new_tokens=max(lengths), temperature=1.0, stop_ids=[stop_id],
                   seed=0, forced_lengths=lengths, **engine_settings)
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


def decode_floor(cfg, model, prompts, lengths, samples, dtype_bytes, bandwidth=None, flops=None):
    """Seconds a perfect decode needs, step by step: to read the weights and the live KV cache at `bandwidth`, or
    to do its arithmetic at `flops` (2 per matmul weight per live row, the lm_head's included, the embedding lookup
    not; attention's 4 per head dimension per cached token), or, given both, the larger of the two at each step (the
    roofline: a step of a few hundred rows and more is bound by the arithmetic, not by reading the weights). An
    untied embedding is read only at the live rows' tokens. Step 0 is the prefill: its arithmetic is every prompt's
    tokens once (the engine prefills a prompt once for its rows), the lm_head at its last token only, and causal
    attention over the prompt."""
    kv_per_token = kv_bytes_per_token(cfg, dtype_bytes)
    lm_head = cfg.vocab_size * cfg.hidden_size
    matmul_weights = model.num_params() - (0 if cfg.tie_word_embeddings else lm_head)
    weight_bytes = matmul_weights * dtype_bytes
    row_bytes = 0 if cfg.tie_word_embeddings else cfg.hidden_size * dtype_bytes  # one embedding row per live row
    flops_per_cached = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim
    prefill_flops = sum(2 * (matmul_weights - lm_head) * len(p) + 2 * lm_head
                        + flops_per_cached * len(p) * (len(p) + 1) / 2 for p in prompts)
    prompt_len = [len(prompts[r // samples]) for r in range(len(lengths))]
    total = 0.0
    for step in range(max(lengths)):
        live = [prompt_len[r] + step for r in range(len(lengths)) if lengths[r] > step]
        read = weight_bytes + row_bytes * len(live) + kv_per_token * sum(live)
        work = prefill_flops if step == 0 else 2 * matmul_weights * len(live) + flops_per_cached * sum(live)
        total += max(read / bandwidth if bandwidth else 0.0, work / flops if flops else 0.0)
    return total


# -----------------------------------------------------------------------------
# the GPU suite (python bench.py --gpu_suite true): everything a lent GPU's few minutes should measure, one JSON


def gpu_suite(args):
    """Correctness, generation speed, one RL step and SFT at the Qwen2.5-1.5B shape with random weights.

    correctness  our logits vs transformers in fp32 and bf16; fp32 greedy decode vs transformers.generate;
                 logprob_gap: the sampler's log-probs vs the training forward's, in bf16 and fp32, at T 0.7
    attention    packed attention A/B on a 16K-token micro-batch of 8 lengths, forward + backward (suite_attention)
    decode_attention  the decode step's attention over one layer's cache by variant, at 128 and 1,024 rows and spans
                 of 512 and 4,096 columns: eager and graph-replay time, against the bytes the rows need
    sampler      the decode step's sampler at the model's vocabulary, today's (sample_next) against the blocked one
                 (sample_blocked, eager and compiled), at 128 and 1,024 rows: eager and graph-replay times
    train_step   one micro-batch's forward + backward under each recompute setting and compiled (suite_train_step)
    generation   the RL-shaped workload (prompts x 8, responses 64..512): our tok/s vs transformers.generate,
                 our share of the decode's memory-bandwidth floor, peak memory; per decode step: kernel time
                 (torch.profiler) vs wall time, from the difference of two lengths (the prefill cancels)
    sft          redistill_sft.py at the paper's K&K batch (64 sequences, 16K-token micro-batches, max length
                 5000, gradient checkpointing with --checkpoint_every auto (the recompute it chose is recorded),
                 bf16 autocast, 8-bit AdamW when bitsandbytes is installed)
    rl           train_rl.py at one GPU's share of the paper preset: 16 prompts x 8 rollouts, responses up to 4096
                 tokens (random weights do not stop: the worst case), gradient checkpointing, two steps, the second
                 measured (rl_step); on CUDA
                 what is live at the update's memory peak, by source line (update_memory_recorded); the peaks
                 gpu_memory computes for it; the paper run's GPU-hours per 100 steps at 8 GPUs from the step
    rl_larger    the same step at the Qwen2.5-3B shape (FSDP on one rank), responses up to 2048 tokens: its
                 measured peaks against gpu_memory's
    Each section is a dict of the JSON; an error is recorded there and the next section still runs. The sft and
    rl sections skip checkpoint writes: they measure compute, and a 1.5B checkpoint's cost is the disk's.
    --smoke runs the same code on CPU with a tiny model, so a broken suite shows before a GPU is spent on it.
    """
    import transformers
    if args.smoke:
        device = torch.device("cpu")
        cfg = tiny_config(2048, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=8192)
        sizes = dict(logits=(2, 32), greedy_new=8, gap_new=16, gen_prompts=[2, 4], gen_len=(4, 16), step_prompts=[2],
                     step_lens=(4, 12), sft_batch=8, sft_steps=2, sft_response=(20, 60), sft_micro=512, rl_prompts=4,
                     rl_group=2, rl_max=32, attn_tokens=256, compile=False, hf=args.suite_hf,
                     decode_attn=[(4, 16), (8, 40)], sampler_rows=[4, 8],
                     larger=dict(hidden_size=96, num_layers=3, num_heads=6, num_kv_heads=2), larger_rl_max=16)
    else:
        if not torch.cuda.is_available():
            raise UserError("--gpu_suite needs CUDA; --smoke true runs it on CPU with a tiny model")
        device = torch.device("cuda")
        cfg = tiny_config(151936, **QWEN25_15B)
        sizes = dict(logits=(4, 256), greedy_new=64, gap_new=256, gen_prompts=[16, 128], gen_len=(64, 512),
                     step_prompts=[16, 128], step_lens=(17, 49), sft_batch=64, sft_steps=3, sft_response=(500, 3000),
                     sft_micro=16384, rl_prompts=16, rl_group=8,
                     rl_max=args.suite_rl_response_tokens, attn_tokens=16384, compile=True, hf=args.suite_hf,
                     # (the few rows of a long tail: there FA2 also splits the hand-split parts, inside the kernel)
                     decode_attn=[(128, 512), (128, 4096), (1024, 512), (1024, 4096), (4, 4096)],
                     sampler_rows=[128, 1024],
                     larger=QWEN25_3B, larger_rl_max=2048)
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
                              + [tasks.SYSTEM_PROMPT], vocab_size=1024, pad_to=cfg["vocab_size"])
        base = os.path.join(d, "base")
        with torch.device(device):
            model = build_model(cfg, seed=args.seed)
        result["model"]["params"] = model.num_params()
        save_model(model, base, tok, dtype=torch.bfloat16)  # every section loads this bf16 checkpoint
        del model
        sections = {"correctness": suite_correctness, "attention": suite_attention,
                    "decode_attention": suite_decode_attention, "sampler": suite_sampler,
                    "train_step": suite_train_step,
                    "generation": suite_generation, "sft": suite_sft, "rl": suite_rl, "rl_larger": suite_rl_larger}
        write()  # the setup's record, before the first section can fail or time out
        for section in args.sections:
            print(f"--- {section}", flush=True)
            before = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else None
            t0 = time.time()
            try:
                result[section] = sections[section](base, tok, records, sizes, device, args.seed, d)
            except Exception as e:  # noqa: BLE001 -- recorded, and the next section still runs
                traceback.print_exc()
                result[section] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
            result[section]["seconds"] = time.time() - t0
            result[section]["allocated_before_gib"] = before  # (its measured peaks count this too)
            write()  # (before the cleanup: a sticky CUDA error raises there, and the record must be on disk)
            print(json.dumps(rounded(result[section])), flush=True)
            engine.release()  # generation's kept weights, KV cache and graphs: not the next section's memory
            free_cycles(device)
    result["seconds"] = time.time() - t_all
    write()
    return result


def free_cycles(device):
    """Free what lives only in reference cycles: an FSDP2-sharded model (train_rl's and redistill_sft's outlive main()
    until a collection, a CPU check shows), which empty_cache alone leaves allocated: on one H200 (2026-12-04),
    without this, the 3B RL step began with 5.8 GiB allocated beyond its own, the size of the 1.5B step's fp32
    weights; a train-step setting's model (fp32 weights and grads) stayed for every later setting."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
    def median_seconds(fn):
        fn()  # warm-up
        return median_call_us(fn, device, reps=10) / 1e6
    a = torch.randn(2**28, device=device)  # 1 GiB of fp32
    b = torch.empty_like(a)
    copy = median_seconds(lambda: b.copy_(a))
    x = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm = median_seconds(lambda: x @ x)
    name = torch.cuda.get_device_name()
    return {"copy_bytes_per_s": 2 * a.numel() * 4 / copy, "bf16_matmul_flops": 2 * 8192**3 / mm,
            "datasheet_bytes_per_s": datasheet(PEAK_BANDWIDTH, name),
            "datasheet_bf16_flops": datasheet(PEAK_BF16_FLOPS, name)}


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def weights_gib(model):
    """A model's parameters and buffers in GiB (0 for None)."""
    tensors = [*model.parameters(), *model.buffers()] if model is not None else []
    return sum(t.numel() * t.element_size() for t in tensors) / 2**30


def minus(gib, other):
    return None if gib is None else gib - other


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
    peak = datasheet(PEAK_BF16_FLOPS, torch.cuda.get_device_name())
    return flops / seconds / peak if peak else None


def first_difference(a, b):
    """Where two token lists first differ: the first unequal position, the shorter one's end if one runs on, or
    None if they are equal."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def generations_agree(first, second):
    """How far two generate() runs over the same rows agree: rows with identical tokens, where each row's tokens first
    differ (None: nowhere), the largest log-prob difference anywhere and before each row's first differing token.
    Past that point the rows hold different texts; before it, the difference is the two paths' rounding. (A sampled
    token flips when its uniform falls within that rounding of a boundary of the inverse CDF: with random weights
    the 152K probabilities are flat and close together, so fp32 paths that round differently part now and then.)"""
    split = [first_difference(p.tokens, q.tokens) for p, q in zip(first, second)]
    diff = [abs(x - y) for p, q in zip(first, second) for x, y in zip(p.logprobs, q.logprobs)]
    before = [abs(x - y) for p, q, at in zip(first, second, split) for x, y in zip(p.logprobs[:at], q.logprobs[:at])]
    return {"rows": len(first), "identical_tokens": sum(p.tokens == q.tokens for p, q in zip(first, second)),
            "first_difference": split, "max_abs_logprob_diff": max(diff, default=0.0),
            "max_abs_logprob_diff_before_tokens_differ": max(before, default=0.0)}


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
                ref = hf.generate(torch.tensor([p], device=device),
                                  attention_mask=torch.ones(1, len(p), dtype=torch.long, device=device),
                                  max_new_tokens=n, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
                same += gen.tokens == ref
                first_diff.append(first_difference(gen.tokens, ref))
            out["greedy_fp32"] = {"prompts": len(prompts), "new_tokens": n, "identical": same,
                                  "first_difference": first_diff}
            # the decode step replayed from CUDA graphs against the same step run eagerly (same buckets, same looks),
            # and the fused ops (torch.compile: Triton on CUDA; the sampler's integer hash too) against the eager ones

            def agreement(model, a, b):
                """(how far generate(**a) and generate(**b) agree, the two runs)"""
                runs = [generate(model, prompts, n=4, max_new_tokens=n, temperature=0.7, seed=seed, **kw)
                        for kw in (a, b)]
                return generations_agree(*runs), runs
            unfused = {"fused": False}
            out["graphs_vs_eager_fp32"] = dict(agreement(ours, {"graphs": False, **unfused}, unfused)[0],
                                               graphs=device.type == "cuda")
            # train_rl --keep_engine: graphs captured on one policy's copy, replayed after the next policy is copied
            # into it in place (an RL step later), against that policy run eagerly
            other = load_model(base, dtype=dtype, device=device).eval()
            with torch.no_grad():
                for p in other.parameters():
                    p.add_(0.02 * p.abs().mean() * torch.randn(p.shape, generator=g).to(device))
            engine.release()
            first = generate(ours, prompts, n=4, max_new_tokens=n, temperature=0.7, seed=seed)  # captures on ours
            captured = engine.stats["graph_captures"]
            replayed, (_, eager) = agreement(other, {}, {"graphs": False})
            out["graphs_after_refill_vs_eager_fp32"] = dict(
                replayed, graphs=device.type == "cuda", captures_after_refill=engine.stats["graph_captures"] - captured,
                rows_changed_by_the_new_weights=sum(a.tokens != b.tokens for a, b in zip(first, eager)))
            del other
            if sizes["compile"]:  # the first fused call compiles (seconds on a GPU, longer than the smoke's budget)
                out["fused_vs_eager_fp32"] = agreement(ours, unfused, {"fused": True})[0]
                # the default on CUDA: graphs of the fused ops against the fused ops run eagerly
                fused = {"fused": True}
                out["graphs_vs_eager_fused_fp32"] = agreement(ours, {"graphs": False, **fused}, fused)[0]
                # the blocked sampler (compiled with the fused ops) against today's, and its graphs against its eager
                blocked = {"fused": True, "blocked_sampler": True}
                out["blocked_sampler_vs_sample_next_fused_fp32"] = agreement(ours, fused, blocked)[0]
                out["graphs_vs_eager_blocked_sampler_fp32"] = agreement(ours, {"graphs": False, **blocked}, blocked)[0]
        if dtype == torch.bfloat16 and device.type == "cuda":  # FA2 takes half precision only
            # FA2's decode attention against SDPA's, and FA2 with each row's keys in 4 parts against it whole
            # (these spans are short: "auto" would not split them)
            fa2 = {"fa2_decode_attention": True}
            pairs = {"fa2_vs_sdpa_decode_attention_bf16": ({"fa2_decode_attention": False}, fa2),
                     "fa2_splits_vs_fa2_bf16": (fa2, dict(fa2, fa2_splits=4))}
            for key, (a, b) in pairs.items():
                got = recorded(functools.partial(agreement, ours, a, b))
                out[key] = got[0] if isinstance(got, tuple) else got  # (or its error)
        # logprob_gap: what the sampler recorded vs what the training forward computes for the same tokens; with
        # either sampler (the blocked one reads bf16 logits as they are)
        for suffix, blocked_sampler in (("", False), ("_blocked_sampler", True)):
            gens = generate(ours, prompts, n=4, max_new_tokens=sizes["gap_new"], temperature=0.7, seed=seed,
                            blocked_sampler=blocked_sampler)
            with torch.no_grad():
                teacher = response_logprobs(ours, [prompts[x.prompt_index] for x in gens], [x.tokens for x in gens],
                                            0.7, 4096, with_entropy=False).float().cpu()
            sampler = torch.tensor([v for x in gens for v in x.logprobs])
            out[f"logprob_gap_{tag}{suffix}"] = {"mean_abs": (teacher - sampler).abs().mean().item(),
                                                 "max_abs": (teacher - sampler).abs().max().item(),
                                                 "tokens": sampler.numel()}
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
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device).eval() if sizes["hf"] else None
    cfg, samples, stop_id = model.config, 8, tok.eos_token_id
    ceilings = device_ceilings(device) if device.type == "cuda" else {}
    workloads = []
    min_len, max_len = sizes["gen_len"]
    # "ours": graphs without the fused ops; "fused": with them; both with SDPA's decode attention; "fa2": the fused
    # ops and FA2's decode attention (generate's default on CUDA sm80+ in half precision); "fa2_splits": that with
    # each row's keys split as fa2_split_count says; "blocked_sampler": the default with the blocked sampler
    sdpa = {"fa2_decode_attention": False}
    for n_prompts in sizes["gen_prompts"]:
        prompts, lengths = make_workload("rl", n_prompts, samples, min_len, max_len, 0, cfg.vocab_size, seed)
        run = functools.partial(run_ours, model, prompts, lengths, samples, stop_id, **sdpa)  # settings: overridable
        run_ours(model, prompts[:2], lengths[:2 * samples], samples, stop_id, fused=False, **sdpa)  # warm-ups
        run_ours(model, prompts[:2], lengths[:2 * samples], samples, stop_id, fused=True, **sdpa)  # (the compile)
        if hf is not None:
            run_hf(hf, prompts[:2], lengths[:2 * samples], samples, stop_id)
        reset_peak(device)
        # the first run of a workload captures its CUDA graphs (each (rows, columns) shape once); the second replays
        t_ours_first = timed(lambda: run(fused=False), device)
        t_ours = timed(lambda: run(fused=False), device)
        mem_ours = minus(peak_gib(device), weights_gib(hf))  # (each engine's peak without the other's weights)
        run(fused=True)
        t_fused = timed(lambda: run(fused=True), device)

        # more variants, each a run that captures its graphs and a timed one (an error is recorded in its place)
        others = {"blocked_sampler": dict(fused=True, fa2_decode_attention=None, blocked_sampler=True)}
        if device.type == "cuda":  # FA2 runs there only
            others = {"fa2": dict(fused=True, fa2_decode_attention=True),
                      "fa2_splits": dict(fused=True, fa2_decode_attention=True, fa2_splits="auto"), **others}

        def run_twice(settings):
            run(**settings)
            return timed(lambda: run(**settings), device)
        more = {name: recorded(functools.partial(run_twice, settings)) for name, settings in others.items()}
        t_eager = (timed(lambda: run(graphs=False, fused=False), device)
                   if n_prompts == sizes["gen_prompts"][0] else None)  # what the graphs gain, on the smaller workload
        w = {"prompts": n_prompts, "rows": len(lengths), "new_tokens": sum(lengths), "ours_s": t_ours,
             "ours_first_run_s": t_ours_first, "ours_tok_s": sum(lengths) / t_ours,
             "ours_fused_s": t_fused, "ours_fused_tok_s": sum(lengths) / t_fused, "ours_eager_s": t_eager,
             "peak_mem_gib_ours": mem_ours}
        for name, t in more.items():
            if isinstance(t, float):
                w.update({f"ours_{name}_s": t, f"ours_{name}_tok_s": sum(lengths) / t})
            else:
                w[f"ours_{name}"] = t  # its error
        if hf is not None:  # alone: our engine's kept weights, KV cache and graph pool released first
            engine.release()
            reset_peak(device)
            t_hf = timed(lambda: run_hf(hf, prompts, lengths, samples, stop_id), device)
            w.update(hf_s=t_hf, hf_tok_s=sum(lengths) / t_hf, speedup_vs_hf=t_hf / t_ours,
                     peak_mem_gib_hf=minus(peak_gib(device), weights_gib(model)))
            for name in more:  # (on a GPU "fa2" is generate's default: issue 34's 10x is judged on it)
                if f"ours_{name}_s" in w:
                    w[f"ours_{name}_speedup_vs_hf"] = t_hf / w[f"ours_{name}_s"]
        for kind in ("datasheet", "measured"):
            bandwidth = ceilings.get("datasheet_bytes_per_s" if kind == "datasheet" else "copy_bytes_per_s")
            if bandwidth:
                floor = decode_floor(cfg, model, prompts, lengths, samples, 2, bandwidth=bandwidth)
                w[f"floor_s_{kind}_bandwidth"] = floor
                w[f"ours_fraction_of_floor_{kind}"] = floor / t_ours
                w[f"ours_fused_fraction_of_floor_{kind}"] = floor / t_fused
                for name in more:  # (the default engine among them: its fraction is the one the target asks)
                    if f"ours_{name}_s" in w:
                        w[f"ours_{name}_fraction_of_floor_{kind}"] = floor / w[f"ours_{name}_s"]
        # the datasheet's roofline: at each step the larger of its bandwidth and compute floors
        if ceilings.get("datasheet_bf16_flops") and ceilings.get("datasheet_bytes_per_s"):
            w["floor_s_datasheet_compute"] = decode_floor(cfg, model, prompts, lengths, samples, 2,
                                                          flops=ceilings["datasheet_bf16_flops"])
            floor = decode_floor(cfg, model, prompts, lengths, samples, 2, ceilings["datasheet_bytes_per_s"],
                                 ceilings["datasheet_bf16_flops"])
            w["floor_s_datasheet_roofline"] = floor
            w["ours_fraction_of_roofline_datasheet"] = floor / t_ours
            w["ours_fused_fraction_of_roofline_datasheet"] = floor / t_fused
            for name in more:
                if f"ours_{name}_s" in w:
                    w[f"ours_{name}_fraction_of_roofline_datasheet"] = floor / w[f"ours_{name}_s"]
        workloads.append(w)
        print(w, flush=True)
    hf = None  # free its memory before the profiled runs
    # the decode step: on a GPU the default (graphs, the fused ops, FA2) and the candidates the workloads above time
    # (stage 1's JSON holds the eager step, graphs alone and graphs with the fused ops, all on SDPA); on a CPU, where
    # FA2 cannot run, eager, graphs and the fused ops (the graphs run eagerly there)
    if device.type == "cuda":
        fa2 = dict(fused=True, fa2_decode_attention=True)
        variants = {"graphs_fused_fa2": fa2, "graphs_fused_fa2_blocked_sampler": dict(fa2, blocked_sampler=True),
                    # (4 parts: "auto" cuts none at this profile's spans of up to 256 columns)
                    "graphs_fused_fa2_splits": dict(fa2, fa2_splits=4)}
    else:
        variants = {"eager": dict(graphs=False, fused=False, **sdpa), "graphs": dict(fused=False, **sdpa),
                    "graphs_fused": dict(fused=True, **sdpa)}
    return {"workloads": workloads,
            "decode_step": [dict(variant=name, **recorded(lambda: decode_step_profile(
                model, n, samples, sizes["step_lens"], stop_id, device, seed, **settings)))
                for n in sizes["step_prompts"] for name, settings in variants.items()]}


def kernel_activities(device):
    """What a profile that reads kernels records: CUDA activity only on a GPU (parsing the host's ops as well, tens of
    thousands of events a run, left ~3 minutes of stage 1's generation section on the H200 to its six decode-step
    profiles), the CPU's ops on a CPU (the smoke, which counts no kernels)."""
    from torch.profiler import ProfilerActivity
    return [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]


def kernel_times(prof):
    """Microseconds of GPU time by kernel name in a torch.profiler run (CUDA activity, copies and fills included:
    the GPU is busy with them too; empty on CPU)."""
    from torch.autograd import DeviceType
    us = collections.Counter()
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            us[e.name] += e.time_range.elapsed_us()
    return us


COPY_EVENTS = ("Memcpy", "Memset")  # CUDA activity that is no kernel launch (CUPTI's names for copies and fills)


def gpu_kernel_count(events):
    """How many kernels a GPU profile's events launched: its CUDA activity less the copies and fills."""
    from torch.autograd import DeviceType
    return sum(e.device_type == DeviceType.CUDA and not e.name.startswith(COPY_EVENTS) for e in events)


def busy_fraction(kernel_s, wall_s):
    """{"gpu_busy_fraction": kernel time / wall time}, and a note where it is above 1: kernel time is a sum of
    durations, so kernels overlapping on several streams, or a wall time from another run than the profiled one
    (decode_step_profile's fastest of 5), can exceed the wall; such a figure is no share of time."""
    if wall_s <= 0:  # (a per-step wall time is a difference of two runs: a paused host can make it 0 or less)
        return {"gpu_busy_fraction": None, "gpu_busy_note": f"wall time {wall_s:.3g} s: no share to take"}
    r = {"gpu_busy_fraction": kernel_s / wall_s}
    if r["gpu_busy_fraction"] > 1:
        r["gpu_busy_note"] = ("kernel time above wall time: kernels overlapped on several streams, or the wall "
                              "time was measured in another run than the profile's; not a share of the time")
    return r


def recorded(fn):
    """fn()'s result, or {"error": ...} if it raised: an experimental variant that fails leaves its section's other
    results standing."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 -- recorded in the JSON
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"[-2000:]}


def decode_step_profile(model, n_prompts, samples, step_lens, stop_id, device, seed, **engine_settings):
    """One decode step's wall time and GPU kernel time (and kernel count), from two runs of different lengths:
    their difference over the extra steps leaves the prefill out. Kernel time well under wall time = launch-bound.
    (On CUDA the host looks every 16 decode steps, and a row of length L needs L - 1 of them after the prefill: the
    GPU lengths are 1 more than a multiple of 16, so no step runs past the last row.)"""
    from torch.profiler import profile
    prompts, _ = make_workload("fixed", n_prompts, samples, 1, 1, 1, model.config.vocab_size, seed)
    wall, kernel, count, by_name = {}, {}, {}, {}
    for length in step_lens:
        lengths = [length] * (n_prompts * samples)
        run = functools.partial(run_ours, model, prompts, lengths, samples, stop_id, **engine_settings)
        run()
        # the fastest of 5: a pause of the host (one H200 run's median of 3 put a step below its kernels' time)
        # only ever adds to a run, and the per-step figure is a difference of two runs
        wall[length] = min(timed(run, device) for _ in range(5))
        with profile(activities=kernel_activities(device)) as prof:
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
        count[length] = gpu_kernel_count(prof.events())
        by_name[length] = kernel_times(prof)
        kernel[length] = sum(by_name[length].values()) / 1e6
    a, b = step_lens
    steps = b - a
    step_wall, step_kernel = (wall[b] - wall[a]) / steps, (kernel[b] - kernel[a]) / steps
    # where a step's kernel time goes, by kernel name (the prefill cancels here too): which attention kernel
    # decodes (cuDNN's SDPA would build a plan per shape), what the matmuls, the sampler's scan and the rest take
    per_step_us = {name: (us - by_name[a][name]) / steps for name, us in by_name[b].items()}
    top = sorted(per_step_us.items(), key=lambda kv: -kv[1])[:12]
    # (step_ms_kernels and top_kernels hold the copies' and fills' GPU time too; kernels_per_step counts kernels only)
    return {"rows": n_prompts * samples, "step_ms_wall": step_wall * 1e3, "step_ms_kernels": step_kernel * 1e3,
            "kernels_per_step": (count[b] - count[a]) / steps, **busy_fraction(step_kernel, step_wall),
            "top_kernels": [{"name": name[:120], "ms_per_step": us / 1e3} for name, us in top]}


# ops that launch no kernel: views, allocations, no-op casts
NO_KERNEL_OPS = {f"aten::{name}" for name in (
    "view", "_unsafe_view", "slice", "select", "as_strided", "transpose", "t", "permute", "unsqueeze", "squeeze",
    "expand", "expand_as", "split", "split_with_sizes", "chunk", "narrow", "unbind", "alias", "detach", "reshape",
    "view_as", "flatten", "unflatten", "to", "contiguous", "lift_fresh", "empty", "empty_strided", "empty_like",
    "resize_", "scalar_tensor", "result_type", "resolve_conj", "resolve_neg")}
# host-side events whose ops never reach a GPU: dynamo's guard check before a compiled call (torch 2.11 also wraps
# each float argument there as a CPU scalar tensor and reads it back with .item())
HOST_ONLY_EVENTS = {"TorchDynamo Cache Lookup"}
# composites whose parts are separate kernels on a GPU too: SDPA turns a boolean mask into an additive one first
COMPOSITE_OPS = {"aten::scaled_dot_product_attention"}


def kernel_count(event):
    """Kernels a profiled CPU op would launch on a GPU, a proxy: each op the code calls counts one (how a CPU
    implements it inside does not matter), unless neither it nor anything it calls launches (views, no-op casts); a
    composite in COMPOSITE_OPS counts its parts; a torch.compile'd region counts one, HOST_ONLY_EVENTS none."""
    if event.name.startswith("Torch-Compiled Region"):
        return 1
    if event.name in HOST_ONLY_EVENTS:
        return 0
    if event.name in COMPOSITE_OPS:
        return sum(kernel_count(c) for c in event.cpu_children)
    return int(event.name not in NO_KERNEL_OPS or any(kernel_count(c) for c in event.cpu_children))


def kernels_by_op(fn):
    """Run fn under the CPU profiler: (its result, a Counter of the kernels it would launch on a GPU (kernel_count)
    by the op the code called)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    counts = collections.Counter()
    for e in prof.events():
        if e.cpu_parent is None:
            counts["compiled region" if e.name.startswith("Torch-Compiled Region") else e.name] += kernel_count(e)
    return out, +counts


def decode_step_ops(model, rows=8, seed=0, **engine_settings):
    """The kernels one decode step of generate() would launch, counted on any device from its CPU ops
    (kernels_by_op): a Counter by op. The step profiled is the third of a sampled 6-token run (warm: compiled ops
    are compiled), no stop id, as in RL rollouts; run eagerly (a CUDA graph replays what the step launched)."""
    counts, step, calls = collections.Counter(), engine.decode_step, []

    def profiled(*args, **kwargs):
        calls.append(1)
        if len(calls) != 3:
            return step(*args, **kwargs)
        out, step_counts = kernels_by_op(lambda: step(*args, **kwargs))
        counts.update(step_counts)
        return out
    prompts, _ = make_workload("fixed", 1, rows, 1, 1, 1, model.config.vocab_size, seed)
    engine.decode_step = profiled
    try:
        generate(model, prompts, n=rows, max_new_tokens=6, temperature=1.0, seed=seed,
                 **dict(engine_settings, graphs=False))
    finally:
        engine.decode_step = step
    assert len(calls) >= 3, f"{len(calls)} decode steps ran, fewer than the 3 this counts from"
    return counts


def decode_kernels_per_layer(hf_cfg, rows=8, seed=0, **engine_settings):
    """{"per_step", "per_layer", "outside_layers", "per_layer_ops"}: the kernels of a decode step at hf_cfg's depth
    (decode_step_ops), split by the difference to a one-layer model of the same shape into what each layer adds and
    what the step adds once (embedding, lm_head, masks, sampler)."""
    layers = hf_cfg["num_hidden_layers"]
    deep, one = (decode_step_ops(build_model(dict(hf_cfg, num_hidden_layers=n), seed=seed), rows, seed,
                                 **engine_settings) for n in (layers, 1))
    per_layer = {name: (deep[name] - one[name]) / (layers - 1) for name in deep if deep[name] != one[name]}
    total = sum(deep.values())
    return {"per_step": total, "per_layer": sum(per_layer.values()),
            "outside_layers": total - layers * sum(per_layer.values()), "per_layer_ops": per_layer}


@contextmanager
def checkpoints_skipped():
    """sft and rl measure compute: checkpoint writes (3 to 18 GB at 1.5B, timed by the disk) become no-ops."""
    import model as model_module
    import redistill_sft  # (its final save: a name it imported)
    saved = ckpt.save_checkpoint, model_module.save_model, redistill_sft.save_model
    ckpt.save_checkpoint = model_module.save_model = redistill_sft.save_model = lambda *a, **k: None
    try:
        yield
    finally:
        ckpt.save_checkpoint, model_module.save_model, redistill_sft.save_model = saved


def compile_record():
    """What torch.compile has done so far in this process: (graphs compiled, the reasons of its recompiles, each the
    guard that failed, as dynamo records them)."""
    from torch._dynamo.utils import counters, guard_failures
    return counters["stats"]["unique_graphs"], collections.Counter(r for rs in guard_failures.values() for r in rs)


def compiled_since(before, top=10):
    """The graphs torch.compile made since compile_record() gave `before` (one per block's code, and one more for
    each recompile), and why it recompiled: the guards that failed, the most frequent first (e.g. a size that new
    micro-batch lengths changed). What decides whether a compiled run's later steps pay for compiling again."""
    graphs, reasons = compile_record()
    new = reasons - before[1]
    return {"compiled_graphs": graphs - before[0],
            "recompile_reasons": [{"guard": r[:300], "times": n} for r, n in new.most_common(top)]}


def suite_sft(base, tok, records, sizes, device, seed, tmp):
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
    path = os.path.join(tmp, "sft.jsonl")
    common.write_jsonl(path, data)
    examples = tasks.load_sft_examples([path], tok, 5000)  # as SFT sees them
    lengths, loss_tokens = [len(e["input_ids"]) for e in examples], [len(e["input_ids"]) - e["start"] for e in examples]
    eight_bit = package_version("bitsandbytes") is not None and device.type == "cuda"
    cfg = read_config(base)
    order = parallel.epoch_order(len(data), seed, 0)

    def run(out, extra):
        compiled_before = compile_record()
        argv = ["--init", base, "--data", path, "--out_dir", out, "--epochs", "1", "--global_batch", str(batch),
                "--micro_batch_tokens", str(sizes["sft_micro"]), "--max_length", "5000",
                "--gradient_checkpointing", "true", "--checkpoint_every", "auto", "--dtype", "auto",
                "--stop_at_step", str(steps), "--progress", "false", "--seed", str(seed),
                "--adam_8bit", str(eight_bit).lower(), *extra]
        reset_peak(device)
        with checkpoints_skipped():
            redistill_sft.main(argv)
        mem = peak_gib(device)
        with open(os.path.join(out, "settings.json")) as f:  # what --checkpoint_every auto chose
            chosen = json.load(f)
        recompute = gpu_memory.recompute_words(chosen["checkpoint_every"] if chosen["gradient_checkpointing"] else 0)
        first, *ms = [m for m in common.read_jsonl(os.path.join(out, "metrics.jsonl")) if "loss" in m]  # 1 warms up
        steps_rows = [order[(m["step"] - 1) * batch:m["step"] * batch] for m in ms]  # lm_head: only on loss tokens
        flops = sum(train_flops(cfg, [lengths[i] for i in rows], sum(loss_tokens[i] for i in rows))
                    for rows in steps_rows)
        seconds, tokens = sum(m["time_s"] for m in ms), sum(m["tokens"] for m in ms)
        return {"recompute": recompute, "sequences_per_step": batch, "tokens_per_step": tokens / len(ms),
                "step_s": seconds / len(ms),
                "tokens_per_s": tokens / seconds, "mfu": mfu(flops, seconds, device), "peak_mem_gib": mem,
                "optimizer": "bitsandbytes 8-bit AdamW on local shards" if eight_bit else "torch AdamW, sharded",
                "first_step_s": first["time_s"], "measured_steps": [m["step"] for m in ms],
                **compiled_since(compiled_before)}

    result = run(os.path.join(tmp, "sft_run"), [])
    if sizes["compile"]:  # compiled blocks: the first step compiles; later steps' new lengths must not recompile
        free_cycles(device)  # (the first run's sharded model: its peak would count it)
        result["compiled"] = run(os.path.join(tmp, "sft_run_compiled"), ["--compile", "true"])
    return result


def suite_rl(base, tok, records, sizes, device, seed, tmp):
    return rl_step(base, tok, records, sizes, sizes["rl_max"], device, seed, os.path.join(tmp, "rl"))


def suite_rl_larger(base, tok, records, sizes, device, seed, tmp):
    """rl_step at a larger shape (the GPU: Qwen2.5-3B), its random weights saved as this section's own checkpoint."""
    cfg = tiny_config(read_config(base).vocab_size, **{**QWEN25_15B, **sizes["larger"]})
    with torch.device(device):
        model = build_model(cfg, seed=seed)
    params = model.num_params()
    larger = os.path.join(tmp, "base_larger")
    save_model(model, larger, tok, dtype=torch.bfloat16)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        result = rl_step(larger, tok, records, sizes, sizes["larger_rl_max"], device, seed,
                         os.path.join(tmp, "rl_larger"))
    finally:
        shutil.rmtree(larger)  # its GBs of weights, not the next section's disk
    return {"params": params, **result}


def rl_step(base, tok, records, sizes, max_tokens, device, seed, out):
    """train_rl.py (see gpu_suite's rl) from checkpoint base with responses up to max_tokens, two steps: the second
    is the one measured, as every step of a long run is. By then AdamW's state exists (its first step() allocates
    it, at the end of the first update), and --keep_engine auto has kept the engine where memory allows, so the
    second step replays the CUDA graphs the first one captured."""
    import train_rl
    os.makedirs(out)
    path = os.path.join(out, "train.jsonl")
    steps = 2
    common.write_jsonl(path, records[:sizes["rl_prompts"]])
    argv = ["--model", base, "--task", "kk", "--train_data", path, "--test_data", "", "--out_dir", out,
            "--prompts_per_step", str(sizes["rl_prompts"]), "--samples_per_prompt", str(sizes["rl_group"]),
            "--max_response_tokens", str(max_tokens), "--max_steps", str(steps), "--gradient_checkpointing", "true",
            "--micro_batch_tokens", "30000", "--log_rollouts", "true", "--progress", "false", "--seed", str(seed)]
    reset_peak(device)
    memory = {}
    with checkpoints_skipped(), update_memory_recorded(memory, call=steps):
        train_rl.main(argv)
    mem = peak_gib(device)
    first, m = common.read_jsonl(os.path.join(out, "metrics.jsonl"))[-steps:]
    rollouts = common.read_jsonl(tasks.rollout_log_path(out, steps))
    prompt_len = {r["id"]: len(ids) for r, ids in zip(records, tasks.encode_prompts(
        tok, [kk_data.render_prompt(r, tok) for r in records]))}
    trained = [r for r in rollouts if r["trained"]]  # (all with these settings: no group dropped, none masked)
    seq_lens = [prompt_len[r["id"]] + r["length"] for r in trained]
    cfg = read_config(base)
    flops = train_flops(cfg, seq_lens, sum(r["length"] for r in trained))
    train_s = m["train_s"] - memory.get("update_snapshot_s", 0.0)  # the memory trace's snapshot is not training
    # what gpu_memory computes for this step, as train_rl does (its peaks count the CUDA context; the measured ones
    # do not), with the kept engine's buffers where train_rl keeps them
    args = train_rl.get_parser().parse_args(argv)
    dtype, longest = parse_dtype(args.dtype, device), max(prompt_len[r["id"]] for r in rollouts)
    e = train_rl.memory_estimate(args, cfg, 1, sizes["rl_prompts"], longest, dtype)
    reserve = train_rl.rollout_reserve(args, sizes["rl_prompts"], longest)
    kept, _ = train_rl.keep_engine_setting(args, cfg, 1, sizes["rl_prompts"], longest, reserve, dtype, 0,
                                           torch.cuda.get_device_properties(device).total_memory
                                           if device.type == "cuda" else None)
    update_peak = train_rl.kept_update_peak(e, cfg, reserve, dtype, 0, args.top_p) if kept else e["update_peak"]
    context = gpu_memory.CUDA_CONTEXT_GIB
    return {"rollouts": len(rollouts), "max_response_tokens": max_tokens, "measured_step": steps,
            "engine_kept": kept, "len_mean": m["len_mean"],
            "truncated": m["truncated"], "step_s": m["step_s"], "gen_s": m["gen_s"], "score_s": m["score_s"],
            "train_s": m["train_s"], "gather_s": m["gather_s"], "graph_captures": m["graph_captures"],
            "capture_s": m["capture_s"], "first_step_s": first["step_s"], "first_step_gen_s": first["gen_s"],
            "first_step_graph_captures": first["graph_captures"], "first_step_capture_s": first["capture_s"],
            "mem_gen_gib": m["mem_gen_gib"],
            "mem_held_gib": m["mem_held_gib"], "mem_train_gib": m["mem_train_gib"],
            "mem_train_reserved_gib": m["mem_train_reserved_gib"],
            "computed_gen_peak_gib": e["gen_peak"] / 2**30 - context,
            "computed_update_peak_gib": update_peak / 2**30 - context,
            "log_s": m["step_s"] - m["gen_s"] - m["score_s"] - m["train_s"] - m["gather_s"],
            "gen_tok_s": m["gen_tok_s"], "train_tokens": sum(seq_lens), "train_s_net": train_s,
            "train_tok_s": sum(seq_lens) / train_s, "train_mfu": mfu(flops, train_s, device),
            # the step's peak: train_rl resets the counter as generation starts and as it ends, so what is read after
            # the run is the update's alone (23.17 GiB in docs/gpu_h200.json, where generation's was 23.73)
            "logprob_gap": m["logprob_gap"], "peak_mem_gib": None if mem is None else max(mem, m["mem_gen_gib"]),
            # this step is one GPU's share of a step of 8 (the paper's 128 prompts x 8 on 8 GPUs): 100 such steps
            # (less the memory snapshot taken inside it; the allocator history it records slows it too, unmeasured)
            "gpu_hours_per_100_steps_at_8_gpus": (m["step_s"] - memory.get("update_snapshot_s", 0.0)) * 100 * 8 / 3600,
            **memory}


# -----------------------------------------------------------------------------
# packed attention A/B and the training step's recompute trade-off (issue 35), the update's memory at its peak


ATTENTION_VARIANTS = ("sdpa_default", "sdpa_pinned", "torch_varlen", "torch_varlen_gqa", "flash_attn",
                      "sdpa_cudnn_deprioritized")


def random_lengths(total, count, rng):
    """count sequence lengths summing to total, each at least 16 (a packed micro-batch's)."""
    cuts = sorted(rng.sample(range(16, total - 16), count - 1))
    lens = [b - a for a, b in zip([0] + cuts, cuts + [total])]
    return lens if min(lens) >= 16 else random_lengths(total, count, rng)


def attention_variant(variant, shape, lens_a, lens_b, device_name, seed):
    """One packed-attention variant at (heads, kv_heads, head_dim): forward + backward over lens_a (first call, and a
    repeat with the same shapes, the median of 3) and over lens_b (new shapes: first call); the CUDA kernels of one
    profiled call; its output and gradients, for the caller to compare. sdpa_default is the per-sequence loop with
    no backend pinned (what packed rows ran on before); sdpa_cudnn_deprioritized the same under
    TORCH_CUDNN_SDPA_DEPRIORITIZED=1 (run in its own process: the variable is read once); torch_varlen_gqa the
    varlen kernel handed the key/value heads unrepeated (model.torch_varlen's repeat_kv=False)."""
    import model as model_module
    from torch.profiler import profile
    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = {"sdpa_default": "sdpa", "sdpa_cudnn_deprioritized": "sdpa",
               "torch_varlen_gqa": "torch_varlen"}.get(variant, variant)
    nh, nkv, hd = shape

    drawn = {}  # q, k, v per length set, drawn once on the CPU (~0.2 s): outside the timings

    def inputs(lens):
        if tuple(lens) not in drawn:
            g = torch.Generator().manual_seed(seed)
            drawn[tuple(lens)] = [torch.randn(1, h, sum(lens), hd, generator=g).to(device, dtype)
                                  for h in (nh, nkv, nkv)]
        return [t.clone().requires_grad_() for t in drawn[tuple(lens)]]

    def call(lens):
        q, k, v = inputs(lens)
        cu = torch.tensor([0] + lens, device=device).cumsum(0)
        out = model_module.packed_attention(q, k, v, cu, lens, backend, dtype,
                                            repeat_kv=variant != "torch_varlen_gqa")
        out.backward(torch.ones_like(out))
        return out, q, k, v

    result = {"variant": variant}
    inputs(lens_a), inputs(lens_b)
    result["first_call_s"] = timed(lambda: call(lens_a), device)
    result["repeat_s"] = statistics.median(timed(lambda: call(lens_a), device) for _ in range(3))
    result["new_shapes_first_call_s"] = timed(lambda: call(lens_b), device)
    with profile(activities=kernel_activities(device)) as prof:
        out, q, k, v = call(lens_a)
    result["kernels"] = [name[:120] for name, _ in kernel_times(prof).most_common(8)]
    return result, [t.detach().float().cpu().contiguous() for t in (out, q.grad, k.grad, v.grad)]


def suite_attention(base, tok, records, sizes, device, seed, tmp):
    """Packed attention at the model's attention shape on one micro-batch of ~8 random lengths, forward + backward:
    each variant's first call, repeat and new-shape times, its kernels, and its max |difference| from the pinned
    loop in outputs and gradients."""
    import subprocess
    import sys
    from safetensors.torch import load_file
    import model as model_module
    cfg = read_config(base)
    shape = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    rng = random.Random(seed)
    lens_a, lens_b = (random_lengths(sizes["attn_tokens"], 8, rng) for _ in range(2))
    varlen_ok = device.type == "cuda" and model_module.torch_varlen_available(device.index or 0)
    runnable = {"sdpa_default": True, "sdpa_pinned": True, "torch_varlen": varlen_ok, "torch_varlen_gqa": varlen_ok,
                "flash_attn": device.type == "cuda" and model_module.HAVE_FLASH_ATTN,
                "sdpa_cudnn_deprioritized": device.type == "cuda"}
    out = {"lengths": lens_a, "new_lengths": lens_b, "shape": list(shape), "variants": []}
    ref = None
    for variant in ("sdpa_pinned",) + tuple(v for v in ATTENTION_VARIANTS if v != "sdpa_pinned"):
        if not runnable[variant]:
            out["variants"].append({"variant": variant, "skipped": "not available here"})
            continue
        try:  # one variant failing (a cuDNN error, memory, its process's time limit) leaves the others' results
            if variant == "sdpa_cudnn_deprioritized":  # a fresh process, the variable set before torch reads it
                saved = os.path.join(tmp, "attention_variant.safetensors")
                code = ("import json, speed; from safetensors.torch import save_file; "
                        f"r, t = speed.attention_variant({variant!r}, {shape!r}, {lens_a!r}, {lens_b!r}, "
                        f"{str(device)!r}, {seed}); save_file(dict(zip('oqkv', t)), {saved!r}); print(json.dumps(r))")
                proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                                      env=dict(os.environ, TORCH_CUDNN_SDPA_DEPRIORITIZED="1"),
                                      cwd=os.path.dirname(os.path.abspath(__file__)))
                if proc.returncode != 0:
                    out["variants"].append({"variant": variant, "error": proc.stderr[-2000:]})
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                tensors = [load_file(saved)[name] for name in "oqkv"]
            else:
                r, tensors = attention_variant(variant, shape, lens_a, lens_b, str(device), seed)
        except Exception as e:  # noqa: BLE001 -- recorded with the variant
            traceback.print_exc()
            out["variants"].append({"variant": variant, "error": f"{type(e).__name__}: {e}"[-2000:]})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        ref = ref or tensors
        r.update({f"max_abs_diff_{name}": (a - b).abs().max().item()
                  for name, a, b in zip(("out", "dq", "dk", "dv"), tensors, ref)})
        out["variants"].append(r)
        print(r, flush=True)
    return out


# -----------------------------------------------------------------------------
# the decode step's attention A/B (issue 34): one layer's attention over the KV cache, one query per row


DECODE_ATTENTION_VARIANTS = ("sdpa_mask", "written_out", "flash_seqused", "flash_seqused_token_major",
                             *(f"flash_seqused_splits_{n}" for n in (2, 4, 8, 16, "auto")))


def decode_attention_call(variant, q, k, v, lengths, mask):
    """One decode step's attention for one layer, as `variant` computes it: a function of no arguments, what the
    step prepares once for all its layers (the engine's mask, FA2's row starts and lengths) made beforehand, as the
    engine does. q (rows, heads, hd); k, v one layer's cache: (rows, kv_heads, columns, hd), the engine's layout, or
    (rows, columns, kv_heads, hd) for flash_seqused_token_major; lengths (rows,) int: row r attends to its columns
    0..lengths[r]; mask (rows, 1, 1, span): 0 there, -inf beyond (span: the columns the SDPA variants read). The
    function returns (rows, heads, hd).
      sdpa_mask      the engine's call: query heads grouped per kv head as query positions, SDPA with the additive
                     mask under model.LOOP_BACKENDS (never cuDNN: on an H200, the memory-efficient kernel)
      written_out    the same as two batched matmuls and a softmax in fp32
      flash_seqused  FA2 (aten's _flash_attention_forward, inside the torch wheel) with per-row lengths
                     (seqused_k), reading only each row's columns, on the engine's layout (engine.fa2_decode, what
                     generate(fa2_decode_attention=True) runs)
      flash_seqused_token_major  the same on a (rows, columns, kv_heads, hd) cache, the layout FA2 expects
      flash_seqused_splits_N  flash_seqused with each row's keys cut into N parts (flash-decoding), or as many as
                     engine.fa2_split_count chooses (N = auto; generate(fa2_splits="auto"))"""
    import model as model_module
    rows, nh, hd = q.shape
    span = mask.shape[-1]
    if variant in ("sdpa_mask", "written_out"):
        nkv = k.shape[1]
        qg, kc, vc = q.view(rows, nkv, nh // nkv, hd), k[:, :, :span], v[:, :, :span]

        def sdpa():
            with sdpa_kernel(model_module.LOOP_BACKENDS):
                return F.scaled_dot_product_attention(qg, kc, vc, attn_mask=mask).reshape(rows, nh, hd)

        def written_out():
            scores = torch.matmul(qg, kc.transpose(-1, -2)).float() * hd ** -0.5 + mask.float()
            return torch.matmul(torch.softmax(scores, -1).to(q.dtype), vc).reshape(rows, nh, hd)
        return sdpa if variant == "sdpa_mask" else written_out
    seqused = (lengths + 1).to(torch.int32)
    if variant.startswith("flash_seqused") and not variant.endswith("token_major"):  # what generate runs with FA2
        parts = variant.removeprefix("flash_seqused").removeprefix("_splits_") or "1"
        splits = (engine.fa2_split_count(rows, k.shape[1], span, engine.multiprocessors(q.device)) if parts == "auto"
                  else int(parts))
        layout = engine.fa2_layout(seqused, k.shape[1], k.shape[2], span, splits)
        # the parts' merge as generate's default runs it on CUDA: compiled with the fused ops
        merge = engine.fused_ops().merge_splits if q.device.type == "cuda" else engine.merge_splits
        return functools.partial(engine.fa2_decode, q, k, v, layout, merge)
    cols, nkv = k.shape[1], k.shape[2]  # row r's keys: tokens r * cols onwards of a (rows * cols, kv_heads, hd) view
    layout = engine.fa2_layout(seqused, 1, cols, span)
    k, v, used = k.reshape(rows * cols, nkv, hd), v.reshape(rows * cols, nkv, hd), layout.used.view(-1)
    return lambda: engine.flash_varlen_forward(q, k, v, layout.cu_q, layout.cu_k, 1, span, used)[0]


def median_call_us(fn, device, reps=20):
    """The median time of fn in microseconds: CUDA events on a GPU, the wall clock on CPU."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            times.append(timed(fn, device) * 1e6)
    return statistics.median(times)


def eager_and_graph_us(call, device):
    """call's output (one tensor) and its median time in microseconds eagerly and, on CUDA, replayed as a CUDA graph
    (captured after a warm-up on a side stream), with whether the graph's output equals the eager one bit for bit."""
    y = call()
    times = {"eager_us": median_call_us(call, device)}
    if device.type == "cuda":
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            call()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            y_graph = call()
        graph.replay()
        torch.cuda.synchronize()
        times.update(graph_us=median_call_us(graph.replay, device), graph_equals_eager=bool(torch.equal(y_graph, y)))
    return times, y


def suite_sampler(base, tok, records, sizes, device, seed, tmp):
    """The decode step's sampler at the model's vocabulary, T 1, for each of sizes["sampler_rows"]: what the step runs
    today (the lm_head's logits cast to fp32, then engine.sample_next: log-softmax, exp, cumsum over every entry)
    against engine.sample_blocked on the logits as the lm_head writes them (bf16 on a GPU), eagerly and compiled as
    generate(fused=True, blocked_sampler=True) runs it. Eager and graph-replay times, the floor of one read of the
    logits at the datasheet bandwidth, and how far each draw's tokens and log-probs are from today's."""
    vocab = read_config(base).vocab_size
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device).manual_seed(seed)
    bandwidth = datasheet_bandwidth(device)
    out = []
    for rows in sizes["sampler_rows"]:
        logits = (torch.randn(rows, vocab, generator=g, device=device) * 3).to(dtype)
        u = torch.rand(rows, 1, generator=g, device=device)
        entry = {"rows": rows, "vocab": vocab, "block": engine.sampler_block(vocab), "logits_dtype": str(dtype),
                 "variants": {}}
        if bandwidth:
            entry["read_logits_once_us_datasheet"] = logits.numel() * logits.element_size() / bandwidth * 1e6
        calls = {"sample_next": lambda: torch.stack(engine.sample_next(logits.float(), 1.0, 1.0, u)),
                 "sample_blocked_eager": lambda: torch.stack(engine.sample_blocked(logits, 1.0, u))}
        if sizes["compile"]:  # seconds on a GPU; the smoke's CPU would take ~10 s
            calls["sample_blocked_fused"] = lambda: torch.stack(engine.fused_ops().sample_blocked(logits, 1.0, u))
        outputs = {}
        for name, call in calls.items():  # each output: (2, rows), its tokens (as floats) over their log-probs
            measured = recorded(functools.partial(eager_and_graph_us, call, device))
            if isinstance(measured, dict):  # its error
                entry["variants"][name] = measured
                continue
            entry["variants"][name], outputs[name] = measured
        today = outputs.get("sample_next")
        for name, y in outputs.items():
            if today is not None and name != "sample_next":
                entry["variants"][name].update(same_tokens=(y[0] == today[0]).float().mean().item(),
                                               max_abs_logprob_diff=(y[1] - today[1]).abs().max().item())
        print(entry, flush=True)
        out.append(entry)
    return {"cases": out}


def suite_decode_attention(base, tok, records, sizes, device, seed, tmp):
    """The decode step's attention for one layer at the model's attention shape, by variant (decode_attention_call)
    at each (rows, span) of sizes["decode_attn"], row lengths drawn in [span / 8, span): the eager call's and a CUDA
    graph replay's median time, the graph's output against the eager one's (bit for bit), the max |difference|
    from sdpa_mask, and the bytes of the cache the rows need (their own columns) over the datasheet bandwidth."""
    cfg = read_config(base)
    nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    flash_ok = engine.fa2_runs(device, [dtype])
    bandwidth = datasheet_bandwidth(device)
    g = torch.Generator(device).manual_seed(seed)  # drawn where they are used: a 1,024 x 4,096 cache is 2G numbers
    out = []
    for rows, span in sizes["decode_attn"]:
        q = torch.randn(rows, nh, hd, generator=g, device=device, dtype=dtype)
        cache = torch.randn(2, rows, nkv, span, hd, generator=g, device=device, dtype=dtype)
        token_major = cache.transpose(2, 3).contiguous()
        lengths = torch.randint(span // 8, span, (rows,), generator=g, device=device)
        cols = torch.arange(span, device=device)
        mask = torch.zeros(rows, 1, 1, span, dtype=dtype, device=device).masked_fill_(
            cols > lengths[:, None, None, None], float("-inf"))
        needed = int((lengths + 1).sum()) * nkv * hd * 2 * cache.element_size()  # keys and values the rows read
        entry = {"rows": rows, "span": span, "cache_bytes_needed": needed, "variants": []}
        if bandwidth:
            entry["floor_us_datasheet"] = needed / bandwidth * 1e6
        ref = None
        for variant in DECODE_ATTENTION_VARIANTS:
            r = {"variant": variant}
            if variant.startswith("flash") and not flash_ok:
                entry["variants"].append(dict(r, skipped="CUDA sm80+ only"))
                continue
            k, v = token_major if variant.endswith("token_major") else cache

            def measure():
                times, y = eager_and_graph_us(decode_attention_call(variant, q, k, v, lengths, mask), device)
                if bandwidth and "graph_us" in times:
                    times["fraction_of_floor_graph"] = entry["floor_us_datasheet"] / times["graph_us"]
                return times, y
            measured = recorded(measure)
            if isinstance(measured, dict):  # its error
                entry["variants"].append(dict(r, **measured))
                continue
            times, y = measured
            r.update(times)
            y = y.float()
            ref = y if variant == "sdpa_mask" else ref
            if ref is not None:
                r["max_abs_diff_vs_sdpa_mask"] = (y - ref).abs().max().item()
            entry["variants"].append(r)
            print(entry["rows"], entry["span"], r, flush=True)
        out.append(entry)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"shape": [nh, nkv, hd], "dtype": dtype_name(dtype), "cases": out}


def recompute_settings(every, keep, compile_=False):
    """The argparse namespace prepare_training reads, for one recompute setting (every 0: no checkpointing)."""
    import argparse
    return argparse.Namespace(**gpu_memory.recompute_fields(every), checkpoint_keep=keep, compile=compile_)


TRAIN_STEP_SETTINGS = [  # (checkpoint_every (0: none), checkpoint_keep, compiled, FSDP reshard_after_forward)
    (1, "nothing", False, True), (1, "attention", False, True), (1, "matmuls", False, True),
    (2, "nothing", False, True), (0, "nothing", False, True), (1, "nothing", True, True), (1, "nothing", False, False),
    # compiled with less recompute (one H200: compiling gained 9 %, recomputing every block cost 17 %; together?)
    (2, "nothing", True, True), (0, "nothing", True, True)]


def suite_train_step(base, tok, records, sizes, device, seed, tmp):
    """The training forward + backward of one packed micro-batch (SFT's: ~8 sequences, sizes["sft_micro"] tokens)
    on the FSDP-sharded model (one rank, bf16 compute), for each recompute setting and with compiled blocks: first
    and steady-state seconds, tokens/s, MFU (recompute not counted), the peak above the parameters and gradients
    against gpu_memory's activations + FSDP transients; on CUDA, from a profiled step, its kernel time against its
    wall time and its longest kernels; and which attention kernels a step runs."""
    import model as model_module
    from torch.profiler import profile
    parallel.dist_setup()
    dtype = torch.bfloat16  # on CPU too (the smoke): FSDP then shards, as on a GPU (one fp32 rank would not)
    cfg = read_config(base)
    lens = random_lengths(sizes["sft_micro"], 8, random.Random(seed))
    ids, cu = model_module.pack([torch.randint(3, cfg.vocab_size, (n,)).tolist() for n in lens], device)
    flops = train_flops(cfg, lens, sum(lens))
    fsdp_transient = gpu_memory.memory_estimate(cfg, world=1)["fsdp_transient"]
    # blocks kept gathered (reshard_after_forward=False): every block's bf16 weights from forward to backward, where
    # the transient counts two (the current one and the prefetched one)
    gathered_blocks = 2 * (cfg.num_layers - 2) * gpu_memory.param_counts(cfg)["block"]
    out = {"lengths": lens, "packed_attention": model_module.packed_backend_name(device, dtype), "settings": []}
    for every, keep, compile_, reshard in TRAIN_STEP_SETTINGS:
        if compile_ and not sizes["compile"]:
            continue  # (CPU smoke: a compile costs more than the rest of the section; tests/test_parallel.py runs it)
        name = (("none" if every == 0 else f"every {every}, keep {keep}") + (", compiled" if compile_ else "")
                + ("" if reshard else ", blocks kept gathered"))
        try:
            compiled_before = compile_record()
            model = parallel.prepare_training(load_model(base, dtype=torch.float32, device=device), dtype,
                                              recompute_settings(every, keep, compile_), reshard_after_forward=reshard)

            def step():
                loss = model.token_logprobs(model(ids, cu_seqlens=cu)[0, :-1], ids[0, 1:]).float().sum()
                loss.backward()

            first = timed(step, device)
            reset_peak(device)
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            steady = statistics.median(timed(step, device) for _ in range(3))
            act = gpu_memory.activation_bytes(cfg, sum(lens), 4096, False, False, every, keep)["total"]
            r = {"setting": name, "sharded": parallel.is_sharded(model), "first_call_s": first, "step_s": steady,
                 "tokens_per_s": sum(lens) / steady, "mfu": mfu(flops, steady, device),
                 "activation_model_gib": act / 2**30,
                 "fsdp_transient_model_gib": (fsdp_transient + (0 if reshard else gathered_blocks)) / 2**30}
            if compile_:  # the same micro-batch each call: a recompile here is not new lengths' doing
                r.update(compiled_since(compiled_before))
            if device.type == "cuda":  # the peak; where the step's GPU time goes, and how much of the step it is busy
                r["activation_peak_gib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**30
                with profile(activities=kernel_activities(device)) as prof:
                    step()
                    torch.cuda.synchronize()
                kernel_us = kernel_times(prof)
                r["kernel_s"] = sum(kernel_us.values()) / 1e6
                r.update(busy_fraction(r["kernel_s"], steady))
                r["top_kernels"] = [{"name": n[:120], "ms": us / 1e3} for n, us in kernel_us.most_common(10)]
                if "attention_kernels" not in out:
                    out["attention_kernels"] = sorted(n[:120] for n in kernel_us if any(
                        w in n.lower() for w in ("flash", "fmha", "attention", "cudnn", "sdpa")))
        except Exception as e:  # noqa: BLE001 -- recorded; the next setting still runs
            r = {"setting": name, "error": f"{type(e).__name__}: {e}"}
        out["settings"].append(r)
        print(r, flush=True)
        model = None
        free_cycles(device)  # (each setting's sharded model, its grads too, stayed for the later ones)
    return out


def memory_at_peak(entries, baseline=0, top=12, source_root=None):
    """Replay an allocator trace (torch.cuda.memory._snapshot()["device_traces"][i]: alloc / free_requested /
    free_completed with addr, size and frames) and return what was live at its highest point: the peak (bytes, the
    baseline allocated before the trace included) and the live bytes grouped by the innermost frame in this
    project's files (else the innermost frame), the largest `top` groups."""
    source_root = source_root or os.path.dirname(os.path.abspath(__file__))
    # freed: blocks whose free was counted, so that its second event (requested, then completed) is not; a block
    # allocated before the trace (in the baseline) and freed in it counts too
    live, freed, current, peak, at_peak = {}, set(), 0, 0, {}
    for e in entries:
        action = e.get("action")
        if action == "alloc":
            live[e["addr"]] = e
            freed.discard(e["addr"])
            current += e["size"]
            if current > peak:
                peak, at_peak = current, dict(live)
        elif action in ("free_requested", "free_completed") and e["addr"] not in freed:
            current -= live.pop(e["addr"])["size"] if e["addr"] in live else e["size"]
            freed.add(e["addr"])
    groups = {}
    for e in at_peak.values():
        frames = e.get("frames") or []
        ours = [f for f in frames if str(f.get("filename", "")).startswith(source_root)]
        # no Python frame at all: allocated by a kernel on autograd's backward thread (CUDA runs backward there)
        f = (ours or frames or [{"filename": "(no Python frame)", "line": 0, "name": "backward"}])[0]
        where = f"{os.path.basename(str(f['filename']))}:{f['line']} {f['name']}"
        groups[where] = groups.get(where, 0) + e["size"]
    biggest = sorted(groups.items(), key=lambda kv: -kv[1])[:top]
    return {"peak_gib": (baseline + peak) / 2**30, "baseline_gib": baseline / 2**30,
            "live_at_peak_gib": {k: v / 2**30 for k, v in biggest}}


@contextmanager
def update_memory_recorded(result, call=1):
    """On CUDA, record the allocator's history through the call-th call of train_rl.update (the RL update; the others
    run as they are) and put memory_at_peak of it into result["update_memory"]: what holds the memory at the update's
    peak. Its analysis runs after the step; the snapshot of the trace is taken inside the update's timed window, so
    its seconds go into result["update_snapshot_s"] (to subtract); the recording itself (a Python stack per
    allocation) stays in it."""
    import train_rl
    if not torch.cuda.is_available():
        yield
        return
    real, recorded, calls = train_rl.update, [], [0]

    def update(*args, **kwargs):
        calls[0] += 1
        if calls[0] != call:
            return real(*args, **kwargs)
        baseline = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(stacks="python", max_entries=2_000_000)
        try:
            return real(*args, **kwargs)
        finally:
            t0 = time.perf_counter()
            recorded.append((torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()], baseline))
            torch.cuda.memory._record_memory_history(enabled=None)
            result["update_snapshot_s"] = time.perf_counter() - t0

    train_rl.update = update
    try:
        yield
    finally:
        train_rl.update = real
        if recorded:
            result["update_memory"] = memory_at_peak(*recorded[-1])
            result["update_memory_note"] = ("the update ran with the allocator's history recorded: train_s includes "
                                            "that; train_s_net leaves out the trace's snapshot (update_snapshot_s)")
