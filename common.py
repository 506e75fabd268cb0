"""
What every stage shares, and nothing more: settings parsing, torchrun setup,
rank-0 printing, jsonl I/O with clear errors, atomic writes, the task registry
and the paper's prompt templates.
"""
import argparse
import copy
import json
import os
import random
import sys
import tempfile
import time
from contextlib import closing, contextmanager

# The paper's system prompt (Qwen-Math style), used for every task and model.
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
# The paper's template for tokenizers without a chat template ("base" runs).
PLAIN_TEMPLATE = "Question:\n{question}\nAnswer:\nLet's think step by step."

TASKS = ("kk", "math")


class UserError(Exception):
    """A problem with the user's input (file, setting, data): printed as one line, no traceback."""


# -----------------------------------------------------------------------------
# settings


# old spellings of settings: each is an error that names the new one (one name per thing across the scripts)
RENAMED = {"--group_size": "--samples_per_prompt", "--k": "--samples_per_prompt", "--eight_bit_adam": "--adam_8bit",
           "--grad_checkpointing": "--gradient_checkpointing",
           "--num_samples": "--samples_per_prompt (samples per prompt) or, in sample_policy.py, --num_examples"}


def parse_settings(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse settings; `--config FILE.json` supplies defaults that the command line overrides. Every boolean is
    written `--name true` or `--name false`; an old spelling of a renamed setting is an error naming the new one;
    option names must be written in full (no prefixes). Works on a copy: `--config` sets defaults, and a script's
    main may run twice in one process (tests, notebooks), the second run must not inherit the first's settings."""
    parser = copy.deepcopy(parser)
    if "--config" not in parser._option_string_actions:
        parser.add_argument("--config", default=None,
                            help="JSON file of settings (keys = option names without --); command-line flags override it")
    parser.allow_abbrev = False  # a prefix such as --k must not silently mean --kv_cache_gib
    argv = sys.argv[1:] if argv is None else list(argv)
    options = parser._option_string_actions
    for i, token in enumerate(argv):
        name = token.split("=", 1)[0]
        if name in RENAMED and name not in options:
            raise UserError(f"{name} is now {RENAMED[name]}")
        action = options.get(name)
        if action is not None and action.type is str2bool and "=" not in token and \
                (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            raise UserError(f"{name} takes a value: {name} true or {name} false")
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
    """Run a script's main() and exit with the code it returns (None: 0); a UserError becomes one clear line on
    stderr and exit code 2.

    A torchrun worker ends with os._exit, after flushing its output, instead of a normal interpreter shutdown.
    Once a model has been FSDP-sharded, torch keeps references to its device mesh, and through it to the process
    group, beyond destroy_process_group (dist_cleanup), so gloo's worker threads are still alive while the
    interpreter finalizes; one that then drops a Python-owned tensor dies in a destructor ("terminate called
    without an active exception", SIGABRT): a finished run reported as failed, about once in a hundred 2-rank
    runs. Every file is closed by then (writes are atomic or in `with` blocks; wandb is finished by the script)."""
    try:
        code = main()
        code = code if isinstance(code, int) else 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    if "RANK" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


# -----------------------------------------------------------------------------
# distributed (torchrun) setup


def dist_setup():
    """Initialise torch.distributed: from torchrun's variables, or as a process group of one rank when run
    with plain python, so that every script runs the same code (FSDP included) at any world size.
    NCCL on CUDA, gloo on CPU. Returns (rank, world_size, device)."""
    import torch
    import torch.distributed as dist
    # torch.distributed.nn.functional takes `group=group.WORLD` as a default argument of its functions, bound
    # when the module is first imported; torch imports it lazily, with torch._dynamo (model.load_model's
    # meta-device construction does). Imported after init_process_group, it holds the default group, so
    # destroy_process_group cannot free it: the gloo worker threads outlive dist_cleanup and can drop the last
    # reference to a Python-owned tensor (the last all_gather's, kept by the final barrier) while the
    # interpreter is already finalizing; their GIL request then ends the thread inside a destructor:
    # "terminate called without an active exception", SIGABRT. Imported first, its defaults are None.
    import torch.distributed.nn  # noqa: F401
    torchrun = "RANK" in os.environ
    rank_, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if torchrun else (0, 1)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():  # (tests run several scripts' mains in one process)
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        if torchrun:
            dist.init_process_group(backend, **kwargs)
        else:  # one rank, no ports: an in-process store
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    return rank_, world, device


def dist_cleanup():
    """Wait for every rank, then free the process group: its destructor joins the backend's worker threads (the
    GIL released, so they can drop what they still hold), before the interpreter starts finalizing."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        barrier()
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


# -----------------------------------------------------------------------------
# collectives: every one outside FSDP goes through these (tests/test_common.py checks that no script calls
# torch.distributed's collectives itself). Each puts its tensor on the process group's device: NCCL has no
# CPU tensors, so a CPU tensor handed to it is a crash that the CPU tests (gloo) would never show.


def group_device():
    """The device a collective's tensors must live on: the current GPU under NCCL, the CPU under gloo."""
    import torch
    import torch.distributed as dist
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor, op="sum"):
    """The sum (or "max", "min") of a tensor over ranks, returned on the tensor's own device."""
    import torch.distributed as dist
    if world_size() == 1:
        return tensor
    t = tensor.detach().to(group_device(), copy=True)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t.to(tensor.device)


def all_reduce_numbers(numbers: dict, op="sum") -> dict:
    """The sum (or max, min) of a dict of numbers over ranks, in float64."""
    import torch
    keys = sorted(numbers)
    t = all_reduce(torch.tensor([float(numbers[k]) for k in keys], dtype=torch.float64), op)
    return dict(zip(keys, t.tolist()))


def all_gather_json(obj):
    """Gather one JSON-serialisable object per rank to every rank (a list, in rank order).

    JSON over a byte tensor rather than all_gather_object, so model output never goes through pickle.
    """
    import torch
    import torch.distributed as dist
    if world_size() == 1:
        return [obj]
    device = group_device()
    data = torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8, device=device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([data.numel()], device=device))
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return [json.loads(bytes(t[:n].tolist()).decode("utf-8")) for t, n in zip(out, sizes)]


