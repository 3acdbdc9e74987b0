"""Data parallelism over the elastic engine, and commlib's quantized DDP comm hook.
(Imported by collectives.torch; see ElasticDataParallel and quantized_hook.)"""
import json
import os
import time

import torch
import torch.distributed as dist

__all__ = ["ElasticDataParallel", "quantized_hook"]

_MANIFEST_BYTES = 1 << 16  # the optimizer-state manifest a joiner learns from the members


class ElasticDataParallel(torch.nn.Module):
    """DDP whose gradients go over the elastic engine (collectives.elastic.ElasticComm).

        comm = collectives.init()                                  # under commlib elastic-run
        ddp = collectives.torch.ElasticDataParallel(model, comm)
        for batch in data:
            step = ddp.sync(optimizer, step)       # admits joiners, drops the dead, makes model,
            loss = ddp(batch).sum(); loss.backward()    # optimizer state and step bit-identical
            if ddp.should_commit(): optimizer.step(); step += 1
            optimizer.zero_grad()

    Backward: a hook on every parameter puts its gradient in a bucket (about bucket_cap_mb,
    parameters in reverse order, as DDP does); a full bucket is averaged over the peers by an
    asynchronous elastic all-reduce that runs while backward goes on (the hook returns at
    once).  Buckets start strictly in bucket order on every peer; parameters that got no
    gradient count as zeros.  should_commit() waits for the buckets: True when every one
    of them committed (the averaged gradients are then in .grad), False on every survivor
    alike when a peer died during the step (no survivor sees a partial sum; .grad keeps the
    local gradients, the optimizer step must be skipped).  quantize=True (or "uint8") sends
    min-max uint8 codes, "uint4" 4-bit ones (lossy, bit-identical on every peer).

    sync(optimizer, step): update_topology() (the members' barrier), then sync_state of the
    model's parameters and buffers, the optimizer's state tensors and the step counter, so a
    joiner starts from the members' bytes.  The group's step is returned (and kept in
    .step): a joiner takes it from there.  A new peer is a joiner when it is started with
    COMMLIB_ELASTIC_INDEX=joiner (as a peer of `commlib elastic-run` starts one) or joiner=True.
    CUDA models are copied through host memory for the state and the all-reduce.
    Optimizer hyper-parameters (param_groups) are not synchronised: derive a schedule from
    the step."""

    def __init__(self, module, comm, bucket_cap_mb=25.0, quantize=False, joiner=None, timeout=None):
        super().__init__()
        self.module, self.comm = module, comm
        if isinstance(quantize, str):  # "uint8" / "uint4" go to the comm as they are
            from collectives.elastic import _quantize_code
            _quantize_code(quantize)  # a wrong name fails here, not at the first step
        self.quantize = quantize if isinstance(quantize, str) else bool(quantize)
        self.timeout = timeout
        self.joiner = (os.environ.get("COMMLIB_ELASTIC_INDEX") == "joiner") if joiner is None else bool(joiner)
        self.step, self._revision = 0, 0
        self._fresh = self.joiner
        self.require_backward_grad_sync = True
        params = [p for p in module.parameters() if p.requires_grad]
        self._buckets, bucket, size = [], [], 0
        cap = max(1, int(bucket_cap_mb * 2 ** 20))
        for p in reversed(params):  # backward produces the last layers' gradients first
            if bucket and p.dtype != bucket[0].dtype:  # one dtype per bucket (one flat buffer)
                self._buckets.append(bucket)
                bucket, size = [], 0
            bucket.append(p)
            size += p.numel() * p.element_size()
            if size >= cap:
                self._buckets.append(bucket)
                bucket, size = [], 0
        if bucket:
            self._buckets.append(bucket)
        self._bucket_of = {}
        for i, b in enumerate(self._buckets):
            for p in b:
                self._bucket_of[p] = i
        self._reset()
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_ready) for p in params]
        self.last_error = None

    # -- backward --
    def _reset(self):
        self._ready = [0] * len(self._buckets)
        self._works = [None] * len(self._buckets)
        self._flat = [None] * len(self._buckets)
        self._next = 0

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def no_sync(self):
        """Gradients accumulate locally inside the block (the step after it all-reduces)."""
        ddp = self

        class _NoSync:
            def __enter__(self):
                ddp.require_backward_grad_sync = False

            def __exit__(self, *exc):
                ddp.require_backward_grad_sync = True
        return _NoSync()

    def _grad_ready(self, p):
        if not self.require_backward_grad_sync:
            return
        i = self._bucket_of[p]
        self._ready[i] += 1
        self._launch_ready()

    def _launch_ready(self, force=False):
        while self._next < len(self._buckets) and (force or self._ready[self._next] == len(self._buckets[self._next])):
            self._launch(self._next)
            self._next += 1

    def _launch(self, i):
        grads = []
        for p in self._buckets[i]:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            grads.append(g.detach().reshape(-1))
        flat = torch.cat(grads) if len(grads) > 1 else grads[0].clone()
        if flat.is_cuda:
            flat = flat.cpu()  # the elastic engine reduces host memory
        self._flat[i] = flat
        self._works[i] = self.comm.all_reduce(flat, op="avg", async_op=True, timeout=self.timeout,
                                              quantize=self.quantize)

    def should_commit(self):
        """Waits for this step's all-reduces.  True: every bucket committed and .grad holds
        the average over the peers; False (on every survivor alike): a peer failed, skip the
        optimizer step.  The failure is in .last_error.  True counts the step (.step += 1)."""
        from collectives.elastic import ElasticError
        self._launch_ready(force=True)
        ok, self.last_error = True, None
        for w in self._works:
            try:
                w.wait()
            except ElasticError as e:
                ok = False
                self.last_error = self.last_error or e
        if ok:
            for i, b in enumerate(self._buckets):
                flat, at = self._flat[i], 0
                for p in b:
                    n = p.numel()
                    part = flat[at:at + n].view_as(p)
                    if p.grad is None:
                        p.grad = part.to(p.device, copy=True)
                    else:
                        p.grad.copy_(part)
                    at += n
            self.step += 1  # the optimizer steps now: the group's counter moves with it
        self._reset()
        return ok

    # -- membership and state --
    def _state(self, optimizer):
        """name -> tensor of everything that must be bit-identical (module and optimizer)."""
        state = {}
        for name, t in self.module.state_dict(keep_vars=True).items():
            if isinstance(t, torch.Tensor):
                state[f"model/{name}"] = t
        state.update(optimizer_state_tensors(optimizer))
        return state

    def _learn_manifest(self, optimizer):
        learn_optimizer_state(self.comm, optimizer, self._fresh, self.timeout)

    def sync(self, optimizer=None, step=None, timeout=None):
        """Admit joiners, drop the dead, make model + optimizer state + step bit-identical;
        returns the group's step (step: the caller's counter, accepted for symmetry with the
        usual loop; the group's own counter wins)."""
        from collectives.elastic import PeerFailure
        deadline = time.monotonic() + (timeout if timeout is not None else 300.0)
        while True:
            try:
                self.comm.update_topology()
                self._learn_manifest(optimizer)
                self._sync_tensors(optimizer)
                break
            except PeerFailure:
                if time.monotonic() > deadline:
                    raise
        self._fresh = False
        self._reset()
        return self.step

    def _sync_tensors(self, optimizer):
        state = self._state(optimizer)
        # The revision counts the syncs (one more each time), not the steps: a caller may
        # sync every step or every N steps; the members agree on it and a joiner learns it.
        counter = torch.tensor([self.step], dtype=torch.int64)
        revision = torch.tensor([self._revision + 1], dtype=torch.int64)
        host = {"step": counter, "revision": revision}
        back = []
        for name, t in state.items():
            if t.is_cuda or not t.is_contiguous():
                h = t.detach().to("cpu", copy=True).contiguous()
                back.append((t, h))
                host[name] = h
            else:
                host[name] = t.detach()
        info = self.comm.sync_state(host, revision=None if self._fresh else self._revision + 1)
        if info["fetched_bytes"]:
            with torch.no_grad():
                for t, h in back:
                    t.copy_(h)
        self.step, self._revision = int(counter[0]), int(revision[0])
        return info


