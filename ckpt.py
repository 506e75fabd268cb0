"""
Training runs that survive a kill: the optimizer and gradient clipping, run checkpoints (save, prune, load, resume
with the same settings) and the per-step metrics log. SFT and RL share all of it.
"""
import errno
import functools
import glob
import hashlib
import importlib
import json
import math
import os
import re
import shutil
import zipfile

import torch
from safetensors import safe_open
from torch.distributed.tensor import DTensor

from common import (UserError, append_jsonl, atomic_open, error_chain, out_of_memory, print0, rank, read_metrics,
                    same_files, world_size, write_json, write_jsonl)
from model import save_model, weight_files
from parallel import (all_gather_json, all_reduce, barrier, check_lock_on_rank0, full_copy, is_sharded, local_tensor,
                      lock_on_rank0, on_every_rank, on_rank0, reshard, write_on_rank0)

# -----------------------------------------------------------------------------
# optimizer


@functools.cache
def eight_bit_adam_installed():
    """Whether bitsandbytes imports, which --adam_8bit's 8-bit AdamW needs (with CUDA: make_optimizer). Without it
    torch's AdamW runs, 8 bytes of state per parameter, not 2: the memory estimates behind the auto settings count
    the optimizer this says will run."""
    try:
        importlib.import_module("bitsandbytes")
    except ImportError:
        return False
    return True


def make_optimizer(params, lr, betas=(0.9, 0.999), weight_decay=0.0, eight_bit=False):
    """AdamW: torch's (fused on CUDA), or with eight_bit, bitsandbytes' 8-bit AdamW where it is installed and the
    weights are on CUDA: 2 bytes of state per parameter instead of 8. On FSDP-sharded weights it runs on each rank's
    local shards (LocalShardOptimizer; AdamW is element-wise, so a shard is a tensor like any other)."""
    params = [p for p in params if p.requires_grad]
    if eight_bit:
        if not eight_bit_adam_installed():
            print0("note: bitsandbytes not installed; using torch AdamW (8 bytes of state per parameter, not 2)")
        elif not (params and params[0].is_cuda):
            print0("note: 8-bit AdamW needs CUDA; using torch AdamW")
        else:
            import bitsandbytes as bnb

            def adamw_8bit(ps):
                return bnb.optim.AdamW8bit(ps, lr=lr, betas=betas, weight_decay=weight_decay)
            if any(isinstance(p, DTensor) for p in params):
                return LocalShardOptimizer(params, adamw_8bit)
            return adamw_8bit(params)
    fused = bool(params) and params[0].is_cuda
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)


class LocalShardOptimizer:
    """An element-wise optimizer (AdamW) that takes only plain tensors, bitsandbytes' 8-bit AdamW, run on this rank's
    local shards of FSDP-sharded parameters: each shard is a plain parameter sharing the sharded one's memory, and
    step() hands it the local shard of the gradient first. The update is then done in place, on the shard FSDP owns.
    (8-bit AdamW quantizes its state in blocks of 256 elements of each tensor it is given: shards, here, so the
    state's blocks depend on the number of ranks, as FSDP's shards do.) param_groups, state and state_dict are the
    inner optimizer's, over the local shards: checkpoints save them as each rank's part, as for torch AdamW."""

    def __init__(self, params, make_inner):
        self.sharded = list(params)
        self.local = [torch.nn.Parameter(local_tensor(p.detach())) for p in self.sharded]
        self.inner = make_inner(self.local)

    # the inner optimizer's, looked up each time: its load_state_dict replaces the list, and a learning-rate schedule
    # writing into a copy taken before a resume would no longer reach it
    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    def step(self):
        for p, shard in zip(self.sharded, self.local):
            shard.data = local_tensor(p.detach())  # (FSDP may have re-pointed its shard since: a lazy init, a load)
            shard.grad = None if p.grad is None else local_tensor(p.grad)
        self.inner.step()
        for shard in self.local:
            shard.grad = None

    def zero_grad(self, set_to_none=True):
        for p in self.sharded:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state_dict):
        self.inner.load_state_dict(state_dict)


