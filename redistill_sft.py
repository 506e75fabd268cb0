"""
Supervised fine-tuning: the cold start, re-distillation, and pre-training the tiny CPU "base" model.

  SFT       jsonl of {"id", "task", "prompt", "response"}: the loss is on the response tokens and the EOS appended
  pretrain  --pretrain_text FILE(s): jsonl with a "text" field, or plain text; each document + EOS is a sequence

The paper's settings are the defaults (AdamW lr 1e-5, no weight decay, cosine to 0, 2 epochs, global batch 32,
max length 5000: a longer example is an error, not truncated). Micro-batches are packed without padding and the
loss is normalised by the global batch, so the update does not depend on how the batch was split over ranks and
micro-batches; the model is FSDP2-sharded as in train_rl.py (docs/sft.md).

  python redistill_sft.py --init /models/Qwen2.5-1.5B --data data/kk/redistill.jsonl --out_dir runs/redistill
  torchrun --nproc_per_node=8 redistill_sft.py --init ... --data ... --out_dir ... --gradient_checkpointing true
  python redistill_sft.py ... --resume true   # continue a killed run from its last checkpoint

Writes OUT_DIR/step_NNNNNN/ (a Hugging Face checkpoint) with its resumable state at each epoch end, every
--save_every steps and at the end; OUT_DIR/final/ (the last weights, the next stage's stable path) and
OUT_DIR/metrics.jsonl (one line per step and per held-out loss).
"""
import math
import os
import random
import sys
import time

import numpy as np
import torch

import ckpt
import common
import gpu_memory
import parallel
import tasks
from common import UserError, print0
from model import (SUPPORTED, build_model, load_model, parse_dtype, read_config, response_logprobs, save_model,
                   tiny_config)
from parallel import full_copy, idle_pass
from tasks import load_tokenizer

# -----------------------------------------------------------------------------
# settings (defaults = the paper's SFT, section 7)