def _params_of(optimizer):
    return [p for g in optimizer.param_groups for p in g["params"]]


def _literal(text):
    try:
        return json.loads(text)
    except ValueError:
        return float(text)


def optimizer_state_tensors(optimizer, prefix="optim"):
    """'{prefix}/{parameter index}/{key}' -> the optimizer's state tensors (None: none)."""
    state = {}
    if optimizer is not None:
        index = {id(p): i for i, p in enumerate(_params_of(optimizer))}
        for p, s in optimizer.state.items():
            for key, v in s.items():
                if isinstance(v, torch.Tensor):
                    state[f"{prefix}/{index[id(p)]}/{key}"] = v
    return state


def optimizer_manifest(optimizer):
    """A byte string every member has alike: the optimizer state's names, shapes and
    dtypes (a joiner's optimizer has none yet)."""
    items = []
    if optimizer is not None:
        for i, p in enumerate(_params_of(optimizer)):
            for key, v in optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    items.append([i, key, list(v.shape), str(v.dtype).replace("torch.", ""), str(v.device.type)])
                else:
                    items.append([i, key, None, repr(v), None])
    return json.dumps(items).encode()


def learn_optimizer_state(comm, optimizer, fresh, timeout=None):
    """A joiner (fresh=True) creates the optimizer state tensors the members have (their
    bytes come with sync_state next): max-reduce of the members' manifest and the joiner's
    zeros.  Every member calls it alike (it is an all-reduce)."""
    mine = optimizer_manifest(optimizer) if not fresh else b""
    if len(mine) > _MANIFEST_BYTES - 8:
        raise ValueError("the optimizer state has too many tensors to describe")
    buf = torch.zeros(_MANIFEST_BYTES, dtype=torch.uint8)
    if mine:
        buf[:8] = torch.tensor([len(mine)], dtype=torch.int64).view(torch.uint8)
        buf[8:8 + len(mine)] = torch.frombuffer(bytearray(mine), dtype=torch.uint8)
    comm.all_reduce(buf, op="max", timeout=timeout)
    n = int(buf[:8].view(torch.int64)[0])
    if not fresh or optimizer is None or n == 0:
        return
    params = _params_of(optimizer)
    for i, key, shape, dtype, device in json.loads(bytes(buf[8:8 + n].tolist()).decode()):
        p = params[i]
        st = optimizer.state.setdefault(p, {})
        if shape is None:
            st[key] = _literal(dtype)
        else:
            st[key] = torch.zeros(shape, dtype=getattr(torch, dtype), device=p.device if device != "cpu" else "cpu")