def clip_grad_norm(params, max_norm):
    """Scale the gradients so that their global norm (over all ranks' shards) is at most max_norm (0 = no clip);
    returns the norm before clipping, a float. One all-reduce of one number, on this rank's shards as plain
    tensors (torch.nn.utils.clip_grad_norm_ would dispatch every op of every tensor through DTensor)."""
    grads = [local_tensor(p.grad) for p in params if p.grad is not None]
    if not grads:
        return 0.0
    local = torch.stack(torch._foreach_norm(grads, 2.0)).double().square().sum()
    norm = float(all_reduce(local).sqrt())
    if max_norm > 0 and norm > max_norm:  # (a non-finite norm is left for the caller to skip)
        torch._foreach_mul_(grads, max_norm / (norm + 1e-6))
    return norm


# -----------------------------------------------------------------------------
# run checkpoints
#
# A checkpoint of step N in a run directory is three things:
#   step_N/                  a Hugging Face directory: the full weights in the training dtype (bf16 on GPU), gathered
#                            to rank 0 -- what the next stage, transformers or vLLM load
#   step_N.train.rankR.pt    what rank R needs to resume exactly: its shard of the fp32 weights and of the optimizer
#   step_N.state.pt          the step, the world size and the script's own state; written last, by rank 0, once
#                            every rank's shard is on disk: a checkpoint is resumable when its state file exists.
# Each file is written atomically; all are plain tensors and numbers, loaded with weights_only=True (no pickle).
# prune_checkpoints keeps the resumable part of the newest --keep_last saves only (1.5B: 18.5 GB each).


# any of a checkpoint's parts (step numbers are 6 digits, more from step 1,000,000 on)
CHECKPOINT_FILE = re.compile(r"step_(\d{6,})(\.state\.pt|\.train\.rank\d+\.pt)?$")
SAVING_MARK = re.compile(r"step_(\d{6,})\.saving")  # a save under way (save_checkpoint) until its state file is written


def checkpoint_dir(run_dir, step):
    return os.path.join(run_dir, f"step_{step:06d}")


def train_shard_path(run_dir, step, rank_):
    return f"{checkpoint_dir(run_dir, step)}.train.rank{rank_}.pt"


def checkpoint_steps(run_dir):
    """Steps whose state file exists in run_dir (resumable checkpoints), oldest first."""
    if not os.path.isdir(run_dir):
        return []
    return sorted(int(m.group(1)) for name in os.listdir(run_dir)
                  if (m := CHECKPOINT_FILE.fullmatch(name)) and m.group(2) == ".state.pt")


def save_checkpoint(run_dir, step, model, tokenizer, optimizer, train_state: dict, dtype, keep_last, keep_weights=()):
    """Write the checkpoint of `step`, its weights in `dtype` (every rank calls this), then prune older ones
    (prune_checkpoints). train_state: tensors, numbers, strings, lists, dicts."""
    check_lock_on_rank0(run_dir)  # (its directory removed or moved away meanwhile: stop, write nothing)
    full = full_copy(model, dtype, device="cpu", on_rank=0)
    mark = checkpoint_dir(run_dir, step) + ".saving"

    def start(weights):  # marked first: what a kill leaves of this save, its weights even, the next start removes
        open(mark, "w").close()
        save_model(weights, checkpoint_dir(run_dir, step), tokenizer)
    write_on_rank0(functools.partial(start, full), run_dir)
    del full

    def write_shard():  # (every rank its own)
        with atomic_open(train_shard_path(run_dir, step, rank()), "wb") as f:
            # (stamped: a shard copied or renamed by hand to another step's or rank's place is refused, not loaded)
            torch.save({**local_train_state(model, optimizer), "step": step, "rank": rank()}, f)
    on_every_rank(write_shard)  # (a write refused on one rank stops them all; every rank waits for the others)

    def finish():  # without its state file, what the save wrote is a partial save, which a resume removes
        with atomic_open(checkpoint_dir(run_dir, step) + ".state.pt", "wb") as f:
            torch.save({"step": step, "world_size": world_size(), "code": code_stamp(), **train_state}, f)
        os.remove(mark)
        prune_checkpoints(run_dir, step, keep_last, keep_weights)
    write_on_rank0(finish, run_dir)  # (its directory checked again: the save took long; every rank waits for it)


