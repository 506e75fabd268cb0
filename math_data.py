"""
MATH: load the formats people have, split like the paper, render prompts,
extract the last \\boxed{} answer and grade it.

    python math_data.py                                   # data/math/{sft_train,sft_val,rl_train,test}.jsonl
    python math_data.py --teacher_sft out.jsonl --tokenizer DIR --split data/math/sft_train.jsonl
    python math_data.py --bench true                      # grading speed on MATH-500

The grader: a response earns 1.0 only if it finished with EOS and its last
\\boxed{} equals the gold answer, first by a normalised string match, then by
math-verify (the reference implementation's checker). math-verify runs in a
persistent worker subprocess that is killed and restarted when a call passes
its time limit, so the limit is hard (sympy can hang inside C code, where no
signal reaches) and works from any thread of any process. Only the extracted
answer and the gold answer, length-capped, ever reach math-verify; we never
eval/exec/sympify model text ourselves.
"""
import atexit
import decimal
import hashlib
import json
import math
import os
import random
import re
import select
import subprocess
import sys
import threading
import time
import unicodedata

import common
import tasks
from common import UserError

TASK = "math"
DIFFICULTY = "level"  # record key of the MATH level 1-5 (0 when unknown: AIME, AMC, MATH-500 without levels)
SCORE_THREADS = True  # score() is safe from several threads (a math-verify worker per thread): tasks.rescore uses them
# the packages whose rules grade an answer: another version of one re-scores eval's finished pairs (task_source_digest)
SCORER_PACKAGES = ("math-verify", "latex2sympy2_extended", "antlr4-python3-runtime", "sympy")

GRADE_TIMEOUT_S = 1.0  # hard limit on one math-verify call, in worker CPU seconds (killed past it; scores 0.0)
GRADE_WALL_LIMIT_S = 10.0  # and in wall seconds, however busy the machine
WORKER_START_TIMEOUT_S = 60.0  # importing sympy + math-verify; not counted in GRADE_TIMEOUT_S
# the kernel ends a worker whose one request burns this much CPU (RLIMIT_CPU): no orphan spins forever
WORKER_CPU_GUARD_S = 30
MAX_ANSWER_CHARS = 500  # longer boxed answers score 0.0 (MATH gold answers are < 200 characters)
MAX_BRACE_DEPTH = 20  # deeper nesting never reaches math-verify (its parser recurses)

HERE = os.path.dirname(os.path.abspath(__file__))
# beside the repository (its ../shared), wherever the script is started from
DEFAULT_TRAIN_POOL = os.path.normpath(os.path.join(HERE, "..", "shared", "data", "math", "math_train_8k.jsonl"))
DEFAULT_TEST = os.path.normpath(os.path.join(HERE, "..", "shared", "data", "math", "math500.jsonl"))
# --hub: the MATH train set (7.5K, Hendrycks fields) and MATH-500, when `datasets` and a network exist
HUB_TRAIN_POOL = "hf:DigitalLearningGmbH/MATH-lighteval:train"
HUB_TEST = "hf:HuggingFaceH4/MATH-500:test"

# -----------------------------------------------------------------------------
# loading


def load_split(path, keep_empty=False) -> list:
    """Load MATH records from any of the formats people have; returns normalised records.

    path: a .jsonl file (our own splits, PRM800K math_splits, MATH-500, or any jsonl with
    problem/question + answer, or Hendrycks records whose answer is the last \\boxed{} of solution),
    a .json file (a list of records, or one Hendrycks problem), a directory of Hendrycks
    .json files (MATH/train/algebra/1.json ...), or "hf:NAME[:SPLIT]" for the Hugging Face hub.
    Every record comes back as {id, level, subject, question, answer, solution}. A record with an empty answer
    (a proof) is skipped with a warning, or kept with keep_empty (a pool whose shuffle must see every record).
    """
    path = str(path)
    if path.startswith("hf:"):
        rows = _hub_rows(path)
    elif os.path.isdir(path):
        rows = _hendrycks_dir_rows(path)
    elif not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    elif path.endswith(".json"):
        rows = _json_rows(path)
    else:
        rows = _jsonl_rows(path)
    stem = re.sub(r"\W+", "_", os.path.splitext(os.path.basename(path.rstrip("/")))[0])  # ids: math500-<hash>
    records, seen, empty = [], set(), []
    for where, default_id, raw in rows:
        rec = _normalise_record(raw, where)
        if not rec["answer"]:  # a few real pool problems have answer "" (proofs): nothing to grade against
            empty.append(where)
            if not keep_empty:
                continue
        if rec["id"] is None:
            # No id in the data: name the record by its problem text, stable under reordering.
            base = default_id or f"{stem}-{hashlib.sha1(rec['question'].encode('utf-8')).hexdigest()[:10]}"
            rec["id"], k = base, 1
            while rec["id"] in seen:
                k += 1
                rec["id"] = f"{base}-{k}"
        elif rec["id"] in seen:
            raise UserError(f"{where}: field 'id': duplicate id {rec['id']!r}")
        seen.add(rec["id"])
        records.append(rec)
    if empty and not keep_empty:
        print(f"warning: {path}: skipped {len(empty)} record(s) with an empty 'answer' (first: {empty[0]})",
              file=sys.stderr, flush=True)
    if not any(r["answer"] for r in records):
        raise UserError(f"{path}: no records with an answer")
    return records


def _jsonl_rows(path):
    return [(f"{path}:{lineno}", None, raw) for lineno, raw in common.iter_jsonl(path)]


def _json_rows(path):
    try:
        with open(path, encoding="utf-8-sig") as f:  # (-sig: a BOM at the start is no part of the JSON)
            data = common.json_loads(f.read())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})")
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 (byte {e.start + 1}: {e.reason})")
    except common.JSON_ERRORS as e:
        raise UserError(f"{path}: not valid JSON ({common.json_error_text(e)})")
    if problem := common.not_text(data):
        raise UserError(f"{path}: {problem}")
    if isinstance(data, dict):  # one Hendrycks problem file
        return [(path, None, data)]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of records or one record, got {type(data).__name__}")
    return [(f"{path}: record {i}", None, raw) for i, raw in enumerate(data, 1)]  # (counted from 1: record_place)


