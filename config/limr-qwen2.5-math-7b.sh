# limr-qwen2.5-math-7b: LIMR's own setting (arXiv 2502.11886; ../shared/research/limr_sparse.md section A) with our
# scripts, and only that (LIMR_ONLY=1: no SFT, no re-distillation study).
#   GPUS=8 MODEL_DIR=/models/Qwen2.5-Math-7B bash reproduce.sh limr-qwen2.5-math-7b      (--dry-run prints it all)
# Needs a local Qwen/Qwen2.5-Math-7B: huggingface-cli download Qwen/Qwen2.5-Math-7B --local-dir $MODEL_DIR
# As theirs: RL from the base on MATH's 8.5K level 3-5 prompts (the pool of their math.8k.json; 8,519 after 2 empty
# answers and 2 duplicates), a probe of 21 epochs x 8 steps of 1,024 prompts x 8 rollouts at T 1.2 (drop_last: each
# epoch leaves ~327 prompts out), selection at score >= 0.6, RL on LIM and on RAND from the base, the chat template
# with "Please reason step by step, and put your final answer within \boxed{}.", actor lr 5e-7, Adam betas
# (0.9, 0.95), grad clip 1, KL 0.01 (k1), 8,192 samples per step used once in 32 updates of 256, prompts up to 1,024
# and responses up to 3,072 tokens; evaluation on MATH500 greedy and AIME24 / AMC23 with 4 samples at T 0.4, top-p
# 0.95 (their eval/config.json).
# Where it differs from theirs:
#  - the algorithm: our GRPO (advantages normalised within each prompt's 8 rollouts, no critic) against their PPO with
#    a critic initialised from the same model (GAE, lambda 0.95, critic lr 9e-6, value clip 0.2, --normalize_reward);
#    the KL (--kl_coef 0.01 --kl_estimator k1) takes 0.01 x each response's summed k1, centred in its group, off the
#    advantage here, where OpenRLHF puts k1 x 0.01 into the per-token reward (docs/grpo.md); the loss is their
#    per-sequence token mean (seq_mean_token_mean);
#  - the reward: 1 for a correct boxed answer that ended with EOS, else 0 (math_data.score), against their +1 correct,
#    -0.5 wrong but well-formed, -1 for a format error (truncated, no or 5+ \boxed, garbled, repetitive);
#  - no warm-up: ours warms up per RL step, and their 10 warm-up updates are a third of the first step's 32;
#  - truncated importance sampling against the engine's log-probs (train_rl's --rollout_is token, cap 2) is on, as in
#    every preset: the identity where sampler and trainer agree; OpenRLHF corrected no such mismatch;
#  - the step they report is unknown (their curves run to ~120 steps): FULL, LIM and RAND are compared at step 120
#    here, FULL being the probe at that step;
#  - MATH500 is evaluated greedy with 3,072 new tokens; there and on AIME24 / AMC23 a truncated answer scores 0
#    (eval.py's default; how their evaluation scored one is not stated).
source config/qwen2.5-1.5b.inc  # the launcher and GPU settings (the 1.5B base and GRPO settings are replaced below)
BASE_HUB_NAME=Qwen/Qwen2.5-Math-7B
BASE=${MODEL_DIR:-models/Qwen2.5-Math-7B}
OUT=${OUT:-runs/limr-qwen2.5-math-7b}
DATA=${DATA:-$OUT/data}  # (a study's own: a DATA shared by studies of other pools is rewritten under the
# other's done/data marker, which does not see it)
TASK=math; TASK_SCRIPT=math_data.py
TRAIN=$DATA/rl_train.jsonl; TEST=$DATA/test.jsonl
# the whole 8.5K pool for RL (no SFT split); test = MATH500
DATA_CMD="python math_data.py --out_dir $DATA --train_pool ${MATH_POOL:-../shared/data/math/math_train_8k.jsonl} \
--test ${MATH_TEST:-../shared/data/math/math500.jsonl} --n_sft_train 0 --n_sft_val 0"

LIMR_ONLY=1
LIMR_INIT=$BASE
LIMR_POOL=$TRAIN
LIMR_PROBE_STEPS=168  # 21 epochs x 8 steps (8,519 // 1,024)
LIMR_STEPS=120
LIMR_SAVE_EVERY=24    # divides 120 and 168
LIMR_SEEDS=${LIMR_SEEDS:-"1234"}
LIMR_RL_ARGS="--prompts_per_step 1024 --samples_per_prompt 8 --temperature 1.2 --max_prompt_tokens 1024 --max_response_tokens 3072 \
--template chat --lr 5e-7 --warmup_steps 0 --beta1 0.9 --beta2 0.95 --weight_decay 0 --grad_clip 1.0 --ppo_epochs 1 \
--ppo_mini_batches 32 --clip_low 0.2 --clip_high 0.2 --kl_coef 0.01 --kl_estimator k1 --entropy_coef 0 \
--loss_agg seq_mean_token_mean --dtype bfloat16 --gradient_checkpointing true --micro_batch_tokens 30000 --val_every 0"
LIMR_SELECT_ARGS="--threshold 0.6 --epochs 21"
LIMR_EVALS=(
  "--splits $TEST --split_names math500 --temperature 0 --samples_per_prompt 1 --max_response_tokens 3072"
  "--splits ${AIME24:-../shared/data/math/aime24.jsonl} ${AMC23:-../shared/data/math/amc23.jsonl} --split_names aime24 amc23 \
--samples_per_prompt 4 --temperature 0.4 --top_p 0.95 --pass_k 1 4 --max_response_tokens 3072"
)
