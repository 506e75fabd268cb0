"""
Tasks and their data: the task registry (`--task`), a checkpoint's tokenizer, the paper's prompts, a split's records
checked to belong to the task, stratified subsets, SFT examples tokenized as training sees them, and the RL rollout
logs. No torch here: the data generators import it.
"""
import ast
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import math
import numbers
import os
import random
import re
import sys
from concurrent.futures import ThreadPoolExecutor

from common import (UserError, check_fields, finite_number, iter_jsonl, open_lines, print0, read_json, run_dir_hint,
                    stop_token_ids, world_size)

TASKS = ("kk", "math")

# The paper's system prompt (Qwen-Math style), used for every task and model.
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

# The paper's template for tokenizers without a chat template ("base" runs).
PLAIN_TEMPLATE = "Question:\n{question}\nAnswer:\nLet's think step by step."

# The date Llama 3.1's chat template always writes, given to every template (Llama 3.2's writes today's otherwise).
TEMPLATE_DATE = "26 Jul 2024"


# -----------------------------------------------------------------------------
# the task registry and prompts


# fields of a rollout log row (train_rl): a task's DIFFICULTY, logged beside them, must not take one's name
ROLLOUT_ROW_FIELDS = ("id", "prompt", "response", "reward", "finished", "length", "step", "epoch", "sample",
                      "advantage", "trained", "rank")


def task_module_name(name):
    """The module a `--task` name stands for (kk -> kk_data, math -> math_data, any other name as is)."""
    return {"kk": "kk_data", "math": "math_data"}.get(name, name)


def get_task(name):
    """The task module for `--task`: kk, math, or any importable module with the same interface
    (DIFFICULTY, load_split, render_prompt, score) — how a fork adds a task (docs/data.md, "Adding a task")."""
    module = task_module_name(name)
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module or ""):
        raise UserError(f"--task {name!r}: not a module name; give the task module's import name (a file "
                        f"mytask.py in the repository or on PYTHONPATH is --task mytask; in a package, pkg.mytask)")
    if module.endswith(".py"):
        raise UserError(f"--task {name!r}: give the module's import name, --task {module[:-3]}, not its file name")
    top = module.split(".")[0]
    if top in sys.stdlib_module_names:  # Python loads its own module, or the task file shadows it for every import
        raise UserError(f"--task {name!r}: {top!r} is a module of Python's standard library; rename the task module, "
                        f"or put it in a package (--task pkg.{top})")
    try:
        task = importlib.import_module(module)
    except ImportError as e:
        if e.name is not None and module != e.name and not module.startswith(e.name + "."):
            raise UserError(f"task module {module!r} failed to import: {e}")
        raise UserError(f"unknown task {name!r} ({e}); choose one of {', '.join(TASKS)} or a module name")
    missing = [f for f in ("DIFFICULTY", "load_split", "render_prompt", "score") if not hasattr(task, f)]
    if missing:
        raise UserError(f"task module {module!r} ({getattr(task, '__file__', None) or 'built in'}) lacks "
                        f"{', '.join(missing)}")
    if task.DIFFICULTY in ROLLOUT_ROW_FIELDS:
        raise UserError(f"task module {module!r}: DIFFICULTY = {task.DIFFICULTY!r} is the name of a rollout log "
                        f"field, which it would overwrite; rename it (reserved: {', '.join(ROLLOUT_ROW_FIELDS)})")
    return task


def reward_of(task, response, record, finished):
    """task.score as a float: a bool or a numpy number counts as its value; anything else, or NaN, is an error
    naming the task (a rollout log holding `true` would be refused later, when set B or LIMR reads it)."""
    reward = task.score(response, record, finished)
    if hasattr(reward, "item") and not isinstance(reward, numbers.Real):  # a numpy bool, a 0-d tensor
        try:
            reward = reward.item()
        except (ValueError, RuntimeError):  # several elements: not one reward
            pass
    if not isinstance(reward, numbers.Real) or not math.isfinite(reward):
        raise UserError(f"task {task.__name__}: score() returned {reward!r} ({type(reward).__name__}) for record "
                        f"{record.get('id')!r}; it must return a finite number (1.0 = correct)")
    return float(reward)


