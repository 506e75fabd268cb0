"""
The tiny preset's "base model" inputs, built here because nothing can be downloaded for the CPU preset:

  OUT_DIR/pretrain.jsonl   {"text": ...} documents: K&K puzzles of their own random stream (never one of the
                           --exclude splits, nor a logical twin of an --exclude_logic one, nor its swap
                           twin with --exclude_swap_twins) in the plain Question/Answer format, not the SFT
                           data's chat format
  OUT_DIR/tokenizer/       a byte-level BPE with Qwen-style special tokens and chat template (build_tokenizer)

redistill_sft.py --init_tiny true --pretrain_text OUT_DIR/pretrain.jsonl then pre-trains the base on it.
--text_format picks what follows each question (answer, trace, table, mixed); --drill_per_people adds claim
drills (one claim's truth value under every assignment: the table's one hard step). --probe CKPT instead measures
what a checkpoint knows in this pre-training format: greedy answers to a split's questions, asked as the documents
ask them (the ceiling a cold start and GRPO can bring out of the base; docs/tiny_preset.md).

  python tiny_base.py --out_dir runs/tiny/base_data --exclude runs/tiny/data/sft.jsonl \\
      --exclude_logic runs/tiny/data/test.jsonl
  python tiny_base.py --probe runs/tiny/base/final --probe_split runs/tiny/data/test.jsonl \\
      --probe_out runs/tiny/base_probe.json
"""
import json
import os
import random
import types

import numpy as np
import torch

import common
import engine
import kk_data
import tasks
from model import load_model
from tasks import load_tokenizer

# -----------------------------------------------------------------------------
# tiny tokenizers, built offline (the CPU preset and the tests use these; tiny models: model.tiny_config)

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


# Qwen2's pre-tokenizer split (digits one by one). Our tiny tokenizers use it too, so a tokenizer folder
# tokenizes the same whether transformers loads it alone or, beside a qwen2 config.json, as Qwen2Tokenizer.
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


BYTE_VOCAB = 256 + 3  # the smallest vocabulary build_tokenizer makes: the byte alphabet and the 3 special tokens


