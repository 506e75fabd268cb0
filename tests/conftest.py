"""Shared test helpers and fixtures: the repo root and tests/ on sys.path, the slow and torchrun marks (pytest.ini;
`python -m pytest -m "not slow"` is the quick loop), one torch thread, subprocess environments, the tiny checkpoint,
the optional ../shared data folder, the check of saved FSDP training shards and the RL loop's cheap runs."""
import contextlib
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection reads the marks
def pytest_collection_modifyitems(config, items):
    """Every test marked torchrun is also slow: a torchrun launch alone takes seconds (its workers import torch), so
    `-m "not slow"`, the quick loop, leaves them all out, while a plain `python -m pytest` (CI) runs them."""
    for item in items:
        if item.get_closest_marker("torchrun") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models run several times faster on one thread, and do not thrash on 2 shared CI cores."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def subprocess_env(*extra_paths):
    """Environment for a script run as a subprocess (torchrun too): the repo and tests/ importable, one thread,
    no torchrun variables inherited."""
    paths = [ROOT, TESTS, *map(str, extra_paths), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def lock_held_elsewhere(path, name=".lock"):
    """Another process holds run directory `path`'s lock (common.lock_run_dir, lock file `name`) while the block runs,
    as a second terminal's run would; a run in this process must then be refused."""
    child = subprocess.Popen([sys.executable, "-c", "import common, sys, time; common.lock_run_dir(sys.argv[1], "
                              "sys.argv[2]); print('held', flush=True); time.sleep(120)", path, name],
                             stdout=subprocess.PIPE, text=True, cwd=ROOT, env=subprocess_env())
    try:
        assert child.stdout.readline().strip() == "held"
        yield child.pid
    finally:
        child.kill()
        child.wait()


def end_of_process_locks():
    """What the OS does when a stopped run's process ends: its run-directory locks go (common.lock_run_dir). For a
    run stopped in this process and resumed in another (torchrun)."""
    import common
    while common._LOCKS:
        common._LOCKS.popitem()[1].close()


def stopped_in_the_prune_after(step):
    """A stand-in for ckpt.remove_checkpoint that raises KeyboardInterrupt once the checkpoint of `step` is written:
    a Ctrl-C inside the prune after that save."""
    import ckpt
    remove = ckpt.remove_checkpoint

    def stop(run_dir, old, weights=True):
        if os.path.exists(ckpt.checkpoint_dir(run_dir, step) + ".state.pt"):
            raise KeyboardInterrupt
        remove(run_dir, old, weights)
    return stop


def shared_path(*parts):
    """Path inside ../shared (development data beside the checkout); skips the test when absent."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} not present (development data beside the checkout)")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny Qwen2-architecture model with its own BPE tokenizer, saved as a HF directory (random weights)."""
    path = str(tmp_path_factory.mktemp("tiny") / "ckpt")
    make_tiny_checkpoint(path)
    return path


def make_tiny_checkpoint(path):
    """The tiny_checkpoint fixture's model, written to path (for scripts, which cannot call a fixture)."""
    import tasks
    import toy_task
    from model import save_model
    from model import build_model, tiny_config
    from tiny_base import build_tokenizer
    recs = toy_task.make_records(300, seed=0)
    texts = [r["question"] + " " + toy_task.teacher_response(r) for r in recs] * 3
    tok = build_tokenizer(texts + [tasks.SYSTEM_PROMPT], vocab_size=400)
    model = build_model(tiny_config(len(tok), hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2), seed=0)
    save_model(model, path, tok)


def refuse_different_data(monkeypatch):
    """parallel.same_on_every_rank made to refuse, as it does on every rank when the ranks read different data (a file
    written again between two ranks' reads). Returns the list of the (value, what) it is called with."""
    import common
    import parallel
    seen = []

    def differ(value, what):
        seen.append((value, what))
        raise common.UserError(f"{what}: the ranks read different data")
    monkeypatch.setattr(parallel, "same_on_every_rank", differ)
    return seen


# the RL loop's cheap runs: RL_RECORDS toy records, RL_PROMPTS prompts x RL_N samples a step
RL_PROMPTS, RL_N, RL_RECORDS = 8, 2, 40


@pytest.fixture
def rl_run(tiny_checkpoint, tmp_path, monkeypatch):
    """train_rl.main on the tiny checkpoint and RL_RECORDS toy records (tmp_path / "train.jsonl"), one step, no warm
    start: run(name, fixed=True, **settings) -> (each step's metrics, {step: its rollout log}, the run directory).
    fixed: on tests/rl_fixed_rollouts.py's rollouts, which depend only on the prompt (else the real engine)."""
    import common
    import engine
    import tasks
    import toy_task
    import train_rl
    from rl_fixed_rollouts import fixed_rollouts
    train = str(tmp_path / "train.jsonl")
    common.write_jsonl(train, toy_task.make_records(RL_RECORDS, seed=1, split="train"))

    def run(name, fixed=True, **over):
        if fixed:
            monkeypatch.setattr(engine, "sample_responses", fixed_rollouts)
        s = {"model": tiny_checkpoint, "task": "toy_task", "train_data": train, "test_data": "",
             "out_dir": str(tmp_path / name), "prompts_per_step": RL_PROMPTS, "samples_per_prompt": RL_N,
             "max_response_tokens": 12, "lr": 3e-3, "warmup_steps": 0, "max_steps": 1, "save_every": 1,
             "progress": False} | over
        assert train_rl.main([x for k, v in s.items() for x in (f"--{k}", str(v))]) == 0
        out = s["out_dir"]
        metrics = [m for m in common.read_jsonl(os.path.join(out, "metrics.jsonl")) if m.get("step")]
        logs = {m["step"]: common.read_jsonl(tasks.rollout_log_path(out, m["step"])) for m in metrics
                if os.path.exists(tasks.rollout_log_path(out, m["step"]))}
        return metrics, logs, out
    return run


def assert_train_shards(run_dir, world):
    """Every tensor of every step_N.train.rankR.pt in run_dir, weights and AdamW state, is fp32 and has the shape of
    rank R's FSDP shard of that parameter (dim 0 cut as torch.chunk cuts it; the whole tensor at one rank): what
    resume reads back into the sharded fp32 master. Returns how many shard files it checked."""
    import glob
    import torch
    from safetensors.torch import load_file
    paths = sorted(glob.glob(os.path.join(glob.escape(str(run_dir)), "step_*.train.rank*.pt")))
    assert paths, f"no training shards in {run_dir}"
    for path in paths:
        step_dir, rank = path[:-len(".pt")].split(".train.rank")
        full = load_file(os.path.join(step_dir, "model.safetensors"))
        shard = torch.load(path, map_location="cpu", weights_only=True)
        names = list(shard["weights"])
        for name, t in shard["weights"].items():
            pieces = torch.chunk(torch.empty(full[name].shape[0]), world)
            rows = pieces[int(rank)].shape[0] if int(rank) < len(pieces) else 0
            assert t.dtype == torch.float32 and tuple(t.shape) == (rows, *full[name].shape[1:]), \
                f"{path}: {name} is {t.dtype} {tuple(t.shape)}, not rank {rank}'s fp32 shard of " \
                f"{tuple(full[name].shape)}"
        for i, state in shard["optimizer"]["state"].items():
            for key, v in state.items():
                if v.dim():
                    want = shard["weights"][names[i]].shape
                    assert v.dtype == torch.float32 and v.shape == want, (path, names[i], key)
    return len(paths)
