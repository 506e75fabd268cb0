"""
R1-style reinforcement learning with GRPO, in one readable file.

One step: each rank samples n responses for its share of the step's prompts (our KV-cache engine) -> the task's
verifier scores them -> advantages within each group of n -> a policy-gradient update on packed micro-batches ->
log; now and then greedy validation and a checkpoint.

    python train_rl.py --model CKPT --task kk                                    # one GPU or CPU
    torchrun --nproc_per_node=8 train_rl.py --model CKPT --task kk --out_dir runs/rl_kk [--resume true]

Defaults are the paper's K&K run (verl; arXiv 2505.17988, docs/paper_preset.md), plus truncated importance sampling
against the engine's log-probs (--rollout_is). More in docs/grpo.md:
- The main path: one on-policy update per rollout batch, so the PPO ratio is exactly 1 and the gradient is that of
  -A log pi, times the TIS weight (--rollout_is: 1 where the sampler and the trainer agree). Several updates per
  batch and a KL to a reference are the explicit optional branch (pre_pass).
- FSDP2 shards the fp32 weights, gradients and AdamW state; compute runs in --dtype; every rank runs equally many
  micro-batches (parallel.even_out, idle_pass). Rollouts come from a full --dtype copy, gathered once per step
  into the engine's buffers, which stay allocated from step to step where memory allows (--keep_engine), so the
  decode's CUDA graphs are captured once per shape, not again every step.
- Exact resume: data order is seeded by (seed, epoch), generation by (seed, step, batch) and each prompt's place in
  the step's batch (runs begun before 2026-12-06: and the rank), the lr by the step;
  the count of prompt batches drawn (more than one a step with --dynamic_sampling) is saved with the checkpoint.
"""
import functools
import math
import os
import time
from types import SimpleNamespace

import numpy as np
import torch

import ckpt
import common
import engine
import gpu_memory
import parallel
import tasks
from common import UserError, print0
from grpo import (batch_epoch, batch_moments, cispo_loss, covariance_tokens, dwa_weights, generation_seed,
                  group_advantages, kl_cov_loss, kl_penalty, lr_at, overlong_penalty, ppo_clip_loss, refill_keep,
                  rollout_is_weights, sequence_ratio_logp, step_prompt_indices, token_weights, top_fraction_threshold,
                  whiten, zero_variance)
from model import checkpoint_stamps, load_model, parse_dtype, read_config, response_logprobs
from parallel import idle_pass, shard_model
from scoring import validate
from tasks import load_tokenizer

# -----------------------------------------------------------------------------
# settings (defaults = the paper's K&K run)