def get_parser():
    p = common.new_parser("SFT (cold start, re-distillation) or pre-training of the tiny base model.")
    # data
    p.add_argument("--data", nargs="+", default=None,
                   help="SFT jsonl file(s) of {id, task, prompt, response}; a record that says it is cut off "
                        "('finished': false) or wrong (a 'reward' below 1) is refused")
    p.add_argument("--pretrain_text", nargs="+", default=None,
                   help="instead of --data: pre-train on text (*.jsonl or *.json: one JSON object with a 'text' field "
                        "a line; any other name: plain text with documents separated by blank lines, refused where "
                        "its first line is such an object); loss on all tokens; documents longer than --max_length "
                        "are split")
    p.add_argument("--val_data", nargs="+", default=None,
                   help="held-out file(s) (same format as the training data): loss before training and after each "
                        "epoch (a warning where its prompts are training prompts)")
    p.add_argument("--max_length", type=int, default=5000,
                   help="longest sequence (prompt + response + EOS) in tokens; longer SFT examples are an error "
                        "(the paper: max_length 5000, truncation=error)")
    # model
    p.add_argument("--init", default=None, help="starting checkpoint (Hugging Face directory)")
    p.add_argument("--init_tiny", default=False, type=common.str2bool,
                   help="instead of --init: a fresh tiny model (needs --tokenizer; sized by the --tiny_* settings)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the --init checkpoint's; with "
                   "--init, one of its vocabulary: another chat template or EOS)")
    p.add_argument("--tiny_arch", default="Qwen2ForCausalLM", choices=tuple(SUPPORTED),
                   help="--init_tiny: architecture")
    p.add_argument("--tiny_hidden_size", type=int, default=128, help="--init_tiny: hidden size")
    p.add_argument("--tiny_layers", type=int, default=4, help="--init_tiny: number of layers")
    p.add_argument("--tiny_heads", type=int, default=4, help="--init_tiny: attention heads")
    p.add_argument("--tiny_kv_heads", type=int, default=2, help="--init_tiny: key/value heads")
    p.add_argument("--tiny_context", type=int, default=2048, help="--init_tiny: max_position_embeddings")
    # optimisation
    p.add_argument("--epochs", type=int, default=2, help="passes over the data (paper: 2)")
    p.add_argument("--global_batch", type=int, default=32,
                   help="sequences per optimizer step, over all ranks and micro-batches "
                        "(paper: 32; 64 for two K&K runs); "
                        "an incomplete last batch of an epoch is dropped, like the paper's drop_last sampler")
    p.add_argument("--micro_batch_tokens", type=int, default=16384,
                   help="at most this many tokens per packed micro-batch (memory knob; a longer sequence goes alone)")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (paper: 1e-5)")
    p.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1 (paper: 0.9)")
    p.add_argument("--beta2", type=float, default=0.999, help="AdamW beta2 (paper: 0.999)")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (paper: 0)")
    p.add_argument("--warmup_ratio", type=float, default=0.0, help="fraction of steps of linear warmup (paper: 0); "
                   "the first update runs at lr/warmup_steps, not at 0 as in Hugging Face's schedule (see lr_at)")
    p.add_argument("--min_lr_ratio", type=float, default=0.0, help="cosine decays to lr * this (paper: 0)")
    p.add_argument("--grad_clip", type=float, default=1.0,
                   help="clip the global gradient norm to this (paper: 1.0; 0 = off)")
    # The paper's modified verl fsdp_sft_trainer averages over each sequence's response tokens, then over
    # sequences (seq_mean); most pre-training takes one token mean over the batch (token_mean), as verl's stock
    # trainer nearly does (a token mean per micro-batch, averaged over its micro-batches).
    p.add_argument("--loss_reduction", default="seq_mean", choices=("seq_mean", "token_mean"),
                   help="seq_mean: mean over each sequence's loss tokens, then over the global batch's sequences "
                        "(paper); token_mean: mean over all loss tokens of the global batch")
    p.add_argument("--adam_8bit", default=False, type=common.str2bool,
                   help="bitsandbytes 8-bit AdamW on CUDA when installed (2 bytes of state per parameter instead "
                        "of 8; on FSDP-sharded weights it runs on each rank's shards); else torch AdamW, with a note")
    p.add_argument("--gradient_checkpointing",
                   default=False, type=common.str2bool,
                   help="recompute each block in backward (less activation memory, ~30%% slower)")
    parallel.add_recompute_args(p, auto_fraction=gpu_memory.AUTO_MEMORY_FRACTION)
    p.add_argument("--dtype", default="auto",
                   help="compute dtype, and that of the saved weights: auto (bfloat16 on CUDA, "
                   "float32 on CPU), bfloat16, float32; the optimizer always updates sharded fp32 weights")
    p.add_argument("--seed", type=int, default=1, help="seed of the data order (and of --init_tiny weights)")
    # checkpoints and logging
    p.add_argument("--out_dir", default="runs/sft", help="run directory: checkpoints, final/, metrics.jsonl")
    p.add_argument("--save_every", type=int, default=0,
                   help="also checkpoint every this many steps (0 = only at epoch ends); see --keep_last")
    p.add_argument("--keep_last", type=int, default=2,
                   help="checkpoints kept resumable (fp32 weights + optimizer shards); older ones keep only their "
                        "weights if they end an epoch; a finished run keeps one")
    p.add_argument("--resume", default=False, type=common.str2bool,
                   help="continue from the newest complete checkpoint in --out_dir (a finished run is left as it is)")
    p.add_argument("--max_bad_steps", type=int, default=3,
                   help="stop after this many consecutive steps with a non-finite loss or gradient norm (each "
                        "is skipped: no weight changes); the last good checkpoint stays")
    p.add_argument("--stop_at_step", type=int, default=0,
                   help="checkpoint and stop once this global step is done (the schedule still spans all --epochs); "
                        "for time-boxed jobs and tests; 0 = run to the end")
    p.add_argument("--progress", type=common.str2bool, default=True, help=common.PROGRESS_HELP)
    return p


# -----------------------------------------------------------------------------
# data: one example = {"input_ids", "start", "id", "file", "line"}; targets input_ids[start:] carry the loss