def gather_lists(items, key=None):
    """Every rank's list, concatenated in rank order (then sorted by `key` when given), on every rank."""
    merged = [x for part in all_gather_json(items) for x in part]
    return sorted(merged, key=key) if key else merged


def barrier():
    import torch.distributed as dist
    if world_size() > 1:
        dist.barrier()


def even_out(batches):
    """The same number of micro-batches on every rank, padded with None: under FSDP every forward and backward
    is a collective, so a rank that has run out runs idle_pass while the others work."""
    import torch
    n = int(all_reduce(torch.tensor([len(batches)]), "max")[0])
    return list(batches) + [None] * (n - len(batches))


def seed_everything(seed: int):
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# batching: the data order and packed micro-batches, deterministic and the same on every rank


def epoch_order(n, seed, epoch):
    """The data order of an epoch: a permutation of range(n) fixed by (seed, epoch), identical on every rank,
    so a resumed run skips and repeats nothing."""
    import numpy as np
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


def micro_batches(lengths, budget, indices=None):
    """Pack sequences (indices into lengths; default all), longest first (ties: lower index first), into
    micro-batches of at most `budget` tokens (a longer sequence goes alone). Returns lists of indices."""
    indices = range(len(lengths)) if indices is None else indices
    batches, cur, size = [], [], 0
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        if cur and size + lengths[i] > budget:
            batches.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += lengths[i]
    return batches + ([cur] if cur else [])


# -----------------------------------------------------------------------------
# sharding: FSDP2 for training, a full copy for generation
#
# Training scripts shard the model with PyTorch's FSDP2: each rank keeps 1/world of the fp32 weights (the
# master copy the optimizer updates), of the gradients and of the AdamW state; a block's weights are
# all-gathered in the compute dtype just before it runs and freed after. Every forward and backward is
# therefore a collective that all ranks must join. Generation instead runs on a plain full copy gathered
# once (full_copy): no collective inside the decode loop, and ranks may generate different lengths.


