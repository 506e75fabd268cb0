"""train_rl.py with rollouts that depend only on the prompt, not on which rank drew it: a 1-rank and a 2-rank
run then train on the same data, so their updates can be compared. Run as train_rl.py is (python or torchrun),
with train_rl.py's arguments. With KILL_AT_STEP=N in the environment, each rank dies inside step N's update
(a killed run, for resume tests). With NO_SIGNAL_STEP=N, every rollout of step N gets reward 1: no group has a
signal (a step that may train nothing)."""
import os
import random
import sys

import common
import engine
import train_rl


def fixed_rollouts(model, tokenizer, task, records, n=1, max_new_tokens=16, template="auto", **_):
    no_signal = step_now[0] == int(os.environ.get("NO_SIGNAL_STEP", -1))
    out = []
    for r in records:
        rng = random.Random(r["id"])
        prompt = task.render_prompt(r, tokenizer, template)
        for k in range(n):
            length = rng.randint(1, max_new_tokens)
            out.append({"id": r["id"], "prompt": prompt, "response": "", "finished": True, "length": length,
                        "tokens": [rng.randrange(len(tokenizer)) for _ in range(length)], "logprobs": [0.0] * length,
                        "reward": 1.0 if no_signal else float(rng.random() < 0.5), "sample": k})
    return out


kill_at, step_now = int(os.environ.get("KILL_AT_STEP", 0)), [0]
real_lr, real_loss = train_rl.lr_at, train_rl.ppo_clip_loss


def lr_at(step, *args):  # called once at the start of every step
    step_now[0] = step
    return real_lr(step, *args)


def ppo_clip_loss(*args, **kwargs):
    if step_now[0] == kill_at:  # dies as a kill does, with no unwinding: an exception would free buffers that
        # FSDP's asynchronous reduce-scatter of the last micro-batch may still be writing (heap corruption, SIGABRT)
        print(f"killed in step {kill_at}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    return real_loss(*args, **kwargs)


if __name__ == "__main__":  # patched only when run: tests import fixed_rollouts alone
    engine.sample_responses = fixed_rollouts
    train_rl.lr_at, train_rl.ppo_clip_loss = lr_at, ppo_clip_loss
    common.run_main(lambda: train_rl.main(sys.argv[1:]))
