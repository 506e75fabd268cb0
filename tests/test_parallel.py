"""parallel.py: torchrun setup and teardown (dist_cleanup frees the process group, so no backend thread is left
running while the interpreter finalizes: a gloo worker that still holds a Python-owned tensor then dies in a
destructor, "terminate called without an active exception", SIGABRT; a torchrun worker that ran FSDP ends through
common.run_main without finalizing), the collectives (every one outside FSDP goes through parallel.py, on the
process group's device) and the packed micro-batches."""
import ast
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

import common
import model as model_module
import parallel
from conftest import free_port, subprocess_env


THREADS = '''
import os

def threads():
    names = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            names.append(f.read().strip())
    return sorted(names)
'''


RANK_SCRIPT = THREADS + '''
import json, os, sys
import parallel
from model import load_model

rank, world, device = parallel.dist_setup()
model = load_model(sys.argv[1])  # what every stage does after dist_setup; its meta device imports torch._dynamo
assert "torch.distributed.nn.functional" in sys.modules
gathered = parallel.all_gather_json({"rank": rank, "text": "é✓" * (1 + 1000 * rank)})  # sizes differ; not ASCII
larger_first = parallel.all_gather_json("x" * (1000 if rank == 0 else 3))  # rank 0's payload the larger one
merged = parallel.gather_lists([5 - rank, 1 - rank, 7 - rank], key=lambda x: x)  # [5, 1, 7] and [4, 0, 6]
unsorted = parallel.gather_lists([5 - rank, 1 - rank])
evened = parallel.even_out([[rank]] * (3 if rank == 0 else 1))  # 3 micro-batches on rank 0, 1 on rank 1
summed = parallel.all_reduce_numbers({"a": 1 + rank, "b": 2})
unlike = []
for keys in (["a", "b" if rank == 0 else "c"], ["a"] + ["b"] * rank):  # other keys; another count of them
    try:
        parallel.all_reduce_numbers(dict.fromkeys(keys, 1))
        unlike.append(None)
    except RuntimeError as e:
        unlike.append(str(e))
during = threads()
parallel.dist_cleanup()
with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as f:
    json.dump({"gathered": gathered, "larger_first": larger_first, "merged": merged, "unsorted": unsorted,
               "evened": evened, "summed": summed, "unlike": unlike, "during": during, "after": threads()}, f)
'''