def shard_model(model, compute_dtype):
    """Shard an fp32 model over all ranks with FSDP2: each block, then the rest (embeddings, final norm, lm_head).

    Forward and backward run in compute_dtype; gradients are reduce-scattered in fp32 and SUMMED over ranks
    (FSDP's default is the mean): every loss in this project is already normalised over the global batch, so
    the sum of the ranks' gradients is the gradient of the global loss. Works on 1 rank, N GPUs (NCCL), several
    nodes, and CPU ranks under gloo. One fp32 rank (the CPU preset) keeps the plain model."""
    import torch
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("shard_model expects fp32 weights (they are the master copy); compute_dtype sets the compute")
    if world_size() == 1 and compute_dtype == torch.float32:
        return model  # nothing to shard and nothing to cast: FSDP's hooks would only cost time (~20% on CPU)
    policy = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                                  reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    return model


def reshard(model):
    """Every FSDP-sharded parameter of `model` back to this rank's fp32 shard, the gathered copies freed.

    FSDP2 never reshards its root group (embeddings, final norm, lm_head) after a forward, expecting the backward
    to follow; after a no-grad forward (validation, a pre-pass, a step that trained nothing) those parameters stay
    full-size, in the compute dtype. Whatever reads parameters as shards (checkpoints, full copies) calls this
    first. A no-op for an unsharded model."""
    from torch.distributed.fsdp import FSDPModule
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_tensor(t):
    """The whole of a parameter or gradient, FSDP-sharded or not (a collective when sharded: every rank calls it)."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_tensor(t):
    """This rank's part of a parameter, gradient or optimizer state: a sharded tensor's local shard, else all of it."""
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def is_sharded(model) -> bool:
    """Whether shard_model sharded it (asked of the module: after a no-grad forward its root parameters are
    plain tensors for a while, see reshard)."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def full_copy(model, dtype, device=None, on_rank=None):
    """A plain, unsharded Transformer holding the full weights of `model` (sharded or not) in dtype.

    Each tensor is cast to dtype, then gathered (every rank must call this); peak extra memory is the copy plus
    one full tensor. With on_rank, only that rank keeps the copy and the others get None (checkpoints)."""
    import torch
    from model import empty_model
    keep = on_rank is None or rank() == on_rank
    reshard(model)
    device = device or model.lm_head.weight.device
    copy = empty_model(model.config, dtype, device).requires_grad_(False) if keep else None
    for name, p in model.named_parameters():
        full = full_tensor(p.detach().to(dtype))
        if keep:
            with torch.no_grad():
                copy.get_parameter(name).copy_(full)
    return copy.eval() if keep else None


def idle_pass(model, backward=True):
    """A forward (and backward) on a 2-token dummy that adds nothing to any gradient. A rank that has run out of
    micro-batches runs it so that it still joins the collectives of FSDP's forward and backward."""
    import torch
    device = model.lm_head.weight.device
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    hidden = model(ids, cu_seqlens=torch.tensor([0, 2], device=device))
    lp = model.token_logprobs(hidden[0, :1], ids[0, 1:])
    if backward:
        (lp.sum() * 0.0).backward()


# -----------------------------------------------------------------------------
# files


