"""DiLoCo over a communicator: local inner steps, an averaged pseudo-gradient every
`sync_every` steps, an outer optimizer on global weights every peer holds bit-identically.
Overlapped (applied `delay` inner steps late), streaming (fragments) and compressed forms;
through peers that die and join (collectives.elastic).  See DiLoCo's docstring."""
import hashlib
import math
import time

import torch

from collectives._torch_elastic import learn_optimizer_state, optimizer_state_tensors

# quantize= spellings -> what ElasticComm.all_reduce takes, and the code levels it uses
QUANTIZE = {None: None, False: None, "none": None, True: "uint8", "uint8": "uint8", "uint4": "uint4"}
LEVELS = {"uint8": 255, "uint4": 15}


def deterministic_sum(x):
    """sum(x) in float64, the same bits whatever the thread count: rows of 1024 each
    reduced by one thread, the row sums added exactly (math.fsum)."""
    flat = x.detach().reshape(-1).to(torch.float64)
    pad = (-flat.numel()) % 1024
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return math.fsum(flat.view(-1, 1024).sum(dim=1).tolist())


def deterministic_norm(x):
    return math.sqrt(deterministic_sum(x.detach().to(torch.float64).square()))


def quantize_like_the_wire(x, scheme):
    """x through min-max codes of `scheme` and back (what error feedback keeps the error of)."""
    levels = LEVELS[scheme]
    lo, hi = x.min(), x.max()
    scale = (hi - lo) / levels
    if float(scale) == 0.0:
        return x.clone()
    return torch.round((x - lo) / scale).clamp_(0, levels) * scale + lo


class _Fragment:
    """Parameters synchronised together: flat host copies of their global weights (shared),
    the snapshot of the local weights a round's pseudo-gradient was taken from, the
    pseudo-gradient buffer the all-reduce works in, and the outer momentum."""

    def __init__(self, index, params, offset, pinned):
        self.index, self.params, self.offset = index, params, offset
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        self.spans, n = [], 0
        for p in params:
            self.spans.append((p, n, p.numel()))
            n += p.numel()

        def alloc():
            return torch.zeros(n, dtype=dtype, pin_memory=pinned)
        self.glob, self.snapshot, self.delta, self.momentum = alloc(), alloc(), alloc(), alloc()
        self.residual = None  # error feedback: what compression left out, added to the next round
        self.pending_residual = None
        self.works = None  # (count work, delta work, count) while the round's all-reduce is in flight
        self.due = None

    def read_local(self, out):
        for p, at, n in self.spans:
            out[at:at + n].copy_(p.detach().reshape(-1))

    def write_local(self, src):
        with torch.no_grad():
            for p, at, n in self.spans:
                p.copy_(src[at:at + n].view_as(p))