def two_ranks(tmp_path, name, text, *args, timeout=300, launcher=()):
    """Write `text` to tmp_path/name and run it under torchrun with 2 ranks (gloo): the finished process."""
    script = tmp_path / name
    script.write_text(text)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                           str(free_port()), *launcher, str(script), *map(str, args)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.torchrun
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names are read from /proc (Linux)")
def test_dist_cleanup_leaves_no_backend_thread(tiny_checkpoint, tmp_path):
    """2 ranks (gloo): the collectives outside FSDP give every rank the same, right answer (all_gather_json with
    payloads of either size order, gather_lists with and without a key, even_out, all_reduce_numbers, which refuses
    ranks of other keys), and dist_cleanup then stops gloo's threads."""
    proc = two_ranks(tmp_path, "rank_script.py", RANK_SCRIPT, tiny_checkpoint, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.json") as f:
            got = json.load(f)
        assert got["gathered"] == [{"rank": 0, "text": "é✓"}, {"rank": 1, "text": "é✓" * 1001}]
        # each rank's payload cut at its own size, whichever rank sends the larger
        assert got["larger_first"] == ["x" * 1000, "x" * 3]
        # gather_lists: rank order, then sorted by the key when one is given (the rollout logs' record order)
        assert got["merged"] == [0, 1, 4, 5, 6, 7] and got["unsorted"] == [5, 1, 4, 0]
        # even_out: as many micro-batches as the busiest rank, the rest idle (None): FSDP's collectives pair up
        assert got["evened"] == ([[0]] * 3 if rank == 0 else [[1], None, None])
        # all_reduce_numbers: keys paired by name; other keys summed unlike numbers, another count of them hung
        assert got["summed"] == {"a": 3.0, "b": 4.0}
        assert all(u and "all_reduce_numbers: the ranks hold other keys" in u for u in got["unlike"]), got["unlike"]
        gloo = ("pt_gloo_runloop", "gloo_tcp_loop")  # torch 2.13 runs both; 2.11 only the first
        assert any(name in got["during"] for name in gloo), got["during"]  # the check sees gloo's threads ...
        assert not any(name in got["after"] for name in gloo), got["after"]  # ... and after cleanup they are gone


FRESH_RUN_SCRIPT = '''
import json, os, sys, time
import ckpt
import common
import parallel

rank, world, device = parallel.dist_setup()
run_dir = os.path.join(sys.argv[1], "run")
if rank == 1:
    time.sleep(2)  # a slow rank: rank 0 has made run_dir (metrics_log's lock) by the time it looks
ckpt.resume_checkpoint(run_dir, False)
ckpt.metrics_log(run_dir, 0)
after = parallel.all_gather_json(rank)  # the next collective must pair with the other rank's
parallel.same_on_every_rank({"digest": "d1"}, "data.jsonl")  # the same data: nothing said
try:  # data written again between the two ranks' reads: every rank refuses, none goes on alone
    parallel.same_on_every_rank({"digest": f"d{rank}"}, "data.jsonl")
    refused = None
except common.UserError as e:
    refused = str(e)
parallel.dist_cleanup()
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump([after, refused], f)
'''


@pytest.mark.torchrun
def test_a_fresh_run_dirs_lock_is_one_collective_on_every_rank_however_late_a_rank_looks(tmp_path):
    """resume_checkpoint locked run_dir only where a rank saw it: a rank that looked after rank 0 had made it (a
    fresh run, metrics_log) joined one collective more, and every later one paired with the other rank's previous
    ("20096 vs 4" from gloo one run in five under torch 2.11; a hang or mixed tensors under NCCL)."""
    proc = two_ranks(tmp_path, "fresh_run.py", FRESH_RUN_SCRIPT, tmp_path, timeout=60)  # (a hang: it fails)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        after, refused = json.loads((tmp_path / f"rank{rank}.json").read_text(encoding="utf-8"))
        assert after == [0, 1] and refused.startswith("data.jsonl: the ranks read different data")


ERRORS_SCRIPT = '''
import argparse, json, os, sys
import common
import parallel

def main():
    rank, _, _ = parallel.dist_setup()
    seen = []

    def fail(on, error):
        def work():
            if common.rank() == on:
                raise error
        return work
    for call, work in ((parallel.on_every_rank, fail(1, common.UserError("disk full on rank 1"))),
                       (parallel.on_every_rank, fail(1, RuntimeError("odd"))),
                       (parallel.on_rank0, fail(0, ValueError("wandb down"))),
                       (parallel.on_rank0, lambda: {1, 2}),  # a result JSON cannot hold (failed in the gather)
                       (parallel.on_every_rank, fail(1, KeyboardInterrupt()))):
        try:
            call(work)
            seen.append(None)
        except BaseException as e:
            seen.append([type(e).__name__, str(e)])
    for settings in (argparse.Namespace(seed=1, lr=0.1), argparse.Namespace(seed=1 + rank, lr=0.1)):
        try:
            parallel.same_settings(settings)
            seen.append(None)
        except Exception as e:
            seen.append([type(e).__name__, str(e)])
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    parallel.dist_cleanup()

common.run_main(main)
'''


@pytest.mark.torchrun
def test_an_error_on_one_rank_stops_every_rank_with_its_line(tmp_path):
    """on_every_rank (each rank's own checkpoint shard) and on_rank0 (what rank 0 alone writes or decides): an error
    on one rank reached the others only as a hang in their next collective (or a backend's traceback); now every rank
    raises it: where it happened as it is, elsewhere as a UserError naming it. Settings that differ between ranks
    (dist_setup's check) stop both too."""
    proc = two_ranks(tmp_path, "errors.py", ERRORS_SCRIPT, tmp_path, timeout=60)  # (a hang: it fails)
    assert proc.returncode == 0, proc.stderr[-3000:]
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text(encoding="utf-8")) for r in (0, 1))
    assert zero[0] == one[0] == ["UserError", "disk full on rank 1"]
    assert zero[1] == ["UserError", "rank 1 stopped: RuntimeError: odd"] and one[1] == ["RuntimeError", "odd"]
    assert zero[2] == ["ValueError", "wandb down"] and one[2] == ["UserError", "rank 0 stopped: ValueError: wandb down"]
    # (each a gloo "Connection closed by peer" on the other rank before)
    assert zero[3] == ["TypeError", "Object of type set is not JSON serializable"]
    assert one[3] == ["UserError", "rank 0 stopped: TypeError: Object of type set is not JSON serializable"]
    assert zero[4] == ["UserError", "rank 1 stopped: KeyboardInterrupt: "] and one[4] == ["KeyboardInterrupt", ""]
    # settings: the same on both ranks pass; another seed on rank 1 (a node's own command line) stops both
    assert zero[5] is None and one[5] is None
    assert zero[6] == one[6] == ["UserError", "the ranks were given different settings: --seed 1 on rank 0, 2 on "
                                              "rank 1 (a multi-node launch whose nodes' command lines or --config "
                                              "files differ?)"]


