#!/usr/bin/env bash
# reproduce.sh [PRESET] [--dry-run]: the whole re-distillation study, one stage after another.
#
#   bash reproduce.sh                 # = tiny: CPU only, own tokenizer and base model, minutes
#   bash reproduce.sh kk-qwen2.5-1.5b --dry-run
#   GPUS=8 MODEL_DIR=/models/Qwen2.5-1.5B bash reproduce.sh kk-qwen2.5-1.5b
#   SEEDS=3 bash reproduce.sh tiny    # three whole studies (seeds 1-3), then the table of their mean ± std
#
# Settings from the environment (NAME=VALUE bash reproduce.sh PRESET), each read by the presets that name it:
#   OUT=DIR                where the study writes (default runs/PRESET); DATA=DIR its data files (default OUT/data)
#   SEED=S, SEEDS=N        the seed, or N whole studies (below)
#   GPUS=N, MODEL_DIR=DIR  the paper presets: GPUs of every torchrun stage (default 8), the base model's directory
#   LIMR=1, LIMR_SEEDS="A B"  also the LIMR experiment (presets that define it), and its seeds
#   SAMPLE_EFFECT=0        skip the sample-effect stages
#   SELECT_K=K, SELECT_FROM=FILE  the sample-effect selection: SFT of the base on the top K, bottom K and K random
#                          samples (tiny: 100 of set A; the paper presets: none unless given)
#   THREADS=N, DYNAMIC_SAMPLING=false, RL_STEPS=N  tiny: CPU threads of every stage (default 2, the figures'
#                          count; recorded in OUT/cpu_threads, and a study goes on at its own count only), the
#                          measured alternative without dynamic sampling, the RL steps
#   SWAP_TWINS=apart       tiny: the test puzzles' swap twins kept out of RL, SFT and the base's text too (default kept)
#   MATH_POOL=FILE, MATH_TEST=FILE, MATH_DATA_ARGS="..."  the MATH presets' problem files, or math_data.py's flags
# A preset may set one of these itself (micro: RL_STEPS, SAMPLE_EFFECT): a value given otherwise is noted, not used.
# Presets are bash files of settings in config/PRESET.sh (read them: every stage's flags are there). The script runs
# in its own directory: a relative OUT, MODEL_DIR or data path is relative to it, not to where it was started.
# Stages (paper.md section 3.3):
#   data -> [tiny: base text + tokenizer -> pre-train the base] -> teacher SFT data -> cold-start SFT of
#   the base -> GRPO from it -> sample the RL policy (A: greedy on the SFT prompts, B: correct rollouts
#   of the last RL steps) -> re-distil the BASE on each -> evaluate base, SFT, RL, re-distilled per
#   difficulty -> sample effect of teacher vs re-distilled data [-> SFT of the base on the top-K, bottom-K and K
#   random samples by sample effect, evaluated] -> the final table (report.py).
# Optional, LIMR=1 (arXiv 2502.11886): a probe RL run on the whole pool -> lim_select.py -> RL from the same start on
#   the LIM subset and on a random one of its size (RAND) for equal steps -> evaluation of FULL, LIM and RAND; a preset
#   that sets LIMR_ONLY=1 runs only this (from a base model: LIMR's own setting).
# Every stage writes OUT/done/STAGE (its wall seconds and command) last and is skipped when that exists with the
# same command (another command, e.g. a changed setting or seed, is an error naming both, and so is an older
# version's marker without its command; a skipped stage whose marker is older than that of a stage whose outputs it
# reads is warned of: it was made from their earlier run); an evaluation runs again (eval.py reuses its finished
# pairs, re-scoring them if the task's scorer changed since), unlogged in times.tsv; a stage that was killed
# is re-run with --resume (SFT, RL), or skips what it finished (eval; the sample effect: its samples), so re-running
# this script after a crash continues where it stopped. A TERM, HUP or INT sent to this script (kill PID, Ctrl-C)
# ends the running stage with it. OUT/times.tsv logs every attempt with its seconds: finished, or stopped (a
# failure, Ctrl-C, a kill short of SIGKILL), so report.py's device hours count the time the stopped ones spent too.
# Seeds: SEED=S (default 1) is the seed a preset derives every stage's seeds from; seed 1 is the preset as
# measured. SEEDS=N runs seeds 1..N one after another, seed 1 in OUT and seed S in OUT/seed_S (a finished seed is
# skipped like any stage), then report.py tables each model's mean ± std over them and every seed's row.
# (the whole script is one function, read in full before it runs: editing this file mid-run is safe for the study
# under way; under SEEDS=N each seed's study reads it and the preset anew, so a later seed refuses to start after
# an edit of this file or of config/)
main() {
set -euo pipefail
SELF="$(readlink -f "$0")"  # this script, wherever and however started ($0 may be relative, or a symbolic link)
cd "$(dirname "$SELF")"
# (a task's script kept outside the repository, TASK_SCRIPT=/path/mytask.py, imports this project's modules too)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

PRESET=tiny
PRESET_GIVEN=""
DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) awk 'NR > 1 { if (!/^#/) exit; print }' "$SELF"; ls config; exit 0 ;;  # the header above
    -*) echo "error: unknown option $arg (only --dry-run)" >&2; exit 2 ;;
    *) if [[ -n "$PRESET_GIVEN" ]]; then
         echo "error: two presets given ($PRESET_GIVEN and $arg); run one study at a time" >&2
         exit 2
       fi
       PRESET="$arg"; PRESET_GIVEN="$arg" ;;
  esac
