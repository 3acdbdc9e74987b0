"""`commlib coordinator` and `commlib elastic-run` (the elastic all-reduce's launchers)."""
import argparse
import os
import secrets
import signal
import subprocess
import sys
import time


def cmd_coordinator(args):
    """Runs a coordinator in the foreground until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(prog="commlib coordinator",
                                     description="elastic all-reduce coordinator (membership, verdicts, state revisions)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret-file", required=True, help="file holding the shared secret (peers need the same)")
    parser.add_argument("--host", default="0.0.0.0", help="address to bind (default: all)")
    parser.add_argument("--min-peers", type=int, default=1, help="peers needed to form the first epoch")
    opts = parser.parse_args(args)
    import collectives.elastic as el
    try:
        secret = el.read_secret_file(opts.secret_file)
    except (OSError, ValueError) as e:
        print(f"commlib coordinator: {e}", file=sys.stderr)
        return 2
    co = el.Coordinator(opts.port, secret=secret, host=opts.host, min_peers=opts.min_peers)
    print(f"commlib coordinator: listening on {opts.host}:{co.port}", file=sys.stderr, flush=True)
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(1))
    while not stop:
        time.sleep(0.2)
    print(f"commlib coordinator: stopping ({co.info()})", file=sys.stderr)
    co.stop()
    return 0


def cmd_elastic_run(args):
    """Starts an embedded coordinator and N peers running SCRIPT; returns when they end."""
    parser = argparse.ArgumentParser(prog="commlib elastic-run",
                                     description="run N peers of an elastic training script on this machine")
    parser.add_argument("-n", type=int, required=True, help="number of peers")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (default: any free one)")
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    opts = parser.parse_args(args)
    if opts.n < 1:
        parser.error("-n must be at least 1")
    import collectives.elastic as el
    secret = os.environ.get("COMMLIB_SECRET") or secrets.token_hex(32)
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
    co.stop()
    # A peer killed on purpose (SIGKILL) is part of the story; any other failure is not.
    bad = [c for c in codes if c not in (0, -signal.SIGKILL)]
    return bad[0] if bad and bad[0] > 0 else (1 if bad else 0)