FSDP_RANK_SCRIPT = THREADS + '''
import atexit, json, os, sys
import torch
import common
import parallel
from model import load_model

def main():
    rank, world, device = parallel.dist_setup()
    model = parallel.shard_model(load_model(sys.argv[1]), torch.float32)
    parallel.idle_pass(model)
    del model
    parallel.dist_cleanup()
    with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as f:
        json.dump(threads(), f)
    atexit.register(lambda: open(os.path.join(sys.argv[2], f"finalized{rank}"), "w").close())
    print(f"<flushed {rank}>", end="")  # no newline: only an explicit flush shows it
    return 3 if rank == 1 else 0

common.run_main(main)
'''


@pytest.mark.torchrun
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names are read from /proc (Linux)")
def test_a_torchrun_worker_ends_without_finalizing_while_gloo_threads_live(tiny_checkpoint, tmp_path):
    """Once a model was FSDP-sharded, torch holds the process group beyond dist_cleanup: gloo's threads outlive it
    (the check sees them), and a normal interpreter shutdown with them alive can end in SIGABRT ("terminate called
    without an active exception", a finished 2-rank run reported as failed). So run_main ends a torchrun worker
    with os._exit: its output flushed, its exit code kept, no finalization (the atexit handler never runs)."""
    proc = two_ranks(tmp_path, "fsdp_rank_script.py", FSDP_RANK_SCRIPT, tiny_checkpoint, tmp_path,
                     launcher=("--tee", "3"))
    assert proc.returncode != 0 and "exitcode  : 3" in proc.stderr, proc.stderr[-3000:]  # rank 1's own code
    assert "<flushed 0>" in proc.stdout and "<flushed 1>" in proc.stdout, proc.stdout
    for rank in (0, 1):
        assert "pt_gloo_runloop" in json.loads((tmp_path / f"rank{rank}.json").read_text(encoding="utf-8"))  # why: they outlive it
    assert not list(tmp_path.glob("finalized*"))


COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "reduce", "gather", "scatter",
               "all_to_all", "all_to_all_single", "barrier", "send", "recv", "isend", "irecv"}