# the answer box the system prompt asks for: \boxed (or \fbox) as a whole command, not \boxedfoo; with its brace, an
# escape (\{, \}, \\: one token, never a brace) or a brace, what the brace scan below reads
BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
BOX_OPEN_BRACE_OR_ESCAPE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])[ \t]*\{|\\.|[{}]", re.S)


def outermost_box(text, at):
    """The content of the outermost box open just past position `at` (a box command, its own brace counted): False
    where no box is open there, None where it never closes. One pass over the braces, linear in the text."""
    opened = []  # per open brace: where its content starts if a box opened it, else None
    outer = None  # (the depth of that box, where its content starts)
    for m in BOX_OPEN_BRACE_OR_ESCAPE.finditer(text):
        token = m.group()
        if token == "}":
            if opened:
                opened.pop()
            if outer is not None and len(opened) == outer[0]:
                return text[outer[1]:m.start()]
        elif token == "{":
            opened.append(None)
        elif len(token) > 2:  # a box's command and its brace (else an escape)
            opened.append(m.end())
        if outer is None and m.start() >= at:
            depth = next((d for d, start in enumerate(opened) if start is not None), None)
            if depth is None:
                return False
            outer = (depth, opened[depth])
    return None if outer is not None else False


def last_box(text):
    """The raw content of the response's last box: \\boxed{...} or \\fbox{...} (spaces before the brace allowed,
    nested braces counted, escaped \\{ \\} not), or `\\boxed 5` up to the closing $ or the line's end; where that box
    lies inside another, the outermost one's whole content (`\\boxed{3 \\text{ or } \\boxed{4}}` is a hedge, not 4).
    None if there is no box, or the last one is unclosed (a truncated answer) or bare (`\\boxed` and no content): an
    earlier box never stands in for a broken last one. Every task's scorer reads its answer here (math_data cleans it
    further)."""
    if not isinstance(text, str):
        return None
    last = None
    for last in BOX_COMMAND.finditer(text):  # (linear: no backtracking regex on hostile text)
        pass
    if last is None:
        return None
    boxed = outermost_box(text, last.start())
    if boxed is not False:  # its content, or None: unclosed
        return boxed
    j = last.end()  # no brace: "\\boxed 5", up to the closing $ or the end of the line
    while j < len(text) and text[j] in " \t":
        j += 1
    if last.end() < j < len(text) and text[j] != "{":
        return re.split(r"[$\n]", text[j:], maxsplit=1)[0]
    return None


def is_correct(reward):
    """The one rule of a right answer (1.0 by the task interface; a bonus above it counts as right): accuracy and
    pass@k, RL's logged acc, the re-distillation sets' filter and LIMR's solved share all read it."""
    return reward >= 1.0


def rescore(task, samples, records, where, score_truncated=False):
    """Re-score samples ({"id", "response", "finished", "reward"}) in place with the task's score of now (the
    responses stand); returns how many rewards changed. A sample whose id no record has is an error naming `where`.
    score_truncated: a truncated response is scored as if it had ended (eval.py --score_truncated)."""
    by_id = {str(r["id"]): r for r in records}
    missing = sorted({str(s["id"]) for s in samples} - set(by_id))
    if missing:
        raise UserError(f"{where}: no record for id {missing[0]!r} ({len(missing)} ids missing)")
    # a task whose score says it is safe to call from several threads (SCORE_THREADS: MATH's grader runs each answer
    # in its own math-verify worker process, ~5 ms an answer the string match does not settle; a 5,000 x 16 pair took
    # 3.5 minutes one at a time, on rank 0, while the other ranks wait in a collective) is scored by up to 16 threads,
    # the cores shared with the other ranks (set B re-scores on every rank); any other on this thread, as everywhere
    # else (a score that times itself out with signal.alarm works on the main thread only)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, min(16, cores // world_size())) if getattr(task, "SCORE_THREADS", False) else 1

    def score(s):
        return reward_of(task, s["response"], by_id[str(s["id"])], s["finished"] or score_truncated)
    if threads == 1:
        rewards = [score(s) for s in samples]
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            rewards = list(pool.map(score, samples))
    changed = 0
    for s, reward in zip(samples, rewards):
        changed += reward != s["reward"]
        s["reward"] = reward
    return changed


def task_source_digest(task):
    """A digest of what decides the task's scores: eval re-scores a finished pair's samples when it changed. The
    task module's source and that of every module of this project (or beside the task file) it imports, directly or
    through them (common.py, tasks.py, a fork's grader module), and the installed versions of the packages the task
    names in SCORER_PACKAGES (MATH: math-verify's rules and the sympy it compares with)."""
    digest = hashlib.sha256()
    for path in sorted(project_imports(task.__file__)):
        with open(path, "rb") as f:
            digest.update(os.path.basename(path).encode() + b"\0" + hashlib.sha256(f.read()).digest())
    for package in getattr(task, "SCORER_PACKAGES", ()):
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        digest.update(f"{package}=={version}\0".encode())
    return digest.hexdigest()[:16]


def project_imports(path):
    """The source files of `path` and of the modules it imports, directly or through them, that live in this
    project's directory or in path's own (imports read from the source, at any depth of it; not those of the
    standard library or of installed packages). A package's modules count: `from pkg.grader import f`, `import
    pkg.grader` and, in a package, `from .grader import f` read pkg/grader.py, not only pkg/__init__.py; and so do
    its subpackages' (pkg/sub/rules.py) and a package's beside the task (graders/check.py)."""
    homes = {os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(path))}
    found, todo = set(), [os.path.abspath(path)]

    def follow(origin):  # (a source file in or under this project's directory or path's: read its imports too; not
        origin = os.path.abspath(origin) if origin else ""  # an installed package's, as in a virtualenv there)
        if (origin.endswith(".py") and any(origin.startswith(home + os.sep) for home in homes)
                and not {"site-packages", "dist-packages"} & set(origin.split(os.sep))):
            todo.append(origin)
            return True
        return False

    while todo:
        source = todo.pop()
        if source in found:
            continue
        found.add(source)
        with open(source, "rb") as f:
            tree = ast.parse(f.read(), source)
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}  # (a name may be a module)
            elif isinstance(node, ast.ImportFrom):  # relative: files of the source's package (or one above it)
                base = os.path.dirname(source)
                for _ in range(node.level - 1):
                    base = os.path.dirname(base)
                stem = os.path.join(base, *node.module.split(".")) if node.module else base
                for candidate in [stem + ".py", os.path.join(stem, "__init__.py"),
                                  *(os.path.join(stem, a.name + ".py") for a in node.names)]:
                    if os.path.isfile(candidate):
                        follow(candidate)
        for name in names:
            parts = name.split(".")
            if parts[0] in sys.stdlib_module_names:  # (a Python installed under a home, e.g. a conda in ~, too)
                continue
            for depth in range(1, len(parts) + 1):  # pkg, then pkg.grader (only inside a package of ours)
                module = ".".join(parts[:depth])
                origin = getattr(sys.modules.get(module), "__file__", None)
                if origin is None:
                    try:
                        spec = importlib.util.find_spec(module)
                    except (ImportError, ValueError):  # (a package that fails to import, a name a test put there,
                        spec = None                    # or a function imported from a module)
                    origin = spec.origin if spec is not None else None
                if not follow(origin):
                    break
    return found