done
if [[ ! -f "config/$PRESET.sh" ]]; then
  echo "error: no preset config/$PRESET.sh; presets: $(cd config && ls *.sh | sed 's/\.sh$//' | tr '\n' ' ')" >&2
  exit 2
fi
SEED_GIVEN=${SEED:-}  # (the loop below passes SEED=s with SEEDS=1)
SEED=${SEED:-1}; SEEDS=${SEEDS:-1}
if ! [[ "$SEED" =~ ^[1-9][0-9]*$ && "$SEEDS" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: SEED ($SEED) and SEEDS ($SEEDS) must be positive integers" >&2
  exit 2
fi
check_counts() {  # a step count is written without a leading 0: the shell's arithmetic reads 075 as octal 61
  local name
  for name in RL_STEPS LIMR_STEPS LIMR_PROBE_STEPS LIMR_SAVE_EVERY; do  # (the steps are Python's decimal 75)
    if [[ -n "${!name:-}" && ! "${!name}" =~ ^[1-9][0-9]*$ ]]; then
      echo "error: $name ($1) is '${!name}': a positive integer written without a leading 0" >&2
      exit 2
    fi
  done
}
check_counts "from the environment"  # (before the preset computes with it: tiny's B_STEPS)
for name in LIMR LIMR_ONLY SAMPLE_EFFECT; do  # (anything but 1 ran as 0, silently: LIMR=yes ran no LIMR stage)
  if [[ -n "${!name:-}" && ! "${!name}" =~ ^[01]$ ]]; then
    echo "error: $name is '${!name}': 1 (run it) or 0" >&2
    exit 2
  fi
done
if [[ -n "${THREADS:-}" && ! "$THREADS" =~ ^[1-9][0-9]*$ ]]; then  # (torch took its own count, with libgomp's warning)
  echo "error: THREADS is '$THREADS': the CPU threads of every stage, a positive integer" >&2
  exit 2
fi
if [[ -n "${GPUS:-}" && ! "$GPUS" =~ ^[1-9][0-9]*$ ]]; then  # (torchrun's own error came at the first stage, and
  echo "error: GPUS is '$GPUS': the GPUs of every launched stage, a positive integer" >&2  # times.tsv a bad line)
  exit 2
fi
given=()  # settings given in the environment that a preset may set otherwise (micro: RL_STEPS=3, SAMPLE_EFFECT=0)
for name in RL_STEPS SAMPLE_EFFECT SELECT_K SELECT_FROM LIMR_SEEDS; do
  [[ -n "${!name+set}" ]] && given+=("$name=${!name}")
done
# shellcheck source=config/tiny.sh
source "config/$PRESET.sh"
: "${OUT:?the preset sets OUT}"
for setting in ${given[@]+"${given[@]}"}; do  # (taken silently, the run was not the one asked for)
  name=${setting%%=*}
  if [[ "${!name:-}" != "${setting#*=}" ]]; then
    echo "note: $setting from the environment: preset $PRESET sets $name=${!name:-(nothing)}, which this run uses" >&2
  fi
done
if [[ "${SWAP_TWINS:-kept}" == apart && "$DATA_CMD" != *"--test_dedup swap"* ]]; then  # (tiny's setting alone)
  echo "note: SWAP_TWINS=apart from the environment: preset $PRESET does not read it (its data stage keeps the test's" \
       "swap twins; kk_data.py --test_dedup swap in its DATA_CMD would not)" >&2
fi
check_counts "in the preset"
check_whole() {  # check_whole NAME VALUE WHAT: VALUE a non-negative integer written as Python and report.py read it
  if ! [[ "$2" =~ ^(0|[1-9][0-9]*)$ ]]; then
    echo "error: $1 holds '$2': $3, a non-negative integer written without a leading 0" >&2
    exit 2
  fi
}
# (the shell's arithmetic read SELECT_K=abc as 0; LIMR seed 01 ran as seed_01, which the report, reading 1, left out)
[[ -z "${SELECT_K:-}" ]] || check_whole SELECT_K "$SELECT_K" "the samples of each sample-effect selection (0: none)"
for seed in ${LIMR_SEEDS:-}; do check_whole LIMR_SEEDS "$seed" "each LIMR seed"; done
# the stage commands are built as shell words: a path with a space or a shell character would be cut, expanded or
# run there, while this script's own quoted uses of it would not (a quoted '~/runs': stages in $HOME, markers in ./~)
unsafe='^[~#]|[][:space:]"'"'"'\\$`;&|<>()*?{}[]'
for name in OUT BASE MODEL_DIR DATA TRAIN TEST SFT_SPLIT MATH_POOL MATH_TEST LIMR_POOL LIMR_INIT AIME24 AMC23 \
    TASK_SCRIPT SELECT_FROM; do
  if [[ "${!name:-}" =~ $unsafe ]]; then
    echo "error: $name is '${!name}': a path with a space, a shell character (quotes, \\ \$ \` ; & | < > ( ) * ? { }" \
      "[ ]) or a leading ~ or # cannot be passed on to the stages; use another path (a symbolic link without them" \
      "will do; for ~, \$HOME)" >&2
    exit 2
  fi
done
if [[ "${LIMR:-0}" == 1 || "${LIMR_ONLY:-0}" == 1 ]] && [[ -z "${LIMR_STEPS:-}" || -z "${LIMR_PROBE_STEPS:-}" ]]; then
  echo "error: preset $PRESET sets no LIMR stages (LIMR_STEPS and LIMR_PROBE_STEPS, LIMR_SEEDS, ...); LIMR=1 runs" \
    "with a preset that does: tiny, micro, limr-qwen2.5-math-7b (or add them to config/$PRESET.sh)" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1

# ---- helpers: print a command, run it unless --dry-run, time it; skip a stage that is done
log_attempt() {  # log_attempt NAME SECONDS finished|stopped: one line of OUT/times.tsv, at the stage's devices
  # (on a line of its own: a kill can cut the last line short, and report.py then drops that line alone)
  if [[ -s "$OUT/times.tsv" && -n "$(tail -c 1 "$OUT/times.tsv")" ]]; then echo >> "$OUT/times.tsv"; fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$ATTEMPT_DEVICES" "$DEVICE_KIND" "$3" >> "$OUT/times.tsv"
}
HOLDS_LOCK=0  # 1 once this script holds OUT/.reproduce.lock (on fd 9; below)
lock_lost() {  # OUT's lock file is not the one this script holds: OUT was removed or moved away (rm -rf, mv)
  [[ "$HOLDS_LOCK" == 1 && ! "$OUT/.reproduce.lock" -ef /dev/fd/9 ]]
}
stop_if_lock_lost() {  # ... and perhaps a new study runs there: write nothing more into it
  if lock_lost; then
    echo "error: $OUT was removed or moved away while this reproduce.sh ran (its .reproduce.lock is not the one" \
         "this script holds); stopping, so as not to write into what stands at that path now" >&2
    exit 1
  fi
}
take_lock() {  # OUT's lock, on fd 9 until this script and every stage it started have ended (they inherit it)
  if [[ "$DRY_RUN" == 0 ]] && command -v flock > /dev/null; then
    exec 9> "$OUT/.reproduce.lock"
    HOLDS_LOCK=1  # (fd 9 is OUT's lock file with or without flock: lock_lost compares the two)
    local locked=0; flock -n -E 75 9 || locked=$?
    if (( locked == 75 )); then
      echo "error: another reproduce.sh is running on $OUT (or a stage it started still is); wait for it to end," \
           "or stop it" >&2
      exit 1
    elif (( locked != 0 )); then  # (a file system without locks)
      echo "note: cannot lock $OUT/.reproduce.lock (flock exit $locked): running without the lock" >&2
    fi
  fi
}
ATTEMPT=""  # the stage running now: when the script exits before it finishes, its time is logged as stopped
ATTEMPT_DEVICES=1  # ... and the devices it runs on
trap 'if [[ -n "$ATTEMPT" ]] && ! lock_lost; then log_attempt "$ATTEMPT" $((SECONDS - ATTEMPT_T0)) stopped; fi' EXIT
# A stage runs in a process group of its own, and a TERM, HUP or INT sent to this script ends that group too: a kill
# of the script alone left the stage running on, unmarked and holding OUT's lock. (Ctrl-C reaches the stage this way
# too: it is not in the terminal's foreground group.)
STAGE_GROUP=""  # the running stage's process group (its leader's pid), or empty
pass_on() {  # pass_on SIGNAL: end the stage with it, wait for it, then end this script with it (the EXIT trap runs)
  if [[ -n "$STAGE_GROUP" ]]; then
    kill -s "$1" -- "-$STAGE_GROUP" 2> /dev/null || true
    wait "$STAGE_GROUP" 2> /dev/null || true
  fi
  trap - "$1"
  kill -s "$1" "$$"
}
for signal in TERM HUP INT; do trap "pass_on $signal" "$signal"; done
run_stage() {  # run_stage COMMAND...: the stage's own subshell (the group's leader) ends on a signal only once the
  # stage has (bash runs a trap after the command under way), so that pass_on's wait ends when the stage has ended,
  # and starts no command after it (a preset's "a || b"); a trap is no disposition the stage's process inherits
  trap 'exit 129' HUP; trap 'exit 130' INT; trap 'exit 143' TERM
  "$@"
}
in_own_group() {  # in_own_group COMMAND...: run it in a process group of its own (job control on) and wait for it
  set -m
  run_stage "$@" &
  STAGE_GROUP=$!
  set +m
  local status=0
  wait "$STAGE_GROUP" || status=$?  # (a trapped signal interrupts the wait: pass_on runs)
  STAGE_GROUP=""
  return "$status"
}
scoring_free() {  # an eval.py command less its scoring-only setting, which eval.py's re-check applies to the pairs it
  # finished (re-scoring them, generating nothing): a study evaluated under the other one goes on
  local c=" $1 "
  c="${c// --score_truncated true / }"; c="${c// --score_truncated false / }"
  printf '%s' "$c"
}
as_now() {  # a recorded stage command with the settings renamed since spelled as now (2026-12-07: --max_new_tokens,
  # and sample_policy.py's and eval.py's --batch_size): a study done before goes on
  local c=" $1 "
  c="${c// --max_new_tokens / --max_response_tokens }"; c="${c// --max_new_tokens=/ --max_response_tokens=}"
  if [[ "$c" == " sample_policy.py "* || "$c" == " python sample_policy.py "* || "$c" == " eval.py "* ]]; then
    c="${c// --batch_size / --gen_batch_size }"; c="${c// --batch_size=/ --gen_batch_size=}"
  fi
  c="${c# }"
  printf '%s' "${c% }"
}
canonical() {  # a command with each word that holds a / as the real path it names (OUT=runs/x, OUT=runs/x/,
  # OUT=$PWD/runs/x and a link to it are one study; the words of a command hold no space: unsafe paths are refused).
  # One python call (GNU realpath -m is not everywhere); its failure stops the script, not an empty comparison
  local words; read -ra words <<< "$1"
  python -c 'import os, sys; print(" ".join(os.path.realpath(w) if "/" in w else w for w in sys.argv[1:]))' \
    "${words[@]}" || { echo "error: cannot compare stage commands (python failed)" >&2; exit 1; }  # (the plain
  # assignment of its output then fails, and set -e stops the script)
}
absolute() {  # absolute PATH: for a message (this script runs in its own directory, the reader is elsewhere)
  if [[ "$1" == /* ]]; then printf '%s' "$1"; else printf '%s' "$PWD/$1"; fi
}
STAGES_RUN=(); STAGES_WROTE=()  # the stages this run has passed, done or skipped, in order, and what each writes
stage_outputs() {  # stage_outputs COMMAND: the paths it writes (the words after its output flags), one a line
  local words w take=0
  read -ra words <<< "$1"
  for w in "${words[@]}"; do
    if (( take )); then printf '%s\n' "$w"; take=0; continue; fi
    case "$w" in
      --out_dir|--out|--teacher_sft|--probe_out|--samples_out|--scores_out|--random_out) take=1 ;;
      --out_dir=*|--out=*|--teacher_sft=*|--probe_out=*|--samples_out=*|--scores_out=*|--random_out=*)
        printf '%s\n' "${w#*=}" ;;
    esac
  done
}
reads() {  # reads COMMAND PATHS: whether a word of COMMAND is one of PATHS (lines), or lies under one
  local words w path
  read -ra words <<< "$1"
  while IFS= read -r path; do
    [[ -n "$path" ]] || continue
    for w in "${words[@]}"; do
      [[ "${w#*=}" == "$path" || "${w#*=}" == "$path/"* ]] && return 0
    done
  done <<< "$2"
  return 1
}
step() {  # step NAME COMMAND...: run COMMAND as stage NAME unless OUT/done/NAME exists
  local name="$1"; shift
  local cmd="$*"
  if [[ -z "${cmd// }" ]]; then  # (its marker would hold no command, which the next run takes for an old marker's)
    echo "error: stage $name has no command (an empty *_CMD in preset $PRESET?): give it one, or leave the stage" \
      "out of the preset" >&2
    exit 2
  fi
  local what="${cmd#"$LAUNCH "}"  # the command without its launcher: another number of GPUs may take over a study
  # (at its next stage: a stopped training run resumes on its own number only, as docs/memory.md says)
  # (the stages resume what they find, and refuse outputs made with other settings: those must go too)
  local stages_before=${#STAGES_RUN[@]}
  if [[ "$what" != "eval.py "* ]]; then  # (an evaluation's marker a re-scoring rewrites, and no stage reads it)
    STAGES_RUN+=("$name"); STAGES_WROTE+=("$(stage_outputs "$what")")
  fi
  local run_again="delete OUT/done/$name and the markers of the stages after it, and move away what those stages
  wrote (a training run's --out_dir, eval's --out_dir, a sample set), to run them again"
  # (an empty marker is none: every version wrote its seconds, and an empty one is a write that failed, disk full)
  if [[ -s "$OUT/done/$name" ]]; then
    local was; was=$(as_now "$(tail -n +2 "$OUT/done/$name")")  # line 1: seconds; then the command (none: older)
    if [[ -z "$was" ]]; then  # (a preset may have changed since: its outputs cannot be taken as this command's)
      echo "error: stage $name in $OUT was marked done by an older reproduce.sh, which did not record its command:" >&2
      echo "  now: $what" >&2
      echo "  if its outputs are this command's, add it to the marker: printf '%s\\n' '$what' >>" \
        "$(absolute "$OUT/done/$name")" >&2
      echo "  else $run_again" >&2
      exit 1
    fi
    local same_was same_what; same_was=$(canonical "$was"); same_what=$(canonical "$what")
    if [[ "$same_was" != "$same_what" && ! ( "$what" == "eval.py "* \
          && "$(scoring_free "$same_was")" == "$(scoring_free "$same_what")" ) ]]
    then
      echo "error: stage $name in $OUT was done with another command, so its outputs are not these settings':" >&2
      echo "  was: $was" >&2
      echo "  now: $what" >&2
      echo "  use another OUT, or $run_again" >&2
      exit 1
    fi
    if [[ "$what" == "eval.py "* ]]; then  # an evaluation runs again: it reuses the pairs it finished, re-scoring
      echo "== $name: done; eval.py checks its pairs (a task scorer changed since re-scores them)"  # (not timed)
      echo "+ $cmd"
      # (a checkpoint deleted since, for disk space, fails it: the earlier results stand, and the study goes on)
      if [[ "$DRY_RUN" == 1 ]]; then
        [[ "$was" == "$what" ]] || echo "  (a run re-scores its pairs by this rule; its marker then takes this command)"
      elif stop_if_lock_lost; in_own_group eval "$cmd"; then
        if [[ "$was" != "$what" ]]; then  # re-scored by this command's rule: its marker says so (whole or not at all)
          stop_if_lock_lost
          printf '%s\n%s\n' "$(head -n 1 "$OUT/done/$name")" "$what" > "$OUT/done/.$name.tmp"
          mv -f "$OUT/done/.$name.tmp" "$OUT/done/$name"
        fi
      else
        echo "warning: stage $name's re-check failed (above); its earlier results stand" >&2
      fi
      return 0
    fi
    echo "== $name: done (OUT/done/$name), skipped"
    local i
    for ((i = 0; i < stages_before; i++)); do  # (a stage it reads from, done since: the skip keeps what it made)
      if [[ "$OUT/done/${STAGES_RUN[i]}" -nt "$OUT/done/$name" ]] && reads "$what" "${STAGES_WROTE[i]}"; then
        echo "warning: stage ${STAGES_RUN[i]} ran after $name was done, and $name reads what it wrote: its outputs" \
          "are of ${STAGES_RUN[i]}'s earlier run; to redo it, $run_again" >&2
        break
      fi
    done
    return 0
  fi
  echo "== $name"
  echo "+ $cmd"
  [[ "$DRY_RUN" == 1 ]] && return 0
  stop_if_lock_lost
  ATTEMPT="$name"; ATTEMPT_T0=$SECONDS
  ATTEMPT_DEVICES=$DEVICES
  [[ "$what" == "$cmd" ]] && ATTEMPT_DEVICES=1  # (a stage not started with the launcher: one process, data or
                                                # set B, billed at one device, not the GPUS it leaves idle)
  in_own_group eval "$cmd"
  local seconds=$((SECONDS - ATTEMPT_T0))
  stop_if_lock_lost
  mkdir -p "$OUT/done"
  # whole or not at all: a marker cut short by a full disk would read as another command's
  printf '%s\n%s\n' "$seconds" "$what" > "$OUT/done/.$name.tmp"
  mv -f "$OUT/done/.$name.tmp" "$OUT/done/$name"
  # the marker first, then the finished line: a kill between them logs the attempt stopped (its time counts, the
  # stage is done); a finished line without its marker made the next run redo the stage, whose resume of seconds
  # then read as a new run (report.read_times) and dropped the first one's time
  ATTEMPT=""
  log_attempt "$name" "$seconds" finished
  echo "== $name: finished in ${seconds}s"
}

# ---- LIMR (LIMR=1): for each seed of LIMR_SEEDS, a probe RL run from LIMR_INIT on the whole pool LIMR_POOL for
#   LIMR_PROBE_STEPS steps (its epochs are LIMR's reward curves) -> lim_select.py: LIM = score >= the threshold
#   (LIMR_SELECT_ARGS), RAND = as many at random -> RL from LIMR_INIT on LIM and on RAND for LIMR_STEPS steps ->
#   evaluation (one eval.py call per entry of the LIMR_EVALS array) of the start, FULL (the probe at step LIMR_STEPS:
#   RL on the whole pool for equal steps), LIM and RAND. Every run gets LIMR_RL_ARGS and --seed SEED.
limr() {
  local init="$OUT/sft/final" pool="${LIMR_POOL:-$TRAIN}" final seed dir i  # (init: the cold start by default,
  [[ "${LIMR_ONLY:-0}" == 1 ]] && init="$BASE"                               # which LIMR_ONLY=1 never builds)
  init="${LIMR_INIT:-$init}"
  final="step_$(printf '%06d' "$LIMR_STEPS")"
  if (( LIMR_STEPS > LIMR_PROBE_STEPS || LIMR_STEPS % ${LIMR_SAVE_EVERY:-$LIMR_STEPS} )); then
    echo "error: LIMR_STEPS ($LIMR_STEPS) must be at most LIMR_PROBE_STEPS ($LIMR_PROBE_STEPS) and a multiple of" \
      "LIMR_SAVE_EVERY (${LIMR_SAVE_EVERY:-}): FULL is the probe's checkpoint at step LIMR_STEPS" >&2
    exit 2
  fi
  if [[ -n "${LIMR_DATA_CMD:-}" ]]; then  # a pool of its own (the tiny preset: one small enough for several epochs)
    step limr_data "$LIMR_DATA_CMD"
  fi
  if ! declare -p LIMR_EVALS > /dev/null 2>&1; then  # default: the study's evaluation on the test split
    LIMR_EVALS=("--splits $TEST --split_names test $EVAL_ARGS")
  fi
  for seed in ${LIMR_SEEDS:-1234}; do
    dir="$OUT/limr/seed_$seed"
    step "limr_probe_$seed" "$LAUNCH train_rl.py --model $init --task $TASK --train_data $pool --test_data $TEST \
--out_dir $dir/full --max_steps $LIMR_PROBE_STEPS --resume true $LIMR_RL_ARGS --save_every ${LIMR_SAVE_EVERY:-$LIMR_STEPS} --keep_steps $LIMR_STEPS \
--seed $seed"
    step "limr_select_$seed" "python lim_select.py --rollouts $dir/full --train_data $pool --task $TASK --out $dir/lim.jsonl \
--scores_out $dir/scores.jsonl --random_out $dir/rand.jsonl --seed $seed ${LIMR_SELECT_ARGS:-}"
    for arm in lim rand; do
      step "limr_${arm}_$seed" "$LAUNCH train_rl.py --model $init --task $TASK --train_data $dir/$arm.jsonl --test_data $TEST \
--out_dir $dir/$arm --max_steps $LIMR_STEPS --resume true $LIMR_RL_ARGS --seed $seed"
    done
    for i in "${!LIMR_EVALS[@]}"; do  # (eval.py evaluates the start once: it skips the pairs it has finished)
      step "limr_eval_${seed}_$i" "$LAUNCH eval.py --task $TASK --checkpoints $init $dir/full/$final $dir/lim/$final \
$dir/rand/$final --names start full_$seed lim_$seed rand_$seed --out_dir $OUT/limr/eval ${LIMR_EVALS[$i]}"
    done
  done
}

# ---- the final table (and plots when matplotlib is installed); always re-made, it is cheap
report() {
  echo "== report"
  echo "+ python report.py --out_dir $OUT --preset $PRESET --seeds $SEEDS --limr_seeds ${LIMR_SEEDS:-1234}"
  [[ "$DRY_RUN" == 1 ]] && exit 0
  stop_if_lock_lost  # (a long re-check may have run while OUT was moved away and a new study started there)
  # shellcheck disable=SC2086  # LIMR_SEEDS: one argument per seed
  python report.py --out_dir "$OUT" --preset "$PRESET" --seeds "$SEEDS" --limr_seeds ${LIMR_SEEDS:-1234}
}

# ---- SEEDS=N: the whole study once per seed (seed 1 in OUT, seed S in OUT/seed_S; LIMR, when asked, with seed 1
#   only: it has its own LIMR_SEEDS), then one report over them
if (( SEEDS > 1 || SEED != 1 )) && [[ "${LIMR_ONLY:-0}" == 1 ]]; then  # its seeds are LIMR_SEEDS; SEED changes none of its stages
  echo "error: preset $PRESET runs only the LIMR experiment (LIMR_ONLY=1), whose seeds are LIMR_SEEDS" \
    "(${LIMR_SEEDS:-1234}): SEED=$SEED SEEDS=$SEEDS would repeat it unchanged; set LIMR_SEEDS instead" >&2
  exit 2
fi
if (( SEEDS > 1 )) && [[ "${SEED_GIVEN:-}" != "" && "$SEED_GIVEN" != 1 ]]; then  # SEEDS=N runs seeds 1..N
  echo "error: SEEDS=$SEEDS runs seeds 1..$SEEDS; SEED=$SEED_GIVEN would be ignored (unset it)" >&2
  exit 2
fi
sources_digest() {  # this script and the presets as they are now (each seed's study reads them when it starts)
  local file
  for file in "$SELF" config/* "config/$PRESET.sh"; do  # (files only: a folder or a dead link in config/ is none)
    if [[ -f "$file" ]]; then cat "$file"; fi
  done | cksum
}
if (( SEEDS > 1 )); then
  export SEEDS_SOURCES_DIGEST; SEEDS_SOURCES_DIGEST=$(sources_digest)  # (seeds 2..N check it: below)
  for ((s = 1; s <= SEEDS; s++)); do
    dir="$OUT"; (( s > 1 )) && dir="$OUT/seed_$s"
    echo "==== seed $s of $SEEDS -> $dir"
    flags=(); [[ "$DRY_RUN" == 1 ]] && flags=(--dry-run)
    limr=0; (( s == 1 )) && limr="${LIMR:-0}"
    status=0
    in_own_group env SEEDS=1 SEED=$s OUT="$dir" LIMR=$limr bash "$SELF" "$PRESET" "${flags[@]}" || status=$?
    if (( status != 0 )); then  # (no table over the seeds: OUT/results.md is seed 1's own, which says nothing of it)
      echo "error: seed $s of $SEEDS stopped (above); no table over the seeds was made, and $(absolute "$OUT")/results.md" \
        "is seed 1's alone. Run the same command again to go on (finished seeds and stages are skipped)" >&2
      exit "$status"
    fi
  done
  take_lock  # (seed 1's study held it while it ran; the table reads OUT: not while another study writes there)
  report
  exit 0
fi

if [[ -n "${SEEDS_SOURCES_DIGEST:-}" && "$SEEDS_SOURCES_DIGEST" != "$(sources_digest)" ]]; then
  # an edit while SEEDS=N ran would give this seed other settings than the earlier ones', in one table
  echo "error: reproduce.sh or config/ changed since this SEEDS=N run began: seed $SEED would run with" \
    "other settings than the seeds before it; undo the edit and run it again (finished seeds are skipped), or start" \
    "the seeds over in another OUT" >&2
  exit 1
fi
echo "preset $PRESET -> $(absolute "$OUT") ($DEVICES x $DEVICE_KIND), seed $SEED"

# ---- 0. the base model: a local Hugging Face directory, or (tiny) built and pre-trained here
if [[ "${TINY_BASE:-0}" == 1 && "$TASK" != kk && "$TASK" != kk_data ]]; then
  echo "error: TINY_BASE=1 pre-trains the base on K&K text (tiny_base.py), but TASK is $TASK: set TINY_BASE=0 and" \
    "MODEL_DIR to a base model (docs/data.md, \"Adding a task\")" >&2
  exit 2
elif [[ "${TINY_BASE:-0}" == 1 ]]; then
  BASE="$OUT/base/final"
else
  BASE=${BASE:-${MODEL_DIR:-}}  # (a preset of a fork's task, copied from micro.sh, names none: MODEL_DIR)
  if [[ -z "$BASE" ]]; then
    echo "error: preset $PRESET names no base model: set MODEL_DIR to a local Hugging Face model directory" >&2
    exit 2
  elif [[ "$DRY_RUN" == 0 && ! -f "$BASE/config.json" ]]; then
    echo "error: base model not found: $(absolute "$BASE")/config.json is missing. Set MODEL_DIR to a local copy" \
      "of ${BASE_HUB_NAME:-the base model};" >&2
    echo "       where a network exists, download it with:  huggingface-cli download ${BASE_HUB_NAME:-NAME}" \
      "--local-dir $(absolute "$BASE")" >&2
    exit 2
  fi
fi

if [[ -e "$OUT" && ! -d "$OUT" ]]; then
  echo "error: OUT $OUT is a file, not a directory" >&2
  exit 2
fi
[[ "$DRY_RUN" == 1 ]] || mkdir -p "$OUT"
# one study per OUT at a time: a second reproduce.sh there would run the same stages over this one's files (the
# training stages, eval and sample_policy lock their own outputs; data and reports do not). The lock is held until
# this script and every stage it started have ended (they inherit it). Where flock(1) is missing (macOS), no lock.
# OUT removed or moved away meanwhile (rm -rf, mv, and a re-run there): step() stops before and after each stage.
take_lock
if [[ -n "${THREADS:-}" && "$DRY_RUN" == 0 ]]; then  # (a CPU preset: another count rounds every stage otherwise)
  ran_with=$(cat "$OUT/cpu_threads" 2> /dev/null || true)
  if [[ -n "$ran_with" && "$ran_with" != "$THREADS" ]]; then  # (a training run's resume refuses it itself, but
    # sampling and evaluation took it: one study, stages of two thread counts)
    echo "error: the study in $OUT ran with THREADS=$ran_with ($(absolute "$OUT/cpu_threads")); give that, or start" \
      "afresh in another OUT (another count rounds every stage otherwise)" >&2
    exit 2
  fi
  printf '%s\n' "$THREADS" > "$OUT/cpu_threads"
fi

# ---- 1. data: the task's splits
step data "$DATA_CMD"

# ---- 2. tiny only: pre-training text + tokenizer, then pre-train the "base" from scratch
if [[ "${TINY_BASE:-0}" == 1 ]]; then
  step base_text "python tiny_base.py --out_dir $OUT/base_data --exclude $SFT_SPLIT --exclude_logic $TEST $BASE_TEXT_ARGS"
  step base "$LAUNCH redistill_sft.py --init_tiny true --tokenizer $OUT/base_data/tokenizer \
--pretrain_text $OUT/base_data/pretrain.jsonl --out_dir $OUT/base --resume true $PRETRAIN_ARGS"
  # what the base knows before any chat-format SFT: test accuracy asked in its own pre-training format
  step base_probe "python tiny_base.py --probe $BASE --probe_split $TEST --probe_out $OUT/base_probe.json"
fi

# ---- LIMR's own setting (LIMR_ONLY=1): RL from the base, nothing of the re-distillation study
if [[ "${LIMR_ONLY:-0}" == 1 ]]; then
  limr
  report
  exit 0
fi

# ---- 3. cold start: SFT of the base on the teacher's chain-of-thought traces
step teacher_data "python $TASK_SCRIPT --teacher_sft $OUT/sft_teacher.jsonl --split $SFT_SPLIT --tokenizer $BASE ${TEACHER_ARGS:-}"
step sft "$LAUNCH redistill_sft.py --init $BASE --data $OUT/sft_teacher.jsonl --out_dir $OUT/sft --resume true $SFT_ARGS"

# ---- 4. GRPO from the cold-start model
RL_FINAL="$OUT/rl/step_$(printf '%06d' "$RL_STEPS")"
step rl "$LAUNCH train_rl.py --model $OUT/sft/final --task $TASK --train_data $TRAIN --test_data $TEST \
--out_dir $OUT/rl --max_steps $RL_STEPS --resume true $RL_ARGS"

# ---- 5. sample the RL policy into re-distillation sets (an empty set, when nothing was correct, is allowed)
#   A: greedy, once per SFT prompt, keep the correct ones, shuffled, first A_SAMPLES (paper 3.1 'origin_sft'; a preset
#      whose SFT prompts give too few sets A_SPLITS to more prompts, e.g. the SFT prompts then the RL pool)
#   B: correct rollouts of the last RL steps, one per prompt, shuffled, first N (paper 3.1 'sample_from_buffer')
step sample_A "$LAUNCH sample_policy.py --from_checkpoint $RL_FINAL --task $TASK --split ${A_SPLITS:-$SFT_SPLIT} \
--out $OUT/redistill_A.jsonl --temperature 0 --samples_per_prompt 1 --num_examples ${A_SAMPLES:-1000} \
--seed $((SEED - 1)) --allow_empty true $SAMPLE_ARGS"
step sample_B "python sample_policy.py --from_rollouts $OUT/rl --steps $B_STEPS --task $TASK --split $TRAIN \
--out $OUT/redistill_B.jsonl --max_per_prompt 1 --num_examples $B_SAMPLES --seed $((SEED - 1)) --allow_empty true"

# ---- 6. re-distillation: SFT of the BASE model (not the RL model) on each set, the cold start's settings and the
#   preset's REDISTILL_A_ARGS / REDISTILL_B_ARGS after them (the later flag wins); a set smaller than one SFT batch
#   (redistill_sft.py refuses to train no step) is skipped as an empty one is
set_sft_args() {  # set_sft_args V: the SFT settings of re-distillation set V (the cold start's, then the set's own)
  local own="REDISTILL_${1}_ARGS"
  echo "$SFT_ARGS${!own:+ ${!own}}"
}
sft_batch() {  # sft_batch SFT_SETTINGS...: the global batch redistill_sft.py reads from them
  python -c 'import sys, common, redistill_sft
print(common.parse_settings(redistill_sft.get_parser(), sys.argv[1:]).global_batch)' "$@"
}
CHECKPOINTS="$BASE $OUT/sft/final $RL_FINAL"; NAMES="base sft rl"; SETS="$OUT/sft_teacher.jsonl"
for V in A B; do
  n=$(grep -c . "$OUT/redistill_$V.jsonl" 2> /dev/null || true)
  set_args=$(set_sft_args "$V")
  if [[ "$DRY_RUN" == 0 || -f "$OUT/redistill_$V.jsonl" ]]; then
    # shellcheck disable=SC2086  # one argument per setting
    SFT_BATCH=$(sft_batch $set_args)
  fi
  # (a dry run before the set exists lists its stage; once it exists, the same choice as the run's)
  if [[ "$DRY_RUN" == 1 && ! -f "$OUT/redistill_$V.jsonl" ]] || (( n >= SFT_BATCH )); then
    step "redistill_$V" "$LAUNCH redistill_sft.py --init $BASE --data $OUT/redistill_$V.jsonl --out_dir $OUT/redistill_$V \
--resume true $set_args"
    CHECKPOINTS="$CHECKPOINTS $OUT/redistill_$V/final"; NAMES="$NAMES redistill_$V"; SETS="$SETS $OUT/redistill_$V.jsonl"
  else
    echo "== redistill_$V: skipped, the RL policy gave ${n:-0} correct sample(s) ($OUT/redistill_$V.jsonl), fewer" \
      "than one SFT batch ($SFT_BATCH)"
  fi
done

# ---- 7. evaluation on the test split, per difficulty (eval.py skips the pairs it finished)
step eval "$LAUNCH eval.py --task $TASK --checkpoints $CHECKPOINTS --names $NAMES --splits $TEST --split_names test \
--out_dir $OUT/eval $EVAL_ARGS"

# ---- 8. sample effect of each SFT set on the cold-start policy (teacher vs re-distilled data)
if [[ "${SAMPLE_EFFECT:-1}" == 1 ]]; then
  # SELECT_K > 0: also write the top-K, the bottom-K and K random samples for step 8b, of the set SELECT_FROM (one of
  # the SFT sets: $OUT/redistill_A.jsonl, ...) or, where the preset names none, of all the sets pooled
  SELECT=""
  if [[ "${SELECT_K:-0}" -gt 0 ]]; then
    if [[ -z "${SELECT_FROM:-}" || " $SETS " == *" $SELECT_FROM "* ]]; then
      SELECT="--select $SELECT_K --select_out $OUT/sample_effect/top.jsonl --select_bottom \
$OUT/sample_effect/bottom.jsonl --select_random $OUT/sample_effect/random.jsonl${SELECT_FROM:+ --select_from $SELECT_FROM}"
    else
      echo "== se_top, se_bottom, se_random: skipped, SELECT_FROM=$SELECT_FROM is not one of this study's SFT sets" \
        "($SETS)"
    fi
  fi
  if [[ -n "$SELECT" ]]; then  # (sample_effect.py refuses a top and a bottom K that would share samples)
    pool_files=${SELECT_FROM:-$SETS}
    # shellcheck disable=SC2086  # one file per word
    if ls $pool_files > /dev/null 2>&1; then
      # shellcheck disable=SC2086
      pool=$(cat $pool_files | grep -c . || true)
      if (( pool < 2 * SELECT_K )); then
        echo "== se_top, se_bottom, se_random: skipped, the selection pool ($pool_files) holds $pool samples, fewer" \
          "than 2 x SELECT_K = $(( 2 * SELECT_K )) (its top and bottom SELECT_K would overlap)"
        SELECT=""
      fi
    fi
  fi
  step sample_effect "$LAUNCH sample_effect.py --task $TASK --checkpoint $OUT/sft/final --eval_data $TEST \
--sft_data $SETS --out $OUT/sample_effect/effects.jsonl $EFFECT_ARGS $SELECT"
  # ---- 8b. does the sample effect predict what SFT does? SFT the base on the top-K, the bottom-K and K at random,
  #   with the SFT settings the selected set's own re-distillation took (a pool of all the sets: the cold start's)
  se_args=$SFT_ARGS
  for V in A B; do
    if [[ "${SELECT_FROM:-}" == "$OUT/redistill_$V.jsonl" ]]; then
      se_args=$(set_sft_args "$V")
    fi
  done
  if [[ -n "$SELECT" ]]; then
    # shellcheck disable=SC2086  # one argument per setting
    se_batch=$(sft_batch $se_args)
    if (( SELECT_K < se_batch )); then  # (redistill_sft.py refuses a set of less than one step)
      echo "== se_top, se_bottom, se_random: skipped, SELECT_K=$SELECT_K samples are fewer than one SFT batch" \
        "($se_batch)"
      SELECT=""
    fi
  fi
  if [[ -n "$SELECT" ]]; then
    for V in top bottom random; do
      step "se_$V" "$LAUNCH redistill_sft.py --init $BASE --data $OUT/sample_effect/$V.jsonl --out_dir $OUT/se_$V \
--resume true $se_args"
    done
    step eval_se "$LAUNCH eval.py --task $TASK --checkpoints $OUT/se_top/final $OUT/se_bottom/final \
$OUT/se_random/final --names se_top se_bottom se_random --splits $TEST --split_names test --out_dir $OUT/eval_se \
$EVAL_ARGS"
  fi
else
  echo "== sample_effect: skipped (SAMPLE_EFFECT=0, from the preset or the environment)"
fi

# ---- 9. optional: the LIMR experiment (from the cold start, unless the preset sets LIMR_INIT)
if [[ "${LIMR:-0}" == 1 ]]; then
  limr
fi

# ---- 10. the final table
report
}

main "$@"
