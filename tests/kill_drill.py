"""The kill -9 drill: a run killed with SIGKILL at a random moment (mid-step, mid-checkpoint-save, mid-metrics-append)
and then resumed with --resume true must end with final weights byte-identical to an uninterrupted run's.

Three kinds of drill, each on tiny fixtures built here (a 0.1M-parameter model warm-started on toy_task.py):
  rl1  train_rl.py on 1 rank (plain python), checkpointing every step
  rl2  train_rl.py under torchrun with 2 ranks; ONE worker (a child of torchrun) is killed, torchrun then stops
       the other; the resume runs under torchrun with 2 ranks again
  sft  redistill_sft.py on 1 rank, checkpointing every step

For each kind the uninterrupted reference runs once and is timed. Each kill aims at a random point (seeded) of the
run's steps: the start-up takes seconds and varies by seconds between runs, a step only 0.05-0.5 s, so the drill
follows the killed run's own progress (its metrics lines) and waits a random part of a reference step from there.
Kills land throughout the steps and their checkpoint saves, a few in the start-up and in the shut-down. Each kill:
start the run, wait, SIGKILL, note what was on disk, resume to the end, then compare with the reference: the final
weights tensor by tensor (torch.equal), the last checkpoint's state and per-rank optimizer shards, the RL rollout
logs, and metrics.jsonl (each step exactly once, in order, with the reference's values). A kill that comes after
the run has exited is "missed" (not a pass) and is retried at an earlier point.

    python tests/kill_drill.py --kills rl1=8,rl2=6,sft=6 --seed 0 [--work DIR]

prints one line per kill and a summary, and exits 1 if any kill FAILs. tests/test_kill_drill.py runs the CI-sized
version through drill(kind, kills, seed, work_dir).
"""
import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file

# conftest first: it puts the repo root on sys.path (when run as a script)
from conftest import ROOT, free_port, make_tiny_checkpoint, subprocess_env
import common
import ckpt
import toy_task
from tasks import load_tokenizer
from test_redistill_sft import run_args, write_sft
from test_train_rl import noisy_sft, rl_args

KINDS = ("rl1", "rl2", "sft")
RANKS = {"rl1": 1, "rl2": 2, "sft": 1}
# Tiny runs: a kill + resume takes a few seconds, most of it process start-up. 8 prompts x 8 samples from the warm
# start leave about half the groups with mixed rewards (non-zero advantages), so every step moves the weights.
RL_STEPS = 6
RL_SETTINGS = dict(prompts_per_step=8, samples_per_prompt=8, max_response_tokens=16, max_steps=RL_STEPS, save_every=1)
SFT_STEPS = 10  # 40 examples, global batch 8 (run_args), 2 epochs
# metrics that must equal the reference's (the rest are timings)
SAME_METRICS = {"rl": ("epoch", "reward", "acc", "loss", "grad_norm", "lr", "entropy", "updates", "len_mean",
                       "train_seqs", "logprob_gap", "bad_steps"),
                "sft": ("epoch", "loss", "lr", "grad_norm", "tokens")}
# where in a run the kills land: uniform between these fractions of its steps (kill_after); below 0 in the
# start-up, before any checkpoint, above 1 in the shut-down after the last step
DEFAULT_WINDOW = (-0.1, 1.1)
TIMEOUT = 600


# -----------------------------------------------------------------------------
# fixtures


def make_fixtures(work, tiny=None):
    """The drills' inputs under work/: an RL start (the tiny model after a short noisy warm start, so rewards vary
    within groups), RL prompts and an SFT data file. tiny: an existing tiny checkpoint (tests pass conftest's)."""
    os.makedirs(work, exist_ok=True)
    if tiny is None:
        tiny = os.path.join(work, "tiny")
        make_tiny_checkpoint(tiny)
    init = os.path.join(work, "rl_init")
    shutil.copytree(tiny, init, dirs_exist_ok=True)
    noisy_sft(init, steps=60)  # 60 steps (~4 s): sampled reward ~0.1-0.2, not the all-zero of random weights
    fx = {"tiny": tiny, "init": init, "train": os.path.join(work, "rl_train.jsonl"),
          "test": os.path.join(work, "rl_test.jsonl"), "sft_data": os.path.join(work, "sft.jsonl")}
    common.write_jsonl(fx["train"], toy_task.make_records(400, seed=1, split="train", max_value=4))
    common.write_jsonl(fx["test"], toy_task.make_records(8, seed=2, split="test", max_value=4))  # never validated
    write_sft(fx["sft_data"], toy_task.make_records(40, seed=3), load_tokenizer(tiny))
    return fx


