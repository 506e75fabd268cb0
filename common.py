"""
What every stage shares, and nothing more: settings parsing, torchrun setup,
rank-0 printing, jsonl I/O with clear errors, atomic writes, the task registry
and the paper's prompt templates.
"""
import argparse
import json
import os
import random
import sys
import tempfile
from contextlib import contextmanager

# The paper's system prompt (Qwen-Math style), used for every task and model.
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
# The paper's template for tokenizers without a chat template ("base" runs).
PLAIN_TEMPLATE = "Question:\n{question}\nAnswer:\nLet's think step by step."

TASKS = ("kk", "math")


class UserError(Exception):
    """A problem with the user's input (file, setting, data): printed as one line, no traceback."""


# -----------------------------------------------------------------------------
# settings


def parse_settings(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse settings; `--config FILE.json` supplies defaults that the command line overrides."""
    parser.add_argument("--config", default=None,
                        help="JSON file of settings (keys = option names without --); command-line flags override it")
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        try:
            with open(pre.config) as f:
                cfg = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{pre.config}: cannot read settings: {e}")
        known = {a.dest for a in parser._actions}
        unknown = sorted(k for k in cfg if k.replace("-", "_") not in known)
        if unknown:
            raise UserError(f"{pre.config}: unknown setting(s) {unknown} for {parser.prog}")
        parser.set_defaults(**{k.replace("-", "_"): v for k, v in cfg.items()})
    return parser.parse_args(argv)


def str2bool(s) -> bool:
    if isinstance(s, bool):
        return s
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def run_main(main):
    """Run a script's main(); a UserError becomes one clear line on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# -----------------------------------------------------------------------------
# distributed (torchrun) setup


def dist_setup():
    """Initialise torch.distributed when launched by torchrun. Returns (rank, world_size, device)."""
    import torch
    import torch.distributed as dist
    if "RANK" not in os.environ:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return 0, 1, torch.device(device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world, device


def dist_cleanup():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def print0(*args, **kwargs):
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def all_gather_json(obj):
    """Gather one JSON-serialisable object per rank to every rank (a list, in rank order).

    JSON over a byte tensor rather than all_gather_object, so model output never goes through pickle.
    """
    import torch
    import torch.distributed as dist
    if world_size() == 1:
        return [obj]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    data = torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8, device=device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([data.numel()], device=device))
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return [json.loads(bytes(t[:n].tolist()).decode("utf-8")) for t, n in zip(out, sizes)]


def seed_everything(seed: int):
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# files


def read_jsonl(path, required=()):
    """Read a jsonl file; a bad line or a missing field raises UserError naming file, line and field."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})")
            if not isinstance(rec, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            for field in required:
                if field not in rec:
                    raise UserError(f"{path}:{lineno}: missing field '{field}'")
            records.append(rec)
    return records


@contextmanager
def atomic_open(path, mode="w"):
    """Write to a temporary file beside `path`, then rename: readers never see a half-written file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_" + os.path.basename(path))
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_jsonl(path, records):
    """Atomically write records as jsonl."""
    with atomic_open(path) as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def write_json(path, obj):
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def append_jsonl(path, record):
    """Append one record (metrics logs); the line is written whole with one write call."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


# -----------------------------------------------------------------------------
# tasks and prompts


def get_task(name):
    """The task module for `--task`: each exposes load_split, render_prompt, score, DIFFICULTY."""
    if name == "kk":
        import kk_data
        return kk_data
    if name == "math":
        import math_data
        return math_data
    raise UserError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")


def render_prompt(tokenizer, question: str, template: str = "auto") -> str:
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
        raise UserError("prompt template 'chat' asked for, but the tokenizer has no chat template; use --template plain")
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