def looks_like_jsonl(document):
    """Whether a plain-text document's first line is a JSON object with a "text" field (a jsonl file not so named)."""
    try:
        first = common.json_loads(document.split("\n", 1)[0])
    except common.JSON_ERRORS:
        return False
    return isinstance(first, dict) and "text" in first


def load_text_examples(paths, tokenizer, max_length):
    """Pre-training documents: jsonl with a "text" field (one document per line; a file named *.jsonl or *.json) or
    plain text (any other name; documents separated by blank lines). Each document + EOS is split into sequences of
    at most max_length tokens, each after the first beginning with the previous one's last token; the loss is on
    every token after the first of each sequence, so on every token of the document after its first, its EOS
    included, once."""
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no eos_token; pre-training appends EOS to every document")
    if max_length < 2:
        raise UserError(f"--max_length {max_length}: pre-training needs at least 2 tokens a sequence (one to predict)")
    examples = []
    for path in paths:
        docs = []
        if path.lower().endswith((".jsonl", ".json")):
            with common.open_lines(path) as lines:
                for lineno, rec in lines:
                    if not isinstance(rec.get("text"), str) or not rec["text"]:
                        raise UserError(f"{path}:{lineno}: " + ("missing field 'text'" if "text" not in rec
                                                                else "field 'text' must be a non-empty string"))
                    docs.append((lineno, rec["text"]))
        else:
            buf, first = [], 0
            for lineno, line in common.text_lines(path):
                if line.strip():
                    first = first or lineno
                    buf.append(line)
                elif buf:
                    docs.append((first, "".join(buf).rstrip("\n")))
                    buf, first = [], 0
            if buf:
                docs.append((first, "".join(buf).rstrip("\n")))
            if docs and looks_like_jsonl(docs[0][1]):  # (its JSON, escapes and all, would be the text trained on)
                raise UserError(f"{path}: plain text by its name, but its first line is a JSON object with a 'text' "
                                f"field: name it *.jsonl to read one document a line from that field")
        if not docs:
            raise UserError(f"{path}: no text")
        tokens = tasks.encode_prompts(tokenizer, [t for _, t in docs])
        for (lineno, _), ids in zip(docs, tokens):
            # (EOS ends a document: one inside would join two; chat terminators are text here)
            tasks.check_no_stop_tokens(path, lineno, tokenizer, ids, {tokenizer.eos_token_id}, field="text")
            ids = ids + [tokenizer.eos_token_id]
            # (cut apart, a piece's first token would be predicted by none and a one-token tail, the EOS, dropped)
            for k, s in enumerate(range(0, len(ids) - 1, max_length - 1)):
                examples.append({"input_ids": ids[s:s + max_length], "start": 1,
                                 "id": f"{os.path.basename(path)}:{lineno}:{k}", "task": None, "file": path,
                                 "line": lineno})
    return examples


def num_loss_tokens(example):
    return len(example["input_ids"]) - example["start"]


# -----------------------------------------------------------------------------
# batching: global batch -> ranks -> packed micro-batches, all by length and deterministic


def split_by_length(indices, lengths, parts):
    """Split indices into `parts` groups of similar token totals (longest first, each to the lightest group)."""
    groups, load = [[] for _ in range(parts)], [0] * parts
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        g = min(range(parts), key=lambda k: (load[k], k))
        groups[g].append(i)
        load[g] += lengths[i]
    return groups


# -----------------------------------------------------------------------------
# the loss


def packed_nll(model, examples):
    """One packed forward over examples (model.response_logprobs: the lm_head and log-softmax run only where there is
    loss, so a 300-token prompt costs no vocabulary-wide softmax). Returns (nll, seq), one entry per loss token
    (response or EOS) in packed order: nll = -log p(token | the tokens before it), seq = the index of its example."""
    nll = -response_logprobs(model, [e["input_ids"][:e["start"]] for e in examples],
                             [e["input_ids"][e["start"]:] for e in examples])
    seq = torch.repeat_interleave(torch.arange(len(examples)), torch.tensor([num_loss_tokens(e) for e in examples]))
    return nll, seq.to(nll.device)


