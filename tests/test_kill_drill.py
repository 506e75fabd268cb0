"""The kill -9 drill (tests/kill_drill.py) at CI size: one SIGKILL of a worker of a 2-rank train_rl.py under torchrun
and one of a redistill_sft.py run, each mid-run at a seeded random moment, then --resume true to the end: the final
weights, optimizer shards and metrics must equal an uninterrupted run's. The full drill: python tests/kill_drill.py"""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import kill_drill

pytestmark = pytest.mark.slow  # each drill is a reference run, a killed run and its resume


@pytest.fixture(scope="module")
def fixtures(tiny_checkpoint, tmp_path_factory):
    return kill_drill.make_fixtures(str(tmp_path_factory.mktemp("kill_drill")), tiny=tiny_checkpoint)


@pytest.mark.parametrize("kind", [pytest.param("rl2", marks=pytest.mark.torchrun), "sft"])
def test_a_kill_mid_run_resumes_byte_identical(kind, fixtures, tmp_path):
    # a kill aimed between 20% and 60% of the training steps (the drill follows the run's own progress, so start-up
    # jitter cannot push it past the end): the resume has steps left to run
    (r,) = kill_drill.drill(kind, kills=1, seed=0, work_dir=str(tmp_path), fixtures=fixtures, window=(0.2, 0.6))
    assert r["status"] != "MISSED", r
    at, last = r["at"], kill_drill.final_step(kind)
    logged = [s for s in at["metrics_steps"] if isinstance(s, int)]
    assert at["newest"] < last and max(logged, default=0) < last, f"the kill came after the end: {at}"
    if kind == "rl2":
        assert r["rank"] in (0, 1)  # a worker was killed, not torchrun
    assert r["resumed_from"] == (at["newest"] or None)
    assert r["problems"] == [] and r["status"] == "pass"

    # the comparison sees one bit: the resumed run's final weights, one element moved by one ulp
    weights = os.path.join(r["dir"], "final" if kind == "sft" else f"step_{last:06d}", "model.safetensors")
    w = load_file(weights)
    name = sorted(w)[0]
    w[name].view(-1)[0] = torch.nextafter(w[name].view(-1)[0], torch.tensor(float("inf")))
    save_file(w, weights, metadata={"format": "pt"})
    assert kill_drill.compare(kind, r["reference"], r["dir"]) == [f"{os.path.relpath(weights, r['dir'])}.{name}: "
                                                                  "tensors differ"]
