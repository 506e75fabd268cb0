# kk-qwen2.5-1.5b: the paper's K&K runs (paper.md sections 3.1, 4.1, 7, 8, 9) on one GPU box.
#   GPUS=8 MODEL_DIR=/models/Qwen2.5-1.5B bash reproduce.sh kk-qwen2.5-1.5b
# Needs a local Qwen/Qwen2.5-1.5B (BASE): huggingface-cli download Qwen/Qwen2.5-1.5B --local-dir $MODEL_DIR
# Teacher: the official K&K step-by-step trace (the paper's short CoT; its long-CoT teacher, DeepSeek-R1
# traces, is an API run we cannot repeat offline). Batch sizes are global: the same on any GPU count.
GPUS=${GPUS:-8}
OUT=${OUT:-runs/kk-qwen2.5-1.5b}
DATA=${DATA:-data/kk}
BASE_HUB_NAME=Qwen/Qwen2.5-1.5B
BASE=${MODEL_DIR:-models/Qwen2.5-1.5B}
DEVICES=$GPUS; DEVICE_KIND=gpu
LAUNCH="torchrun --standalone --nproc_per_node=$GPUS"
TASK=kk; TASK_SCRIPT=kk_data.py
TRAIN=$DATA/train.jsonl; TEST=$DATA/test.jsonl; SFT_SPLIT=$DATA/sft.jsonl
# the paper's splits: RL train people 3-7 x 2000, test people 4-8 x 100 (the official test puzzles),
# SFT pool people 2 x 200 + 3 x 800
DATA_CMD="python kk_data.py --out_dir $DATA --train_people 3-7 --train_per_people 2000 --test_people 4-8 \
--test_per_people 100 --sft_people 2-3 --sft_per_people 200,800"

# SFT (section 7): AdamW lr 1e-5, cosine to 0, no warm-up, 2 epochs, global batch 64 (K&K long CoT), seq-mean loss
SFT_ARGS="--epochs 2 --global_batch 64 --lr 1e-5 --max_length 5000 --gradient_checkpointing --bf16 --save_every 0"

# GRPO (section 8): 128 prompts x 8 rollouts at T=0.7, lr 5e-6 after 8 warm-up steps, betas (0.5, 0.999),
# wd 0.01, clip 0.2, no KL/entropy, one optimizer step per RL step, 4096 response tokens; validation every
# 5 steps (greedy, full test set), checkpoint every 25. The paper re-distils from step 125.
RL_STEPS=125
RL_ARGS="--prompts_per_step 128 --group_size 8 --temperature 0.7 --max_prompt_tokens 1024 --max_response_tokens 4096 \
--lr 5e-6 --warmup_steps 8 --beta1 0.5 --beta2 0.999 --weight_decay 0.01 --grad_clip 1.0 --clip_low 0.2 --clip_high 0.2 \
--kl_coef 0 --entropy_coef 0 --ppo_epochs 1 --ppo_mini_batches 1 --loss_agg token_mean --dtype bfloat16 \
--gradient_checkpointing true --micro_batch_tokens 30000 --val_every 5 --save_every 25"

# re-distillation sets (section 3.1): A greedy on the SFT prompts (max 4096 tokens); B correct rollouts of
# steps 125,115-124 (last first), one per puzzle, seed-0 shuffle, first 1000
SAMPLE_ARGS="--max_new_tokens 4096"
B_STEPS="125,115-124"
B_SAMPLES=1000

# evaluation (section 9): greedy, one sample, 4096 new tokens, accuracy per number of people
EVAL_ARGS="--max_new_tokens 4096 --temperature 0 --num_samples 1"
# sample effect: J over 100 test prompts x 8 rollouts at T=0.7; CountSketch projection (a 1.5B gradient)
EFFECT_ARGS="--num_eval_prompts 100 --k 8 --temperature 0.7 --max_new_tokens 4096 --max_length 5000 --proj_dim 65536 \
--grad_checkpointing true"