# a checkpoint's tokenizer files: the prompts (its chat template) and the stop ids come from them
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model")
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt")  # (one of them says the tokens)


def stamps_as_recorded(old, new):
    """A checkpoint's stamps now (model.checkpoint_stamps with TOKENIZER_FILES), less the tokenizer files where the
    ones recorded (`old`) have none of them: an earlier version stamped the weights and config only."""
    if isinstance(old, dict) and not any(os.path.basename(f) in TOKENIZER_FILES for f in old):
        return {f: v for f, v in new.items() if os.path.basename(f) not in TOKENIZER_FILES}
    return new


def check_tokenizer_files(path):
    """That directory `path` holds a tokenizer's vocabulary (transformers 5 returns an empty tokenizer, one token
    long, for one that does not, and every text encodes to nothing): a UserError otherwise. Cheap: a script checks
    every checkpoint it will read before the first one's work."""
    if not any(os.path.isfile(os.path.join(path, name)) for name in VOCABULARY_FILES):
        raise UserError(f"{path}: no tokenizer files ({', '.join(VOCABULARY_FILES)})"
                        + (run_dir_hint(path) or "; a checkpoint saved without its tokenizer: copy in the tokenizer "
                                                 "files of the model it was trained from"))


def check_vocab(tokenizer, vocab_size, where):
    """A tokenizer with more tokens than the model's embedding is not its tokenizer (an id past the table crashes the
    lookup: on a GPU, a device-side assert); fewer is fine (Qwen's embedding is padded past its tokenizer)."""
    if len(tokenizer) > vocab_size:
        raise UserError(f"{where}: the tokenizer has {len(tokenizer)} tokens > the model's vocab_size {vocab_size}: "
                        f"not this model's tokenizer")


def load_tokenizer(path):
    """The tokenizer saved in a local directory (a checkpoint, or a bare tokenizer directory). A missing directory is
    named as such, not passed on to transformers, which would take the path for a hub repo id.

    Beside a config.json, transformers loads the model type's tokenizer class, which may add tokens of its own that
    the saved vocabulary lacks (Qwen2Tokenizer adds <|endoftext|> as its pad token): a tokenizer one token longer than
    the model's embedding, refused at the next stage. Then the saved tokenizer is loaded as it is, by the generic
    class."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such directory (a checkpoint or tokenizer directory; download hub models first, "
                        f"e.g. huggingface-cli download Qwen/Qwen2.5-1.5B --local-dir DIR)")
    check_tokenizer_files(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        saved = os.path.join(path, "tokenizer.json")
        if os.path.isfile(saved) and len(tokenizer) > Tokenizer.from_file(saved).get_vocab_size(with_added_tokens=True):
            tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        return tokenizer
    except Exception as e:  # a damaged file: OSError, ValueError, KeyError, or tokenizers' parser's bare Exception
        raise UserError(f"{path}: cannot load tokenizer ({type(e).__name__}: {e})")


def render_question(question: str, tokenizer, template: str = "auto") -> str:
    """The paper's prompt: chat template with SYSTEM_PROMPT, or the plain Question/Answer one.

    template: "chat" | "plain" | "auto" (chat when the tokenizer has a chat template).
    The chat prompt ends with the assistant header ("<|im_start|>assistant\\n" for Qwen).
    """
    if template == "auto":
        template = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if template == "plain":
        return PLAIN_TEMPLATE.format(question=question)
    if template != "chat":
        raise UserError(f"unknown prompt template {template!r}; choose chat, plain or auto")
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("prompt template 'chat' asked for, but the tokenizer has no chat template; "
                        "use --template plain")
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    # Llama 3.2's template writes today's date into the system header unless given date_string: a prompt must not
    # change with the calendar (an SFT file rendered one day, RL and eval on another, a resume, a run past midnight)
    from jinja2 import TemplateError
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             date_string=TEMPLATE_DATE)
    except TemplateError as e:  # (a chat_template.jinja edited by hand)
        raise UserError(f"{tokenizer.name_or_path or 'the tokenizer'}: its chat template does not render "
                        f"({type(e).__name__}: {e})")


def teacher_sft_tokenizer(path, template):
    """The tokenizer that renders teacher SFT prompts (kk_data.py / math_data.py --teacher_sft --tokenizer PATH); the
    plain template needs none, so without a path it is None."""
    if path:
        return load_tokenizer(path)
    if template != "plain":
        raise UserError("--teacher_sft needs --tokenizer DIR (a Hugging Face tokenizer directory), or --template plain")
    return None


def teacher_response_after(prompt, response):
    """A teacher response as an SFT file stores it after this rendered prompt: on a line of its own where the prompt
    does not end in whitespace (the plain template ends "step by step."; a chat prompt ends with "\n")."""
    return "\n" + response if prompt and not prompt[-1].isspace() else response


def text_token_ids(tokenizer, texts, chunk=256):
    """Each text's own token ids (no special tokens added), tokenized a chunk at a time: one call over a whole SFT
    file held every row's full encoding at once (offsets, tokens, an attention mask never used), on every rank: a
    3,000-row file of ~5K tokens a row peaked at 2.5 GB loading, 1.1 GB so."""
    texts = list(texts)
    return [ids for at in range(0, len(texts), chunk) for ids in
            tokenizer(texts[at:at + chunk], add_special_tokens=False, return_attention_mask=False)["input_ids"]]


def encode_prompts(tokenizer, texts):
    """Token ids of texts that begin a sequence (prompts; pre-training documents): the text's own tokens, after the
    BOS token where the model family expects one -- its tokenizer adds one by itself (Llama; Qwen adds none) -- and
    the text does not already begin with it (a chat template that writes it)."""
    texts = list(texts)
    if not texts:  # a rank whose share is empty (fewer records than ranks)
        return []
    ids = text_token_ids(tokenizer, texts)
    bos = tokenizer.bos_token_id
    if bos is None or tokenizer("a", add_special_tokens=True)["input_ids"][:1] != [bos]:
        return ids
    return [x if x[:1] == [bos] else [bos] + x for x in ids]


def task_prompt_ids(tokenizer, task, records, template):
    """The token ids of each record's rendered prompt."""
    return encode_prompts(tokenizer, [task.render_prompt(r, tokenizer, template) for r in records])


