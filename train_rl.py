"""
R1-style reinforcement learning with GRPO, in one readable file.

One step: draw a batch of prompts -> every rank samples n responses per prompt of its share with
its own weights (our KV-cache engine, no inference server) -> score them with the task's verifier
-> advantages normalised within each group of n -> policy-gradient update on packed micro-batches
-> log -> now and then greedy validation on the test split -> now and then a checkpoint.

    python train_rl.py --model CKPT --task kk                                    # one GPU or CPU
    torchrun --nproc_per_node=8 train_rl.py --model CKPT --task kk --out_dir runs/rl_kk
    torchrun --nproc_per_node=8 train_rl.py ... --resume true                    # continue a killed run

Defaults are the paper's K&K run (verl; ../shared/research/paper.md section 8): 128 prompts x 8
rollouts per step, temperature 0.7, one on-policy update per step, clip 0.2, no KL, no entropy
bonus, AdamW(0.5, 0.999) wd 0.01, lr 5e-6 with 8 warm-up steps, grad clip 1.0, responses up to
4096 tokens, greedy validation every 5 steps, a checkpoint every 25.

Decisions worth knowing when reading the code:
- Old log-probs. With one update per rollout batch (ppo_epochs = ppo_mini_batches = 1, the
  paper) the update is strictly on-policy: old log-probs = the current ones detached, ratio == 1,
  the clip never binds, and no extra forward pass is spent. With more updates per batch, old
  log-probs come from a teacher-forced pass of the pre-update policy (never the sampler's
  log-probs, which differ numerically); the sampler/trainer gap is logged as `logprob_gap`.
- Precision and sharding. The weights the optimizer updates are fp32 (a bf16 weight cannot absorb
  a 5e-6 update: bf16 keeps ~3 significant digits), sharded over the ranks with PyTorch's FSDP2
  (model.shard_model): each rank holds 1/world of the weights, gradients and AdamW state, so a 7B
  policy trains on 8 x 80 GB. Forward and backward run in --dtype (bf16 on CUDA); gradients are
  reduce-scattered in fp32 and summed (each rank's loss already carries the global normaliser).
  Every forward/backward is a collective, so ranks run equally many micro-batches (common.even_out;
  a rank with fewer runs model.idle_pass). Checkpoints hold the weights in --dtype for other tools,
  and each rank's fp32 shard (weights + AdamW) for resuming; --keep_last prunes older ones.
- Generation. Before the rollouts every rank gathers the full weights once into a plain --dtype
  copy (model.full_copy: 2 bytes per parameter, freed before the update) and generates from it:
  no collective inside the decode loop, and ranks may decode different lengths.
- Exact resume. Data order is a permutation seeded by (seed, epoch); generation seeds derive from
  (seed, step, rank); the lr is a function of the step. So a checkpoint needs only the fp32 weights,
  the optimizer state and the step, and a resumed run repeats the uninterrupted one (one that changes
  a setting the data order depends on is refused).
"""
import argparse
import math
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

import common
from common import UserError, print0
from eval import evaluate
from model import full_copy, idle_pass, load_model, load_tokenizer, pack, parse_dtype, shard_model

# -----------------------------------------------------------------------------
# settings (defaults = the paper's K&K run)


# the settings a resumed run must share with the original: they decide the data order and the schedule
RUN_IDENTITY = ("task", "train_data", "template", "max_prompt_tokens", "prompts_per_step", "group_size", "seed",
                "lr", "warmup_steps")


