"""
Many ranks as one: torchrun / process-group setup, the only collectives the scripts use, the data order and packed
micro-batches that every rank computes alike, and FSDP2 sharding (a sharded model for training, a full copy for
generation).
"""
import argparse
import json
import os
import sys
import threading
import zlib
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from common import UserError, check_lock_held, lock_run_dir, print0, rank, str2bool, world_size
from model import CHECKPOINT_KEEP, compile_blocks, dtype_name, empty_model, packed_backend_name

# -----------------------------------------------------------------------------
# process group

# How long a rank waits in a collective for the others: gloo's default (NCCL's is 10 minutes). Rank 0 alone
# writes a 7B checkpoint's weights or token_shift's summary and plots while the others wait in a barrier.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


def stop_with_the_launcher():
    """A torchrun worker whose torchrun is gone stops, until the process group stands. A SIGKILLed torchrun cannot
    stop its workers (each runs in a session of its own): one still starting up waits for the dead launcher's store
    up to COLLECTIVE_TIMEOUT, and, when a re-run's torchrun opens the same port (29500 unless told), joins that run in
    the place of its own workers, which fail ("Connection reset by peer"), while the orphans run the killed command.
    Only torchrun's workers are watched (TORCHELASTIC_RUN_ID: a launcher that sets RANK itself, such as a cluster
    operator, srun or mpirun, sets none); after the group stands, an orphan finishes its run as before, holding the
    run's lock. Returns the event to set once the group stands (the watch then ends), or None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    if not under_torchrun():  # gone before this worker got here: handed to init or a subreaper
        raise UserError("the torchrun that started this worker is gone (killed?): not joining its rendezvous")
    parent, standing = os.getppid(), threading.Event()

    def watch():
        while not standing.wait(0.2):
            if os.getppid() != parent:
                print("error: the torchrun that started this worker is gone (killed?): stopping", file=sys.stderr,
                      flush=True)
                os._exit(2)
    threading.Thread(target=watch, daemon=True, name="stop_with_the_launcher").start()
    return standing


# what an elastic launcher's process runs: torchrun, python -m torch.distributed.run (or .launch), accelerate launch
LAUNCHER_WORDS = (b"torchrun", b"torch.distributed.run", b"torch.distributed.launch", b"accelerate")


def under_torchrun():
    """Whether a process above this one (its parent, or one further up: a --no-python wrapper) runs an elastic
    launcher (LAUNCHER_WORDS); True where /proc cannot say."""
    pid = os.getppid()
    while pid > 0:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                words = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return True
        if any(os.path.basename(w) in LAUNCHER_WORDS for w in words):
            return True
        pid = parent  # (init's parent is 0)
    return False


def dist_setup(settings=None):
    """Initialise torch.distributed: from torchrun's variables, or as a process group of one rank when run
    with plain python, so that every script runs the same code (FSDP included) at any world size.
    NCCL on CUDA, gloo on CPU. settings: the script's parsed settings, which every rank must share (same_settings).
    Returns (rank, world_size, device)."""
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
        if torchrun and "LOCAL_RANK" not in os.environ:  # else every rank would take GPU 0
            raise UserError("RANK is set but LOCAL_RANK is not: launch with torchrun (it sets both), or set "
                            "LOCAL_RANK to this process's GPU on its machine")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():  # (tests run several scripts' mains in one process)
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = dict(timeout=COLLECTIVE_TIMEOUT, **({"device_id": device} if device.type == "cuda" else {}))
        if torchrun:
            standing = stop_with_the_launcher()
            try:
                dist.init_process_group(backend, **kwargs)
            finally:
                if standing is not None:
                    standing.set()
        else:  # one rank, no ports: an in-process store
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    if settings is not None:
        same_settings(settings)
    return rank_, world, device


def same_settings(settings):
    """Every rank was given the same settings (an argparse Namespace): the nodes of a multi-node launch each parse
    their own command line and --config, and ranks of other seeds, step counts or budgets mix their data orders into
    one result, or wait in collectives the others never reach. An error on every rank naming what differs."""
    mine = {k: json.dumps(v, sort_keys=True, default=str) for k, v in sorted(vars(settings).items())
            if k != "config"}  # (what it holds is compared; one config may lie at another path on each node)
    every = all_gather_json(mine)
    for r, theirs in enumerate(every[1:], 1):
        differ = [k for k in {**every[0], **theirs} if every[0].get(k) != theirs.get(k)]
        if differ:
            raise UserError("the ranks were given different settings: "
                            + "; ".join(f"--{k} {every[0].get(k)} on rank 0, {theirs.get(k)} on rank {r}"
                                        for k in differ[:3])
                            + " (a multi-node launch whose nodes' command lines or --config files differ?)")


def compute_identity(dtype, device):
    """What a training run computes in, as its resume compares it: the dtype --dtype resolved to (auto on another
    device counts; bf16 = bfloat16), the device, a CPU with its thread count, and the kernels: the CPU's vector
    instructions torch dispatches to (AVX512, AVX2, ...) or the GPU's model. Each changes how matmuls and reductions
    round: one seed on 1 and on 2 threads, or with AVX512 and AVX2, trains other weights. (Runs of versions before
    a key was recorded are not compared on it: COMPUTE_KEYS, passed as check_run_identity's recorded_since.)"""
    cpu = device.type == "cpu"
    return {"compute_dtype": dtype_name(dtype),
            "compute_device": f"cpu, threads {torch.get_num_threads()}" if cpu else device.type,
            "compute_kernels": torch.backends.cpu.get_cpu_capability() if cpu else torch.cuda.get_device_name(device)}


COMPUTE_KEYS = ("compute_dtype", "compute_device", "compute_kernels")  # what compute_identity records


def dist_cleanup():
    """Wait for every rank, then free the process group: its destructor joins the backend's worker threads (the
    GIL released, so they can drop what they still hold), before the interpreter starts finalizing."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# collectives: every one outside FSDP goes through these (tests/test_parallel.py checks that no script calls
# torch.distributed's collectives itself). Each puts its tensor on the process group's device: NCCL has no
# CPU tensors, so a CPU tensor handed to it is a crash that the CPU tests (gloo) would never show.


def group_device():
    """The device a collective's tensors must live on: the current GPU under NCCL, the CPU under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor, op="sum"):
    """The sum (or "max", "min") of a tensor over ranks, returned on the tensor's own device."""
    if world_size() == 1:
        return tensor
    t = tensor.detach().to(group_device(), copy=True)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t.to(tensor.device)


def all_reduce_numbers(numbers: dict, op="sum") -> dict:
    """The sum (or max, min) of a dict of numbers over ranks, in float64. Every rank gives the same keys (paired by
    place, others would sum unlike numbers, and another count of them would wait in the collective): checked first,
    by a digest of the keys each rank holds."""
    keys = sorted(numbers)
    if world_size() > 1:
        digest = zlib.crc32("\n".join(keys).encode("utf-8"))
        low, high = all_reduce(torch.tensor([-digest, digest], dtype=torch.float64), "max").tolist()
        if -low != high:
            raise RuntimeError(f"all_reduce_numbers: the ranks hold other keys (this one: {keys})")
    t = all_reduce(torch.tensor([float(numbers[k]) for k in keys], dtype=torch.float64), op)
    return dict(zip(keys, t.tolist()))


def all_gather_json(obj):
    """Gather one JSON-serialisable object per rank to every rank (a list, in rank order).

    JSON over a byte tensor rather than all_gather_object, so model output never goes through pickle.
    """
    if world_size() == 1:
        return [obj]
    device = group_device()
    # bytes <-> uint8 tensor through a buffer, not a Python list of ints (rollout logs run to hundreds of MB)
    data = torch.frombuffer(bytearray(json.dumps(obj).encode("utf-8")), dtype=torch.uint8).to(device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([data.numel()], device=device))
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return [json.loads(t[:n].cpu().numpy().tobytes().decode("utf-8")) for t, n in zip(out, sizes)]


def lock_on_rank0(run_dir, name=".lock", if_exists=False):
    """Rank 0 takes the lock of run directory `run_dir` (common.lock_run_dir; `name`: the lock file there); refused,
    every rank raises its error (not one rank, leaving the others in a collective). Every rank calls this, always:
    if_exists (lock only a directory that exists; none is made) is decided by rank 0 alone, as another rank's own
    look could come after rank 0 made the directory, and that rank alone would then join this collective."""
    on_rank0(lambda: lock_run_dir(run_dir, name) if not if_exists or os.path.isdir(run_dir) else None)


def write_on_rank0(write, run_dir, name=".lock"):
    """Rank 0 runs write() (what it alone writes into run_dir) once it has checked that run_dir is still the directory
    whose lock this run took (common.check_lock_held: removed or moved away, and perhaps a new run there). Either's
    UserError (a write refused: a full disk) stops every rank with its one line, not rank 0 alone while the others wait
    in their next collective. Every rank calls this."""
    def checked():
        check_lock_held(run_dir, name)
        write()
    on_rank0(checked)


def check_lock_on_rank0(run_dir, name=".lock"):
    """write_on_rank0 with nothing to write: every rank stops, by rank 0's look, when run_dir is no longer the
    directory whose lock this run took. Every rank calls this."""
    write_on_rank0(lambda: None, run_dir, name)


def on_rank0(work):
    """Rank 0 runs work() (it decides, or reads or writes what it alone keeps) and every rank gets its result (JSON),
    or its UserError raised: not on rank 0 alone, which would leave the others to die in their next collective with
    a backend's traceback (or wait there). Any other error is raised on rank 0 as it is, and on the others as a
    UserError naming it. Every rank calls this."""
    outcome, failure = {"problem": None, "result": None}, None
    if rank() == 0:
        try:
            result = work()
            if world_size() > 1:  # (a result JSON cannot hold failed in the gather below, on rank 0 alone)
                json.dumps(result)
            outcome["result"] = result
        except UserError as e:
            outcome["problem"] = str(e)
        except BaseException as e:  # noqa: BLE001 -- the others stop too (a Ctrl-C, an exit too), then rank 0 raises
            failure, outcome["problem"] = e, f"rank 0 stopped: {type(e).__name__}: {e}"
    outcome = all_gather_json(outcome)[0]
    if failure is not None:
        raise failure
    if outcome["problem"]:
        raise UserError(outcome["problem"])
    return outcome["result"]


def on_every_rank(work):
    """Every rank runs work() (what each writes of its own, or its share of a generation and scoring) and gets its
    result; an error on any rank stops every rank: the first one's, by rank, as a UserError on the others (raised
    whole where it happened), not on that rank alone while the others wait in their next collective (or die there
    with a backend's traceback). work() must call no collective. Every rank calls this."""
    problem, failure, result = None, None, None
    try:
        result = work()
    except UserError as e:
        problem = str(e)
    except BaseException as e:  # noqa: BLE001 -- as on_rank0
        failure, problem = e, f"rank {rank()} stopped: {type(e).__name__}: {e}"
    problems = [p for p in all_gather_json(problem) if p]
    if failure is not None:
        raise failure
    if problems:
        raise UserError(problems[0])
    return result


def same_on_every_rank(value, what):
    """Every rank read `what` itself (`value`: its digest): a file written again between two ranks' reads gives them
    other data, so other step counts and data orders, and their collectives would pair wrongly (a hang under NCCL).
    An error on every rank when they differ."""
    if len(set(map(json.dumps, all_gather_json(value)))) > 1:
        raise UserError(f"{what}: the ranks read different data (a stage writing it again while they read it?); run "
                        f"again once it is written")


def gather_lists(items, key=None):
    """Every rank's list, concatenated in rank order (then sorted by `key` when given), on every rank."""
    merged = [x for part in all_gather_json(items) for x in part]
    return sorted(merged, key=key) if key else merged


def barrier():
    if world_size() > 1:
        dist.barrier()


def even_out(batches):
    """The same number of micro-batches on every rank, padded with None: under FSDP every forward and backward
    is a collective, so a rank that has run out runs idle_pass while the others work."""
    n = int(all_reduce(torch.tensor([len(batches)]), "max")[0])
    return list(batches) + [None] * (n - len(batches))


# -----------------------------------------------------------------------------
# batching: the data order and packed micro-batches, deterministic and the same on every rank


def rank_share(items, rank_, world):
    """This rank's share of a list: every world-th item starting at rank (disjoint, covers all)."""
    return items[rank_::world]


def epoch_order(n, seed, epoch):
    """The data order of an epoch: a permutation of range(n) fixed by (seed, epoch), identical on every rank,
    so a resumed run skips and repeats nothing."""
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
# therefore a collective that all ranks must join. Generation instead runs on a full copy gathered once
# (engine.GenWeights): no collective inside the decode loop, and ranks may generate different lengths.


def shard_model(model, compute_dtype, reshard_after_forward=True):
    """Shard an fp32 model over all ranks with FSDP2: each block, then the rest (embeddings, final norm, lm_head).

    Forward and backward run in compute_dtype; gradients are reduce-scattered in fp32 and SUMMED over ranks
    (FSDP's default is the mean): every loss in this project is already normalised over the global batch, so
    the sum of the ranks' gradients is the gradient of the global loss. Works on 1 rank, N GPUs (NCCL), several
    nodes, and CPU ranks under gloo. One fp32 rank (the CPU preset) keeps the plain model."""
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("shard_model expects fp32 weights (they are the master copy); compute_dtype sets the compute")
    if world_size() == 1 and compute_dtype == torch.float32:
        return model  # nothing to shard and nothing to cast: FSDP's hooks would only cost time (~20% on CPU)
    policy = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                                  reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    return model


def add_recompute_args(p, auto_fraction=None):
    """The settings that trade activation memory for recompute and compile, shared by every script that trains
    (each defines --gradient_checkpointing itself, with its own default). auto_fraction (gpu_memory's
    AUTO_MEMORY_FRACTION; None: no auto): --checkpoint_every may be "auto", which the script resolves by its computed
    peak (gpu_memory.resolve_recompute) before prepare_training."""
    auto = auto_fraction is not None

    # measured on one H200 at the 1.5B shape, one 16K-token micro-batch (docs/engine_and_speed.md, issue 36 stage 1):
    # every block 27.6 % MFU, every 2nd 30.3 %, none 33.3 %; --compile +9 % at the same memory; keeping attention's or
    # the matmuls' outputs 22-23 % (slower than recomputing them)
    def every(text):
        if auto and text == "auto":
            return text
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"an integer{' or auto' if auto else ''}, not {text!r}")
    p.add_argument("--checkpoint_every", type=every, default=1,
                   help="with --gradient_checkpointing: recompute every k-th block only; the others keep their "
                        "activations (1: all blocks, least memory; 2: half the recompute for about twice the memory)"
                        + ("; auto: on a GPU the least recompute (none, every 8th, 4th, 3rd, 2nd block, every block) "
                           f"whose computed peak (bench.py --memory) is at most {100 * auto_fraction:.0f} %% of the "
                           "GPU, printed at start; on a CPU every block" if auto else ""))
    p.add_argument("--checkpoint_keep", default="nothing", choices=tuple(CHECKPOINT_KEEP),
                   help="with --gradient_checkpointing: what a recomputed block keeps from its forward (selective "
                        "activation checkpointing): nothing; attention (the attention kernels' outputs, O(tokens)); "
                        "matmuls (those and every projection's output: only norms, RoPE and SiLU are recomputed); "
                        "on one H200 at the 1.5B shape both ran slower than keeping nothing")
    p.add_argument("--compile", type=str2bool, default=False,
                   help="torch.compile each block's forward (dynamic shapes; attention stays eager): fewer, fused "
                        "kernels on CUDA, a compile of tens of seconds at start; off by default (slower on CPU)")


