"""
Speed benchmarks. Generation: our KV-cache engine (engine.generate) against transformers' generate on
the same weights and prompts, both forced to stop each row at the same length.

  python bench.py                 # CPU: a ~28M-parameter Qwen2-architecture model, fp32
  python bench.py --gpu true      # GPU: the Qwen2.5-1.5B architecture with random bf16 weights
  python bench.py --rl true       # one GRPO step of train_rl.py: generation / scoring / training seconds
  python bench.py --gpu_suite true --json_out docs/gpu_h100.json   # everything on one GPU, one JSON (see gpu_suite)
  python bench.py --gpu_suite true --smoke true               # the same code on CPU with a tiny model
  python bench.py --count_kernels true  # kernels per decode step at Qwen2.5-1.5B's depth, eager and fused (a proxy)
  python bench.py --memory qwen2.5-1.5b qwen2.5-7b --world 8 --gpu_gib 80   # per-GPU memory table (no GPU needed)
  python bench.py --memory path/to/config.json                # ... for any Hugging Face config.json (or its directory)

Workloads: "rl" = prompts of different lengths x 8 samples each, response lengths spread between a
minimum and a maximum as in real rollouts; "fixed" = every row the same length. Tokens/s counts new
tokens (EOS included); the median of --repeats runs is reported. On GPU it also prints the
memory-bandwidth floor of the decode (weights + KV cache bytes read per step / bandwidth) and our
fraction of it.
"""
import os
import statistics
import tempfile
import time

import torch

import common
import engine
import gpu_memory
import tasks
import toy_task
from common import parse_settings, run_main
from model import CHECKPOINT_KEEP, build_model, dtype_name, load_model, parse_dtype, save_model, tiny_config
from speed import (PEAK_BANDWIDTH, QWEN25_15B, SUITE_SECTIONS, datasheet, decode_floor, decode_kernels_per_layer,
                   gpu_suite, make_workload, run_hf, run_ours, timed)
from tiny_base import build_tokenizer


