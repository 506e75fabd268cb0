# tiny: the whole study on a CPU in minutes (2 cores; no download). Sourced by reproduce.sh.
# A ~0.9M-parameter Qwen2-architecture model and a ~850-token BPE tokenizer are built here and the model is
# pre-trained from scratch on K&K traces (plain Question/Answer format) to be the "base".
# K&K with 2-3 people; the paper's recipe scaled down (sizes, steps) and its learning rates scaled up
# (a 1M model from scratch needs ~100x the 1.5B model's lr).
# STATUS: does not yet meet the learning bar. Measured (1 core): the cold start writes well-formed, finished
# traces (none truncated at 420 tokens) but 0% correct: the model has not learned to copy names from the
# question (name tokens cost ~4 nats = uniform over the 51 names, after pre-training and SFT), so GRPO sees
# no reward. See the notes of the tiny-preset tuning report.
OUT=${OUT:-runs/tiny}
DATA=${DATA:-$OUT/data}
DEVICES=1; DEVICE_KIND=cpu
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # the preset's machine: 2 CPU cores
LAUNCH=python
TASK=kk; TASK_SCRIPT=kk_data.py
TRAIN=$DATA/train.jsonl; TEST=$DATA/test.jsonl; SFT_SPLIT=$DATA/sft.jsonl
# test: 50 puzzles per people count 2-3 (teacher traces: median 124 / 186 tokens, longest 232 / 402);
# RL train: people 2-3 (2-people puzzles are few: ~260 exist);
# teacher SFT pool ("1K" in the paper): 100 + 300 of 2-3 people
DATA_CMD="python kk_data.py --out_dir $DATA --test_people 2-3 --test_per_people 50 \
--train_people 2-3 --train_per_people 100,2000 --sft_people 2-3 --sft_per_people 100,300"

TINY_BASE=1
# pre-training: ~3,150 trace documents (~1.0M tokens); batch 8 reaches loss 0.52 where batch 32 (same tokens,
# same time, ~200 s on 1 core) stops at 0.70
BASE_TEXT_ARGS="--people 2-3 --per_people 150,3000 --text_format trace --vocab_size 1024"
PRETRAIN_ARGS="--tiny_hidden_size 128 --tiny_layers 4 --tiny_heads 4 --tiny_kv_heads 2 --tiny_context 1024 \
--max_length 1024 --epochs 1 --global_batch 8 --lr 2e-3 --warmup_ratio 0.03 --min_lr_ratio 0.1 \
--loss_reduction token_mean --micro_batch_tokens 4096 --save_every 50 --progress false"

# cold-start SFT (and re-distillation, same settings): paper's recipe (2 epochs, cosine, seq_mean) at lr 1e-3
SFT_ARGS="--epochs 2 --global_batch 8 --lr 1e-3 --max_length 1024 --micro_batch_tokens 4096 --save_every 20 --progress false"

# GRPO: the paper's loss and optimizer (betas 0.5/0.999, constant lr after warm-up, no KL), 16 prompts x 8
RL_STEPS=30
RL_ARGS="--prompts_per_step 8 --group_size 8 --temperature 0.7 --max_response_tokens 420 --lr 1e-4 \
--warmup_steps 2 --gradient_checkpointing false --micro_batch_tokens 4096 --gen_batch_size 16 \
--val_every 10 --val_limit 60 --val_batch_size 60 --save_every 10 --progress false"

# re-distillation sets: A greedy on the SFT prompts; B correct rollouts of the last 10 RL steps
SAMPLE_ARGS="--max_new_tokens 420 --batch_size 100 --progress false"
B_STEPS="$RL_STEPS,$((RL_STEPS - 10))-$((RL_STEPS - 1))"  # paper: 125,115-124 (last step first)
B_SAMPLES=400                                             # as many as the teacher set

EVAL_ARGS="--max_new_tokens 420 --batch_size 120 --progress false"
EFFECT_ARGS="--num_eval_prompts 60 --k 8 --max_new_tokens 420 --max_length 1024 --exact true --proj_dim 0 \
--gen_batch_size 60 --micro_batch_tokens 4096 --progress false --log_every 250"
