"""Coordinator failover (collectives.elastic): a standby takes over membership, epochs,
verdicts and revisions when the active coordinator is SIGKILLed - between steps and in the
middle of an all-reduce - and training goes on with no lost step and bit-identical state.
Peers are processes (tests/elastic_worker.py); the primary coordinator is a process
(`commlib coordinator`), so that it can be SIGKILLed; the standby runs on a thread of the
test process (its info() is read) unless the test needs it killed too."""
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import collectives.elastic as el
import harness

WORKER = os.path.join(harness.TESTS_DIR, "elastic_worker.py")
SECRET = "test-secret"
TIMEOUT = 2.0  # COMMLIB_ELASTIC_TIMEOUT for these tests
RECOVERY_BOUND = 5.0  # the goal: the next committed step within 5 s of the kill


@pytest.fixture(autouse=True)
def short_timeout(monkeypatch):
    monkeypatch.setenv("COMMLIB_ELASTIC_TIMEOUT", str(TIMEOUT))
    # The in-process coordinators' membership log only when asked (ELASTIC_TEST_LOG=1).
    monkeypatch.setenv("COMMLIB_ELASTIC_QUIET", "0" if os.environ.get("ELASTIC_TEST_LOG") else "1")


def env(**extra):
    return harness.clean_env(COMMLIB_ELASTIC_TIMEOUT=str(TIMEOUT), PYTHONFAULTHANDLER="1", **extra)


class Proc(harness.Pumped):
    """A child whose stdout (JSON events) and stderr are read as they come."""

    def __init__(self, cmd, extra_env=None):
        super().__init__(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env=env(**(extra_env or {}))))

    def events(self):
        return [json.loads(line) for line in list(self.lines) if line.startswith("{")]

    def steps(self):
        return [e for e in self.events() if e.get("event") == "step"]

    def wait_for(self, predicate, seconds, what):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"{what}: not within {seconds} s; stderr: {''.join(self.err)[-2000:]}")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)

    def finish(self):
        self.kill()
        self.proc.wait(timeout=30)
        for t in self.threads:
            t.join(timeout=10)
        return self.events(), "".join(self.err)


def start_primary(tmp_path, min_peers, extra_env=None, standby_of=None):
    """`commlib coordinator` (--standby-of) as a process; returns (Proc, address) once it listens."""
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    extra = ["--standby-of", standby_of] if standby_of else []
    co = Proc([*harness.commlib_cli(), "coordinator", "--host", "127.0.0.1", "--port", "0", "--secret-file", str(secret),
               "--min-peers", str(min_peers), *extra], extra_env=dict({"COMMLIB_ELASTIC_QUIET": "0"}, **(extra_env or {})))
    co.wait_for(lambda: any("listening on" in ln for ln in co.err), 30, "the primary coordinator listens")
    line = next(ln for ln in co.err if "listening on" in ln)
    return co, "127.0.0.1:" + line.split("listening on ")[1].split()[0].rsplit(":", 1)[1]


def peer(address, *args):
    return Proc([sys.executable, WORKER, address, *map(str, args)])


def check_steps(all_events):
    """Every committed step right on every peer, the same state everywhere, and no step
    lost or taken twice: each peer's steps are consecutive."""
    by_step = {}
    for evs in all_events:
        steps = [e["step"] for e in evs if e.get("event") == "step"]
        assert steps == list(range(steps[0], steps[0] + len(steps))) if steps else True, steps
        for e in evs:
            if e.get("event") == "step":
                assert e["ok"], e
                by_step.setdefault(e["step"], set()).add(e["state"])
            if e.get("event") == "failure":
                assert e["restored"], e  # rolled back: the buffer as before the call
    assert by_step, "no step completed"
    for step, states in by_step.items():
        assert len(states) == 1, f"step {step}: the peers' states differ"
    return by_step


