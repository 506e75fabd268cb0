"""common.py's torchrun setup and teardown: dist_cleanup frees the process group, so no backend thread is
left running while the interpreter finalizes (a gloo worker that still holds a Python-owned tensor then dies
in a destructor: "terminate called without an active exception", SIGABRT). And the collectives: every one
outside FSDP goes through common.py, on the process group's device."""
import ast
import glob
import json
import os
import subprocess
import sys

import pytest

import ckpt
import common
import parallel
import tasks
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
gathered = parallel.all_gather_json({"rank": rank})
during = threads()
parallel.dist_cleanup()
with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as f:
    json.dump({"gathered": gathered, "during": during, "after": threads()}, f)
'''


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names are read from /proc (Linux)")
def test_dist_cleanup_leaves_no_backend_thread(tiny_checkpoint, tmp_path):
    script = tmp_path / "rank_script.py"
    script.write_text(RANK_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                           str(free_port()), str(script), tiny_checkpoint, str(tmp_path)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.json") as f:
            got = json.load(f)
        assert got["gathered"] == [{"rank": 0}, {"rank": 1}]
        gloo = ("pt_gloo_runloop", "gloo_tcp_loop")
        assert all(name in got["during"] for name in gloo), got["during"]  # the check sees gloo's threads ...
        assert not any(name in got["after"] for name in gloo), got["after"]  # ... and after cleanup they are gone


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


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names are read from /proc (Linux)")
def test_a_torchrun_worker_ends_without_finalizing_while_gloo_threads_live(tiny_checkpoint, tmp_path):
    """Once a model was FSDP-sharded, torch holds the process group beyond dist_cleanup: gloo's threads outlive it
    (the check sees them), and a normal interpreter shutdown with them alive can end in SIGABRT ("terminate called
    without an active exception", a finished 2-rank run reported as failed). So run_main ends a torchrun worker
    with os._exit: its output flushed, its exit code kept, no finalization (the atexit handler never runs)."""
    script = tmp_path / "fsdp_rank_script.py"
    script.write_text(FSDP_RANK_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                           str(free_port()), "--tee", "3", str(script), tiny_checkpoint, str(tmp_path)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "exitcode  : 3" in proc.stderr, proc.stderr[-3000:]  # rank 1's own code
    assert "<flushed 0>" in proc.stdout and "<flushed 1>" in proc.stdout, proc.stdout
    for rank in (0, 1):
        assert "pt_gloo_runloop" in json.loads((tmp_path / f"rank{rank}.json").read_text())  # why: they outlive it
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
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: torch.empty_like(self, device=a[0] if a else k["device"])
                        if (a and isinstance(a[0], torch.device)) or "device" in k else self)
    out = parallel.all_reduce(torch.ones(3), "max")
    assert seen == [(torch.device("meta"), dist.ReduceOp.MAX)] and out.device == torch.device("cpu")


def test_stratified_subset_of_a_split_ordered_by_difficulty():
    """K&K's test split is ordered by people: the first N would all be the easiest. The subset keeps each level's
    share (largest remainders), is seeded, keeps the split's order, and says what it took."""
    import common
    records = [{"id": f"{people}-{i}", "people": people} for people, count in ((2, 50), (3, 30), (4, 20)) for i in range(count)]
    sub, desc = tasks.stratified_subset(records, 15, "people", seed=1)
    counts = {p: sum(r["people"] == p for r in sub) for p in (2, 3, 4)}
    assert counts == {2: 8, 3: 4, 4: 3}  # quotas 7.5 / 4.5 / 3: the one seat left goes to the first tied remainder
    assert sum(counts.values()) == 15 and desc.startswith("15 of 100, stratified by people (")
    assert all(f"{p}: {counts[p]}" in desc for p in counts)
    order = [records.index(r) for r in sub]
    assert order == sorted(order) and order != list(range(15))
    assert tasks.stratified_subset(records, 15, "people", seed=1)[0] == sub  # seeded
    assert tasks.stratified_subset(records, 15, "people", seed=2)[0] != sub
    exact, _ = tasks.stratified_subset(records, 10, "people", seed=0)  # 5 / 3 / 2 exactly
    assert [sum(r["people"] == p for r in exact) for p in (2, 3, 4)] == [5, 3, 2]
    assert tasks.stratified_subset(records, 0, "people")[0] == records
    assert tasks.stratified_subset(records, 500, "people") == (records, "all 100")


def llama3_style_tokenizer():
    """Built offline like Llama 3's: byte-level BPE, <|begin_of_text|> as BOS added by the tokenizer's own
    post-processor, a chat template that writes it too."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    tok.train_from_iterator(["Question: who is a knight? Answer: let's think step by step."] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")


def test_prompts_begin_with_bos_where_the_model_family_expects_one(tmp_path):
    import common
    from tiny_base import build_tokenizer
    llama = llama3_style_tokenizer()
    bos = llama.bos_token_id
    plain = "Question:\nwho is a knight?\nAnswer:\nLet's think step by step."
    ids = tasks.encode_prompts(llama, [plain, "<|begin_of_text|>" + plain])
    assert ids[0][0] == bos and ids[0][1:] == llama(plain, add_special_tokens=False)["input_ids"]
    assert ids[1] == ids[0]  # a chat template that writes BOS itself: not doubled
    qwen = build_tokenizer([plain] * 5, vocab_size=300)  # Qwen style: no BOS
    assert tasks.encode_prompts(qwen, [plain])[0] == qwen(plain, add_special_tokens=False)["input_ids"]
    # the SFT loader puts it before the prompt (and nowhere else)
    common.write_jsonl(str(tmp_path / "d.jsonl"), [{"id": "a", "prompt": plain, "response": " a knight"}])
    ex = tasks.load_sft_examples([str(tmp_path / "d.jsonl")], llama, 100)[0]
    assert ex["input_ids"][0] == bos and ex["input_ids"].count(bos) == 1
    assert ex["input_ids"][ex["start"] - 1] != bos  # the prompt's own tokens end the context


def test_settings_refuse_old_spellings_bare_booleans_and_prefixes():
    import argparse
    import common
    import train_rl
    with pytest.raises(common.UserError, match=r"^--group_size is now --samples_per_prompt$"):
        common.parse_settings(train_rl.get_parser(), ["--group_size", "4"])
    with pytest.raises(common.UserError, match=r"--eight_bit_adam is now --adam_8bit"):
        common.parse_settings(train_rl.get_parser(), ["--eight_bit_adam=true"])
    for argv in (["--resume"], ["--resume", "--seed", "3"]):
        with pytest.raises(common.UserError, match=r"--resume takes a value: --resume true or --resume false"):
            common.parse_settings(train_rl.get_parser(), argv)
    args = common.parse_settings(train_rl.get_parser(), ["--resume", "true", "--samples_per_prompt", "4"])
    assert args.resume is True and args.samples_per_prompt == 4
    assert common.parse_settings(train_rl.get_parser(), ["--resume=false"]).resume is False
    p = argparse.ArgumentParser(prog="t")
    p.add_argument("--kv_cache_gib", type=float, default=16.0)
    p.add_argument("--samples_per_prompt", type=int, default=8)
    with pytest.raises(common.UserError, match=r"--k is now --samples_per_prompt"):  # not a prefix of --kv_cache_gib
        common.parse_settings(p, ["--k", "2"])
    with pytest.raises(SystemExit):  # prefixes are not accepted
        common.parse_settings(p, ["--kv_cache", "2"])


SCRIPTS = ("bench", "eval", "kk_data", "lim_select", "math_data", "redistill_sft", "report", "sample_effect",
           "sample_policy", "tiny_base", "token_shift", "train_rl")


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_has_get_parser_and_main_argv_and_help_shows_defaults(name, tmp_path):
    """One settings convention: get_parser() builds a fresh parser on each call (a --config must not leak into the
    next main() of the same process: tests, notebooks), main takes argv, and --help shows every default."""
    import importlib
    import inspect
    module = importlib.import_module(name)
    assert list(inspect.signature(module.main).parameters) == ["argv"]
    parser = module.get_parser()
    assert parser is not module.get_parser()
    action = next(a for a in parser._actions if a.option_strings and a.dest != "help" and a.type in (int, str, None)
                  and a.default is not None and not a.choices and a.nargs is None)
    value = 7 if action.type is int else "from-config"
    (tmp_path / "cfg.json").write_text(json.dumps({action.dest: value}))
    assert getattr(common.parse_settings(module.get_parser(), ["--config", str(tmp_path / "cfg.json")]), action.dest) == value
    assert getattr(common.parse_settings(module.get_parser(), []), action.dest) == action.default
    assert f"(default: {action.default})" in " ".join(module.get_parser().format_help().split())


def test_a_torn_last_line_of_a_run_log_is_dropped_with_a_warning(tmp_path, capsys):
    """A kill or a full disk can cut a log's last append short: a run's own logs (torn_tail) drop that line with a
    warning; data files, a bad line elsewhere, or a bad last line that has its newline stay errors."""
    import common
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert common.read_jsonl(str(path), torn_tail=True) == [{"step": 1}, {"step": 2}]
    assert f"{path}:3: dropped a torn last line" in capsys.readouterr().out
    with pytest.raises(common.UserError, match=r"metrics.jsonl:3: not valid JSON"):
        common.read_jsonl(str(path))
    for text in ('{"step": 1}\n{"st\n{"step": 3}\n', '{"step": 1}\n{"step": 2, "lo\n'):  # mid-file; newline kept
        path.write_text(text)
        with pytest.raises(common.UserError, match=r"metrics.jsonl:2: not valid JSON"):
            common.read_jsonl(str(path), torn_tail=True)
    # a resumed run's metrics log: the torn line goes, the records up to the checkpoint stay
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    log = ckpt.metrics_log(str(tmp_path), start_step=2)
    log({"step": 3})
    assert common.read_jsonl(str(path)) == [{"step": 1}, {"step": 2}, {"step": 3}]


def test_checkpoints_and_full_copies_after_a_no_grad_forward_hold_the_fp32_master(tiny_checkpoint, tmp_path):
    """One rank with bf16 compute is FSDP-sharded (as on one GPU). FSDP2 leaves its root group (embeddings, final norm,
    lm_head) gathered in bf16 after a forward without backward; a checkpoint or an fp32 full copy taken then must
    still hold the fp32 master, and resume must restore it exactly."""
    import torch
    import common
    from conftest import assert_train_shards
    from model import load_model, load_tokenizer
    parallel.dist_setup()
    master = load_model(tiny_checkpoint).state_dict()
    model = parallel.shard_model(load_model(tiny_checkpoint), torch.bfloat16)
    optimizer = ckpt.make_optimizer(model.parameters(), lr=1e-3)
    parallel.idle_pass(model)  # a training micro-batch: FSDP reshards after its backward
    with torch.no_grad():
        parallel.idle_pass(model, backward=False)  # validation, a pre-pass: the root stays gathered
    assert parallel.is_sharded(model)
    copy = parallel.full_copy(model, torch.float32)
    assert all(torch.equal(copy.state_dict()[k], master[k]) for k in master)
    with torch.no_grad():
        parallel.idle_pass(model, backward=False)
    ckpt.save_checkpoint(str(tmp_path), 1, model, load_tokenizer(tiny_checkpoint), optimizer, {}, torch.bfloat16, 2)
    assert assert_train_shards(tmp_path, 1) == 1
    again = parallel.shard_model(load_model(tiny_checkpoint), torch.bfloat16)
    ckpt.load_local_train_state(again, ckpt.make_optimizer(again.parameters(), lr=1e-3),
                                  ckpt.load_checkpoint(str(tmp_path))[3])
    assert all(torch.equal(parallel.full_copy(again, torch.float32).state_dict()[k], master[k]) for k in master)