def warn_held_out_overlap(train_keys, held_out_keys, train_name, held_out_name):
    """A warning where prompts of a held-out set (validation, test) are also training prompts (keys: their ids, or
    their token ids): a test file passed as training data, or a copy of it beside the original, measures what was
    trained on. Not an error: a study of memorisation may mean it."""
    held_out = set(held_out_keys)
    shared = held_out & set(train_keys)
    if shared:
        print0(f"warning: {len(shared)} of the {len(held_out)} prompts of {held_out_name} are also training prompts "
               f"({train_name}): what it measures there was trained on")


def check_prompts_fit(prompt_ids, records, max_new_tokens, context, where, flag="--max_response_tokens"):
    """Every prompt plus max_new_tokens must fit the model's context. Every rank checks every prompt before any work,
    so a too-long one stops all ranks alike (not one rank, mid-collective); the error names the record by its id
    (unique in a split: a position would count the records a stage kept, not the file's)."""
    for rec, ids in zip(records, prompt_ids):
        if len(ids) + max_new_tokens > context:
            raise UserError(f"{where}: record id {rec.get('id')!r}: prompt of {len(ids)} tokens + {flag} "
                            f"{max_new_tokens} > the model's {context}-token context")


# -----------------------------------------------------------------------------
# records of a split


def load_records(task, task_name, path, tokenizer, template):
    """The split's records, checked to belong to this task: it loads with the task's load_split, every
    record has an id and the difficulty key, and each renders and scores without error (its score a number). A stage
    that renders no prompt passes tokenizer None: nothing is rendered."""
    try:
        records = task.load_split(path)
    except UserError as e:
        raise UserError(f"{e} (is {path} a split of task {task_name!r}?)")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise UserError(f"task {task_name!r}: load_split({path!r}) returned {type(records).__name__}"
                        f"{'' if not isinstance(records, list) else ' holding a non-dict'}; it must return a list "
                        f"of dicts (docs/data.md, \"Adding a task\")")
    if not records:
        raise UserError(f"split {path}: no records (empty split)")
    seen = {}  # id as text -> the id: logs and selections match ids as text, so 1 and "1" would be one prompt
    difficulties = {}  # difficulty as text -> the first value seen
    for i, r in enumerate(records):
        try:
            check_record(task, task_name, r, seen, difficulties, tokenizer, template)
        except UserError as e:
            raise UserError(f"{record_place(path, records, i)}: {e}") from None
    return records


