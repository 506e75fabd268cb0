"""model.py against transformers: logits, checkpoints both ways (with the stop ids transformers.generate reads),
the packed forward, log-probs (response_logprobs equal to the generation's), tokenizers, errors, and the attention
dispatch (which inputs would reach flash-attn on a GPU), checked on CPU. (Generation itself: test_engine.py.)"""
import collections
import functools
import json
import os
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

import common
import tasks
import engine
import model as model_module
from common import stop_token_ids
from engine import generate
from model import (build_model, flash_dtype, flash_inputs, load_model, pack, packed_backend, response_logprobs,
                   response_positions, save_model, tiny_config)
from tasks import load_tokenizer
from tiny_base import build_tokenizer
import padded

VOCAB = 97
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}
CONFIGS = {
    "qwen2_tied": tiny_config(VOCAB, arch="Qwen2ForCausalLM", tie_word_embeddings=True),
    "qwen2_untied": tiny_config(VOCAB, arch="Qwen2ForCausalLM", tie_word_embeddings=False),
    "qwen3": tiny_config(VOCAB, arch="Qwen3ForCausalLM", head_dim=24, tie_word_embeddings=False),
    "llama3_scaled": tiny_config(VOCAB, arch="LlamaForCausalLM", rope_theta=500000.0, rope_scaling=LLAMA3_SCALING,
                                 tie_word_embeddings=False),
}


def random_model(cfg, seed=0):
    # larger-than-usual weights so that every component (biases, norms, RoPE) visibly matters
    return build_model(cfg, seed, std=0.15)


def hf_logits(path, idx):
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return hf(idx).logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_after_save(name, tmp_path):
    model = random_model(CONFIGS[name], seed=1)
    save_model(model, str(tmp_path / "ckpt"))
    idx = torch.randint(0, VOCAB, (3, 150), generator=torch.Generator().manual_seed(0))  # past the llama3 window
    with torch.no_grad():
        ours = padded.logits(model, idx)
    diff = (ours - hf_logits(str(tmp_path / "ckpt"), idx)).abs().max().item()
    assert diff <= 1e-4, diff
    assert ours.abs().max() > 1.0  # the comparison is not between two near-zero tensors


ROPE_PRECEDENCE = {  # configs from other tools: RoPE's theta in two places, or only inside a v4 rope_scaling
    "theta_twice": {**tiny_config(VOCAB, rope_theta=1e4), "rope_parameters": {"rope_type": "default",
                                                                             "rope_theta": 1e6}},
    "theta_in_rope_scaling": {**{k: v for k, v in tiny_config(VOCAB, arch="LlamaForCausalLM").items()
                                 if k != "rope_theta"}, "rope_scaling": {**LLAMA3_SCALING, "rope_theta": 5e5}},
    # llama3's original context top-level as well as in the dict: transformers takes the top-level one
    "original_context_twice": {**CONFIGS["llama3_scaled"], "original_max_position_embeddings": 16},
}


@pytest.mark.parametrize("name", list(ROPE_PRECEDENCE))
def test_rope_theta_is_read_where_transformers_reads_it(name, tmp_path):
    """rope_theta was read top-level first and never inside rope_scaling: other logits than transformers' for the
    same checkpoint (by ~5 where logits are ~5), without a word."""
    model = random_model(ROPE_PRECEDENCE[name], seed=1)
    assert model.config.rope_theta == {"theta_twice": 1e6, "theta_in_rope_scaling": 5e5,
                                       "original_context_twice": 500000.0}[name]
    save_model(model, str(tmp_path / "ckpt"))
    idx = torch.randint(0, VOCAB, (2, 150), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = padded.logits(model, idx)
    assert (ours - hf_logits(str(tmp_path / "ckpt"), idx)).abs().max().item() <= 1e-4


def test_a_qwen_config_without_kv_heads_or_head_dim_is_refused():
    """transformers' Qwen2/Qwen3 defaults for an absent field (32 kv heads; Qwen3's head_dim 128) differ from the
    natural guess (the attention heads; hidden / heads), which trained and saved a config transformers cannot load."""
    for arch, field in (("Qwen2ForCausalLM", "num_key_value_heads"), ("Qwen3ForCausalLM", "num_key_value_heads"),
                        ("Qwen3ForCausalLM", "head_dim")):
        cfg = {k: v for k, v in tiny_config(VOCAB, arch=arch).items() if k != field}
        with pytest.raises(common.UserError, match=f"config.json: missing field '{field}'"):
            model_module.ModelConfig.from_hf(cfg)
    llama = {k: v for k, v in tiny_config(VOCAB, arch="LlamaForCausalLM").items()
             if k not in ("num_key_value_heads", "head_dim")}
    got = model_module.ModelConfig.from_hf(llama)  # (Llama's defaults are the natural ones, as transformers')
    assert got.num_kv_heads == got.num_heads and got.head_dim == got.hidden_size // got.num_heads


def test_llama3_rope_scaling_changes_logits():
    scaled = random_model(CONFIGS["llama3_scaled"], seed=1)
    plain_cfg = dict(CONFIGS["llama3_scaled"])
    plain_cfg.pop("rope_scaling")
    plain = random_model(plain_cfg, seed=1)
    idx = torch.randint(0, VOCAB, (1, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (padded.logits(scaled, idx) - padded.logits(plain, idx)).abs().max() > 1e-2


def test_load_transformers_checkpoint_sharded_and_v5_rope_config(tmp_path):
    # transformers writes RoPE settings as `rope_parameters` (v5) and shards when asked
    from transformers import AutoModelForCausalLM as Auto
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_scaling=dict(LLAMA3_SCALING), rope_theta=500000.0)
    torch.manual_seed(0)
    hf = Auto.from_config(cfg)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="50KB")
    assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
    ours = load_model(str(tmp_path / "hf"))
    idx = torch.randint(0, VOCAB, (2, 120), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (padded.logits(ours, idx) - hf(idx).logits).abs().max().item()
    assert diff <= 1e-4


def test_load_transformers_qwen2(tmp_path):
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(1)
    hf = AutoModelForCausalLM.from_config(cfg)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(str(tmp_path / "hf"))
    idx = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (padded.logits(ours, idx) - hf(idx).logits).abs().max().item() <= 1e-4


def test_sharded_save_roundtrip_and_bf16(tmp_path):
    model = random_model(CONFIGS["qwen2_untied"], seed=2)
    save_model(model, str(tmp_path / "ck"), max_shard_bytes=20_000)
    assert os.path.exists(tmp_path / "ck" / "model.safetensors.index.json")
    back = load_model(str(tmp_path / "ck"))
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    half = load_model(str(tmp_path / "ck"), dtype="bfloat16")
    assert half.lm_head.weight.dtype == torch.bfloat16
    assert not any(os.path.basename(p).startswith(("ck.tmp", "ck.old")) for p in os.listdir(tmp_path))


def test_save_replaces_existing_checkpoint(tmp_path):
    a, b = random_model(CONFIGS["qwen2_tied"], 1), random_model(CONFIGS["qwen2_tied"], 2)
    save_model(a, str(tmp_path / "ck"))
    save_model(b, str(tmp_path / "ck"))
    assert torch.equal(load_model(str(tmp_path / "ck")).lm_head.weight, b.lm_head.weight)
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_packed_forward_equals_padded():
    model = random_model(CONFIGS["qwen3"], seed=3)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (7, 1, 23, 12)]
    ids, cu = pack(seqs)
    with torch.no_grad():
        packed = model.forward(ids, cu_seqlens=cu)[0]
        rows = torch.zeros(len(seqs), 23, dtype=torch.long)
        for i, s in enumerate(seqs):
            rows[i, :len(s)] = torch.tensor(s)
        hidden = padded.forward(model, rows)
    for i, s in enumerate(seqs):
        assert (packed[cu[i]:cu[i + 1]] - hidden[i, :len(s)]).abs().max() <= 1e-5


def test_response_positions_point_one_before_each_response_token_and_refuse_an_empty_prompt():
    seqs = [([5, 6], [7, 8, 9]), ([1], [2]), ([3, 4, 4], [])]
    ids, cu = pack([p + r for p, r in seqs])
    pos = response_positions(cu, [len(p) for p, _ in seqs], [len(r) for _, r in seqs])
    assert ids[0, pos + 1].tolist() == [t for _, r in seqs for t in r]
    assert pos.tolist() == [1, 2, 3, 5]
    with pytest.raises(ValueError, match="prompt of at least one token"):  # would read the previous sequence's end
        response_positions(cu, [2, 0, 3], [3, 2, 0])


def test_chunked_logprobs_and_gradients_match_full():
    model = random_model(CONFIGS["qwen2_untied"], seed=4)
    idx = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(4))
    h = padded.forward(model, idx)
    lp = model.token_logprobs(h[:, :-1], idx[:, 1:], chunk_size=7, temperature=0.7)
    full = torch.log_softmax(model.lm_head(h[:, :-1]).float() / 0.7, -1).gather(-1, idx[:, 1:, None]).squeeze(-1)
    assert (lp - full).abs().max() <= 1e-5
    g1 = torch.autograd.grad(lp.sum(), model.lm_head.weight, retain_graph=True)[0]
    g2 = torch.autograd.grad(full.sum(), model.lm_head.weight)[0]
    assert (g1 - g2).abs().max() <= 1e-5
    # a float64 model's log-probs stay float64 (they were rounded to float32: an exact check agreed to 1e-7 only)
    model64 = model.double()
    h = padded.forward(model64, idx)
    lp = model64.token_logprobs(h[:, :-1], idx[:, 1:], chunk_size=7, temperature=0.7)
    full = torch.log_softmax(model64.lm_head(h[:, :-1]) / 0.7, -1).gather(-1, idx[:, 1:, None]).squeeze(-1)
    assert lp.dtype == torch.float64 and (lp - full).abs().max() <= 1e-12