def _hendrycks_dir_rows(path):
    """The original layout: one problem per .json file; ids like 'train/algebra/1.json' (MATH-500's unique_id)."""
    parent = os.path.dirname(os.path.abspath(path))
    files = sorted(os.path.join(d, n) for d, _, names in os.walk(path) for n in names if n.endswith(".json"))
    if not files:
        raise UserError(f"{path}: directory holds no .json problem files")
    rows = []
    for file in files:
        file_rows = _json_rows(file)
        if len(file_rows) != 1 or file_rows[0][0] != file:
            raise UserError(f"{file}: a Hendrycks directory holds one problem (a JSON object) per .json file, "
                            f"not a list of {len(file_rows)}")
        ((where, _, raw),) = file_rows
        rows.append((where, os.path.relpath(file, parent).replace(os.sep, "/"), raw))
    return rows


def _hub_rows(path):
    name, _, split = path[len("hf:"):].partition(":")
    try:
        import datasets
    except ImportError:
        raise UserError(f"{path}: loading from the Hugging Face hub needs `pip install datasets` and a network; "
                        f"or pass a local file")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # network, name, split: the library's own message says which
        raise UserError(f"{path}: cannot load from the hub: {e}")
    return [(f"{path}: row {i}", None, dict(raw)) for i, raw in enumerate(ds, 1)]  # (counted from 1: record_place)


def _normalise_record(raw, where):
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    key = "question" if "question" in raw else "problem"
    question = raw.get(key)
    if not isinstance(question, str) or not question.strip():
        raise UserError(f"{where}: field '{key}': missing or not a non-empty string (need 'problem' or 'question')")
    solution = "" if raw.get("solution") is None else raw["solution"]  # (false or [] is no solution: refused)
    if not isinstance(solution, str):
        raise UserError(f"{where}: field 'solution': expected a string, got {type(solution).__name__}")
    answer = raw.get("answer")
    if answer is None:  # Hendrycks layout: the answer is the solution's last \boxed{}
        answer = extract_boxed(solution)
        if answer is None:
            raise UserError(f"{where}: field 'answer': missing, and field 'solution' has no \\boxed{{}} "
                            "to take it from")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        # JSON's NaN / Infinity: no gold answer ("nan" would be graded as text); an int is finite (math.isfinite
        # would overflow on a huge one)
        if isinstance(answer, float) and not math.isfinite(answer):
            raise UserError(f"{where}: field 'answer': {answer!r} is not a number a problem can have")
        # as written in positional notation: str(0.00001) is "1e-05", which no \\boxed{0.00001} matches
        answer = format(decimal.Decimal(repr(answer)), "f") if isinstance(answer, float) else str(answer)
    if not isinstance(answer, str):
        raise UserError(f"{where}: field 'answer': expected a string, got {type(answer).__name__}")
    subject = raw.get("subject", raw.get("type"))
    subject = "" if subject is None else subject
    if not isinstance(subject, str):
        raise UserError(f"{where}: field 'subject': expected a string, got {type(subject).__name__}")
    unique = raw.get("unique_id")
    blank = isinstance(unique, str) and not unique.strip()
    rid = unique if unique is not None and not blank else raw.get("id")  # (a null or blank unique_id: the id)
    if rid is not None and not tasks.is_id(rid):  # (true is no id, not "True"; a blank one names nothing)
        raise UserError(f"{where}: field 'id': expected a non-blank string or an integer, got {json.dumps(rid)}")
    return {"id": None if rid is None else str(rid), "level": _parse_level(raw.get("level"), where),
            "subject": subject, "question": question, "answer": answer.strip(), "solution": solution}


def _parse_level(level, where) -> int:
    """MATH levels come as 3, "3" or "Level 3"; missing or "Level ?" (a few Hendrycks files) is 0."""
    if level is None or level == "" or level == "Level ?":
        return 0
    if isinstance(level, int) and not isinstance(level, bool) and 0 <= level <= 5:
        return level
    if isinstance(level, str):
        m = re.fullmatch(r"\s*(?:Level\s*)?([0-5])\s*", level)
        if m:
            return int(m.group(1))
    raise UserError(f"{where}: field 'level': expected 1-5 (0 or 'Level ?': unknown) or 'Level N', got {level!r}"[:300])


# -----------------------------------------------------------------------------
# splits like the paper: seed-1234 shuffle, 900 SFT train / 100 SFT val / the rest RL; MATH-500 test


def problem_key(question: str) -> str:
    """Normalised problem text for deduplication (PRM800K's train holds most of the original test set)."""
    return re.sub(r"\s+", "", question).lower()


# LaTeX that changes the spacing or the delimiters of a problem, not the problem: \, \; \: \! \  \quad ~ \left
# \right \displaystyle, $ and \( \) \[ \]; \dfrac and \tfrac are \frac
_LATEX_NOISE = re.compile(r"\\[,;:! ]|\\q?quad(?![a-zA-Z])|~|\\left(?![a-zA-Z])|\\right(?![a-zA-Z])"
                          r"|\\displaystyle(?![a-zA-Z])|\$|\\[()\[\]]")