def recovery_seconds(peers, killed_at, world=None):
    """Per peer: from the kill to the commit of its first all-reduce the standby committed (of
    that world size when given).  A step a peer records after the kill may still be the
    primary's: the verdict left before the kill and the peer ran later (a loaded machine).
    The primary's last commit s had every peer's report, so every peer had committed s - 1
    before the kill: s <= m + 1, m the lowest of the peers' last steps before the kill.  The
    steps past m + 1 are the standby's (an upper bound: one step more than needed at worst).
    Each peer must have a step after the kill (its earlier lines are read by then)."""
    m = min(max([e["step"] for e in p.steps() if e["t"] <= killed_at], default=0) for p in peers)
    out = []
    for p in peers:
        after = [e["t"] for e in p.steps() if e["t"] > killed_at and
                 (e["world"] == world if world is not None else e["step"] > m + 1)]
        assert after, f"a peer took no step the standby committed: {''.join(p.err)[-2000:]}"
        out.append(after[0] - killed_at)
    return out


def test_standby_takes_over_between_steps_then_a_peer_dies_and_one_joins(tmp_path):
    """(a) SIGKILL of the primary while 3 peers train: the standby takes over, every step
    exact and identical, none lost; (d) after the failover a peer is SIGKILLed and a new one
    joins through the address list: it fetches the state, bit-identical."""
    primary, address = start_primary(tmp_path, 3)
    with el.Coordinator(0, secret=SECRET, host="127.0.0.1", min_peers=3, standby_of=address) as standby:
        assert standby.info()["role"] == "standby"
        addresses = f"{address},{standby.address}"
        peers = [peer(addresses, "loop", 10 ** 6, 10_000, "--pause", 0.02) for _ in range(3)]
        try:
            for p in peers:
                p.wait_for(lambda p=p: len(p.steps()) >= 8, 60, "8 steps before the kill")
            primary.kill()
            killed_at = time.monotonic()
            for p in peers:  # two: the first may be the primary's (see recovery_seconds)
                p.wait_for(lambda p=p: sum(e["t"] > killed_at for e in p.steps()) >= 2, 30, "2 steps after the kill")
            took = recovery_seconds(peers, killed_at)
            info = standby.info()
            assert info["role"] == "active" and info["failovers"] == 1 and info["world"] == 3, info
            # (d) a member dies after the failover; a joiner comes through the list (the dead
            # primary first: refused connection, next address).
            for p in peers:
                p.wait_for(lambda p=p: sum(e["t"] > killed_at for e in p.steps()) >= 5, 30, "5 steps after the kill")
            peers[1].kill()
            joiner = peer(addresses, "loop", 10 ** 6, 10_000, "--pause", 0.02, "--join")
            joiner.wait_for(lambda: len(joiner.steps()) >= 3, 60, "the joiner takes 3 steps")
            survivors = [peers[0], peers[2], joiner]
            last = max(e["step"] for e in joiner.steps())
            for p in survivors:
                p.wait_for(lambda p=p: any(e["step"] >= last for e in p.steps()), 30, "everyone at the joiner's step")
            final = standby.info()
        finally:
            outs = [p.finish() for p in peers + [joiner if "joiner" in locals() else primary]]
            primary.finish()
    for evs, err in outs:
        assert "Traceback" not in err and "Fatal Python error" not in err, err[-3000:]
    all_events = [evs for evs, _ in outs]
    check_steps(all_events)
    joined = [e for e in all_events[3] if e.get("event") == "step"]
    assert joined[0]["fetched"] > 0 and joined[-1]["world"] == 3, joined[:2]
    assert final["world"] == 3 and final["role"] == "active", final
    print(f"kill -> next committed step: {', '.join(f'{t:.3f}' for t in took)} s; standby {final}")
    assert max(took) < RECOVERY_BOUND, took