def get_parser():
    p = common.new_parser("GRPO (R1-style RL) on a verifiable task", prog="train_rl.py")
    # data and model
    p.add_argument("--model", default=None, help="initial policy: a Hugging Face checkpoint directory (required)")
    p.add_argument("--task", default="kk",
                   help="task module: kk, math, or an importable module with the task interface")
    p.add_argument("--train_data", default="data/kk/train.jsonl",
                   help="RL training prompts (jsonl records of the task)")
    p.add_argument("--test_data", default="data/kk/test.jsonl",
                   help="validation split, decoded greedily ('' = no validation)")
    p.add_argument("--template", default="auto", choices=("auto", "chat", "plain"),
                   help="chat: the paper's system prompt; "
                   "plain: Question/Answer")
    p.add_argument("--out_dir", default="runs/rl_kk", help="run directory: checkpoints, metrics.jsonl, rollouts/")
    # the batch (paper: train_batch_size 128, rollout.n 8)
    p.add_argument("--prompts_per_step", type=int, default=128,
                   help="prompts per RL step over all ranks (each rank takes its share)")
    p.add_argument("--samples_per_prompt", type=int, default=8,
                   help="rollouts per prompt, the GRPO group (verl rollout.n)")
    p.add_argument("--temperature", type=float, default=0.7,
                   help="sampling temperature; training log-probs use the same one")
    p.add_argument("--top_p", type=float, default=1.0,
                   help="nucleus sampling (1 = off; <1 makes training log-probs ignore the truncation)")
    p.add_argument("--max_prompt_tokens", type=int, default=1024,
                   help="longer training prompts are dropped (counted at start)")
    p.add_argument("--max_response_tokens", type=int, default=4096,
                   help="generation budget; longer responses are truncated (reward 0)")
    p.add_argument("--epochs", type=int, default=20, help="passes over the training prompts (paper: total_epochs 20)")
    p.add_argument("--max_steps", type=int, default=0,
                   help="stop after this many RL steps (0 = epochs x steps per epoch)")
    # the loss: every variant is one named setting
    p.add_argument("--loss_agg", default="token_mean", choices=("token_mean", "seq_mean_token_mean", "constant"),
                   help="token_mean: over all response tokens of the batch (DAPO, arXiv 2503.14476); "
                        "seq_mean_token_mean: over sequences of token means (GRPO, 2402.03300); "
                        "constant: sum / (max_response_tokens x sequences) (Dr. GRPO, 2503.20783)")
    p.add_argument("--std_normalize", type=common.str2bool, default=True,
                   help="divide advantages by the group's std (GRPO); "
                   "false: mean-centring only (Dr. GRPO)")
    p.add_argument("--std_scope", default="group", choices=("group", "batch", "tokens"),
                   help="with --std_normalize: the std of each group's rewards (GRPO), or of the rewards of every "
                        "rollout of the step's groups, all ranks together (with --dynamic_sampling, of the groups it "
                        "keeps; truncated and zero-variance ones count, as in TRL's scale_rewards='batch'): the "
                        "group's mean, the batch's std ('Tricks or Traps', arXiv 2508.08221), so a group whose "
                        "rewards vary little no longer gets advantages as large as one split half and half; tokens: "
                        "REINFORCE++-baseline (arXiv 2501.03262, verl's reinforce_plus_plus_baseline): the group-"
                        "centred rewards whitened over every token of those rollouts, (A - mean) / std, each "
                        "response weighing its length, so a group of equal rewards gets -mean / std, not 0")
    p.add_argument("--baseline", default="mean", choices=("mean", "loo"),
                   help="what each reward is compared with: its group's mean (GRPO), or the mean of the group's "
                        "other rewards (RLOO, Ahmadian et al. 2024, arXiv 2402.14740), n / (n - 1) times the "
                        "same centred reward; RLOO itself has no std: --std_normalize false")
    p.add_argument("--clip_low", type=float, default=0.2, help="PPO clip: ratio floor 1 - clip_low")
    p.add_argument("--clip_high", type=float, default=0.2,
                   help="PPO clip: ratio ceiling 1 + clip_high (clip-higher, DAPO: 0.28)")
    p.add_argument("--policy_loss", default="ppo", choices=("ppo", "cispo", "clip_cov", "kl_cov"),
                   help="ppo: the clipped surrogate (PPO, GRPO): a token whose ratio is past the clip band gets no "
                        "gradient; cispo: CISPO (MiniMax-M1, arXiv 2506.13585): the importance weight clipped to the "
                        "band [1 - clip_low, 1 + clip_high] and detached, so every token keeps its gradient (the paper "
                        "bounds it from above only: --clip_low 1). The same as ppo with one on-policy update per "
                        "batch, where the ratio is 1. clip_cov and kl_cov (Cui et al. 2025, 'The Entropy Mechanism "
                        "of RL for Reasoning LMs', arXiv 2505.22617) act on the few tokens whose log-prob and "
                        "advantage covary most (--cov_frac of the batch's tokens, found once per step from the "
                        "pre-update policy's log-probs over every rank's tokens, which costs a forward where the "
                        "pre-pass had none), against entropy collapse: clip_cov is ppo with the policy gradient of "
                        "tokens drawn at random among those whose centred product lies in (--clip_cov_low, "
                        "--clip_cov_high) cut; kl_cov is -A x ratio with no clip, plus --kl_cov_coef x |log(pi / "
                        "pi_old)| on the top --cov_frac by that product (the same as ppo with one on-policy update "
                        "per batch, where that term has no gradient: it acts with --ppo_mini_batches or --ppo_epochs "
                        "> 1; verl's separate old-log-prob pass gives it rounding noise to act on even then: "
                        "docs/grpo.md)")
    p.add_argument("--cov_frac", type=float, default=2e-4,
                   help="clip_cov / kl_cov: the share of the batch's tokens they act on, at least one (verl's "
                        "clip_cov_ratio and kl_cov_ratio: 2e-4; the paper's KL-Cov: 2e-3 on Qwen2.5-7B)")
    p.add_argument("--clip_cov_low", type=float, default=1.0,
                   help="clip_cov: the centred product's lower bound for a token to be drawn (paper: 1)")
    p.add_argument("--clip_cov_high", type=float, default=5.0,
                   help="clip_cov: the centred product's upper bound for a token to be drawn (paper: 5)")
    p.add_argument("--kl_cov_coef", type=float, default=1.0,
                   help="kl_cov: the weight of the |log-ratio| penalty on the chosen tokens (paper: 1)")
    p.add_argument("--ppo_epochs", type=int, default=1,
                   help="passes over each rollout batch (>1: old log-probs come from one no-grad pre-pass)")
    p.add_argument("--ratio_level", default="token", choices=("token", "sequence"),
                   help="the PPO ratio per token (PPO, GRPO), or per response: exp of its tokens' mean log-ratio, "
                        "each token keeping its own gradient (GSPO, arXiv 2507.18071, which clips it at ~3e-4/4e-4: "
                        "set --clip_low/--clip_high, and weighs each response alike: set --loss_agg "
                        "seq_mean_token_mean, as verl's GSPO does); the same with one on-policy update per batch, "
                        "where the ratio is 1")
    p.add_argument("--ppo_mini_batches", type=int, default=1,
                   help="optimizer steps per pass over the rollout batch (paper: 1); the training rollouts of "
                        "every rank, in the step's order, are cut into this many near-equal runs, one a step, each "
                        "rank training its own members of each: which rollouts share a step is the same at any "
                        "number of ranks")
    p.add_argument("--kl_coef", type=float, default=0.0,
                   help="weight of the KL penalty to the frozen reference policy (paper: 0)")
    p.add_argument("--kl_estimator", default="k3", choices=("k1", "k3"), help="k1: the reward's KL penalty "
                   "(InstructGPT), kl_coef x (sum_t log(pi/pi_ref) - its group's mean) off the advantage, linear in "
                   "kl_coef; k3: per-token low-variance KL in the loss (GRPO, verl's low_var_kl). Why k1 is not "
                   "offered as a loss, and why not verl's normalised shaped reward: docs/grpo.md")
    p.add_argument("--ref_model", default=None,
                   help="reference policy for the KL (default: --model); it must share --model's tokenizer, and its "
                        "context must hold every prompt plus --max_response_tokens (both checked at start)")
    p.add_argument("--entropy_coef", type=float, default=0.0, help="entropy bonus weight (paper: 0)")
    p.add_argument("--entropy_top_frac", type=float, default=1.0,
                   help="the policy gradient only on the batch's top fraction of tokens by entropy (1 = all; 'Beyond "
                        "the 80/20 Rule', arXiv 2506.01939: 0.2, the 'forking' tokens). The entropies come from a "
                        "no-grad pass of the pre-update policy and the threshold from every rank's training tokens "
                        "together, so the choice does not depend on the micro-batches or the number of ranks (but for "
                        "rounding at the floor; costs one forward more a step where the pre-pass has no policy "
                        "forward: one PPO epoch and mini-batch, no k1). The loss normaliser still counts every token; "
                        "the KL and entropy terms keep every token")
    p.add_argument("--adv_weight", default="none", choices=("none", "dwa"),
                   help="dwa: 'Sparse but Critical' (arXiv 2603.22446) weights A_t by the token's KL(pi_old || pi); "
                        "w = 1 on-policy, so it acts only with several updates per batch (docs/token_shift.md, DWA)")
    p.add_argument("--rollout_is", default="token", choices=("off", "token", "sequence", "geometric"),
                   help="truncated importance sampling (TIS; Yao et al. 2025, 'Your efficient RL framework secretly "
                        "brings you off-policy RL training'; verl's rollout importance sampling): weight each token's "
                        "policy-gradient loss by min(pi_trainer / pi_sampler, --rollout_is_cap), the ratio of the "
                        "trainer's old log-prob to the engine's, per token, per response (sequence: the product of "
                        "its tokens' ratios) or per response by their geometric mean (geometric, verl's level of that "
                        "name: long responses no longer leave the band first); corrects "
                        "the sampler-trainer mismatch (logprob_gap; bf16 on a GPU: ~0.03 nats a token). Where the "
                        "two agree (fp32 on a CPU) the weight is 1 and it changes nothing. Not top-p's truncation: "
                        "the engine logs the untruncated softmax's log-prob (see --top_p)")
    p.add_argument("--rollout_is_cap", type=float, default=2.0,
                   help="the cap C of --rollout_is's weight min(ratio, C) (TIS: 2)")
    p.add_argument("--rollout_is_mode", default="truncate", choices=("truncate", "mask"),
                   help="truncate: --rollout_is's weight min(ratio, C) (TIS); mask: the ratio inside [1/C, C] (C > "
                        "1; verl's rejection band) and 0 outside it, so a token (or, per sequence, a response) the "
                        "two disagree on leaves the gradient (masked importance sampling, MIS / IcePop; Liu, Li et al. "
                        "2025, 'When Speed Kills Stability'). Its normaliser keeps it (verl's rejection drops it from "
                        "the normaliser too, which would need a pre-pass); per sequence the ratio is a product over "
                        "the tokens, so long responses leave the band first")
    p.add_argument("--dwa_s", type=float, default=1.0,
                   help="with --adv_weight dwa: DWA scale s, w in [1 - s/2, 1 + s/2], |s| <= 2 (unpublished)")
    p.add_argument("--dwa_alpha", type=float, default=1.0,
                   help="with --adv_weight dwa: DWA sharpness; the sign of s x alpha sets the direction: > 0 "
                        "boosts tokens the update moved, < 0 damps them")
    p.add_argument("--drop_zero_variance_groups", type=common.str2bool, default=False,
                   help="leave groups whose rewards are all equal out of the loss and its normaliser "
                        "(DAPO's filter, without resampling)")
    p.add_argument("--dynamic_sampling", type=common.str2bool, default=False,
                   help="DAPO's dynamic sampling (arXiv 2503.14476): sample further prompt batches (the data order's "
                        "next ones) until the step holds --prompts_per_step groups whose rewards vary, at most "
                        "--max_gen_batches; those train, groups beyond them and zero-variance groups are only logged. "
                        "Costs generation, not training; a step then draws more than one batch of prompts, so "
                        "--max_steps and --epochs count updates, not passes over the data")
    p.add_argument("--max_gen_batches", type=int, default=10,
                   help="--dynamic_sampling: prompt batches per step at most (DAPO's recipe: 10); a step that "
                        "falls short trains on the groups it found")
    p.add_argument("--mask_truncated", type=common.str2bool, default=False,
                   help="leave truncated responses out of the loss (DAPO overlong filtering); "
                        "paper: kept, with reward 0")
    p.add_argument("--overlong_buffer", type=int, default=0,
                   help="DAPO's soft overlong punishment (arXiv 2503.14476; its recipe: 4096 of 20480 tokens): a "
                        "response longer than --max_response_tokens minus this many tokens has its reward lowered, "
                        "linearly, down to -overlong_penalty at the cap, before the group's advantages (0 = off); "
                        "only in groups whose task rewards differ (DAPO drops the others by accuracy). Rewards as "
                        "logged, accuracy and which groups have no signal (--dynamic_sampling, "
                        "--drop_zero_variance_groups) stay the task's")
    p.add_argument("--overlong_penalty", type=float, default=1.0,
                   help="--overlong_buffer's penalty at the cap (DAPO: 1)")
    # optimizer (paper: AdamW betas (0.5, 0.999), wd 0.01, grad clip 1, constant lr after linear warm-up)
    p.add_argument("--lr", type=float, default=5e-6, help="peak learning rate (paper K&K 5e-6, MATH 2.5e-6)")
    p.add_argument("--warmup_steps", type=int, default=8,
                   help="linear warm-up steps, then constant (paper K&K 8, MATH 4)")
    p.add_argument("--beta1", type=float, default=0.5, help="AdamW beta1 (paper 0.5)")
    p.add_argument("--beta2", type=float, default=0.999, help="AdamW beta2")
    p.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm (0 = off)")
    p.add_argument("--adam_8bit", type=common.str2bool, default=False,
                   help="bitsandbytes 8-bit AdamW on CUDA when installed (2 bytes of state per parameter instead of 8; "
                        "on FSDP-sharded weights it runs on each rank's shards); else torch AdamW, with a note")
    # speed and memory
    p.add_argument("--dtype", default="auto", help="compute dtype: auto (bfloat16 on CUDA, float32 on CPU), bfloat16, "
                   "float32 (on CUDA its matmuls run as TF32); the optimizer always updates sharded fp32 weights")
    p.add_argument("--gradient_checkpointing", type=common.str2bool, default=True,
                   help="recompute blocks in backward (less memory)")
    parallel.add_recompute_args(p, auto_fraction=gpu_memory.AUTO_MEMORY_FRACTION)
    p.add_argument("--micro_batch_tokens", type=int, default=30000, help="tokens per packed micro-batch per rank "
                   "(paper: ppo_max_token_len_per_gpu 30000)")
    p.add_argument("--logprob_chunk", type=int, default=4096, help="tokens per chunk of the lm_head + log-softmax")
    p.add_argument("--gen_batch_size", type=int, default=32,
                   help="rollout prompts decoded at once: this x n rows = the KV cache's slots, which the step's rows "
                        "stream through (a finished row's slot takes the next); sets memory and speed, not the samples "
                        "(but for rounding, which moves a sampled token now and then)")
    p.add_argument("--keep_engine", default="auto", choices=("auto", "true", "false"),
                   help="keep generation's weight copy, KV cache and CUDA graphs allocated through the update, so each "
                        "step refills them in place and replays the graphs captured before (nano-vllm keeps them "
                        "for the whole run) instead of allocating and capturing anew; costs their memory in the "
                        "update (bench.py --memory: 'RL update peak ... kept'). auto: kept on CPU, and on CUDA when "
                        f"the update's computed peak with them is at most {100 * gpu_memory.AUTO_MEMORY_FRACTION:.0f} "
                        "%% of the GPU. Speed only: the samples and weights are the same either way")
    # validation, logging, checkpoints
    p.add_argument("--val_every", type=int, default=5,
                   help="greedy validation every this many steps (0 = never; paper 5)")
    p.add_argument("--val_before_train", type=common.str2bool, default=True,
                   help="also validate the initial policy (step 0)")
    p.add_argument("--val_limit", type=int, default=0,
                   help="validate on N test records, difficulties in proportion (0 = all)")
    p.add_argument("--val_max_response_tokens", type=int, default=0,
                   help="validation generation budget (0 = --max_response_tokens)")
    p.add_argument("--val_batch_size", type=int, default=128,
                   help="validation prompts decoded at once (KV-cache slots, as --gen_batch_size)")
    p.add_argument("--save_every", type=int, default=25,
                   help="checkpoint every this many steps, and at the end (paper 25)")
    p.add_argument("--keep_last", type=int, default=2,
                   help="checkpoints kept whole (21.6 GB each at 1.5B); older ones go")
    p.add_argument("--keep_steps", type=int, nargs="*", default=[],
                   help="steps whose weights outlive --keep_last (a resumed or extended run keeps those of every "
                        "earlier attempt too)")
    p.add_argument("--log_rollouts", type=common.str2bool, default=True, help="write rollouts/step_N.jsonl")
    p.add_argument("--resume", type=common.str2bool, default=False,
                   help="continue from the newest complete checkpoint in --out_dir")
    p.add_argument("--max_bad_steps", type=int, default=3,
                   help="stop after this many consecutive steps with NaN/inf loss or grad norm")
    p.add_argument("--seed", type=int, default=1234, help="seeds the data order and every generation")
    p.add_argument("--progress", type=common.str2bool, default=True, help=common.PROGRESS_HELP)
    p.add_argument("--wandb_project", default="",
                   help="also log to this Weights & Biases project (when wandb is installed)")
    return p