def test_no_script_calls_a_torch_distributed_collective_itself():
    """NCCL takes only GPU tensors: a collective called on a CPU tensor crashes on the GPU box and nowhere else.
    parallel.py's helpers move each tensor to the process group's device, so every script must use them."""
    from conftest import ROOT
    offenders = []
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py"))):
        if os.path.basename(path) == "parallel.py":
            continue
        tree = ast.parse(open(path).read(), path)
        dist_names = {"torch.distributed"}  # names bound to torch.distributed in this file
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                dist_names |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
            if isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
                offenders += [f"{os.path.basename(path)}:{node.lineno}: from torch.distributed import {a.name}"
                              for a in node.names if a.name in COLLECTIVES]
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and ast.unparse(node.value) in dist_names:
                offenders.append(f"{os.path.basename(path)}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, "call parallel.all_reduce / all_gather_json / barrier instead:\n" + "\n".join(offenders)


def test_the_collective_check_catches_a_direct_call(tmp_path, monkeypatch):
    import conftest
    (tmp_path / "bad_stage.py").write_text("import torch.distributed as dist\ndist.all_reduce(x)\n")
    monkeypatch.setattr(conftest, "ROOT", str(tmp_path))
    with pytest.raises(AssertionError, match="bad_stage.py:2: dist.all_reduce"):
        test_no_script_calls_a_torch_distributed_collective_itself()


def test_collectives_run_on_the_process_groups_device(monkeypatch):
    """Under NCCL the group device is the current GPU; all_reduce hands dist.all_reduce a tensor there and gives
    the result back on the caller's device."""
    import torch
    import torch.distributed as dist
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert parallel.group_device() == torch.device("cuda", 3)
    seen = []
    monkeypatch.setattr(parallel, "group_device", lambda: torch.device("meta"))  # a device that is not the CPU
    monkeypatch.setattr(parallel, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: seen.append((t.device, op)))
    monkeypatch.setattr(torch.Tensor, "to",
                        lambda self, *a, **k: torch.empty_like(self, device=a[0] if a else k["device"])
                        if (a and isinstance(a[0], torch.device)) or "device" in k else self)
    out = parallel.all_reduce(torch.ones(3), "max")
    assert seen == [(torch.device("meta"), dist.ReduceOp.MAX)] and out.device == torch.device("cpu")


def test_process_group_setup_on_a_gpu_box(monkeypatch):
    """Under torchrun on a GPU box each rank takes its LOCAL_RANK's GPU and the group waits COLLECTIVE_TIMEOUT (not
    NCCL's 10 minutes) in a collective; without LOCAL_RANK every rank would take GPU 0, so that is refused."""
    import torch
    import torch.distributed as dist
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    monkeypatch.setenv("RANK", "13")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(common.UserError, match="LOCAL_RANK"):
        parallel.dist_setup()
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert parallel.dist_setup() == (13, 16, torch.device("cuda", 5))
    assert calls == [("set_device", 5), ("nccl", {"timeout": parallel.COLLECTIVE_TIMEOUT,
                                                  "device_id": torch.device("cuda", 5)})]


def test_a_worker_whose_torchrun_is_gone_stops_before_joining_a_rendezvous(monkeypatch):
    """A SIGKILLed torchrun leaves its workers running (sessions of their own): one that had not yet joined the
    process group waited for it up to COLLECTIVE_TIMEOUT and joined a re-run's torchrun on the same port in the place
    of that run's own workers. A torchrun worker (TORCHELASTIC_RUN_ID) with no torchrun above it refuses; a worker of
    a launcher that sets RANK itself (a cluster operator, srun: its parent may be init or a shell) is not judged."""
    import torch.distributed as dist
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)  # (an earlier test's main may have left a group)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(backend))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run")
    monkeypatch.setattr(parallel, "under_torchrun", lambda: False)
    with pytest.raises(common.UserError, match="the torchrun that started this worker is gone"):
        parallel.dist_setup()
    assert calls == []
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert parallel.dist_setup()[:2] == (0, 2) and calls == ["gloo"]
    monkeypatch.undo()
    assert parallel.under_torchrun() is False  # (pytest runs under no launcher)


def test_a_worker_waiting_for_its_group_stops_when_its_launcher_dies(tmp_path):
    """A worker waiting in init_process_group (rank 0 of 2: the second never comes) whose launcher is killed stops
    within a second or so, saying why, instead of waiting COLLECTIVE_TIMEOUT for a rendezvous that is gone."""
    if not os.path.isdir("/proc"):
        pytest.skip("needs /proc to follow the orphan")
    import socket
    import time
    port, err, torchrun = free_port(), tmp_path / "worker.err", tmp_path / "torchrun"  # (a launcher named so)
    env = dict(subprocess_env(), RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), TORCHELASTIC_RUN_ID="run")
    torchrun.write_text(f"""if True:
        import subprocess, sys, time
        worker = subprocess.Popen([sys.executable, "-c", "import parallel; parallel.dist_setup()"],
                                  stderr=open({str(err)!r}, "w"), start_new_session=True)
        print(worker.pid, flush=True)
        time.sleep(600)""")
    launcher = subprocess.Popen([sys.executable, str(torchrun)], env=env, stdout=subprocess.PIPE, text=True)
    worker = int(launcher.stdout.readline())
    try:
        t0 = time.time()
        while time.time() - t0 < 60:  # rank 0 listens on the port once it waits for rank 1
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        else:
            pytest.fail("the worker never listened")
        launcher.kill()
        launcher.wait()
        t0 = time.time()
        while running(worker) and time.time() - t0 < 30:
            time.sleep(0.1)
        assert not running(worker), "the orphan still waits"
        assert "the torchrun that started this worker is gone (killed?): stopping" in err.read_text()
    finally:
        if running(worker):
            os.kill(worker, 9)
        launcher.kill()


