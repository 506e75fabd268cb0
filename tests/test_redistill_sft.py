"""redistill_sft.py: data loading and errors, loss on response tokens only, the two reductions, micro-batch and
DDP invariance, learning a toy task, exact kill-and-resume, pre-training from scratch."""
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

import common
import ckpt
import engine
import parallel
import tasks
import redistill_sft as sft
import toy_task
from common import UserError
from model import build_model, load_model, save_model, tiny_config
from tasks import load_tokenizer
from conftest import (ROOT, assert_train_shards, end_of_process_locks, free_port, refuse_different_data,
                      stopped_in_the_prune_after, subprocess_env)
import padded


def write_sft(path, records, tok):
    common.write_jsonl(path, [{"id": r["id"], "task": "toy_task", "prompt": toy_task.render_prompt(r, tok),
                               "response": toy_task.teacher_response(r)} for r in records])
    return str(path)


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(path):
    return {k: v.clone() for k, v in load_model(path).state_dict().items()}


# -----------------------------------------------------------------------------
# data


@pytest.mark.slow  # its last check is a subprocess that imports torch
def test_cli_errors_write_nothing(tiny_checkpoint, tmp_path):
    tok = load_tokenizer(tiny_checkpoint)
    data = write_sft(tmp_path / "d.jsonl", toy_task.make_records(8), tok)
    out = tmp_path / "run"
    small = str(tmp_path / "small")  # a model whose vocabulary is smaller than the tokenizer: another model's
    save_model(build_model(tiny_config(len(tok) - 10), seed=0), small, tok)
    surrogate = tmp_path / "surrogate.jsonl"  # valid JSON, no valid text: a lone surrogate
    surrogate.write_text(open(data).readline() + '{"id": 9, "prompt": "a", "response": "ok \\ud83d end"}\n')
    bad = [
        (["--data", data], "exactly one of --init"),
        (["--data", data, "--init", tiny_checkpoint, "--pretrain_text", data], "exactly one of --data"),
        (["--data", str(tmp_path / "nope.jsonl"), "--init", tiny_checkpoint], "nope.jsonl: file not found"),
        (["--data", data, "--init", str(tmp_path / "nockpt")], "nockpt: checkpoint directory not found"),
        # a file listed twice trained on its examples twice; a validation file that is a training file measured nothing
        (["--data", data, str(tmp_path / "." / "d.jsonl"), "--init", tiny_checkpoint],
         r"--data .*d\.jsonl: the same file as --data .*d\.jsonl; give each file once"),
        (["--data", data, "--val_data", data, "--init", tiny_checkpoint], "--val_data .*: the same file as --data"),
        (["--data", data, "--init", tiny_checkpoint, "--global_batch", "16"],
         "8 training examples < --global_batch 16"),
        (["--data", data, "--init", tiny_checkpoint, "--max_length", "20"], r"d\.jsonl:1: example .* > --max_length 20 \(raise it"),
        (["--data", data, "--init", tiny_checkpoint, "--dtype", "float16"], "float16 cannot train here"),  # underflow
        # the optimizer and its schedule: torch's AdamW would stop mid-setup; the others trained silently otherwise
        (["--data", data, "--init", tiny_checkpoint, "--lr", "0"], "--lr must be > 0, got 0.0"),
        (["--data", data, "--init", tiny_checkpoint, "--beta1", "1.5"], r"--beta1 must be in \[0, 1\)"),
        (["--data", data, "--init", tiny_checkpoint, "--grad_clip=-1"], "--grad_clip must be 0 or more"),  # no clip
        (["--data", data, "--init", tiny_checkpoint, "--warmup_ratio", "5"],  # 5 % meant: a peak never reached
         r"--warmup_ratio must be in \[0, 1\) and --min_lr_ratio in \[0, 1\]"),
        (["--data", data, "--init", tiny_checkpoint, "--min_lr_ratio=-1"], "--min_lr_ratio in"),  # a negative lr
        (["--data", data, "--init_tiny", "true", "--tokenizer", tiny_checkpoint, "--tiny_heads", "3"],
         "--tiny_heads 3 must divide --tiny_hidden_size 128"),
        (["--data", data, "--init_tiny", "true", "--tokenizer", tiny_checkpoint, "--tiny_hidden_size", "12",
          "--tiny_heads", "4"], "= 3 dimensions a head; RoPE needs an even number"),  # (a traceback at the forward)
        (["--data", data, "--init", small],
         rf"with --init {small}: the tokenizer has {len(tok)} tokens > the model's vocab_size {len(tok) - 10}"),
        (["--data", str(surrogate), "--init", tiny_checkpoint],
         r"surrogate\.jsonl:2: field 'response' is not valid Unicode \(a lone surrogate"),
    ]
    for argv, pattern in bad:
        with pytest.raises(UserError, match=pattern):
            sft.main(argv + ["--out_dir", str(out), "--progress", "false"])
        assert not out.exists()
    # the CLI prints one line and exits 2
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "redistill_sft.py"), "--data", data],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: give exactly one of --init"), proc.stderr


