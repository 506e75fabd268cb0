"""The RL update's memory against gpu_memory's model, on CPU: train_rl.main at step 1 with bf16 compute under FSDP2
on one gloo rank (sharded, as on one GPU), rollouts fixed at the cap (engine.sample_responses replaced), the peak
sampled after every op (test_bench_memory.peak_memory_mode) above what the update started with: through the
micro-batches, then through the optimizer step. docs/memory.md quotes its output. Run from the repository root:

  MALLOC_MMAP_THRESHOLD_=65536 MKL_DISABLE_FAST_MM=1 PYTHONPATH=.:tests python tests/rl_update_memory.py   # ~30 s
"""
import os
import random
import tempfile

import torch

import ckpt
import common
import engine
import gpu_memory
import kk_data
import tasks
import train_rl
from model import ModelConfig, build_model, save_model, tiny_config
from test_bench_memory import peak_memory_mode
from tiny_base import build_tokenizer

VOCAB, PROMPTS, GROUP, CAP, MICRO, CHUNK = 16384, 4, 4, 512, 2048, 1024


def fixed_rollouts(model, tokenizer, task, records, n=1, max_new_tokens=16, **_):
    """Every rollout runs to the cap (random weights would too), its tokens fixed by the record."""
    out = []
    for r in records:
        rng = random.Random(r["id"])
        for k in range(n):
            out.append({"id": r["id"], "prompt": task.render_prompt(r, tokenizer, "auto"), "response": "",
                        "finished": False, "length": max_new_tokens, "sample": k, "logprobs": [0.0] * max_new_tokens,
                        "tokens": [rng.randrange(600) for _ in range(max_new_tokens)],
                        "reward": float(rng.random() < 0.5)})
    return out


def main():
    with tempfile.TemporaryDirectory() as d:
        measure(d)


def measure(d):
    cfg = tiny_config(VOCAB, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384,
                      max_position_embeddings=4096)
    records = [r for people in (3, 4) for r in kk_data.generate(0, people, 4, log=None)][:PROMPTS]
    tok = build_tokenizer([r["question"] for r in records] + [tasks.SYSTEM_PROMPT], vocab_size=512, pad_to=VOCAB)
    save_model(build_model(cfg, seed=0), os.path.join(d, "base"), tok)
    common.write_jsonl(os.path.join(d, "train.jsonl"), records)
    phases, modes = {}, []
    real_update, real_clip = train_rl.update, ckpt.clip_grad_norm

    def clip(params, max_norm):  # the micro-batches are done: the optimizer step's phase begins
        modes[-1].__exit__(None, None, None)
        phases["micro-batches"] = modes[-1].peak - modes[0].start
        modes.append(peak_memory_mode())
        modes[-1].__enter__()
        return real_clip(params, max_norm)

    def update(*args, **kwargs):
        modes.append(peak_memory_mode())
        modes[-1].__enter__()
        try:
            return real_update(*args, **kwargs)
        finally:
            modes[-1].__exit__(None, None, None)
            phases["optimizer step"] = modes[-1].peak - modes[0].start

    engine.sample_responses, train_rl.update, ckpt.clip_grad_norm = fixed_rollouts, update, clip
    ckpt.save_checkpoint = lambda *a, **k: None
    torch.set_num_threads(2)
    train_rl.main(["--model", os.path.join(d, "base"), "--task", "kk", "--train_data", os.path.join(d, "train.jsonl"),
                   "--test_data", "", "--out_dir", os.path.join(d, "run"), "--prompts_per_step", str(PROMPTS),
                   "--samples_per_prompt", str(GROUP), "--max_response_tokens", str(CAP), "--max_steps", "1",
                   "--dtype", "bfloat16", "--micro_batch_tokens", str(MICRO), "--logprob_chunk", str(CHUNK),
                   "--progress", "false"])
    prompt = max(len(ids) for ids in tasks.encode_prompts(tok, [kk_data.render_prompt(r, tok) for r in records]))
    e = gpu_memory.memory_estimate(ModelConfig.from_hf(cfg), world=1, prompts_per_rank=PROMPTS, group_size=GROUP,
                                   prompt_tokens=prompt, response_tokens=CAP, rl_tokens=MICRO, logprob_chunk=CHUNK)
    mib = 2**20
    model_mb = e["grads"] + e["fsdp_transient"] + e["rl_act"]["total"]  # step 1: no AdamW state yet
    print(f"micro-batches: {phases['micro-batches'] / mib:.1f} MiB above the update's start; computed "
          f"{model_mb / mib:.1f} MiB (gradients {e['grads'] / mib:.1f} + FSDP transients "
          f"{e['fsdp_transient'] / mib:.1f} + activations {e['rl_act']['total'] / mib:.1f})")
    print(f"optimizer step: {phases['optimizer step'] / mib:.1f} MiB above the update's start (CPU AdamW, not fused; "
          f"its state {e['adam'] / mib:.1f} MiB)")


if __name__ == "__main__":
    main()