def get_parser():
    p = common.new_parser(__doc__)
    p.add_argument("--gpu", type=common.str2bool, default=False,
                   help="GPU mode: Qwen2.5-1.5B architecture, random bf16 weights; each engine runs alone, ours "
                        "after one untimed run of the same workload, transformers after one of its first 2 prompts "
                        "(unless set: 16 and 128 prompts, responses up to 1024 tokens, 1 timed run each)")
    p.add_argument("--workloads", nargs="+", default=["rl", "fixed"], choices=["rl", "fixed"],
                   help="which workloads to run")
    p.add_argument("--prompts", type=int, nargs="+", default=None,
                   help="numbers of prompts to run (default: 8 on CPU; 16 and 128 on GPU)")
    p.add_argument("--samples_per_prompt", type=int, default=8,
                   help="samples per prompt: of the generation workloads, of --rl's steps, and --memory's RL rollouts "
                        "per prompt (train_rl --samples_per_prompt)")
    p.add_argument("--min_len", type=int, default=None, help="shortest response of the rl workload (default 64)")
    p.add_argument("--max_len", type=int, default=None, help="longest response (default 512 on CPU, 1024 on GPU)")
    p.add_argument("--fixed_len", type=int, default=256, help="response length of the fixed workload")
    p.add_argument("--repeats", type=int, default=None,
                   help="runs per engine; the median is reported (default 3 on CPU, interleaved; 1 on GPU)")
    p.add_argument("--skip_hf", type=common.str2bool, default=False, help="benchmark our engine only")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = as many as torch chooses)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, prompts and lengths")
    p.add_argument("--rl", type=common.str2bool, default=False,
                   help="benchmark one GRPO step of train_rl.py instead (a tiny model; on the GPU where there is "
                        "one, as train_rl.py runs)")
    p.add_argument("--rl_steps", type=int, default=4, help="RL steps to run (the first is a warm-up)")
    p.add_argument("--rl_prompts", type=int, default=16, help="prompts per RL step (x --samples_per_prompt rollouts)")
    p.add_argument("--rl_max_len", type=int, default=64, help="response length cap of the RL benchmark")
    p.add_argument("--count_kernels", type=common.str2bool, default=False,
                   help="count the kernels one decode step launches (speed.kernel_count: a proxy from the CPU ops, "
                        "no GPU needed) at Qwen2.5-1.5B's depth and head ratio with small widths, eagerly, with "
                        "the fused ops and with them and the blocked sampler (the first fused call compiles, ~20 s "
                        "on a CPU); per layer and outside them")
    p.add_argument("--gpu_suite", type=common.str2bool, default=False,
                   help="the GPU check: correctness against transformers, generation throughput, one RL step and SFT "
                        "at the Qwen2.5-1.5B shape with random weights; one JSON (--json_out)")
    p.add_argument("--smoke", type=common.str2bool, default=False,
                   help="--gpu_suite on CPU with a tiny model and small sizes (its own RL cap, 32 tokens: "
                        "--suite_rl_response_tokens is not used)")
    p.add_argument("--sections", nargs="+", default=list(SUITE_SECTIONS), choices=SUITE_SECTIONS,
                   help="--gpu_suite: which sections to run, in this order")
    p.add_argument("--json_out", default="", help="--gpu_suite: write the results here (rewritten after each section)")
    p.add_argument("--suite_rl_response_tokens", type=int, default=4096,
                   help="--gpu_suite: response cap of the RL step (the paper's 4096; random weights run to it)")
    p.add_argument("--suite_hf", type=common.str2bool, default=True,
                   help="--gpu_suite: time transformers.generate in the generation section (2-3 min on a GPU at the "
                        "1.5B shape; false: ours only, for a short lease once the ratio is on record)")
    # --memory: the per-GPU memory table (defaults = train_rl.py's and redistill_sft.py's, a test checks they agree;
    # --checkpoint_every 1 is train_rl's: redistill_sft.py's default, no recompute, is --checkpoint_every 0 here)
    p.add_argument("--memory", nargs="+", default=None, metavar="CONFIG",
                   help="print the per-GPU memory table of RL (train_rl.py) and SFT (redistill_sft.py) under FSDP2 "
                        "for these models: a Hugging Face config.json, its directory, or a preset ("
                        + ", ".join(gpu_memory.MEMORY_PRESETS) + "); one column per model")
    p.add_argument("--world", type=int, default=8,
                   help="--memory: GPUs (FSDP ranks) the training state is sharded over")
    p.add_argument("--gpu_gib", type=float, default=80,
                   help="--memory: memory of one GPU in GiB; fits = peak <= this (an '80 GB' card gives torch less: "
                   "about 78 GiB on the H100s this project measured on, 139 on the H200)")
    p.add_argument("--prompts_per_step", type=int, default=128,
                   help="--memory: RL prompts per step over all ranks (train_rl --prompts_per_step); each rank takes "
                        "its share")
    p.add_argument("--prompts_per_rank", type=int, default=None,
                   help="--memory: RL prompts per rank (default: --prompts_per_step / --world, rounded up)")
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
    p.add_argument("--checkpoint_every", type=int, default=1,
                   help="--memory: recompute every k-th block in backward (train_rl --checkpoint_every; "
                        "0 = --gradient_checkpointing false)")
    p.add_argument("--checkpoint_keep", default="nothing", choices=tuple(CHECKPOINT_KEEP),
                   help="--memory: what a recomputed block keeps (train_rl --checkpoint_keep)")
    p.add_argument("--adam_8bit", type=common.str2bool, default=False,
                   help="--memory: bitsandbytes' 8-bit AdamW (train_rl --adam_8bit): 2 bytes of state per parameter")
    return p