def test_a_tokenizer_of_another_vocabulary_than_the_init_is_refused(tiny_checkpoint, tmp_path, capsys):
    """--tokenizer was checked for its size alone: another model's tokenizer of the same size (tokens with other
    ids) trained the embedding's rows as other tokens, and was saved with the weights. Its vocabulary must be the
    --init's own; another chat template (what --tokenizer is for) is fine."""
    import shutil
    tok = load_tokenizer(tiny_checkpoint)
    data = write_sft(tmp_path / "d.jsonl", toy_task.make_records(8), tok)
    swapped = shutil.copytree(tiny_checkpoint, str(tmp_path / "swapped"))
    spec = json.load(open(os.path.join(swapped, "tokenizer.json")))
    vocab = spec["model"]["vocab"]
    a, b = [t for t in vocab if t.isalpha()][:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    json.dump(spec, open(os.path.join(swapped, "tokenizer.json"), "w"))
    out = tmp_path / "run"
    with pytest.raises(UserError, match=rf"--tokenizer {swapped}: not the tokenizer of --init {tiny_checkpoint} "
                                        r"\(2 token\(s\) with other ids\)"):
        sft.main(["--data", data, "--init", tiny_checkpoint, "--tokenizer", swapped, "--out_dir", str(out)])
    assert not out.exists()
    templated = shutil.copytree(tiny_checkpoint, str(tmp_path / "templated"))  # the same vocabulary, another template
    with open(os.path.join(templated, "chat_template.jinja"), "w") as f:
        f.write("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] ")
    with pytest.raises(UserError, match="8 training examples < --global_batch 16"):  # (past the tokenizer's check)
        sft.main(["--data", data, "--init", tiny_checkpoint, "--tokenizer", templated, "--out_dir", str(out),
                  "--global_batch", "16", "--tiny_layers", "-1"])
    # (a --tiny_* setting beside --init is not used, which is said: --init's config sizes the model)
    assert "note: --tiny_layers not used: only --init_tiny true uses it" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# the loss


class FakeModel:
    """Stands in for the Transformer: its 'log-probs' are fixed numbers, so losses can be computed by hand."""

    def __init__(self, logprobs):
        self.lp = torch.tensor(logprobs)
        self.lm_head = torch.nn.Linear(1, 1)  # where the model lives (the CPU)

    def __call__(self, ids, cu_seqlens):
        return torch.zeros(1, ids.shape[1], 1)

    def token_logprobs(self, hidden, targets, **settings):
        assert targets.shape == self.lp.shape
        self.targets = targets.tolist()
        return self.lp


def test_reductions_by_hand():
    # A: prompt 2 tokens, response 1 token + EOS (2 loss tokens); B: prompt 1, response 3 + EOS (4 loss tokens)
    a = {"input_ids": [10, 11, 12, 0], "start": 2}
    b = {"input_ids": [20, 21, 22, 23, 0], "start": 1}
    # the log-probs are asked for the 6 loss targets only (not A's 2nd prompt token, not B's first token)
    nll = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    fake = FakeModel([-x for x in nll])
    got, seq = sft.packed_nll(fake, [a, b])
    assert fake.targets == [12, 0, 21, 22, 23, 0] and seq.tolist() == [0, 0, 1, 1, 1, 1]
    seq_mean = ((1 + 2) / 2 + (3 + 4 + 5 + 6) / 4) / 2      # 3.0: each sequence counts the same
    token_mean = (1 + 2 + 3 + 4 + 5 + 6) / 6                 # 3.5: the long sequence weighs more
    assert sft.reduce_loss(got, seq, [a, b], "seq_mean").item() == pytest.approx(seq_mean)
    assert sft.reduce_loss(got, seq, [a, b], "token_mean").item() == pytest.approx(token_mean)
    # as a share of a larger global batch (4 sequences, 12 loss tokens)
    assert sft.reduce_loss(got, seq, [a, b], "seq_mean", num_seqs=4).item() == pytest.approx(seq_mean / 2)
    assert sft.reduce_loss(got, seq, [a, b], "token_mean", num_tokens=12).item() == pytest.approx(7 * 3 / 12)


def test_a_record_that_says_it_was_cut_off_or_wrong_is_refused(tiny_checkpoint, tmp_path):
    """sample_policy's --samples_out (every sample, for inspection) or an RL rollout log given as SFT data trained on
    every sample: cut-off responses with EOS appended after them, wrong answers. A record with "finished": false or a
    reward below 1 is an error naming it; a set without those fields trains as given."""
    tok = load_tokenizer(tiny_checkpoint)
    path = write_sft(tmp_path / "d.jsonl", toy_task.make_records(3, seed=1), tok)
    rows = common.read_jsonl(path)
    common.write_jsonl(path, [{**r, "reward": reward, "finished": True} for r, reward in zip(rows, (1.0, 1.5, 1))])
    assert len(tasks.load_sft_examples([path], tok, 512)) == 3  # (a bonus above 1 is right too: tasks.is_correct)
    for change, message in (({"finished": False}, r"d\.jsonl:3: field 'finished' is false: the response was cut "
                                                  r"at the length limit, and SFT appends EOS after it"),
                            ({"reward": 0.0}, r"d\.jsonl:3: field 'reward' is 0\.0: a wrong answer .* drop the field"),
                            # (another type would pass the checks: "false" as finished, "0" as no reward)
                            ({"finished": "false"}, r"d\.jsonl:3: field 'finished' must be of type bool"),
                            ({"reward": "0"}, r"d\.jsonl:3: field 'reward' is \"0\", expected a finite number"),
                            ({"reward": None}, r"d\.jsonl:3: field 'reward' is null, expected a finite number")):
        common.write_jsonl(path, rows[:2] + [{**rows[2], **change}])
        with pytest.raises(common.UserError, match=message):
            tasks.load_sft_examples([path], tok, 512)


def test_a_repeated_example_is_noted_with_where_it_was_read_first(tiny_checkpoint, tmp_path, capsys):
    """sample_policy drops repeats, so the same prompt and response twice is a set given twice (`--sft_data A
    A_copy`: sample_effect scored and selected it twice) or a copy beside it: one note naming the first repeat and its
    original; the examples are still used as given. Another response to the same prompt is no repeat."""
    tok = load_tokenizer(tiny_checkpoint)
    path = write_sft(tmp_path / "d.jsonl", toy_task.make_records(3, seed=1), tok)
    rows = common.read_jsonl(path)
    common.write_jsonl(path, rows + [{**rows[0], "id": "other", "response": rows[0]["response"] + " ok"}])
    assert len(tasks.load_sft_examples([path], tok, 512)) == 4
    assert "repeat" not in capsys.readouterr().out
    copy = str(tmp_path / "copy.jsonl")
    common.write_jsonl(copy, [rows[2], rows[1]])
    assert len(tasks.load_sft_examples([path, copy], tok, 512)) == 6
    assert (f"note: 2 of the 6 examples repeat an earlier one's prompt and response (the first: {copy}:1 repeats "
            f"{path}:3)") in capsys.readouterr().out


@pytest.mark.parametrize("reduction", ["seq_mean", "token_mean"])
def test_prompt_positions_carry_no_loss(tiny_checkpoint, tmp_path, reduction):
    """The loss equals the hand-computed mean over response+EOS targets (unpacked, full logits); the lm_head runs on
    exactly those targets (no prompt target, no packed boundary), and each gets gradient."""
    tok = load_tokenizer(tiny_checkpoint)
    model = load_model(tiny_checkpoint)
    examples = tasks.load_sft_examples([write_sft(tmp_path / "d.jsonl", toy_task.make_records(3, seed=1), tok)], tok,
                                       512)
    examples[1]["input_ids"] = examples[1]["input_ids"][:-3] + [tok.eos_token_id]  # unequal response lengths

    captured = {}
    real = model.token_logprobs

    def spy(hidden, targets, **kw):
        lp = real(hidden, targets, **kw)
        lp.retain_grad()
        captured["lp"], captured["targets"] = lp, targets.tolist()
        return lp

    model.token_logprobs = spy
    nll, seq = sft.packed_nll(model, examples)
    loss = sft.reduce_loss(nll, seq, examples, reduction)
    loss.backward()
    assert captured["targets"] == [t for e in examples for t in e["input_ids"][e["start"]:]]
    assert (captured["lp"].grad != 0).all()  # every response token, the EOS included, carries loss

    # the same number from full logits of each sequence alone
    with torch.no_grad():
        per_seq = []
        for e in examples:
            ids = torch.tensor([e["input_ids"]])
            logp = torch.log_softmax(padded.logits(model, ids)[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
            per_seq.append(-logp[e["start"] - 1:])
        expect = (torch.stack([x.mean() for x in per_seq]).mean() if reduction == "seq_mean"
                  else torch.cat(per_seq).mean())
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)


@pytest.mark.parametrize("reduction", ["seq_mean", "token_mean"])
def test_gradient_independent_of_micro_batching(tiny_checkpoint, tmp_path, reduction):
    tok = load_tokenizer(tiny_checkpoint)
    examples = tasks.load_sft_examples([write_sft(tmp_path / "d.jsonl", toy_task.make_records(6, seed=2), tok)], tok,
                                       512)
    for e, cut in zip(examples, [0, 2, 4, 0, 5, 1]):  # unequal lengths
        e["input_ids"] = e["input_ids"][:len(e["input_ids"]) - 1 - cut] + [tok.eos_token_id]
    lengths = [len(e["input_ids"]) for e in examples]
    num_tokens = sum(sft.num_loss_tokens(e) for e in examples)
    grads = []
    for budget in (10_000, 60, 1):  # one micro-batch, a few, one sequence each
        model = load_model(tiny_checkpoint)
        model.gradient_checkpointing = budget == 60  # recomputing blocks in backward changes nothing either
        mbs = parallel.micro_batches(lengths, budget, range(6))
        for mb in mbs:
            exs = [examples[i] for i in mb]
            nll, seq = sft.packed_nll(model, exs)
            sft.reduce_loss(nll, seq, exs, reduction, num_seqs=6, num_tokens=num_tokens).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert len(mbs) == {10_000: 1, 60: len(mbs), 1: 6}[budget]
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-4, atol=1e-7)


def test_batching_helpers():
    lengths = [5, 1, 9, 3, 7, 2]
    assert parallel.micro_batches(lengths, 10, range(6)) == [[2], [4], [0, 3, 5], [1]]  # longest first, next fit
    mbs = parallel.micro_batches(lengths, 10, range(6))
    assert sorted(i for mb in mbs for i in mb) == list(range(6))
    assert all(sum(lengths[i] for i in mb) <= 10 for mb in mbs)
    assert parallel.micro_batches(lengths, 4, [0, 2]) == [[2], [0]]  # longer than the budget: alone
    groups = sft.split_by_length(range(6), lengths, 2)
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert abs(sum(lengths[i] for i in groups[0]) - sum(lengths[i] for i in groups[1])) <= 1
    assert parallel.epoch_order(10, 1, 0) == parallel.epoch_order(10, 1, 0) != parallel.epoch_order(10, 1, 1)
    # the paper's schedule: cosine from lr to 0, no warmup, first update at the full rate
    assert sft.lr_at(0, 10, 1e-5, 0, 0) == pytest.approx(1e-5)
    assert sft.lr_at(5, 10, 1e-5, 0, 0) == pytest.approx(0.5e-5)
    assert sft.lr_at(9, 10, 1e-5, 0, 0) < 0.03e-5
    # warm-up: update k (1-based) at lr * k / warmup, so the first update changes the weights (HF's runs at 0)
    assert [sft.lr_at(s, 10, 1e-5, 0.3, 0) for s in range(3)] == pytest.approx([1e-5 / 3, 2e-5 / 3, 1e-5])
    assert sft.lr_at(3, 10, 1e-5, 0.3, 0) == pytest.approx(1e-5)  # the cosine starts at the peak
    assert sft.lr_at(9, 10, 1e-5, 0.3, 0.1) == pytest.approx(1e-6 + 0.9e-5 * 0.5 * (1 + math.cos(math.pi * 6 / 7)))


@pytest.mark.parametrize("reduction", ["seq_mean", "token_mean"])
def test_held_out_loss_by_hand_whatever_the_micro_batches(monkeypatch, reduction):
    """The held-out loss is the training reduction over the whole set: seq_mean the mean of per-example means,
    token_mean the mean over tokens, whatever --micro_batch_tokens packs together."""
    nll = {0: [1.0], 1: [2.0, 4.0], 2: [3.0], 3: [4.0, 6.0, 8.0]}  # per example, one entry per loss token
    examples = [{"input_ids": [0] * (2 + len(v)), "start": 2, "index": i} for i, v in nll.items()]

    def fake_nll(model, exs):
        values = [x for e in exs for x in nll[e["index"]]]
        seq = [j for j, e in enumerate(exs) for _ in nll[e["index"]]]
        return torch.tensor(values, dtype=torch.float64), torch.tensor(seq)
    monkeypatch.setattr(sft, "packed_nll", fake_nll)
    want = (sum(sum(v) / len(v) for v in nll.values()) / 4 if reduction == "seq_mean"
            else sum(map(sum, nll.values())) / sum(map(len, nll.values())))
    for budget in (3, 5, 100):  # one example per micro-batch, two, all four
        assert sft.held_out_loss(None, examples, reduction, budget, "cpu") == pytest.approx(want)


# -----------------------------------------------------------------------------
# training runs


@pytest.mark.slow
def test_sft_learns_toy_task(tiny_checkpoint, tmp_path):
    """A few hundred steps of SFT on teacher responses: held-out loss falls and greedy accuracy rises."""
    tok = load_tokenizer(tiny_checkpoint)
    train = write_sft(tmp_path / "train.jsonl", toy_task.make_records(400, seed=11, split="train"), tok)
    val_records = toy_task.make_records(64, seed=12, split="val")
    val = write_sft(tmp_path / "val.jsonl", val_records, tok)
    out = str(tmp_path / "run")
    sft.main(["--init_tiny", "true", "--tokenizer", tiny_checkpoint, "--tiny_hidden_size", "128", "--tiny_layers", "2",
              "--data", train, "--val_data", val, "--out_dir", out, "--lr", "3e-3", "--global_batch", "16",
              "--epochs", "8", "--loss_reduction", "token_mean", "--progress", "false"])
    m = metrics(out)
    steps = [r for r in m if "loss" in r]
    vals = [r["val_loss"] for r in m if "val_loss" in r]
    assert len(steps) == 200 and [r["step"] for r in steps] == list(range(1, 201))
    # measured over data-order seeds, library versions and CPU instruction sets: 5.8 -> 0.10-0.15
    assert vals[-1] < 0.3 and vals[-1] < 0.1 * vals[0], vals

    def accuracy(path):
        samples = engine.sample_responses(load_model(path), load_tokenizer(path), toy_task, val_records, n=1,
                                          temperature=0, max_new_tokens=16, progress=False)
        return sum(s["reward"] for s in samples) / len(samples)

    before, after = accuracy(tiny_checkpoint), accuracy(os.path.join(out, "final"))  # random weights vs trained
    assert before <= 0.05 and after >= 0.6, (before, after)  # measured likewise: 0.0 -> 0.77-1.0


def run_args(init, data, out, *extra):
    return ["--init", init, "--data", data, "--out_dir", out, "--global_batch", "8", "--epochs", "2", "--lr", "1e-3",
            "--micro_batch_tokens", "200", "--progress", "false", *extra]


@pytest.mark.slow
def test_a_stop_inside_the_last_saves_prune_is_finished_by_the_resume(tiny_checkpoint, tmp_path, monkeypatch):
    """Older checkpoints go in the prune after each save; a stop (Ctrl-C) inside the last one left them for good, as
    the resume had no step left to save (at 1.5B ~18.5 GB each)."""
    tok = load_tokenizer(tiny_checkpoint)
    data = write_sft(tmp_path / "d.jsonl", toy_task.make_records(40, seed=3), tok)  # 10 steps
    out = str(tmp_path / "out")
    monkeypatch.setattr(ckpt, "remove_checkpoint", stopped_in_the_prune_after(10))
    with pytest.raises(KeyboardInterrupt):
        sft.main(run_args(tiny_checkpoint, data, out, "--save_every", "1"))
    monkeypatch.undo()
    end_of_process_locks()
    assert ckpt.checkpoint_steps(out) == [8, 9, 10]
    sft.main(run_args(tiny_checkpoint, data, out, "--save_every", "1", "--resume", "true"))
    assert ckpt.checkpoint_steps(out) == [10] and os.path.isfile(os.path.join(out, "final", "config.json"))
    assert sorted(f for f in os.listdir(out) if f.startswith("step_") and "." not in f) == [
        "step_000005", "step_000010"]  # the weights of the epoch ends


@contextlib.contextmanager
def two_threads():
    """torch on 2 CPU threads for the block (the tests run on 1): another thread count, as another machine's."""
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(1)


def test_stop_and_resume_gives_the_same_weights(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    tok = load_tokenizer(tiny_checkpoint)
    data = write_sft(tmp_path / "d.jsonl", toy_task.make_records(40, seed=3), tok)  # 5 steps/epoch, 10 in all
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    sft.main(run_args(tiny_checkpoint, data, full))
    stale = str(tmp_path / "stale")  # a finished run's final/, its checkpoints deleted: a fresh run there is refused
    shutil.copytree(os.path.join(full, "final"), os.path.join(stale, "final"))
    for resume in ("false", "true"):  # (with nothing to resume, --resume true starts afresh)
        with pytest.raises(UserError, match=f"{stale}/final holds the final weights of an earlier run, and {stale} no "
                                            f"checkpoint of it"):
            sft.main(run_args(tiny_checkpoint, data, stale, "--resume", resume))
    # interrupted mid-epoch 2: checkpoints every 3 steps, stop after step 7
    sft.main(run_args(tiny_checkpoint, data, cut, "--save_every", "3", "--stop_at_step", "7"))
    assert ckpt.checkpoint_steps(cut) == [6, 7]  # --keep_last 2 stay resumable (saves at 3, 5, 6, 7)
    assert sorted(f for f in os.listdir(cut) if f.startswith("step_") and "." not in f) == [
        "step_000005", "step_000006", "step_000007"]  # weights: the epoch end and the resumable ones
    assert not os.path.exists(os.path.join(cut, "final"))
    with pytest.raises(UserError, match="pass --resume"):
        sft.main(run_args(tiny_checkpoint, data, cut))
    with pytest.raises(UserError, match="different settings.*lr: was 0.001, now 0.002"):
        sft.main(run_args(tiny_checkpoint, data, cut, "--resume", "true", "--lr", "2e-3"))
    with pytest.raises(UserError, match="different settings.*adam_8bit: was False, now True"):  # another state
        sft.main(run_args(tiny_checkpoint, data, cut, "--resume", "true", "--adam_8bit", "true"))
    with pytest.raises(UserError, match="different settings.*compute_dtype: was 'float32', now 'bfloat16'"):
        sft.main(run_args(tiny_checkpoint, data, cut, "--resume", "true", "--dtype", "bfloat16"))
    with two_threads():  # another CPU thread count rounds otherwise
        with pytest.raises(UserError, match="different settings.*compute_device: was 'cpu, threads 1', now 'cpu, "
                                            "threads 2' \\(torch's CPU threads: OMP_NUM_THREADS sets them"):
            sft.main(run_args(tiny_checkpoint, data, cut, "--resume", "true"))
    with monkeypatch.context() as m:  # a shard per rank: an unfinished run goes on only at the number that wrote it
        m.setattr(ckpt, "world_size", lambda: 2)
        with two_threads(), pytest.raises(UserError, match=r"step_000007\.state\.pt: written by 1 rank\(s\); resume "
                                                           r"it with the same number \(torchrun --nproc_per_node\), "
                                                           r"not 2"):  # (named first: the thread count was)
            sft.main(run_args(tiny_checkpoint, data, cut, "--resume", "true"))
    write_sft(tmp_path / "d.jsonl", toy_task.make_records(40, seed=4), tok)  # other examples, same path and count
    with pytest.raises(UserError, match="different settings.*data_digest: was"):
        sft.main(run_args(tiny_checkpoint, data, cut, "--resume", "true"))
    assert write_sft(tmp_path / "d.jsonl", toy_task.make_records(40, seed=3), tok) == data  # the run's data again
    with open(os.path.join(cut, "metrics.jsonl"), "a") as f:
        f.write('{"step": 8, "epoch": 1, "lo')  # the killed run's last append, cut short
    capsys.readouterr()
    sft.main(run_args(tiny_checkpoint, data, cut, "--resume", "true", "--micro_batch_tokens", "60"))
    out = capsys.readouterr().out
    assert "step_000007 (step 7/10)" in out and "metrics.jsonl:8: dropped a torn last line" in out
    # a memory setting may change (a run out of memory goes on), but it rounds otherwise: said
    assert re.search(r"note: resuming with other settings than when step 7 was saved: (.*; )?micro_batch_tokens: was "
                     r"\d+, now 60;.* the weights from here can differ in their last bits", out)
    assert "code changed" not in out  # (each checkpoint records the code that saved it: the same code here)
    assert torch.load(os.path.join(cut, "step_000010.state.pt"), weights_only=True)["code"] == ckpt.code_stamp()
    a, b = weights(os.path.join(full, "final")), weights(os.path.join(cut, "final"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert [r["step"] for r in metrics(cut) if "loss" in r] == list(range(1, 11))
    # a finished run resumed again is a no-op that says so
    stamp = os.path.getmtime(os.path.join(cut, "final", "model.safetensors"))
    sft.main(run_args(tiny_checkpoint, data, cut, "--resume", "true"))
    assert "already finished (10/10 steps)" in capsys.readouterr().out
    # ... at any number of ranks, on any CPU or thread count: nothing is left to compute (it was refused)
    with monkeypatch.context() as m:
        m.setattr(ckpt, "world_size", lambda: 2)
        m.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "OTHER")
        with two_threads():
            sft.main(run_args(tiny_checkpoint, data, cut, "--resume", "true"))
    assert "already finished (10/10 steps)" in capsys.readouterr().out
    with pytest.raises(UserError, match="different settings.*lr: was 0.001, now 0.002"):  # (a setting still counts)
        sft.main(run_args(tiny_checkpoint, data, cut, "--resume", "true", "--lr", "2e-3"))
    for world in (1, 2):  # (not "written by 1 rank(s)": the run had finished; its settings say why it cannot go on)
        with monkeypatch.context() as m, pytest.raises(UserError, match="different settings.*epochs: was 2, now 3"):
            m.setattr(ckpt, "world_size", lambda: world)
            sft.main(run_args(tiny_checkpoint, data, cut, "--resume", "true", "--epochs", "3"))
    assert os.path.getmtime(os.path.join(cut, "final", "model.safetensors")) == stamp
    # killed inside its final save: only that save is left, from the last checkpoint's weights (no optimizer state),
    # so at another number of ranks or thread count too; the same final weights
    shutil.rmtree(os.path.join(cut, "final"))
    with monkeypatch.context() as m:
        m.setattr(ckpt, "world_size", lambda: 2)
        with two_threads():
            sft.main(run_args(tiny_checkpoint, data, cut, "--resume", "true"))
    assert "done: 10 steps" in capsys.readouterr().out
    b = weights(os.path.join(cut, "final"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)

    # a real kill (SIGKILL, maybe mid-save) of a run checkpointing every step; --resume finishes it identically
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "redistill_sft.py"),
                             *run_args(tiny_checkpoint, data, killed, "--save_every", "1")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env())
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        log = os.path.join(killed, "metrics.jsonl")
        if os.path.exists(log):
            with open(log) as f:
                if f.read().count("\n") >= 2:  # two steps done
                    break
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "final")), "the run ended before it was killed"
    sft.main(run_args(tiny_checkpoint, data, killed, "--resume", "true"))
    b = weights(os.path.join(killed, "final"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def nan_loss_in(monkeypatch, bad):
    """From now on the training loss is NaN in each step (counted from 1) for which bad(step) holds."""
    real_lr, real_loss, step_now = sft.lr_at, sft.reduce_loss, [0]

    def lr_at(step, *args):  # called once at the start of every step
        step_now[0] = step + 1
        return real_lr(step, *args)

    def reduce_loss(*args, **kwargs):
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if bad(step_now[0]) else loss

    monkeypatch.setattr(sft, "lr_at", lr_at)
    monkeypatch.setattr(sft, "reduce_loss", reduce_loss)


def test_nan_steps_are_skipped_then_the_run_stops(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """A non-finite loss or gradient norm skips the update (every rank alike: both numbers are all-reduced), is
    counted, and --max_bad_steps in a row stop the run with exit code 1, keeping the last good checkpoint. (The
    update used to run whatever the norm: one NaN gradient made every weight NaN.) With recompute chosen by memory:
    every block on a CPU."""
    nan_loss_in(monkeypatch, lambda step: step >= 3)
    tok = load_tokenizer(tiny_checkpoint)
    data = write_sft(tmp_path / "d.jsonl", toy_task.make_records(40, seed=3), tok)  # 5 steps/epoch
    out = str(tmp_path / "nan")
    assert sft.main(run_args(tiny_checkpoint, data, out, "--save_every", "1", "--max_bad_steps", "2",
                             "--gradient_checkpointing", "true", "--checkpoint_every", "auto")) == 1
    printed = capsys.readouterr().out
    assert "step 3: non-finite loss nan" in printed and "2 consecutive steps with non-finite" in printed
    assert "--checkpoint_every auto: every block, on CPU" in printed
    assert [r["bad_steps"] for r in metrics(out)] == [0, 0, 1, 2]
    with open(os.path.join(out, "metrics.jsonl")) as f:  # strict JSON (no bare NaN); a skipped step's numbers null
        rows = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl")) for line in f]
    assert [(r["loss"] is None, r["grad_norm"] is None) for r in rows] == [(False, False)] * 2 + [(True, True)] * 2
    assert ckpt.checkpoint_steps(out) == [2, 3] and not os.path.exists(os.path.join(out, "final"))
    w2, w3 = weights(ckpt.checkpoint_dir(out, 2)), weights(ckpt.checkpoint_dir(out, 3))
    assert all(torch.equal(w2[k], w3[k]) and torch.isfinite(w3[k]).all() for k in w2)  # step 3 changed nothing


def test_a_non_finite_held_out_loss_is_logged_as_null(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """metrics.jsonl stays strict JSON when the held-out loss is not finite (a diverged or overflowing model): null,
    and the printed line says so, where a bare NaN was written that jq and pandas refuse."""
    monkeypatch.setattr(sft, "held_out_loss", lambda *a, **kw: float("nan"))
    tok = load_tokenizer(tiny_checkpoint)
    data = write_sft(tmp_path / "d.jsonl", toy_task.make_records(16, seed=3), tok)  # 2 steps/epoch
    val = write_sft(tmp_path / "v.jsonl", toy_task.make_records(4, seed=4), tok)
    out = str(tmp_path / "run")
    assert sft.main(run_args(tiny_checkpoint, data, out, "--val_data", val, "--epochs", "1")) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl")) for line in f]
    assert [r["val_loss"] for r in rows if "val_loss" in r] == [None, None]  # steps 0 and 2
    assert "step 0: held-out loss nan (4 sequences), not finite" in capsys.readouterr().out


def test_a_good_step_ends_the_streak_of_non_finite_ones(tiny_checkpoint, tmp_path, monkeypatch):
    """--max_bad_steps counts consecutive non-finite steps: NaN in steps 1 and 3 of 5 with --max_bad_steps 2 is
    never two in a row, so the run finishes (exit 0, final/ written); a streak that a good step does not reset would
    stop it at step 3 (exit 1)."""
    nan_loss_in(monkeypatch, lambda step: step in (1, 3))
    tok = load_tokenizer(tiny_checkpoint)
    data = write_sft(tmp_path / "d.jsonl", toy_task.make_records(40, seed=3), tok)  # 5 steps/epoch
    out = str(tmp_path / "nan")
    assert sft.main(run_args(tiny_checkpoint, data, out, "--epochs", "1", "--max_bad_steps", "2")) == 0
    assert [r["bad_steps"] for r in metrics(out)] == [1, 1, 2, 2, 2]
    assert os.path.isfile(os.path.join(out, "final", "config.json"))


def test_held_out_loss_at_start_and_epoch_ends_through_a_resume_then_one_checkpoint_and_final(tiny_checkpoint,
                                                                                              tmp_path, capsys):
    """The held-out loss is measured before training (step 0) and at each epoch end (steps 5 and 10 of 2 epochs of
    5 steps), once each: a run stopped at step 7 and resumed measures no second step 0 (its weights are trained).
    A --stop_at_step past the schedule's end is clamped to it (the resume ends at step 10, not 12, as the cosine
    schedule spans 10). The metrics' epoch counts from 0, as the checkpoint state's does. A finished run keeps one
    resumable checkpoint (--keep_last 2 until then). A resumed run whose steps are all done but which has no final/
    (killed while writing it, or final/ deleted) writes final/ rather than calling itself finished, under any
    --stop_at_step, and reads no optimizer shard for it (one deleted to free the disk is not missed)."""
    tok = load_tokenizer(tiny_checkpoint)
    data = write_sft(tmp_path / "d.jsonl", toy_task.make_records(40, seed=3), tok)  # 5 steps/epoch, 10 in all
    val = write_sft(tmp_path / "v.jsonl", toy_task.make_records(6, seed=7, split="val"), tok)
    out = str(tmp_path / "run")
    assert sft.main(run_args(tiny_checkpoint, data, out, "--val_data", val, "--stop_at_step", "7")) == 0
    assert ckpt.checkpoint_steps(out) == [5, 7] and not os.path.exists(os.path.join(out, "final"))
    other = write_sft(tmp_path / "v2.jsonl", toy_task.make_records(6, seed=8, split="val"), tok)
    with pytest.raises(UserError, match="different settings.*val_data_digest: was"):  # two measures, one curve
        sft.main(run_args(tiny_checkpoint, data, out, "--val_data", other, "--resume", "true"))
    capsys.readouterr()  # a stop behind the checkpoint: nothing done, and said so (not "stopped at step 3/10")
    logged = metrics(out)
    assert sft.main(run_args(tiny_checkpoint, data, out, "--val_data", val, "--stop_at_step", "3",
                             "--resume", "true")) == 0
    assert "already at step 7/10, at or past --stop_at_step 3: nothing done" in capsys.readouterr().out
    assert ckpt.checkpoint_steps(out) == [5, 7] and metrics(out) == logged
    assert sft.main(run_args(tiny_checkpoint, data, out, "--val_data", val, "--stop_at_step", "12",
                             "--resume", "true")) == 0
    m = metrics(out)
    assert [r["step"] for r in m if "val_loss" in r] == [0, 5, 10]
    assert [r["step"] for r in m if "loss" in r] == list(range(1, 11))
    assert [r["epoch"] for r in m if "loss" in r] == [0] * 5 + [1] * 5
    assert ckpt.checkpoint_steps(out) == [10]
    final = os.path.join(out, "final")
    shutil.rmtree(final)
    os.remove(ckpt.train_shard_path(out, 10, 0))  # (deleted to free the disk: what is left needs no optimizer state)
    capsys.readouterr()  # only the final save is left: written whatever --stop_at_step says
    assert sft.main(run_args(tiny_checkpoint, data, out, "--val_data", val, "--resume", "true",
                             "--stop_at_step", "3")) == 0
    log = capsys.readouterr().out
    assert "already finished" not in log and "stopped at" not in log and "done: 10 steps" in log
    a, b = weights(ckpt.checkpoint_dir(out, 10)), weights(final)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in metrics(out) if "val_loss" in r] == [0, 5, 10]
    assert sft.main(run_args(tiny_checkpoint, data, out, "--val_data", val, "--resume", "true")) == 0
    assert "already finished (10/10 steps)" in capsys.readouterr().out  # its shard gone, the run is still finished


def test_a_pretraining_file_named_json_is_read_as_json_lines(tiny_checkpoint, tmp_path):
    """*.jsonl and *.json hold one {"text": ...} a line; read as plain text, the model would learn braces and field
    names. Any other name is plain text, but not one whose first line is such a record (a jsonl file named .txt)."""
    tok = load_tokenizer(tiny_checkpoint)
    lines = '{"text": "1 plus 2 is 3."}\n{"text": "2 plus 2 is 4."}\n'
    for name in ("docs.json", "docs.JSONL"):
        (tmp_path / name).write_text(lines)
        examples = sft.load_text_examples([str(tmp_path / name)], tok, 512)
        assert [tok.decode(e["input_ids"][:-1]) for e in examples] == ["1 plus 2 is 3.", "2 plus 2 is 4."]
    (tmp_path / "docs.txt").write_text(lines)
    with pytest.raises(common.UserError, match=r"docs\.txt: plain text by its name, but its first line is a JSON "
                                               r"object with a 'text' field: name it \*\.jsonl"):
        sft.load_text_examples([str(tmp_path / "docs.txt")], tok, 512)
    (tmp_path / "docs.txt").write_text('{"a": 1} is JSON.\n{"text": "x"}\n')
    assert len(sft.load_text_examples([str(tmp_path / "docs.txt")], tok, 512)) == 1  # one plain-text document


def test_a_pretraining_document_with_eos_inside_or_empty_is_refused_by_line(tiny_checkpoint, tmp_path):
    """EOS ends each document: one inside a document (its text, which the tokenizer reads as the token) joined two
    and taught stopping mid-way; an empty "text" was dropped without a word. A chat terminator is text here."""
    tok = load_tokenizer(tiny_checkpoint)
    (tmp_path / "eos.jsonl").write_text(json.dumps({"text": "1 plus 2 is 3."}) + "\n"
                                        + json.dumps({"text": f"2 plus 2{tok.eos_token} is 4."}) + "\n")
    with pytest.raises(UserError, match=rf"eos\.jsonl:2: field 'text' holds the stop token "
                                        rf"'{re.escape(tok.eos_token)}'"):
        sft.load_text_examples([str(tmp_path / "eos.jsonl")], tok, 512)
    (tmp_path / "eos.txt").write_text(f"one\n\ntwo\nthree {tok.eos_token} four\n")
    with pytest.raises(UserError, match=r"eos\.txt:3: field 'text' holds the stop token"):
        sft.load_text_examples([str(tmp_path / "eos.txt")], tok, 512)
    (tmp_path / "empty.jsonl").write_text('{"text": "a"}\n{"text": ""}\n')
    with pytest.raises(UserError, match=r"empty\.jsonl:2: field 'text' must be a non-empty string"):
        sft.load_text_examples([str(tmp_path / "empty.jsonl")], tok, 512)
    stops = [t for t in common.stop_token_ids(tok) if t != tok.eos_token_id]
    if stops:  # (a chat terminator: text of a chat transcript, trained on)
        (tmp_path / "chat.jsonl").write_text(json.dumps({"text": f"hi{tok.convert_ids_to_tokens(stops[0])} yo"}))
        assert stops[0] in sft.load_text_examples([str(tmp_path / "chat.jsonl")], tok, 512)[0]["input_ids"]


def test_pretrain_from_scratch_on_text(tiny_checkpoint, tmp_path, capsys):
    tok = load_tokenizer(tiny_checkpoint)
    docs = [f"{r['question']} {toy_task.teacher_response(r)}" for r in toy_task.make_records(64, seed=4)]
    (tmp_path / "text.txt").write_text("\n\n".join(docs[:32]) + "\n")
    common.write_jsonl(tmp_path / "text.jsonl", [{"text": d} for d in docs[32:]])
    paths = [str(tmp_path / "text.txt"), str(tmp_path / "text.jsonl")]
    examples = sft.load_text_examples(paths, tok, max_length=8)  # long documents are split, not an error
    whole = sft.load_text_examples(paths, tok, max_length=512)
    assert len(whole) == 64 and all(e["start"] == 1 for e in whole)
    assert whole[0]["input_ids"] == tok(docs[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert max(len(e["input_ids"]) for e in examples) == 8 and all(e["start"] == 1 for e in examples)
    # cut with one token of overlap: each piece after a document's first begins with the last token of the one before,
    # as context, so every token after the document's first is predicted exactly once, its EOS included
    for doc in whole:
        ids = doc["input_ids"]
        pieces = [e["input_ids"] for e in examples if (e["file"], e["line"]) == (doc["file"], doc["line"])]
        assert pieces[0] + [t for p in pieces[1:] for t in p[1:]] == ids
        assert all(p[0] == q[-1] for q, p in zip(pieces, pieces[1:]))
    # one token over max_length: the tail is the EOS, predicted from the token before it (cut apart, it was dropped)
    (tmp_path / "one.txt").write_text(docs[0] + "\n")
    ids = whole[0]["input_ids"]
    assert [e["input_ids"] for e in sft.load_text_examples([str(tmp_path / "one.txt")], tok, len(ids) - 1)] == \
        [ids[:-1], ids[-2:]]
    # a bare tokenizer directory (no config.json beside it), as a tiny preset builds it
    bare = tmp_path / "tokenizer"
    bare.mkdir()
    for name in os.listdir(tiny_checkpoint):
        if name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(os.path.join(tiny_checkpoint, name), bare / name)
    out = str(tmp_path / "base")
    sft.main(["--init_tiny", "true", "--tokenizer", str(bare), "--tiny_hidden_size", "32", "--tiny_layers", "1",
              "--pretrain_text", *paths, "--out_dir", out, "--lr", "1e-2", "--global_batch", "16", "--epochs", "15",
              "--loss_reduction", "token_mean", "--progress", "false"])
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    # 15 epochs: the last loss is 0.18-0.22 of the first over data-order seeds, library versions and CPU
    # instruction sets (5 epochs left 0.44-0.47, too close to the bound)
    assert len(losses) == 60 and losses[-1] < 0.5 * losses[0], losses
    # the run tokenized exactly as the later stages will, with the tokenizer loaded from its checkpoint
    final_tok = load_tokenizer(os.path.join(out, "final"))
    total = sum(len(e["input_ids"]) for e in sft.load_text_examples(paths, final_tok, 2048))
    assert f"64 sequences ({total} tokens" in capsys.readouterr().out
    model = load_model(os.path.join(out, "final"))
    assert model.config.hidden_size == 32 and model.config.num_layers == 1


def torchrun_sft(ranks, *args):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                           "--master_port", str(free_port()), os.path.join(ROOT, "redistill_sft.py"), *args],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)


@pytest.mark.torchrun
def test_fsdp_two_ranks_match_one_process_and_resume_exactly(tiny_checkpoint, tmp_path):
    """torchrun with 2 CPU ranks (gloo, FSDP2): the data is split by rank, the loss normalised over the global
    batch and the gradients summed, so the weights equal a one-process run's; stopped at an epoch end and resumed at
    2 ranks (each rank's optimizer shard saved and read back), the run ends bit-identical to an uninterrupted one.
    The epoch end's held-out loss is a no-grad forward just before the save, which leaves FSDP's root group
    gathered: the saved shards must still be each rank's fp32 shard (the root's were saved whole, and the resume
    crashed)."""
    tok = load_tokenizer(tiny_checkpoint)
    data = write_sft(tmp_path / "d.jsonl", toy_task.make_records(24, seed=6), tok)
    val = write_sft(tmp_path / "v.jsonl", toy_task.make_records(6, seed=7, split="val"), tok)
    one, two, cut = str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "cut")
    reduction = ("--loss_reduction", "token_mean", "--val_data", val,  # token_mean: normalised by the loss tokens
                 # of the global batch, both ranks; selective recompute under FSDP2 at 2 ranks
                 "--gradient_checkpointing", "true", "--checkpoint_every", "2", "--checkpoint_keep", "matmuls")
    sft.main(run_args(tiny_checkpoint, data, one, *reduction))
    proc = torchrun_sft(2, *run_args(tiny_checkpoint, data, two, *reduction))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 rank(s)" in proc.stdout
    # Adam is blind to a constant gradient scale, so compare the logged global loss and the gradient norm
    # (a wrong normalisation over ranks changes them) as well as the weights, relative to each tensor's norm
    # (Adam's first steps, ~lr * sign(g), amplify the round-off of near-zero gradient entries)
    ma, mb = ([r for r in metrics(d) if "loss" in r] for d in (one, two))
    assert [r["loss"] for r in ma] == pytest.approx([r["loss"] for r in mb], rel=1e-5)
    assert [r["grad_norm"] for r in ma] == pytest.approx([r["grad_norm"] for r in mb], rel=1e-5)
    a, b = weights(os.path.join(one, "final")), weights(os.path.join(two, "final"))
    for k in a:
        assert float((b[k] - a[k]).norm()) <= 1e-5 * float(a[k].norm()), k
    for extra in (("--stop_at_step", "3"), ("--resume", "true")):  # 3 steps per epoch
        proc = torchrun_sft(2, *run_args(tiny_checkpoint, data, cut, *reduction, *extra))
        assert proc.returncode == 0, proc.stderr[-3000:]
        if extra[0] == "--stop_at_step":
            assert "held-out loss" in proc.stdout and assert_train_shards(cut, 2) == 2
    assert "step_000003 (step 3/6)" in proc.stdout  # resumed from the stop, with both ranks' optimizer shards
    c = weights(os.path.join(cut, "final"))
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_resume_skips_an_unreadable_checkpoint(tiny_checkpoint, tmp_path, capsys):
    """A truncated optimizer shard (a disk fault, a partial copy) is skipped with one warning naming the file;
    the run resumes from the newest intact checkpoint and ends where an uninterrupted run ends."""
    tok = load_tokenizer(tiny_checkpoint)
    data = write_sft(tmp_path / "d.jsonl", toy_task.make_records(40, seed=3), tok)  # 5 steps/epoch, 10 in all
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    sft.main(run_args(tiny_checkpoint, data, full))
    sft.main(run_args(tiny_checkpoint, data, cut, "--save_every", "2", "--stop_at_step", "7"))
    shard = ckpt.train_shard_path(cut, 7, 0)
    with open(shard, "r+b") as f:
        f.truncate(100)
    capsys.readouterr()
    sft.main(run_args(tiny_checkpoint, data, cut, "--resume", "true", "--save_every", "2", "--stop_at_step", "8"))
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and shard in warnings[0] and "step 7" in warnings[0]
    assert "step_000006 (step 6/10)" in out  # the other resumable one (--keep_last 2)
    # the unreadable one went when the resume passed it by: it does not take a --keep_last place from step 8's save
    # (which would have pruned step 6, the one good fallback)
    assert ckpt.checkpoint_steps(cut) == [6, 8] and 7 not in ckpt.checkpoint_parts(cut)  # (5: an epoch's weights)
    # none readable: an error that names them, and the run's logs stay (a fresh run there would write over them)
    broken = shutil.copytree(cut, str(tmp_path / "broken"), ignore=shutil.ignore_patterns(".lock"))
    for step in (6, 8):
        with open(ckpt.train_shard_path(broken, step, 0), "r+b") as f:
            f.truncate(100)
    metrics = open(os.path.join(broken, "metrics.jsonl")).read()
    with pytest.raises(UserError, match=r"none of the checkpoints in .* \(steps 6, 8\) can be read"):
        sft.main(run_args(tiny_checkpoint, data, broken, "--resume", "true"))
    assert open(os.path.join(broken, "metrics.jsonl")).read() == metrics
    sft.main(run_args(tiny_checkpoint, data, cut, "--resume", "true"))
    a, b = weights(os.path.join(full, "final")), weights(os.path.join(cut, "final"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    # finished, its shards damaged since: nothing is left to train, so none is read, and it says so
    with open(ckpt.train_shard_path(cut, 10, 0), "r+b") as f:
        f.truncate(100)
    capsys.readouterr()
    assert sft.main(run_args(tiny_checkpoint, data, cut, "--resume", "true")) == 0
    assert "already finished (10/10 steps)" in capsys.readouterr().out


def test_rng_state_holds_this_gpus_generator_only(monkeypatch):
    """The resume state holds the current GPU's generator (a resume may see fewer GPUs than the run that saved it),
    and an older run's list of every GPU's restores its first, rank 0's own."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: restored.append(s.tolist()))
    state = sft.rng_state()
    sft.set_rng_state(state)
    sft.set_rng_state(dict(state, cuda=[torch.tensor([1], dtype=torch.uint8), torch.tensor([2])]))
    assert restored == [[7], [1]]


# every setting that changes the trained weights, at other values than its default, against a reference loop written
# out here with the settings' intended meaning (a setting dropped on its way through main, its default used, fails)
OPTIMISATION_SETTINGS = dict(lr=3e-3, beta1=0.8, beta2=0.95, weight_decay=0.3, warmup_ratio=0.25, min_lr_ratio=0.2,
                             grad_clip=0.5, loss_reduction=None, seed=5, epochs=2, global_batch=4)


def reference(init, examples, val, s):
    """The run as the settings mean it, written out: order by (seed, epoch), clip, AdamW with the schedule."""
    model = load_model(init, dtype=torch.float32)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s["lr"], betas=(s["beta1"], s["beta2"]), weight_decay=s["weight_decay"])
    per_epoch = len(examples) // s["global_batch"]
    total = per_epoch * s["epochs"]
    warmup = int(s["warmup_ratio"] * total)
    lengths = [len(e["input_ids"]) for e in examples]
    lrs, losses, norms = [], [], []
    for step in range(total):
        epoch, k = divmod(step, per_epoch)
        order, size = parallel.epoch_order(len(examples), s["seed"], epoch), s["global_batch"]
        batch = order[k * size:(k + 1) * size]
        if step < warmup:
            lr = s["lr"] * (step + 1) / warmup
        else:
            p = (step - warmup) / max(1, total - warmup)
            lr = s["lr"] * (s["min_lr_ratio"] + (1 - s["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * p)))
        for g in opt.param_groups:
            g["lr"] = lr
        exs = [examples[i] for i in parallel.micro_batches(lengths, 10**9, batch)[0]]
        nll, seq = sft.packed_nll(model, exs)
        if s["loss_reduction"] == "token_mean":  # over the global batch's loss tokens (one micro-batch holds it)
            loss = nll.sum() / nll.numel()
        else:  # seq_mean: each sequence's mean, then the mean over sequences
            loss = torch.stack([nll[seq == j].mean() for j in range(len(exs))]).mean()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, s["grad_clip"])))
        opt.step()
        opt.zero_grad(set_to_none=True)
        lrs.append(lr)
        losses.append(float(loss.detach()))
    return model, lrs, losses, norms


def test_a_warmup_ratio_that_rounds_to_no_warmup_is_noted(tiny_checkpoint, tmp_path, capsys):
    """--warmup_ratio 0.2 of 4 steps is 0.8 steps, rounded down to none (1 would run at the full lr too): the run
    trained without the warm-up it asked for, and said nothing."""
    tok = load_tokenizer(tiny_checkpoint)
    data = write_sft(tmp_path / "d.jsonl", toy_task.make_records(16, seed=3), tok)  # 4 steps
    assert sft.main(["--init", tiny_checkpoint, "--data", data, "--out_dir", str(tmp_path / "run"), "--progress",
                     "false", "--global_batch", "4", "--epochs", "1", "--warmup_ratio", "0.2"]) == 0
    assert ("note: --warmup_ratio 0.2 of 4 steps is 0 warm-up step(s), rounded down: no warm-up (2 steps need at "
            "least 0.5)") in capsys.readouterr().out


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean"])
def test_every_optimisation_setting_reaches_the_weights(tiny_checkpoint, tmp_path, reduction, capsys):
    """--lr, --beta1/--beta2, --weight_decay, --warmup_ratio, --min_lr_ratio, --grad_clip (biting every step),
    --loss_reduction (in training and the held-out loss) and --seed (each epoch's order): the logged lrs, losses and
    gradient norms and the final weights are the reference loop's."""
    tok = load_tokenizer(tiny_checkpoint)
    data = write_sft(tmp_path / "d.jsonl", toy_task.make_records(16, seed=3), tok)  # 4 steps/epoch, 8 in all
    val = write_sft(tmp_path / "v.jsonl", toy_task.make_records(5, seed=9, split="val"), tok)
    out = str(tmp_path / "run")
    argv = ["--init", tiny_checkpoint, "--data", data, "--val_data", val, "--out_dir", out, "--progress", "false"]
    settings = dict(OPTIMISATION_SETTINGS, loss_reduction=reduction)
    argv += [x for k, v in settings.items() for x in (f"--{k}", str(v))]
    assert sft.main(argv) == 0
    assert "warm-up step(s)" not in capsys.readouterr().out  # (0.25 of 8: 2 steps)
    rows = metrics(out)
    steps = [r for r in rows if "loss" in r]
    examples = tasks.load_sft_examples([data], tok, 5000)
    val_examples = tasks.load_sft_examples([val], tok, 5000)
    # the held-out loss uses --loss_reduction too, before training
    with torch.no_grad():
        nll, seq = sft.packed_nll(load_model(tiny_checkpoint), val_examples)
    want = (nll.mean() if reduction == "token_mean"
            else torch.stack([nll[seq == j].mean() for j in range(len(val_examples))]).mean())
    assert rows[0]["step"] == 0 and rows[0]["val_loss"] == pytest.approx(float(want), rel=1e-5)
    model, lrs, losses, norms = reference(tiny_checkpoint, examples, val_examples, settings)
    assert [r["lr"] for r in steps] == pytest.approx(lrs, rel=1e-9)  # warm-up 2 steps, cosine down to 0.2 x lr
    assert [r["loss"] for r in steps] == pytest.approx(losses, rel=1e-4)
    assert [r["grad_norm"] for r in steps] == pytest.approx(norms, rel=1e-4)
    assert min(norms) > OPTIMISATION_SETTINGS["grad_clip"]  # the clip bites in every step
    got = load_model(os.path.join(out, "final")).state_dict()
    for name, want in model.state_dict().items():  # (the run: within 5e-7; a setting dropped: 6e-4 or more apart)
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-5, msg=name)


def test_keep_last_and_the_init_tiny_seed_reach_the_run(tiny_checkpoint, tmp_path):
    """--keep_last N keeps the newest N resumable checkpoints (not the default 2); --seed seeds --init_tiny's weights
    (the held-out loss before any step differs between two seeds, and is the same for one seed twice)."""
    tok = load_tokenizer(tiny_checkpoint)
    data = write_sft(tmp_path / "d.jsonl", toy_task.make_records(16, seed=3), tok)  # 4 steps/epoch
    out = str(tmp_path / "keep")
    sft.main(["--init", tiny_checkpoint, "--data", data, "--out_dir", out, "--global_batch", "4", "--epochs", "2",
              "--save_every", "1", "--keep_last", "3", "--stop_at_step", "6", "--progress", "false"])
    assert ckpt.checkpoint_steps(out) == [4, 5, 6]
    val = write_sft(tmp_path / "v.jsonl", toy_task.make_records(4, seed=9, split="val"), tok)
    first = {}
    for name, seed in (("a", 2), ("b", 3), ("c", 2)):
        run = str(tmp_path / name)
        sft.main(["--init_tiny", "true", "--tokenizer", tiny_checkpoint, "--tiny_hidden_size", "16", "--tiny_layers",
                  "1", "--data", data, "--val_data", val, "--out_dir", run, "--global_batch", "16", "--epochs", "1",
                  "--seed", str(seed), "--progress", "false"])
        first[name] = metrics(run)[0]["val_loss"]
    assert first["a"] == first["c"] != first["b"]


def test_the_ranks_check_together_that_they_read_the_same_data(tiny_checkpoint, tmp_path, monkeypatch):
    """Each rank reads --data and --val_data itself: the digests of the examples go to parallel.same_on_every_rank,
    which refuses on every rank files written again between two ranks' reads, before a step or a write."""
    seen = refuse_different_data(monkeypatch)
    tok = load_tokenizer(tiny_checkpoint)
    data = write_sft(tmp_path / "d.jsonl", toy_task.make_records(8, seed=3), tok)
    val = write_sft(tmp_path / "v.jsonl", toy_task.make_records(3, seed=9, split="val"), tok)
    with pytest.raises(UserError, match="the ranks read different data"):
        sft.main(["--init", tiny_checkpoint, "--data", data, "--val_data", val, "--out_dir", str(tmp_path / "run"),
                  "--global_batch", "4", "--progress", "false"])
    digests = [common.data_digest([e["input_ids"], e["start"]] for e in tasks.load_sft_examples([path], tok, 2048))
               for path in (data, val)]
    assert seen == [(digests, f"{data} {val}")] and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_bar_in_a_log_file_is_not_redrawn_at_every_step(tiny_checkpoint, tmp_path, capsys):
    """Where stderr is a file, not a terminal (pytest's capture is one), the step lines go out plainly and the bar
    is drawn at its start and its end, not once more for each of the 10 steps' lines (bar.write redraws it)."""
    tok = load_tokenizer(tiny_checkpoint)
    data = write_sft(tmp_path / "d.jsonl", toy_task.make_records(40, seed=3), tok)  # 10 steps
    sft.main(run_args(tiny_checkpoint, data, str(tmp_path / "out"))[:-2] + ["--progress", "true"])
    out, err = capsys.readouterr()
    assert sum(line.startswith("step ") for line in out.splitlines()) == 10
    assert err.count("\r") <= 3, err
