"""CO2 (Sun et al., ICLR 2024): DiLoCo with the outer all-reduce fully overlapped (applied
one outer step late), a staleness gap penalty and outer momentum clipping."""

from collectives.training.diloco import DiLoCo, deterministic_norm, deterministic_sum


class CO2(DiLoCo):
    """Local updates with a fully overlapped outer all-reduce: round k's pseudo-gradient
    is averaged while the next `sync_every` inner steps run and is applied one outer step
    late (DiLoCo with overlap=True, fragments=1, delay=sync_every; the local progress made
    meanwhile is kept, see DiLoCo).

    Round k's average D (the progress of steps that ran on weights which had not yet seen
    the previous outer update) is applied to global weights G_k; the update it missed is the
    staleness gap  g = G_k - G_{k-1}.  With lam = staleness_penalty, beta = outer_momentum,
    phi = clip_norm, lr = outer_lr, element-wise:

        D'  = D / (1 + lam * |g| / mean(|g|))        staleness gap penalty (none while g = 0)
        m   = beta * m + D'
        m   = m * min(1, phi / ||m||_2)               outer momentum clipping, kept in m
        G_{k+1} = G_k - lr * (D' + beta * m  if nesterov else  m)

    The penalty damps the stale update where the global weights just moved much more than
    on average; the clipping bounds the outer momentum's norm, and the clipped momentum is
    what the next round continues from (the reference code clips a copy it then drops).
    Everything here is computed from the shared state and the bit-identical average, with
    thread-count independent reductions, so every peer computes the same bits.  The
    formulas follow the paper's description of the two techniques; normalising |g| by its
    mean is this implementation's choice (it makes lam scale-free).

    The default outer momentum is 0.5, not DiLoCo's 0.9: applied one outer step late, 0.9
    made the held-out loss of examples/diloco_train.py oscillate (2.6 -> 3.7 -> 3.0 over 100
    steps) where 0.5 falls steadily.

    last_penalty: (min, max) of the divisor applied in the last round; last_clip: the factor
    the momentum was scaled by (1.0: not clipped)."""

    def __init__(self, model, inner_optimizer, comm, sync_every=50, outer_lr=0.7, outer_momentum=0.5,
                 nesterov=False, staleness_penalty=1.0, clip_norm=None, quantize=False, error_feedback=None,
                 joiner=None, timeout=None, sync_timeout=300.0, check_parity=False):
        if staleness_penalty < 0:
            raise ValueError(f"staleness_penalty must be >= 0, not {staleness_penalty!r}")
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 (or None: no clipping), not {clip_norm!r}")
        self.staleness_penalty, self.clip_norm = float(staleness_penalty), clip_norm
        self.last_penalty, self.last_clip = (1.0, 1.0), 1.0
        self._previous = None  # set before the first sync (DiLoCo.__init__ syncs)
        super().__init__(model, inner_optimizer, comm, sync_every=sync_every, outer_lr=outer_lr,
                         outer_momentum=outer_momentum, nesterov=nesterov, fragments=1, delay=sync_every,
                         quantize=quantize, error_feedback=error_feedback, overlap=True, joiner=joiner,
                         timeout=timeout, sync_timeout=sync_timeout, check_parity=check_parity)

    def _shared_state(self):
        state = super()._shared_state()
        if self._previous is None:  # G_{k-1}: starts equal to the first global weights
            self._previous = [f.glob.clone() for f in self._frags]
        for f, prev in zip(self._frags, self._previous):
            state[f"fragment{f.index}/previous"] = prev
        return state

    def _outer_update(self, f, avg):
        prev = self._previous[f.index]
        gap = (f.glob - prev).abs_()
        mean_gap = deterministic_sum(gap) / max(1, gap.numel())
        if self.staleness_penalty and mean_gap > 0:
            divisor = gap.mul_(self.staleness_penalty / mean_gap).add_(1.0)
            self.last_penalty = (float(divisor.min()), float(divisor.max()))
            avg = avg / divisor
        else:
            self.last_penalty = (1.0, 1.0)
        m = f.momentum
        m.mul_(self.outer_momentum).add_(avg)
        self.last_clip = 1.0
        if self.clip_norm is not None:
            norm = deterministic_norm(m)
            if norm > self.clip_norm:
                self.last_clip = self.clip_norm / norm
                m.mul_(self.last_clip)
        update = avg.add(m, alpha=self.outer_momentum) if self.nesterov else m
        prev.copy_(f.glob)
        f.glob.sub_(update, alpha=self.outer_lr)