# -----------------------------------------------------------------------------
# the runs


def final_step(kind):
    return SFT_STEPS if kind == "sft" else RL_STEPS


def command(kind, fx, out, resume):
    resumed = ["--resume", "true"] if resume else []
    if kind == "sft":
        return [sys.executable, os.path.join(ROOT, "redistill_sft.py"),
                *run_args(fx["tiny"], fx["sft_data"], out, "--save_every", "1", *resumed)]
    args = rl_args(fx, out, **RL_SETTINGS) + resumed
    if kind == "rl1":
        return [sys.executable, os.path.join(ROOT, "train_rl.py"), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
            os.path.join(ROOT, "train_rl.py"), *args]


def start(kind, fx, out, resume=False):
    """The run as a subprocess, its output in out + '.log' (or '.resume.log')."""
    t0 = time.time()
    with open(out + (".resume.log" if resume else ".log"), "w") as log:  # the child holds its own copy
        proc = subprocess.Popen(command(kind, fx, out, resume), stdout=log, stderr=subprocess.STDOUT,
                                env=subprocess_env(), cwd=os.path.dirname(out), start_new_session=True)
    proc.t0 = t0
    return proc


def workers(torchrun_pid):
    """{pid: rank} of torchrun's worker processes: its children that carry a RANK variable."""
    found = {}
    try:
        tasks = os.listdir(f"/proc/{torchrun_pid}/task")
    except OSError:  # torchrun has exited
        return found
    for task in tasks:
        try:
            with open(f"/proc/{torchrun_pid}/task/{task}/children") as f:
                children = [int(p) for p in f.read().split()]
        except OSError:
            continue
        for pid in children:
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = dict(x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x)
            except OSError:
                continue
            if b"RANK" in env:
                found[pid] = int(env[b"RANK"])
    return found