def reduce_loss(nll, seq, examples, reduction, num_seqs=None, num_tokens=None):
    """The loss of a (micro-)batch as its share of the global batch's loss.

    seq_mean:   sum_i mean_{t in i} nll_t / num_seqs   (num_seqs = sequences in the global batch)
    token_mean: sum_t nll_t / num_tokens               (num_tokens = loss tokens in the global batch)
    Defaults: this batch alone. Summing the results over micro-batches and ranks gives the global loss.
    """
    if reduction == "token_mean":
        return nll.sum() / (num_tokens or nll.numel())
    if reduction == "seq_mean":
        per_token = torch.tensor([1.0 / num_loss_tokens(e) for e in examples], device=nll.device, dtype=nll.dtype)
        return (nll * per_token[seq]).sum() / (num_seqs or len(examples))
    raise UserError(f"unknown loss reduction {reduction!r}")


@torch.no_grad()
def held_out_loss(model, examples, reduction, micro_batch_tokens, device):
    """Held-out loss (same reduction as training) over examples split across ranks."""
    lengths = [len(e["input_ids"]) for e in examples]
    mine = parallel.rank_share(list(range(len(examples))), common.rank(), common.world_size())
    totals = torch.zeros(2, dtype=torch.float64)
    for mb in parallel.even_out(parallel.micro_batches(lengths, micro_batch_tokens, mine)):
        if mb is None:  # this rank is done; join the others' collectives
            idle_pass(model, backward=False)
            continue
        exs = [examples[i] for i in mb]
        nll, seq = packed_nll(model, exs)
        if reduction == "token_mean":
            totals += torch.tensor([float(nll.sum()), nll.numel()], dtype=torch.float64)
        else:
            totals += torch.tensor([float(reduce_loss(nll, seq, exs, "seq_mean", num_seqs=1)), len(exs)],
                                   dtype=torch.float64)
    totals = parallel.all_reduce(totals)
    return float(totals[0] / totals[1])


# -----------------------------------------------------------------------------
# schedule, RNG and checkpoint helpers


def lr_at(step, total_steps, lr, warmup_ratio, min_lr_ratio):
    """Linear warmup then cosine to lr * min_lr_ratio, as HF's get_cosine_schedule_with_warmup (step 0 = the first
    update) except that warm-up update k (1-based) runs at lr * k / warmup, not (k - 1) / warmup: HF's first update
    runs at lr 0 and spends its batch on AdamW's moments without changing a weight. train_rl.py's warm-up (grpo.lr_at)
    counts the same way. (The paper's SFT has no warm-up, so both give its schedule.)"""
    warmup = int(warmup_ratio * total_steps)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def rng_state():
    np_state = np.random.get_state()
    state = {"python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # this rank's GPU only: a resume may see fewer GPUs (CUDA_VISIBLE_DEVICES)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]  # saved by rank 0, whose GPU was the first (older runs saved every visible GPU's)
        torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, list) else cuda)


# the settings a resumed run must share with the original (others, e.g. --micro_batch_tokens, may change)
RUN_IDENTITY = ("data", "pretrain_text", "max_length", "init", "init_tiny", "epochs", "global_batch", "lr", "beta1",
                "beta2", "weight_decay", "warmup_ratio", "min_lr_ratio", "grad_clip", "loss_reduction", "seed",
                "adam_8bit")


# -----------------------------------------------------------------------------