def check_record(task, task_name, r, seen, difficulties, tokenizer, template):
    """load_records' checks of one record (seen, difficulties: what earlier records of the split hold)."""
    if "id" not in r:
        raise UserError("missing field 'id'")
    if not is_id(r["id"]):  # what the logs carry
        raise UserError(f"field 'id' is {r['id']!r}; an id is a non-blank string or an integer (rollout logs, set B "
                        f"and LIMR read no other)")
    if str(r["id"]) in seen:
        first = seen[str(r["id"])]
        raise UserError(f"duplicate id {r['id']!r}"
                        + (f" (the same as {first!r} as text, which is how ids are matched)"
                           if first != r["id"] or type(first) is not type(r["id"]) else ""))
    seen[str(r["id"])] = r["id"]
    if task.DIFFICULTY is not None and task.DIFFICULTY not in r:
        raise UserError(f"missing difficulty field {task.DIFFICULTY!r} of task {task_name!r}; is this a split of "
                        f"another task?")
    if task.DIFFICULTY is not None:  # tables key difficulties by text: 3 and "3" would share one row
        d = r[task.DIFFICULTY]
        if d is not None and not isinstance(d, (str, int, float)):
            raise UserError(f"difficulty {task.DIFFICULTY!r} is a {type(d).__name__} ({d!r}); a difficulty is a "
                            f"string or a number")
        if isinstance(d, float) and not math.isfinite(d):  # (NaN equals nothing, not even itself)
            raise UserError(f"difficulty {task.DIFFICULTY!r} is {d!r}; give a finite number, a string or null")
        first = difficulties.setdefault(str(d), d)
        if first != d or type(first) is not type(d):
            raise UserError(f"difficulty {task.DIFFICULTY!r} is {d!r}, but an earlier record's is {first!r}, which "
                            f"reads the same in a table; give the split one type")
    try:
        json.dumps(r)  # (lim_select writes its pools so, train_rl logs the difficulty)
    except (TypeError, ValueError) as e:
        raise UserError(f"task {task_name!r}: load_split returned a record that is not JSON ({e}); records must be "
                        f"written back as JSON lines (docs/data.md)")
    try:
        if tokenizer is not None:  # (a stage that renders no prompt passes none)
            prompt = task.render_prompt(r, tokenizer, template)
            if not isinstance(prompt, str) or not prompt:
                raise UserError(f"task {task_name!r}: render_prompt returned {prompt!r}; it must return the "
                                f"prompt text (a non-empty string)")
        reward_of(task, "", r, True)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise UserError(f"task {task_name!r} cannot render or score it ({type(e).__name__}: {e}); a split of another "
                        f"task, or a fault in the task module's render_prompt(record, tokenizer, template) or "
                        f"score(response, record, finished)?")


def record_place(path, records, index):
    """Where a split's record is, for an error: `split FILE:LINE` where the split is a jsonl file that the task read a
    record per line (as many records as lines, and each line's id, where both have one, the record's), else its
    number in the split; and its id, if it has one."""
    record = records[index]
    place = f"split {path}: record {index + 1}"
    if os.path.isfile(path) and not path.endswith((".json", ".parquet")):
        try:
            with open_lines(path) as lines:
                rows = list(lines)
        except (UserError, OSError, UnicodeError):  # (not a jsonl file after all: the record's number stands)
            rows = []
        if len(rows) == len(records) and all(r.get("id", row.get("id")) == row.get("id", r.get("id"))
                                             for (_, row), r in zip(rows, records)):
            place = f"split {path}:{rows[index][0]}"
    return place + (f" (id {record['id']!r})" if is_id(record.get("id")) else "")


def stratified_subset(records, n, key, seed=0):
    """n of the records, each value of record[key] (the task's difficulty) in proportion to the whole (largest
    remainders), drawn with a seeded generator and kept in their original order; with a one-line description.
    n = 0 or n >= len(records): all of them. (A split ordered by difficulty must not give its first n.)"""
    if not n or n >= len(records):
        return list(records), f"all {len(records)}"
    groups = {}
    for i, r in enumerate(records):
        groups.setdefault(r.get(key), []).append(i)
    quota = {v: n * len(ix) / len(records) for v, ix in groups.items()}
    take = {v: int(q) for v, q in quota.items()}
    for v in sorted(groups, key=lambda v: (take[v] - quota[v], str(v)))[:n - sum(take.values())]:
        take[v] += 1
    rng = random.Random(seed)
    chosen = sorted(i for v, ix in groups.items() for i in rng.sample(ix, take[v]))
    if key is None:
        return [records[i] for i in chosen], f"{n} of {len(records)}, drawn at random"
    return ([records[i] for i in chosen], f"{n} of {len(records)}, stratified by {key} ("
            + ", ".join(f"{v}: {take[v]}" for v in sorted(groups, key=str)) + ")")


# -----------------------------------------------------------------------------
# SFT data


def check_sft_record(path, lineno, rec):
    """An SFT-format record has "id" (a string or an integer), "prompt" and "response" (strings), the prompt not
    empty (the first response token needs a context), and, if any, a "task" that is a name or null; otherwise a
    UserError naming the file, line and field."""
    check_fields(f"{path}:{lineno}", rec, ("id", "prompt", "response"), {"prompt": str, "response": str})
    if rec.get("task") is not None and not isinstance(rec["task"], str):  # (sample_effect compares it with --task)
        raise UserError(f"{path}:{lineno}: field 'task' is {rec['task']!r}; a task is a name (a string) or null")
    if not is_id(rec["id"]):  # effects and reports name it
        raise UserError(f"{path}:{lineno}: field 'id' is {rec['id']!r}; an id is a non-blank string or an integer")
    if not rec["prompt"]:
        raise UserError(f"{path}:{lineno}: empty prompt (the first response token needs a context)")
    # (a lone surrogate, which no tokenizer takes, is refused as the line is read: common.iter_jsonl)