def quantized_hook(state, bucket):
    """DDP comm hook (model.register_comm_hook(group_or_None, quantized_hook)): min-max
    uint8 on the wire.  Each rank quantizes its bucket with its own min and max, one
    all_gather moves every rank's bytes (a quarter of float32's), and every rank
    dequantizes and averages them in rank order: results bit-identical on every rank.
    Non-blocking: it returns the all_gather's future, chained with the dequantization."""
    group = state if state is not None else dist.group.WORLD
    n = dist.get_world_size(group)
    t = bucket.buffer()
    x = t.detach().float()
    lo, hi = (x.min(), x.max()) if x.numel() else (torch.zeros((), device=x.device), torch.zeros((), device=x.device))
    scale = torch.where(hi > lo, (hi - lo) / 255.0, torch.ones_like(hi))
    q = torch.round((x - lo) / scale).clamp_(0, 255).to(torch.uint8)
    header = torch.stack([lo, scale]).to(torch.float32).view(torch.uint8)
    payload = torch.cat([header, q])
    out = torch.empty(n * payload.numel(), dtype=torch.uint8, device=t.device)
    fut = dist.all_gather_into_tensor(out, payload, group=group, async_op=True).get_future()

    def dequantize(f):
        rows = out.view(n, -1)
        acc = torch.zeros(x.numel(), dtype=torch.float32, device=t.device)
        for r in range(n):
            lo_r, scale_r = rows[r, :8].view(torch.float32)
            acc += rows[r, 8:].to(torch.float32) * scale_r + lo_r
        acc /= n
        t.copy_(acc.to(t.dtype))
        return t
    return fut.then(dequantize)