def iter_jsonl(path, torn_tail=False):
    """Yield (line number, record) of a jsonl file, skipping blank lines; a line that is not a JSON object
    raises UserError naming the file and line.

    torn_tail: the file is a run's own log (metrics.jsonl, rollout logs), which a kill or a full disk can leave with
    its last line cut short: a last line without its newline that is not a JSON object is dropped with a warning
    naming it. Inputs (datasets, SFT files) keep the error: a record is never dropped silently from data."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                problem = None if isinstance(rec, dict) else f"expected a JSON object, got {type(rec).__name__}"
            except json.JSONDecodeError as e:
                problem = f"not valid JSON ({e.msg})"
            if problem:
                if torn_tail and not line.endswith("\n"):  # only the last line can lack its newline
                    print0(f"warning: {path}:{lineno}: dropped a torn last line (a write cut short by a kill or a "
                           f"full disk)")
                    return
                raise UserError(f"{path}:{lineno}: {problem}")
            yield lineno, rec


def read_jsonl(path, required=(), torn_tail=False):
    """Read a jsonl file; a bad line or a missing field raises UserError naming file, line and field
    (torn_tail: see iter_jsonl)."""
    records = []
    for lineno, rec in iter_jsonl(path, torn_tail):
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


def open_lines(path):
    """`with open_lines(path) as lines: for lineno, record in lines`: a jsonl file streamed with clear errors."""
    return closing(iter_jsonl(path))


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


def encode_prompts(tokenizer, texts):
    """Token ids of texts that begin a sequence (prompts; pre-training documents): the text's own tokens, after the
    BOS token where the model family expects one -- its tokenizer adds one by itself (Llama; Qwen adds none) -- and
    the text does not already begin with it (a chat template that writes it)."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is None or tokenizer("a", add_special_tokens=True)["input_ids"][:1] != [bos]:
        return ids
    return [x if x[:1] == [bos] else [bos] + x for x in ids]


def task_prompt_ids(tokenizer, task, records, template):
    """The token ids of each record's rendered prompt."""
    return encode_prompts(tokenizer, [task.render_prompt(r, tokenizer, template) for r in records])


def check_prompts_fit(prompt_ids, records, max_new_tokens, context, where, flag="--max_new_tokens"):
    """Every prompt plus max_new_tokens must fit the model's context. Every rank checks every prompt before any work,
    so a too-long one stops all ranks alike (not one rank, mid-collective); the error names the record."""
    for i, (rec, ids) in enumerate(zip(records, prompt_ids)):
        if len(ids) + max_new_tokens > context:
            raise UserError(f"{where}: record {i + 1} (id {rec.get('id')!r}): prompt of {len(ids)} tokens + {flag} "
                            f"{max_new_tokens} > the model's {context}-token context")


# -----------------------------------------------------------------------------
# generation over task records (sampling, evaluation and RL validation share this)


def sample_responses(model, tokenizer, task, records, n=1, temperature=0.0, top_p=1.0, max_new_tokens=512,
                     seed=0, template="auto", batch_size=64, desc="generate", progress=True, partner=None, switch=None,
                     timings=None):
    """Generate n responses for each record with our KV-cache engine and score them with task.score.

    Prompts are sorted by length and generated `batch_size` prompts (x n rows) at a time. Returns one
    dict per (record, sample), in record order then sample order:
    {"id", "prompt", "response", "tokens", "logprobs", "finished", "length", "reward", "sample"}.
    partner, switch: cross-sampling with a second model (engine.generate); each dict then also holds
    "switched" and "differs", one bool per token. timings: a dict whose "score_s" gains the seconds spent scoring.
    """
    from tqdm import tqdm
    from engine import generate
    from model import stop_token_ids
    stop = stop_token_ids(tokenizer)
    prompts = [task.render_prompt(r, tokenizer, template) for r in records]
    prompt_ids = encode_prompts(tokenizer, prompts)
    order = sorted(range(len(records)), key=lambda i: len(prompt_ids[i]))
    results = [None] * len(records)
    bar = tqdm(total=len(records) * n, desc=desc, disable=not progress or rank() != 0, dynamic_ncols=True)
    for b, start in enumerate(range(0, len(order), batch_size)):
        chunk = order[start:start + batch_size]
        gens = generate(model, [prompt_ids[i] for i in chunk], n=n, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, stop_ids=stop, seed=seed * 1_000_003 + b,
                        partner=partner, switch=switch)
        for g_idx, g in enumerate(gens):
            i = chunk[g.prompt_index]
            text = tokenizer.decode(g.tokens[:-1] if g.finished else g.tokens, skip_special_tokens=False)
            t_score = time.time()
            reward = task.score(text, records[i], g.finished)
            if timings is not None:
                timings["score_s"] = timings.get("score_s", 0.0) + time.time() - t_score
            results[i] = results[i] or []
            results[i].append({"id": records[i]["id"], "prompt": prompts[i], "response": text, "tokens": g.tokens,
                               "logprobs": g.logprobs, "finished": g.finished, "length": len(g.tokens),
                               "reward": reward, "sample": g_idx % n,
                               **({"switched": g.switched, "differs": g.differs} if partner is not None else {})})
        bar.update(len(gens))
    bar.close()
    return [s for per_record in results for s in per_record]