@pytest.mark.parametrize("held", ["every-peer-reported", "rank0-committed"])
def test_sigkill_while_peers_wait_for_the_verdict(tmp_path, held):
    """(b) The primary holds one all-reduce's verdict (test knob) - from everyone, or sent
    to rank 0 only - and is SIGKILLed while the peers wait for it.  The standby must commit
    that operation on every peer (every member reported ok; or one member already
    committed it): nobody rolls back what another committed, and no step is lost."""
    hold = 6 if held == "every-peer-reported" else -6
    primary, address = start_primary(tmp_path, 3, {"COMMLIB_ELASTIC_TEST_HOLD_VERDICT": str(hold)})
    with el.Coordinator(0, secret=SECRET, host="127.0.0.1", min_peers=3, standby_of=address) as standby:
        peers = [peer(f"{address},{standby.address}", "loop", 10 ** 6, 50_000, "--pause", 0.01) for _ in range(3)]
        try:
            primary.wait_for(lambda: any("holding the verdict" in ln for ln in primary.err), 60, "the held verdict")
            time.sleep(0.2)  # the peers are inside the all-reduce, waiting for the verdict
            before = [len(p.steps()) for p in peers]
            primary.kill()
            killed_at = time.monotonic()
            for p in peers:
                p.wait_for(lambda p=p: sum(e["t"] > killed_at for e in p.steps()) >= 3, 30, "3 steps after the kill")
            took = recovery_seconds(peers, killed_at)
            info = standby.info()
        finally:
            outs = [p.finish() for p in peers]
            primary.finish()
    for evs, err in outs:
        assert "Traceback" not in err and "Fatal Python error" not in err, err[-3000:]
    all_events = [evs for evs, _ in outs]
    check_steps(all_events)
    # The held operation was step 6's all-reduce: committed everywhere, not retried (the
    # failures the teardown's kills cause come after step 8).
    for evs in all_events:
        upto = next(i for i, e in enumerate(evs) if e.get("event") == "step" and e["step"] == 8)
        assert not [e for e in evs[:upto] if "failure" in e.get("event", "")], evs[:upto]
    if held == "every-peer-reported":  # nobody had it before the kill
        assert before == [5, 5, 5], before
    for evs in all_events:
        assert [e["step"] for e in evs if e.get("event") == "step"][:8] == list(range(1, 9))
    assert info["failovers"] == 1 and info["aborts"] == 0 and info["resumed"] == 3, info
    # Inside the all-reduce: every peer (or every one but rank 0) waited for the verdict.
    assert info["resumed_waiting"] == (3 if held == "every-peer-reported" else 2), info
    print(f"held verdict ({held}): kill -> next committed step {', '.join(f'{t:.3f}' for t in took)} s")
    assert max(took) < RECOVERY_BOUND, took


def test_sigkill_at_a_random_point_of_a_large_all_reduce(tmp_path):
    """(b) The primary dies at a random moment while 8 MiB all-reduces run (most of a step):
    whatever the peers were doing, they all commit an operation or all roll it back."""
    seed = random.randrange(1 << 30)
    print("seed", seed)
    primary, address = start_primary(tmp_path, 3)
    with el.Coordinator(0, secret=SECRET, host="127.0.0.1", min_peers=3, standby_of=address) as standby:
        peers = [peer(f"{address},{standby.address}", "loop", 10 ** 6, 1 << 20, "--pause", 0.0) for _ in range(3)]
        try:
            for p in peers:
                p.wait_for(lambda p=p: len(p.steps()) >= 3, 60, "3 steps before the kill")
            time.sleep(random.Random(seed).uniform(0.0, 0.3))
            primary.kill()
            killed_at = time.monotonic()
            for p in peers:
                p.wait_for(lambda p=p: sum(e["t"] > killed_at for e in p.steps()) >= 2, 30, "2 steps after the kill")
            took = recovery_seconds(peers, killed_at)
            info = standby.info()
        finally:
            outs = [p.finish() for p in peers]
            primary.finish()
    for evs, err in outs:
        assert "Traceback" not in err and "Fatal Python error" not in err, err[-3000:]
    check_steps([evs for evs, _ in outs])
    assert info["failovers"] == 1, info
    print(f"random kill: kill -> next committed step {', '.join(f'{t:.3f}' for t in took)} s; standby {info}")
    assert max(took) < RECOVERY_BOUND, took