def loss_and_grads(model, ids, cu):
    model.zero_grad()
    loss = model.token_logprobs(model(ids, cu_seqlens=cu)[0, :-1], ids[0, 1:]).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


class OpCount(TorchDispatchMode):
    """Counts the aten (and custom) ops run while active, by schema name."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["qwen2_tied", "qwen3"])
def test_selective_checkpointing_gives_the_gradients_of_none(name):
    """Every recompute setting (every k-th block; keeping nothing, attention or matmuls) gives the gradients of no
    checkpointing in fp32 (<= 1e-6), on ragged sequences packed in one row."""
    model = random_model(CONFIGS[name], seed=5)
    ids, cu = pack([torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist()
                    for n in (7, 1, 12, 4)])
    loss, ref = loss_and_grads(model, ids, cu)
    model.gradient_checkpointing = True
    for every in (1, 2, 3):
        for keep in model_module.CHECKPOINT_KEEP:
            model.checkpoint_every, model.checkpoint_keep = every, keep
            loss2, grads = loss_and_grads(model, ids, cu)
            assert loss2 == loss
            for n in ref:
                assert (grads[n] - ref[n]).abs().max() <= 1e-6, (every, keep, n)


def test_checkpoint_keep_skips_the_kept_ops_in_backward():
    """What backward re-runs: with keep "nothing" every checkpointed block's attention and projections again; with
    "attention" no forward attention kernel; with "matmuls" neither; with checkpoint_every 2 of 3 blocks, two."""
    model = random_model(CONFIGS["qwen2_tied"], seed=5)  # 2 layers, one more below
    model.model.layers.append(random_model(CONFIGS["qwen2_tied"], seed=6).model.layers[0])
    ids, cu = pack([[3, 4, 5, 6], [7, 8, 9]])
    attn_fwd = "aten::_scaled_dot_product_flash_attention_for_cpu"
    assert attn_fwd in model_module.ATTENTION_OPS

    def backward_ops(every, keep):
        model.zero_grad()
        model.gradient_checkpointing, model.checkpoint_every, model.checkpoint_keep = True, every, keep
        loss = model.token_logprobs(model(ids, cu_seqlens=cu)[0, :-1], ids[0, 1:]).sum()
        with OpCount() as count:
            loss.backward()
        return count.ops

    full, attention, matmuls = (backward_ops(1, keep) for keep in ("nothing", "attention", "matmuls"))
    assert full[attn_fwd] == 3 * 2  # 3 blocks x 2 sequences
    assert attention[attn_fwd] == matmuls[attn_fwd] == 0
    assert attention["aten::addmm"] == full["aten::addmm"] > 0  # q/k/v have biases: recomputed unless matmuls kept
    assert matmuls["aten::addmm"] == 0 and matmuls["aten::mm"] < full["aten::mm"]
    assert backward_ops(2, "nothing")[attn_fwd] == 2 * 2  # blocks 0 and 2
    with pytest.raises(ValueError, match="checkpoint_keep"):
        backward_ops(1, "everything")


def test_tiny_tokenizer_roundtrip_chat_template_and_stop_ids(tmp_path):
    build_tokenizer(["Alice is a knight. Bob is a knave."] * 20, vocab_size=300, path=str(tmp_path / "tok"))
    from transformers import AutoTokenizer
    back = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    text = "Zed says: \\boxed{Alice is a knight} — ünïcode"
    assert back.decode(back(text, add_special_tokens=False)["input_ids"]) == text
    prompt = tasks.render_question("Who is who?", back, "chat")
    assert prompt.startswith("<|im_start|>system\n" + tasks.SYSTEM_PROMPT)
    assert prompt.endswith("<|im_start|>assistant\n")
    stops = stop_token_ids(back)
    assert back.convert_tokens_to_ids("<|endoftext|>") in stops and back.convert_tokens_to_ids("<|im_end|>") in stops


def test_tiny_tokenizer_same_tokens_alone_and_beside_a_qwen2_config(tmp_path):
    # transformers loads a tokenizer folder beside a qwen2 config.json as Qwen2Tokenizer, which rebuilds the
    # pipeline from Qwen2's rules; ours must tokenize identically either way
    from transformers import AutoTokenizer
    tok = build_tokenizer(["Alice says 12 + 34 = 46. Bob's\n\n a knight."] * 30, vocab_size=300,
                          path=str(tmp_path / "bare"))
    save_model(build_model(tiny_config(len(tok))), str(tmp_path / "ck"), tok)
    text = "Alice says 120 + 34 = 46.\n\n  Carol's ünï <|im_end|>x"
    alone = AutoTokenizer.from_pretrained(str(tmp_path / "bare"))(text)["input_ids"]
    beside = AutoTokenizer.from_pretrained(str(tmp_path / "ck"))(text)["input_ids"]
    assert alone == beside
    assert len(alone) > 10


def test_a_tokenizer_beside_a_qwen2_config_keeps_its_size(tmp_path):
    """A tokenizer without <|endoftext|> saved with a Qwen2 config came back as Qwen2Tokenizer, which adds that token
    as its pad token: one more token than the embedding, refused as --init at the next stage. It reloads as saved."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from tasks import load_tokenizer
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(["Alice is a knight and Bob is a knave."] * 30, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    save_model(build_model(tiny_config(len(tok))), str(tmp_path / "ck"), tok)
    back = load_tokenizer(str(tmp_path / "ck"))
    assert len(back) == len(tok) and back.eos_token == "<eos>" and "<|endoftext|>" not in back.get_vocab()
    text = "Bob is a knave"
    assert back(text)["input_ids"] == tok(text)["input_ids"]
    save_model(build_model(tiny_config(len(back))), str(tmp_path / "again"), back)  # and again (a later stage's)
    assert len(load_tokenizer(str(tmp_path / "again"))) == len(tok)
    ours = build_tokenizer(["Alice says 12 + 34 = 46."] * 30, vocab_size=300, path=str(tmp_path / "bare"))
    save_model(build_model(tiny_config(len(ours))), str(tmp_path / "qwen"), ours)  # ours has it: Qwen2's class stays
    assert type(load_tokenizer(str(tmp_path / "qwen"))).__name__ == "Qwen2Tokenizer"


def write_model(tmp_path, name="ck"):
    save_model(random_model(CONFIGS["qwen2_tied"]), str(tmp_path / name))
    return str(tmp_path / name)


def test_error_missing_directory(tmp_path):
    with pytest.raises(common.UserError, match="checkpoint directory not found"):
        load_model(str(tmp_path / "nope"))


def test_error_missing_weights(tmp_path):
    path = write_model(tmp_path)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(common.UserError, match="no model.safetensors"):
        load_model(path)


def test_error_corrupt_weights(tmp_path):
    path = write_model(tmp_path)
    with open(os.path.join(path, "model.safetensors"), "r+b") as f:
        f.write(b"garbage!" * 4)
    with pytest.raises(common.UserError, match="cannot read weights"):
        load_model(path)


def test_error_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    path = write_model(tmp_path)
    weights = load_file(os.path.join(path, "model.safetensors"))
    weights.pop("model.norm.weight")
    save_file(weights, os.path.join(path, "model.safetensors"))
    with pytest.raises(common.UserError, match="lacks 1 tensor"):
        load_model(path)


def test_a_tied_config_loads_the_head_transformers_loads_or_refuses(tmp_path):
    """config.json says tied (copied from a tied base by an export or merge script) but the file stores an lm_head of
    its own: transformers keeps that head, untied, so a tied load would be another model, silently. Refused unless
    the two are equal; a head stored alone (no embedding) is the embedding, as transformers reads it."""
    from safetensors.torch import load_file, save_file
    path = str(tmp_path / "ck")
    save_model(random_model(CONFIGS["qwen2_untied"], seed=4), path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**config, "tie_word_embeddings": True}, f)
    weights = load_file(os.path.join(path, "model.safetensors"))
    with pytest.raises(common.UserError, match=r"model\.safetensors: tensor 'lm_head\.weight' differs from "
                                               r"'model\.embed_tokens\.weight', but config\.json sets "
                                               r"tie_word_embeddings true"):
        load_model(path)
    embed = weights["model.embed_tokens.weight"]
    save_file({**weights, "lm_head.weight": embed.clone()}, os.path.join(path, "model.safetensors"))  # equal: tied
    assert torch.equal(load_model(path).lm_head.weight, embed)
    head_only = {k: v for k, v in weights.items() if k != "model.embed_tokens.weight"}
    save_file(head_only, os.path.join(path, "model.safetensors"))
    ours = load_model(path)
    assert torch.equal(ours.model.embed_tokens.weight, weights["lm_head.weight"])
    idx = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (padded.logits(ours, idx) - hf_logits(path, idx)).abs().max().item() <= 1e-4