def main(argv=None):
    parser = get_parser()
    args = common.parse_settings(parser, argv)

    # ---- checks that need no model
    if bool(args.data) == bool(args.pretrain_text):
        raise UserError("give exactly one of --data (SFT jsonl) and --pretrain_text (text to pre-train on)")
    common.check_distinct_inputs([("--pretrain_text" if args.pretrain_text else "--data", path)
                                  for path in args.pretrain_text or args.data]
                                 + [("--val_data", path) for path in args.val_data or []])
    if bool(args.init) == bool(args.init_tiny):
        raise UserError("give exactly one of --init CHECKPOINT_DIR and --init_tiny")
    if args.init_tiny and not args.tokenizer:
        raise UserError("--init_tiny needs --tokenizer DIR")
    common.check_positive(args, "global_batch", "micro_batch_tokens", "max_length", "epochs", "keep_last",
                          "max_bad_steps")
    common.check_non_negative(args, "save_every", "stop_at_step")
    common.check_optimizer(args)
    if not (0 <= args.warmup_ratio < 1 and 0 <= args.min_lr_ratio <= 1):
        raise UserError(f"--warmup_ratio must be in [0, 1) and --min_lr_ratio in [0, 1] (fractions: 0.05 is 5 %), got "
                        f"{args.warmup_ratio} and {args.min_lr_ratio}")
    tiny = ("tiny_arch", "tiny_hidden_size", "tiny_layers", "tiny_heads", "tiny_kv_heads", "tiny_context")
    common.note_unused(args, parser, tiny, not args.init_tiny, "--init_tiny true")  # (--init's config sizes it)
    if args.init_tiny:
        common.check_positive(args, *tiny[1:])
        if args.tiny_hidden_size % args.tiny_heads or args.tiny_heads % args.tiny_kv_heads:
            raise UserError(f"--tiny_heads {args.tiny_heads} must divide --tiny_hidden_size {args.tiny_hidden_size}, "
                            f"and --tiny_kv_heads {args.tiny_kv_heads} must divide --tiny_heads")
        if args.tiny_hidden_size // args.tiny_heads % 2:  # RoPE turns the head's dimensions in pairs
            raise UserError(f"--tiny_hidden_size {args.tiny_hidden_size} / --tiny_heads {args.tiny_heads} = "
                            f"{args.tiny_hidden_size // args.tiny_heads} dimensions a head; RoPE needs an even number")

    rank, world, device = parallel.dist_setup(args)
    dtype = parse_dtype(args.dtype, device, training=True)  # compute, and saved weights
    common.seed_everything(args.seed)
    final_dir = os.path.join(args.out_dir, "final")
    # (a run past its last step has only its final save left, which needs no optimizer state: its shards are not read,
    # so a finished run whose shards were deleted to free the disk still says "nothing to do")
    resume_from = ckpt.resume_checkpoint(args.out_dir, args.resume,
                                         needs_shard=lambda state: state["step"] < state.get("total_steps", math.inf))

    def no_earlier_final():  # a fresh run: a final/ there is another run's
        if os.path.isdir(final_dir):
            raise UserError(f"{final_dir} holds the final weights of an earlier run, and {args.out_dir} no checkpoint "
                            f"of it: this fresh run would pass them for its own until its final save (and for good if "
                            f"stopped at it); move {final_dir} away, or choose another --out_dir")
    if not resume_from:
        parallel.on_rank0(no_earlier_final)

    # ---- tokenizer and data
    if resume_from:  # the checkpoint holds the run's tokenizer
        model_cfg = read_config(resume_from[1])
        tokenizer = load_tokenizer(resume_from[1])
    elif args.init_tiny:
        tokenizer = load_tokenizer(args.tokenizer)
        cfg = tiny_config(len(tokenizer), hidden_size=args.tiny_hidden_size, num_layers=args.tiny_layers,
                          num_heads=args.tiny_heads, num_kv_heads=args.tiny_kv_heads,
                          max_position_embeddings=args.tiny_context, arch=args.tiny_arch)
        model_cfg = None
    else:
        model_cfg = read_config(args.init)  # a clear error when it is no checkpoint
        tokenizer = load_tokenizer(args.tokenizer or args.init)
        tasks.check_vocab(tokenizer, model_cfg.vocab_size, f"--tokenizer {args.tokenizer or args.init} with --init "
                                                           f"{args.init}")
        if args.tokenizer and any(os.path.isfile(os.path.join(args.init, n)) for n in tasks.VOCABULARY_FILES):
            # (another chat template or EOS is what --tokenizer is for; other ids would read the embedding's rows
            # as other tokens: a loss of 12 where 0.5 was, and that tokenizer saved with the weights)
            if problem := tasks.vocabulary_difference(load_tokenizer(args.init), tokenizer):
                raise UserError(f"--tokenizer {args.tokenizer}: not the tokenizer of --init {args.init} ({problem}); "
                                f"give a tokenizer of the same vocabulary (another chat template or EOS is fine)")
    context = args.tiny_context if model_cfg is None else model_cfg.max_position_embeddings
    max_length, limit = tasks.sft_length_limit(args.max_length, context)
    if args.pretrain_text:  # (documents are split into sequences of max_length: no limit refuses one)
        train = load_text_examples(args.pretrain_text, tokenizer, max_length)
        val = load_text_examples(args.val_data, tokenizer, max_length) if args.val_data else None
    else:
        train = tasks.load_sft_examples(args.data, tokenizer, max_length, limit)
        val = tasks.load_sft_examples(args.val_data, tokenizer, max_length, limit) if args.val_data else None
    if val and not args.pretrain_text:
        tasks.warn_held_out_overlap([tuple(e["input_ids"][:e["start"]]) for e in train],
                                    [tuple(e["input_ids"][:e["start"]]) for e in val],
                                    f"--data {' '.join(args.data)}", f"--val_data {' '.join(args.val_data)}")
    digests = [common.data_digest([e["input_ids"], e["start"]] for e in part or []) for part in (train, val)]
    parallel.same_on_every_rank(digests, " ".join((args.pretrain_text or args.data) + (args.val_data or [])))
    lengths = [len(e["input_ids"]) for e in train]
    steps_per_epoch = len(train) // args.global_batch
    if steps_per_epoch == 0:
        raise UserError(f"{len(train)} training examples < --global_batch {args.global_batch}: not one full step")
    if args.global_batch < world:
        raise UserError(f"--global_batch {args.global_batch} < {world} ranks: every rank needs a sequence per step")
    total_steps = steps_per_epoch * args.epochs
    warmup = int(args.warmup_ratio * total_steps)  # (as lr_at rounds it: 1 step runs at the full lr)
    if 0 < args.warmup_ratio and warmup <= 1:
        print0(f"note: --warmup_ratio {args.warmup_ratio:g} of {total_steps} steps is {warmup} warm-up step(s), "
               f"rounded down: no warm-up (2 steps need at least {2 / total_steps:.3g})")
    identity = {k: getattr(args, k) for k in RUN_IDENTITY} | {
        "num_examples": len(train), "data_digest": digests[0],
        **parallel.compute_identity(dtype, device)}
    # the held-out set, where the run has one: a resume on another would log two measures as one curve (compared where
    # the run and the resume both have one)
    identity |= {"val_data_digest": digests[1] if val else None}

    # ---- model, optimizer, resume
    state = None
    if resume_from:
        step, resume_dir, state, _ = resume_from  # (its shard: below, if the run goes on)
        # a finished run's compute is not compared (nothing is left to compute: it may be re-run on other hardware), nor
        # the device of one whose final save alone is left (a cast of the last checkpoint's weights, in its dtype)
        finished = step >= total_steps and os.path.isfile(os.path.join(final_dir, "config.json"))
        ignore = (parallel.COMPUTE_KEYS if finished else ("compute_device", "compute_kernels") if step >= total_steps
                  else ())
        # (after the last step only the final save is left, of the weights its checkpoint holds: no optimizer state,
        # so at any number of ranks too); the rank count first: at another one the run cannot go on, whatever else
        if step < state.get("total_steps", math.inf):  # (its own run had steps left; else the settings say why)
            ckpt.require_world_size(resume_from)
        parallel.on_rank0(lambda: ckpt.check_run_identity(  # (rank 0 decides: it looks at files, samefile)
            args.out_dir, state["identity"], identity,
            recorded_since=("data_digest", "adam_8bit", *parallel.COMPUTE_KEYS), ignore=ignore,
            when_both=("val_data_digest",)))
        # the keep rules of the prune at the resume (ckpt.prune_at_resume): the epoch ends' weights stay
        keep_rules = (args.keep_last if step < total_steps else 1, range(0, total_steps + 1, steps_per_epoch))
        if finished:  # (at any number of ranks)
            ckpt.prune_at_resume(args.out_dir, step, *keep_rules)
            print0(f"{args.out_dir}: already finished ({step}/{total_steps} steps); "
                   f"final weights in {final_dir}; nothing to do")
            parallel.dist_cleanup()
            return 0
        train_shard = ckpt.require_shard(resume_from) if step < total_steps else None
        model = load_model(resume_dir, dtype=torch.float32, device=device)
        print0(f"resuming from {resume_dir} (step {step}/{total_steps})")
    elif args.init_tiny:
        model = build_model(cfg, seed=args.seed).to(device)
    else:
        model = load_model(args.init, dtype=torch.float32, device=device)
    start_step = state["step"] if state else 0
    why = gpu_memory.resolve_recompute(args, lambda every: gpu_memory.memory_estimate(
        model.config, world=world, sft_tokens=max(args.micro_batch_tokens, max(lengths)), checkpoint_every=every,
        checkpoint_keep=args.checkpoint_keep, adam_8bit=args.adam_8bit and ckpt.eight_bit_adam_installed(),
        compute_bytes=dtype.itemsize)["sft_peak"],
        torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None)
    if why:
        print0(why)
    if state:  # (settings resolved as the run resolved them: --checkpoint_every auto)
        ckpt.note_changed_settings(state.get("settings"), vars(args), f"step {start_step} was saved")
    model = parallel.prepare_training(model, dtype, args)
    model.train()
    optimizer = ckpt.make_optimizer(model.parameters(), args.lr, (args.beta1, args.beta2), args.weight_decay,
                                    args.adam_8bit)
    if state:
        if train_shard is not None:
            ckpt.load_local_train_state(model, optimizer, train_shard)
        set_rng_state(state["rng"])
    bad_steps_total, bad_streak = (state or {}).get("bad_steps_total", 0), (state or {}).get("bad_streak", 0)

    n_loss = sum(num_loss_tokens(e) for e in train)
    print0(f"{'pre-training' if args.pretrain_text else 'SFT'}: {len(train)} sequences ({sum(lengths)} tokens, "
           f"{n_loss} with loss), {steps_per_epoch} steps/epoch x {args.epochs} epochs = {total_steps} steps of "
           f"{args.global_batch} sequences on {world} rank(s); model {model.num_params() / 1e6:.1f}M params; "
           f"loss {args.loss_reduction}")
    if len(train) % args.global_batch:
        print0(f"note: {len(train) % args.global_batch} sequences per epoch are dropped (incomplete last batch)")
    if resume_from:  # (accepted: nothing above refused it)
        ckpt.prune_at_resume(args.out_dir, start_step, *keep_rules)
    log_metrics = ckpt.metrics_log(args.out_dir, start_step, settings=vars(args))  # resumed: drops records after it

    def save(step):
        ckpt.save_checkpoint(args.out_dir, step, model, tokenizer, optimizer,
                             {"rng": rng_state(), "identity": identity, "bad_steps_total": bad_steps_total,
                              "bad_streak": bad_streak, "epoch": step // steps_per_epoch,
                              "step_in_epoch": step % steps_per_epoch, "total_steps": total_steps,
                              "settings": vars(args)}, dtype,
                             # the newest --keep_last stay resumable; the weights of every epoch end stay
                             args.keep_last if step < total_steps else 1, range(0, total_steps + 1, steps_per_epoch))

    def validate(step):
        if val is None:
            return
        model.eval()
        loss = held_out_loss(model, val, args.loss_reduction, args.micro_batch_tokens, device)
        model.train()
        finite = math.isfinite(loss)  # a non-finite one is logged as null, as a skipped step's loss is
        print0(f"step {step}: held-out loss {loss:.4f} ({len(val)} sequences)" + ("" if finite else ", not finite"))
        log_metrics({"step": step, "val_loss": loss if finite else None})

    if start_step == 0:
        validate(0)

    # ---- the loop
    # (past the last step only the final save is left, whatever --stop_at_step says)
    stop = total_steps if start_step >= total_steps else min(total_steps, args.stop_at_step or total_steps)
    bar = common.progress_bar(total_steps, "sft", args.progress, initial=start_step)
    # a log line above the bar on a terminal; printed plainly into a log file (bar.write redraws the bar each time)
    print_step = bar.write if rank == 0 and args.progress and sys.stderr.isatty() else print0
    order, order_epoch = None, -1
    for step in range(start_step, stop):
        t0 = time.time()
        epoch, k = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = parallel.epoch_order(len(train), args.seed, epoch), epoch
        batch = order[k * args.global_batch:(k + 1) * args.global_batch]
        batch_tokens = sum(num_loss_tokens(train[i]) for i in batch)  # every rank knows the whole global batch
        mine = split_by_length(batch, lengths, world)[rank]
        lr = lr_at(step, total_steps, args.lr, args.warmup_ratio, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), dtype=torch.float64)
        mbs = parallel.micro_batches(lengths, args.micro_batch_tokens, mine)
        for mb in parallel.even_out(mbs):
            if mb is None:  # this rank is done; join the others' collectives
                idle_pass(model)
                continue
            exs = [train[i] for i in mb]
            nll, seq = packed_nll(model, exs)
            loss = reduce_loss(nll, seq, exs, args.loss_reduction, num_seqs=len(batch), num_tokens=batch_tokens)
            loss.backward()  # FSDP reduce-scatters and sums over ranks; .grad accumulates over micro-batches
            loss_sum += float(loss.detach())
        loss_sum = parallel.all_reduce(loss_sum)
        grad_norm = ckpt.clip_grad_norm(model.parameters(), args.grad_clip)
        # both numbers are all-reduced, so every rank takes the same branch; a NaN step would corrupt every weight
        finite = math.isfinite(float(loss_sum)) and math.isfinite(grad_norm)
        if finite:
            optimizer.step()
        else:
            print0(f"warning: step {step + 1}: non-finite loss {float(loss_sum)} or grad norm {grad_norm}; "
                   f"update skipped")
        bad_steps_total, bad_streak = bad_steps_total + (not finite), 0 if finite else bad_streak + 1
        optimizer.zero_grad(set_to_none=True)
        dt = time.time() - t0
        tokens = sum(lengths[i] for i in batch)
        # a skipped step logs null for its loss and grad norm, as train_rl does (and metrics_log any non-finite value)
        rec = {"step": step + 1, "epoch": epoch, "loss": float(loss_sum) if finite else None, "lr": lr,
               "grad_norm": float(grad_norm) if finite else None,
               "bad_steps": bad_steps_total, "tokens": tokens, "tokens_per_s": tokens / dt, "time_s": dt}
        print_step(f"step {step + 1}/{total_steps} | epoch {epoch + 1} | "
                   + (f"loss {rec['loss']:.4f} | lr {lr:.3e} | grad norm {rec['grad_norm']:.3f} | " if finite
                      else f"no update | lr {lr:.3e} | ")
                   + f"{rec['tokens_per_s']:.0f} tok/s | {len(mbs)} micro-batches | {dt:.2f} s")
        log_metrics(rec)
        bar.update(1)
        done = step + 1
        if bad_streak >= args.max_bad_steps:
            bar.close()
            print0(f"error: {bad_streak} consecutive steps with non-finite loss or gradients; stopping. "
                   f"The last good checkpoint is kept in {args.out_dir}")
            parallel.dist_cleanup()
            return 1
        if done % steps_per_epoch == 0:
            validate(done)
        if done % steps_per_epoch == 0 or done == stop or (args.save_every and done % args.save_every == 0):
            save(done)
    bar.close()

    if stop <= start_step < total_steps:
        print0(f"already at step {start_step}/{total_steps}, at or past --stop_at_step {args.stop_at_step}: nothing "
               f"done; continue with --resume true and a later --stop_at_step")
    elif stop < total_steps:
        print0(f"stopped at step {stop}/{total_steps} (--stop_at_step); continue with --resume true")
    else:
        final = full_copy(model, dtype, device="cpu", on_rank=0)
        parallel.write_on_rank0(lambda: save_model(final, final_dir, tokenizer), args.out_dir)
        print0(f"done: {total_steps} steps; final weights in {final_dir}")
    parallel.dist_cleanup()
    return 0


if __name__ == "__main__":
    common.run_main(main)