def prepare_training(model, compute_dtype, args, reshard_after_forward=True):
    """The model as every training script runs it: sharded (shard_model; reshard_after_forward: FSDP's, for the GPU
    suite to measure), its recompute and compile settings from args (add_recompute_args and
    --gradient_checkpointing), the packed attention it will use printed once."""
    if args.checkpoint_every == "auto":
        raise ValueError("--checkpoint_every auto is resolved by the script first (gpu_memory.resolve_recompute)")
    if args.checkpoint_every < 1:
        raise UserError(f"--checkpoint_every must be at least 1, not {args.checkpoint_every}")
    if args.compile and args.gradient_checkpointing and args.checkpoint_keep != "nothing":
        raise UserError("--checkpoint_keep works on the ops autograd sees; with --compile true the compiler decides "
                        "what a block keeps: use one or the other")
    model = set_recompute(shard_model(model, compute_dtype, reshard_after_forward), args)
    if args.compile:
        compile_blocks(model)
    device = model.lm_head.weight.device
    print0(f"packed attention: {packed_backend_name(device, compute_dtype)}"
           + (f"; recompute every {args.checkpoint_every} block(s), keeping {args.checkpoint_keep}"
              if args.gradient_checkpointing else "; no recompute") + ("; compiled blocks" if args.compile else ""))
    return model