def test_error_a_single_weight_file_beside_a_shard_index(tmp_path):
    """save_pretrained leaves the other layout's files behind: transformers then reads model.safetensors, the index's
    shards would be other weights (or missing). Refused, naming both, unless the index names the file itself."""
    path = str(tmp_path / "ck")
    save_model(random_model(CONFIGS["qwen2_tied"], seed=5), path, max_shard_bytes=20_000)
    save_model(random_model(CONFIGS["qwen2_tied"], seed=6), str(tmp_path / "other"))
    os.replace(str(tmp_path / "other" / "model.safetensors"), os.path.join(path, "model.safetensors"))
    with pytest.raises(common.UserError, match=r"holds both model\.safetensors and a shard index that does not name "
                                               r"it .*transformers loads model\.safetensors"):
        load_model(path)


def test_a_tokenizer_with_no_stop_token(tmp_path):
    """No eos_token and none of common.STOP_TOKENS: no response could end, so every one would score 0 (and a save
    stopped on an empty list). Generation refuses it in one line; a checkpoint saved with it has no pad id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    import toy_task
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    records = toy_task.make_records(20, seed=0)
    bpe.train_from_iterator([r["question"] + " " + toy_task.teacher_response(r) for r in records],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    assert stop_token_ids(tok) == []
    model = build_model(tiny_config(len(tok), arch="Qwen2ForCausalLM"))
    save_model(model, str(tmp_path / "ck"), tok)
    with open(tmp_path / "ck" / "generation_config.json") as f:
        assert json.load(f)["pad_token_id"] is None
    with pytest.raises(common.UserError, match="the tokenizer has no eos_token and none of the usual end tokens"):
        engine.sample_responses(model, tok, toy_task, records[:2], max_new_tokens=4)


def test_error_a_weight_that_is_not_floating_point(tmp_path):
    """copy_ would cast an integer, bool or fp8 tensor into the weight without a word (a damaged or quantized export
    whose tensor names are the model's own)."""
    from safetensors.torch import load_file, save_file
    path = write_model(tmp_path)
    weights = load_file(os.path.join(path, "model.safetensors"))
    for dtype in (torch.int32, torch.bool, torch.float8_e4m3fn):
        save_file({**weights, "model.norm.weight": weights["model.norm.weight"].to(dtype)},
                  os.path.join(path, "model.safetensors"))
        with pytest.raises(common.UserError, match=rf"tensor 'model.norm.weight' has dtype {str(dtype)[6:]}; "
                                                   r"expected a floating-point weight"):
            load_model(path)


def test_a_float64_weight_loads_as_its_values(tmp_path):
    """float64 is a floating-point weight too (an export in double precision): loaded and cast, not refused."""
    from safetensors.torch import load_file, save_file
    path = write_model(tmp_path)
    weights = load_file(os.path.join(path, "model.safetensors"))
    save_file({**weights, "model.norm.weight": weights["model.norm.weight"].double()},
              os.path.join(path, "model.safetensors"))
    model = load_model(path)
    assert torch.equal(model.state_dict()["model.norm.weight"], weights["model.norm.weight"].float())


def test_error_unsupported_architecture(tmp_path):
    path = write_model(tmp_path)
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["architectures"] = ["GPT2LMHeadModel"]
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(common.UserError, match="unsupported architecture.*Qwen2ForCausalLM.*Qwen3ForCausalLM.*Llama"):
        load_model(path)


@pytest.mark.parametrize("arch,fields,message", [
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
     "sliding-window attention"),
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "max_window_layers": 1},  # transformers' default window: 4,096
     "sliding-window attention"),
    ("Qwen3ForCausalLM", {"layer_types": ["full_attention", "sliding_attention"]}, "sliding-window attention"),
    ("Qwen2ForCausalLM", {"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
    ("LlamaForCausalLM", {"attention_bias": True}, "attention_bias is not supported"),
    ("Qwen3ForCausalLM", {"attention_bias": True}, "attention_bias is not supported"),
    ("LlamaForCausalLM", {"mlp_bias": True}, "mlp_bias is not supported"),
    ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3 rope scaling without "
     "low_freq_factor, high_freq_factor, original_max_position_embeddings"),
    ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope scaling 'yarn'"),
])
def test_config_fields_the_model_does_not_build_are_refused(arch, fields, message):
    """A field that would change the logits (transformers honours it) is one clear error, not silently dropped."""
    with pytest.raises(common.UserError, match=message):
        model_module.ModelConfig.from_hf(tiny_config(64, arch=arch, **fields))