def check_sft_outcomes(path, rows, where):
    """A record that says its response was cut off ("finished": false) or wrong (a "reward" below 1, the shipped
    tasks' reward of a right answer: is_correct) is an error naming it: an RL rollout log or sample_policy's
    --samples_out (every sample, for inspection) given as SFT data trained on every sample, EOS appended after
    cut-off answers. A set of wrong answers trained on deliberately (an ablation) drops the field."""
    for rec, lineno in zip(rows, where):
        check_fields(f"{path}:{lineno}", rec, (), {"finished": bool})  # (a "false" or 0 would pass as finished)
        if "reward" in rec and not finite_number(rec["reward"]):
            raise UserError(f"{path}:{lineno}: field 'reward' is {json.dumps(rec['reward'])}, expected a finite "
                            f"number (or no such field)")
        if rec.get("finished") is False:
            raise UserError(f"{path}:{lineno}: field 'finished' is false: the response was cut at the length limit, "
                            f"and SFT appends EOS after it (an RL rollout log, or sample_policy's --samples_out, holds "
                            f"every sample; its --out the finished, correct ones)")
        if "reward" in rec and not is_correct(rec["reward"]):
            raise UserError(f"{path}:{lineno}: field 'reward' is {rec['reward']}: a wrong answer (an RL rollout log, "
                            f"or sample_policy's --samples_out, holds every sample; its --out the correct ones); to "
                            f"train on wrong answers on purpose, drop the field")


