# micro: the tiny preset shrunk until the whole pipeline takes a minute or two (tests/test_reproduce.py).
# It checks that every stage runs and writes well-formed files, not the science. Its model learns nothing,
# so its re-distillation sets are empty (those models are skipped, as reproduce.sh does for any policy
# without a correct sample) and the sample effect, whose gradient would be zero, is skipped (SAMPLE_EFFECT=0).
OUT=${OUT:-${MICRO_OUT:-runs/micro}}  # (before tiny.sh, which would set its own)
LIMR_SEEDS_GIVEN=${LIMR_SEEDS:-}  # (tiny.sh sets its own)
source config/tiny.sh
DATA=$OUT/data
TRAIN=$DATA/train.jsonl; TEST=$DATA/test.jsonl; SFT_SPLIT=$DATA/sft.jsonl
DATA_CMD="python kk_data.py --out_dir $DATA --test_people 2-3 --test_per_people 2 \
--train_people 2-3 --train_per_people 4 --sft_people 2-3 --sft_per_people 4 \
--train_seed $((100000 + STREAM_SHIFT)) --sft_seed $((200000 + STREAM_SHIFT))"
BASE_TEXT_ARGS="--people 2-3 --per_people 10 --drill_per_people 0 --text_format mixed --trace_fraction 0.5 \
--vocab_size 400 --seed $((300000 + STREAM_SHIFT))"  # (no claim drills: tiny_base's default adds 12,000)
PRETRAIN_ARGS="--tiny_hidden_size 32 --tiny_layers 1 --tiny_heads 2 --tiny_kv_heads 1 --tiny_context 1024 \
--max_length 1024 --epochs 1 --global_batch 10 --lr 3e-3 --loss_reduction token_mean --progress false --seed $((1 + SEED_SHIFT))"
SFT_ARGS="--epochs 1 --global_batch 4 --lr 1e-3 --max_length 1024 --progress false --seed $((1 + SEED_SHIFT))"
RL_STEPS=3
RL_ARGS="--prompts_per_step 2 --samples_per_prompt 2 --temperature 1.0 --max_response_tokens 16 --lr 1e-5 \
--warmup_steps 1 --gradient_checkpointing false --val_every 2 --val_limit 2 --save_every 1 --progress false \
--seed $((1234 + SEED_SHIFT))"
SAMPLE_ARGS="--max_response_tokens 16 --progress false"
B_STEPS="1-$RL_STEPS"
B_SAMPLES=4
EVAL_ARGS="--max_response_tokens 16 --progress false"
SAMPLE_EFFECT=0
# LIMR's stages too (plumbing): a probe of 2 epochs (4 steps of 2 prompts) on the 8 RL puzzles, then 2 steps each;
# the model has no reward to follow, so every prompt is kept (--threshold=-inf) and RAND is the same 8 reshuffled
LIMR=${LIMR:-1}
LIMR_DATA_CMD=""
LIMR_POOL=$TRAIN
LIMR_PROBE_STEPS=8
LIMR_STEPS=2
LIMR_SAVE_EVERY=2
LIMR_SEEDS=${LIMR_SEEDS_GIVEN:-"1"}
LIMR_RL_ARGS="$RL_ARGS --val_every 0"
LIMR_SELECT_ARGS="--threshold=-inf"