# each mode's own settings (the generation benchmark's are the rest) and what turns the mode on: noted when given to
# another mode
MODE_SETTINGS = {
    "rl": ("--rl true", ("rl_steps", "rl_prompts", "rl_max_len")),
    "gpu_suite": ("--gpu_suite true", ("smoke", "sections", "json_out", "suite_rl_response_tokens", "suite_hf")),
    "memory": ("--memory CONFIG", ("world", "gpu_gib", "prompts_per_step", "prompts_per_rank", "gen_batch_size",
                                   "prompt_tokens", "response_tokens", "rl_micro_batch_tokens",
                                   "sft_micro_batch_tokens", "logprob_chunk", "checkpoint_every", "checkpoint_keep",
                                   "adam_8bit")),
    "generation": ("the generation benchmark (no mode)",
                   ("gpu", "workloads", "prompts", "min_len", "max_len", "fixed_len", "repeats", "skip_hf")),
}


def main(argv=None):
    parser = get_parser()
    args = parse_settings(parser, argv)
    common.check_non_negative(args, "threads")
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [m for m in ("rl", "gpu_suite", "count_kernels", "memory") if getattr(args, m)]
    if len(modes) > 1:  # (the first would run, the others be dropped without a word)
        raise common.UserError(f"one mode at a time: {' and '.join('--' + m for m in modes)} given")
    mode = modes[0] if modes else "generation"
    for other, (switch, names) in MODE_SETTINGS.items():  # (a --smoke or --json_out alone ran the CPU benchmark)
        common.note_unused(args, parser, names, other != mode, switch)
    # shared by the generation benchmark, --rl and --memory; the suite and the kernel count fix their own
    common.note_unused(args, parser, ["samples_per_prompt"], mode in ("gpu_suite", "count_kernels"),
                       "the generation benchmark, --rl or --memory")
    if args.gpu_suite:
        common.note_unused(args, parser, ["suite_rl_response_tokens"], args.smoke, "--gpu_suite without --smoke")
        if len(set(args.sections)) < len(args.sections):  # a section's second run would overwrite its first
            raise common.UserError(f"--sections: each section once, got {' '.join(args.sections)}")
    if args.rl:
        return bench_rl(args)
    if args.gpu_suite:
        return gpu_suite(args)
    if args.count_kernels:
        return count_kernels(args)
    if args.memory:
        return gpu_memory.memory_table(args)
    common.check_positive(args, "samples_per_prompt", "fixed_len", "repeats", "min_len", "max_len")  # (None: unset)
    if any(n < 1 for n in args.prompts or []):
        raise common.UserError(f"--prompts: each number of prompts must be at least 1, got {args.prompts}")
    min_len = 64 if args.min_len is None else args.min_len
    max_len = (1024 if args.gpu else 512) if args.max_len is None else args.max_len
    if "rl" in args.workloads and min_len > max_len:  # (the fixed workload reads neither)
        raise common.UserError(f"--min_len {min_len} > --max_len {max_len} (defaults: 64, and 512 on CPU, 1024 on GPU)")
    device = torch.device("cuda" if args.gpu else "cpu")
    if args.gpu and not torch.cuda.is_available():
        raise common.UserError("--gpu true needs CUDA (this machine has none): run the CPU benchmark without it")
    if args.gpu:
        hf_cfg = tiny_config(151936, **QWEN25_15B)
        dtype = torch.bfloat16
        prompt_counts = args.prompts or [16, 128]
    else:
        hf_cfg = tiny_config(8192, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1536,
                             max_position_embeddings=4096, tie_word_embeddings=True)
        dtype = torch.float32
        prompt_counts = args.prompts or [8]
    repeats = (1 if args.gpu else 3) if args.repeats is None else args.repeats
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
          + (" | floor s  of floor" if args.gpu else ""))
    stop_id = 2
    for kind in args.workloads:
        for n_prompts in prompt_counts:
            samples = args.samples_per_prompt
            prompts, lengths = make_workload(kind, n_prompts, samples, min_len, max_len, args.fixed_len,
                                             cfg.vocab_size, args.seed)

            def time_ours():
                return timed(lambda: run_ours(model, prompts, lengths, samples, stop_id), device)

            def time_hf():
                return timed(lambda: run_hf(hf, prompts, lengths, samples, stop_id), device)
            t_ours, t_hf = [], []
            if args.gpu:  # the whole workload as warm-up (CUDA graphs captured for every bucket), then each engine
                time_ours()
                t_ours = [time_ours() for _ in range(repeats)]
                engine.release()  # our kept KV cache and graphs would crowd transformers' cache out
                if hf is not None:  # its first call's costs left out too, as ours are
                    run_hf(hf, prompts[:2], lengths[:2 * samples], samples, stop_id)
                    t_hf = [time_hf() for _ in range(repeats)]
            else:
                run_ours(model, prompts[:2], lengths[:2 * samples], samples, stop_id)  # warm-up
                for _ in range(repeats):  # interleaved, so a busy machine slows both engines alike
                    t_ours.append(time_ours())
                    if hf is not None:
                        t_hf.append(time_hf())
            ours = statistics.median(t_ours)
            line = f"{kind:>8} {len(lengths):>5} {sum(lengths):>8} | {sum(lengths) / ours:>10.0f}"
            if hf is not None:
                t_hf = statistics.median(t_hf)
                line += f" {sum(lengths) / t_hf:>9.0f} {t_hf / ours:>5.2f}x"
            else:
                line += f" {'-':>9} {'-':>6}"
            if args.gpu:
                bw = datasheet(PEAK_BANDWIDTH, name)
                if bw:
                    floor = decode_floor(cfg, model, prompts, lengths, samples, 2, bandwidth=bw)
                    line += f" | {floor:7.2f}  {floor / ours:6.1%}"
            print(line, flush=True)