def set_recompute(model, args):
    """--gradient_checkpointing, --checkpoint_every and --checkpoint_keep onto a model; returns it."""
    model.gradient_checkpointing = args.gradient_checkpointing
    model.checkpoint_every, model.checkpoint_keep = args.checkpoint_every, args.checkpoint_keep
    return model


def reshard(model):
    """Every FSDP-sharded parameter of `model` back to this rank's fp32 shard, the gathered copies freed.

    FSDP2 never reshards its root group (embeddings, final norm, lm_head) after a forward, expecting the backward
    to follow; after a no-grad forward (validation, a pre-pass, a step that trained nothing) those parameters stay
    full-size, in the compute dtype. Whatever reads parameters as shards (checkpoints, full copies) calls this
    first. A no-op for an unsharded model."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_tensor(t):
    """The whole of a parameter or gradient, FSDP-sharded or not (a collective when sharded: every rank calls it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_tensor(t):
    """This rank's part of a parameter, gradient or optimizer state: a sharded tensor's local shard, else all of it."""
    return t.to_local() if isinstance(t, DTensor) else t


def is_sharded(model) -> bool:
    """Whether shard_model sharded it (asked of the module: after a no-grad forward its root parameters are
    plain tensors for a while, see reshard)."""
    return isinstance(model, FSDPModule)


def full_copy(model, dtype, device=None, on_rank=None):
    """A plain, unsharded Transformer holding the full weights of `model` (sharded or not) in dtype.

    Each tensor is cast to dtype, then gathered (every rank must call this); peak extra memory is the copy plus
    one full tensor. With on_rank, only that rank keeps the copy and the others get None (checkpoints)."""
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
    device = model.lm_head.weight.device
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    hidden = model(ids, cu_seqlens=torch.tensor([0, 2], device=device))
    lp = model.token_logprobs(hidden[0, :1], ids[0, 1:])
    if backward:
        (lp.sum() * 0.0).backward()