def test_standby_refuses_peers_and_a_wrong_secret_standby_is_refused():
    """(c) While its primary lives a standby refuses peers, saying why; a standby with the
    wrong secret is refused by the primary (AuthError, counted there); a peer given
    "standby,primary" goes on to the primary; the primary tells its peers the standby."""
    with el.Coordinator(0, secret=SECRET, host="127.0.0.1") as primary:
        with el.Coordinator(0, secret=SECRET, host="127.0.0.1", standby_of=primary.address) as standby:
            with pytest.raises(el.CoordinatorLost, match=f"standby of {primary.address}, not active"):
                el.ElasticComm(standby.address, secret=SECRET)
            with pytest.raises(el.AuthError, match="wrong secret"):
                el.Coordinator(0, secret="wrong", host="127.0.0.1", standby_of=primary.address)
            assert primary.info()["refused"] == 1 and primary.info()["standbys"] == 1, primary.info()
            with pytest.raises(el.CoordinatorLost):
                el.Coordinator(0, secret=SECRET, host="127.0.0.1", standby_of="127.0.0.1:1")
            with el.ElasticComm(f"{standby.address},{primary.address}", secret=SECRET) as comm:
                comm.update_topology(timeout=10)
                x = np.arange(6, dtype=np.int64)
                comm.all_reduce(x, op="sum")
                assert x.tolist() == list(range(6))
            assert standby.info()["refused"] == 2 and standby.info()["role"] == "standby", standby.info()
            assert primary.info()["commits"] == 1


def test_peer_alone_follows_the_standby_it_was_told_about(monkeypatch):
    """A peer given only the primary's address learns the standby from it (F_STANDBYS) and
    follows it when the primary stops; the operation after that commits."""
    with el.Coordinator(0, secret=SECRET, host="127.0.0.1") as primary:
        standby = el.Coordinator(0, secret=SECRET, host="127.0.0.1", standby_of=primary.address)
        try:
            with el.ElasticComm(primary.address, secret=SECRET) as comm:
                comm.update_topology(timeout=10)
                epoch = comm.epoch
                time.sleep(0.3)  # the standby list reaches the peer
                primary.stop()
                t0 = time.monotonic()
                x = np.full(4, 2.5, np.float32)
                comm.all_reduce(x, op="sum")
                assert x.tolist() == [2.5] * 4
                assert comm.update_topology(timeout=10) == epoch  # the same epoch goes on
                took = time.monotonic() - t0
            assert standby.info()["failovers"] == 1 and standby.info()["commits"] == 1, standby.info()
        finally:
            standby.stop()
    assert took < RECOVERY_BOUND


def test_no_coordinator_left_is_coordinator_lost_never_a_hang(monkeypatch):
    """(e) Both coordinators gone: CoordinatorLost once the failover window closes; with a
    single address and no standby, CoordinatorLost at once, as before failover existed."""
    monkeypatch.setenv("COMMLIB_ELASTIC_FAILOVER_TIMEOUT", "1.5")
    with el.Coordinator(0, secret=SECRET, host="127.0.0.1") as primary:
        standby = el.Coordinator(0, secret=SECRET, host="127.0.0.1", standby_of=primary.address)
        comm = el.ElasticComm(f"{primary.address},{standby.address}", secret=SECRET)
        comm.update_topology(timeout=10)
        standby.stop()
        primary.stop()
        t0 = time.monotonic()
        with pytest.raises(el.CoordinatorLost, match="no coordinator took over within 1.5 s"):
            comm.all_reduce(np.ones(3))
        took = time.monotonic() - t0
        comm.close(graceful=False)
    assert took < 1.5 + 2 * TIMEOUT, took
    with el.Coordinator(0, secret=SECRET, host="127.0.0.1") as lone:
        comm = el.ElasticComm(lone.address, secret=SECRET)
        comm.update_topology(timeout=10)
        lone.stop()
        t0 = time.monotonic()
        with pytest.raises(el.CoordinatorLost):
            comm.all_reduce(np.ones(3))
        assert time.monotonic() - t0 < TIMEOUT
        comm.close(graceful=False)


def test_elastic_run_standby_survives_killing_the_coordinator():
    """`commlib elastic-run --standby`: the coordinator and a standby as processes; peer 0
    of the example SIGKILLs the coordinator mid-run; the 3 peers end at the same model."""
    script = os.path.join(harness.ROOT, "examples", "elastic_train.py")
    proc = subprocess.run([*harness.commlib_cli(), "elastic-run", "-n", "3", "--standby", script, "--kill-coordinator",
                           "--steps", "25", "--step-seconds", "0.02"], capture_output=True, text=True, timeout=120,
                          env=env(COMMLIB_ELASTIC_QUIET="1"))
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    assert "killing the coordinator" in out, out
    finals = {line.split("model sha256 ")[1] for line in out.splitlines() if "model sha256 " in line}
    assert len(finals) == 1 and out.count("done at step 25") == 3, out