def lone_text_marker(tokenizer):
    """The mark a tokenizer puts before every text it encodes alone, or None: sentencepiece's "▁" (a Prepend
    normalizer or a Metaspace that prepends, as Llama-2's and Mistral's tokenizers have), a byte-level "Ġ" with
    add_prefix_space. Read from the fast tokenizer's normalizer and pre-tokenizer (a few hundred bytes of JSON)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    found = []

    def walk(node):
        if isinstance(node, dict):
            kind = node.get("type")
            if kind == "Prepend":
                found.append(node.get("prepend"))
            elif kind == "Metaspace" and (node.get("prepend_scheme") in ("first", "always")
                                          or node.get("add_prefix_space")):
                found.append(node.get("replacement"))
            elif kind == "ByteLevel" and node.get("add_prefix_space"):
                found.append("Ġ")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    for part in (getattr(backend, "normalizer", None), getattr(backend, "pre_tokenizer", None)):
        if part is not None:
            walk(json.loads(part.__getstate__()))
    return found[0] if found else None


def check_apart_tokenization(tokenizer):
    """A UserError where the tokenizer marks the start of a text it encodes alone (lone_text_marker): a response
    tokenized apart from its prompt would begin with a token the model never makes after its prompt (SFT would teach
    it; a sample's effect or token_shift's divergence would be taken there). sft_token_ids checks; sample_policy
    checks before it samples."""
    if marker := lone_text_marker(tokenizer):
        raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} puts {marker!r} before every text it "
                        f"encodes alone (sentencepiece's, as Llama-2's and Mistral's): a response tokenized apart "
                        f"from its prompt (SFT data and its length check, sample effects, token_shift's responses) "
                        f"would begin with a token generation never makes after the prompt; such tokenizers are not "
                        f"supported there (Qwen2.5's and Llama-3's are)")


def sft_token_ids(tokenizer, prompts, responses, eos=True):
    """Token ids of (prompt, response) pairs as SFT trains on them: the prompt (after BOS where the model family
    expects one: encode_prompts) and the response tokenized separately, no other special tokens, then EOS (eos: one
    bool for all, or one per pair). Returns [(ids, start)], start = the index of the first response token. A
    tokenizer that marks the start of a lone text is refused (check_apart_tokenization)."""
    check_apart_tokenization(tokenizer)
    eos = [eos] * len(prompts) if isinstance(eos, bool) else eos
    prompt_ids = encode_prompts(tokenizer, prompts) if prompts else []
    response_ids = text_token_ids(tokenizer, responses)
    return [(p + r + ([tokenizer.eos_token_id] if e else []), len(p)) for p, r, e in zip(prompt_ids, response_ids, eos)]


def check_no_stop_tokens(path, lineno, tokenizer, response_ids, stops, field="response"):
    """A UserError naming the file and line if a response's tokens (without the EOS appended to it) hold a stop id.
    The tokenizer reads special-token text as its id: a stop token in a response would teach a model to stop there
    and go on (SFT), or be compared at a position past the response's end (token_shift). field: "text" for a
    pre-training document (redistill_sft --pretrain), which ends with the EOS appended to it as a response does."""
    held = [(at, t) for at, t in enumerate(response_ids) if t in stops]
    if held:
        at, t = held[0]
        raise UserError(f"{path}:{lineno}: field '{field}' holds the stop token "
                        f"{tokenizer.convert_ids_to_tokens(t)!r} (id {t}) at token {at} of {len(response_ids)}; "
                        f"EOS is appended to a finished {field}, the only place a model learns to stop: drop it "
                        f"from the {field}")


def sft_length_limit(max_length, context):
    """The longest SFT example a run takes: --max_length, or the model's context where that is shorter (a note says
    so); and how an error names that limit (raising --max_length past the context changes nothing)."""
    if max_length <= context:
        return max_length, f"--max_length {max_length} (raise it, or drop the example)"
    print0(f"note: --max_length {max_length} > the model's context; using {context}")
    return context, f"the model's {context}-token context (drop or shorten the example)"


def load_sft_examples(paths, tokenizer, max_length, limit=None):
    """Tokenize SFT jsonl files: prompt and response separately (no special tokens), EOS appended to the response.

    Returns a list of {"input_ids", "start" (index of the first response token), "id", "task", "file", "line"}.
    Loss goes on input_ids[start:] (the response and its EOS). An example longer than max_length (limit: how the
    error names it, sft_length_limit's), a missing or non-string field, an empty prompt, a blank response, a response
    that holds a stop token (EOS, or another id generation stops at: common.stop_token_ids) or a tokenizer without
    EOS is a UserError naming file and line.
    Note: text sampled from a model and re-tokenized may split into slightly different tokens than the model
    produced (BPE is not unique); the text is the same, which is what the paper trains on too.
    """
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no eos_token; SFT appends EOS to every response")
    stops = set(stop_token_ids(tokenizer))
    examples = []
    first_at, repeats = {}, []  # (prompt, response) -> where first read; where each repeat was read, and its first
    for path in paths:
        rows, where = [], []
        with open_lines(path) as lines:
            for lineno, rec in lines:
                check_sft_record(path, lineno, rec)
                if not rec["response"].strip():  # (its one target, EOS after the prompt, weighs as a whole answer)
                    raise UserError(f"{path}:{lineno}: field 'response' is {'blank' if rec['response'] else 'empty'}: "
                                    f"trained on, it teaches this prompt to stop at once (no task's right answer is "
                                    f"empty)")
                rows.append(rec)
                where.append(lineno)
                here = f"{path}:{lineno}"
                if (first := first_at.setdefault((rec["prompt"], rec["response"]), here)) != here:
                    repeats.append((here, first))
        if not rows:
            raise UserError(f"{path}: no examples")
        check_sft_outcomes(path, rows, where)
        tokenized = sft_token_ids(tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows])
        for rec, lineno, (ids, start) in zip(rows, where, tokenized):
            check_no_stop_tokens(path, lineno, tokenizer, ids[start:-1], stops)
            if len(ids) > max_length:
                raise UserError(f"{path}:{lineno}: example {rec['id']!r} has {len(ids)} tokens (prompt {start} + "
                                f"response {len(ids) - start - 1} + EOS) > "
                                f"{limit or f'max_length {max_length} (raise --max_length, or drop the example)'}; "
                                f"long examples are an error, not truncated")
            examples.append({"input_ids": ids, "start": start, "id": rec["id"], "task": rec.get("task"),
                             "file": path, "line": lineno})
    if repeats:  # (sample_policy drops repeats: these are a set given twice, or a copy beside it; not an error, as
        #          weighting an example on purpose is a choice)
        print0(f"note: {len(repeats)} of the {len(examples)} examples repeat an earlier one's prompt and response "
               f"(the first: {repeats[0][0]} repeats {repeats[0][1]}); each is used as given: trained on, and "
               f"scored by sample_effect, once per line")
    return examples


# -----------------------------------------------------------------------------
# RL rollout logs: train_rl.py writes RUN_DIR/rollouts/step_NNNNNN.jsonl, one row per rollout of step N;
# sample_policy.py (re-distillation set B) and lim_select.py (LIMR) read them

# a log row's fields and their types (a row holds more: sample, advantage, difficulty, ...)
ROLLOUT_FIELDS = {"step": int, "id": (str, int), "prompt": str, "response": str, "reward": (int, float),
                  "finished": bool, "length": int, "epoch": int}


def is_id(value):
    """A record's id: a string with a character other than blanks (what logs and errors can show), or an integer (a
    bool is no id, though Python counts it an int)."""
    return not isinstance(value, bool) and isinstance(value, ROLLOUT_FIELDS["id"]) and str(value).strip() != ""


def rollout_log_path(run_dir, step):
    return os.path.join(run_dir, "rollouts", f"step_{step:06d}.jsonl")


def rollout_logs(run_dir):
    """{step: path} of the rollout logs in RUN_DIR/rollouts/ (step_N.jsonl, with or without zero padding)."""
    folder = os.path.join(run_dir, "rollouts")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    logs = {}
    for name in sorted(names):
        if m := re.fullmatch(r"step_(\d+)\.jsonl", name):
            step, path = int(m.group(1)), os.path.join(folder, name)
            if step in logs:  # (step_1.jsonl beside train_rl's step_000001.jsonl: which is the run's is not known)
                raise UserError(f"{logs[step]} and {path}: two rollout logs of step {step}; move away the one that is "
                                f"not this run's")
            logs[step] = path
    if not logs and os.path.isdir(run_dir) and any(re.fullmatch(r"step_\d+\.jsonl", n) for n in os.listdir(run_dir)):
        raise UserError(f"{run_dir}: holds rollout logs itself; give the RL run's directory, "
                        f"{os.path.dirname(os.path.abspath(run_dir))}")
    return dict(sorted(logs.items()))


def read_rollout_log(path, step, fields):
    """(line number, row) of step `step`'s rollout log, each row checked to hold `fields` (names in ROLLOUT_FIELDS)
    with their types (a reward a finite number), and its "step" equal to `step` when that is one of them; an error
    names the file, line and field. train_rl.py writes each log whole (atomically), so a line cut short, the last one
    included, is a damaged copy: an error too, as is a file of no rows (a step logs all its rollouts, never none).
    eval.py's samples.jsonl hold the same fields and are read here too."""
    rows = []
    for lineno, row in iter_jsonl(path):
        for field in fields:
            if field not in row:
                raise UserError(f"{path}:{lineno}: missing field '{field}'")
            value, types = row[field], ROLLOUT_FIELDS[field]
            if not isinstance(value, types) or isinstance(value, bool) != (types is bool):
                expected = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
                raise UserError(f"{path}:{lineno}: field '{field}' is {value!r}, expected {expected}")
            if field == "reward" and not finite_number(value):
                raise UserError(f"{path}:{lineno}: field 'reward' is {value!r}, expected a finite number")
            if field == "length" and value < 0:  # (a table's mean length of -440)
                raise UserError(f"{path}:{lineno}: field 'length' is {value}, expected a count of tokens (>= 0)")
        if "step" in fields and row["step"] != step:
            raise UserError(f"{path}:{lineno}: field 'step' is {row['step']}, expected {step} (the file's step)")
        rows.append((lineno, row))
    if not rows:  # (read as "no rollouts", it would quietly change LIMR's scores or set B's size)
        raise UserError(f"{path}: no rows; its writer never writes an empty file, so this is a damaged copy")
    return rows