def check_checkpoint(path):
    if not os.path.isdir(path):
        raise UserError(f"checkpoint {path}: no such directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"checkpoint {path}: not a Hugging Face checkpoint directory (no config.json)")


def load_records(task, task_name, path, tokenizer, template):
    """The split's records, checked to belong to this task: it loads with the task's load_split, every
    record has an id and the difficulty key, and each renders and scores without error."""
    try:
        records = task.load_split(path)
    except UserError as e:
        raise UserError(f"{e} (is {path} a split of task {task_name!r}?)")
    if not records:
        raise UserError(f"split {path}: no records (empty split)")
    seen = set()
    for i, r in enumerate(records):
        where = f"split {path}: record {i + 1}"
        if "id" not in r:
            raise UserError(f"{where}: missing field 'id'")
        if r["id"] in seen:
            raise UserError(f"{where}: duplicate id {r['id']!r}")
        seen.add(r["id"])
        if task.DIFFICULTY is not None and task.DIFFICULTY not in r:
            raise UserError(f"{where} (id {r['id']!r}): missing difficulty field {task.DIFFICULTY!r} of task "
                            f"{task_name!r}; is this a split of another task?")
        try:
            task.render_prompt(r, tokenizer, template)
            task.score("", r, True)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise UserError(f"{where} (id {r['id']!r}): task {task_name!r} cannot render or score it "
                            f"({type(e).__name__}: {e}); is this a split of another task?")
    return records


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
    return ([records[i] for i in chosen], f"{n} of {len(records)}, stratified by {key} ("
            + ", ".join(f"{v}: {take[v]}" for v in sorted(groups, key=str)) + ")")


def check_sft_record(path, lineno, rec):
    """An SFT-format record has "id", "prompt" and "response", both strings, the prompt not empty (the first
    response token needs a context); otherwise a UserError naming the file, line and field."""
    for field in ("id", "prompt", "response"):
        if field not in rec:
            raise UserError(f"{path}:{lineno}: missing field '{field}'")
    for field in ("prompt", "response"):
        if not isinstance(rec[field], str):
            raise UserError(f"{path}:{lineno}: field '{field}' must be a string, got {type(rec[field]).__name__}")
    if not rec["prompt"]:
        raise UserError(f"{path}:{lineno}: empty prompt (the first response token needs a context)")


def sft_token_ids(tokenizer, prompts, responses, eos=True):
    """Token ids of (prompt, response) pairs as SFT trains on them: the prompt (after BOS where the model family
    expects one: encode_prompts) and the response tokenized separately, no other special tokens, then EOS (eos: one
    bool for all, or one per pair). Returns [(ids, start)], start = the index of the first response token."""
    eos = [eos] * len(prompts) if isinstance(eos, bool) else eos
    prompt_ids = encode_prompts(tokenizer, prompts) if prompts else []
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"] if responses else []
    return [(p + r + ([tokenizer.eos_token_id] if e else []), len(p)) for p, r, e in zip(prompt_ids, response_ids, eos)]


def load_sft_examples(paths, tokenizer, max_length):
    """Tokenize SFT jsonl files: prompt and response separately (no special tokens), EOS appended to the response.

    Returns a list of {"input_ids", "start" (index of the first response token), "id", "task", "file", "line"}.
    Loss goes on input_ids[start:] (the response and its EOS). An example longer than max_length, a missing
    or non-string field, an empty prompt or a tokenizer without EOS is a UserError naming file and line.
    Note: text sampled from a model and re-tokenized may split into slightly different tokens than the model
    produced (BPE is not unique); the text is the same, which is what the paper trains on too.
    """
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no eos_token; SFT appends EOS to every response")
    examples = []
    for path in paths:
        rows, where = [], []
        with open_lines(path) as lines:
            for lineno, rec in lines:
                check_sft_record(path, lineno, rec)
                rows.append(rec)
                where.append(lineno)
        if not rows:
            raise UserError(f"{path}: no examples")
        tokenized = sft_token_ids(tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows])
        for rec, lineno, (ids, start) in zip(rows, where, tokenized):
            if len(ids) > max_length:
                raise UserError(f"{path}:{lineno}: example {rec['id']!r} has {len(ids)} tokens (prompt {start} + "
                                f"response {len(ids) - start - 1} + EOS) > max_length {max_length}; long examples are "
                                f"an error, not truncated (raise --max_length or drop the example)")
            examples.append({"input_ids": ids, "start": start, "id": rec["id"], "task": rec.get("task"),
                             "file": path, "line": lineno})
    return examples