# -----------------------------------------------------------------------------
# resume: what a resumed run must match (and --dtype: the identity holds the dtype it resolved to, and the device
# with a CPU's thread count, parallel.compute_identity; ckpt.load_local_train_state checks AdamW's betas, weight
# decay and eps against the optimizer state itself)

# the settings a resumed run must share with the original: they decide the data order and the schedule
RUN_IDENTITY = ("task", "train_data", "template", "max_prompt_tokens", "prompts_per_step", "samples_per_prompt", "seed",
                "lr", "warmup_steps")
# ... and what each step samples and optimises, checked against the settings the checkpoint saved (those its
# version had), so a resume cannot mix two objectives in one run; the rest (memory, logging, --max_steps) may change
RUN_OBJECTIVE = ("temperature", "top_p", "max_response_tokens", "loss_agg", "std_normalize", "std_scope", "clip_low",
                 "clip_high", "policy_loss", "cov_frac", "clip_cov_low", "clip_cov_high", "kl_cov_coef",
                 "baseline", "ppo_epochs", "ratio_level", "ppo_mini_batches", "kl_coef", "kl_estimator",
                 "ref_model", "entropy_coef", "entropy_top_frac", "adv_weight", "rollout_is", "rollout_is_cap",
                 "rollout_is_mode", "dwa_s", "dwa_alpha", "drop_zero_variance_groups", "mask_truncated",
                 "overlong_buffer", "overlong_penalty", "grad_clip", "adam_8bit", "beta1", "beta2",
                 "weight_decay", "model")  # --model: the tokenizer and, without --ref_model, the KL reference
# what the runs of versions before a setting existed did: a resume of such a run compares this, not what is given now
# (DWA came on 2026-11-27, off; TIS on 2026-12-02, on by default, and GSPO's --ratio_level that day; CISPO, masked
# IS, the overlong punishment, the batch std and the entropy minority on 2026-12-06, off; RLOO's baseline, Clip-Cov
# and KL-Cov on 2026-12-06 too, after those)
EARLIER_OBJECTIVE = {"adv_weight": "none", "rollout_is": "off", "ratio_level": "token", "policy_loss": "ppo",
                     "rollout_is_mode": "truncate", "overlong_buffer": 0, "overlong_penalty": 1.0, "std_scope": "group",
                     "entropy_top_frac": 1.0, "baseline": "mean", "cov_frac": 2e-4, "clip_cov_low": 1.0,
                     "clip_cov_high": 5.0, "kl_cov_coef": 1.0}


def switched_settings(s):
    """(names, unused, switch) of the settings that act only under a switch, for the settings s (a dict): where the
    switch is off they are not used, which is said once and not refused (a sweep may pass them to every arm), and a
    resume does not compare them where neither the run nor the resume uses them."""
    return ((("dwa_s", "dwa_alpha"), s["adv_weight"] != "dwa", "--adv_weight dwa"),
            (("rollout_is_cap", "rollout_is_mode"), s["rollout_is"] == "off",
             "--rollout_is token, sequence or geometric"),
            (("overlong_penalty",), s["overlong_buffer"] == 0, "--overlong_buffer > 0"),
            (("std_scope",), not s["std_normalize"], "--std_normalize true"),
            (("clip_low", "clip_high"), s["policy_loss"] == "kl_cov", "--policy_loss ppo, cispo or clip_cov"),
            (("cov_frac",), s["policy_loss"] not in COVARIANCE_LOSSES, "--policy_loss clip_cov or kl_cov"),
            (("clip_cov_low", "clip_cov_high"), s["policy_loss"] != "clip_cov", "--policy_loss clip_cov"),
            (("kl_cov_coef",), s["policy_loss"] != "kl_cov", "--policy_loss kl_cov"),
            (("max_gen_batches",), not s["dynamic_sampling"], "--dynamic_sampling true"),
            (("ref_model", "kl_estimator"), s["kl_coef"] == 0, "--kl_coef > 0"))


# -----------------------------------------------------------------------------
# one RL step: rollouts -> (optional pre-pass) -> advantages -> update -> metrics


def rollout(model, dtype, tokenizer, task, train_records, args, step, batches_before, rank, world, keep_engine,
            reserve, seeds_by_rank=False):
    """This rank's share of the step's prompt batch, n samples each, from the engine's --dtype copy of the weights
    (engine.GenWeights, gathered once: no collective while decoding), scored by the task. With --dynamic_sampling
    (DAPO), further prompt batches (the data order's next ones) until prompts_per_step groups over all ranks have
    reward variance, at most --max_gen_batches; grpo.refill_keep picks the groups that train, by their place in the
    global batch, so the same ones train at any world size and after a resume (batches_before: prompt batches drawn
    by the earlier steps). Each prompt's rows are keyed by its place in the global batch, so every world size samples
    the same rollouts (but for rounding); seeds_by_rank: by the rank and the place in its share, as runs begun
    before 2026-12-06 sampled (the same at one rank).
    Returns (indices of this rank's prompts, their rollouts, per group whether it may train, its epoch and its
    (prompt batch, place) in the step, prompt batches drawn, times: seconds gathering, generating, scoring; CUDA GiB
    of generation; CUDA graphs captured and the seconds capturing them)."""
    cuda = model.lm_head.weight.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0, captured, capturing = time.time(), engine.stats["graph_captures"], engine.stats["capture_s"]
    policy = engine.kept_weights(model, 0, dtype)  # refilled in place when kept from the step before
    times = {"gather_s": time.time() - t0, "score_s": 0.0, "mem_gen_gib": 0.0, "mem_held_gib": 0.0}
    n, per_step = args.samples_per_prompt, args.prompts_per_step
    indices, rollouts, trains, epochs, places_in_step, informative = [], [], [], [], [], 0
    for b in range(args.max_gen_batches if args.dynamic_sampling else 1):
        batch_no = batches_before + b + 1  # the data order's batch: the step itself when every step draws one
        batch = step_prompt_indices(len(train_records), per_step, batch_no, args.seed)
        places = parallel.rank_share(list(range(len(batch))), rank, world)
        mine = [batch[i] for i in places]
        # (a task's score failing on this rank's share stops every rank, not this one alone)
        new = parallel.on_every_rank(functools.partial(
            engine.sample_responses, policy, tokenizer, task, [train_records[i] for i in mine], n=n,
            temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_response_tokens,
            seed=generation_seed(args.seed, step, rank if seeds_by_rank else 0, b), template=args.template,
            batch_size=args.gen_batch_size, desc=f"step {step} rollouts", progress=args.progress, timings=times,
            reserve=reserve, prompt_numbers=None if seeds_by_rank else places))
        indices, rollouts, places_in_step = indices + mine, rollouts + new, places_in_step + [(b, p) for p in places]
        epochs += [batch_epoch(len(train_records), per_step, batch_no)] * len(mine)
        if not args.dynamic_sampling:
            trains += [True] * len(mine)
            break
        signal = torch.zeros(len(batch), dtype=torch.float64)  # per place in the global batch, from every rank
        signal[places] = torch.tensor([not z for z in zero_variance([s["reward"] for s in new], n)],
                                      dtype=torch.float64)
        signal = parallel.all_reduce(signal).tolist()
        keep = refill_keep(signal, per_step - informative)
        trains += [keep[i] for i in places]
        informative += sum(keep)
        if informative == per_step:
            break
    del policy
    if not keep_engine:
        engine.release()  # the engine's weights, KV cache and graphs: the update needs the memory
    times["gen_s"] = time.time() - t0 - times["gather_s"] - times["score_s"]
    times["graph_captures"] = engine.stats["graph_captures"] - captured
    times["capture_s"] = engine.stats["capture_s"] - capturing  # (inside gen_s)
    if cuda:  # the peak of generation and what stays allocated into the update (whose own peak step_metrics takes)
        times.update(mem_gen_gib=torch.cuda.max_memory_allocated() / 2**30,
                     mem_held_gib=torch.cuda.memory_allocated() / 2**30)
        torch.cuda.reset_peak_memory_stats()
    return indices, rollouts, trains, epochs, places_in_step, b + 1, times


def validate_policy(model, dtype, tokenizer, task, test_records, step, val_settings, keep_engine):
    """Greedy validation (scoring.validate) on the engine's --dtype copy of the weights (the rollouts' own, so their
    graphs stay valid), freed after unless kept."""
    m = validate(engine.kept_weights(model, 0, dtype), tokenizer, task, test_records, step, **val_settings)
    if not keep_engine:
        engine.release()
    return m


def memory_estimate(args, cfg, world, per_rank, longest_prompt, dtype):
    """gpu_memory's per-GPU bytes for this run's settings (dtype: the compute's and the engine's; longest_prompt: in
    tokens)."""
    recompute = (dict(checkpoint_every=args.checkpoint_every, checkpoint_keep=args.checkpoint_keep)
                 if args.gradient_checkpointing else dict(checkpoint_every=0))
    return gpu_memory.memory_estimate(
        cfg, world=world, prompts_per_rank=per_rank, group_size=args.samples_per_prompt,
        gen_batch_size=args.gen_batch_size, prompt_tokens=longest_prompt, response_tokens=args.max_response_tokens,
        rl_tokens=args.micro_batch_tokens, logprob_chunk=args.logprob_chunk,
        adam_8bit=args.adam_8bit and ckpt.eight_bit_adam_installed(),  # (else torch's AdamW runs: 8 bytes, not 2)
        gen_dtype_bytes=dtype.itemsize, compute_bytes=dtype.itemsize, rl_entropy=bool(args.entropy_coef),
        top_p=args.top_p, **recompute)