def prune_checkpoints(run_dir, step, keep_last, keep_weights=()):
    """Rank 0, after saving `step`, or at a resume from `step` once nothing refuses it (before its first write): only
    the newest keep_last checkpoints stay resumable; of the older ones only the weights of the steps in keep_weights
    stay. What lies above `step` (at a resume: skipped as unreadable, or left unfinished by a kill) is removed: the run
    saves those steps anew, and kept, an unreadable one would take a keep_last place from them. (A refused resume
    removes nothing.)"""
    for later in sorted(s for s in checkpoint_parts(run_dir) if s > step):
        remove_checkpoint(run_dir, later)
    keep = set(checkpoint_steps(run_dir)[-keep_last:])
    for old in sorted(checkpoint_parts(run_dir) - keep):
        state, shards = checkpoint_files(run_dir, old)
        if os.path.exists(state) or shards:  # (else weights kept by an earlier prune)
            remove_checkpoint(run_dir, old, weights=old not in keep_weights)


def prune_at_resume(run_dir, step, keep_last, keep_weights=()):
    """prune_checkpoints at a resume from `step`, once nothing refuses it (after its last refusal, before its first
    write: a refused resume removes nothing): what lies above its checkpoint (skipped as unreadable, or left
    unfinished) and what a stop inside the last save's prune left (no later save would prune it), by the caller's keep
    rules. Every rank calls this; rank 0 removes, in the directory whose lock this run holds."""
    write_on_rank0(lambda: prune_checkpoints(run_dir, step, keep_last, keep_weights), run_dir)


def checkpoint_parts(run_dir):
    """The steps that have any part of a checkpoint in run_dir: its state file, weights or optimizer shards."""
    return {int(m.group(1)) for m in map(CHECKPOINT_FILE.match, os.listdir(run_dir)) if m}


def checkpoint_files(run_dir, step):
    """(the state file's path, the optimizer shards that exist) of the checkpoint of `step`."""
    prefix = checkpoint_dir(run_dir, step)
    return prefix + ".state.pt", glob.glob(glob.escape(prefix) + ".train.rank*.pt")


def remove_checkpoint(run_dir, step, weights=True):
    """Delete the checkpoint of `step` (weights=False: all but its weights), in the order state file, weights, shards:
    a half-deleted checkpoint is never resumable, and its shards left by a kill mark it for the next prune to finish."""
    state, shards = checkpoint_files(run_dir, step)
    if os.path.exists(state):
        os.remove(state)
    if weights:
        shutil.rmtree(checkpoint_dir(run_dir, step), ignore_errors=True)
    for path in shards:
        os.remove(path)


def remove_partial_saves(run_dir):
    """Delete what a kill left of a save under way in run_dir: atomic_open's .tmp_* files and save_model's
    NAME.tmpPID / NAME.oldPID directories (a checkpoint's weights or final/ being replaced). The resumed run has
    another process id and fresh temporary names, so it would never reuse them; at 1.5B one optimizer shard is
    ~18 GB. None of them belongs to a resumable checkpoint: a save renames its files into place before it writes
    the state file. And the parts of a checkpoint whose save is still marked (save_checkpoint) and has no state file:
    its weights, renamed into place, would otherwise stay as a checkpoint's kept weights (prune_checkpoints), and a
    fresh run's --keep_steps would take another run's weights for its own."""
    removed = 0

    def size(path):
        return (os.path.getsize(path) if os.path.isfile(path) else
                sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs))
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        if m := SAVING_MARK.fullmatch(name):
            step = int(m.group(1))
            state, shards = checkpoint_files(run_dir, step)
            if not os.path.exists(state):  # (with it, the save ended: only its mark was left)
                removed += sum(map(size, [checkpoint_dir(run_dir, step), *shards]))
                remove_checkpoint(run_dir, step)
            os.remove(os.path.join(run_dir, name))  # (last: a kill before it leaves the mark for the next start)
    for folder in (run_dir, os.path.join(run_dir, "rollouts")):
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            path = os.path.join(folder, name)
            if name.startswith(".tmp_") and os.path.isfile(path):
                removed += size(path)
                os.remove(path)
            elif re.search(r"\.(tmp|old)\d+$", name) and os.path.isdir(path):
                removed += size(path)
                shutil.rmtree(path)
    if removed:
        print0(f"note: removed what an interrupted save left in {run_dir} ({removed / 2**20:.1f} MiB)")