class DiLoCo:
    """The outer loop of DiLoCo (Douillard et al. 2023) and its overlapped and streaming
    forms.  Call step() after every inner optimizer step.

    Every `sync_every` inner steps (counted on the shared step, so every peer agrees) each
    fragment's pseudo-gradient  delta = global - local  is summed over the peers and divided
    by the number of peers that contributed; the outer optimizer (default: SGD with
    Nesterov momentum `outer_momentum`, lr `outer_lr`; outer_optimizer=lambda params:
    torch.optim.X(params, ...) for any other) steps the global weights with the average;
    then the local weights move to the new global ones.  Global weights, outer optimizer
    state and the step live in host memory (pinned for CUDA models) and are the shared
    state: sync_state makes them bit-identical on every member and gives them to a
    joiner, which then starts from the global weights (its inner optimizer state is its
    own; module buffers such as BatchNorm statistics stay local).

    Streaming: `fragments` > 1 cuts the parameters (in model order) into that many groups
    of about equal size; fragment p is synchronised at the inner steps t with
    t % sync_every == p * sync_every // fragments, so the traffic is spread over the period.

    Overlap (overlap=True): a fragment's all-reduce runs while the next `delay` inner steps
    compute (default sync_every // fragments: fragments=1 gives one outer step late) and its
    result is applied then.  The local progress made meanwhile is kept:
        local <- alpha * local + (1 - alpha) * (global_new + local - snapshot)
    (alpha mixes in the local weights, as streaming DiLoCo's alpha does; with alpha=0 the
    local weights are the new global ones plus exactly the steps taken since the
    snapshot, and the next round's pseudo-gradient is those steps).  Rounds whose
    all-reduce is still in flight when a period ends (delay longer than the gap to the next
    period) are finished early there: membership changes only with nothing in flight.

    Compression: quantize="uint8" or "uint4" sends min-max codes (ElasticComm; the result
    is bit-identical on every peer).  error_feedback (default: on when quantizing) adds
    what this peer's compression left out of one round to its next pseudo-gradient.

    Churn (ElasticComm): membership (update_topology, then sync_state of the shared state
    at revision step // sync_every) runs at every period start and after any failure.  A
    round whose all-reduce fails (PeerFailure, alike on every survivor: the engine's
    verdict) changes nothing: the global weights, the momentum and the local weights stay
    as they were; without overlap the round is retried at once with the survivors, with
    overlap its pseudo-gradient is folded into the next round (the local weights still hold
    that progress).  A new peer is a joiner when started with COMMLIB_ELASTIC_INDEX=joiner
    (as `commlib elastic-run` peers start one) or joiner=True; a joiner contributes nothing
    to the round it joins in.

    Attributes: inner_step (the shared step), outer_steps (committed fragment rounds),
    failures (rounds rolled back), last_error, comm_seconds (time step() spent blocked on
    communication), events (dicts: kind commit/rollback/sync, fragment, step, time).
    """

    def __init__(self, model, inner_optimizer, comm, sync_every=50, outer_lr=0.7, outer_momentum=0.9,
                 nesterov=True, outer_optimizer=None, fragments=1, delay=None, alpha=0.0, quantize=False,
                 error_feedback=None, overlap=False, joiner=None, timeout=None, sync_timeout=300.0,
                 check_parity=False):
        import os
        if int(sync_every) != sync_every or sync_every < 1:
            raise ValueError(f"sync_every must be a positive integer, not {sync_every!r}")
        params = list(model.parameters())
        if not params:
            raise ValueError("the model has no parameters")
        if int(fragments) != fragments or not 1 <= fragments <= min(len(params), sync_every):
            raise ValueError(f"fragments must be an integer from 1 to min(parameter tensors, sync_every) = "
                             f"{min(len(params), sync_every)}, not {fragments!r}")
        if overlap:
            delay = max(1, sync_every // fragments) if delay is None else delay
            if int(delay) != delay or not 1 <= delay <= sync_every:
                raise ValueError(f"delay must be an integer from 1 to sync_every={sync_every} with overlap, not {delay!r}")
        elif delay not in (None, 0):
            raise ValueError("delay needs overlap=True (without overlap each round completes in its step)")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], not {alpha!r}")
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of False, True, 'uint8', 'uint4', not {quantize!r}")
        self.quantize = QUANTIZE[quantize]
        self._elastic = hasattr(comm, "sync_state")
        if self.quantize and not self._elastic:
            raise ValueError("quantize needs the elastic engine's all-reduce (ElasticComm)")
        if any(not p.is_floating_point() for p in params):
            raise TypeError("DiLoCo averages floating-point parameters only")
        self.model, self.inner_optimizer, self.comm = model, inner_optimizer, comm
        self.sync_every, self.fragments, self.delay = int(sync_every), int(fragments), int(delay or 0)
        self.outer_lr, self.outer_momentum, self.nesterov, self.alpha = outer_lr, outer_momentum, nesterov, alpha
        self.error_feedback = bool(self.quantize) if error_feedback is None else bool(error_feedback)
        if self.error_feedback and not self.quantize:
            raise ValueError("error_feedback needs quantize (it keeps what compression left out)")
        self.timeout, self.sync_timeout, self.check_parity = timeout, sync_timeout, bool(check_parity)
        self.joiner = (os.environ.get("COMMLIB_ELASTIC_INDEX") == "joiner") if joiner is None else bool(joiner)
        pinned = any(p.is_cuda for p in params) and torch.cuda.is_available()
        self._frags = [_Fragment(i, group, i * self.sync_every // self.fragments, pinned)
                       for i, group in enumerate(_split(params, self.fragments))]
        for f in self._frags:
            f.read_local(f.glob)  # the first sync elects one peer's weights for everyone
            if self.error_feedback:
                f.residual = torch.zeros_like(f.delta)
        self._outer_params, self._outer_opt = None, None
        if outer_optimizer is not None:
            self._outer_params = [torch.nn.Parameter(f.glob, requires_grad=True) for f in self._frags]
            self._outer_opt = outer_optimizer(self._outer_params)
        self._step = torch.zeros(1, dtype=torch.int64)
        self.outer_steps, self.failures, self.last_error = 0, 0, None
        self.comm_seconds, self.events, self.parity_checks, self.divergences = 0.0, [], 0, 0
        self._fresh, self._resync, self._steps_since_reset = self.joiner, False, 0
        self._membership(first=True)
        t = self.inner_step
        if t:  # a joiner admitted mid-run takes part in the rounds the members start at this step
            for f in self._frags:
                if t % self.sync_every == f.offset:
                    self._round(f)

    # -- the loop --
    @property
    def inner_step(self):
        return int(self._step[0])

    def step(self):
        """After an inner optimizer step: counts it, and finishes, syncs and launches the
        rounds that are due.  Returns the number of rounds committed in this call."""
        self._step += 1
        self._steps_since_reset += 1
        t, committed = self.inner_step, 0
        for f in self._frags:
            if f.works is not None and f.due <= t:
                committed += self._finish(f)
        if t % self.sync_every == 0:
            for f in self._frags:  # membership changes only with nothing in flight
                if f.works is not None:
                    committed += self._finish(f)
            if self.check_parity and not self._resync:  # (after a failure the epoch must change first)
                self.parity()
            self._membership()
        for f in self._frags:
            if t % self.sync_every == f.offset:
                committed += self._round(f)
        return committed

    def sync(self):
        """Finishes what is in flight, then membership now (admits joiners, drops the dead,
        makes the shared state bit-identical).  Returns the shared step."""
        for f in self._frags:
            if f.works is not None:
                self._finish(f)
        self._membership()
        return self.inner_step

    def parity(self):
        """Compares every member's state_digest() (a min- and a max-all-reduce of it):
        True when equal; raises CollectiveError when not.  None when a peer failed during the
        check (membership follows).  check_parity=True runs it at every period start,
        before the membership (whose sync_state would quietly repair a diverged peer)."""
        from collectives import CollectiveError
        from collectives.elastic import PeerFailure
        digest = torch.frombuffer(bytearray(bytes.fromhex(self.state_digest())), dtype=torch.uint8)
        lo, hi = digest.clone(), digest.clone()
        kw = {} if self.timeout is None else {"timeout": self.timeout}
        try:
            self.comm.all_reduce(lo, op="min", **kw)
            self.comm.all_reduce(hi, op="max", **kw)
        except PeerFailure as e:
            self.last_error, self._resync = e, True
            return None
        self.parity_checks += 1
        if not (torch.equal(lo, digest) and torch.equal(hi, digest)):
            raise CollectiveError(f"DiLoCo: state parity broken at step {self.inner_step}: the members' shared "
                                  "states differ")
        return True

    def global_parameters(self):
        """The global weights, one tensor per model parameter (views of the shared state)."""
        return [f.glob[at:at + n].view(p.shape) for f in self._frags for p, at, n in f.spans]

    def state_digest(self):
        """SHA-256 (hex) of the shared state: equal on every member after a sync."""
        h = hashlib.sha256()
        for name, t in sorted(self._shared_state().items()):
            h.update(name.encode())
            h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    # -- rounds --
    def _round(self, f):
        from collectives.elastic import PeerFailure
        deadline = time.monotonic() + self.sync_timeout
        while True:
            if self._resync:
                self._membership()
            self._launch(f)
            if self.delay:
                return 0
            if self._finish(f):
                return 1
            if time.monotonic() > deadline:
                raise PeerFailure(f"DiLoCo: no round of fragment {f.index} committed within {self.sync_timeout} s "
                                  f"(last error: {self.last_error})")

    def _launch(self, f):
        f.read_local(f.snapshot)
        torch.sub(f.glob, f.snapshot, out=f.delta)
        contributes = self._steps_since_reset > 0  # a peer that just took the global weights has nothing to add
        if self.error_feedback:
            f.delta.add_(f.residual)
            f.pending_residual = f.delta - quantize_like_the_wire(f.delta, self.quantize)
        if not contributes:
            f.delta.zero_()
            f.pending_residual = f.residual
        count = torch.tensor([1 if contributes else 0], dtype=torch.int64)
        kw = {} if self.timeout is None else {"timeout": self.timeout}
        t0 = time.monotonic()
        w_count = self.comm.all_reduce(count, op="sum", async_op=True, **kw)
        if self.quantize:
            kw["quantize"] = self.quantize
        w_delta = self.comm.all_reduce(f.delta, op="sum", async_op=True, **kw)
        self.comm_seconds += time.monotonic() - t0
        f.works, f.due = (w_count, w_delta, count), self.inner_step + self.delay

    def _finish(self, f):
        """Waits for f's round; applies it (True) or rolls it back (False)."""
        from collectives.elastic import PeerFailure
        w_count, w_delta, count = f.works
        f.works = None
        t0 = time.monotonic()
        try:
            w_count.wait()
            w_delta.wait()
        except PeerFailure as e:
            self.comm_seconds += time.monotonic() - t0
            self.failures += 1
            self.last_error = e
            self._resync = True
            f.pending_residual = None
            self.events.append({"kind": "rollback", "fragment": f.index, "step": self.inner_step,
                                "time": time.monotonic(), "error": str(e)[:200]})
            return 0
        self.comm_seconds += time.monotonic() - t0
        contributors = int(count[0])
        if contributors > 0:
            f.delta.div_(contributors)
            self._outer_update(f, f.delta)
        if self.error_feedback:
            f.residual = f.pending_residual
            f.pending_residual = None
        local = f.delta  # the average is spent: its buffer holds the new local weights
        f.read_local(local)
        target = local.sub(f.snapshot).add_(f.glob)  # the new global weights plus the steps taken since
        if self.alpha:
            target.mul_(1.0 - self.alpha).add_(local, alpha=self.alpha)
        f.write_local(target)
        self.outer_steps += 1
        self.last_error = None
        self.events.append({"kind": "commit", "fragment": f.index, "step": self.inner_step, "time": time.monotonic(),
                            "contributors": contributors})
        return 1

    def _outer_update(self, f, avg):
        """global <- outer optimizer step with the averaged pseudo-gradient (every peer
        computes the same bits from the same inputs)."""
        if self._outer_opt is not None:
            param = self._outer_params[f.index]
            param.grad = avg
            self._outer_opt.step()
            param.grad = None
            return
        m = f.momentum
        m.mul_(self.outer_momentum).add_(avg)
        update = avg.add(m, alpha=self.outer_momentum) if self.nesterov else m
        f.glob.sub_(update, alpha=self.outer_lr)

    # -- membership and shared state --
    def _shared_state(self):
        state = {"step": self._step}
        for f in self._frags:
            state[f"fragment{f.index}/global"] = f.glob
            if self._outer_opt is None:
                state[f"fragment{f.index}/momentum"] = f.momentum
        if self._outer_opt is not None:
            state.update(optimizer_state_tensors(self._outer_opt, prefix="outer"))
        return state

    def _membership(self, first=False):
        from collectives.elastic import PeerFailure
        t0 = time.monotonic()
        if not self._elastic:  # a static group: rank 0's initial weights for everyone, once
            if first:
                for f in self._frags:
                    self.comm.broadcast(f.glob, root=0)
                self._reset_local()
            return
        deadline, initial = t0 + self.sync_timeout, first
        while True:
            try:
                # A peer admitted already (collectives.init() ran update_topology) goes
                # straight to the state, as do the others at their first sync.
                if not (first and self.comm.world > 0):
                    self.comm.update_topology()
                if self._outer_opt is not None:
                    learn_optimizer_state(self.comm, self._outer_opt, self._fresh, self.timeout)
                state = self._shared_state()
                bad = [n for n, t in state.items() if not t.is_contiguous() or t.device.type != "cpu"]
                if bad:
                    raise TypeError(f"DiLoCo: shared state {bad} must be contiguous host tensors")
                info = self.comm.sync_state(state, revision=None if self._fresh else self.inner_step // self.sync_every)
                break
            except PeerFailure as e:
                self.last_error = e
                first = False
                if time.monotonic() > deadline:
                    raise
        if info["fetched_bytes"] and not (self._fresh or initial):
            self.divergences += 1  # a member whose state differed from the majority's
            self.events.append({"kind": "diverged", "step": self.inner_step, "time": time.monotonic()})
        if self._fresh or info["fetched_bytes"] or initial:
            self._reset_local()
        self._fresh, self._resync = False, False
        self.comm_seconds += time.monotonic() - t0
        self.events.append({"kind": "sync", "step": self.inner_step, "time": time.monotonic(),
                            "fetched_bytes": info["fetched_bytes"], "world": self.comm.world})

    def _reset_local(self):
        """The local weights become the global ones (a joiner, the first sync, a fetch)."""
        for f in self._frags:
            f.write_local(f.glob)
            if f.residual is not None:
                f.residual.zero_()
        self._steps_since_reset = 0


def _split(params, fragments):
    """params (in model order) in `fragments` contiguous groups of about equal size."""
    total = sum(p.numel() for p in params)
    groups, acc = [[]], 0
    for i, p in enumerate(params):
        groups_left = fragments - len(groups)
        if groups[-1] and groups_left > 0 and (acc >= total * len(groups) / fragments or len(params) - i == groups_left):
            groups.append([])
        groups[-1].append(p)
        acc += p.numel()
    return groups