def rollout_reserve(args, per_rank, longest_prompt):
    """The engine's buffers (slots, KV-cache columns, new tokens) for this run's largest rollout call: per_rank
    prompts at most, longest_prompt tokens at most."""
    return (min(args.gen_batch_size, per_rank) * args.samples_per_prompt,
            longest_prompt + args.max_response_tokens, args.max_response_tokens)


def kept_update_peak(e, cfg, reserve, dtype, ref_bytes, top_p):
    """The update's computed peak (e: memory_estimate's) with generation's buffers kept through it (reserve: their
    slots, columns, new tokens; top_p: the rollouts', whose nucleus sorts) and the reference model's shards
    (ref_bytes: gpu_memory.reference_bytes, 0 without a KL)."""
    return (e["update_peak"] + ref_bytes
            + gpu_memory.engine_kept_bytes(cfg, e["params"], reserve[0], reserve[1], dtype.itemsize, top_p))


def keep_engine_setting(args, cfg, world, per_rank, longest_prompt, reserve, dtype, ref_bytes, gpu_bytes):
    """--keep_engine as a bool and the reason, printed once. auto: kept on CPU (gpu_bytes None); on a GPU when
    gpu_memory's update peak plus the kept buffers (reserve: their slots, columns, new tokens) fits
    gpu_memory.AUTO_MEMORY_FRACTION of it."""
    if args.keep_engine != "auto":
        return args.keep_engine == "true", f"--keep_engine {args.keep_engine}"
    if gpu_bytes is None:
        return True, "--keep_engine auto, on CPU"
    peak = kept_update_peak(memory_estimate(args, cfg, world, per_rank, longest_prompt, dtype), cfg, reserve, dtype,
                            ref_bytes, args.top_p)
    kept = gpu_memory.keeps_engine(peak, gpu_bytes)
    return kept, (f"--keep_engine auto: the update's computed peak with it {peak / 2**30:.1f} GiB "
                  f"{'<=' if kept else '>'} {gpu_memory.AUTO_MEMORY_FRACTION:.0%} of the GPU's "
                  f"{gpu_bytes / 2**30:.1f} GiB")


def with_recompute(args, every):
    """args with --checkpoint_every set to every (0: --gradient_checkpointing false)."""
    return SimpleNamespace(**{**vars(args), **gpu_memory.recompute_fields(every)})


def recompute_setting(args, cfg, world, per_rank, longest_prompt, reserve, dtype, ref_bytes, gpu_bytes):
    """--checkpoint_every auto (gpu_memory.resolve_recompute), by the update's computed peak with generation's
    buffers in it where --keep_engine keeps them (true, or auto and they fit with every block recomputed): the kept
    engine first, then the least recompute that fits beside it."""
    kept = keep_engine_setting(with_recompute(args, 1), cfg, world, per_rank, longest_prompt, reserve, dtype,
                               ref_bytes, gpu_bytes)[0]

    def peak(every):
        e = memory_estimate(with_recompute(args, every), cfg, world, per_rank, longest_prompt, dtype)
        return (kept_update_peak(e, cfg, reserve, dtype, ref_bytes, args.top_p) if kept
                else e["update_peak"] + ref_bytes)
    return gpu_memory.resolve_recompute(args, peak, gpu_bytes)


def sampler_logprobs(batch, js, device):
    """The log-probs the engine logged with the tokens of responses js, flat in their order."""
    return torch.tensor([x for j in js for x in batch.rollouts[j]["logprobs"]], device=device)


def add_logprob_gap(lp, batch, js, sums):
    """The sampler's log-probs against the trainer's for the same tokens (logged as logprob_gap)."""
    sums["gap"] += (lp - sampler_logprobs(batch, js, lp.device)).abs().sum().item()
    sums["gap_tokens"] += lp.numel()


def pre_pass(model, ref_model, batch, indices, args, sums, need_entropy=False, need_logp=False):
    """The optional branch's no-grad forward: the pre-update policy's log-probs (the PPO ratio's denominator, and
    k1's KL) when it needs them (or need_logp: Clip-Cov's and KL-Cov's covariance), and its entropies (need_entropy),
    the reference's log-probs for the KL. Returns (old, ref, entropy): response index -> log-probs or entropies."""
    old, ref, entropy = {}, {} if ref_model is not None else None, {}
    policy = batch.need_old or need_entropy or need_logp
    lengths = [len(batch.prompts[j]) + len(batch.responses[j]) for j in indices]
    with torch.no_grad():
        for mb in parallel.even_out(parallel.micro_batches(lengths, args.micro_batch_tokens)):
            if mb is None:  # this rank is done; join the others' collectives
                for m in ([model] if policy else []) + ([ref_model] if ref_model is not None else []):
                    idle_pass(m, backward=False)
                continue
            js = [indices[i] for i in mb]
            seqs = ([batch.prompts[j] for j in js], [batch.responses[j] for j in js], args.temperature,
                    args.logprob_chunk)
            splits = [len(batch.responses[j]) for j in js]
            if policy:  # (the entropies only where asked: they cost a pass over the vocabulary)
                out = response_logprobs(model, *seqs, with_entropy="detached" if need_entropy else False)
                lp, ent = out if need_entropy else (out, None)
                if need_entropy:
                    entropy.update(zip(js, ent.float().split(splits)))
                if batch.need_old or need_logp:
                    lp = lp.float()
                    old.update(zip(js, lp.split(splits)))
                if batch.need_old:  # (otherwise the update measures the gap, on its own log-probs)
                    add_logprob_gap(lp, batch, js, sums)
            if ref_model is not None:
                ref.update(zip(js, response_logprobs(ref_model, *seqs).float().split(splits)))
    if ref_model is not None:
        parallel.reshard(ref_model)  # FSDP keeps a root gathered after a forward without backward (parallel.reshard)
    return old, ref, entropy


COVARIANCE_LOSSES = ("clip_cov", "kl_cov")  # the losses that need the pre-update log-probs' covariance with A
COVARIANCE_STREAM = 7_001  # Clip-Cov's random draw (KL-Cov's tie-break): its own stream of the seed (derive_seed)


def token_draws(seed, step, places, samples, lengths, prompts_per_step, n):
    """One number in [0, 1) per token of these responses (flat, in order), a hash of (the run's seed, the step, the
    response's prompt batch and place in it, its sample, the token's position): Clip-Cov's random draw and KL-Cov's
    tie-break, the same at any world size and on resume. places: each response's (prompt batch, place) in the step
    (rollout()), samples: its sample within the group."""
    ids = torch.tensor([(b * prompts_per_step + p) * n + i for (b, p), i in zip(places, samples)], dtype=torch.long)
    counts = torch.tensor(lengths, dtype=torch.long)
    keys = engine.sample_keys(engine.seed32(common.derive_seed(seed, step, COVARIANCE_STREAM)), ids)
    positions = torch.cat([torch.arange(k) for k in lengths] or [torch.zeros(0, dtype=torch.long)])
    return engine.keyed_uniforms(torch.repeat_interleave(keys, counts), positions)[:, 0]


def mark_high_entropy_tokens(batch, entropy, frac, sums, device):
    """--entropy_top_frac: batch.high_entropy, per training rollout the tokens among the batch's top frac by entropy,
    over every rank's together (only their policy gradient trains)."""
    batch.entropy_floor = top_fraction_threshold(
        torch.cat([entropy[j] for j in batch.train_idx] or [torch.zeros(0, device=device)]), frac)
    # (no floor: no finite entropy on any rank, a blown-up forward: every token kept, and the step's non-finite
    # log-probs skip it as any other's)
    batch.high_entropy = {j: entropy[j] >= batch.entropy_floor if batch.entropy_floor is not None
                          else torch.ones_like(entropy[j], dtype=torch.bool) for j in batch.train_idx}
    kept = torch.cat(list(batch.high_entropy.values()) or [torch.zeros(0, dtype=torch.bool)])
    sums["entropy_kept"], sums["entropy_tokens"] = int(kept.sum()), kept.numel()  # (one host sync)