def test_a_chain_of_standbys_takes_over_twice():
    """C standby of B standby of A: the peer, given only A, learns B and C (B tells A its own
    standby); A dies, B takes over; B dies, C takes over; every operation commits."""
    a = el.Coordinator(0, secret=SECRET, host="127.0.0.1")
    b = el.Coordinator(0, secret=SECRET, host="127.0.0.1", standby_of=a.address)
    c = el.Coordinator(0, secret=SECRET, host="127.0.0.1", standby_of=b.address)
    try:
        with el.ElasticComm(a.address, secret=SECRET) as comm:
            comm.update_topology(timeout=10)
            time.sleep(0.5)  # the standby lists travel C -> B -> A -> peer
            for victim, heir, value in ((a, b, 1), (b, c, 2)):
                victim.stop()
                x = np.full(3, value, np.int32)
                comm.all_reduce(x, op="max")
                assert x.tolist() == [value] * 3
                info = heir.info()
                assert info["role"] == "active" and info["failovers"] == 1 and info["commits"] >= 1, info
                time.sleep(0.3)  # the heir's own standby list reaches the peer
            assert comm.epoch == 1  # one epoch throughout: nobody was lost
    finally:
        for co in (a, b, c):
            co.stop()


def test_primary_and_a_peer_killed_together(tmp_path):
    """The primary and a member die at once: the member does not come back, so the standby
    aborts the epoch (what the primary would have done), the survivors roll back whatever
    was in flight and go on in a smaller epoch, states identical, no step lost."""
    primary, address = start_primary(tmp_path, 3)
    with el.Coordinator(0, secret=SECRET, host="127.0.0.1", min_peers=3, standby_of=address) as standby:
        peers = [peer(f"{address},{standby.address}", "loop", 10 ** 6, 100_000, "--pause", 0.01) for _ in range(3)]
        try:
            for p in peers:
                p.wait_for(lambda p=p: len(p.steps()) >= 5, 60, "5 steps before the kill")
            peers[2].kill()
            primary.kill()
            killed_at = time.monotonic()
            for p in peers[:2]:
                p.wait_for(lambda p=p: sum(e["t"] > killed_at and e["world"] == 2 for e in p.steps()) >= 3, 30,
                           "3 steps in the smaller epoch")
            took = recovery_seconds(peers[:2], killed_at, world=2)
            info = standby.info()
        finally:
            outs = [p.finish() for p in peers]
            primary.finish()
    for evs, err in outs[:2]:
        assert "Traceback" not in err and "Fatal Python error" not in err, err[-3000:]
    check_steps([evs for evs, _ in outs])
    assert info["failovers"] == 1 and info["world"] == 2, info
    print(f"primary + peer killed: kill -> next committed step {', '.join(f'{t:.3f}' for t in took)} s "
          f"(one COMMLIB_ELASTIC_TIMEOUT waiting for the dead member's RESUME)")
    assert max(took) < TIMEOUT + RECOVERY_BOUND, took


