"""
The tiny preset's "base model" inputs: a K&K pre-training corpus and a small BPE tokenizer trained on it.

Nothing can be downloaded for the CPU preset, so reproduce.sh builds its own "base": this script writes
  OUT_DIR/pretrain.jsonl   {"text": ...} documents: K&K puzzles of their own random stream (never a puzzle
                           of the --exclude splits), in the plain Question/Answer format -- not the chat
                           format of the SFT data, so the cold start still has something to teach
  OUT_DIR/tokenizer/       byte-level BPE (model.build_tokenizer: Qwen-style specials and chat template)
and redistill_sft.py --init_tiny --pretrain_text OUT_DIR/pretrain.jsonl pre-trains the base on it.

--text_format chooses what a document holds after the question:
  answer  only the final answer sentence ("Answer: Zoey is a knave, Oliver is a knight.")
  trace   the official step-by-step trace and the boxed answer (what the teacher SFT data also holds)
  mixed   --trace_fraction of the documents as `trace`, the rest as `answer`

Usage:
  python tiny_base.py --out_dir runs/tiny/base_data --exclude data/tiny/test.jsonl data/tiny/sft.jsonl
"""
import argparse
import os
import random

import common
import kk_data
from model import build_tokenizer

parser = argparse.ArgumentParser(description="K&K pre-training text and a tiny BPE tokenizer for the tiny preset's base model.")
parser.add_argument("--out_dir", default="runs/tiny/base_data", help="writes pretrain.jsonl and tokenizer/ here")
parser.add_argument("--people", default="2-4", help="people counts of the pre-training puzzles (range 2-4 or list 2,3)")
parser.add_argument("--per_people", default="1000", help="puzzles per people count (one number, or one per count)")
parser.add_argument("--seed", type=int, default=300000, help="seed of the pre-training puzzle stream (differs from the splits')")
parser.add_argument("--exclude", nargs="*", default=[], help="split files whose puzzles must not appear in the text (test, SFT pool)")
parser.add_argument("--text_format", default="mixed", choices=("answer", "trace", "mixed"), help="what follows each question (see the docstring)")
parser.add_argument("--trace_fraction", type=float, default=0.5, help="--text_format mixed: share of documents with the trace")
parser.add_argument("--fixed_names", type=common.str2bool, default=False,
                    help="person i is always the i-th official name (as kk_data.py --fixed_names; use the splits' setting)")
parser.add_argument("--vocab_size", type=int, default=1024, help="BPE vocabulary size (special tokens included)")


def document(record, with_trace):
    question = common.PLAIN_TEMPLATE.format(question=record["question"])  # "Question:\n...\nAnswer:\nLet's think step by step."
    if with_trace:
        return question + "\n" + kk_data.teacher_response(record)
    question = question.rsplit("\n", 1)[0]  # drop "Let's think step by step.": the answer follows at once
    return question + "\n" + kk_data.answer_text(record) + "."


def main(argv=None):
    args = common.parse_settings(parser, argv)
    people = kk_data.parse_people(args.people, "people")
    sizes = kk_data.parse_sizes(args.per_people, people, "per_people")
    used = set()
    for path in args.exclude:
        used |= kk_data.statements_of(kk_data.load_split(path))
    records = [r for n, size in zip(people, sizes) for r in kk_data.generate(args.seed, n, size, used, fixed_names=args.fixed_names)]
    rng = random.Random(args.seed)
    rng.shuffle(records)
    fraction = {"answer": 0.0, "trace": 1.0, "mixed": args.trace_fraction}[args.text_format]
    docs = [{"text": document(r, rng.random() < fraction)} for r in records]
    common.write_jsonl(os.path.join(args.out_dir, "pretrain.jsonl"), docs)
    # the tokenizer sees the pre-training text, every teacher trace shape and the chat prompt's system text
    texts = [d["text"] for d in docs] + [r["question"] + "\n" + kk_data.teacher_response(r) for r in records[:2000]]
    texts.append(common.SYSTEM_PROMPT)
    tok = build_tokenizer(texts, vocab_size=args.vocab_size, path=os.path.join(args.out_dir, "tokenizer"))
    lengths = [len(tok(d["text"])["input_ids"]) for d in docs]
    print(f"wrote {len(docs)} documents ({sum(lengths)} tokens, longest {max(lengths)}) to "
          f"{os.path.join(args.out_dir, 'pretrain.jsonl')} and a {len(tok)}-token tokenizer to {os.path.join(args.out_dir, 'tokenizer')}")


if __name__ == "__main__":
    common.run_main(main)