def note_prompt(prompts, row, where):
    """Keep a rollout log row's prompt in `prompts` (id -> (prompt, where first seen)); one empty, or another than
    that id's earlier rows hold (a row edited by hand, logs of two runs' data), is an error naming the line."""
    if not (isinstance(row["prompt"], str) and row["prompt"]):
        raise UserError(f"{where}: field 'prompt' is {json.dumps(row['prompt'])}, expected a prompt's text")
    prompt, first = prompts.setdefault(str(row["id"]), (row["prompt"], where))
    if row["prompt"] != prompt:
        raise UserError(f"{where}: field 'prompt' differs from that of id {row['id']!r} at {first}: one id, two "
                        f"prompts (a log edited by hand, or of two runs' data)")


def run_tokenizer(run_dir):
    """The tokenizer saved with an RL run's newest weights (every step_N directory holds one), or None."""
    saved = sorted((int(m.group(1)), name) for name in os.listdir(run_dir) if (m := re.fullmatch(r"step_(\d+)", name))
                   and os.path.isfile(os.path.join(run_dir, name, "tokenizer_config.json")))
    return load_tokenizer(os.path.join(run_dir, saved[-1][1])) if saved else None


def check_rollouts_of(run_dir, tokenizer, task, task_name, records, prompts, data):
    """That an RL run's rollouts are of `records` (read from `data`, the files given as the run's data): the run's
    --task is task_name, and each logged prompt (`prompts`: id -> (prompt, where), note_prompt's) is its record's as
    the run rendered it (`tokenizer`, run_tokenizer's; its --template). Data made again with other settings keeps its
    ids: its puzzles would be selected, or answers re-scored, in the logged ones' place. Without a tokenizer (the run
    saved no weights) only the task is compared."""
    path = os.path.join(run_dir, "settings.json")
    settings = read_json(path, "the RL run's settings") if os.path.exists(path) else {}
    run_task = settings.get("task")
    if isinstance(run_task, str) and task_module_name(run_task) != task_module_name(task_name):
        raise UserError(f"{run_dir}: the RL run's --task is {run_task!r}, not {task_name!r}")
    if tokenizer is None:
        return
    by_id, template = {str(r["id"]): r for r in records}, settings.get("template", "auto")
    for id_, (prompt, where) in prompts.items():
        if task.render_prompt(by_id[id_], tokenizer, template) != prompt:
            raise UserError(f"{where}: field 'prompt' is not that of record {id_!r} of {data} as the run rendered it "
                            f"(data made again under the same ids, or a prompt format changed since the run); give "
                            f"the run's own data ({settings.get('train_data', 'its --train_data')})")


def vocabulary_difference(tokenizer_a, tokenizer_b):
    """How two tokenizers' vocabularies (token -> id) differ, in words ("599 vs 600 tokens", "2 token(s) with other
    ids"), or "" where they are one."""
    a, b = tokenizer_a.get_vocab(), tokenizer_b.get_vocab()
    if a == b:
        return ""
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} tokens"
    return f"{len(set(a.items()) ^ set(b.items())) // 2} token(s) with other ids"


def check_same_tokenizer(dir_a, dir_b, flag_a, flag_b, why, vocab_sizes=None):
    """The one tokenizer checkpoints dir_a and dir_b share (same tokens and ids, EOS, and where given their configs'
    vocab_sizes, the logits' widths, which it must fit: check_vocab); a UserError naming the difference otherwise
    (flag_a / flag_b: the settings that named them; why: what needs one)."""
    tokenizers = [load_tokenizer(d) for d in (dir_a, dir_b)]
    problem = vocabulary_difference(*tokenizers)
    if not problem and tokenizers[0].eos_token_id != tokenizers[1].eos_token_id:
        problem = f"EOS id {tokenizers[0].eos_token_id} vs {tokenizers[1].eos_token_id}"
    if not problem and vocab_sizes and vocab_sizes[0] != vocab_sizes[1]:
        problem = f"vocab_size {vocab_sizes[0]} vs {vocab_sizes[1]} in config.json"
    if not problem:
        if vocab_sizes:
            check_vocab(tokenizers[0], vocab_sizes[0], f"{flag_a} {dir_a}")
        return tokenizers[0]
    raise UserError(f"{flag_a} {dir_a} and {flag_b} {dir_b} have different tokenizers ({problem}); {why}")