def get_parser():
    p = argparse.ArgumentParser(description="GRPO (R1-style RL) on a verifiable task", prog="train_rl.py")
    # data and model
    p.add_argument("--model", default=None, help="initial policy: a Hugging Face checkpoint directory (required)")
    p.add_argument("--task", default="kk", help="task module: kk, math, or an importable module with the task interface")
    p.add_argument("--train_data", default="data/kk/train.jsonl", help="RL training prompts (jsonl records of the task)")
    p.add_argument("--test_data", default="data/kk/test.jsonl", help="validation split, decoded greedily ('' = no validation)")
    p.add_argument("--template", default="auto", choices=("auto", "chat", "plain"),
                   help="prompt template: chat (paper's system prompt), plain (Question/Answer, the paper's base runs)")
    p.add_argument("--out_dir", default="runs/rl_kk", help="run directory: checkpoints, metrics.jsonl, rollouts/")
    # the batch (paper: train_batch_size 128, rollout.n 8)
    p.add_argument("--prompts_per_step", type=int, default=128, help="prompts per RL step over all ranks (each rank takes its share)")
    p.add_argument("--group_size", type=int, default=8, help="rollouts per prompt, the GRPO group (verl rollout.n; not --n, which torchrun would take for its own option)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; training log-probs use the same one")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling (1 = off; <1 makes training log-probs ignore the truncation)")
    p.add_argument("--max_prompt_tokens", type=int, default=1024, help="longer training prompts are dropped (counted at start)")
    p.add_argument("--max_response_tokens", type=int, default=4096, help="generation budget; longer responses are truncated (reward 0)")
    p.add_argument("--epochs", type=int, default=20, help="passes over the training prompts (paper: total_epochs 20)")
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many RL steps (0 = epochs x steps per epoch)")
    # the loss: every variant is one named setting
    p.add_argument("--loss_agg", default="token_mean", choices=("token_mean", "seq_mean_token_mean", "constant"),
                   help="token_mean: mean over all response tokens of the global batch (DAPO, arXiv 2503.14476); "
                        "seq_mean_token_mean: mean over sequences of per-sequence token means (original GRPO, arXiv 2402.03300); "
                        "constant: sum / (max_response_tokens x sequences) (Dr. GRPO, arXiv 2503.20783)")
    p.add_argument("--std_normalize", type=common.str2bool, default=True,
                   help="divide advantages by the group's std (GRPO); false = mean-centring only (Dr. GRPO)")
    p.add_argument("--clip_low", type=float, default=0.2, help="PPO clip: ratio floor 1 - clip_low")
    p.add_argument("--clip_high", type=float, default=0.2, help="PPO clip: ratio ceiling 1 + clip_high (clip-higher, DAPO: 0.28)")
    p.add_argument("--ppo_epochs", type=int, default=1, help="passes over each rollout batch (>1: old log-probs are recomputed)")
    p.add_argument("--ppo_mini_batches", type=int, default=1, help="optimizer steps per pass over the rollout batch (paper: 1)")
    p.add_argument("--kl_coef", type=float, default=0.0, help="weight of the KL penalty to the frozen reference policy (paper: 0)")
    p.add_argument("--kl_estimator", default="k3", choices=("k1", "k3"),
                   help="k1: in the reward, as in PPO for RLHF (InstructGPT, arXiv 2203.02155): each response's reward "
                        "becomes r - kl_coef * sum_t (log pi - log pi_ref) before the group advantages, so the policy "
                        "gradient pulls down KL(pi || pi_ref). k3: in the loss, as in GRPO (arXiv 2402.03300) and verl's "
                        "low_var_kl: kl_coef * (exp(ref - logp) - (ref - logp) - 1) per token, clamped to [-10, 10] "
                        "(Schulman 2020). k3's value estimates KL(pi || pi_ref), but its gradient as a loss is that of "
                        "the reverse KL(pi_ref || pi) (Tang and Munos, arXiv 2506.09477). k1 as a loss would add only "
                        "noise (its expected gradient is 0), so it is not offered")
    p.add_argument("--ref_model", default=None, help="reference policy for the KL (default: --model)")
    p.add_argument("--entropy_coef", type=float, default=0.0, help="entropy bonus weight (paper: 0)")
    p.add_argument("--adv_weight", default="none", choices=("none", "dwa"),
                   help="per-token weights on the advantage. dwa: the divergence-weighted advantage of 'Sparse but "
                        "Critical' (Meng et al., arXiv 2603.22446, ICLR 2026), A_t = w_t * A, w_t = 1 + s (sigmoid(alpha "
                        "KL_t) - 1/2), KL_t the k3 estimate of KL(pi_old || pi) on the sampled token, detached. With one "
                        "on-policy update per batch (--ppo_epochs 1 --ppo_mini_batches 1, the paper preset) pi = pi_old, so "
                        "KL_t = 0 and w = 1 exactly: it acts only with --ppo_mini_batches > 1 or --ppo_epochs > 1 "
                        "(../shared/research/limr_sparse.md B.6)")
    p.add_argument("--dwa_s", type=float, default=1.0,
                   help="DWA scale s: w lies between 1 and 1 + s/2 (alpha > 0) or 1 - s/2 (alpha < 0); |s| <= 2 keeps the "
                        "advantage's sign (the paper does not publish its value)")
    p.add_argument("--dwa_alpha", type=float, default=1.0,
                   help="DWA sharpness alpha: with s > 0, alpha > 0 boosts tokens the update moved far from the old policy "
                        "(high-KL boost), alpha < 0 damps them (low-KL boost); the paper does not publish its value")
    p.add_argument("--drop_zero_variance_groups", type=common.str2bool, default=False,
                   help="leave groups whose rewards are all equal out of the loss and its normaliser (DAPO's filter, without resampling)")
    p.add_argument("--mask_truncated", type=common.str2bool, default=False,
                   help="leave truncated responses out of the loss (DAPO overlong filtering); paper: kept, with reward 0")
    # optimizer (paper: AdamW betas (0.5, 0.999), wd 0.01, grad clip 1, constant lr after linear warm-up)
    p.add_argument("--lr", type=float, default=5e-6, help="peak learning rate (paper K&K 5e-6, MATH 2.5e-6)")
    p.add_argument("--warmup_steps", type=int, default=8, help="linear warm-up steps, then constant (paper K&K 8, MATH 4)")
    p.add_argument("--beta1", type=float, default=0.5, help="AdamW beta1 (paper 0.5)")
    p.add_argument("--beta2", type=float, default=0.999, help="AdamW beta2")
    p.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm (0 = off)")
    p.add_argument("--adam_8bit", type=common.str2bool, default=False,
                   help="bitsandbytes 8-bit AdamW on CUDA; it cannot update FSDP-sharded weights (several ranks, or bf16), "
                        "where torch AdamW is used with a note: its state is already sharded")
    # speed and memory
    p.add_argument("--dtype", default="auto", help="compute dtype of generation and the training forward: auto (bfloat16 on CUDA, "
                   "float32 on CPU), bfloat16, float32; the optimizer always updates sharded fp32 weights")
    p.add_argument("--gradient_checkpointing", type=common.str2bool, default=True, help="recompute blocks in backward (less memory)")
    p.add_argument("--micro_batch_tokens", type=int, default=30000,
                   help="token budget of one packed training micro-batch per rank (paper: ppo_max_token_len_per_gpu 30000)")
    p.add_argument("--logprob_chunk", type=int, default=4096, help="tokens per chunk of the lm_head + log-softmax")
    p.add_argument("--gen_batch_size", type=int, default=32, help="prompts per generation call (x n rows in the KV cache)")
    # validation, logging, checkpoints
    p.add_argument("--val_every", type=int, default=5, help="greedy validation every this many steps (0 = never; paper 5)")
    p.add_argument("--val_before_train", type=common.str2bool, default=True, help="also validate the initial policy (step 0)")
    p.add_argument("--val_limit", type=int, default=0,
                   help="validate on N test records, each difficulty in proportion, drawn with --seed (0 = all)")
    p.add_argument("--val_max_response_tokens", type=int, default=0, help="validation generation budget (0 = --max_response_tokens)")
    p.add_argument("--val_batch_size", type=int, default=128, help="prompts per validation generation call")
    p.add_argument("--save_every", type=int, default=25, help="checkpoint every this many steps, and at the end (paper 25)")
    p.add_argument("--keep_last", type=int, default=2,
                   help="checkpoints kept whole (weights + resumable state: 21.6 GB at 1.5B); older ones are deleted")
    p.add_argument("--keep_steps", type=int, nargs="*", default=[],
                   help="steps whose weights (in the training dtype) outlive --keep_last, e.g. a re-distillation source")
    p.add_argument("--log_rollouts", type=common.str2bool, default=True, help="write rollouts/step_N.jsonl")
    p.add_argument("--resume", type=common.str2bool, default=False, help="continue from the newest complete checkpoint in --out_dir")
    p.add_argument("--max_bad_steps", type=int, default=3, help="stop after this many consecutive steps with NaN/inf loss or grad norm")
    p.add_argument("--seed", type=int, default=1234, help="seeds the data order and every generation")
    p.add_argument("--progress", type=common.str2bool, default=True, help="tqdm progress bars on rank 0")
    p.add_argument("--wandb_project", default="", help="also log to this Weights & Biases project (when wandb is installed)")
    return p


