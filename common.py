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
    if "--config" not in parser._option_string_actions:  # a script's main may run twice in one process (tests)
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
    # torch.distributed.nn.functional takes `group=group.WORLD` as a default argument of its functions, bound
    # when the module is first imported; torch imports it lazily, with torch._dynamo (model.load_model's
    # meta-device construction does). Imported after init_process_group, it holds the default group, so
    # destroy_process_group cannot free it: the gloo worker threads outlive dist_cleanup and can drop the last
    # reference to a Python-owned tensor (the last all_gather's, kept by the final barrier) while the
    # interpreter is already finalizing; their GIL request then ends the thread inside a destructor:
    # "terminate called without an active exception", SIGABRT. Imported first, its defaults are None.
    import torch.distributed.nn  # noqa: F401
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world, device


def dist_cleanup():
    """Wait for every rank, then free the process group: its destructor joins the backend's worker threads (the
    GIL released, so they can drop what they still hold), before the interpreter starts finalizing."""
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


def iter_jsonl(path):
    """Yield (line number, record) of a jsonl file, skipping blank lines; a line that is not a JSON object
    raises UserError naming the file and line."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
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
            yield lineno, rec


def read_jsonl(path, required=()):
    """Read a jsonl file; a bad line or a missing field raises UserError naming file, line and field."""
    records = []
    for lineno, rec in iter_jsonl(path):
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
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
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
    """The task module for `--task`: kk, math, or any importable module with the same interface
    (DIFFICULTY, load_split, render_prompt, score) — how a fork adds a task."""
    import importlib
    module = {"kk": "kk_data", "math": "math_data"}.get(name, name)
    try:
        task = importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"unknown task {name!r} ({e}); choose one of {', '.join(TASKS)} or a module name")
    missing = [f for f in ("DIFFICULTY", "load_split", "render_prompt", "score") if not hasattr(task, f)]
    if missing:
        raise UserError(f"task module {module!r} lacks {', '.join(missing)}")
    return task


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


# -----------------------------------------------------------------------------
# generation over task records (sampling, evaluation and RL validation share this)


def sample_responses(model, tokenizer, task, records, n=1, temperature=0.0, top_p=1.0, max_new_tokens=512,
                     seed=0, template="auto", batch_size=64, desc="generate", progress=True):
    """Generate n responses for each record with our KV-cache engine and score them with task.score.

    Prompts are sorted by length and generated `batch_size` prompts (x n rows) at a time. Returns one
    dict per (record, sample), in record order then sample order:
    {"id", "prompt", "response", "tokens", "logprobs", "finished", "length", "reward", "sample"}.
    """
    from tqdm import tqdm
    from model import generate, stop_token_ids
    stop = stop_token_ids(tokenizer)
    prompts = [task.render_prompt(r, tokenizer, template) for r in records]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(records)), key=lambda i: len(prompt_ids[i]))
    results = [None] * len(records)
    bar = tqdm(total=len(records) * n, desc=desc, disable=not progress or rank() != 0, dynamic_ncols=True)
    for b, start in enumerate(range(0, len(order), batch_size)):
        chunk = order[start:start + batch_size]
        gens = generate(model, [prompt_ids[i] for i in chunk], n=n, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, stop_ids=stop, seed=seed * 1_000_003 + b)
        for g_idx, g in enumerate(gens):
            i = chunk[g.prompt_index]
            text = tokenizer.decode(g.tokens[:-1] if g.finished else g.tokens, skip_special_tokens=False)
            results[i] = results[i] or []
            results[i].append({"id": records[i]["id"], "prompt": prompts[i], "response": text, "tokens": g.tokens,
                               "logprobs": g.logprobs, "finished": g.finished, "length": len(g.tokens),
                               "reward": task.score(text, records[i], g.finished), "sample": g_idx % n})
        bar.update(len(gens))
    bar.close()
    return [s for per_record in results for s in per_record]


def shard(items, rank_, world):
    """This rank's share of a list: every world-th item starting at rank (disjoint, covers all)."""
    return items[rank_::world]


# -----------------------------------------------------------------------------
# optimizer and checkpoints (SFT and RL share these)


def make_optimizer(params, lr, betas=(0.9, 0.999), weight_decay=0.0, eight_bit=False):
    """AdamW; with eight_bit and bitsandbytes installed on CUDA, bitsandbytes' 8-bit AdamW (less optimizer memory)."""
    import torch
    params = [p for p in params if p.requires_grad]
    if eight_bit:
        try:
            import bitsandbytes as bnb
            if params and params[0].is_cuda:
                return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
            print0("note: 8-bit AdamW needs CUDA; using torch AdamW")
        except ImportError:
            print0("note: bitsandbytes not installed; using torch AdamW")
    fused = bool(params) and params[0].is_cuda
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)


def checkpoint_dir(run_dir, step):
    return os.path.join(run_dir, f"step_{step:06d}")


def save_checkpoint(run_dir, step, model, tokenizer, train_state: dict):
    """A HF checkpoint directory run_dir/step_N plus its training state run_dir/step_N.state.pt.

    Both are written atomically, the state last: a checkpoint is complete when its state file exists.
    train_state holds only tensors, numbers, strings, lists and dicts (loadable with weights_only=True).
    """
    import torch
    from model import save_model
    save_model(model, checkpoint_dir(run_dir, step), tokenizer)
    with atomic_open(checkpoint_dir(run_dir, step) + ".state.pt", "wb") as f:
        torch.save({"step": step, **train_state}, f)


def latest_checkpoint(run_dir):
    """(step, model_dir, state_path) of the newest complete checkpoint in run_dir, or None."""
    if not os.path.isdir(run_dir):
        return None
    steps = [int(name[5:11]) for name in os.listdir(run_dir)
             if name.startswith("step_") and name.endswith(".state.pt") and name[5:11].isdigit()]
    for step in sorted(steps, reverse=True):
        d = checkpoint_dir(run_dir, step)
        if os.path.isfile(os.path.join(d, "config.json")):
            return step, d, d + ".state.pt"
    return None


def load_train_state(path, device="cpu"):
    import torch
    return torch.load(path, map_location=device, weights_only=True)