def test_a_damaged_config_is_one_line_naming_its_field(tmp_path):
    """Every field the model reads, missing or of the wrong kind, is an error naming the file and field: a traceback
    (KeyError, AttributeError) would break the one-line promise of every script that loads a checkpoint."""
    cfg = tiny_config(64)
    for field in ("num_attention_heads", "vocab_size", "hidden_size", "num_hidden_layers"):
        with pytest.raises(common.UserError, match=f"ckpt/config.json: missing field '{field}'"):
            model_module.ModelConfig.from_hf({k: v for k, v in cfg.items() if k != field}, "ckpt/config.json")
    for field in ("rope_scaling", "rope_parameters"):
        with pytest.raises(common.UserError, match=f"field '{field}' must be an object, got 'llama3'"):
            model_module.ModelConfig.from_hf(dict(cfg, **{field: "llama3"}))
    for field, value, kind in [("hidden_size", "32", "a positive integer"), ("vocab_size", 64.0, "a positive integer"),
                               ("num_hidden_layers", None, "a positive integer"), ("head_dim", 0, "a positive integer"),
                               ("max_position_embeddings", "1024", "a positive integer"),
                               ("num_attention_heads", True, "a positive integer"),
                               ("rms_norm_eps", None, "a positive number"),
                               ("rms_norm_eps", float("nan"), "a positive number"),
                               ("rope_theta", "1e6", "a positive number"),
                               ("tie_word_embeddings", "false", "true or false")]:
        with pytest.raises(common.UserError, match=f"field '{field}' must be {kind}, got"):
            model_module.ModelConfig.from_hf(dict(cfg, **{field: value}))
    llama3 = {"rope_type": "llama3", "factor": "8", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    with pytest.raises(common.UserError, match="field 'rope_scaling.factor' must be a positive number"):
        model_module.ModelConfig.from_hf(tiny_config(64, arch="LlamaForCausalLM", rope_scaling=llama3))
    # fields that passed here and failed later, a traceback in the first forward or in reading the config
    for fields, message in [({"architectures": "Qwen2ForCausalLM"}, "field 'architectures' must be a list of names"),
                            ({"num_attention_heads": 4, "num_key_value_heads": 3}, "num_attention_heads 4 is not a "
                             "multiple of num_key_value_heads 3"),
                            ({"head_dim": 15}, "head_dim 15 is odd; RoPE needs an even one"),
                            ({"use_sliding_window": True, "max_window_layers": None},
                             "field 'max_window_layers' must be an integer >= 0, got None"),
                            ({"use_sliding_window": True, "max_window_layers": "1"}, "field 'max_window_layers'"),
                            ({"layer_types": 5}, "field 'layer_types' must be a list of names, got 5")]:
        with pytest.raises(common.UserError, match=f"^ckpt/config.json: {message}"):
            model_module.ModelConfig.from_hf(dict(cfg, **fields), "ckpt/config.json")
    # ... where transformers reads them: without a sliding window, or in a Llama config, a null is no error
    for arch, fields in (("Qwen2ForCausalLM", {"use_sliding_window": False, "max_window_layers": None}),
                         ("LlamaForCausalLM", {"max_window_layers": None, "layer_types": 5})):
        model_module.ModelConfig.from_hf(tiny_config(64, arch=arch, **fields))
    # no architectures listed: the model_type, as transformers' auto classes read it
    typed = {k: v for k, v in cfg.items() if k != "architectures"}
    assert model_module.ModelConfig.from_hf(dict(typed, model_type="qwen2")).arch == "qwen2"
    with pytest.raises(common.UserError, match="unsupported architecture 'gpt2'"):
        model_module.ModelConfig.from_hf(dict(typed, model_type="gpt2"))
    # null where transformers reads "unset": the default, as before
    unset = model_module.ModelConfig.from_hf(dict(cfg, head_dim=None, num_key_value_heads=None,
                                                  tie_word_embeddings=None, max_position_embeddings=None))
    assert (unset.head_dim, unset.num_kv_heads, unset.tie_word_embeddings, unset.max_position_embeddings) == (
        cfg["hidden_size"] // cfg["num_attention_heads"], cfg["num_attention_heads"], False, 32768)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("[1, 2]")
    with pytest.raises(common.UserError, match=r"config\.json: a model config expected, got a JSON list"):
        model_module.read_config(str(tmp_path / "ckpt"))
    # a key twice (a hand-edited config): its last value, as transformers reads it, where datasets are refused
    text = json.dumps(cfg)
    (tmp_path / "ckpt" / "config.json").write_text(text[:-1] + ', "hidden_size": ' + str(2 * cfg["hidden_size"]) + "}")
    assert model_module.read_config(str(tmp_path / "ckpt")).hidden_size == 2 * cfg["hidden_size"]
    for index, message in [("[1, 2]", "a shard index expected, got a JSON list"),  # a list where objects belong
                           ('{"weight_map": ["model.safetensors"]}', "unreadable shard index"),
                           ("{not json", "cannot read a shard index")]:
        (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(index)
        with pytest.raises(common.UserError, match=r"model\.safetensors\.index\.json: " + message):
            model_module.weight_files(str(tmp_path / "ckpt"))


def test_build_model_draws_its_weights_on_the_cpu_whatever_the_default_device():
    """The GPU suite builds the 1.5B model inside `with torch.device("cuda")`: a randn there takes the default
    device, and a CUDA randn with build_model's CPU generator raises. The meta device stands in for CUDA here: the
    device context fills in every factory call's device, which this outer mode then sees."""
    from torch.overrides import TorchFunctionMode

    class RandnDevices(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.devices = set()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.randn and "generator" in (kwargs or {}):
                self.devices.add(str(kwargs.get("device")))
            return func(*args, **(kwargs or {}))

    seen = RandnDevices()
    with seen, torch.device("meta"):
        build_model(tiny_config(64), seed=3)
    assert seen.devices == {"cpu"}


def test_config_fields_that_change_nothing_are_accepted():
    for fields in ({"use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 2},  # Qwen2.5's
                   # sliding asked for from a layer the model does not have: transformers runs full attention
                   {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2},
                   {"use_sliding_window": True, "sliding_window": 8},  # (max_window_layers' default: 28)
                   # Llama has no sliding window: transformers runs full attention whatever these say
                   {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0},
                   {"layer_types": ["full_attention"] * 2}, {"hidden_act": "swish"},
                   {"rope_scaling": {"rope_type": "default"}}, {"attention_bias": False, "mlp_bias": False}):
        assert model_module.ModelConfig.from_hf(tiny_config(64, arch="LlamaForCausalLM", **fields)).rope_scaling is None
    # Qwen2's biases, as always
    assert model_module.ModelConfig.from_hf(tiny_config(64, attention_bias=True)).arch == "qwen2"


@pytest.mark.slow  # a subprocess that imports torch
def test_error_cli_prints_one_line(tmp_path):
    import subprocess
    import sys
    code = "import common, model; common.run_main(lambda: model.load_model(%r))" % str(tmp_path / "missing")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ")


# -----------------------------------------------------------------------------
# attention dispatch: which inputs reach flash-attn, checked on CPU by pretending to be a GPU with flash-attn


@contextmanager
def cuda_autocast(dtype):
    """The autocast state flash_dtype reads for "cuda" (a CPU build of torch cannot enter torch.autocast("cuda"))."""
    before = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", before[0])
        torch.set_autocast_dtype("cuda", before[1])


on_gpu = functools.partial(flash_dtype, device_type="cuda", flash_available=True)


def qkv(dtypes=(torch.float32,) * 3, n=9, nh=4, nkv=2, hd=8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, h, n, hd, generator=g).to(d) for h, d in zip((nh, nkv, nkv), dtypes)]


def assert_flash_ready(tensors, dtype):
    for t in tensors:
        assert t.dtype == dtype and t.stride(-1) == 1, (t.dtype, t.stride())


def test_flash_dtype_fp32_on_gpu_without_autocast_uses_sdpa():
    assert on_gpu(*qkv()) is None
    with cuda_autocast(torch.float32):  # autocast to fp32 is no reason to cast either
        assert on_gpu(*qkv()) is None


def test_flash_dtype_half_on_gpu_uses_flash_with_ready_inputs():
    for half in (torch.bfloat16, torch.float16):
        q, k, v = qkv((half,) * 3)
        assert on_gpu(q, k, v) == half
    # varlen: (1, heads, N, hd) -> (N, heads, hd); a last dimension that is not contiguous gets copied
    q, k, v = qkv((torch.bfloat16,) * 3)
    k = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, stride(-1) != 1
    assert k.stride(-1) != 1
    prepared = flash_inputs(torch.bfloat16, q, k, v)
    varlen = [t[0] for t in prepared]
    assert [t.shape for t in varlen] == [(9, 4, 8), (9, 2, 8), (9, 2, 8)]
    assert_flash_ready(varlen, torch.bfloat16)
    assert torch.equal(varlen[1], k[0].transpose(0, 1))
    assert prepared[0].data_ptr() == q.data_ptr()  # no copy where none is needed
    # kvcache: (batch, heads, seqlen, hd) -> (batch, seqlen, heads, hd); the cache stays the same memory
    cache = torch.zeros(2, 5, 3, 2, 32, 8, dtype=torch.bfloat16)  # (layers, rows, ..., kv_heads, max_len, hd)
    kc = cache[1, :3, 1]
    q1, k1, v1 = (torch.randn(3, h, 1, 8, dtype=torch.bfloat16) for h in (4, 2, 2))  # one new token per row
    dq, dkc, dvc, dk, dv = flash_inputs(torch.bfloat16, q1, kc, kc, k1, v1)
    assert (dq.shape, dkc.shape, dk.shape) == ((3, 1, 4, 8), (3, 32, 2, 8), (3, 1, 2, 8))
    assert_flash_ready((dq, dkc, dvc, dk, dv), torch.bfloat16)
    assert dkc.data_ptr() == kc.data_ptr() and dkc.stride() == kc.transpose(1, 2).stride()


def test_flash_dtype_autocast_casts_fp32_qk_and_half_v():
    # capture q, k, v as the model builds them under CPU autocast with fp32 weights
    class Record:
        def attend(self, attn, q, k, v):
            self.qkv = q, k, v
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    model, rec = random_model(CONFIGS["qwen3"]), Record()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.forward(torch.tensor([[1, 2, 3, 4, 5]]), ctx=rec)
    q, k, v = rec.qkv
    # Qwen3's q/k norm: fp32 q, k; bf16 v
    assert (q.dtype, k.dtype, v.dtype) == (torch.float32, torch.float32, torch.bfloat16)
    assert on_gpu(q, k, v) is None  # without autocast on the GPU the mix stays on SDPA
    with cuda_autocast(torch.bfloat16):
        dtype = on_gpu(q, k, v)
    assert dtype == torch.bfloat16
    assert_flash_ready(flash_inputs(dtype, q, k, v), torch.bfloat16)
    with cuda_autocast(torch.float16):
        assert on_gpu(*qkv((torch.bfloat16,) * 3)) == torch.float16


def test_flash_dtype_mixed_without_autocast_uses_sdpa():
    for dtypes in [(torch.float32, torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16, torch.float16),
                   (torch.bfloat16, torch.float32, torch.bfloat16)]:
        assert on_gpu(*qkv(dtypes)) is None, dtypes


def test_flash_dtype_without_flash_or_on_cpu_uses_sdpa():
    half = qkv((torch.bfloat16,) * 3)
    assert flash_dtype(*half, device_type="cuda", flash_available=False) is None
    assert flash_dtype(*half, flash_available=True) is None  # real CPU tensors
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert flash_dtype(*half, flash_available=True) is None
    if not model_module.HAVE_FLASH_ATTN:
        assert flash_dtype(*half, device_type="cuda") is None  # the default: whether flash-attn is installed


@pytest.fixture
def pretend_gpu(monkeypatch):
    """Run the model's own attention code on CPU as if on a GPU with flash-attn: flash_dtype sees "cuda" and fake
    kernels, which check what they are handed, compute the attention. Returns the kernels' calls."""
    calls = {"varlen": [], "kvcache": []}

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal):
        lens = (cu_q[1:] - cu_q[:-1]).tolist()
        assert causal and cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and max_q == max_k == max(lens)
        assert q.dim() == k.dim() == 3 and q.shape[0] == k.shape[0] == v.shape[0] == cu_q[-1]  # (N, heads, hd)
        assert_flash_ready((q, k, v), q.dtype)
        assert q.dtype in model_module.HALF
        calls["varlen"].append(q.dtype)
        out = [F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in ts), is_causal=True, enable_gqa=True)
               for ts in zip(q.split(lens), k.split(lens), v.split(lens))]
        return torch.cat(out, dim=1).transpose(0, 1)

    def kvcache(q, k_cache, v_cache, k, v, cache_seqlens, causal):
        b = q.shape[0]
        assert causal and cache_seqlens.dtype == torch.int32 and q.shape[1] == k.shape[1] == 1
        assert k_cache.shape[0] == b and k_cache.shape[2:] == k.shape[2:]  # (batch, seqlen, heads, hd)
        assert_flash_ready((q, k_cache, v_cache, k, v), q.dtype)
        assert q.dtype in model_module.HALF
        calls["kvcache"].append(q.dtype)
        rows, cols = torch.arange(b), cache_seqlens.long()
        k_cache[rows, cols], v_cache[rows, cols] = k[:, 0], v[:, 0]  # in place, as flash does
        out = [F.scaled_dot_product_attention(q[r].transpose(0, 1), k_cache[r, :n + 1].transpose(0, 1),
                                              v_cache[r, :n + 1].transpose(0, 1), enable_gqa=True)
               for r, n in enumerate(cols.tolist())]
        return torch.stack(out).transpose(1, 2)

    for module in (model_module, engine):  # engine.py's Decode takes flash_dtype and the KV-cache kernel
        monkeypatch.setattr(module, "flash_dtype", on_gpu)
    monkeypatch.setattr(model_module, "packed_backend", functools.partial(
        packed_backend, device_type="cuda", flash_available=True, varlen_available=False))
    monkeypatch.setattr(model_module, "flash_attn_varlen_func", varlen, raising=False)
    monkeypatch.setattr(engine, "flash_attn_with_kvcache", kvcache, raising=False)
    return calls


def test_flash_path_forward_and_generation_match_sdpa(pretend_gpu, monkeypatch):
    # bf16 weights: prefill and decode take flash; same hidden states and greedy tokens as the CPU SDPA path
    model = random_model(CONFIGS["qwen3"], seed=9).to(torch.bfloat16)
    seqs = [[3, 4, 5, 6, 7], [8], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]]
    ids, cu = pack(seqs)
    with torch.no_grad():
        flash = model.forward(ids, cu_seqlens=cu)
    flash_gen = generate(model, seqs, max_new_tokens=10, temperature=0)
    assert pretend_gpu["varlen"] == [torch.bfloat16] * 4  # 2 layers, forward + prefill
    assert pretend_gpu["kvcache"] == [torch.bfloat16] * 18  # 2 layers, 9 decode steps
    for module in (model_module, engine):  # the real rule on CPU tensors: SDPA
        monkeypatch.setattr(module, "flash_dtype", flash_dtype)
    monkeypatch.setattr(model_module, "packed_backend", packed_backend)
    with torch.no_grad():
        sdpa = model.forward(ids, cu_seqlens=cu)
    assert (flash.float() - sdpa.float()).abs().max() <= 0.05 * sdpa.float().abs().max()
    assert [g.tokens for g in flash_gen] == [g.tokens for g in generate(model, seqs, max_new_tokens=10, temperature=0)]
    assert len(pretend_gpu["varlen"]) == 4 and len(pretend_gpu["kvcache"]) == 18