def count_kernels(args):
    """Kernels per decode step (speed.decode_kernels_per_layer) at Qwen2.5-1.5B's depth (28 layers) and head ratio
    (12 query heads over 2 kv heads) with small widths: the count does not depend on widths. One attention group,
    as on a GPU."""
    cfg = tiny_config(1024, **dict(QWEN25_15B, hidden_size=192, intermediate_size=256, max_position_embeddings=512))
    out = {}
    print(f"kernels per decode step ({cfg['num_hidden_layers']} layers, 8 rows; a proxy counted from CPU ops):")
    for name, settings in (("eager", dict(fused=False)), ("fused", dict(fused=True)),
                           ("fused + blocked sampler", dict(fused=True, blocked_sampler=True))):
        out[name] = r = decode_kernels_per_layer(cfg, rows=8, seed=args.seed, attention_groups=1, **settings)
        print(f"  {name:>5}: {r['per_step']} per step = {r['per_layer']:g} per layer x {cfg['num_hidden_layers']} + "
              f"{r['outside_layers']:g} outside the layers ({r['per_step'] / cfg['num_hidden_layers']:.1f} per layer "
              f"in all)\n         per layer: "
              + ", ".join(f"{k.removeprefix('aten::')} {v:g}" for k, v in r["per_layer_ops"].items()))
    return out


# -----------------------------------------------------------------------------
# RL-step benchmark (python bench.py --rl true): train_rl.py's real loop on a fixed config


