"""Elastic data-parallel training on synthetic data (numpy): peers come and go, the
model stays bit-identical on every peer.

    commlib elastic-run -n 4 examples/elastic_train.py --kill-one --join-one

--kill-one   peer 1 SIGKILLs itself in the middle of an all-reduce at step --kill-at
--join-one   peer 0 starts a new peer at step --join-at; it fetches the state and joins
--kill-coordinator  (with `elastic-run --standby`) peer 0 SIGKILLs the coordinator in the
             middle of the all-reduce at step --kill-coordinator-at; the standby takes over
Every step each peer checks state parity: the SHA-256 of its model, min- and max-reduced
over the group, must agree byte for byte.  Peer 0 prints the loss, which keeps falling.
"""
import argparse
import hashlib
import os
import select
import signal
import subprocess
import sys
import threading
import time

import numpy as np

import collectives.elastic as el


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--kill-one", action="store_true")
    ap.add_argument("--kill-at", type=int, default=15)
    ap.add_argument("--join-one", action="store_true")
    ap.add_argument("--join-at", type=int, default=25)
    ap.add_argument("--kill-coordinator", action="store_true")
    ap.add_argument("--kill-coordinator-at", type=int, default=10)
    ap.add_argument("--step-seconds", type=float, default=0.05, help="pretend compute per step")
    args = ap.parse_args()

    index = os.environ.get("COMMLIB_ELASTIC_INDEX", "?")
    joiner = index == "joiner"
    comm = el.ElasticComm()  # address and secret from commlib elastic-run's environment
    name = f"peer {index} (id {comm.peer_id})"

    def say(msg):  # one write per line: the peers share the terminal
        sys.stdout.write(f"[{name}] {msg}\n")
        sys.stdout.flush()

    # The problem every peer agrees on: y = X w_true + noise; each peer draws its own batches.
    truth = np.random.default_rng(0).normal(size=args.features)
    eval_x = np.random.default_rng(1).normal(size=(2048, args.features))
    eval_y = eval_x @ truth
    data_rng = np.random.default_rng(1000 + comm.peer_id)
    state = {"w": np.zeros(args.features), "step": np.zeros(1, np.int64)}
    fresh, spawned, killed_coordinator = joiner, None, False
    if joiner:
        say("started; waiting to be admitted")
        ready = os.environ.pop("ELASTIC_TRAIN_READY_FD", None)
        if ready:  # tell the peer that started us that we are connected (see below)
            os.write(int(ready), b"1")
            os.close(int(ready))
    while True:
        t0 = time.monotonic()
        try:
            epoch_before = comm.epoch
            comm.update_topology()
            if comm.epoch != epoch_before:
                say(f"epoch {comm.epoch}: rank {comm.rank} of {comm.world}")
            info = comm.sync_state(state, revision=None if fresh else int(state["step"][0]))
            if info["fetched_bytes"]:
                say(f"fetched the state ({info['fetched_bytes']} bytes) at revision {info['revision']}")
            fresh = False
            step = int(state["step"][0])
            if step >= args.steps:
                break
            # State parity: every peer's SHA-256 of the model, min- and max-reduced.
            digest = np.frombuffer(hashlib.sha256(state["w"].tobytes()).digest(), np.uint8)
            lo, hi = digest.copy(), digest.copy()
            comm.all_reduce(lo, op="min")
            comm.all_reduce(hi, op="max")
            if not (np.array_equal(lo, digest) and np.array_equal(hi, digest)):
                raise SystemExit(f"[{name}] state parity broken at step {step}")
            x = data_rng.normal(size=(args.batch, args.features))
            y = x @ truth + 0.01 * data_rng.normal(size=args.batch)
            grad = 2 * x.T @ (x @ state["w"] - y) / args.batch
            time.sleep(args.step_seconds)
            if args.kill_one and index == "1" and step == args.kill_at:
                say(f"step {step}: killing myself (SIGKILL) in the middle of the all-reduce")
                threading.Timer(0.002, os.kill, (os.getpid(), signal.SIGKILL)).start()
            if args.kill_coordinator and index == "0" and step == args.kill_coordinator_at and not killed_coordinator:
                pids = os.environ.get("COMMLIB_ELASTIC_COORDINATOR_PIDS", "")
                if not pids:
                    raise SystemExit("--kill-coordinator needs `commlib elastic-run --standby`")
                say(f"step {step}: killing the coordinator (SIGKILL, pid {pids.split(',')[0]}) during the all-reduce")
                killed_coordinator = True
                threading.Timer(0.002, os.kill, (int(pids.split(",")[0]), signal.SIGKILL)).start()
            comm.all_reduce(grad, op="avg")
        except el.PeerFailure as e:
            say(f"PeerFailure (after {time.monotonic() - t0:.2f} s): {str(e)[:110]}; retrying")
            continue
        state["w"] -= args.lr * grad
        state["step"] += 1
        if comm.rank == 0 and (step % 5 == 0 or step + 1 == args.steps):
            loss = float(np.mean((eval_x @ state["w"] - eval_y) ** 2))
            say(f"step {step + 1:3d}  world {comm.world}  loss {loss:.6f}  parity ok "
                f"(sha256 {hashlib.sha256(state['w'].tobytes()).hexdigest()[:16]})")
        if args.join_one and index == "0" and step + 1 == args.join_at and spawned is None:
            say("starting a new peer")
            argv = [a for a in sys.argv[1:] if a not in ("--kill-one", "--join-one", "--kill-coordinator")]
            # The joiner starts an interpreter and imports numpy and the engine: on a
            # fast machine the run could end first.  Wait until it is connected and waiting;
            # the next update_topology admits it.
            r, w = os.pipe()
            spawned = subprocess.Popen([sys.executable, sys.argv[0], *argv], pass_fds=(w,),
                                       env=dict(os.environ, COMMLIB_ELASTIC_INDEX="joiner",
                                                ELASTIC_TRAIN_READY_FD=str(w)))
            os.close(w)
            if not select.select([r], [], [], 120)[0]:
                say("the new peer did not connect within 120 s")
            os.close(r)
    loss = float(np.mean((eval_x @ state["w"] - eval_y) ** 2))
    say(f"done at step {int(state['step'][0])}, loss {loss:.6f}, "
        f"model sha256 {hashlib.sha256(state['w'].tobytes()).hexdigest()[:16]}")
    comm.close()
    if spawned is not None:
        spawned.wait()


if __name__ == "__main__":
    main()