def test_flash_path_under_autocast_with_fp32_weights(pretend_gpu):
    # SFT's setting: fp32 weights under bf16 autocast. Packed attention takes flash with everything cast to bf16;
    # without autocast the fp32 model never takes flash
    model = random_model(CONFIGS["llama3_scaled"], seed=10)
    seqs = [[3, 4, 5, 6, 7], [8, 9, 10]]
    ids, cu = pack(seqs)
    generate(model, seqs, max_new_tokens=4, temperature=0)
    model.forward(ids, cu_seqlens=cu)
    assert pretend_gpu == {"varlen": [], "kvcache": []}
    with torch.autocast("cpu", dtype=torch.bfloat16), cuda_autocast(torch.bfloat16):
        flash = model.token_logprobs(model.forward(ids, cu_seqlens=cu)[:, :-1], ids[:, 1:])
    assert pretend_gpu == {"varlen": [torch.bfloat16] * 2, "kvcache": []}
    flash.sum().backward()  # gradients flow through the casts to the fp32 weights
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().max() > 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        sdpa = model.token_logprobs(model.forward(ids, cu_seqlens=cu)[:, :-1], ids[:, 1:])
    assert len(pretend_gpu["varlen"]) == 2  # autocast on the CPU only: the mixed dtypes stay on SDPA
    assert (flash - sdpa).abs().max() <= 0.05 * sdpa.abs().max()


