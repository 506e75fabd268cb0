"""
Speed benchmarks. Generation: our KV-cache engine (model.generate) against transformers' generate on
the same weights and prompts, both forced to stop each row at the same length.

  python bench.py                 # CPU: a ~28M-parameter Qwen2-architecture model, fp32
  python bench.py --gpu           # GPU: the Qwen2.5-1.5B architecture with random bf16 weights
  python bench.py --rl            # one GRPO step of train_rl.py: generation / scoring / training seconds

Workloads: "rl" = prompts of different lengths x 8 samples each, response lengths spread between a
minimum and a maximum as in real rollouts; "fixed" = every row the same length. Tokens/s counts new
tokens (EOS included); the median of --repeats runs is reported. On GPU it also prints the
memory-bandwidth floor of the decode (weights + KV cache bytes read per step / bandwidth) and our
fraction of it.
"""
import argparse
import statistics
import time

import torch

from common import parse_settings, run_main
from model import build_model, generate, tiny_config

QWEN25_15B = dict(arch="Qwen2ForCausalLM", hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                  intermediate_size=8960, max_position_embeddings=32768, tie_word_embeddings=True,
                  rope_theta=1000000.0)
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # bytes/s (SXM parts)


def settings(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="GPU mode: Qwen2.5-1.5B architecture, random bf16 weights")
    p.add_argument("--workloads", nargs="+", default=["rl", "fixed"], choices=["rl", "fixed"],
                   help="which workloads to run")
    p.add_argument("--prompts", type=int, nargs="+", default=None,
                   help="numbers of prompts to run (default: 8 on CPU; 32 and 128 on GPU)")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt")
    p.add_argument("--min_len", type=int, default=None, help="shortest response of the rl workload (default 64)")
    p.add_argument("--max_len", type=int, default=None, help="longest response (default 512 on CPU, 2048 on GPU)")
    p.add_argument("--fixed_len", type=int, default=256, help="response length of the fixed workload")
    p.add_argument("--repeats", type=int, default=3, help="runs per engine; the median is reported")
    p.add_argument("--skip_hf", action="store_true", help="benchmark our engine only")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, prompts and lengths")
    p.add_argument("--rl", action="store_true", help="benchmark one GRPO step of train_rl.py instead (CPU, tiny model)")
    p.add_argument("--rl_steps", type=int, default=4, help="RL steps to run (the first is a warm-up)")
    p.add_argument("--rl_prompts", type=int, default=16, help="prompts per RL step (x --samples rollouts)")
    p.add_argument("--rl_max_len", type=int, default=64, help="response length cap of the RL benchmark")
    return parse_settings(p, argv)


def make_workload(kind, n_prompts, samples, min_len, max_len, fixed_len, vocab, seed):
    """Prompts of 16..160 tokens and each row's response length."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (int(torch.randint(16, 161, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n_prompts)]
    rows = n_prompts * samples
    if kind == "fixed":
        lengths = [fixed_len] * rows
    else:
        lengths = torch.randint(min_len, max_len + 1, (rows,), generator=g).tolist()
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
    """Our engine; a logits hook forces the stop token at each row's length."""
    want = torch.tensor(lengths, device=model.lm_head.weight.device)

    def force_stop(logits, rows, step):
        at = want[rows] == step + 1
        logits[:, stop_id] = -float("inf")  # never earlier ...
        logits[at] = -float("inf")  # ... and exactly at the row's length
        logits[at, stop_id] = 0.0
        return logits

    out = generate(model, prompts, n=samples, max_new_tokens=max(lengths), temperature=1.0, stop_ids=[stop_id],
                   seed=0, logits_hook=force_stop)
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


def main():
    args = settings()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rl:
        return bench_rl(args)
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
        import tempfile
        from transformers import AutoModelForCausalLM
        from model import save_model
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
# RL-step benchmark (python bench.py --rl): train_rl.py's real loop on a fixed config


def bench_rl(args):
    """Seconds per GRPO step split into generation / scoring / training: train_rl.main on a random-weight
    model (responses run to the length cap, so every step does the same work) and the toy addition task.
    The first step (warm-up) is left out; the median of the others is reported."""
    import os
    import sys
    import tempfile
    import common
    import train_rl
    from model import build_tokenizer, save_model
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
                "--group_size", str(group), "--max_response_tokens", str(max_len), "--max_steps", str(steps),
                "--save_every", str(steps), "--log_rollouts", "false", "--progress", "false", "--lr", "1e-5",
                "--seed", str(args.seed)]
        t0 = time.time()
        train_rl.main(argv)
        wall = time.time() - t0
        ms = common.read_jsonl(os.path.join(d, "run", "metrics.jsonl"))[1:]  # the first step warms up
        # the engine alone on the last step's prompts, same seed and weights: what the RL step's generation costs
        from model import generate, load_model, load_tokenizer, stop_token_ids
        final, tok = load_model(os.path.join(d, "run", f"step_{steps:06d}")), load_tokenizer(os.path.join(d, "init"))
        recs = [recs[i] for i in train_rl.step_prompt_indices(len(recs), prompts, steps, args.seed)]
        ids = [tok(toy_task.render_prompt(r, tok), add_special_tokens=False)["input_ids"] for r in recs]
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


if __name__ == "__main__":
    run_main(main)