def build_tokenizer(texts, vocab_size=1024, path=None, pad_to=None):
    """Train a small byte-level BPE on `texts` with Qwen2's normaliser and pre-tokenizer, Qwen-style special
    tokens (<|endoftext|> = EOS, <|im_start|>, <|im_end|>) and chat template. Saved in HF format if path.

    pad_to: pad the vocabulary with entries that encoding never produces ("<unused_N>") up to this size, so
    that a random model of a real vocabulary (151,936 for Qwen2.5) can decode every id it samples."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # (BYTE_VOCAB counts them)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if pad_to and pad_to > tok.get_vocab_size():
        spec = json.loads(tok.to_str())
        vocab = spec["model"]["vocab"]
        for i in range(pad_to):
            if len(vocab) == pad_to:
                break
            vocab.setdefault(f"<unused_{i}>", len(vocab))
        tok = Tokenizer.from_str(json.dumps(spec))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                 additional_special_tokens=specials[1:])
    hf.chat_template = CHAT_TEMPLATE
    if path:
        hf.save_pretrained(path)
    return hf


# -----------------------------------------------------------------------------
# the script: pre-training text and tokenizer, or --probe

def get_parser():
    p = common.new_parser("K&K pre-training text and a tiny BPE tokenizer for the tiny preset's base model.")
    p.add_argument("--out_dir", default="runs/tiny/base_data", help="writes pretrain.jsonl and tokenizer/ here")
    # defaults: the tiny preset's corpus (config/tiny.sh; two people make only ~400 distinct puzzles, so 150 of them)
    p.add_argument("--people", default="2-3", help="people counts of the pre-training puzzles (range 2-4 or list 2,3)")
    p.add_argument("--per_people", default="150,6000",
                   help="puzzles per people count (one number, or one per count)")
    p.add_argument("--seed", type=int, default=300000,
                   help="seed of the pre-training puzzle stream (differs from the splits')")
    p.add_argument("--exclude", nargs="*", default=[],
                   help="split files whose puzzles must not appear in the text, renamed, reordered or with and / or "
                   "/ <=> operands swapped either (kk_data.puzzle_key; reproduce.sh: the SFT pool)")
    p.add_argument("--exclude_logic", nargs="*", default=[],
                   help="split files whose puzzles' logical twins must not appear either: any puzzle with the same "
                   "logic, however worded (kk_data.logic_key; reproduce.sh: the test split)")
    p.add_argument("--exclude_swap_twins", type=common.str2bool, default=False,
                   help="true: the --exclude_logic splits' swap twins must not appear either (knights and knaves "
                   "exchanged, with every role of the answer flipped: the same reasoning; "
                   "kk_data.logic_key(swapped=True); kk_data.py --test_dedup swap does it for the RL and SFT splits); "
                   "false: they may, and a note counts them")
    p.add_argument("--text_format", default="table", choices=("answer", "trace", "table", "mixed"),
                   help="what follows each question: answer (the answer sentence alone), trace (the official trace "
                        "and boxed answer), table (the truth-table chain of thought, kk_data.table_rows), mixed "
                        "(--trace_fraction of the documents as trace, the rest as answer)")
    p.add_argument("--trace_fraction", type=float, default=0.5,
                   help="--text_format mixed: share of documents with the trace")
    p.add_argument("--drill_people", default="2-3", help="people counts of the claim drills (range or list)")
    p.add_argument("--drill_per_people", default="3000,9000",
                   help="claim drills per people count (one number, or one per count; 0 = none)")
    p.add_argument("--fixed_names", type=common.str2bool, default=False,
                   help="person i is always the i-th official name "
                        "(as kk_data.py --fixed_names; use the splits' setting)")
    p.add_argument("--vocab_size", type=int, default=1024,
                   help="BPE vocabulary size (special tokens included; at least 259: the 256 bytes and 3 specials)")
    # --probe mode: write no corpus; score a checkpoint's greedy answers in the pre-training format
    p.add_argument("--probe", default="",
                   help="checkpoint to probe instead of writing the corpus: its greedy answers to --probe_split's "
                        "questions, asked in the pre-training format (accuracy overall and per people count)")
    p.add_argument("--probe_split", default="", help="--probe: the K&K split whose questions are asked")
    p.add_argument("--probe_out", default="", help="--probe: JSON file of the result ('' = print only)")
    p.add_argument("--probe_tokens", type=int, default=120, help="--probe: answer budget in tokens (longer = wrong)")
    p.add_argument("--probe_batch", type=int, default=200, help="--probe: questions per generation batch")
    return p


def document(record, style):
    if style == "trace":  # "Question:\n...\nAnswer:\nLet's think step by step.\n" + the trace, as SFT files store it
        prompt = tasks.PLAIN_TEMPLATE.format(question=record["question"])
        return prompt + tasks.teacher_response_after(prompt, kk_data.teacher_response(record))
    if style == "table":
        return answer_prompt(record) + kk_data.teacher_response(record, "table")
    return answer_prompt(record) + kk_data.answer_text(record) + "."


def claim_drill(rng, names):
    """One random claim (the puzzles' own statement sampler) and its truth value on every table row."""
    n = len(names)
    statement = kk_data.sample_statement(rng, n, int(rng.integers(0, n)), kk_data.DEPTH)
    values = kk_data.truth_value(statement, kk_data.knight_masks(n))
    rows = [f"{kk_data.roles_text(roles)}: {'true' if values[column] else 'false'}"
            for roles, column in kk_data.table_order(n)]
    return f"Claim: {kk_data.format_statement(names, kk_data.KNIGHT_KNAVE, statement)}.\n" + "\n".join(rows)


def answer_prompt(record):
    """An answer-format document up to its answer: "Let's think step by step." dropped, the answer follows at once."""
    return tasks.PLAIN_TEMPLATE.format(question=record["question"]).rsplit("\n", 1)[0] + "\n"


def answer_line(response):
    """The answer of a pre-training-format response: the boxed answer of a table document, else the answer
    sentence of an answer document ("Emma is a knave, Liam is a knight.") without its period."""
    boxed = tasks.last_box(response)
    return boxed if boxed is not None else response.strip().split("\n")[0].rstrip(".")


# the pre-training documents as a task for engine.sample_responses: their prompt, scored on answer_line
ANSWER_FORMAT = types.SimpleNamespace(
    render_prompt=lambda record, tokenizer, template: answer_prompt(record),
    score=lambda response, record, finished: float(finished and kk_data.answer_is_right(answer_line(response), record)))


@torch.no_grad()
def probe(args):
    """Greedy accuracy of a checkpoint on a split, asked and scored in the answer-format documents' own format."""
    if not args.probe_split:
        raise common.UserError("--probe needs --probe_split (a K&K split file)")
    common.check_positive(args, "probe_tokens", "probe_batch")
    common.check_distinct_outputs([("--probe_out", args.probe_out)],
                                  [("--probe_split", args.probe_split)])  # (the split, overwritten by the result)
    records = kk_data.load_split(args.probe_split)
    if not records:
        raise common.UserError(f"{args.probe_split}: no records (an empty split): nothing to probe")
    model, tokenizer = load_model(args.probe), load_tokenizer(args.probe)
    model.eval()
    samples = engine.sample_responses(model, tokenizer, ANSWER_FORMAT, records, max_new_tokens=args.probe_tokens,
                                      batch_size=args.probe_batch, desc="probe", progress=False)
    per_people = {}
    for record, sample in zip(records, samples):
        answer = kk_data.parse_answer(answer_line(sample["response"]), record["names"], kk_data.record_kk(record))
        row = per_people.setdefault(str(record["people"]), {"n": 0, "well_formed": 0, "correct": 0})
        row["n"] += 1
        row["well_formed"] += sample["finished"] and answer is not None and set(answer) == set(record["names"])
        row["correct"] += tasks.is_correct(sample["reward"])
    result = {"checkpoint": args.probe, "split": args.probe_split, "format": "answer-format pre-training document",
              "n": len(records), "accuracy": sum(r["correct"] for r in per_people.values()) / len(records),
              "people": {k: {"n": r["n"], "accuracy": r["correct"] / r["n"], "well_formed": r["well_formed"] / r["n"]}
                         for k, r in sorted(per_people.items(), key=lambda kv: int(kv[0]))}}
    per = ", ".join(f"people {k} {r['accuracy']:.3f}" for k, r in result["people"].items())
    print(f"{args.probe} in its pre-training format, greedy: accuracy {result['accuracy']:.3f} ({per}) "
          f"on {len(records)} questions")
    if args.probe_out:
        common.lock_output([args.probe_out])
        common.write_json(args.probe_out, result)


def main(argv=None):
    parser = get_parser()
    args = common.parse_settings(parser, argv)
    corpus = ("out_dir", "people", "per_people", "seed", "exclude", "exclude_logic", "exclude_swap_twins",
              "text_format", "trace_fraction", "drill_people", "drill_per_people", "fixed_names", "vocab_size")
    common.note_unused(args, parser, corpus, bool(args.probe), "writing the corpus (no --probe)")
    if args.probe:
        return probe(args)
    # a probe's settings without --probe: a forgotten --probe would write a corpus over the default --out_dir's
    common.refuse_unused(args, parser, ("probe_split", "probe_out", "probe_tokens", "probe_batch"), "--probe",
                         "write the pre-training corpus")
    common.note_unused(args, parser, ("exclude_swap_twins",), not args.exclude_logic, "--exclude_logic")
    common.check_fraction(args, "trace_fraction")  # (outside, every document would silently be one format)
    common.note_unused(args, parser, ("trace_fraction",), args.text_format != "mixed", "--text_format mixed")
    if args.vocab_size < BYTE_VOCAB:  # (the BPE keeps its byte alphabet and the special tokens whatever is asked)
        raise common.UserError(f"--vocab_size {args.vocab_size}: at least {BYTE_VOCAB} (256 bytes and "
                               f"{BYTE_VOCAB - 256} special tokens)")
    people = kk_data.parse_people(args.people, "people")
    sizes = kk_data.parse_sizes(args.per_people, people, "per_people")
    used, excluded = set(), {path: kk_data.load_split(path) for path in args.exclude + args.exclude_logic}
    for split in excluded.values():
        used |= kk_data.statements_of(split)
    twins = set().union(*(kk_data.logic_keys(excluded[path]) for path in args.exclude_logic))
    if args.exclude_swap_twins:
        twins |= set().union(*(kk_data.logic_keys(excluded[path], swapped=True) for path in args.exclude_logic))
    records = [r for n, size in zip(people, sizes)
               for r in kk_data.generate(args.seed, n, size, used, fixed_names=args.fixed_names, twins=twins)]
    # what the rules let through: puzzle_key the same logic worded otherwise (none of the --exclude_logic splits':
    # skipped), --exclude_logic its splits' swap twins (the text's keys computed once, for both)
    renamed_only = [path for path in excluded if path not in args.exclude_logic]
    swap_twins_checked = [] if args.exclude_swap_twins else args.exclude_logic
    text_keys = kk_data.keys_to_compare(records, [r for path in renamed_only + swap_twins_checked
                                                  for r in excluded[path]])
    for path in renamed_only:
        if count := kk_data.logic_twins(excluded[path], text_keys):
            print(f"note: {count} of the {len(excluded[path])} puzzles of {path} have a logically equivalent puzzle in "
                  f"this text (the same claims' truth functions after renaming, worded otherwise: kk_data.logic_key)")
    for path in swap_twins_checked:
        if count := kk_data.logic_twins(excluded[path], text_keys, swapped=True):
            print(f"note: {count} of the {len(excluded[path])} puzzles of {path} have a swap twin in this text "
                  f"(knights and knaves exchanged, the answer flipped: the same reasoning; --exclude_swap_twins true "
                  f"skips them)")
    rng = random.Random(args.seed)
    rng.shuffle(records)
    if args.text_format == "mixed":
        docs = [{"text": document(r, "trace" if rng.random() < args.trace_fraction else "answer")} for r in records]
    else:
        docs = [{"text": document(r, args.text_format)} for r in records]
    drill_people = kk_data.parse_people(args.drill_people, "drill_people")
    drill_rng = np.random.default_rng(args.seed)
    for n, size in zip(drill_people, kk_data.parse_sizes(args.drill_per_people, drill_people, "drill_per_people")):
        for _ in range(size):
            names = kk_data.COMMON_NAMES[:n] if args.fixed_names else \
                [str(x) for x in drill_rng.choice(kk_data.COMMON_NAMES, size=n, replace=False)]
            docs.append({"text": claim_drill(drill_rng, names)})
    rng.shuffle(docs)
    if not docs:  # (before anything is written)
        raise common.UserError("no documents: --per_people and --drill_per_people are 0 for every people count")
    common.lock_output([os.path.join(args.out_dir, "pretrain.jsonl")])  # (and a killed run's leftovers go)
    common.write_jsonl(os.path.join(args.out_dir, "pretrain.jsonl"), docs)
    # the tokenizer sees the pre-training text, the official trace's wording and the chat prompt's system text
    texts = [d["text"] for d in docs] + [r["question"] + "\n" + kk_data.teacher_response(r) for r in records[:2000]]
    texts.append(tasks.SYSTEM_PROMPT)
    tok = build_tokenizer(texts, vocab_size=args.vocab_size, path=os.path.join(args.out_dir, "tokenizer"))
    lengths = [len(tok(d["text"])["input_ids"]) for d in docs]
    if len(tok) < args.vocab_size:  # (the BPE stops where the text has no pair left to merge)
        print(f"note: the text holds merges for {len(tok)} tokens, fewer than --vocab_size {args.vocab_size}")
    print(f"wrote {len(docs)} documents ({sum(lengths)} tokens, longest {max(lengths)}) to "
          f"{os.path.join(args.out_dir, 'pretrain.jsonl')} and a {len(tok)}-token tokenizer to "
          f"{os.path.join(args.out_dir, 'tokenizer')}")


if __name__ == "__main__":
    common.run_main(main)