# -----------------------------------------------------------------------------
# packed attention: one varlen call per layer on CUDA (flash-attn's or torch's), else a loop never on cuDNN


def test_packed_backend_dispatch_never_picks_cudnn():
    """CPU: the plain loop. CUDA: a varlen kernel for half inputs (flash-attn first, then torch's), otherwise the
    loop pinned to LOOP_BACKENDS, which leave cuDNN out (its plan cache rebuilds per sequence length)."""
    fp32, bf16 = qkv(), qkv((torch.bfloat16,) * 3)
    mixed = qkv((torch.float32, torch.float32, torch.bfloat16))
    gpu = functools.partial(packed_backend, device_type="cuda")
    assert packed_backend(*bf16, flash_available=True, varlen_available=True) == ("sdpa", None)  # CPU tensors
    assert gpu(*bf16, flash_available=True, varlen_available=True) == ("flash_attn", torch.bfloat16)
    assert gpu(*bf16, flash_available=False, varlen_available=True) == ("torch_varlen", torch.bfloat16)
    assert gpu(*bf16, flash_available=False, varlen_available=False) == ("sdpa_pinned", None)
    assert gpu(*fp32, flash_available=True, varlen_available=True) == ("sdpa_pinned", None)
    assert gpu(*mixed, flash_available=False, varlen_available=True) == ("sdpa_pinned", None)
    with cuda_autocast(torch.bfloat16):  # SFT under autocast: fp32 q/k, bf16 v, all cast for the kernel
        assert gpu(*mixed, flash_available=False, varlen_available=True) == ("torch_varlen", torch.bfloat16)
    assert torch.nn.attention.SDPBackend.CUDNN_ATTENTION not in model_module.LOOP_BACKENDS
    assert torch.nn.attention.SDPBackend.FLASH_ATTENTION in model_module.LOOP_BACKENDS
    names = {model_module.packed_backend_name(torch.device("cpu"), d) for d in (torch.float32, torch.bfloat16)}
    assert names == {"one SDPA call per sequence, float32", "one SDPA call per sequence, bfloat16"}