def bench_rl(args):
    """Seconds per GRPO step split into generation / scoring / training: train_rl.main on a random-weight
    model and the toy addition task. Random weights end a response at EOS now and then (about 1 in 400 tokens at the
    400-token vocabulary: ~half the responses stop before a 64-token cap), so steps differ in length a little.
    The first step (warm-up) is left out; the median of the others is reported. Then the last step's generation runs
    again, by the engine alone on the same rollouts: what the step's generation costs beyond the engine's own work."""
    import train_rl
    steps, prompts, group, max_len = args.rl_steps, args.rl_prompts, args.samples_per_prompt, args.rl_max_len
    common.check_positive(args, "rl_prompts", "rl_max_len", "samples_per_prompt")  # (named here, not as train_rl's)
    if steps < 2:
        raise common.UserError(f"--rl_steps must be at least 2 (the first is a warm-up), got {steps}")
    with tempfile.TemporaryDirectory() as d:
        recs = toy_task.make_records(max(prompts * steps, 64), seed=args.seed)
        tok = build_tokenizer([r["question"] + " " + toy_task.teacher_response(r) for r in recs] * 3
                              + [tasks.SYSTEM_PROMPT], vocab_size=400)
        cfg = tiny_config(len(tok), hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4)
        model = build_model(cfg, seed=args.seed)
        save_model(model, os.path.join(d, "init"), tok)
        common.write_jsonl(os.path.join(d, "train.jsonl"), recs)
        argv = ["--model", os.path.join(d, "init"), "--task", "toy_task",
                "--train_data", os.path.join(d, "train.jsonl"),
                "--test_data", "", "--out_dir", os.path.join(d, "run"), "--prompts_per_step", str(prompts),
                "--samples_per_prompt", str(group), "--max_response_tokens", str(max_len), "--max_steps", str(steps),
                "--save_every", "1", "--keep_last", "2",  # (the last step's starting weights: below)
                "--progress", "false", "--lr", "1e-5", "--seed", str(args.seed)]
        t0 = time.time()
        train_rl.main(argv)
        wall = time.time() - t0
        ms = common.read_jsonl(os.path.join(d, "run", "metrics.jsonl"))[1:]  # the first step warms up
        # the last step's generation again, by the engine alone: its prompts, seed and settings, from the weights it
        # started from, on the device and in the dtype it ran in (train_rl's --dtype auto: bf16 on CUDA), so the same
        # rollouts; the second of two runs (the step's engine was warm too), scoring left out as the step's gen_s does
        from tasks import load_tokenizer
        run = train_rl.get_parser().parse_args(argv)  # (train_rl's defaults: temperature, batch size, template)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = parse_dtype("auto", device)
        policy = load_model(os.path.join(d, "run", f"step_{steps - 1:06d}"), dtype=dtype, device=device)
        batch = train_rl.step_prompt_indices(len(recs), prompts, steps, args.seed)
        tok = load_tokenizer(os.path.join(d, "init"))
        for _ in range(2):
            times = {}
            t0 = time.time()
            gens = engine.sample_responses(
                policy, tok, toy_task, [recs[i] for i in batch], n=group,
                temperature=run.temperature, top_p=run.top_p, max_new_tokens=max_len,
                seed=train_rl.generation_seed(args.seed, steps, 0), template=run.template,
                batch_size=run.gen_batch_size, progress=False, timings=times, prompt_numbers=list(range(len(batch))))
            alone_s = time.time() - t0 - times.get("score_s", 0.0)
        logged = tasks.read_rollout_log(tasks.rollout_log_path(os.path.join(d, "run"), steps), steps, ("response",))
        same = [row["response"] for _, row in logged] == [g["response"] for g in gens]
    last = ms[-1]
    tokens = sum(g["length"] for g in gens)
    med = sorted(ms, key=lambda m: m["step_s"])[len(ms) // 2]  # the median step, so its parts add up
    where = (f"{dtype_name(dtype)} on {torch.cuda.get_device_name(device)}" if device.type == "cuda" else
             f"{dtype_name(dtype)} CPU, {torch.get_num_threads()} thread(s)")
    print(f"\nRL step ({model.num_params() / 1e6:.1f}M-param Qwen2-architecture model, random weights, {where}); "
          f"{prompts} prompts x {group} samples, responses {med['len_mean']:.0f} "
          f"tokens (cap {max_len}); the median step of 2..{steps} (whole run {wall:.1f}s):")
    print(f"  step {med['step_s']:.2f}s = generation {med['gen_s']:.2f}s ({med['gen_tok_s']:.0f} tok/s) + scoring "
          f"{med['score_s']:.3f}s + training {med['train_s']:.2f}s ({med['train_tok_s']:.0f} tok/s) + other "
          f"{med['step_s'] - med['gen_s'] - med['score_s'] - med['train_s']:.2f}s")
    print(f"  step {steps}'s generation, {last['gen_s']:.2f}s, against the engine alone on its prompts, seed and "
          f"starting weights, {alone_s:.2f}s: {alone_s / last['gen_s']:.0%} of its speed "
          + (f"(the same rollouts, {tokens} tokens)" if same else
             f"(other rollouts: {tokens} tokens against the step's {last['gen_tok_s'] * last['gen_s']:.0f})"))
    return dict(med, engine_alone_tok_s=tokens / alone_s, same_rollouts=same)


if __name__ == "__main__":
    run_main(main)