def shard(items, rank_, world):
    """This rank's share of a list: every world-th item starting at rank (disjoint, covers all)."""
    return items[rank_::world]


# -----------------------------------------------------------------------------
# optimizer and checkpoints (SFT and RL share these)


def make_optimizer(params, lr, betas=(0.9, 0.999), weight_decay=0.0, eight_bit=False):
    """AdamW; with eight_bit and bitsandbytes installed on CUDA, bitsandbytes' 8-bit AdamW (less optimizer memory)
    for unsharded weights. FSDP-sharded weights get torch's AdamW: its state is already divided over the ranks."""
    import torch
    from torch.distributed.tensor import DTensor
    params = [p for p in params if p.requires_grad]
    if eight_bit:
        if any(isinstance(p, DTensor) for p in params):
            print0("note: 8-bit AdamW cannot update FSDP-sharded weights; using torch AdamW (state sharded over ranks)")
        else:
            try:
                import bitsandbytes as bnb
                if params and params[0].is_cuda:
                    return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
                print0("note: 8-bit AdamW needs CUDA; using torch AdamW")
            except ImportError:
                print0("note: bitsandbytes not installed; using torch AdamW")
    fused = bool(params) and params[0].is_cuda
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)


def clip_grad_norm(params, max_norm):
    """Scale the gradients so that their global norm (over all ranks' shards) is at most max_norm (0 = no clip);
    returns the norm before clipping, a float. One all-reduce of one number, on this rank's shards as plain
    tensors (torch.nn.utils.clip_grad_norm_ would dispatch every op of every tensor through DTensor)."""
    import torch
    grads = [local_tensor(p.grad) for p in params if p.grad is not None]
    if not grads:
        return 0.0
    local = torch.stack(torch._foreach_norm(grads, 2.0)).double().square().sum()
    norm = float(all_reduce(local).sqrt())
    if max_norm > 0 and norm > max_norm:  # (a non-finite norm is left for the caller to skip)
        torch._foreach_mul_(grads, max_norm / (norm + 1e-6))
    return norm


# A checkpoint of step N in a run directory is three things:
#   step_N/                  a Hugging Face directory: the full weights in the training dtype (bf16 on GPU), gathered
#                            to rank 0 -- what the next stage, transformers or vLLM load
#   step_N.train.rankR.pt    what rank R needs to resume exactly: its shard of the fp32 weights and of the optimizer
#   step_N.state.pt          the step, the world size and the script's own state; written last, by rank 0, once
#                            every rank's shard is on disk: a checkpoint is resumable when its state file exists.
# Each file is written atomically; all are plain tensors and numbers, loaded with weights_only=True (no pickle).
# prune_checkpoints keeps the resumable part of the newest --keep_last saves only (1.5B: 18.5 GB each).


def checkpoint_dir(run_dir, step):
    return os.path.join(run_dir, f"step_{step:06d}")


def train_shard_path(run_dir, step, rank_):
    return f"{checkpoint_dir(run_dir, step)}.train.rank{rank_}.pt"


def checkpoint_steps(run_dir):
    """Steps whose state file exists in run_dir (resumable checkpoints), oldest first."""
    if not os.path.isdir(run_dir):
        return []
    return sorted(int(name[5:11]) for name in os.listdir(run_dir)
                  if name.startswith("step_") and name.endswith(".state.pt") and name[5:11].isdigit())


