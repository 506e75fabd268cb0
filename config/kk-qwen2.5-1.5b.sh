# kk-qwen2.5-1.5b: the paper's K&K runs (paper.md sections 3.1, 4.1, 7, 8, 9) on one GPU box.
#   GPUS=8 MODEL_DIR=/models/Qwen2.5-1.5B bash reproduce.sh kk-qwen2.5-1.5b
# Needs a local Qwen/Qwen2.5-1.5B (BASE): huggingface-cli download Qwen/Qwen2.5-1.5B --local-dir $MODEL_DIR
# Teacher: the official K&K step-by-step trace (the paper's short CoT; its long-CoT teacher, DeepSeek-R1
# traces, is an API run we cannot repeat offline). Batch sizes are global: the same on any GPU count.
source config/qwen2.5-1.5b.inc  # base model, launcher, GRPO/sampling/eval/sample-effect settings
OUT=${OUT:-runs/kk-qwen2.5-1.5b}
DATA=${DATA:-$OUT/data}  # (a study's own: a DATA shared by studies of other pools is rewritten under the
# other's done/data marker, which does not see it)
TASK=kk; TASK_SCRIPT=kk_data.py
TRAIN=$DATA/train.jsonl; TEST=$DATA/test.jsonl; SFT_SPLIT=$DATA/sft.jsonl
# the paper's splits: RL train people 3-7 x 2000, test people 4-8 x 100 (the official test puzzles),
# SFT pool people 2 x 200 + 3 x 800, cut as the paper's K_and_K_preprocess: 900 SFT train (sft.jsonl: the cold
# start's puzzles and set A's prompts), 100 held out, of which sft_val.jsonl keeps the 36 without a logical twin in
# sft.jsonl
DATA_CMD="python kk_data.py --out_dir $DATA --train_people 3-7 --train_per_people 2000 --test_people 4-8 \
--test_per_people 100 --sft_people 2-3 --sft_per_people 200,800 --sft_val_fraction 0.1"

# SFT (section 7): AdamW lr 1e-5, cosine to 0, no warm-up, 2 epochs, global batch 64 (the paper's long-CoT cold
# start and set A; its short-CoT SFT, whose teacher ours is, ran at 32, as did set B: REDISTILL_B_ARGS), seq-mean loss
SFT_ARGS="--epochs 2 --global_batch 64 --lr 1e-5 --max_length 5000 --gradient_checkpointing true --dtype auto --save_every 0 --seed $SEED"

# GRPO (section 8): the shared paper settings at lr 5e-6 after 8 warm-up steps. The paper re-distils from step 125.
RL_STEPS=125
RL_ARGS="$PAPER_GRPO_ARGS --lr 5e-6 --warmup_steps 8 --keep_steps $RL_STEPS"  # the re-distillation source, by name

# re-distillation set B (section 3.1): correct rollouts of steps 125,115-124 (last first), one per puzzle,
# seed-0 shuffle, first 1000 (set A: greedy on the SFT prompts, SAMPLE_ARGS of the shared file)
B_STEPS="125,115-124"
B_SAMPLES=1000
REDISTILL_B_ARGS="--global_batch 32"  # the paper's train_sft_kk_re_distill_rl.sh: 2 epochs x 31 steps of 32
