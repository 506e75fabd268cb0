"""
The tiny preset's "base model" inputs: a K&K pre-training corpus and a small BPE tokenizer trained on it.

Nothing can be downloaded for the CPU preset, so reproduce.sh builds its own "base": this script writes
  OUT_DIR/pretrain.jsonl   {"text": ...} documents: K&K puzzles of their own random stream (never a puzzle
                           of the --exclude splits), in the plain Question/Answer format -- not the chat
                           format of the SFT data, so the cold start still has something to teach
  OUT_DIR/tokenizer/       byte-level BPE (build_tokenizer below: Qwen-style specials and chat template)
and redistill_sft.py --init_tiny true --pretrain_text OUT_DIR/pretrain.jsonl pre-trains the base on it.

--text_format chooses what a document holds after the question:
  answer  only the final answer sentence ("Answer: Zoey is a knave, Oliver is a knight.")
  trace   the official step-by-step trace and the boxed answer (what the teacher SFT data also holds)
  table   the truth-table chain of thought (kk_data.table_rows) and the boxed answer
  mixed   --trace_fraction of the documents as `trace`, the rest as `answer`
--drill_per_people adds claim drills: one random claim and its truth value under every assignment of its
people, in the table's row order ("Claim: Liam is a knave and Emma is a knight.\nknight knight: false\n...").
They practise the table's one hard step, a claim's value under a row, without a puzzle around it.

--probe CKPT measures instead what a checkpoint knows in this pre-training format: greedy answers to a split's
questions, asked as the documents ask them ("Question:\n...\nAnswer:\n"), scored like kk_data.score on the
boxed answer of a table document or the answer sentence (no \boxed{}) of an answer document. For the base
this is its ability before any chat-format SFT: the ceiling a cold start and GRPO can bring out of it (README
"The tiny preset: results").

Usage:
  python tiny_base.py --out_dir runs/tiny/base_data --exclude data/tiny/test.jsonl data/tiny/sft.jsonl
  python tiny_base.py --probe runs/tiny/base/final --probe_split data/tiny/test.jsonl --probe_out runs/tiny/base_probe.json
"""
import argparse
import json
import os
import random
import types

import numpy as np
import torch

import common
import kk_data
from model import ModelConfig, SUPPORTED, Transformer, load_model, load_tokenizer

# -----------------------------------------------------------------------------
# tiny tokenizers and models, built offline (the CPU preset and the tests use these)

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