def save_checkpoint(run_dir, step, model, tokenizer, optimizer, train_state: dict, dtype, keep_last, keep_weights=()):
    """Write the checkpoint of `step`, its weights in `dtype` (every rank calls this), then prune older ones
    (prune_checkpoints). train_state: tensors, numbers, strings, lists, dicts."""
    import torch
    from model import save_model
    full = full_copy(model, dtype, device="cpu", on_rank=0)
    if rank() == 0:
        save_model(full, checkpoint_dir(run_dir, step), tokenizer)
    del full
    with atomic_open(train_shard_path(run_dir, step, rank()), "wb") as f:
        torch.save(local_train_state(model, optimizer), f)
    barrier()
    if rank() == 0:
        with atomic_open(checkpoint_dir(run_dir, step) + ".state.pt", "wb") as f:
            torch.save({"step": step, "world_size": world_size(), **train_state}, f)
        prune_checkpoints(run_dir, keep_last, keep_weights)
    barrier()


def prune_checkpoints(run_dir, keep_last, keep_weights=()):
    """Rank 0, after a save: only the newest keep_last checkpoints stay resumable; of the older ones only the
    weights of the steps in keep_weights stay. The state file goes first, so a half-deleted one is never resumable."""
    import glob
    import shutil
    for step in checkpoint_steps(run_dir)[:-keep_last]:
        os.remove(checkpoint_dir(run_dir, step) + ".state.pt")
        for path in glob.glob(glob.escape(checkpoint_dir(run_dir, step)) + ".train.rank*.pt"):
            os.remove(path)
        if step not in keep_weights:
            shutil.rmtree(checkpoint_dir(run_dir, step), ignore_errors=True)


def remove_partial_saves(run_dir):
    """Delete what a kill left of a save under way in run_dir: atomic_open's .tmp_* files and save_model's
    NAME.tmpPID / NAME.oldPID directories (a checkpoint's weights or final/ being replaced). The resumed run has
    another process id and fresh temporary names, so it would never reuse them; at 1.5B one optimizer shard is
    ~18 GB. None of them belongs to a resumable checkpoint: a save renames its files into place before it writes
    the state file."""
    import re
    import shutil
    removed = 0
    for folder in (run_dir, os.path.join(run_dir, "rollouts")):
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            path = os.path.join(folder, name)
            if name.startswith(".tmp_") and os.path.isfile(path):
                removed += os.path.getsize(path)
                os.remove(path)
            elif re.search(r"\.(tmp|old)\d+$", name) and os.path.isdir(path):
                removed += sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
                shutil.rmtree(path)
    if removed:
        print0(f"note: removed what an interrupted save left in {run_dir} ({removed / 2**20:.1f} MiB)")


def load_checkpoint(run_dir):
    """The newest checkpoint in run_dir that every rank can read: (step, model_dir, train_state, this rank's shard),
    or None. One with an unreadable file (truncated by a disk fault or a partial copy, or missing) is skipped with a
    one-line warning naming the file. Every rank calls this."""
    import torch
    from safetensors import safe_open
    from model import weight_files
    for step in reversed(checkpoint_steps(run_dir)):
        model_dir, problem, state, shard = checkpoint_dir(run_dir, step), None, None, None
        path = model_dir + ".state.pt"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state.get("world_size", 1) != world_size():
                raise UserError(f"{path}: written by {state.get('world_size', 1)} rank(s); resume it with the same "
                                f"number (torchrun --nproc_per_node), not {world_size()}")
            for path in weight_files(model_dir):  # safetensors checks that the file covers its header
                with safe_open(path, framework="pt") as f:
                    f.keys()
            path = train_shard_path(run_dir, step, rank())
            shard = torch.load(path, map_location="cpu", weights_only=True)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 -- any reader error means: not this checkpoint
            problem = f"{path}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
        problems = [p for p in all_gather_json(problem) if p]
        if problems:
            print0(f"warning: skipping the checkpoint of step {step}: cannot read {problems[0]}")
            continue
        return step, model_dir, state, shard
    return None


