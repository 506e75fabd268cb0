# math-qwen2.5-1.5b: the paper's MATH runs (paper.md sections 3.2, 4.2, 7, 8, 9) on one GPU box.
#   GPUS=8 MODEL_DIR=/models/Qwen2.5-1.5B bash reproduce.sh math-qwen2.5-1.5b
# Needs a local Qwen/Qwen2.5-1.5B (BASE): huggingface-cli download Qwen/Qwen2.5-1.5B --local-dir $MODEL_DIR
# and the MATH data: MATH_POOL / MATH_TEST files. Only PRM800K's math_splits train/test jsonl give the paper's splits
# (a 12,000-problem pool, MATH-500 as the test); a Hendrycks directory (its 7,500 train, 5,000 test) or
# MATH_DATA_ARGS="--hub true" (Hendrycks' 7,500 train, where a network exists; `pip install datasets`) run the study
# on other splits.
# Teacher: the MATH reference solutions (the paper's short CoT; its long-CoT teacher is DeepSeek-R1).
source config/qwen2.5-1.5b.inc  # base model, launcher, GRPO/sampling/eval/sample-effect settings
OUT=${OUT:-runs/math-qwen2.5-1.5b}
DATA=${DATA:-$OUT/data}  # (a study's own: a DATA shared by studies of other pools is rewritten under the
# other's done/data marker, which does not see it)
TASK=math; TASK_SCRIPT=math_data.py
TRAIN=$DATA/rl_train.jsonl; TEST=$DATA/test.jsonl; SFT_SPLIT=$DATA/sft_train.jsonl
# the paper's splits: seed-1234 shuffle of the train pool, 900 SFT / 100 SFT-val / the rest RL; test = MATH-500
MATH_DATA_ARGS=${MATH_DATA_ARGS:---train_pool ${MATH_POOL:-raw/math/train.jsonl} --test ${MATH_TEST:-raw/math/test.jsonl}}
DATA_CMD="python math_data.py --out_dir $DATA $MATH_DATA_ARGS --n_sft_train 900 --n_sft_val 100 --seed 1234"

# SFT (section 7): AdamW lr 1e-5, cosine to 0, 2 epochs, global batch 32, seq-mean loss
SFT_ARGS="--epochs 2 --global_batch 32 --lr 1e-5 --max_length 5000 --gradient_checkpointing true --dtype auto --save_every 0 --seed $SEED"

# GRPO (section 8): the shared paper settings at lr 2.5e-6 after 4 warm-up steps; the paper re-distils from step 50
RL_STEPS=50
RL_ARGS="$PAPER_GRPO_ARGS --lr 2.5e-6 --warmup_steps 4 --keep_steps $RL_STEPS"  # the re-distillation source, by name

# re-distillation (section 3.2): A greedy on the SFT prompts (the paper's MATH set, ~500 kept);
# B (not in the paper for MATH; the K&K recipe): correct rollouts of steps 50,40-49, first 500
B_STEPS="50,40-49"
B_SAMPLES=500