# Qwen2's pre-tokenizer split (digits one by one). Our tiny tokenizers use it too, so a tokenizer folder
# tokenizes the same whether transformers loads it alone or, beside a qwen2 config.json, as Qwen2Tokenizer.
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def build_tokenizer(texts, vocab_size=1024, path=None, pad_to=None):
    """Train a small byte-level BPE on `texts` with Qwen2's normaliser and pre-tokenizer, Qwen-style special
    tokens (<|endoftext|> = EOS, <|im_start|>, <|im_end|>) and chat template. Saved in HF format if path.

    pad_to: pad the vocabulary with entries that encoding never produces ("<unused_N>") up to this size, so
    that a random model of a real vocabulary (151,936 for Qwen2.5) can decode every id it samples."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
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


def tiny_config(vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=None,
                max_position_embeddings=2048, tie_word_embeddings=True, arch="Qwen2ForCausalLM", **extra) -> dict:
    """A HF config.json dict for a small model of one of the supported architectures."""
    cfg = {"architectures": [arch], "model_type": {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "llama"}[SUPPORTED[arch]],
           "vocab_size": vocab_size, "hidden_size": hidden_size, "intermediate_size": intermediate_size or 3 * hidden_size,
           "num_hidden_layers": num_layers, "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
           "head_dim": hidden_size // num_heads, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
           "max_position_embeddings": max_position_embeddings, "tie_word_embeddings": tie_word_embeddings,
           "attention_dropout": 0.0, "use_sliding_window": False, "bos_token_id": None, "eos_token_id": None}
    if SUPPORTED[arch] == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    if SUPPORTED[arch] == "qwen3":
        cfg.update(attention_bias=False)
    cfg.update(extra)
    return cfg


def build_model(hf_config: dict, seed=0, std=0.02) -> Transformer:
    """A Transformer of this config.json dict with fresh weights like HF's initialisation: normal(0, std)
    matrices, zero biases, unit norms."""
    model = Transformer(ModelConfig.from_hf(hf_config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


# -----------------------------------------------------------------------------
# the script: pre-training text and tokenizer, or --probe

parser = argparse.ArgumentParser(description="K&K pre-training text and a tiny BPE tokenizer for the tiny preset's base model.")
parser.add_argument("--out_dir", default="runs/tiny/base_data", help="writes pretrain.jsonl and tokenizer/ here")
parser.add_argument("--people", default="2-4", help="people counts of the pre-training puzzles (range 2-4 or list 2,3)")
parser.add_argument("--per_people", default="1000", help="puzzles per people count (one number, or one per count)")
parser.add_argument("--seed", type=int, default=300000, help="seed of the pre-training puzzle stream (differs from the splits')")
parser.add_argument("--exclude", nargs="*", default=[], help="split files whose puzzles must not appear in the text (test, SFT pool)")
parser.add_argument("--text_format", default="mixed", choices=("answer", "trace", "table", "mixed"), help="what follows each question (see the docstring)")
parser.add_argument("--trace_fraction", type=float, default=0.5, help="--text_format mixed: share of documents with the trace")
parser.add_argument("--drill_people", default="2-3", help="people counts of the claim drills (range or list)")
parser.add_argument("--drill_per_people", default="0", help="claim drills per people count (one number, or one per count; 0 = none)")
parser.add_argument("--fixed_names", type=common.str2bool, default=False,
                    help="person i is always the i-th official name (as kk_data.py --fixed_names; use the splits' setting)")
parser.add_argument("--vocab_size", type=int, default=1024, help="BPE vocabulary size (special tokens included)")
# --probe mode: write no corpus; score a checkpoint's greedy answers in the pre-training format
parser.add_argument("--probe", default="", help="checkpoint to probe instead of writing the corpus (see the docstring)")
parser.add_argument("--probe_split", default="", help="--probe: the K&K split whose questions are asked")
parser.add_argument("--probe_out", default="", help="--probe: JSON file of the result ('' = print only)")
parser.add_argument("--probe_tokens", type=int, default=120, help="--probe: answer budget in tokens (longer = wrong)")
parser.add_argument("--probe_batch", type=int, default=200, help="--probe: questions per generation batch")


def document(record, style):
    if style == "trace":  # "Question:\n...\nAnswer:\nLet's think step by step.\n" + the trace
        return common.PLAIN_TEMPLATE.format(question=record["question"]) + "\n" + kk_data.teacher_response(record)
    if style == "table":
        return answer_prompt(record) + kk_data.teacher_response(record, "table")
    return answer_prompt(record) + kk_data.answer_text(record) + "."


def claim_drill(rng, names):
    """One random claim (the puzzles' own statement sampler) and its truth value on every table row."""
    n = len(names)
    statement = kk_data.sample_statement(rng, n, int(rng.integers(0, n)), kk_data.DEPTH)
    values = kk_data.evaluate(statement, kk_data.knight_masks(n))
    rows = [f"{kk_data.roles_text(roles)}: {'true' if values[column] else 'false'}"
            for roles, column in kk_data.table_order(n)]
    return f"Claim: {kk_data.format_statement(names, kk_data.KNIGHT_KNAVE, statement)}.\n" + "\n".join(rows)


def answer_prompt(record):
    """An answer-format document up to its answer: "Let's think step by step." dropped, the answer follows at once."""
    return common.PLAIN_TEMPLATE.format(question=record["question"]).rsplit("\n", 1)[0] + "\n"


def answer_line(response):
    """The answer of a pre-training-format response: the boxed answer of a table document, else the answer
    sentence of an answer document ("Emma is a knave, Liam is a knight.") without its period."""
    boxed = kk_data.last_boxed(response)
    return boxed if boxed is not None else response.strip().split("\n")[0].rstrip(".")


# the pre-training documents as a task for common.sample_responses: their prompt, scored on answer_line
ANSWER_FORMAT = types.SimpleNamespace(
    render_prompt=lambda record, tokenizer, template: answer_prompt(record),
    score=lambda response, record, finished: float(finished and kk_data.answer_is_right(answer_line(response), record)))


@torch.no_grad()
def probe(args):
    """Greedy accuracy of a checkpoint on a split, asked and scored in the answer-format documents' own format."""
    if not args.probe_split:
        raise common.UserError("--probe needs --probe_split (a K&K split file)")
    model, tokenizer = load_model(args.probe), load_tokenizer(args.probe)
    model.eval()
    records = kk_data.load_split(args.probe_split)
    samples = common.sample_responses(model, tokenizer, ANSWER_FORMAT, records, max_new_tokens=args.probe_tokens,
                                      batch_size=args.probe_batch, desc="probe", progress=False)
    per_people = {}
    for record, sample in zip(records, samples):
        answer = kk_data.parse_answer(answer_line(sample["response"]), record["names"], kk_data.record_kk(record))
        row = per_people.setdefault(str(record["people"]), {"n": 0, "well_formed": 0, "correct": 0})
        row["n"] += 1
        row["well_formed"] += sample["finished"] and answer is not None and set(answer) == set(record["names"])
        row["correct"] += sample["reward"]
    result = {"checkpoint": args.probe, "split": args.probe_split, "format": "answer-format pre-training document",
              "n": len(records), "accuracy": sum(r["correct"] for r in per_people.values()) / len(records),
              "people": {k: {"n": r["n"], "accuracy": r["correct"] / r["n"], "well_formed": r["well_formed"] / r["n"]}
                         for k, r in sorted(per_people.items(), key=lambda kv: int(kv[0]))}}
    per = ", ".join(f"people {k} {r['accuracy']:.3f}" for k, r in result["people"].items())
    print(f"{args.probe} in its pre-training format, greedy: accuracy {result['accuracy']:.3f} ({per}) on {len(records)} questions")
    if args.probe_out:
        common.write_json(args.probe_out, result)


def main(argv=None):
    args = common.parse_settings(parser, argv)
    if args.probe:
        return probe(args)
    people = kk_data.parse_people(args.people, "people")
    sizes = kk_data.parse_sizes(args.per_people, people, "per_people")
    used = set()
    for path in args.exclude:
        used |= kk_data.statements_of(kk_data.load_split(path))
    records = [r for n, size in zip(people, sizes) for r in kk_data.generate(args.seed, n, size, used, fixed_names=args.fixed_names)]
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
    common.write_jsonl(os.path.join(args.out_dir, "pretrain.jsonl"), docs)
    # the tokenizer sees the pre-training text, the official trace's wording and the chat prompt's system text
    texts = [d["text"] for d in docs] + [r["question"] + "\n" + kk_data.teacher_response(r) for r in records[:2000]]
    texts.append(common.SYSTEM_PROMPT)
    tok = build_tokenizer(texts, vocab_size=args.vocab_size, path=os.path.join(args.out_dir, "tokenizer"))
    lengths = [len(tok(d["text"])["input_ids"]) for d in docs]
    print(f"wrote {len(docs)} documents ({sum(lengths)} tokens, longest {max(lengths)}) to "
          f"{os.path.join(args.out_dir, 'pretrain.jsonl')} and a {len(tok)}-token tokenizer to {os.path.join(args.out_dir, 'tokenizer')}")


if __name__ == "__main__":
    common.run_main(main)