def mark_covariance_tokens(batch, old, adv, places, args, step, sums, device):
    """Clip-Cov / KL-Cov: batch.by_cov, per training rollout the tokens whose pre-update log-prob and advantage
    covary most, chosen over every rank's together (places: each prompt's (prompt batch, place) in the step)."""
    n = args.samples_per_prompt
    lens = [len(batch.responses[j]) for j in batch.train_idx]
    chosen, batch.covariance = covariance_tokens(
        torch.cat([old[j] for j in batch.train_idx] or [torch.zeros(0, device=device)]),
        torch.repeat_interleave(torch.tensor([adv[j] for j in batch.train_idx], device=device),
                                torch.tensor(lens, dtype=torch.long, device=device)),
        args.policy_loss, args.cov_frac,
        token_draws(args.seed, step, [places[j // n] for j in batch.train_idx], [j % n for j in batch.train_idx], lens,
                    args.prompts_per_step, n).to(device),
        (args.clip_cov_low, args.clip_cov_high))
    batch.by_cov = dict(zip(batch.train_idx, chosen.split(lens)))
    sums["cov_chosen"], sums["cov_tokens"] = int(chosen.sum()), chosen.numel()  # (one host sync)


def mini_batches(train_idx, places, n, count):
    """This rank's rollouts (train_idx: indices into its batch) of each of the step's `count` mini-batches: the
    training rollouts of every rank, in the step's order (places: each prompt's (prompt batch, place); n rollouts a
    prompt), cut into `count` near-equal runs, each rank taking its own members of each. Cut on each rank's own list,
    a mini-batch held other rollouts at another world size wherever the ranks trained unequal shares (dynamic
    sampling, dropped groups)."""
    if count == 1:
        return [list(train_idx)]
    mine = {(*places[j // n], j % n): j for j in train_idx}
    every = sorted(tuple(key) for key in parallel.gather_lists(list(mine)))
    return [[mine[every[i]] for i in run if every[i] in mine]
            for run in np.array_split(np.arange(len(every)), count)]


def update(model, optimizer, batch, adv, old, ref, args, step, sums, places):
    """Optimizer steps on this rollout batch. The paper's path (ppo_epochs = ppo_mini_batches = 1, no KL): one
    on-policy step, old log-probs = the current ones detached, so the PPO ratio is exactly 1, the clip never binds
    and the gradient is that of -w A log pi, w the TIS weight (--rollout_is; 1 where the engine and the trainer agree,
    and with --rollout_is off). More epochs or mini-batches, and k1, use the pre-pass's old log-probs; k3's KL enters
    the loss. Returns (mean loss, mean grad norm, optimizer steps taken, whether a step was non-finite); the
    means are None when no step was taken (0 would read as a zero gradient). places: mini_batches'."""
    device = model.lm_head.weight.device
    minis = mini_batches(batch.train_idx, places, args.samples_per_prompt, args.ppo_mini_batches)
    counts = parallel.all_reduce_numbers({f"{k}_{i}": v for i, m in enumerate(minis) for k, v in
                                          (("tok", sum(len(batch.responses[j]) for j in m)), ("seq", len(m)))})
    k3_in_loss = ref is not None and args.kl_estimator == "k3"
    norm_total, loss_total, updates, bad = 0.0, 0.0, 0, False
    bar = common.progress_bar(args.ppo_epochs * len(batch.train_idx), f"step {step} update", args.progress,
                              leave=False)
    model.train()
    for epoch in range(args.ppo_epochs):
        for mi, mini in enumerate(minis):
            total_tokens, total_seqs = counts[f"tok_{mi}"], counts[f"seq_{mi}"]
            if total_tokens == 0:
                continue  # nothing to learn from anywhere (e.g. every group dropped)
            lengths = [len(batch.prompts[j]) + len(batch.responses[j]) for j in mini]
            loss_sum = 0.0
            for mb in parallel.even_out(parallel.micro_batches(lengths, args.micro_batch_tokens)):
                if mb is None:  # this rank is done; join the others' collectives
                    idle_pass(model)
                    continue
                bar.update(len(mb))
                # each token's loss, in order: the surrogate of (ratio, A x DWA) [ppo / cispo / kl_cov] -> Clip-Cov's
                # cut -> x the TIS weight -> x the high-entropy mask -> + kl_coef k3 -> - entropy_coef H; then weighted
                # by --loss_agg's token weights and summed (backward per micro-batch, an optimizer step per mini-batch)
                js = [mini[i] for i in mb]
                lens = [len(batch.responses[j]) for j in js]
                lp, ent = response_logprobs(model, [batch.prompts[j] for j in js], [batch.responses[j] for j in js],
                                            args.temperature, args.logprob_chunk,
                                            with_entropy=True if args.entropy_coef else "detached")
                lp, ent = lp.float(), ent.float()
                a = torch.repeat_interleave(torch.tensor([adv[j] for j in js], device=device),
                                            torch.tensor(lens, device=device))
                # the main path: on-policy, ratio == 1 (see the docstring)
                old_lp = lp.detach() if not batch.need_old else torch.cat([old[j] for j in js])
                if args.adv_weight == "dwa":
                    a = a * dwa_weights(lp, old_lp, args.dwa_s, args.dwa_alpha)
                ratio_lp = lp if args.ratio_level == "token" else sequence_ratio_logp(lp, old_lp, lens)
                if args.policy_loss == "kl_cov":
                    tok_loss, clipped = kl_cov_loss(lp, old_lp, a, torch.cat([batch.by_cov[j] for j in js]),
                                                    args.kl_cov_coef)
                else:
                    surrogate = cispo_loss if args.policy_loss == "cispo" else ppo_clip_loss
                    tok_loss, clipped = surrogate(ratio_lp, old_lp, a, args.clip_low, args.clip_high)
                if args.policy_loss == "clip_cov":  # the drawn tokens' policy gradient cut (the normaliser keeps them)
                    tok_loss = tok_loss * ~torch.cat([batch.by_cov[j] for j in js])
                if args.rollout_is != "off":  # the engine drew these tokens: correct its mismatch with the trainer
                    sampler = sampler_logprobs(batch, js, device)
                    is_w, capped = rollout_is_weights(old_lp, sampler, lens, args.rollout_is, args.rollout_is_cap,
                                                      args.rollout_is_mode)
                    tok_loss = tok_loss * is_w
                    if epoch == 0:
                        sums["is_weight"] += is_w.sum().item()
                        sums["is_capped"] += capped.sum().item()
                        # k3 estimate of KL(sampler || trainer) from the sampler's own draws
                        sums["is_kl"] += kl_penalty(sampler, old_lp.detach(), "k3").sum().item()
                        sums["is_tokens"] += is_w.numel()
                if batch.high_entropy is not None:  # --entropy_top_frac: the forking tokens' policy gradient only
                    tok_loss = tok_loss * torch.cat([batch.high_entropy[j] for j in js]).to(tok_loss.dtype)
                if k3_in_loss:
                    kl = kl_penalty(lp, torch.cat([ref[j] for j in js]), "k3")
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
                if epoch == 0:  # (the first pass's, as kl and is_*: a later epoch's is of weights updated since)
                    sums["entropy"] += ent.detach().sum().item()
                    sums["entropy_pass_tokens"] += lp.numel()
                sums["clipped"] += clipped.sum().item()
                sums["train_tokens"] += sum(lengths[i] for i in mb)
                if not batch.need_old and epoch == 0:
                    add_logprob_gap(lp.detach(), batch, js, sums)
            loss_sum = parallel.all_reduce_numbers({"l": loss_sum})["l"]
            norm = ckpt.clip_grad_norm(model.parameters(), args.grad_clip)
            if not (math.isfinite(loss_sum) and math.isfinite(norm)):
                bad = True
                print0(f"warning: step {step}: non-finite loss {loss_sum} or grad norm {norm}; update skipped")
            else:
                optimizer.step()
                updates += 1
                norm_total += norm
                loss_total += loss_sum  # already summed over ranks
            optimizer.zero_grad(set_to_none=True)
    bar.close()
    model.eval()
    return (loss_total / updates if updates else None, norm_total / updates if updates else None, updates, bad)


def step_metrics(step, epoch, batch, sums, times, device, kl_logged):
    """The step's metrics over all ranks (sums of counts, maxima of times and memory); kl is None without a KL
    term, and in a step that trained no token (no KL was measured: 0 would read as 'the policy is the reference')."""
    rollouts, rewards = batch.rollouts, batch.rewards
    g = parallel.all_reduce_numbers({
        "reward": sum(rewards), "correct": sum(map(tasks.is_correct, rewards)), "seqs": len(rollouts),
        "groups": len(batch.zero_var), "zero_var": sum(batch.zero_var), "kept": sum(batch.trains),
        "resp_tokens": sum(s["length"] for s in rollouts),
        "truncated": sum(not s["finished"] for s in rollouts), "used": len(batch.train_idx), **sums})
    mx = parallel.all_reduce_numbers({
        "len_max": max((s["length"] for s in rollouts), default=0), **times,
        "mem_train_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0,
        # reserved includes the free blocks of the kept CUDA graphs' pool, which allocated memory does not show
        "mem_train_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else 0.0},
        op="max")
    seqs, pg_tokens = max(g["seqs"], 1), g["pg_tokens"]
    # per trained token; None in a step that trained none (all groups dropped): 0 would read as a collapsed policy
    return {"step": step, "epoch": epoch, "reward": g["reward"] / seqs, "acc": g["correct"] / seqs,
            "zero_var_frac": g["zero_var"] / max(g["groups"], 1), "len_mean": g["resp_tokens"] / seqs,
            "len_max": mx["len_max"], "truncated": g["truncated"] / seqs,
            "entropy": g["entropy"] / g["entropy_pass_tokens"] if g["entropy_pass_tokens"] else None,
            "kl": g["kl"] / g["kl_tokens"] if kl_logged and g["kl_tokens"] else None,
            "clip_frac": g["clipped"] / pg_tokens if pg_tokens and batch.clips else None,  # (kl_cov has no clip)
            "logprob_gap": g["gap"] / g["gap_tokens"] if g["gap_tokens"] else None, "train_seqs": int(g["used"]),
            **({"gen_batches": batch.gen_batches, "kept_frac": g["kept"] / max(g["groups"], 1)} if batch.dynamic
               else {}),
            **({"is_weight": g["is_weight"] / g["is_tokens"], "is_capped": g["is_capped"] / g["is_tokens"],
                "is_kl": g["is_kl"] / g["is_tokens"]} if g["is_tokens"] else {}),
            **({"overlong_penalty": g["overlong_penalty"] / seqs} if "overlong_penalty" in g else {}),
            **({"logp_adv_cov": batch.covariance, "cov_chosen": g["cov_chosen"] / g["cov_tokens"]
                if g["cov_tokens"] else None} if "cov_chosen" in g else {}),
            **({"entropy_floor": batch.entropy_floor, "entropy_kept": g["entropy_kept"] / g["entropy_tokens"]
                if g["entropy_tokens"] else None} if "entropy_kept" in g else {}),
            "gen_tok_s": g["resp_tokens"] / max(mx["gen_s"], 1e-9),
            "train_tok_s": g["train_tokens"] / max(mx["train_s"], 1e-9),
            **{k: mx[k] for k in ("gen_s", "score_s", "train_s", "gather_s", "mem_gen_gib", "mem_held_gib",
                                  "mem_train_gib", "mem_train_reserved_gib")},
            "graph_captures": int(mx["graph_captures"]), "capture_s": mx["capture_s"]}


def log_line(m, max_steps, cuda):
    return (f"step {m['step']}/{max_steps} | reward {m['reward']:.3f} acc {m['acc']:.3f} "
            f"zero_var {m['zero_var_frac']:.2f} "
            + (f"batches {m['gen_batches']} kept {m['kept_frac']:.2f} " if "gen_batches" in m else "")
            + f"| len {m['len_mean']:.0f}/{m['len_max']:.0f} trunc {m['truncated']:.2f} | "
            + (f"ent {m['entropy']:.3f} " if m["entropy"] is not None else "no token trained ")
            + (f"kl {m['kl']:.4f} " if m["kl"] is not None else "")
            + (f"cov {m['logp_adv_cov']:.4f} " if m.get("logp_adv_cov") is not None else "")
            + (f"clip {m['clip_frac']:.3f} " if m["clip_frac"] is not None else "")
            + (f"is {m['is_weight']:.3f} capped {m['is_capped']:.3f} " if "is_weight" in m else "")
            + (f"| gnorm {m['grad_norm']:.3f} " if m["grad_norm"] is not None else "| no update ")
            + f"lr {m['lr']:.2e} "
            f"| gen {m['gen_s']:.1f}s ({m['gen_tok_s']:.0f} tok/s) score {m['score_s']:.1f}s "
            f"train {m['train_s']:.1f}s ({m['train_tok_s']:.0f} tok/s)"
            + (f" | peak GiB gen {m['mem_gen_gib']:.1f} train {m['mem_train_gib']:.1f} "
               f"| graphs captured {m['graph_captures']} ({m['capture_s']:.1f}s)" if cuda else "")
            + (f" | val {m['val/acc']:.3f}" if "val/acc" in m else ""))


def check_settings(args):
    """Settings no run can use, refused with one line before any work."""
    if not args.model:
        raise UserError("--model is required (a Hugging Face checkpoint directory: the initial policy)")
    if args.test_data:  # (validation on the training prompts measures nothing held out)
        common.check_distinct_inputs([("--train_data", args.train_data), ("--test_data", args.test_data)])
    common.check_positive(args, "prompts_per_step", "samples_per_prompt", "max_response_tokens", "ppo_epochs",
                          "ppo_mini_batches", "micro_batch_tokens", "gen_batch_size", "val_batch_size",
                          "max_bad_steps", "logprob_chunk", "keep_last", "max_gen_batches", "save_every")
    common.check_non_negative(args, "epochs", "max_steps", "warmup_steps", "val_every", "val_limit", "kl_coef",
                              "val_max_response_tokens", "clip_low", "clip_high")
    common.check_optimizer(args)
    common.check_finite(args, "kl_coef", "entropy_coef", "dwa_alpha")  # (inf: every loss NaN)
    if not args.max_steps and not args.epochs:
        raise UserError("--epochs 0 with --max_steps 0: no step to run; give either")
    if args.clip_low >= 1 and args.policy_loss in ("ppo", "clip_cov"):  # (CISPO's weight: >= 1 means no floor)
        raise UserError(f"--clip_low {args.clip_low}: the ratio's floor 1 - clip_low must stay above 0")
    common.check_non_negative(args, "overlong_buffer", "overlong_penalty")
    common.check_finite(args, "overlong_penalty")
    if args.overlong_buffer > args.max_response_tokens:
        raise UserError(f"--overlong_buffer {args.overlong_buffer} > --max_response_tokens {args.max_response_tokens}: "
                        f"the punishment would start before the response does")
    for flag in ("dynamic_sampling", "drop_zero_variance_groups"):  # (with groups of one, either does nothing)
        if getattr(args, flag) and args.samples_per_prompt < 2:
            raise UserError(f"--{flag} needs --samples_per_prompt >= 2: a group of one has no reward variance")
    if args.temperature <= 0:
        raise UserError("--temperature must be > 0 for RL sampling (greedy rollouts have no variance to learn from)")
    common.check_sampling(args)  # (top_p: 0 would be greedy too)
    if not args.rollout_is_cap > 0:
        raise UserError(f"--rollout_is_cap must be > 0, got {args.rollout_is_cap}")
    if not 0 < args.entropy_top_frac <= 1:
        raise UserError(f"--entropy_top_frac {args.entropy_top_frac}: a fraction of the tokens in (0, 1] (1 = all)")
    if args.rollout_is != "off" and args.rollout_is_mode == "truncate" and args.rollout_is_cap < 1:
        print0(f"note: --rollout_is_cap {args.rollout_is_cap:g} < 1 truncates every weight below it, on-policy ones "
               f"(ratio 1) too: the whole gradient scaled down by up to that much (TIS caps at C >= 1, e.g. 2)")
    if args.rollout_is != "off" and args.rollout_is_mode == "mask" and not args.rollout_is_cap > 1:
        raise UserError(f"--rollout_is_mode mask keeps the ratios in [1/C, C]: --rollout_is_cap {args.rollout_is_cap} "
                        f"leaves that band empty or a single point, so next to nothing would train; give C > 1")
    if args.baseline == "loo" and args.samples_per_prompt < 2:
        raise UserError("--baseline loo needs --samples_per_prompt >= 2: a group of one has no other rewards")
    if args.std_normalize and args.std_scope == "batch" and args.samples_per_prompt < 2:
        raise UserError("--std_scope batch needs --samples_per_prompt >= 2: a group of one's advantage is its reward "
                        "(verl's rule), which no std divides; --std_scope tokens whitens over the batch")
    if not 0 < args.cov_frac <= 1:
        raise UserError(f"--cov_frac {args.cov_frac}: a fraction of the tokens in (0, 1]")
    if not args.clip_cov_low < args.clip_cov_high:
        raise UserError(f"--clip_cov_low {args.clip_cov_low} >= --clip_cov_high {args.clip_cov_high}: no token "
                        f"could be drawn")
    common.check_non_negative(args, "kl_cov_coef")
    common.check_finite(args, "kl_cov_coef")
    if args.policy_loss == "kl_cov" and args.ratio_level == "sequence":
        raise UserError("--policy_loss kl_cov is per token (its penalty is each token's |log-ratio|): give "
                        "--ratio_level token")
    if abs(args.dwa_s) > 2:
        raise UserError(f"--dwa_s {args.dwa_s}: |s| > 2 lets the DWA weight change the advantage's sign")


def note_inert_settings(args, parser, several_updates):
    """One note per setting given where it has no effect (most act only off-policy: several_updates per batch)."""
    if args.policy_loss == "kl_cov" and not several_updates:
        print0("note: --policy_loss kl_cov with one on-policy update per batch: its |log(pi / pi_old)| is 0 and has "
               "no gradient, so it trains as ppo (whose clip never binds on-policy); it acts with "
               "--ppo_mini_batches > 1 or --ppo_epochs > 1 (docs/grpo.md)")
    if args.baseline == "loo" and args.std_normalize and args.std_scope == "tokens":
        print0("note: --baseline loo with --std_scope tokens: no effect (the whitening over the batch's tokens divides "
               "its n / (n - 1) out again); RLOO has no std (--std_normalize false)")
    elif args.baseline == "loo" and args.std_normalize:
        print0("note: --baseline loo with --std_normalize true: GRPO's advantages times n / (n - 1); RLOO has no std "
               "(--std_normalize false)")
    through_ratio = [f"--{name} {getattr(args, name)}" for name, acts in (
        ("policy_loss", args.policy_loss == "cispo"), ("ratio_level", args.ratio_level == "sequence"),
        ("clip_low", args.clip_low != common.script_default(parser, "clip_low")),
        ("clip_high", args.clip_high != common.script_default(parser, "clip_high"))) if acts]
    if through_ratio and not several_updates:  # (kl_cov's and dwa's notes below)
        print0(f"note: {', '.join(through_ratio)} with one on-policy update per batch: the ratio pi / pi_old is 1, "
               f"which no clip band cuts and CISPO and GSPO leave as it is, so the update is the default's; they act "
               f"with --ppo_mini_batches > 1 or --ppo_epochs > 1 (docs/grpo.md)")
    if args.adv_weight == "dwa" and not several_updates:
        print0("note: --adv_weight dwa with one on-policy update per batch: KL to the old policy is 0, so w = 1 "
               "(no effect); it acts with --ppo_mini_batches > 1 or --ppo_epochs > 1")
    if args.ratio_level == "sequence" and args.loss_agg != "seq_mean_token_mean":
        print0(f"note: --ratio_level sequence with --loss_agg {args.loss_agg}: GSPO's ratio on another objective; "
               f"GSPO's own weighs each response alike (--loss_agg seq_mean_token_mean, which verl's GSPO forces)")
    if args.adv_weight == "dwa" and (args.dwa_s == 0 or args.dwa_alpha == 0):
        print0("note: --adv_weight dwa with --dwa_s 0 or --dwa_alpha 0: w = 1 (no effect)")
    for names, unused, switch in switched_settings(vars(args)):
        common.note_unused(args, parser, names, unused, switch)


# -----------------------------------------------------------------------------
# the run


def main(argv=None):
    parser = get_parser()
    args = common.parse_settings(parser, argv)
    check_settings(args)
    n = args.samples_per_prompt

    # ---- setup: distributed, precision, task, data
    rank, world, device = parallel.dist_setup(args)
    dtype = parse_dtype(args.dtype, device, training=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    task = tasks.get_task(args.task)
    tokenizer = load_tokenizer(args.model)
    if args.kl_coef > 0 and args.ref_model:  # the reference must read the policy's token ids as the same tokens
        tasks.check_same_tokenizer(args.model, args.ref_model, "--model", "--ref_model", "the KL to the reference "
                                   "compares their log-probs of the same token ids")
    train_records = tasks.load_records(task, args.task, args.train_data, tokenizer, args.template)
    if args.test_data and not os.path.exists(args.test_data) and not args.test_data.startswith("hf:"):
        default = " (the default)" if args.test_data == common.script_default(parser, "test_data") else ""
        raise UserError(f"--test_data {args.test_data}{default}: not found; give --test_data FILE, or --test_data '' "
                        f"for no validation")
    test_records = (tasks.load_records(task, args.task, args.test_data, tokenizer, args.template)
                    if args.test_data else [])  # '' = no validation; an empty file is an error
    test_records, val_subset = tasks.stratified_subset(test_records, args.val_limit, task.DIFFICULTY, args.seed)
    # tokenise every training prompt once: lengths for the filter and the ids for the training forward
    prompt_ids = tasks.task_prompt_ids(tokenizer, task, train_records, args.template)
    keep = [i for i, ids in enumerate(prompt_ids) if len(ids) <= args.max_prompt_tokens]
    if len(keep) < len(train_records):
        print0(f"note: dropped {len(train_records) - len(keep)} of {len(train_records)} training prompts longer than "
               f"--max_prompt_tokens {args.max_prompt_tokens}")
    train_records, prompt_ids = [train_records[i] for i in keep], [prompt_ids[i] for i in keep]
    test_ids = tasks.task_prompt_ids(tokenizer, task, test_records, args.template) if test_records else []
    tasks.warn_held_out_overlap(map(tuple, prompt_ids), map(tuple, test_ids), f"--train_data {args.train_data}",
                                f"--test_data {args.test_data}")  # (as rendered: ids of two sources may collide)
    train_digest, test_digest = common.data_digest(train_records), common.data_digest(test_records)
    parallel.same_on_every_rank([train_digest, test_digest], f"{args.train_data}, {args.test_data}")
    val_new = args.val_max_response_tokens or args.max_response_tokens
    if len(train_records) < args.prompts_per_step:
        raise UserError(f"{args.train_data}: {len(train_records)} usable prompts, fewer than --prompts_per_step "
                        f"{args.prompts_per_step}")
    steps_per_epoch = len(train_records) // args.prompts_per_step
    max_steps = args.max_steps or args.epochs * steps_per_epoch

    # ---- model: the policy, sharded (fp32 weights, `dtype` compute), its optimizer, the reference policy
    checkpoint = ckpt.resume_checkpoint(args.out_dir, args.resume, needs_shard=lambda state: state["step"] < max_steps)
    start_step, state, init_path = 0, {}, args.model
    identity = {k: getattr(args, k) for k in RUN_IDENTITY} | {"num_prompts": len(train_records),
                                                              "train_data_digest": train_digest,
                                                              **parallel.compute_identity(dtype, device)}
    if args.dynamic_sampling:  # (absent when off, so the runs of earlier versions resume)
        identity |= {"dynamic_sampling": True, "max_gen_batches": args.max_gen_batches}
    # the files of --model (the tokenizer; the KL reference without --ref_model) and of --ref_model: rebuilt under the
    # same path (an SFT stage re-run into its final/), a resume went on with another tokenizer or reference
    identity |= {"model_files": checkpoint_stamps(args.model, tasks.TOKENIZER_FILES)}
    if args.kl_coef > 0 and args.ref_model:
        identity |= {"ref_model_files": checkpoint_stamps(args.ref_model, tasks.TOKENIZER_FILES)}
    identity |= {"rollout_seeds": "by_place"}  # rollout(): the same rollouts at any world size
    # what validation measures where the run validates (its records after --val_limit, and their response cap): a
    # resume on another test set would log two measures as one curve (compared where the run and the resume validate)
    identity |= {"validation": [test_digest, val_new] if test_records and args.val_every else None}
    seeds_by_rank = False
    # the steps whose weights outlive --keep_last: this run's and every earlier attempt's (an extended run's later
    # saves removed the weights the run it extends was told to keep), saved with each checkpoint
    keep_steps = sorted(set(args.keep_steps))
    if checkpoint is not None:
        start_step, init_path, state, _ = checkpoint  # (its shard: below, if the run goes on)
        if "rollout_seeds" not in state.get("identity", {}):  # begun before 2026-12-06: it goes on sampling as it did
            seeds_by_rank, identity = True, {k: v for k, v in identity.items() if k != "rollout_seeds"}
        saved = {k: v for k, v in state.get("settings", {}).items() if k in RUN_OBJECTIVE}
        if saved:  # settings this run's version did not record yet: as that version ran
            saved = {**{k: v for k, v in EARLIER_OBJECTIVE.items() if k not in saved}, **saved}
            unused = [{n for names, off, _ in switched_settings(vars(args) | run) if off for n in names}
                      for run in ({}, saved)]  # (now, and in the run: not compared where both leave it unused)
            saved = {k: v for k, v in saved.items() if k not in unused[0] & unused[1]}
        if "compute_dtype" not in state.get("identity", {}):  # an earlier version's run: its --dtype text, as it was
            saved |= {k: v for k, v in state.get("settings", {}).items() if k == "dtype"}
        # one refusal naming every difference: the identity, then the objective (as its version recorded it); a
        # finished run's compute is not compared (nothing is left to compute: it may be re-run on other hardware)
        finished = start_step >= max_steps
        if not finished:  # the rank count first: at another one the run cannot go on, whatever else differs
            ckpt.require_world_size(checkpoint)
        parallel.on_rank0(lambda: ckpt.check_run_identity(  # (rank 0 decides: it looks at files, samefile)
            args.out_dir, state.get("identity", {}) | saved, identity | {k: getattr(args, k) for k in saved},
            recorded_since=("train_data_digest", "model_files", "ref_model_files", *parallel.COMPUTE_KEYS),
            ignore=parallel.COMPUTE_KEYS if finished else (), when_both=("validation",)))
        # the keep rules of the prune at the resume (ckpt.prune_at_resume): the saving run's, so that a finished run
        # re-run with other flags removes nothing, and the weights of this run's --keep_steps kept too
        saved_by = state.get("settings", {})
        keep_steps = sorted(set(saved_by.get("keep_steps", [])) | set(args.keep_steps))
        keep_rules = (saved_by.get("keep_last", args.keep_last), keep_steps)
        print0(f"resuming from {init_path} (step {start_step})")
        if finished:  # (at any number of ranks)
            ckpt.prune_at_resume(args.out_dir, start_step, *keep_rules)
            print0(f"{args.out_dir}: already at step {start_step} >= --max_steps {max_steps}; nothing to do")
            parallel.dist_cleanup()
            return 0
        train_shard = ckpt.require_shard(checkpoint)

    def check_keep_steps():  # a step this run (or a longer one) saves after its start, or one saved already
        for keep in args.keep_steps:
            if keep < 1 or not (keep > start_step and (keep % args.save_every == 0 or keep == max_steps)
                                or keep <= start_step and os.path.isdir(ckpt.checkpoint_dir(args.out_dir, keep))):
                raise UserError(f"--keep_steps {keep}: that step is never saved (this run saves every --save_every "
                                f"{args.save_every} steps after step {start_step} and its last, {max_steps}, and has "
                                f"no such checkpoint); keep one of those")
    parallel.on_rank0(check_keep_steps)  # (rank 0 decides: it looks at files)
    model = load_model(init_path, dtype=torch.float32, device=device)  # sharded below, once its recompute is set
    tasks.check_prompts_fit(prompt_ids, train_records, args.max_response_tokens, model.config.max_position_embeddings,
                            args.train_data)
    if args.kl_coef > 0 and args.ref_model:  # (the reference scores the same rollouts)
        tasks.check_prompts_fit(prompt_ids, train_records, args.max_response_tokens,
                                read_config(args.ref_model).max_position_embeddings,
                                f"{args.train_data} with --ref_model {args.ref_model}")
    # --keep_engine: the engine's buffers (slots, KV-cache columns, new tokens), sized once for the largest rollout
    # call and validation call of the run, so they never regrow (which would drop the CUDA graphs captured on them)
    per_rank = -(-args.prompts_per_step // world)  # prompts of this rank's share, at most
    reserve = rollout_reserve(args, per_rank, max(map(len, prompt_ids)))
    if test_records and args.val_every:  # now, not at the first validation, steps after the last checkpoint
        val_flag = "--val_max_response_tokens" if args.val_max_response_tokens else "--max_response_tokens"
        tasks.check_prompts_fit(test_ids, test_records, val_new, model.config.max_position_embeddings,
                                args.test_data, val_flag)
        val_rows = min(args.val_batch_size, -(-len(test_records) // world))
        reserve = tuple(map(max, reserve, (val_rows, max(map(len, test_ids)) + val_new, val_new)))
    gpu_bytes = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    # the KL reference's shards, of its own size (a --ref_model may be larger than the policy)
    ref_bytes = (gpu_memory.reference_bytes(read_config(args.ref_model) if args.ref_model else model.config, world)
                 if args.kl_coef > 0 else 0)
    why = recompute_setting(args, model.config, world, per_rank, max(map(len, prompt_ids)), reserve, dtype, ref_bytes,
                            gpu_bytes)
    if why:
        print0(why)
    # what each checkpoint records: the settings as the run resolved them (--checkpoint_every auto), the kept steps
    # of every attempt
    run_settings = vars(args) | {"keep_steps": keep_steps}
    if state:  # (a finished run has returned)
        ckpt.note_changed_settings(state.get("settings"), run_settings, f"step {start_step} was saved")
    model = parallel.prepare_training(model, dtype, args)
    optimizer = ckpt.make_optimizer(model.parameters(), lr=args.lr, betas=(args.beta1, args.beta2),
                                    weight_decay=args.weight_decay, eight_bit=args.adam_8bit)
    if checkpoint is not None:
        ckpt.load_local_train_state(model, optimizer, train_shard)
    bad_steps_total, bad_streak = state.get("bad_steps_total", 0), state.get("bad_streak", 0)
    prompt_batches = state.get("prompt_batches", start_step)  # the data order's batches drawn so far: one a step,
    # or more with --dynamic_sampling
    # the optional branch: several updates per rollout batch (PPO ratio), a KL to a frozen reference
    ref_model = None
    if args.kl_coef > 0:
        ref_model = shard_model(load_model(args.ref_model or args.model, dtype=torch.float32, device=device), dtype)
        ref_model.requires_grad_(False)
    several_updates = args.ppo_epochs * args.ppo_mini_batches > 1
    top_entropy = args.entropy_top_frac < 1
    by_covariance = args.policy_loss in COVARIANCE_LOSSES
    kl_in_reward = ref_model is not None and args.kl_estimator == "k1"
    note_inert_settings(args, parser, several_updates)

    # ---- logging
    if checkpoint is not None:  # (accepted: nothing above refused it)
        ckpt.prune_at_resume(args.out_dir, start_step, *keep_rules)
    log_metrics = ckpt.metrics_log(args.out_dir, start_step, args.wandb_project, vars(args))

    def remove_later_logs():  # as the metrics after it: a killed attempt's rollout logs, which lim_select.py would read
        for s, path in tasks.rollout_logs(args.out_dir).items():
            if s > start_step:
                try:
                    os.remove(path)
                except OSError as e:
                    raise UserError(f"{path}: a killed attempt's rollout log, which this run must remove, cannot be "
                                    f"removed ({e.strerror}); remove it and run again")
    parallel.write_on_rank0(remove_later_logs, args.out_dir)  # (an error stops every rank, not rank 0 alone)
    print0(f"train_rl: {len(train_records)} prompts, {steps_per_epoch} steps/epoch, "
           f"steps {start_step + 1}..{max_steps}, {world} rank(s) on {device.type}, "
           f"{args.prompts_per_step}x{n} rollouts/step, "
           f"compute {str(dtype).replace('torch.', '')}, fp32 weights sharded over {world} rank(s), "
           f"{model.num_params() / 1e6:.1f}M params"
           + (f"; validation on {val_subset} test records" if test_records else ""))
    keep_engine, why = keep_engine_setting(args, model.config, world, per_rank, max(map(len, prompt_ids)), reserve,
                                           dtype, ref_bytes, gpu_bytes)
    print0(f"generation's weight copy, KV cache and graphs: {'kept through' if keep_engine else 'freed before'} "
           f"each update ({why})")
    reserve = reserve if keep_engine else None  # freed each step: each call allocates what it needs, no more
    val_settings = dict(max_new_tokens=val_new, template=args.template, batch_size=args.val_batch_size,
                        progress=args.progress, reserve=reserve)
    if args.val_before_train and test_records and args.val_every and start_step == 0:
        m = {"step": 0, **validate_policy(model, dtype, tokenizer, task, test_records, 0, val_settings,
                                          keep_engine)}
        print0(" | ".join(f"{k} {v:.3f}" if k != "step" else "step 0" for k, v in m.items()))
        log_metrics(m)

    # ---- the loop
    exit_code = 0
    for step in range(start_step + 1, max_steps + 1):
        t_step = time.time()
        lr = lr_at(step, args.lr, args.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # 1. this rank's share of the step's prompts, n rollouts each (record by record, n samples each); with
        # --dynamic_sampling further prompt batches until enough groups have a signal
        mine, rollouts, trains, epochs, places, gen_batches, times = rollout(
            model, dtype, tokenizer, task, train_records, args, step, prompt_batches, rank, world, keep_engine, reserve,
            seeds_by_rank)
        prompt_batches += gen_batches
        records = [train_records[i] for i in mine]

        # 2. which rollouts train: not the groups dynamic sampling left out, nor (--drop_zero_variance_groups) the
        # groups with no signal, nor (--mask_truncated) cut-off responses; by default a no-signal group stays (its
        # advantage 0)
        t_train = time.time()
        rewards = [s["reward"] for s in rollouts]
        zero_var = zero_variance(rewards, n)
        batch = SimpleNamespace(
            rollouts=rollouts, rewards=rewards, zero_var=zero_var, trains=trains, gen_batches=gen_batches,
            dynamic=args.dynamic_sampling, need_old=several_updates or kl_in_reward, high_entropy=None, by_cov=None,
            clips=args.policy_loss != "kl_cov",
            prompts=[prompt_ids[mine[j // n]] for j in range(len(rollouts))], responses=[s["tokens"] for s in rollouts],
            train_idx=[j for j, s in enumerate(rollouts) if s["length"] > 0 and trains[j // n]
                       and not (args.drop_zero_variance_groups and zero_var[j // n])
                       and not (args.mask_truncated and not s["finished"])])
        sums = dict.fromkeys(("pg_tokens", "entropy", "entropy_pass_tokens", "kl", "kl_tokens", "clipped", "gap",
                              "gap_tokens", "train_tokens", "is_weight", "is_capped", "is_kl", "is_tokens"), 0.0)

        # 3. the optional branch: a no-grad pre-pass for old log-probs (several updates, k1, Clip-/KL-Cov's
        # covariance), reference log-probs and entropies (--entropy_top_frac); k1 needs every response of a group that
        # may train, since each one's shaped reward enters its group's advantages
        old, ref, entropy = {}, None, {}
        if batch.need_old or ref_model is not None or top_entropy or by_covariance:
            pre_idx = ([j for j, s in enumerate(rollouts) if s["length"] > 0 and trains[j // n]] if kl_in_reward
                       else batch.train_idx)
            old, ref, entropy = pre_pass(model, ref_model, batch, pre_idx, args, sums, top_entropy, by_covariance)
        if top_entropy:
            mark_high_entropy_tokens(batch, entropy, args.entropy_top_frac, sums, device)

        # 4. advantages within each group of n (k1: less kl_coef x the response's summed log-ratio, group-centred)
        seq_kl = None
        if kl_in_reward:
            seq_kl, train_set = [0.0] * len(rollouts), set(batch.train_idx)
            for j in pre_idx:
                seq_kl[j] = float(kl_penalty(old[j], ref[j], "k1").sum())
                if j in train_set:
                    sums["kl"] += seq_kl[j]
                    sums["kl_tokens"] += len(batch.responses[j])
        if args.overlong_buffer:  # DAPO's soft overlong punishment: the advantages' rewards, not the task's
            # only in groups with a task signal: in one of equal rewards a penalty of -0.001 alone would be
            # standardised into a full-size advantage (DAPO's accuracy filter drops such groups)
            penalty = overlong_penalty([s["length"] for s in rollouts], args.max_response_tokens, args.overlong_buffer,
                                       args.overlong_penalty)
            penalty = [0.0 if zero_var[j // n] else p for j, p in enumerate(penalty)]
            sums["overlong_penalty"] = sum(penalty)  # (logged: the mean over the step's rollouts)
            rewards = [r + p for r, p in zip(rewards, penalty)]
        # --std_scope batch / tokens: over every rollout of the groups the step keeps, on every rank (as TRL's:
        # truncated and zero-variance ones too, so a group that varies through a rollout --mask_truncated leaves out
        # still does)
        scope = args.std_scope if args.std_normalize else "group"
        in_step = [j for j in range(len(rollouts)) if trains[j // n]]
        scale = batch_moments([rewards[j] for j in in_step])[1] if scope == "batch" else None
        adv = group_advantages(rewards, n, args.std_normalize and scope != "tokens", seq_kl, args.kl_coef,
                               batch_std=scale, baseline=args.baseline)
        if scope == "tokens":  # REINFORCE++-baseline: the group-centred advantages whitened over the batch's tokens
            adv = whiten(adv, *batch_moments([float(adv[j]) for j in in_step],
                                             [rollouts[j]["length"] for j in in_step]))
        adv = adv.tolist()
        if by_covariance:
            mark_covariance_tokens(batch, old, adv, places, args, step, sums, device)

        # 5. the update
        loss, grad_norm, updates, bad = update(model, optimizer, batch, adv, old, ref, args, step, sums, places)
        bad_steps_total += bad
        bad_streak = bad_streak + 1 if bad else 0
        times["train_s"] = time.time() - t_train

        # 6. metrics and the rollout log (rank 0 gathers every rank's rollouts)
        m = step_metrics(step, epochs[0] if epochs else 0, batch, sums, times, device, ref_model is not None)
        m.update(loss=loss, grad_norm=grad_norm, lr=lr, updates=updates, bad_steps=bad_steps_total)
        if args.log_rollouts:
            train_set = set(batch.train_idx)
            everything = parallel.gather_lists([
                [[*places[j // n], s["sample"]],  # in the global batch's order (set B reads the log in order)
                 {"id": s["id"], "prompt": s["prompt"], "response": s["response"], "reward": s["reward"],
                  "finished": s["finished"], "length": s["length"], "step": step, "epoch": epochs[j // n],
                  "sample": s["sample"], "advantage": adv[j], "trained": j in train_set,
                  **({task.DIFFICULTY: records[j // n].get(task.DIFFICULTY)} if task.DIFFICULTY else {}),
                  "rank": rank}]
                for j, s in enumerate(rollouts)], key=None if seeds_by_rank else lambda x: x[0])
            everything = [row for _, row in everything]
            parallel.write_on_rank0(lambda: common.write_jsonl(tasks.rollout_log_path(args.out_dir, step), everything),
                                    args.out_dir)

        # 7. validation, the step's log line, then the checkpoint (then only the newest --keep_last stay): logged
        # first, so a kill after the save cannot lose the line (a resume from an older checkpoint rewrites it)
        if test_records and args.val_every and (step % args.val_every == 0 or step == max_steps):
            m.update(validate_policy(model, dtype, tokenizer, task, test_records, step, val_settings,
                                     keep_engine))
        m["step_s"] = time.time() - t_step
        log_metrics(m)
        print0(log_line(m, max_steps, device.type == "cuda"))
        stop = bad_streak >= args.max_bad_steps
        if not stop and (step % args.save_every == 0 or step == max_steps):
            ckpt.save_checkpoint(args.out_dir, step, model, tokenizer, optimizer,
                                 {"bad_steps_total": bad_steps_total, "bad_streak": bad_streak, "identity": identity,
                                  "prompt_batches": prompt_batches, "settings": run_settings},
                                 dtype, args.keep_last, keep_steps)
        if stop:
            print0(f"error: {bad_streak} consecutive steps with non-finite loss or gradients; stopping. "
                   f"The last good checkpoint is kept in {args.out_dir}")
            exit_code = 1
            break

    engine.release()
    log_metrics.finish()
    parallel.dist_cleanup()
    return exit_code


if __name__ == "__main__":
    common.run_main(main)