# -----------------------------------------------------------------------------
# the maths, as small functions (tests/test_train_rl.py checks each against a hand computation)


def group_advantages(rewards, n, std_normalize=True, eps=1e-6):
    """GRPO advantages for rewards laid out group by group (n per prompt): (r - mean_g) / (std_g + eps).

    std is unbiased (N-1), as torch.std in verl. A group with all-equal rewards gets exactly 0.
    Groups of one use mean 0 and std 1 (verl), i.e. the advantage is the reward.
    """
    r = torch.as_tensor(rewards, dtype=torch.float32).view(-1, n)
    if n == 1:
        return r.view(-1).clone()
    mean, std = r.mean(1, keepdim=True), r.std(1, keepdim=True)
    adv = r - mean
    if std_normalize:
        adv = adv / (std + eps)
    adv = torch.where(std == 0, torch.zeros_like(adv), adv)
    return adv.view(-1)


def policy_loss(logp, old_logp, adv, clip_low=0.2, clip_high=0.2):
    """Per-token PPO clipped surrogate, to minimise: max(-A*rho, -A*clip(rho, 1-clip_low, 1+clip_high)).

    Returns (loss per token, 1.0 where the clipped branch is the one taken, else 0.0).
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def kl_penalty(logp, ref_logp, estimator="k3"):
    """Per-token estimate of the value of KL(pi || pi_ref) from samples of pi.

    k1 = logp - ref_logp (unbiased, high variance; train_rl puts it in the reward); k3 = exp(ref - logp) -
    (ref - logp) - 1 (unbiased, always >= 0, verl's low_var_kl; train_rl puts it in the loss), clamped to
    [-10, 10] as in verl. (As a loss, k3's gradient is in expectation that of KL(pi_ref || pi).)
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        d = ref_logp - logp
        return torch.clamp(torch.exp(d) - d - 1.0, min=-10.0, max=10.0)
    raise ValueError(f"unknown KL estimator {estimator!r}")


def dwa_weights(logp, old_logp, s, alpha):
    """Divergence-weighted advantage weights (arXiv 2603.22446): w = 1 + s (sigmoid(alpha KL) - 1/2), where
    KL = (r - 1) - log r, r = pi / pi_old on the sampled token, is the k3 estimate of KL(pi_old || pi) from samples
    of pi_old (the rollouts). Detached; exactly 1 where logp == old_logp (on-policy)."""
    log_r = (logp - old_logp).detach()
    kl = torch.expm1(log_r) - log_r
    return 1.0 + s * (torch.sigmoid(alpha * kl) - 0.5)


def token_weights(lengths, loss_agg, total_tokens, total_seqs, max_response_tokens):
    """Weight of each response token so that loss = sum(weight * token_loss) over the whole global batch.

    lengths: response lengths of the sequences of one micro-batch; total_tokens / total_seqs: counts over
    the whole (mini-)batch on all ranks, all-reduced before the first micro-batch, so the result does not
    depend on how the batch is split into micro-batches and ranks.
    """
    lengths = torch.as_tensor(lengths, dtype=torch.float32)
    if loss_agg == "token_mean":              # DAPO: every token of the batch counts the same
        per_seq = torch.full_like(lengths, 1.0 / max(total_tokens, 1))
    elif loss_agg == "seq_mean_token_mean":   # GRPO: every sequence counts the same
        per_seq = 1.0 / (lengths.clamp(min=1) * max(total_seqs, 1))
    elif loss_agg == "constant":              # Dr. GRPO: a constant normaliser, no length bias
        per_seq = torch.full_like(lengths, 1.0 / (max_response_tokens * max(total_seqs, 1)))
    else:
        raise ValueError(f"unknown loss aggregation {loss_agg!r}")
    return torch.repeat_interleave(per_seq, lengths.long())


def step_prompt_indices(num_records, prompts_per_step, step, seed):
    """Indices (into the training records) of the prompts of RL step `step` (1-based), for all ranks.

    Epoch e visits the records in a permutation seeded by (seed, e); the last partial batch of an epoch is
    dropped. A pure function of the step, so a resumed run skips and repeats nothing.
    """
    per_epoch = num_records // prompts_per_step
    epoch, k = divmod(step - 1, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(num_records)
    return perm[k * prompts_per_step:(k + 1) * prompts_per_step].tolist()


def generation_seed(seed, step, rank):
    """The sampling seed of a (run seed, step, rank): different everywhere, reproducible on resume."""
    return int(np.random.default_rng([seed, step, rank]).integers(2**31))


def lr_at(step, lr, warmup_steps):
    """Linear warm-up over the first warmup_steps steps (step 1 gets lr/warmup), then constant.
    (HF's get_constant_schedule_with_warmup, used by verl, gives step 1 lr 0; we skip that no-op step.)"""
    return lr * min(1.0, step / warmup_steps) if warmup_steps > 0 else lr


def micro_batches(lengths, budget):
    """Split sequence indices into packed micro-batches of at most `budget` tokens (a longer sequence goes
    alone). Sorted by length, so sequences of similar length share a micro-batch."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, cur, used = [], [], 0
    for i in order:
        if cur and used + lengths[i] > budget:
            batches.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += lengths[i]
    return batches + ([cur] if cur else [])


def response_logprobs(model, prompts, responses, temperature, chunk_size, with_entropy=True):
    """Teacher-forced log-probs (and entropies) of each response token given its prompt, for a list of
    sequences packed into one padding-free row. Returns flat tensors over all response tokens."""
    device = model.lm_head.weight.device
    ids, cu = pack([p + r for p, r in zip(prompts, responses)], device)
    hidden = model(ids, cu_seqlens=cu)
    # hidden at position t predicts token t+1: the response tokens of sequence i sit at
    # cu[i] + len(prompt_i) ... cu[i+1] - 1, so we need the hidden states one position earlier
    starts = cu[:-1] + torch.tensor([len(p) for p in prompts], device=device)
    lens = torch.tensor([len(r) for r in responses], device=device)
    pos = torch.repeat_interleave(starts - 1, lens) + (torch.arange(int(lens.sum()), device=device)
                                                       - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens))
    return model.token_logprobs(hidden[0, pos], ids[0, pos + 1], temperature=temperature, chunk_size=chunk_size,
                                with_entropy=with_entropy)


# -----------------------------------------------------------------------------
# the run


def main(argv=None):
    args = common.parse_settings(get_parser(), argv)
    if not args.model:
        raise UserError("--model is required (a Hugging Face checkpoint directory: the initial policy)")
    for name in ("prompts_per_step", "group_size", "max_response_tokens", "ppo_epochs", "ppo_mini_batches", "micro_batch_tokens",
                 "gen_batch_size", "val_batch_size", "max_bad_steps", "logprob_chunk", "keep_last"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.temperature <= 0:
        raise UserError("--temperature must be > 0 for RL sampling (greedy rollouts have no variance to learn from)")
    if abs(args.dwa_s) > 2:
        raise UserError(f"--dwa_s {args.dwa_s}: |s| > 2 lets the DWA weight change the advantage's sign")

    # ---- setup: distributed, precision, task, data
    rank, world, device = common.dist_setup()
    master_process = rank == 0
    dtype = parse_dtype(args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    task = common.get_task(args.task)
    tokenizer = load_tokenizer(args.model)
    train_records = task.load_split(args.train_data)
    test_records = task.load_split(args.test_data) if args.test_data else []
    test_records, val_subset = common.stratified_subset(test_records, args.val_limit, task.DIFFICULTY, args.seed)
    # tokenise every training prompt once: lengths for the filter and the ids for the training forward
    prompt_ids = common.encode_prompts(tokenizer, [task.render_prompt(r, tokenizer, args.template) for r in train_records])
    keep = [i for i, ids in enumerate(prompt_ids) if len(ids) <= args.max_prompt_tokens]
    if len(keep) < len(train_records):
        print0(f"note: dropped {len(train_records) - len(keep)} of {len(train_records)} training prompts longer than "
               f"--max_prompt_tokens {args.max_prompt_tokens}")
    train_records, prompt_ids = [train_records[i] for i in keep], [prompt_ids[i] for i in keep]
    if len(train_records) < args.prompts_per_step:
        raise UserError(f"{args.train_data}: {len(train_records)} usable prompts, fewer than --prompts_per_step "
                        f"{args.prompts_per_step}")
    steps_per_epoch = len(train_records) // args.prompts_per_step
    max_steps = args.max_steps or args.epochs * steps_per_epoch
    difficulty = task.DIFFICULTY

    # ---- model: the policy, sharded (fp32 weights, `dtype` compute), its optimizer, the reference policy
    if not args.resume and common.checkpoint_steps(args.out_dir):
        raise UserError(f"{args.out_dir} holds checkpoints of an earlier run; pass --resume true to continue it, "
                        f"or choose another --out_dir")
    checkpoint = common.load_checkpoint(args.out_dir) if args.resume else None
    start_step, state = 0, None
    identity = {k: getattr(args, k) for k in RUN_IDENTITY} | {"num_prompts": len(train_records)}
    if checkpoint is not None:
        start_step, init_path, state, train_shard = checkpoint
        common.check_run_identity(args.out_dir, state.get("identity", {}), identity)
        print0(f"resuming from {init_path} (step {start_step})")
    else:
        if args.resume:
            print0(f"note: --resume: no complete checkpoint in {args.out_dir}; starting from {args.model}")
        init_path = args.model
    model = shard_model(load_model(init_path, dtype=torch.float32, device=device), dtype)
    max_ctx = model.config.max_position_embeddings
    longest = max(map(len, prompt_ids))
    if longest + args.max_response_tokens > max_ctx:
        raise UserError(f"the longest training prompt ({longest} tokens) + --max_response_tokens "
                        f"{args.max_response_tokens} exceed the model's {max_ctx}-token context")
    model.gradient_checkpointing = args.gradient_checkpointing
    optimizer = common.make_optimizer(model.parameters(), lr=args.lr, betas=(args.beta1, args.beta2),
                                      weight_decay=args.weight_decay, eight_bit=args.adam_8bit)
    ref_model = None
    if args.kl_coef > 0:
        ref_model = shard_model(load_model(args.ref_model or args.model, dtype=torch.float32, device=device), dtype)
        ref_model.requires_grad_(False)
    bad_steps_total, bad_streak = 0, 0
    if state is not None:
        common.load_local_train_state(model, optimizer, train_shard)
        bad_steps_total, bad_streak = state.get("bad_steps_total", 0), state.get("bad_streak", 0)
    recompute_old = args.ppo_epochs * args.ppo_mini_batches > 1
    if args.adv_weight == "dwa" and not recompute_old:
        print0("note: --adv_weight dwa with one on-policy update per batch: KL to the old policy is 0, so w = 1 "
               "(no effect); it acts with --ppo_mini_batches > 1 or --ppo_epochs > 1")

    # ---- logging
    metrics_path = os.path.join(args.out_dir, "metrics.jsonl")
    if master_process:
        os.makedirs(args.out_dir, exist_ok=True)
        common.write_json(os.path.join(args.out_dir, "settings.json"), vars(args))
        if os.path.exists(metrics_path):  # a resumed run rewrites the steps after its checkpoint
            old = common.read_jsonl(metrics_path)
            common.write_jsonl(metrics_path, [m for m in old if args.resume and m.get("step", 0) <= start_step])
    wandb = None
    if args.wandb_project and master_process:
        try:
            import wandb
            wandb.init(project=args.wandb_project, name=os.path.basename(os.path.abspath(args.out_dir)), config=vars(args))
        except ImportError:
            print0("note: wandb not installed; logging to metrics.jsonl only")
            wandb = None
    print0(f"train_rl: {len(train_records)} prompts, {steps_per_epoch} steps/epoch, steps {start_step + 1}..{max_steps}, "
           f"{world} rank(s) on {device.type}, {args.prompts_per_step}x{args.group_size} rollouts/step, "
           f"compute {str(dtype).replace('torch.', '')}, fp32 weights sharded over {world} rank(s), "
           f"{model.num_params() / 1e6:.1f}M params" + (f"; validation on {val_subset} test records" if test_records else ""))

    def validate(step):
        """Greedy decoding of the test split (eval.py's evaluate: each rank its shard, then gathered)."""
        t0 = time.time()
        _, summary = evaluate(full_copy(model, dtype), tokenizer, task, test_records, n=1, temperature=0.0,
                              max_new_tokens=args.val_max_response_tokens or args.max_response_tokens, seed=0,
                              template=args.template, batch_size=args.val_batch_size, desc=f"validate {step}",
                              progress=args.progress)
        m = {"val/acc": summary["overall"]["accuracy"], "val/truncated": summary["overall"]["truncation_rate"],
             "val/seconds": time.time() - t0}
        m.update({f"val/acc_{difficulty}_{level}": g["accuracy"] for level, g in summary["by_difficulty"].items()})
        return m

    def save(step):
        """Checkpoint: the weights in `dtype` (gathered to rank 0), each rank's fp32 weights and optimizer shard, the
        counters; then only the newest --keep_last stay."""
        common.save_checkpoint(args.out_dir, step, model, tokenizer, optimizer,
                               {"bad_steps_total": bad_steps_total, "bad_streak": bad_streak, "identity": identity,
                                "settings": vars(args)}, dtype)
        if master_process:
            common.prune_checkpoints(args.out_dir, args.keep_last, args.keep_steps)
        common.barrier()

    if args.val_before_train and test_records and args.val_every and start_step == 0:
        m = validate(0)
        print0("step 0 | " + " ".join(f"{k} {v:.3f}" for k, v in m.items()))
        if master_process:
            common.append_jsonl(metrics_path, {"step": 0, **m})
            if wandb:
                wandb.log(m, step=0)

    # ---- the loop
    exit_code = 0
    for step in range(start_step + 1, max_steps + 1):
        t_step = time.time()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        lr = lr_at(step, args.lr, args.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # 1. this rank's share of the step's prompts
        batch = step_prompt_indices(len(train_records), args.prompts_per_step, step, args.seed)
        mine = common.shard(batch, rank, world)
        records = [train_records[i] for i in mine]

        # 2. rollouts: n samples per prompt from our own weights, scored by the task (timed apart)
        score_seconds = [0.0]

        def timed_score(response, record, finished):
            t = time.time()
            r = task.score(response, record, finished)
            score_seconds[0] += time.time() - t
            return r

        t0 = time.time()
        policy = full_copy(model, dtype)  # the full weights, gathered once: no collective while decoding
        gather_seconds = time.time() - t0
        rollouts = common.sample_responses(
            policy, tokenizer, SimpleNamespace(render_prompt=task.render_prompt, score=timed_score), records,
            n=args.group_size, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_response_tokens,
            seed=generation_seed(args.seed, step, rank), template=args.template, batch_size=args.gen_batch_size,
            desc=f"step {step} rollouts", progress=args.progress)
        del policy
        gen_seconds = time.time() - t0 - score_seconds[0] - gather_seconds

        # 3. which rollouts train: task rewards, groups with no signal, masked truncations
        t_train = time.time()
        mem = {"mem_gen_gib": 0.0, "mem_held_gib": 0.0}
        if device.type == "cuda":  # the peak of generation, what stays allocated into the update, then its peak
            mem = {"mem_gen_gib": torch.cuda.max_memory_allocated() / 2**30,
                   "mem_held_gib": torch.cuda.memory_allocated() / 2**30}
            torch.cuda.reset_peak_memory_stats()
        rewards = [s["reward"] for s in rollouts]
        group_std = torch.tensor(rewards).view(-1, args.group_size).std(1) if args.group_size > 1 else torch.zeros(len(records))
        zero_var = (group_std == 0).tolist() if args.group_size > 1 else [False] * len(records)
        train_idx = [j for j, s in enumerate(rollouts)
                     if not (args.drop_zero_variance_groups and zero_var[j // args.group_size])
                     and not (args.mask_truncated and not s["finished"])
                     and s["length"] > 0]
        seq_prompt = [prompt_ids[mine[j // args.group_size]] for j in range(len(rollouts))]
        seq_resp = [s["tokens"] for s in rollouts]

        # 4. a no-grad pre-pass when needed: old (pre-update) log-probs for several updates per batch or for k1's
        # KL, the reference's for the KL (k1: of every response, since each one's shaped reward enters its group)
        old_lp, ref_lp = {}, {}
        sums = {k: 0.0 for k in ("pg_tokens", "entropy", "kl", "kl_tokens", "clipped", "gap", "gap_tokens", "train_tokens")}
        kl_in_reward = ref_model is not None and args.kl_estimator == "k1"
        need_old = recompute_old or kl_in_reward
        pre_idx = [j for j, s in enumerate(rollouts) if s["length"] > 0] if kl_in_reward else train_idx
        if need_old or ref_model is not None:
            with torch.no_grad():
                lengths = [len(seq_prompt[j]) + len(seq_resp[j]) for j in pre_idx]
                for mb in common.even_out(micro_batches(lengths, args.micro_batch_tokens)):
                    if mb is None:  # this rank is done; join the others' collectives
                        for m_ in ([model] if need_old else []) + ([ref_model] if ref_model is not None else []):
                            idle_pass(m_, backward=False)
                        continue
                    js = [pre_idx[i] for i in mb]
                    args_lp = ([seq_prompt[j] for j in js], [seq_resp[j] for j in js], args.temperature, args.logprob_chunk)
                    splits = [len(seq_resp[j]) for j in js]
                    if need_old:
                        lp = response_logprobs(model, *args_lp, with_entropy=False).float()
                        old_lp.update(zip(js, lp.split(splits)))
                        gen = torch.tensor([x for j in js for x in rollouts[j]["logprobs"]], device=device)
                        sums["gap"] += (lp - gen).abs().sum().item()
                        sums["gap_tokens"] += lp.numel()
                    if ref_model is not None:
                        ref_lp.update(zip(js, response_logprobs(ref_model, *args_lp, with_entropy=False).float().split(splits)))

        # 5. advantages within each group of n (rollouts come record by record, n samples each), on the task reward
        # less, with k1, kl_coef x the response's summed log-ratio to the reference
        shaped = list(rewards)
        if kl_in_reward:
            train_set = set(train_idx)
            for j in pre_idx:
                seq_kl = float(kl_penalty(old_lp[j], ref_lp[j], "k1").sum())
                shaped[j] -= args.kl_coef * seq_kl
                if j in train_set:
                    sums["kl"] += seq_kl
                    sums["kl_tokens"] += len(seq_resp[j])
        adv = group_advantages(shaped, args.group_size, args.std_normalize).tolist()

        # 6. the update: ppo_epochs x ppo_mini_batches optimizer steps on this rollout batch
        minis = [m.tolist() for m in np.array_split(np.array(train_idx, dtype=np.int64), args.ppo_mini_batches)]
        counts = common.all_reduce_numbers({f"{k}_{i}": v for i, m in enumerate(minis)
                                            for k, v in (("tok", sum(len(seq_resp[j]) for j in m)), ("seq", len(m)))})
        norm_total, updates, bad, loss_total = 0.0, 0, False, 0.0
        bar = tqdm(total=args.ppo_epochs * len(train_idx), desc=f"step {step} update", leave=False, dynamic_ncols=True,
                   disable=not (args.progress and master_process))
        model.train()
        for epoch in range(args.ppo_epochs):
            for mi, mini in enumerate(minis):
                total_tokens, total_seqs = counts[f"tok_{mi}"], counts[f"seq_{mi}"]
                if total_tokens == 0:
                    continue  # nothing to learn from anywhere (e.g. every group dropped)
                mbs = micro_batches([len(seq_prompt[j]) + len(seq_resp[j]) for j in mini], args.micro_batch_tokens)
                loss_sum = 0.0
                for mb in common.even_out(mbs):
                    if mb is None:  # this rank is done; join the others' collectives
                        idle_pass(model)
                        continue
                    bar.update(len(mb))
                    js = [mini[i] for i in mb]
                    lens = [len(seq_resp[j]) for j in js]
                    lp, ent = response_logprobs(model, [seq_prompt[j] for j in js], [seq_resp[j] for j in js],
                                                args.temperature, args.logprob_chunk,
                                                with_entropy=True if args.entropy_coef else "detached")
                    lp, ent = lp.float(), ent.float()
                    a = torch.repeat_interleave(torch.tensor([adv[j] for j in js], device=device),
                                                torch.tensor(lens, device=device))
                    old = torch.cat([old_lp[j] for j in js]) if recompute_old else lp.detach()
                    if args.adv_weight == "dwa":
                        a = a * dwa_weights(lp, old, args.dwa_s, args.dwa_alpha)
                    pg, clipped = policy_loss(lp, old, a, args.clip_low, args.clip_high)
                    tok_loss = pg
                    if ref_model is not None and not kl_in_reward:  # k3, in the loss
                        kl = kl_penalty(lp, torch.cat([ref_lp[j] for j in js]), "k3")
                        tok_loss = tok_loss + args.kl_coef * kl
                        if epoch == 0:
                            sums["kl"] += kl.detach().sum().item()
                            sums["kl_tokens"] += kl.numel()
                    if args.entropy_coef:
                        tok_loss = tok_loss - args.entropy_coef * ent
                    w = token_weights(lens, args.loss_agg, total_tokens, total_seqs, args.max_response_tokens).to(device)
                    loss = (w * tok_loss).sum()
                    loss.backward()  # FSDP reduce-scatters and sums over ranks; .grad accumulates over micro-batches
                    loss_sum += loss.item()
                    sums["pg_tokens"] += lp.numel()
                    sums["entropy"] += ent.detach().sum().item()
                    sums["clipped"] += clipped.sum().item()
                    sums["train_tokens"] += sum(len(seq_prompt[j]) + len(seq_resp[j]) for j in js)
                    if not need_old and epoch == 0:
                        gen = torch.tensor([x for j in js for x in rollouts[j]["logprobs"]], device=device)
                        sums["gap"] += (lp.detach() - gen).abs().sum().item()
                        sums["gap_tokens"] += lp.numel()
                loss_sum = common.all_reduce_numbers({"l": loss_sum})["l"]
                norm = common.clip_grad_norm(model.parameters(), args.grad_clip)
                if not (math.isfinite(loss_sum) and math.isfinite(norm)):
                    bad = True
                    print0(f"warning: step {step}: non-finite loss {loss_sum} or grad norm {norm}; update skipped")
                else:
                    optimizer.step()
                    updates += 1
                    norm_total += norm
                    loss_total += loss_sum  # each already summed over ranks
                optimizer.zero_grad(set_to_none=True)
        bar.close()
        model.eval()
        if bad:
            bad_steps_total += 1
            bad_streak += 1
        else:
            bad_streak = 0
        train_seconds = time.time() - t_train

        # 7. metrics over all ranks
        local = {"reward": sum(rewards), "correct": sum(r >= 1.0 for r in rewards), "seqs": len(rollouts),
                 "groups": len(records), "zero_var": sum(zero_var), "resp_tokens": sum(s["length"] for s in rollouts),
                 "truncated": sum(not s["finished"] for s in rollouts), **sums}
        g = common.all_reduce_numbers(local)
        mx = common.all_reduce_numbers({"len_max": max((s["length"] for s in rollouts), default=0), "gen_s": gen_seconds,
                                        "score_s": score_seconds[0], "train_s": train_seconds, "gather_s": gather_seconds,
                                        "mem_train_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0,
                                        **mem},
                                       op="max")
        seqs, pg_tokens = max(g["seqs"], 1), max(g["pg_tokens"], 1)
        m = {"step": step, "epoch": (step - 1) // steps_per_epoch, "reward": g["reward"] / seqs, "acc": g["correct"] / seqs,
             "zero_var_frac": g["zero_var"] / max(g["groups"], 1), "len_mean": g["resp_tokens"] / seqs, "len_max": mx["len_max"],
             "truncated": g["truncated"] / seqs, "entropy": g["entropy"] / pg_tokens,
             "kl": g["kl"] / max(g["kl_tokens"], 1) if ref_model is not None else None, "clip_frac": g["clipped"] / pg_tokens,
             "logprob_gap": g["gap"] / max(g["gap_tokens"], 1), "loss": loss_total / max(updates, 1),
             "grad_norm": norm_total / max(updates, 1), "lr": lr,
             "updates": updates, "train_seqs": int(common.all_reduce_numbers({"s": len(train_idx)})["s"]),
             "bad_steps": bad_steps_total, "gen_tok_s": g["resp_tokens"] / max(mx["gen_s"], 1e-9),
             "train_tok_s": g["train_tokens"] / max(mx["train_s"], 1e-9), "gen_s": mx["gen_s"], "score_s": mx["score_s"],
             "train_s": mx["train_s"], "gather_s": mx["gather_s"],
             "mem_gen_gib": mx["mem_gen_gib"], "mem_held_gib": mx["mem_held_gib"], "mem_train_gib": mx["mem_train_gib"]}

        # 8. the rollout log (rank 0 gathers every rank's rollouts)
        if args.log_rollouts:
            mine_log = [{"id": s["id"], "prompt": s["prompt"], "response": s["response"], "reward": s["reward"],
                         "finished": s["finished"], "length": s["length"], "step": step, "epoch": m["epoch"], "sample": s["sample"],
                         "advantage": adv[j], difficulty: records[j // args.group_size].get(difficulty), "rank": rank}
                        for j, s in enumerate(rollouts)]
            everything = [r for per_rank in common.all_gather_json(mine_log) for r in per_rank]
            if master_process:
                common.write_jsonl(os.path.join(args.out_dir, "rollouts", f"step_{step:06d}.jsonl"), everything)

        # 9. validation, checkpoint, the step's log line
        if test_records and args.val_every and (step % args.val_every == 0 or step == max_steps):
            m.update(validate(step))
        stop = bad_streak >= args.max_bad_steps
        if not stop and (step % args.save_every == 0 or step == max_steps):
            save(step)
        m["step_s"] = time.time() - t_step
        if master_process:
            common.append_jsonl(metrics_path, m)
            if wandb:
                wandb.log({k: v for k, v in m.items() if isinstance(v, (int, float))}, step=step)
        print0(f"step {step}/{max_steps} | reward {m['reward']:.3f} acc {m['acc']:.3f} zero_var {m['zero_var_frac']:.2f} "
               f"| len {m['len_mean']:.0f}/{m['len_max']:.0f} trunc {m['truncated']:.2f} | ent {m['entropy']:.3f} "
               + (f"kl {m['kl']:.4f} " if m["kl"] is not None else "")
               + f"clip {m['clip_frac']:.3f} | gnorm {m['grad_norm']:.3f} lr {lr:.2e} "
               f"| gen {m['gen_s']:.1f}s ({m['gen_tok_s']:.0f} tok/s) score {m['score_s']:.1f}s "
               f"train {m['train_s']:.1f}s ({m['train_tok_s']:.0f} tok/s)"
               + (f" | peak GiB gen {m['mem_gen_gib']:.1f} train {m['mem_train_gib']:.1f}" if device.type == "cuda" else "")
               + (f" | val {m['val/acc']:.3f}" if "val/acc" in m else ""))
        if stop:
            print0(f"error: {bad_streak} consecutive steps with non-finite loss or gradients; stopping. "
                   f"The last good checkpoint is kept in {args.out_dir}")
            exit_code = 1
            break

    if wandb:
        wandb.finish()
    common.dist_cleanup()
    return exit_code


if __name__ == "__main__":
    common.run_main(lambda: sys.exit(main()))
