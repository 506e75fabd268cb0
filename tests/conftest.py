"""Shared test helpers: the repo root on sys.path and the optional ../shared data folder."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


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


def shared_path(*parts):
    """Path inside ../shared (development data beside the checkout); skips the test when absent."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} not present (development data beside the checkout)")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny Qwen2-architecture model with its own BPE tokenizer, saved as a HF directory (random weights)."""
    import toy_task
    from model import save_model
    from tiny_base import build_model, build_tokenizer, tiny_config
    path = str(tmp_path_factory.mktemp("tiny") / "ckpt")
    recs = toy_task.make_records(300, seed=0)
    texts = [r["question"] + " " + toy_task.teacher_response(r) for r in recs] * 3
    tok = build_tokenizer(texts + [common_system_prompt()], vocab_size=400)
    model = build_model(tiny_config(len(tok), hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2), seed=0)
    save_model(model, path, tok)
    return path


def common_system_prompt():
    import common
    return common.SYSTEM_PROMPT