def load_checkpoint(run_dir, needs_shard=lambda state: True, steps=None):
    """The newest checkpoint in run_dir that every rank can read: (step, model_dir, train_state, this rank's shard),
    or None. Its shard is None where another number of ranks wrote it (require_shard says so), and where
    needs_shard(its train state) says the run has nothing left to train (a finished run), which then reads no shard
    (at 1.5B ~18 GB a rank) and needs none (deleted to free the disk, the run is still finished). One with a damaged
    file (truncated by a disk fault or a partial copy, or missing) is skipped with a one-line warning naming the file;
    but one that lacks only an optimizer shard the run needs is an error (a finished run's, extended: its shards were
    deleted, and skipped, the checkpoint would be removed). A read that fails for another reason (the storage's I/O
    error, no memory, no permission) says nothing of the file: a UserError on every rank, before anything is skipped
    (the resume would remove the newer checkpoint as unreadable). steps: rank 0's checkpoint_steps (default: listed
    now), which every rank walks; a step's state file that rank 0 sees and another rank does not is an error, not a
    skip (the ranks would resume from different steps). Every rank calls this."""
    steps = on_rank0(lambda: checkpoint_steps(run_dir)) if steps is None else steps
    for step in reversed(steps):
        model_dir, problem, state, shard = checkpoint_dir(run_dir, step), None, None, None
        seen = os.path.exists(model_dir + ".state.pt")  # (compared between the ranks with the outcome below)
        failed = None  # a read error, not a damaged file
        deleted = None  # a shard missing from a checkpoint otherwise whole
        misplaced = None  # a shard stamped with another step or rank than its place's
        path = model_dir + ".state.pt"
        try:
            state = load_checked(path)
            for path in weight_files(model_dir):  # safetensors checks that the file covers its header
                open(path, "rb").close()  # (safetensors reports a refused open as a missing file)
                with safe_open(path, framework="pt") as f:
                    f.keys()
            # (another world size: no shard, require_shard's error if the run goes on, not a skip)
            if state.get("world_size", 1) == world_size() and needs_shard(state):
                path = train_shard_path(run_dir, step, rank())
                # a save writes its shards before its state file, and a removal deletes that file first: a state file
                # without its shards is none a kill leaves, but a finished run's, deleted to free the disk
                if not os.path.exists(path):
                    deleted = path
                shard = load_checked(path)
                stamp = (shard.get("step", step), shard.get("rank", rank()))  # (none: a shard of an earlier version)
                if stamp != (step, rank()):
                    misplaced = (f"{path}: holds the optimizer shard of step {stamp[0]}, rank {stamp[1]}, not of step "
                                 f"{step}, rank {rank()} (copied or renamed by hand?)")
        except Exception as e:  # noqa: BLE001 -- any reader error (weight_files': no weights) means: not this one
            problem = str(e) if isinstance(e, UserError) else (  # (a UserError names its place)
                f"{path}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
            if read_failure(e):
                failed = problem
        gathered = all_gather_json([problem, failed, deleted, seen, misplaced])
        if len({g[3] for g in gathered}) > 1:  # (a step rank 0 listed, which another rank does not see)
            blind, seeing = ([str(r) for r, g in enumerate(gathered) if g[3] == want] for want in (False, True))
            raise UserError(f"{model_dir}.state.pt: rank(s) {', '.join(blind)} do not see it, where rank(s) "
                            f"{', '.join(seeing)} do: every rank must see one --out_dir (a directory local to each "
                            f"node, or a shared file system that lags?); nothing was skipped or removed")
        failures = [g[1] for g in gathered if g[1]]
        if failures:
            raise UserError(f"cannot read {failures[0]} (a read error, not a damaged file): no checkpoint was skipped "
                            f"or removed; run again when the storage reads (--resume true)")
        if deleted := next((g[2] for g in gathered if g[2]), None):  # skipped, it would be removed for good
            raise UserError(f"{deleted} is missing, where the checkpoint of step {step} is otherwise whole (a finished "
                            f"run's optimizer shards deleted to free the disk?): the run cannot go on from step {step} "
                            f"without them, and is not resumed from an earlier step over it; restore them, or move "
                            f"step {step}'s files out of {run_dir} to go on from an earlier checkpoint")
        if misplaced := next((g[4] for g in gathered if g[4] and not g[0]), None):  # (skipped, its right shards would
            # be removed with it)
            raise UserError(f"{misplaced}: nothing was skipped or removed; put each rank's shard in its place")
        problems = [g[0] for g in gathered if g[0]]
        if problems:
            print0(f"warning: skipping the checkpoint of step {step}: cannot read {problems[0]}")
            continue
        return step, model_dir, state, shard
    return None


def load_checked(path):
    """torch.load of a state file or an optimizer shard, whose zip records' CRCs are checked first: torch.load does
    not, so a bit flipped on the disk loaded as another number and the resume went on from it. (A read of the file
    more, at resume only: ~3 GB/s from the page cache.)"""
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
    if bad is not None:
        raise ValueError(f"its record {bad} fails its CRC check (the file changed on the disk)")
    return torch.load(path, map_location="cpu", weights_only=True)


def require_world_size(found):
    """A run that goes on from load_checkpoint's `found` runs at the number of ranks that wrote its shards: checked
    before its settings (the rank count is the one difference a resume cannot get past) and before anything is
    removed."""
    _, model_dir, state, _ = found
    if state.get("world_size", 1) != world_size():
        raise UserError(f"{model_dir}.state.pt: written by {state.get('world_size', 1)} rank(s); resume it with the "
                        f"same number (torchrun --nproc_per_node), not {world_size()}")


def require_shard(found):
    """This rank's shard of the training state of load_checkpoint's `found`, for a run that goes on: one shard per
    rank (require_world_size), read where the checkpoint's run had steps left."""
    require_world_size(found)
    if found[3] is None:  # (load_checkpoint's needs_shard said the run had finished)
        raise UserError(f"{found[1]}.state.pt: the checkpoint of a run that had finished, whose optimizer state was "
                        f"not read: the run cannot go on from it")
    return found[3]


def read_failure(e):
    """Whether reading failed for the storage's or the host's sake (an I/O error, no permission, no memory), as e or
    what it was raised from says, rather than for a damaged file: a damaged file raises its readers' own errors, and a
    missing one, or a directory in its place, is damage too."""
    def not_the_file(c):
        if isinstance(c, OSError):  # (torch.load of a small file cut short: EINVAL, as it seeks past the end)
            return not isinstance(c, (FileNotFoundError, IsADirectoryError, NotADirectoryError)) and \
                c.errno != errno.EINVAL
        return out_of_memory(c)
    return any(map(not_the_file, error_chain(e)))


@functools.cache
def code_stamp():
    """The project's code as this process started it: {file name: digest} of the .py files beside this one. Each
    checkpoint records it; a resume under other code says which files changed (note_code_changes)."""
    return source_digests(os.path.dirname(os.path.abspath(__file__)))


def source_digests(directory):
    """{file name: short sha256} of the .py files in `directory`."""
    stamp = {}
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        # (not an editor's lock or backup, ".#train_rl.py", a link to nothing; a file it cannot read is left out:
        # the stamp serves a note, never a reason to stop a run)
        if entry.name.endswith(".py") and not entry.name.startswith(".") and entry.is_file():
            try:
                with open(entry.path, "rb") as f:
                    stamp[entry.name] = hashlib.sha256(f.read()).hexdigest()[:16]
            except OSError:
                pass
    return stamp


def note_code_changes(saved, since):
    """A note naming the files that differ between the code a stopped run recorded (its code_stamp `saved`, e.g. a
    checkpoint's; None from versions before it was recorded) and the code running now, `since` saying when it was
    recorded: what the resume computes runs the new code, which a fork that edits the scripts and resumes should know
    (nothing is refused: fixing a bug and going on is a resume's purpose)."""
    now = code_stamp()
    if saved is None or saved == now:
        return
    changed = [f"{n} ({'new' if n not in saved else 'removed' if n not in now else 'edited'})"
               for n in sorted(saved.keys() | now.keys()) if saved.get(n) != now.get(n)]
    print0(f"note: the code changed since {since}: {', '.join(changed)}; what the resume computes runs the code as "
           f"it is now")


# the memory and batching settings of train_rl.py and redistill_sft.py: a resume may change them (a run out of memory
# goes on), but they cut the same sums into other pieces (or compile them into other kernels), which round otherwise
ROUNDING_SETTINGS = ("micro_batch_tokens", "logprob_chunk", "gen_batch_size", "keep_engine", "gradient_checkpointing",
                     "checkpoint_every", "checkpoint_keep", "compile")


def note_changed_settings(saved, now, since, same=("resume", "out_dir")):
    """A note naming the settings (vars(args)) in which a resume differs from the run's, recorded when `since` (None:
    a version that did not record them), beyond those check_run_identity refuses. Nothing is refused; where one of
    ROUNDING_SETTINGS changed, the note says that the weights from here can differ in their last bits from an
    uninterrupted run's. same: not compared (resume itself; out_dir, one directory however spelled)."""
    if not saved:
        return
    changed = [k for k in sorted(saved.keys() & now.keys())
               if k not in same and json.dumps(saved[k], default=str) != json.dumps(now[k], default=str)]
    if changed:
        rounding = [k for k in changed if k in ROUNDING_SETTINGS]
        print0(f"note: resuming with other settings than when {since}: "
               + "; ".join(f"{k}: was {saved[k]!r}, now {now[k]!r}" for k in changed)
               + (f"; {' and '.join(rounding)} round{'s' if len(rounding) == 1 else ''} the same sums otherwise, so "
                  f"the weights from here can differ in their last bits from an uninterrupted run's (in RL, which "
                  f"samples from them, its rollouts too: the run goes another way from here)"
                  if rounding else ""))


def resume_checkpoint(run_dir, resume, needs_shard=lambda state: True):
    """The checkpoint to continue from (load_checkpoint's newest complete one), or None for a fresh run. Checkpoints in
    run_dir without resume are an error: a new run would mix its steps with an old one's. Rank 0 first takes the
    directory's lock (common.lock_run_dir; a fresh directory's at its first write, metrics_log), held until the run
    ends: two runs on one directory are refused before either removes or writes a file there. needs_shard:
    load_checkpoint's."""
    lock_on_rank0(run_dir, if_exists=True)  # every rank joins (rank 0 decides whether run_dir exists)
    code_stamp()  # (read now, as the run starts: the code it runs, not what an editor saves before its first save)
    steps = on_rank0(lambda: checkpoint_steps(run_dir))  # (one listing: every rank decides alike)
    if steps and not resume:
        raise UserError(f"{run_dir} already holds checkpoints (newest step {steps[-1]}); pass --resume true to "
                        f"continue it, or choose another --out_dir")

    def clear_and_check():  # (rank 0) what a kill left goes; a step's weights with no checkpoint are another run's
        remove_partial_saves(run_dir)
        orphans = sorted(checkpoint_parts(run_dir)) if not steps and os.path.isdir(run_dir) else []
        if orphans:  # (their state files removed to free the disk: this run's first save would prune every one)
            raise UserError(f"{run_dir} holds weights or shards of an earlier run (steps "
                            f"{', '.join(map(str, orphans))}) and no checkpoint to resume (no step_N.state.pt): a "
                            f"fresh run there would remove them at its first save and write over that run's logs; "
                            f"move them away, or choose another --out_dir")
    on_rank0(clear_and_check)
    found = load_checkpoint(run_dir, needs_shard, steps) if resume else None
    if resume and found is None:
        if steps:  # a fresh run here would write over their run's logs
            raise UserError(f"--resume: none of the checkpoints in {run_dir} (steps {', '.join(map(str, steps))}) can "
                            f"be read (the warnings above name the files); move them away to start afresh there, or "
                            f"choose another --out_dir")
        print0(f"note: --resume: no checkpoint in {run_dir}; starting a fresh run")
    # (what lies beyond it, skipped: removed by the caller's prune_checkpoints once the resume's settings are accepted)
    if found is not None and needs_shard(found[2]):  # (a finished run computes nothing more)
        note_code_changes(found[2].get("code"), f"step {found[0]} was saved")
    barrier()
    return found


def local_train_state(model, optimizer):
    """This rank's part of the fp32 weights and of optimizer.state_dict(), as plain tensors (a sharded tensor's
    local shard; an unsharded one whole). Taken from resharded modules (reshard), and checked: a full-size or
    compute-dtype tensor saved as a shard would crash the resume, or silently round the weights it restores."""
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


def optimizer_kind(state):
    """Which optimizer wrote one parameter's state (its keys), or None where it does not say."""
    return ("8-bit AdamW (bitsandbytes)" if "state1" in state else "AdamW (torch)" if "exp_avg" in state else None)


def load_local_train_state(model, optimizer, shard):
    """The inverse of local_train_state: the fp32 weights (the checkpoint's HF weights may be bf16) and the optimizer
    state, each shard back into a tensor sharded like its parameter."""
    reshard(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            local_tensor(p).copy_(shard["weights"][name])
    sd = shard["optimizer"]
    # the saved groups' hyperparameters would silently replace the ones given now (and logged in settings.json)

    def plain(v):  # betas come back from a checkpoint as a list or a tuple
        return list(v) if isinstance(v, (list, tuple)) else v
    for now, saved in zip(optimizer.param_groups, sd["param_groups"]):
        changed = [f"{k}: was {plain(saved[k])}, now {plain(now[k])}" for k in ("betas", "weight_decay", "eps")
                   if k in now and k in saved and plain(saved[k]) != plain(now[k])]
        if changed:
            raise UserError("--resume with different optimizer settings than the checkpoint's: " + "; ".join(changed))
    # bitsandbytes' state (state1, qmap1, ...) cannot be torch AdamW's (exp_avg, ...), nor the other way round: the
    # first step would fail on a missing key (--adam_8bit falls back to torch's where bitsandbytes or CUDA is missing)
    saved_kind = next(filter(None, map(optimizer_kind, sd["state"].values())), None)
    inner = optimizer.inner if isinstance(optimizer, LocalShardOptimizer) else optimizer
    now_kind = "8-bit AdamW (bitsandbytes)" if type(inner).__module__.startswith("bitsandbytes") else "AdamW (torch)"
    if saved_kind not in (None, now_kind):
        raise UserError(f"--resume: the checkpoint holds the state of {saved_kind}, and this run's optimizer is "
                        f"{now_kind}; resume where it ran (--adam_8bit needs bitsandbytes and CUDA)")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, s in sd["state"].items():
        p = params[i]
        if isinstance(p, DTensor):
            s.update({k: DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, shape=p.shape,
                                            stride=p.stride()) for k, v in s.items() if v.dim() > 0})
    optimizer.load_state_dict(sd)


# the settings that name files or checkpoints (train_rl's, redistill_sft's): another spelling of the same files
# (absolute or relative, through a link) is the same setting; what they hold the runs check by digests. (Not
# sample_effect's: its rows and per-file summary name each SFT file as given, so a resume would mix two names.)
PATH_SETTINGS = ("train_data", "model", "ref_model", "data", "pretrain_text", "init")


def check_run_identity(run_dir, saved: dict, now: dict, recorded_since=(), ignore=(), when_both=()):
    """--resume must continue the same run: settings that decide the data order or the schedule (`now`) must
    equal the checkpoint's (`saved`), path settings name the same files; otherwise one line names each difference.
    recorded_since: keys that checkpoints of earlier versions do not hold, so not compared with those. ignore: keys
    not compared (a finished run's compute: nothing is left to compute). when_both: keys compared only where the run
    and the resume both give one a value (None: what it describes is not used, e.g. no validation)."""
    changed = {k: (saved.get(k), now.get(k)) for k in {**saved, **now} if saved.get(k) != now.get(k)
               and k not in ignore and not (k in recorded_since and k not in saved)
               and not (k in when_both and None in (saved.get(k), now.get(k)))
               and not (k in PATH_SETTINGS and same_files(saved.get(k), now.get(k)))}
    if changed:
        threads = all(str(v).startswith("cpu, threads") for v in changed.get("compute_device", ("",)))
        raise UserError(f"{run_dir}: --resume with different settings than the run's: "
                        + "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in changed.items())
                        + (" (torch's CPU threads: OMP_NUM_THREADS sets them; torchrun sets 1 a rank where it is unset)"
                           if threads else ""))


# -----------------------------------------------------------------------------
# the metrics log


def metrics_log(run_dir, start_step, wandb_project="", settings=None):
    """log(record): appends to run_dir/metrics.jsonl on rank 0, and to Weights & Biases when wandb_project is set and
    wandb is installed; the run's settings go to run_dir/settings.json. Records after start_step (the checkpoint a
    run resumes from; 0 = a fresh run) are dropped first, so a resumed run rewrites them. log.finish() ends wandb."""
    path, wandb = os.path.join(run_dir, "metrics.jsonl"), None
    lock_on_rank0(run_dir)  # (makes the directory)

    def start():  # on rank 0: a damaged metrics.jsonl stops every rank with its one line
        # a fresh run locks a fresh directory only here: a run that saved checkpoints in it since this one looked
        # (resume_checkpoint) and has ended is not this one's to empty and prune
        if not start_step and (steps := checkpoint_steps(run_dir)):
            raise UserError(f"{run_dir}: another run saved checkpoints there (newest step {steps[-1]}) while this one "
                            f"was starting; nothing was changed: choose another --out_dir, or pass --resume true to "
                            f"continue that run")
        if settings is not None:
            write_json(os.path.join(run_dir, "settings.json"), settings)
        if os.path.exists(path):
            kept = [m for m in read_metrics(path) if start_step and m["step"] <= start_step]
            write_jsonl(path, kept)
    on_rank0(start)
    if rank() == 0:
        if wandb_project:
            try:
                import wandb
                wandb.init(project=wandb_project, name=os.path.basename(os.path.abspath(run_dir)), config=settings)
            except ImportError:
                print0("note: wandb not installed; logging to metrics.jsonl only")

    def log(record):  # (every rank calls it: a run whose directory went away, or a full disk, stops every rank here)
        def append():
            # JSON has no NaN or inf (json.dumps writes them bare, and strict readers refuse the file): a non-finite
            # value (a step whose forward blew up) is null, as a skipped step's loss is
            finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            append_jsonl(path, finite)
            if wandb:
                wandb.log({k: v for k, v in finite.items() if isinstance(v, (int, float))}, step=finite["step"])
        write_on_rank0(append, run_dir)
    log.finish = lambda: wandb.finish() if wandb else None
    return log