def running(pid):
    """Whether process pid runs (a zombie that init has not reaped yet has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_micro_batches_respect_the_token_budget():
    lengths = [5, 9, 3, 12, 7, 1, 30]
    mbs = parallel.micro_batches(lengths, budget=12)
    assert sorted(i for mb in mbs for i in mb) == list(range(7))
    assert all(sum(lengths[i] for i in mb) <= 12 or len(mb) == 1 for mb in mbs)


# -----------------------------------------------------------------------------
# prepare_training: the recompute and compile settings every training script shares


def recompute_args(**kw):
    p = common.new_parser("test")
    p.add_argument("--gradient_checkpointing", type=common.str2bool, default=True)
    parallel.add_recompute_args(p)
    return common.parse_settings(p, [f"--{k}={v}" for k, v in kw.items()])


def test_prepare_training_sets_the_recompute_and_rejects_what_cannot_work(capsys):
    cfg = model_module.tiny_config(64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    m = parallel.prepare_training(model_module.build_model(cfg), torch.float32,
                                  recompute_args(checkpoint_every=2, checkpoint_keep="matmuls"))
    assert (m.gradient_checkpointing, m.checkpoint_every, m.checkpoint_keep) == (True, 2, "matmuls")
    assert "packed attention: one SDPA call per sequence, float32; recompute every 2 block(s), keeping matmuls" \
        in capsys.readouterr().out
    with pytest.raises(common.UserError, match="--checkpoint_every must be at least 1"):
        parallel.prepare_training(model_module.build_model(cfg), torch.float32, recompute_args(checkpoint_every=0))
    unresolved = recompute_args()
    unresolved.checkpoint_every = "auto"  # the scripts resolve it first (gpu_memory.resolve_recompute)
    with pytest.raises(ValueError, match="resolved by the script first"):
        parallel.prepare_training(model_module.build_model(cfg), torch.float32, unresolved)
    with pytest.raises(common.UserError, match="--checkpoint_keep"):
        parallel.prepare_training(model_module.build_model(cfg), torch.float32,
                                  recompute_args(compile="true", checkpoint_keep="attention"))
    with pytest.raises(SystemExit):  # argparse's choices
        recompute_args(checkpoint_keep="everything")


@pytest.mark.slow  # torch.compile on CPU: ~30 s
def test_compiled_blocks_give_the_eager_gradients_under_the_same_names():
    """--compile true: each block's forward compiled (dynamic shapes, the attention eager between compiled parts);
    two packings of different lengths give the eager loss and gradients, and parameter names stay the checkpoint's."""
    cfg = model_module.tiny_config(64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    eager = parallel.prepare_training(model_module.build_model(cfg, seed=1), torch.float32, recompute_args())
    compiled = parallel.prepare_training(model_module.build_model(cfg, seed=1), torch.float32,
                                         recompute_args(compile="true"))
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    for seqs in ([[1, 2, 3, 4, 5], [6, 7, 8]], [[9, 10], [11, 12, 13, 14, 15, 16, 17], [18, 19, 20, 21]]):
        ids, cu = model_module.pack(seqs)
        out = []
        for m in (eager, compiled):
            m.zero_grad()
            loss = m.token_logprobs(m(ids, cu_seqlens=cu)[0, :-1], ids[0, 1:]).sum()
            loss.backward()
            out.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
        assert abs(float(out[0][0] - out[1][0])) <= 1e-5
        for a, b in zip(out[0][1], out[1][1]):
            assert (a - b).abs().max() <= 1e-5


def test_rank_share_is_strided_and_idle_pass_adds_no_gradient():
    """rank_share deals the items out in turn (every world-th from the rank's own): disjoint and covering all, the
    shares differing in length by at most one (7 prompts cut into contiguous parts of 7 // 2 would drop the last).
    idle_pass, the forward and backward a rank runs when it is out of micro-batches, must leave every gradient as it
    was (zero): it only joins the others' collectives."""
    assert [parallel.rank_share(list(range(7)), r, 2) for r in (0, 1)] == [[0, 2, 4, 6], [1, 3, 5]]
    assert [parallel.rank_share(list(range(7)), r, 3) for r in (0, 1, 2)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert parallel.gather_lists([3, 1, 2], key=lambda x: -x) == [3, 2, 1]  # (one process: the key still sorts)
    cfg = model_module.tiny_config(64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    m = model_module.build_model(cfg, seed=0)
    parallel.idle_pass(m)
    grads = [p.grad for p in m.parameters()]
    assert any(g is not None for g in grads)  # the backward ran ...
    assert all(g is None or not g.any() for g in grads)  # ... and added nothing


def test_micro_batches_and_epoch_order_by_hand():
    """Longest first (ties in index order), next fit, a batch that fills the budget exactly stays one; the data order
    of a (seed, epoch) is pinned, so a change of it (which changes every run's data order) shows."""
    assert parallel.micro_batches([5, 5, 3], 10, range(3)) == [[0, 1], [2]]
    assert parallel.micro_batches([6, 4], 10, range(2)) == [[0, 1]]
    assert parallel.epoch_order(5, 1, 2) == [4, 1, 0, 3, 2]