def resume_checkpoint(run_dir, resume):
    """The checkpoint to continue from (load_checkpoint's newest complete one), or None for a fresh run. Checkpoints in
    run_dir without resume are an error: a new run would mix its steps with an old one's."""
    steps = checkpoint_steps(run_dir)
    if steps and not resume:
        raise UserError(f"{run_dir} already holds checkpoints (newest step {steps[-1]}); pass --resume true to "
                        f"continue it, or choose another --out_dir")
    if rank() == 0:
        remove_partial_saves(run_dir)
    found = load_checkpoint(run_dir) if resume else None
    if resume and found is None:
        print0(f"note: --resume: no complete checkpoint in {run_dir}; starting a fresh run")
    return found


def metrics_log(run_dir, start_step, wandb_project="", settings=None):
    """log(record): appends to run_dir/metrics.jsonl on rank 0, and to Weights & Biases when wandb_project is set and
    wandb is installed; the run's settings go to run_dir/settings.json. Records after start_step (the checkpoint a
    run resumes from; 0 = a fresh run) are dropped first, so a resumed run rewrites them. log.finish() ends wandb."""
    path, wandb = os.path.join(run_dir, "metrics.jsonl"), None
    if rank() == 0:
        os.makedirs(run_dir, exist_ok=True)
        if settings is not None:
            write_json(os.path.join(run_dir, "settings.json"), settings)
        if os.path.exists(path):
            kept = [m for m in read_jsonl(path, torn_tail=True) if start_step and m.get("step", 0) <= start_step]
            write_jsonl(path, kept)
        if wandb_project:
            try:
                import wandb
                wandb.init(project=wandb_project, name=os.path.basename(os.path.abspath(run_dir)), config=settings)
            except ImportError:
                print0("note: wandb not installed; logging to metrics.jsonl only")

    def log(record):
        if rank() == 0:
            append_jsonl(path, record)
            if wandb:
                wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])
    log.finish = lambda: wandb.finish() if wandb else None
    return log


def local_train_state(model, optimizer):
    """This rank's part of the fp32 weights and of optimizer.state_dict(), as plain tensors (a sharded tensor's
    local shard; an unsharded one whole). Taken from resharded modules (reshard), and checked: a full-size or
    compute-dtype tensor saved as a shard would crash the resume, or silently round the weights it restores."""
    import torch
    from torch.distributed.tensor import DTensor
    reshard(model)
    sharded = is_sharded(model)
    weights = {}
    for name, p in model.named_parameters():
        if p.dtype != torch.float32 or sharded != isinstance(p, DTensor):
            raise RuntimeError(f"checkpoint: parameter {name} is {type(p).__name__} {p.dtype}, not this rank's fp32 "
                               f"shard; refusing to save a checkpoint that would not resume exactly")
        weights[name] = local_tensor(p.detach())
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: local_tensor(v) for k, v in s.items()} for i, s in sd["state"].items()}
    return {"weights": weights, "optimizer": sd}


def load_local_train_state(model, optimizer, shard):
    """The inverse of local_train_state: the fp32 weights (the checkpoint's HF weights may be bf16) and the optimizer
    state, each shard back into a tensor sharded like its parameter."""
    import torch
    from torch.distributed.tensor import DTensor
    reshard(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            local_tensor(p).copy_(shard["weights"][name])
    sd = shard["optimizer"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, s in sd["state"].items():
        p = params[i]
        if isinstance(p, DTensor):
            s.update({k: DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, shape=p.shape,
                                            stride=p.stride()) for k, v in s.items() if v.dim() > 0})
    optimizer.load_state_dict(sd)


def check_run_identity(run_dir, saved: dict, now: dict):
    """--resume must continue the same run: settings that decide the data order or the schedule (`now`) must
    equal the checkpoint's (`saved`); otherwise one line names each difference."""
    changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if changed:
        raise UserError(f"{run_dir}: --resume with different settings than the run's: "
                        + "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in changed.items()))