def loose_key(question: str) -> str:
    """problem_key, blind to LaTeX spacing and delimiters, Unicode forms and the final full stop or question mark:
    what keeps a test problem out of every training split. (The pool's own repeats are still found by problem_key,
    which keeps the paper's split order: two problems the 8.5K pool holds twice, written so, both stay in rl_train.)"""
    q = _LATEX_NOISE.sub("", re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", unicodedata.normalize("NFKC", question)))
    return re.sub(r"\s+", "", q).lower().rstrip(".?")


def make_splits(pool, test, n_sft_train=900, n_sft_val=100, seed=1234):
    """Returns ({split name: records}, {count name: n}); training splits never share a problem with test.
    n_sft_train, n_sft_val >= 0 (main checks: a negative slice bound would put problems in two splits).
    The pool is shuffled as loaded, as the paper's was (random.seed(1234); shuffle; load it with keep_empty=True),
    and then a problem with no answer, one of the test split or one seen earlier in that order is passed over: the
    splits are the paper's wherever it had none."""
    test_keys = {loose_key(r["question"]) for r in test}
    shuffled = list(pool)
    random.Random(seed).shuffle(shuffled)
    kept, seen, n_empty, n_test_overlap, n_duplicate = [], set(), 0, 0, 0
    for rec in shuffled:
        key = problem_key(rec["question"])
        if not rec["answer"]:  # nothing to grade against (proofs)
            n_empty += 1
        elif loose_key(rec["question"]) in test_keys:
            n_test_overlap += 1
        elif key in seen:
            n_duplicate += 1
        else:
            seen.add(key)
            kept.append(rec)
    if len(kept) < n_sft_train + n_sft_val:
        raise UserError(f"training pool has {len(kept)} problems after deduplication, "
                        f"fewer than n_sft_train + n_sft_val = {n_sft_train + n_sft_val}")
    splits = {"sft_train": kept[:n_sft_train], "sft_val": kept[n_sft_train:n_sft_train + n_sft_val],
              "rl_train": kept[n_sft_train + n_sft_val:], "test": list(test)}
    counts = {"pool": len(pool), "dropped_empty": n_empty, "dropped_in_test": n_test_overlap,
              "dropped_duplicate": n_duplicate, **{name: len(recs) for name, recs in splits.items()}}
    return splits, counts


# -----------------------------------------------------------------------------
# prompts and the SFT target


def render_prompt(record, tokenizer, template="auto") -> str:
    return tasks.render_question(record["question"], tokenizer, template)


def teacher_response(record) -> str:
    """The dataset's own solution as the SFT target (no EOS: the SFT loader appends it)."""
    solution = (record.get("solution") or "").strip()
    if solution and extract_boxed(solution) is not None:
        return solution
    final = f"The final answer is $\\boxed{{{record['answer']}}}$."
    return f"{solution}\n\n{final}" if solution else final


# -----------------------------------------------------------------------------
# answer extraction and the fast string match


def extract_boxed(text):
    """The content of the last box (tasks.last_box: \\boxed{...}, \\fbox{...} or `\\boxed 5`), cleaned; None if
    there is none or it is unclosed. Surrounding $...$, a whole-answer \\text{...} and a trailing period are removed.
    """
    content = tasks.last_box(text)
    return None if content is None else _clean_answer(content) or None


def _clean_answer(s: str) -> str:
    s = s.strip()
    for _ in range(3):  # a few layers of $..$, \(..\), \text{..} and a trailing period, in any order
        before = s
        if len(s) >= 2 and s[0] == "$" and s[-1] == "$" and "$" not in s.strip("$"):  # ("$2$ and $3$": as is)
            s = s.strip("$").strip()
        if s.startswith("\\(") and s.endswith("\\)"):
            s = s[2:-2].strip()
        s = s.rstrip(".").strip() if not s.endswith(("\\.", "\\right.")) else s  # (\right.: a delimiter)
        m = re.fullmatch(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", s)
        if m:
            s = m.group(1).strip()
        if s == before:
            break
    return s


# a unit after a number (or after \pi, or a letter set apart), dropped on both sides ("5 \text{ cm}^2", "5\mathrm{~cm}",
# "16\pi \text{ cm}^2", "12 square units" are 5, 16\pi and 12): in a text command, any text of two letters or more and
# no digit but a power or a base ("km/h", "o'clock", "(units)", " cm$^2$", " (base 8)") or a one-letter unit (not
# \mathrm{i}, \mathrm{e}, \text{x}), not a.m. / p.m.; bare, a unit of a short list, or a count ("12 students") after
# an answer with no other letter (score() drops them after its hedge and time checks, which read the text).
# math-verify's own unit rule runs off: it drops any of 140 words at the end after a digit, among them c, d, g, h, l,
# m, s, t and "ab", "bc", so that "6+9c" read as 15 and "a^2+2ab" as a^2+2. (Each repeat below matches in one way
# only, or possessively: a pattern that can split its text many ways backtracks exponentially on a long answer.)
_POWER = r"(?:\s*\^\s*\{?\s*\d\s*\}?)?"
# words after a number that are no unit or count: a scale, an operation, a hedge ("1 million", "4 squared", "5 plus")
_NOT_UNIT = (r"(?:million|thousand|hundred|billion|trillion|dozen|squared|cubed|factorial|plus|minus|minimum|maximum|"
             r"max|something|odd|even|fewer|ish)\b")
_AFTER_NUMBER = r"(?:(?<=[0-9}])|(?<=\\pi))"
_UNIT_TEXT = re.compile(r"(?:" + _AFTER_NUMBER + r"|(?:(?<=^[A-Za-z])|(?<=[^\\A-Za-z][A-Za-z]))(?=\s|\\[,;:! ]|~))"
                        r"(?:\s|\\[,;:! ]|\\q?quad(?![A-Za-z])|~)*+\\(?:text[a-z]*|mbox|mathrm)\s*\{"
                        r"(?![\s~]*[aApP]\.?[\s~]*[mM]\.?[\s~]*\})"  # (a time's a.m. / p.m.: meridiem() reads it)
                        r"(?![\s~]*" + _NOT_UNIT + ")"
                        r"(?:(?=(?:[^{}\dA-Za-z]*+[A-Za-z]){2})"
                        r"(?:\bbase\s*\d+|\$?\^\s*(?:\{\s*\d\s*\}|\d)\$?|[^{}\d])*+"
                        r"|[\s~]*[mgsLlhdKAJNWVCF][\s.]*|[\s.]*\.)"
                        + _POWER + r"\s*\}" + _POWER + r"\s*$")
_BARE_UNIT = re.compile(_AFTER_NUMBER + r"\s*(?:(?:sq|square|cubic|cu)\.?\s*)?(?:cm|mm|km|ft|feet|foot|inch(?:es)?|"
                        r"yards?|miles?|met(?:er|re)s?|kg|grams?|pounds?|lbs?|ounces?|mph|hours?|hrs?|minutes?|mins?|"
                        r"secs?|seconds?|days?|weeks?|months?|years?|dollars?|cents?|units?|degrees?|liters?|litres?|"
                        r"gallons?)\.?" + _POWER + r"\s*$")
# a count after a number with no other letter ("12 students", "210 ways"; commands aside: "\frac{1}{2} cups")
_COUNT_WORDS = re.compile(r"((?:[^A-Za-z\\]|\\[A-Za-z]+|\\[^A-Za-z])*[0-9}])\s+([a-z]{3,}(?:\s+[a-z]+)*+)\.?\s*$")
_NOT_UNIT_WORD = re.compile(r"\b" + _NOT_UNIT)
# meters set apart, where the gold has them ("12\sqrt{3} m", a MATH gold): score() drops them on both sides then
LONE_METERS = re.compile(_AFTER_NUMBER + r"\s+m\s*$")
TEXT_SPACE = re.compile(r"\\(text|textbf|textrm|mathrm|mbox)\s+\{")  # "\\text {cm}" is "\\text{cm}" (a MATH gold)
# a question that asks for several answers: there "70,110" is two answers (a MATH gold), never 70110
LIST_QUESTION = re.compile(r"separated by commas|enter all", re.I)


# a time's a.m. / p.m. after its digits, bare or in a text command: "4:30 p.m.", "4:30 \text{ PM}" are "4:30"
# (meridiem() reads it too: every marker normalize_answer drops is compared first)
TRAILING_MERIDIEM = re.compile(r"(?<=\d)\s*(?:\\(?:text|mbox|mathrm)\s*\{\s*)?([ap])\.?(?:\s|~)*m\.?\s*\}?$", re.I)
# "\frac\pi4", "\frac 3\pi": an unbraced argument that is a command (digits alone: normalize_answer's rules)
FRAC_COMMANDS = re.compile(r"\\[dt]?frac\s*(?:(\\[A-Za-z]+)\s*(\\[A-Za-z]+|[A-Za-z0-9])|([A-Za-z0-9])\s*(\\[A-Za-z]+))")
THIN_THOUSANDS = re.compile(r"(?<=\d),\s*\\!\s*(?=\d{3}(?!\d))")
# a number times a bracketed number, "2(3)", "(2)(3)", "3\ [5]": math-verify adds them (6 reads as 5), as it would
# the whole number and fraction of "2\frac{1}{2}"; written with \cdot it multiplies (letters inside, "2(x+1)", it
# already did). Not after a subscript or power: "\log_2(3)", "\cos^2(1)"
TIMES_NUMBER = re.compile(r"(?<=[\d)])(?<![_^]\d)(?<![_^]\d\d)(?:\s|\\[,;: ]|\\q?quad(?![A-Za-z])|~)*"
                          r"(?=[(\[]\s*-?\d+(?:\.\d+)?\s*[)\]])")
# a tuple of variables in the question ("the ordered pair $(x,y)$") and an answer of assignments to them
VARIABLE_TUPLE = re.compile(r"\(\s*[A-Za-z]\s*(?:,\s*[A-Za-z]\s*)+\)")
ASSIGNMENT = re.compile(r"\s*([A-Za-z])\s*=\s*([^=]+?)\s*")
BRACKETED = re.compile(r"\s*(?:\\left\s*)?[(\[]")  # a gold tuple or interval


def strip_unit(answer):
    """The answer without a unit after its number (_UNIT_TEXT, _BARE_UNIT, _COUNT_WORDS but hedge words; twice:
    "5\\text{ cm}^2\\text{.}")."""
    for _ in range(2):
        answer = _BARE_UNIT.sub("", _UNIT_TEXT.sub("", answer))
        m = _COUNT_WORDS.fullmatch(answer)
        if m and not HEDGE_WORDS.search(m[2]) and not _NOT_UNIT_WORD.search(m[2]):
            answer = m[1]
    return answer


def as_graded(answer, record):
    """An answer (the boxed one or the gold) as both grading paths read it: cleaned as a boxed answer is (a gold's
    trailing period or comma made math-verify read only part of it), "\\text {" closed up, "\\frac\\pi4" braced, and
    where the question asks for a list and the gold is one, a space after each comma before a digit, so that no
    thousands rule (ours, math-verify's) reads the list as one number; elsewhere "29,\\!322" is 29322. Where the
    paper's math-verify alone takes "70110" for "70,110", this takes the list; a gold of one number (10879) keeps
    "10,879" as that number."""
    answer = TEXT_SPACE.sub(r"\\\1{", _clean_answer(answer.strip().rstrip(",")))  # (a gold's "i." or "(E),")
    answer = answer.replace("°", "^\\circ")
    answer = FRAC_COMMANDS.sub(lambda m: "\\frac{%s}{%s}" % ((m[1], m[2]) if m[1] else (m[3], m[4])), answer)
    answer = TIMES_NUMBER.sub(r"\\cdot ", answer)
    answer = as_tuple(answer, str(record.get("question", "")))
    if LIST_QUESTION.search(str(record.get("question", ""))) and re.search(r",\s*-?\d", str(record.get("answer", ""))):
        answer = re.sub(r",(?=-?\d)", ", ", answer)  # ("100,-2": a list too)
    else:  # "29,\!322,\!216" is one number anywhere in an answer (math-verify read "111,\!111" as a list)
        answer = THIN_THOUSANDS.sub("", answer)
    return answer


def assignments(answer):
    """[(name, value)] of an answer that is a list of two or more assignments ("x=2, y=3"), else None."""
    parts = [ASSIGNMENT.fullmatch(part) for part in re.sub(r"\\[,;:! ]|\\q?quad(?![A-Za-z])", " ", answer).split(",")]
    return [(m[1], m[2]) for m in parts] if len(parts) >= 2 and all(parts) else None


def values_of_one_name(answer):
    """Whether the answer assigns one name twice or more ("x=2, x=3"): the values of one variable (a list question's
    roots), never a tuple or an interval."""
    pairs = assignments(answer)
    return pairs is not None and len({name for name, _ in pairs}) < len(pairs)


def as_tuple(answer, question):
    """Assignments to the variables of a tuple the question asks for, as that tuple: "y=3, x=2" is "(2, 3)" where
    it asks for "$(x,y)$" (math-verify reads assignments in the order written: "y=2, x=3" was (2, 3)). Any other
    answer comes back as it is."""
    pairs = assignments(answer)
    values = dict(pairs or ())
    if pairs is None or len(values) < len(pairs):  # (a name twice: values_of_one_name)
        return answer
    for tuple_ in VARIABLE_TUPLE.findall(question):
        names = re.findall(r"[A-Za-z]", tuple_)
        if sorted(names) == sorted(values):
            return "(" + ", ".join(values[name] for name in names) + ")"
    return answer


def normalize_answer(s: str) -> str:
    """A canonical string for the fast exact-match path; conservative: it only merges forms that are equal."""
    s = TRAILING_MERIDIEM.sub("", _clean_answer(s))  # (score() compared the markers first)
    # thousands separators, judged on the answer as written ("10,\\! 080", "2{,}016", "58,500"), before spaces and
    # degree signs go: "2, 100" and "45^\\circ, 135^\\circ" are lists, never 2100 or 45135
    number = re.sub(r",\s*\\!\s*|\{,\}", ",", s).replace("\\$", "").strip()
    m = re.fullmatch(r"(-?\d{1,3}(?:,\d{3})+(?:\.\d+)?)(\s*(?:\^\s*\{?\s*\\circ\s*\}?|\\degree|\\?%"
                     r"|\\(?:text|mbox|mathrm)\{[^{}]*\}))?", number)  # (a degree, percent or unit may follow)
    if m:
        s = m.group(1).replace(",", "") + (m.group(2) or "")
    s = s.replace("\\!", "").replace("{,}", ",").replace("\\$", "")
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s).replace("\\displaystyle", "")  # not \leftarrow
    s = re.sub(r"\\[,;: ]", " ", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\degree", "", s)  # degrees (not f \circ g)
    s = s.replace("\\%", "").replace("%", "")
    s = strip_unit(s.strip())
    s = re.sub(r"\\(?:text|textbf|textrm|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    if re.fullmatch(r"-?\d{1,3}(?: +\d{3})+(?:\.\d+)?", s.strip()):  # "1\,000": digits in threes, one number
        s = s.replace(" ", "")
    s = re.sub(r"\\frac\s*(\d)\s+(\d)", r"\\frac{\1}{\2}", s)  # "\dfrac 3 8" (a MATH gold)
    s = re.sub(r"(?<=\d)\s+(?=\d)", "|", s)  # else "1 2" is not 12: a mark that no other form has
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)  # \frac{a}2
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)  # \sqrt2
    if re.fullmatch(r"-?\d+\.\d*", s):  # 27.0 -> 27, 0.50 -> 0.5
        s = s.rstrip("0").rstrip(".")
    m = re.fullmatch(r"\(([A-Ea-e])\)", s)  # multiple choice "(C)" -> "C"
    if m:
        s = m.group(1)
    return s.rstrip(".")


# a time of day's a.m. / p.m.: dotted anywhere ("4:30 p.m.", "p.~m."), or as a word in any text command's braces
# ("9 \text{pm}", "\textbf{ PM}", "\text{ pm or am}")
MERIDIEM = re.compile(r"(?<![A-Za-z\\])([ap])\.(?:\s|~|\\,|\\ )*m\b\.?", re.I)
MERIDIEM_WORD = re.compile(r"(?<![A-Za-z])([ap])\.?(?:\s|~)*m\b", re.I)
TEXT_COMMAND = re.compile(r"\\(?:text[a-z]*|mbox|mathrm|operatorname)\s*\{([^{}]*)\}")


def meridiem(answer):
    """The set of time-of-day markers an answer holds: {"a"}, {"p"}, both (a hedge: "9 \\text{ pm or am}"), or none."""
    marks = {m.lower() for m in MERIDIEM.findall(answer) + TRAILING_MERIDIEM.findall(answer)}
    for text in TEXT_COMMAND.findall(answer):
        marks |= {m.lower() for m in MERIDIEM_WORD.findall(text)}
    return marks


# what makes a boxed answer say more than one value, or less than one, where its gold does not (a red-team's finds,
# each scored 1.0 before: both grading paths drop a trailing \text{...} and read one side of a relation, and both
# take "3\%" for 3): a hedge word in its text ("331 \text{ (or } 338)", "5 \text{ or more}"); "or", approximation
# and negation signs ("x = 13 \lor x = 6", "6 \approx 13"); relations set apart by spacing ("x = 13 \quad x = 6");
# a percent sign where neither the gold nor the question has one (3% is not 3, and a policy unsure of the scale
# would be paid either way); numbers side by side ("3 \quad 5", which math-verify adds up) and a number in the
# dropped text ("12\text{ (5)}")
HEDGE_WORDS = re.compile(r"\b(?:or|and|not|nor|either|neither|more|less|least|most|than|maybe|possibly|perhaps|"
                         r"approximately|about|roughly|around|until|vs|versus|resp|respectively|if|otherwise)\b",
                         re.I)
HEDGE_COMMANDS = re.compile(r"\\(?:lor|vee|approx|sim|simeq|cong|equiv|neq|ne|not|neg|lnot)(?![A-Za-z])")
SPACED_RELATIONS = re.compile(r"=.*\\(?:q?quad|[,;:]|\s)\s*[A-Za-z]\s*=|=.*\\q?quad.*=")
PERCENT = re.compile(r"\\?%")
SPACING = re.compile(r"\\q?quad(?![A-Za-z])|~")
# what a text command may hold with digits that say no second value: a power ("\mathrm{cm^2}", "\text{ cm$^2$}") and
# a base ("\text{ (base 8)}"); and a numeral in text before its base subscript ("\text{A5}_{11}")
TEXT_DIGITS_FINE = re.compile(r"\^\s*\{?\s*-?\d+\s*\}?|\$[^$]*\$|\bbase\s*\d+")
TEXT_NUMERAL = re.compile(r"\\(?:text[a-z]*|mbox|mathrm|operatorname)\s*\{[^{}]*\}(?=\s*_)")
WRAPPER = re.compile(r"\\(?:math[a-z]+|text[a-z]*|mbox|boldsymbol)\s*\{([^{}]*)\}")
# a number's base, "1011_2", "\text{A5}_{11}": both paths drop it, so that "10_5" was "10_3"
NUMBER_BASE = re.compile(r"(?<=[0-9}])\s*_\s*\{?\s*(\d+)\s*\}?")


def hedged(pred, gold, question):
    """Whether the answer `pred` hedges where `gold` does not (HEDGE_WORDS and the rest, above): scored 0."""
    def words(answer):
        return {w.lower() for text in TEXT_COMMAND.findall(answer) for w in HEDGE_WORDS.findall(text)}

    def digits_in_text(answer):
        return any(re.search(r"\d", TEXT_DIGITS_FINE.sub("", text))
                   for text in TEXT_COMMAND.findall(TEXT_NUMERAL.sub("", answer)))

    def numbers_apart(answer):  # normalize_answer marks digits apart with "|" ("\mathbf{2\ 340}" is one number)
        return "|" in normalize_answer(SPACING.sub(" ", WRAPPER.sub(r"\1", answer)))
    return bool(words(pred) - words(gold)
                or (digits_in_text(pred) and not digits_in_text(gold))
                or (numbers_apart(pred) and not numbers_apart(gold))
                or set(HEDGE_COMMANDS.findall(pred)) - set(HEDGE_COMMANDS.findall(gold))
                or (SPACED_RELATIONS.search(pred) and not SPACED_RELATIONS.search(gold))
                or (PERCENT.search(pred) and not PERCENT.search(gold)
                    and not re.search(r"percent|%", str(question), re.I)))


def word_answer(answer, need_text=False):
    """The words of an answer that is words alone ("\\text{East}" -> "east"; two letters or more), lower-cased; None
    for any other answer (need_text: and for one without a text command, where "ab" is a product)."""
    if need_text and not TEXT_COMMAND.search(answer):
        return None
    answer = answer.replace("\\displaystyle", "")
    for _ in range(3):
        answer = WRAPPER.sub(r"\1", answer)
    words = re.sub(r"(?:\s|~|\\[,;:! ])+", " ", answer).strip().strip("$").rstrip(".").strip()  # ("two\ lines")
    return words.lower() if re.fullmatch(r"[A-Za-z]{2,}(?: [A-Za-z]+)*", words) else None


# a clock time, "9:24", "05\\!:\\!00", "4\\!:\\!51\\!:\\!06" (its a.m. / p.m. dropped first): read as such where the
# gold has a marker or the question speaks of time and no ratio (math-verify read "3:10" as a ratio: "9:30" was equal)
_COLON = r"\s*(?:\\!\s*)?:\s*(?:\\!\s*)?"
TIME_OF_DAY = re.compile(r"(\d{1,2})" + _COLON + r"(\d{2})(?:" + _COLON + r"(\d{2}))?")
CLOCK_QUESTION = re.compile(r"\btime\b|clock|\b[ap]\.\s*m\.", re.I)


def time_of_day(answer):
    """(hours, minutes, seconds) of an answer that is a clock time, else None."""
    m = TIME_OF_DAY.fullmatch(TRAILING_MERIDIEM.sub("", _clean_answer(answer)).strip())
    return (int(m[1]), int(m[2]), int(m[3] or 0)) if m else None


def same_normalized(pred: str, gold: str) -> bool:
    """The fast path's verdict: equal normalized strings, where one side may name the variable the other leaves
    out ("x=3" is "3"); both naming one, the names must agree ("x=5" is not "y=5": math-verify decides)."""
    p, g = normalize_answer(pred), normalize_answer(gold)
    if p == g:
        return True
    named_p, named_g = (s.count("=") == 1 and re.match(r"[a-zA-Z]=", s) is not None for s in (p, g))
    return named_p != named_g and (p[2:] if named_p else p) == (g[2:] if named_g else g)


# Things that must never reach math-verify: they can only be nonsense or an attack on sympy's time.
_RISKY = re.compile(
    r"\\(?:input|include|def|edef|gdef|newcommand|renewcommand|write|immediate|catcode|usepackage|openin|read|csname"
    r"|expandafter)(?![a-zA-Z])"
    r"|\d\s*\^\s*[{(]?\s*\d+\s*\^"  # numeric exponent towers: 9^{9^{9^9}}, 9^9^9
    r"|\^\s*\{?\s*\d{5,}"  # huge exponents: 2^{123456}
    r"|\d{5,}\s*!"  # huge factorials
    r"|\*\*|\bimport\b|__"  # Python, not math
)


def _fit_for_verifier(ans: str) -> bool:
    if len(ans) > MAX_ANSWER_CHARS or _RISKY.search(ans):
        return False
    depth = deepest = 0
    for c in ans:
        depth += (c == "{") - (c == "}")
        deepest = max(deepest, depth)
    return deepest <= MAX_BRACE_DEPTH


# -----------------------------------------------------------------------------
# grading


def score(response, record, finished) -> float:
    """1.0 iff the response finished with EOS and its last \\boxed{} equals record['answer']; never raises."""
    try:
        if not finished:
            return 0.0
        pred = extract_boxed(response)
        if pred is None or len(pred) > MAX_ANSWER_CHARS:
            return 0.0
        pred, gold = as_graded(pred, record), as_graded(str(record["answer"]), record)
        # both paths drop the text: 9 a.m. read as 9 p.m.; an answer hedging with both markers is neither
        marks_gold, marks_pred = meridiem(gold), meridiem(pred)
        if marks_gold and marks_pred and marks_gold != marks_pred:
            return 0.0
        if hedged(pred, gold, record.get("question", "")):
            return 0.0
        if values_of_one_name(pred) and BRACKETED.match(gold):  # ("x=2, x=3" is no pair (2, 3), no interval)
            return 0.0
        bases_gold, bases_pred = set(NUMBER_BASE.findall(gold)), set(NUMBER_BASE.findall(pred))
        if bases_gold and bases_pred and bases_gold != bases_pred:  # (a number without its base: as before)
            return 0.0
        question = str(record.get("question", ""))
        if (clock := time_of_day(gold)) is not None and (marks_gold or CLOCK_QUESTION.search(question)
                                                         and not re.search(r"ratio", question, re.I)):
            told = time_of_day(pred)
            if told and marks_gold == {"p"} and not marks_pred and told[0] == clock[0] + 12:  # (20:34 for 8:34 p.m.)
                told = (clock[0],) + told[1:]
            return 1.0 if told == clock else 0.0
        pred, gold = strip_unit(pred), strip_unit(gold)
        if LONE_METERS.search(gold):  # (elsewhere "2 m" is 2m: a variable)
            pred, gold = LONE_METERS.sub("", pred), LONE_METERS.sub("", gold)
        # a gold in words is compared as words: math-verify reads them as products of letters, so "\text{East}" was
        # not "east" (E is Euler's number) and "Amy" was "May"
        if (words := word_answer(str(record["answer"]), need_text=True)) is not None:
            return 1.0 if word_answer(pred) == words else 0.0
        if same_normalized(pred, gold):
            return 1.0
        if not (_fit_for_verifier(pred) and _fit_for_verifier(gold)):
            return 0.0
        if PERCENT.search(gold) and not PERCENT.search(pred):  # "32\%" is 32 here, not 0.32 (what percent ...?)
            gold = PERCENT.sub("", gold)
        return 1.0 if GRADER.equivalent(gold, pred, GRADE_TIMEOUT_S) else 0.0
    except Exception as e:  # a bug here must not kill an RL run: count it as wrong, say so once
        _warn_once(f"math_data.score: unexpected {type(e).__name__}: {e}; scored 0.0")
        return 0.0


_warned = set()


def _warn_once(msg):
    if msg not in _warned:
        _warned.add(msg)
        print(f"warning: {msg}", file=sys.stderr, flush=True)


class _Worker:
    """One math-verify subprocess, spoken to in JSON lines: {"gold", "pred"} -> "1" or "0"."""

    def __init__(self):
        boot = f"import sys; sys.path.insert(0, {HERE!r}); import math_data; math_data._worker_main()"
        self.proc = subprocess.Popen([sys.executable, "-c", boot], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     bufsize=0, close_fds=True)
        self.ready = False

    def _read_line(self, deadline):
        buf = b""
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return None  # time is up
            chunk = os.read(self.proc.stdout.fileno(), 64)
            if not chunk:
                return b""  # the worker died
            buf += chunk
        return buf.strip()

    def cpu_seconds(self):
        """CPU time the worker has used (Linux /proc); None where it cannot be read."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        except (OSError, ValueError, IndexError):
            return None

    def start(self, timeout_s) -> bool:
        if not self.ready:
            self.ready = self._read_line(time.monotonic() + timeout_s) == b"ready"
        return self.ready

    def ask(self, gold, pred, timeout_s):
        """True/False, or None when the worker ran out of time or died (the caller kills it).

        The limit is timeout_s of the worker's CPU time, so a busy machine (8 ranks, a data loader)
        does not fail slow-but-right answers; where CPU time cannot be read it is wall time, and
        GRADE_WALL_LIMIT_S caps the wall time in any case.
        """
        try:
            self.proc.stdin.write((json.dumps({"gold": gold, "pred": pred}) + "\n").encode("utf-8"))
        except (BrokenPipeError, OSError):
            return None
        cpu_start, wall_end = self.cpu_seconds(), time.monotonic() + max(GRADE_WALL_LIMIT_S, timeout_s)
        cpu_left = timeout_s
        while True:
            reply = self._read_line(min(time.monotonic() + cpu_left, wall_end))
            if reply is not None:
                return reply == b"1" if reply else None
            cpu_now = self.cpu_seconds()
            if cpu_start is None or cpu_now is None or time.monotonic() >= wall_end:
                return None
            cpu_left = timeout_s - (cpu_now - cpu_start)
            if cpu_left <= 0.005:
                return None

    def kill(self):
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:
            pass


class Grader:
    """A pool of math-verify workers: one per concurrent caller thread; replaced after a timeout, a crash or a fork."""

    def __init__(self):
        self._forget_workers()
        self._start_failures = 0
        if hasattr(os, "register_at_fork"):  # a forked child must not talk to its parent's workers
            os.register_at_fork(after_in_child=self._forget_workers)
        atexit.register(self.close)

    def _forget_workers(self):
        self._lock = threading.Lock()  # a fresh lock: another thread may have held it at the fork
        self._idle = []
        self._cache = {}  # (gold, pred) -> bool; RL asks the same pair often, and a pair that hung once stays 0

    def equivalent(self, gold, pred, timeout_s=GRADE_TIMEOUT_S) -> bool:
        key = (gold, pred)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
            if self._start_failures >= 3:
                return False
            worker = self._idle.pop() if self._idle else None
        if worker is None or worker.proc.poll() is not None:  # none idle, or it died while idle
            worker = _Worker()
        if not worker.start(WORKER_START_TIMEOUT_S):
            worker.kill()
            with self._lock:  # (consecutive: one slow start on a busy machine must not end math-verify for the run)
                self._start_failures += 1
            _warn_once("math_data: the math-verify worker failed to start (is math-verify installed? see the error "
                       "above); answers are graded by string match only")
            return False
        with self._lock:
            self._start_failures = 0
        result = worker.ask(gold, pred, timeout_s)
        if result is None:  # hung or crashed: kill it, and start its replacement now so it warms up meanwhile
            worker.kill()
            worker = _Worker()
        with self._lock:
            self._idle.append(worker)
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[key] = bool(result)
        return bool(result)

    def close(self):
        with self._lock:
            workers, self._idle = self._idle, []
        for w in workers:
            w.kill()


GRADER = Grader()


def _worker_main():
    """The worker process: math-verify on (gold, pred) pairs from stdin, one "1"/"0" line each on stdout."""
    import logging
    logging.disable(logging.CRITICAL)  # math-verify logs every parse failure; the parent only needs the verdict
    protocol = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the protocol
    sys.stdout = sys.stderr
    from latex2sympy2_extended.latex2sympy2 import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse, verify
    # LaTeX only: math-verify's ExprExtractionConfig runs sympy's parse_expr (eval) on the text.
    # units off: math-verify's unit rule drops variables (_UNIT_TEXT above); score() drops units on both sides
    config = [LatexExtractionConfig(boxed_match_priority=0, normalization_config=NormalizationConfig(
        basic_latex=True, units=False, malformed_operators=True, nits=True, boxed="all", equations=False))]

    def equal(gold, pred):
        # Timeouts off: math-verify's are signal.alarm based; the parent's kill is the time limit.
        # first_match: the box's whole content or nothing (any_match fell back to its last "$4$" or fraction, so
        # an unreadable box holding the gold among other text scored 1)
        g, p = (parse("\\boxed{" + x + "}", extraction_config=config, parsing_timeout=None,
                      extraction_mode="first_match") for x in (gold, pred))
        return bool(g) and bool(p) and verify(g, p, timeout_seconds=None)

    try:
        import resource
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except Exception:
        resource = None
    equal("\\frac{1}{2}", "0.5")  # warm up sympy's caches before saying ready
    protocol.write(b"ready\n")
    for line in sys.stdin.buffer:  # EOF (the parent exited) ends the worker
        if resource is not None:  # the kernel ends this process if the request below spins past the guard
            try:
                used = resource.getrusage(resource.RUSAGE_SELF)
                soft = int(used.ru_utime + used.ru_stime) + WORKER_CPU_GUARD_S
                hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
                if hard == resource.RLIM_INFINITY or soft < hard:
                    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
            except (ValueError, OSError):
                resource = None
        try:
            request = json.loads(line)
            ok = equal(str(request["gold"]), str(request["pred"]))
        except Exception:
            ok = False
        protocol.write(b"1\n" if ok else b"0\n")


# -----------------------------------------------------------------------------
# command line


def bench(test):
    """Grading speed on MATH-500: the figures quoted in the README."""
    responses = [f"So the answer is $\\boxed{{{r['answer']}}}$." for r in test]
    GRADER.close()  # one worker to time (a caller's threads may have left several idle)
    GRADER.equivalent("1", "1")  # start the worker outside the timings
    t0 = time.perf_counter()
    n_right = sum(score(resp, rec, True) for resp, rec in zip(responses, test))
    t_score = time.perf_counter() - t0
    print(f"score(): {len(test)} self-gradings in {t_score:.2f} s ({n_right:.0f} right; string match answers most)")
    (worker,) = GRADER._idle
    t0, cpu0 = time.perf_counter(), worker.cpu_seconds()
    # " ": no string match
    n_right = sum(GRADER.equivalent(r["answer"], r["answer"] + " ", GRADE_TIMEOUT_S) for r in test)
    t_worker, cpu = time.perf_counter() - t0, worker.cpu_seconds()
    cpu_text = f", {cpu - cpu0:.2f} CPU s in the worker" if cpu is not None and cpu0 is not None else ""
    print(f"math-verify via the worker: {len(test)} gradings in {t_worker:.2f} s{cpu_text} ({n_right} right)")
    t0 = time.perf_counter()
    for _ in range(200):
        GRADER._cache.clear()
        GRADER.equivalent("1", "1", GRADE_TIMEOUT_S)
    t_trivial = (time.perf_counter() - t0) / 200
    print(f"one trivial call through the worker: {1e3 * t_trivial:.2f} ms")
    t0 = time.perf_counter()
    GRADER.equivalent("9", "9^{9^{9^9}}", GRADE_TIMEOUT_S)  # straight to the worker, past the input checks
    print(f"a hanging call: {time.perf_counter() - t0:.2f} s to 0.0 (limit {GRADE_TIMEOUT_S} s), worker restarted")


def get_parser():
    p = common.new_parser("MATH: build the paper's splits, write teacher SFT data, benchmark grading.")
    p.add_argument("--train_pool", default=DEFAULT_TRAIN_POOL,
                   help="training pool: a jsonl/json file, a Hendrycks directory, or hf:NAME[:SPLIT]")
    p.add_argument("--test", default=DEFAULT_TEST, help="test set (MATH-500), same formats as --train_pool")
    p.add_argument("--hub", type=common.str2bool, default=False,
                   help=f"read the pool and test set from the Hugging Face hub ({HUB_TRAIN_POOL}, {HUB_TEST}); "
                        f"needs `pip install datasets` and a network")
    p.add_argument("--out_dir", default="data/math", help="where the splits are written")
    p.add_argument("--n_sft_train", type=int, default=900, help="SFT train problems (the paper: 900)")
    p.add_argument("--n_sft_val", type=int, default=100, help="SFT validation problems (the paper: 100)")
    p.add_argument("--seed", type=int, default=1234, help="shuffle seed of the training pool (the paper: 1234)")
    p.add_argument("--teacher_sft", default=None, metavar="OUT.jsonl",
                   help="instead of splitting: write SFT jsonl (id, task, prompt, response=the dataset solution) "
                        "for the records of --split")
    p.add_argument("--split", default="data/math/sft_train.jsonl", help="records for --teacher_sft")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory (Hugging Face format) for --teacher_sft; not needed with --template plain")
    p.add_argument("--template", default="auto", choices=["auto", "chat", "plain"],
                   help="prompt template: chat (the tokenizer's, with the paper's system prompt), plain "
                        "(Question/Answer), auto (chat when the tokenizer has one)")
    p.add_argument("--bench", type=common.str2bool, default=False,
                   help="instead of splitting: time grading on the test set")
    return p


def main(argv=None):
    parser = get_parser()
    args = common.parse_settings(parser, argv)
    common.check_non_negative(args, "n_sft_train", "n_sft_val")
    if not args.teacher_sft:  # (a forgotten --teacher_sft wrote every split, over --out_dir's)
        common.refuse_unused(args, parser, ("split", "tokenizer", "template"), "--teacher_sft",
                             "write the splits (or --bench)")

    if args.teacher_sft:
        common.check_distinct_outputs([("--teacher_sft", args.teacher_sft)], [("--split", args.split)])
        tokenizer = tasks.teacher_sft_tokenizer(args.tokenizer, args.template)
        records = load_split(args.split)
        rows = []
        for r in records:
            prompt = render_prompt(r, tokenizer, args.template)
            rows.append({"id": r["id"], "task": TASK, "prompt": prompt,
                         "response": tasks.teacher_response_after(prompt, teacher_response(r))})
        common.write_jsonl(args.teacher_sft, rows)
        n_bare = sum(1 for r in records if not r["solution"].strip())
        print(f"wrote {len(rows)} SFT records to {args.teacher_sft}"
              + (f" ({n_bare} have no solution in the data: their response is only the final-answer sentence)"
                 if n_bare else ""))
        return

    pool_path, test_path = (HUB_TRAIN_POOL, HUB_TEST) if args.hub else (args.train_pool, args.test)
    needed = [("test set", test_path)] if args.bench else [("training pool", pool_path), ("test set", test_path)]
    for what, path in needed:  # (--bench grades the test set only)
        if not path.startswith("hf:") and not os.path.exists(path):
            flag = "--train_pool" if what == "training pool" else "--test"
            raise UserError(f"{what} {path} not found: pass {flag} PATH (jsonl, json, a Hendrycks directory or "
                            f"hf:NAME[:SPLIT]), or --hub true to read from the Hugging Face hub")
    test = load_split(test_path)
    if args.bench:
        bench(test)
        return
    pool = load_split(pool_path, keep_empty=True)  # passed over after the shuffle, which must see the whole pool
    splits, counts = make_splits(pool, test, args.n_sft_train, args.n_sft_val, args.seed)
    common.check_distinct_outputs([(f"--out_dir ({name}.jsonl)", os.path.join(args.out_dir, f"{name}.jsonl"))
                                   for name in splits], [("--train_pool", pool_path), ("--test", test_path)])
    for name, records in splits.items():
        common.write_split(os.path.join(args.out_dir, f"{name}.jsonl"), records)
    print(f"pool {counts['pool']} ({pool_path}): dropped {counts['dropped_empty']} with an empty answer, "
          f"{counts['dropped_in_test']} also in the test set, {counts['dropped_duplicate']} duplicates")
    print(f"wrote to {args.out_dir}/: " + ", ".join(f"{name} {len(recs)}" for name, recs in splits.items()))


if __name__ == "__main__":
    common.run_main(main)
