"""`commlib coordinator` and `commlib elastic-run` (the elastic all-reduce's launchers)."""
import argparse
import os
import secrets
import signal
import select
import subprocess
import sys
import tempfile
import threading
import time


def cmd_coordinator(args):
    """Runs a coordinator in the foreground until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(prog="commlib coordinator",
                                     description="elastic all-reduce coordinator (membership, verdicts, state revisions)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret-file", required=True, help="file holding the shared secret (peers need the same)")
    parser.add_argument("--host", default="0.0.0.0", help="address to bind (default: all)")
    parser.add_argument("--min-peers", type=int, default=1, help="peers needed to form the first epoch")
    parser.add_argument("--standby-of", metavar="HOST:PORT", default=None,
                        help="run as a standby of that coordinator: refuse peers while it lives, take over when it dies")
    opts = parser.parse_args(args)
    import collectives.elastic as el
    try:
        secret = el.read_secret_file(opts.secret_file)
    except (OSError, ValueError) as e:
        print(f"commlib coordinator: {e}", file=sys.stderr)
        return 2
    try:
        co = el.Coordinator(opts.port, secret=secret, host=opts.host, min_peers=opts.min_peers, standby_of=opts.standby_of)
    except el.ElasticError as e:
        print(f"commlib coordinator: {e}", file=sys.stderr)
        return 1
    role = f" (standby of {opts.standby_of})" if opts.standby_of else ""
    print(f"commlib coordinator: listening on {opts.host}:{co.port}{role}", file=sys.stderr, flush=True)
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(1))
    while not stop:
        time.sleep(0.2)
    print(f"commlib coordinator: stopping ({co.info()})", file=sys.stderr)
    co.stop()
    return 0


def _commlib_command():
    """The installed `commlib` command (`python -m commlib` from a source checkout would
    import the unbuilt tree)."""
    script = os.path.join(os.path.dirname(sys.executable), "commlib")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "commlib"]


def _start_coordinator(secret_file, min_peers, standby_of=None, deadline_s=60):
    """A coordinator as a child process (so that it can be SIGKILLed on its own); returns
    (process, "127.0.0.1:PORT") once it listens.  Its log goes on to our stderr."""
    cmd = [*_commlib_command(), "coordinator", "--host", "127.0.0.1", "--port", "0", "--secret-file", secret_file,
           "--min-peers", str(min_peers)]
    if standby_of:
        cmd += ["--standby-of", standby_of]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + deadline_s
    address = None
    while address is None:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stderr], [], [], left)[0]:
            proc.kill()
            raise RuntimeError(f"the coordinator ({' '.join(cmd)}) did not listen within {deadline_s} s")
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError(f"the coordinator ({' '.join(cmd)}) exited: {proc.wait()}")
        sys.stderr.write(line)
        if "listening on " in line:
            address = "127.0.0.1:" + line.split("listening on ", 1)[1].split()[0].rsplit(":", 1)[1]

    def pump():  # the rest of its log (a full pipe would stall the coordinator)
        for rest in proc.stderr:
            sys.stderr.write(rest)
    threading.Thread(target=pump, daemon=True).start()
    return proc, address


def cmd_elastic_run(args):
    """Starts an embedded coordinator and N peers running SCRIPT; returns when they end."""
    parser = argparse.ArgumentParser(prog="commlib elastic-run",
                                     description="run N peers of an elastic training script on this machine")
    parser.add_argument("-n", type=int, required=True, help="number of peers")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (default: any free one)")
    parser.add_argument("--standby", action="store_true",
                        help="run the coordinator and one standby as child processes (the peers get both addresses "
                             "in COMMLIB_ELASTIC_COORDINATOR and their pids in COMMLIB_ELASTIC_COORDINATOR_PIDS)")
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    opts = parser.parse_args(args)
    if opts.n < 1:
        parser.error("-n must be at least 1")
    import collectives.elastic as el
    secret = os.environ.get("COMMLIB_SECRET") or secrets.token_hex(32)
    co, coordinators, secret_dir = None, [], None
    if opts.standby:
        secret_dir = tempfile.TemporaryDirectory(prefix="commlib-elastic-")
        secret_file = os.path.join(secret_dir.name, "secret")
        with open(os.open(secret_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(secret)
        try:
            primary, primary_address = _start_coordinator(secret_file, opts.n)
            coordinators.append(primary)
            standby, standby_address = _start_coordinator(secret_file, opts.n, standby_of=primary_address)
            coordinators.append(standby)
        except RuntimeError as e:
            for c in coordinators:
                c.kill()
            print(f"commlib elastic-run: {e}", file=sys.stderr)
            return 1
        env = dict(os.environ, COMMLIB_ELASTIC_COORDINATOR=f"{primary_address},{standby_address}",
                   COMMLIB_ELASTIC_COORDINATOR_PIDS=f"{primary.pid},{standby.pid}", COMMLIB_SECRET=secret)
    else:
        co = el.Coordinator(opts.port, secret=secret, host="127.0.0.1", min_peers=opts.n)
        env = dict(os.environ, COMMLIB_ELASTIC_COORDINATOR=co.address, COMMLIB_SECRET=secret)
    procs = []
    for i in range(opts.n):
        procs.append(subprocess.Popen([sys.executable, opts.script, *opts.args],
                                      env=dict(env, COMMLIB_ELASTIC_INDEX=str(i))))
    codes = []
    try:
        for p in procs:
            codes.append(p.wait())
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGINT)
        codes = [p.wait() for p in procs]
    if co is not None:
        co.stop()
    for c in coordinators:  # a coordinator a peer killed on purpose is already gone
        if c.poll() is None:
            c.send_signal(signal.SIGTERM)
            try:
                c.wait(timeout=10)
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait()
    if secret_dir is not None:
        secret_dir.cleanup()
    # A peer killed on purpose (SIGKILL) is part of the story; any other failure is not.
    bad = [c for c in codes if c not in (0, -signal.SIGKILL)]
    return bad[0] if bad and bad[0] > 0 else (1 if bad else 0)