def varlen_torch_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """A CPU stand-in for torch.nn.attention.varlen.varlen_attn with its torch 2.13 signature."""
    assert window_size == (-1, 0) and enable_gqa == (query.shape[1] != key.shape[1])
    return varlen_reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k)


def varlen_torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1)):
    """The same with torch 2.11's signature (the GPU machine's): window_size for causal, no enable_gqa. The FA2
    kernel below it takes fewer key/value heads than query heads (repeat_kv=False hands them so)."""
    assert window_size == (-1, 0)
    return varlen_reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k)


def varlen_torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """The same with torch 2.10's signature: is_causal, no GQA (key/value must have the query's heads)."""
    assert is_causal and query.shape[1] == key.shape[1]
    return varlen_reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k)


def varlen_flash_attn(q, k, v, cu_q, cu_k, max_q, max_k, causal=False):
    """A stand-in for flash-attn's flash_attn_varlen_func."""
    assert causal
    return varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k)


def varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k):
    """What a varlen kernel computes, from what it is handed: (N, heads, hd), int32 boundaries, the longest length."""
    lens = (cu_q[1:] - cu_q[:-1]).tolist()
    assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and max_q == max_k == max(lens)
    assert q.dim() == k.dim() == 3 and q.shape[0] == k.shape[0] == cu_q[-1] and q.stride(-1) == 1
    out = [F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in ts), is_causal=True, enable_gqa=True)
           for ts in zip(q.split(lens), k.split(lens), v.split(lens))]
    return torch.cat(out, dim=1).transpose(0, 1)


def dense_block_causal(q, k, v, lens):
    """The reference: one attention over the whole row, written out, with a block-diagonal causal mask."""
    seq = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    pos = torch.arange(len(seq))
    allowed = (seq[:, None] == seq[None, :]) & (pos[:, None] >= pos[None, :])
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


@pytest.mark.parametrize("heads", [(4, 2), (4, 4)])
def test_packed_attention_paths_agree_with_a_dense_reference(heads, monkeypatch):
    """The varlen path (torch's kernel with either signature, flash-attn's), the per-sequence loop (free and
    pinned) and a dense block-diagonal reference agree in fp32 on outputs and on q, k, v gradients (<= 1e-5).
    The varlen kernels are CUDA-only: CPU stand-ins compute them, checking what they are handed."""
    lens = [5, 1, 9, 3]
    cu = torch.tensor([0, 5, 6, 15, 18])
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(1, h, sum(lens), 8, generator=g) for h in (heads[0], heads[1], heads[1])]
    monkeypatch.setattr(model_module, "flash_attn_varlen_func", varlen_flash_attn, raising=False)

    def run(fn):
        q, k, v = (t.clone().requires_grad_() for t in base)
        out = fn(q, k, v)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        return [out.detach(), q.grad, k.grad, v.grad]

    ref = run(lambda q, k, v: dense_block_causal(q, k, v, lens))
    paths = {"sdpa": None, "sdpa_pinned": None, "flash_attn": None, "torch_varlen": varlen_torch_2_13,
             "torch_varlen 2.11": varlen_torch_2_11, "torch_varlen 2.10": varlen_torch_2_10}
    for path, kernel in paths.items():
        if kernel is not None:
            monkeypatch.setattr(model_module, "torch_varlen_attn", kernel)
        backend = path.split()[0]
        got = run(lambda q, k, v: model_module.packed_attention(q, k, v, cu, lens, backend, torch.float32))
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
            assert (a - b).abs().max() <= 1e-5, (path, name)
    handed = []  # 2.11: by default the kernel gets the key/value heads as they are; repeat_kv=True repeats them

    def spy(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
        handed.append(key.shape[1])
        return varlen_torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size=window_size)
    monkeypatch.setattr(model_module, "torch_varlen_attn", spy)
    for repeat_kv, heads_handed in ((None, heads[1]), (False, heads[1]), (True, heads[0])):
        handed.clear()
        got = run(lambda q, k, v: model_module.packed_attention(q, k, v, cu, lens, "torch_varlen", torch.float32,
                                                                repeat_kv=repeat_kv))
        assert handed == [heads_handed], repeat_kv
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
            assert (a - b).abs().max() <= 1e-5, ("2.11", repeat_kv, name)


def test_pinned_loop_runs_inside_the_loop_backends(monkeypatch):
    """The per-sequence loop on CUDA runs under sdpa_kernel(LOOP_BACKENDS); on CPU under no restriction."""
    entered = []

    @contextmanager
    def record(backends):
        entered.append(list(backends))
        yield

    monkeypatch.setattr(model_module, "sdpa_kernel", record)
    q, k, v = qkv()
    lens, cu = [4, 5], torch.tensor([0, 4, 9])
    model_module.packed_attention(q, k, v, cu, lens, "sdpa")
    assert entered == []
    model_module.packed_attention(q, k, v, cu, lens, "sdpa_pinned")
    assert entered == [model_module.LOOP_BACKENDS]


def test_torch_varlen_path_trains_a_bf16_model_like_sdpa(monkeypatch):
    """A GPU without flash-attn: a bf16 model's packed forward (and its recompute) takes torch's varlen kernel, once
    per layer per pass, and gives SDPA's hidden states and gradients within bf16 rounding."""
    calls = []

    @functools.wraps(varlen_torch_2_13)  # (its signature, which torch_varlen reads)
    def kernel(*args, **kwargs):
        calls.append(args[0].dtype)
        return varlen_torch_2_13(*args, **kwargs)

    model = random_model(CONFIGS["qwen3"], seed=9).to(torch.bfloat16)
    model.gradient_checkpointing = True
    ids, cu = pack([[3, 4, 5, 6, 7], [8], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]])
    sdpa_loss, sdpa_grads = loss_and_grads(model, ids, cu)
    assert calls == []
    monkeypatch.setattr(model_module, "torch_varlen_attn", kernel)
    monkeypatch.setattr(model_module, "packed_backend", functools.partial(
        packed_backend, device_type="cuda", flash_available=False, varlen_available=True))
    loss, grads = loss_and_grads(model, ids, cu)
    assert calls == [torch.bfloat16] * 4  # 2 layers, forward + recompute
    assert abs(float(loss - sdpa_loss)) <= 0.01 * abs(float(sdpa_loss))
    for n in grads:
        assert (grads[n].float() - sdpa_grads[n].float()).norm() <= 0.05 * sdpa_grads[n].float().norm() + 1e-6, n