def stop(proc):
    """Cleanup after an error or a timeout: SIGKILL the run's process and, under torchrun, its workers (each in a
    session of its own, so not reached through the process group)."""
    if proc.poll() is None:
        for pid in workers(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.kill()
    proc.wait()


def wait(proc, timeout=TIMEOUT):
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise RuntimeError(f"run {proc.args} still going after {timeout} s")


def logged_steps(out):
    """Lines in out/metrics.jsonl so far: one per finished step (no validation in the drills)."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return f.read().count("\n")


def reference(kind, fx, work):
    """The uninterrupted run, timed: seconds from its start to its training phase (settings.json written once the
    model is loaded) and to its exit, and the median time between two metrics lines (one step)."""
    out = os.path.join(work, "reference")
    shutil.rmtree(out, ignore_errors=True)
    proc = start(kind, fx, out)
    t_train, lines = None, []
    while proc.poll() is None and time.time() - proc.t0 < TIMEOUT:
        now = time.time() - proc.t0
        if t_train is None and os.path.exists(os.path.join(out, "settings.json")):
            t_train = now
        lines += [now] * (logged_steps(out) - len(lines))
        time.sleep(0.002)
    if wait(proc) != 0 or t_train is None or len(lines) != final_step(kind):
        raise RuntimeError(f"{kind}: the reference run failed; see {out}.log")
    gaps = sorted(b - a for a, b in zip([t_train] + lines, lines))
    return {"dir": out, "t_train": t_train, "t_end": time.time() - proc.t0, "step_s": gaps[len(gaps) // 2]}


def kill_after(kind, proc, out, at, ref, rng):
    """SIGKILL the run `at` steps into its training: once int(at) metrics lines are written, (at - int(at)) of a
    reference step later. Progress, not the clock from the start, decides: start-up takes seconds and varies by
    seconds between runs (more when the machine is shared), a step takes 0.05-0.5 s. at < 0: in the start-up,
    -at steps before the reference's training start, or when training starts, whichever comes first. Under torchrun
    the signal goes to one of its workers, chosen at random. Waits for the run to end. Returns (the killed rank, or
    None when the run had finished first: a miss; seconds from the start)."""
    started = os.path.join(out, "settings.json")
    steps = 0 if at < 0 else min(int(at), final_step(kind))
    while proc.poll() is None:
        if at < 0 and (os.path.exists(started) or time.time() - proc.t0 >= ref["t_train"] + at * ref["step_s"]):
            break
        if at >= 0 and logged_steps(out) >= steps and (steps or os.path.exists(started)):
            time.sleep((at - steps) * ref["step_s"])
            break
        time.sleep(0.002)
    target, rank = proc.pid, 0
    if kind == "rl2":
        ranks = {}
        while proc.poll() is None and len(ranks) < 2:  # inside torchrun's own start-up: wait for both workers
            ranks = workers(proc.pid)
            time.sleep(0.002)
        if ranks:
            rank = rng.choice(sorted(ranks.values()))
            target = next(pid for pid, r in ranks.items() if r == rank)
    delay = time.time() - proc.t0
    if proc.poll() is None:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # exit code 0: the run (every rank) had finished before the signal; a killed one ends with -9 or, under
    # torchrun, with torchrun's failure code
    return (None if wait(proc) == 0 else rank), delay


def snapshot(out, kind):
    """What was on disk after the kill (under torchrun: once the surviving rank was stopped too): the steps in
    metrics.jsonl, the resumable checkpoints, weights without a state file yet and half-written files (atomic
    writes' temporaries), with a one-phrase guess of the moment."""
    names = sorted(os.listdir(out)) if os.path.isdir(out) else []
    logged = []
    if "metrics.jsonl" in names:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            for line in f:
                try:
                    logged.append(json.loads(line).get("step"))
                except ValueError:  # a last line the kill cut short (the resume drops it, with a warning)
                    logged.append("partial line")
    ckpts = ckpt.checkpoint_steps(out)
    newest = ckpts[-1] if ckpts else 0
    partial = [n for n in names if n.startswith(".tmp") or re.search(r"\.(tmp|old)\d+$", n)]
    unsaved = [int(n[5:]) for n in names if re.fullmatch(r"step_\d{6}", n) and int(n[5:]) > newest]
    last = max((s for s in logged if isinstance(s, int)), default=0)
    if "settings.json" not in names:
        phase = "start-up (before training)"
    elif partial:
        phase = "mid-save, writing " + ", ".join(partial)
    elif unsaved:
        phase = f"mid-save, step {unsaved[-1]}'s weights written, its state not"
    elif newest > last:  # both scripts log a step before they save it: this would lose the line at the resume
        phase = f"after step {newest}'s checkpoint, before its metrics line"
    elif last >= final_step(kind) and newest >= final_step(kind):
        phase = "after the last step (shut-down)"
    elif last > newest:
        phase = f"after step {last}'s metrics line, before its checkpoint"
    else:
        phase = f"in step {last + 1}"
    return {"metrics_steps": logged, "checkpoints": ckpts, "newest": newest, "partial": partial, "phase": phase}


# -----------------------------------------------------------------------------
# the comparison


def differences(a, b, where):
    """Where two loaded checkpoint objects (dicts, lists, tensors, numbers, strings) differ; tensors must be equal
    in dtype, shape and every bit."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [f"{where}: tensors differ"]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys differ ({sorted(map(str, a.keys() ^ b.keys()))})"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)} and {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def load_state(path):
    """A checkpoint's state file, less the settings that name the run rather than decide it (--out_dir, --resume) and
    the digests of the code that ran (a file edited while the drill runs is no difference of the run's)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for k in ("out_dir", "resume"):
        state.get("settings", {}).pop(k, None)
    state.pop("code", None)
    return state


def compare(kind, ref, out):
    """Everything in `out` that differs from the reference run `ref`, as one line each (empty: identical)."""
    problems, step = [], final_step(kind)
    weights = os.path.join("final" if kind == "sft" else os.path.basename(ckpt.checkpoint_dir(out, step)),
                           "model.safetensors")
    if not os.path.isfile(os.path.join(out, weights)):
        return [f"{weights} missing"]
    a, b = load_file(os.path.join(ref, weights)), load_file(os.path.join(out, weights))
    problems += differences(a, b, weights)
    if ckpt.checkpoint_steps(out) != ckpt.checkpoint_steps(ref):
        problems.append(f"resumable checkpoints {ckpt.checkpoint_steps(out)}, the reference's "
                        f"{ckpt.checkpoint_steps(ref)}")
    elif step in ckpt.checkpoint_steps(ref):
        state = ckpt.checkpoint_dir(out, step) + ".state.pt"
        problems += differences(load_state(ckpt.checkpoint_dir(ref, step) + ".state.pt"), load_state(state),
                                os.path.basename(state))
        for r in range(RANKS[kind]):  # the fp32 master weights and the optimizer state, rank by rank
            shard = ckpt.train_shard_path(out, step, r)
            problems += differences(torch.load(ckpt.train_shard_path(ref, step, r), weights_only=True),
                                    torch.load(shard, weights_only=True), os.path.basename(shard))
    if kind != "sft":  # the same prompts and sampled responses in every step, before and after the kill
        for s in range(1, step + 1):
            name = os.path.join("rollouts", f"step_{s:06d}.jsonl")
            if not os.path.isfile(os.path.join(out, name)):
                problems.append(f"{name} missing")
            elif common.read_jsonl(os.path.join(out, name)) != common.read_jsonl(os.path.join(ref, name)):
                problems.append(f"{name} differs")
    ma, mb = (common.read_jsonl(os.path.join(d, "metrics.jsonl")) for d in (ref, out))
    steps = [m.get("step") for m in mb]
    if steps != list(range(1, step + 1)):
        problems.append(f"metrics.jsonl steps {steps}, not each of 1..{step} once in order")
    else:
        keys = SAME_METRICS["sft" if kind == "sft" else "rl"]
        changed = [f"{m['step']}:{k}" for m, n in zip(ma, mb) for k in keys if m.get(k) != n.get(k)]
        if changed:
            problems.append(f"metrics.jsonl values differ from the reference's at {changed[:6]}")
    return problems


# -----------------------------------------------------------------------------
# the drill


def one_kill(kind, fx, ref, out, at, low, rng, retries=6):
    """Start, kill `at` steps into training (kill_after), resume, compare. A miss (the run had ended) is retried
    earlier, at a point drawn between `low` and the missed one."""
    missed = 0
    while True:
        shutil.rmtree(out, ignore_errors=True)
        proc = start(kind, fx, out)
        try:
            rank, delay = kill_after(kind, proc, out, at, ref, rng)
        except BaseException:
            stop(proc)
            raise
        if rank is not None:
            break
        missed += 1
        if missed > retries:
            return {"dir": out, "reference": ref["dir"], "aim": at, "delay": delay, "missed": missed,
                    "rank": None, "at": None, "leftovers": [], "resumed_from": None, "status": "MISSED",
                    "problems": ["every kill came after the run's end"]}
        at = rng.uniform(low, at)
    seen = snapshot(out, kind)
    proc = start(kind, fx, out, resume=True)
    rc = wait(proc)
    with open(out + ".resume.log") as f:
        found = re.search(r"resuming from \S+ \(step (\d+)|already finished \((\d+)/", f.read())
    problems = compare(kind, ref["dir"], out) if rc == 0 else [f"the resume failed (exit {rc}); see {out}.resume.log"]
    # not a failure, but worth knowing: files the kill left that the resumed run never cleaned up
    leftovers = sorted(set(os.listdir(out)) - set(os.listdir(ref["dir"])))
    return {"dir": out, "reference": ref["dir"], "aim": at, "delay": delay, "missed": missed,
            "rank": rank if kind == "rl2" else None, "at": seen, "leftovers": leftovers,
            "resumed_from": int(found.group(1) or found.group(2)) if found else None, "problems": problems,
            "status": "pass" if not problems else "FAIL"}


_references = {}  # (kind, work_dir) -> the reference run: run once per kind and work dir


def drill(kind, kills, seed, work_dir, fixtures=None, window=DEFAULT_WINDOW, report=print):
    """`kills` kills of kind (rl1, rl2, sft) under work_dir/kind, each with its result dict; the moments drawn from
    random.Random(f'{seed}:{kind}') within `window`, in fractions of the run's steps (kill_after)."""
    assert kind in KINDS, kind
    fx = fixtures or make_fixtures(os.path.join(work_dir, "fixtures"))
    work = os.path.join(work_dir, kind)
    os.makedirs(work, exist_ok=True)
    if (kind, work) not in _references:
        _references[kind, work] = reference(kind, fx, work)
    ref = _references[kind, work]
    rng = random.Random(f"{seed}:{kind}")
    results = []
    steps = final_step(kind)
    for i in range(1, kills + 1):
        r = one_kill(kind, fx, ref, os.path.join(work, f"kill_{i:02d}"), rng.uniform(*window) * steps,
                     window[0] * steps, rng)
        r.update(kind=kind, index=i)
        results.append(r)
        if report:
            report(describe(r, kills, ref))
    return results


def describe(r, kills, ref):
    line = (f"{r['kind']} kill {r['index']}/{kills}: aimed {r['aim']:+.2f} of {final_step(r['kind'])} steps "
            f"(~{ref['step_s']:.2f} s each) into training, {r['delay']:.2f} s after the start")
    if r["missed"]:
        line += f" ({r['missed']} missed before)"
    if r["status"] == "MISSED":
        return line + " | MISSED: " + "; ".join(r["problems"])
    at = r["at"]
    logged = [s for s in at["metrics_steps"] if isinstance(s, int)]
    if r["rank"] is not None:
        line += f", worker of rank {r['rank']}"
    resumed = "scratch" if r["resumed_from"] is None else f"step {r['resumed_from']}"
    line += (f" | killed {at['phase']}; metrics to step {max(logged, default=0)}, checkpoints {at['checkpoints']} "
             f"| resumed from {resumed} | {r['status']}")
    if r["leftovers"]:
        line += f" (left behind: {', '.join(r['leftovers'])})"
    return line + ("".join(f"\n    {p}" for p in r["problems"]) if r["problems"] else "")


def parse_kills(text):
    kills = {}
    for part in text.split(","):
        kind, _, n = part.partition("=")
        if kind.strip() not in KINDS or not n.strip().isdigit():
            raise SystemExit(f"--kills: expected e.g. rl1=8,rl2=6,sft=6 (kinds {', '.join(KINDS)}), got {part!r}")
        kills[kind.strip()] = int(n)
    return kills


def main(argv=None):
    p = argparse.ArgumentParser(description="SIGKILL runs at random moments, resume them, demand byte-identical ends")
    p.add_argument("--kills", default="rl1=8,rl2=6,sft=6", help="kills per kind (rl1, rl2, sft)")
    p.add_argument("--seed", type=int, default=0, help="seeds the kill moments (and, for rl2, the rank killed)")
    p.add_argument("--work", default=None, help="work directory, kept afterwards (default: a temporary one, removed "
                   "unless a kill failed)")
    args = p.parse_args(argv)
    kills = parse_kills(args.kills)
    torch.set_num_threads(1)  # the in-process warm start; the runs themselves get OMP_NUM_THREADS=1
    work = args.work or tempfile.mkdtemp(prefix="kill_drill_")
    t0 = time.time()
    fx = make_fixtures(os.path.join(work, "fixtures"))
    results = []
    for kind, n in kills.items():
        results += drill(kind, n, args.seed, work, fixtures=fx)
    print(f"\nsummary ({time.time() - t0:.0f} s, seed {args.seed}, work {work}):")
    for kind in kills:
        rs = [r for r in results if r["kind"] == kind]
        print(f"  {kind}: {len(rs)} kills, {sum(r['status'] == 'pass' for r in rs)} pass, "
              f"{sum(r['status'] == 'FAIL' for r in rs)} FAIL, "
              f"{sum(r['status'] == 'MISSED' for r in rs)} never landed, "
              f"{sum(r['missed'] for r in rs)} missed and retried; "
              f"{sum(bool(r.get('leftovers')) for r in rs)} left files behind")
    ok = all(r["status"] == "pass" for r in results)
    if not args.work and ok:
        shutil.rmtree(work, ignore_errors=True)
    print("all kills resumed byte-identical" if ok else f"FAILED: see the logs under {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
