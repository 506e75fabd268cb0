"""bench.py --gpu_suite --smoke: the GPU suite's code runs end to end on CPU, so a lent GPU's few minutes are not
spent finding a typo, and the checks it makes on a GPU hold on CPU where they must (fp32 equals transformers)."""
import json
import math

import pytest

import bench
from common import UserError


@pytest.mark.slow
def test_gpu_suite_smoke_runs_every_section_and_its_checks_hold(tmp_path):
    out = tmp_path / "suite.json"
    bench.main(["--gpu_suite", "true", "--smoke", "true", "--json_out", str(out)])
    result = json.loads(out.read_text())
    for section in bench.SUITE_SECTIONS:
        assert "error" not in result[section], result[section].get("traceback")
    c = result["correctness"]
    assert c["greedy_fp32"]["identical"] == c["greedy_fp32"]["prompts"] == 4
    assert c["logits_fp32_vs_transformers"]["rel"] < 1e-5
    assert c["logprob_gap_fp32"]["max_abs"] < 1e-4
    assert 0 < c["logits_bf16_vs_fp32"]["ours"]["rel"] < 0.05  # bf16 differs from fp32, but not wildly
    assert c["logprob_gap_bf16"]["tokens"] == 4 * 4 * result["sizes"]["gap_new"]
    gen = result["generation"]
    assert [w["prompts"] for w in gen["workloads"]] == result["sizes"]["gen_prompts"]
    assert all(w["ours_tok_s"] > 0 and w["hf_tok_s"] > 0 for w in gen["workloads"])
    # a difference of two timings: on a busy CPU it can come out <= 0, so only its presence is checked here
    assert gen["decode_step"][0]["rows"] == 16 and math.isfinite(gen["decode_step"][0]["step_ms_wall"])
    assert result["sft"]["measured_steps"] == [2] and result["sft"]["tokens_per_s"] > 0
    rl = result["rl"]
    assert rl["rollouts"] == 4 * 2 and rl["train_tokens"] > 0
    assert rl["step_s"] >= rl["gen_s"] + rl["train_s"] and rl["logprob_gap"] < 1e-4


def test_gpu_suite_without_cuda_says_so():
    with pytest.raises(UserError, match="--smoke"):
        bench.main(["--gpu_suite", "true"])