def test_transformers_stops_where_our_engine_stops(tiny_checkpoint, tmp_path, monkeypatch):
    """save_model writes generation_config.json with our stop ids: a checkpoint whose model emits <|im_end|> (forced
    here at step 3, the same way in both engines) ends there in transformers.generate too, as in ours; without the
    file transformers runs on to max_new_tokens."""
    from transformers import LogitsProcessor, LogitsProcessorList
    tok = load_tokenizer(tiny_checkpoint)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in stop_token_ids(tok) and im_end != tok.eos_token_id
    path = str(tmp_path / "ck")
    save_model(load_model(tiny_checkpoint), path, tok)
    with open(os.path.join(path, "generation_config.json")) as f:
        assert sorted(json.load(f)["eos_token_id"]) == stop_token_ids(tok)
    prompt = tok("<|im_start|>user\n3+4<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]

    def force(logits, step):
        if step == 3:
            logits[:, :] = -1e9
            logits[:, im_end] = 0.0
        return logits

    steps, pick = [], engine.sample_next

    def forced_pick(logits, *rest):  # our engine's token choice, with the same forcing
        steps.append(len(steps))
        return pick(force(logits, steps[-1]), *rest)

    monkeypatch.setattr(engine, "sample_next", forced_pick)
    ours = generate(load_model(path), [prompt], max_new_tokens=12, temperature=0, stop_ids=stop_token_ids(tok))[0]
    assert ours.finished and len(ours.tokens) == 4 and ours.tokens[-1] == im_end

    class Force(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return force(scores, input_ids.shape[1] - len(prompt))

    def hf_new_tokens(ckpt):
        hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=12, do_sample=False, logits_processor=LogitsProcessorList([Force()]))
        return out[0, len(prompt):].tolist()

    assert hf_new_tokens(path) == ours.tokens
    os.remove(os.path.join(path, "generation_config.json"))
    assert len(hf_new_tokens(path)) == 12  # the file is what makes it stop


def test_logged_entropy_is_computed_without_graph():
    """with_entropy="detached" (train_rl's logged entropy): the same values as the differentiable entropy, no graph
    (so backward keeps no probabilities), and the log-probs' gradient is unchanged."""
    model = random_model(CONFIGS["qwen2_tied"], seed=3)
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    grads, ents = [], []
    for mode in (True, "detached"):
        model.zero_grad()
        hidden = padded.forward(model, ids)
        lp, ent = model.token_logprobs(hidden[0, :-1], ids[0, 1:], chunk_size=7, with_entropy=mode)
        assert ent.requires_grad == (mode is True)
        lp.sum().backward()
        grads.append(model.lm_head.weight.grad.clone())
        ents.append(ent.detach())
    assert torch.allclose(ents[0], ents[1]) and torch.equal(grads[0], grads[1])


def test_training_logprobs_equal_generation_logprobs(tiny_checkpoint):
    model, tok = load_model(tiny_checkpoint), load_tokenizer(tiny_checkpoint)
    prompts = [tok("What is 1 + 2?", add_special_tokens=False)["input_ids"],
               tok("Hi", add_special_tokens=False)["input_ids"]]
    gens = generate(model, prompts, n=2, max_new_tokens=7, temperature=0.7, stop_ids=stop_token_ids(tok), seed=1)
    with torch.no_grad():
        lp = response_logprobs(model, [prompts[g.prompt_index] for g in gens], [g.tokens for g in gens],
                               temperature=0.7, chunk_size=5, with_entropy=False)
    assert torch.allclose(lp, torch.tensor([x for g in gens for x in g.logprobs]), atol=1e-5)


def test_checkpoint_policy_keeps_the_named_ops_only():
    """The selective-recompute policy saves the ops its setting names, recomputes the rest, and takes an op with no
    schema (a higher-order op under torch.compile) as one to recompute instead of failing."""
    from torch.utils.checkpoint import CheckpointPolicy
    policy = model_module.checkpoint_context("attention").args[0]
    assert policy(None, torch.ops.aten._scaled_dot_product_efficient_attention.default) == CheckpointPolicy.MUST_SAVE
    assert policy(None, torch.ops.aten.mm.default) == CheckpointPolicy.PREFER_RECOMPUTE
    assert policy(None, object()) == CheckpointPolicy.PREFER_RECOMPUTE
    matmuls = model_module.checkpoint_context("matmuls").args[0]
    assert matmuls(None, torch.ops.aten.mm.default) == CheckpointPolicy.MUST_SAVE


def test_rms_norm_reads_its_epsilon_and_rounds_as_transformers_does():
    """The config's rms_norm_eps is the one used (Llama's 1e-5, not the tiny configs' 1e-6), and in bf16 the
    normalised value is cast before the weight multiplies it, bit for bit as transformers' RMSNorm."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    cfg = model_module.ModelConfig.from_hf(tiny_config(64, arch="LlamaForCausalLM", rms_norm_eps=1e-2))
    assert cfg.rms_norm_eps == 1e-2
    x = torch.full((1, 4), 1e-3)
    assert float(model_module.rms_norm(x, torch.ones(4), 1e-2)[0, 0]) == pytest.approx(1e-3 / (1e-6 + 1e-2) ** 0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 32, generator=g).to(torch.bfloat16)
    weight = (1 + torch.randn(32, generator=g)).to(torch.bfloat16)
    hf = Qwen2RMSNorm(32, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        hf.weight.copy_(weight)
        assert torch.equal(model_module.rms_norm(x, weight, 1e-6), hf(x))


def test_save_model_keeps_every_shard_within_its_bound(tmp_path):
    """max_shard_bytes bounds each shard's tensor bytes (a tensor larger than the bound goes alone)."""
    from safetensors import safe_open
    m = build_model(tiny_config(64, hidden_size=32, num_layers=2), seed=0)
    bound = 20_000
    save_model(m, str(tmp_path / "m"), max_shard_bytes=bound)
    files = model_module.weight_files(str(tmp_path / "m"))
    assert len(files) > 1
    for path in files:
        with safe_open(path, framework="pt") as f:
            sizes = [f.get_tensor(k).nbytes for k in f.keys()]
        assert sum(sizes) <= bound or len(sizes) == 1, (path, sizes)
