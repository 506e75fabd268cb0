"""common.py's torchrun setup and teardown: dist_cleanup frees the process group, so no backend thread is
left running while the interpreter finalizes (a gloo worker that still holds a Python-owned tensor then dies
in a destructor: "terminate called without an active exception", SIGABRT)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import free_port, subprocess_env

RANK_SCRIPT = '''
import json, os, sys
import common
from model import load_model

def threads():
    names = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            names.append(f.read().strip())
    return sorted(names)

rank, world, device = common.dist_setup()
model = load_model(sys.argv[1])  # what every stage does after dist_setup; its meta device imports torch._dynamo
assert "torch.distributed.nn.functional" in sys.modules
gathered = common.all_gather_json({"rank": rank})
during = threads()
common.dist_cleanup()
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