def test_sync_state_in_flight_fails_retryably_and_the_retry_keeps_the_revision_rule():
    """A sync_state waiting for the others when the primary dies fails with PeerFailure
    (the new coordinator cannot know how far it got); update_topology + sync_state again
    succeed on the new coordinator with the same revision, the state identical."""
    with el.Coordinator(0, secret=SECRET, host="127.0.0.1", min_peers=2) as primary:
        standby = el.Coordinator(0, secret=SECRET, host="127.0.0.1", min_peers=2, standby_of=primary.address)
        comms = [el.ElasticComm(f"{primary.address},{standby.address}", secret=SECRET) for _ in range(2)]
        try:
            states = [{"w": np.arange(8.0) * (i + 1)} for i in range(2)]  # peer 0's wins at revision 0 (lowest rank)
            threads = [threading.Thread(target=c.update_topology, kwargs={"timeout": 10}) for c in comms]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            outcome = {}

            def first_sync(i):
                try:
                    outcome[i] = comms[i].sync_state(states[i], revision=0, timeout=20)
                except el.ElasticError as e:
                    outcome[i] = e
            t = threading.Thread(target=first_sync, args=(0,))
            t.start()
            time.sleep(0.3)  # peer 0 waits in sync_state for peer 1
            primary.stop()
            t.join(timeout=30)
            assert isinstance(outcome[0], el.PeerFailure), outcome
            results = {}

            def retry(i):
                comms[i].update_topology(timeout=10)
                results[i] = comms[i].sync_state(states[i], revision=0, timeout=10)
            threads = [threading.Thread(target=retry, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=30)
            assert [results[i]["revision"] for i in range(2)] == [0, 0], results
            assert states[0]["w"].tobytes() == states[1]["w"].tobytes()
            info = standby.info()
            assert info["failovers"] == 1 and info["aborts"] == 1 and info["world"] == 2, info
        finally:
            for c in comms:
                c.close(graceful=False)
            standby.stop()


def test_rolling_coordinator_kills(tmp_path):
    """Three failovers in a row, every coordinator a process: each time the active one is
    SIGKILLed, its standby takes over and a fresh standby of the new active one is started;
    the peers learn each new standby from their coordinator (they were given only the first
    two addresses).  Every step exact, identical and consecutive on every peer."""
    active, active_address = start_primary(tmp_path, 3)
    standby, standby_address = start_primary(tmp_path, 3, standby_of=active_address)
    coordinators = [active, standby]
    peers = [peer(f"{active_address},{standby_address}", "loop", 10 ** 6, 200_000, "--pause", 0.01) for _ in range(3)]
    took = []
    try:
        for p in peers:
            p.wait_for(lambda p=p: len(p.steps()) >= 3, 60, "3 steps")
        for _ in range(3):
            time.sleep(0.5)  # the newest standby's address reaches the peers
            active.kill()
            killed_at = time.monotonic()
            active, active_address = standby, standby_address
            standby, standby_address = start_primary(tmp_path, 3, standby_of=active_address)
            coordinators.append(standby)
            for p in peers:
                p.wait_for(lambda p=p: sum(e["t"] > killed_at for e in p.steps()) >= 3, 30, "3 steps after a kill")
            took.append(max(recovery_seconds(peers, killed_at)))
    finally:
        outs = [p.finish() for p in peers]
        logs = [c.finish()[1] for c in reversed(coordinators)]  # the newest standby first: no 4th takeover
    for evs, err in outs:
        assert "Traceback" not in err and "Fatal Python error" not in err, err[-3000:]
    check_steps([evs for evs, _ in outs])
    assert sum("takes over" in log for log in logs) == 3, logs
    print(f"rolling kills: kill -> next committed step {', '.join(f'{t:.3f}' for t in took)} s")
    assert max(took) < RECOVERY_BOUND, took


def test_a_waiting_peer_keeps_waiting_through_the_failover():
    """A peer waiting to be admitted (update_topology in flight, min_peers not reached)
    when the primary dies resumes as a waiting peer; a second peer arriving at the new
    coordinator completes the first epoch, and both all-reduce."""
    with el.Coordinator(0, secret=SECRET, host="127.0.0.1", min_peers=2) as primary:
        standby = el.Coordinator(0, secret=SECRET, host="127.0.0.1", min_peers=2, standby_of=primary.address)
        addresses = f"{primary.address},{standby.address}"
        first = el.ElasticComm(addresses, secret=SECRET)
        try:
            results = {}

            def member(comm, value):
                comm.update_topology(timeout=20)
                x = np.array([value], np.int64)
                comm.all_reduce(x, op="sum")
                results[value] = (comm.epoch, comm.world, int(x[0]))
            t = threading.Thread(target=member, args=(first, 5))
            t.start()
            time.sleep(0.3)  # first waits in update_topology
            primary.stop()
            deadline = time.monotonic() + 10
            while standby.info()["role"] != "active" and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.2)  # the waiting peer resumes
            assert standby.info()["waiting"] == 1 and standby.info()["world"] == 0, standby.info()
            with el.ElasticComm(addresses, secret=SECRET) as second:
                member(second, 7)
                t.join(timeout=20)
            assert results == {5: (1, 2, 12), 7: (1, 2, 12)}, results
        finally:
            first.close(graceful=False)
            standby.stop()
