#include "device_hold.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "../cuda/cupti.h"
#include "../util/config.h"
#include "../util/log.h"
#include "../util/stats.h"
#include "device_pack.h"
#include "overlap.h"
#include "pack_any.h"

#define HOLD_MAX 64 /* ops held at once; one more launches them first */

/* The bytes one side of a held op covers: one strided piece, viewed at its base once (at its
 * first exact overlap test: a halo's packs never need one), when the message is one, else the
 * span [lo, hi). */
struct side {
    uintptr_t lo, hi, base;
    int piece, viewed;
    strided_piece p;
    struct piece_view v;
};
struct held_op {
    struct side reads, writes;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct held_op held[HOLD_MAX];
/* their sides' spans, apart from the rest: most pairs are told apart by these alone */
static struct spans {
    uintptr_t read_lo, read_hi, write_lo, write_hi;
} spans[HOLD_MAX];
static int nheld;                     /* under lock; also read without it (0: nothing to launch) */
static struct deferred_moves *queue;  /* their jobs (device_pack.h): one context's, it refuses another's */
static int watch_state;               /* 0 not asked, 1 watching, -1 CUPTI unavailable */

static int launch_held(void)
{
    if (!nheld) return 1;
    int ok = device_pack_queue_launch(queue);
    if (!ok) commlib_log(LOG_ERROR, "launching %d held device MPI_Pack/MPI_Unpack calls failed", nheld);
    stat_add(STAT_DEVICE_HOLD_FLUSHES, 1);
    __atomic_store_n(&nheld, 0, __ATOMIC_RELEASE);
    return ok;
}

/* cuda/cupti.h: the entry of a CUDA call that may queue work or observe device memory */
static void on_cuda_call(const char *function)
{
    if (!__atomic_load_n(&nheld, __ATOMIC_ACQUIRE)) return;
    pthread_mutex_lock(&lock);
    if (nheld) commlib_log(LOG_DEBUG, "%d held device packs launched at %s", nheld, function ? function : "?");
    launch_held();
    pthread_mutex_unlock(&lock);
}

static int device_hold_flush(void)
{
    if (!__atomic_load_n(&nheld, __ATOMIC_ACQUIRE)) return 1;
    cupti_quiet_begin();
    pthread_mutex_lock(&lock);
    int ok = launch_held();
    pthread_mutex_unlock(&lock);
    cupti_quiet_end();
    return ok;
}

static int watching(void)
{
    int state = __atomic_load_n(&watch_state, __ATOMIC_ACQUIRE);
    if (state) return state > 0;
    state = cupti_watch(on_cuda_call) ? 1 : -1;
    static int at_exit;
    /* a process that never calls MPI_Finalize through commlib (Python loading it with its
       bindings): before the CUDA runtime's and the driver's own teardown, which would
       otherwise still call back into a subscriber in the middle of it (cupy crashed at exit) */
    if (state > 0 && !at_exit++) atexit(device_hold_finalize);
    if (state < 0)
        commlib_log(LOG_WARN, "COMMLIB_DEVICE_PACK_HOLD: %s; device MPI_Pack/MPI_Unpack are launched one by one",
                    cupti_failure());
    __atomic_store_n(&watch_state, state, __ATOMIC_RELEASE);
    return state > 0;
}

static void typed_side(struct side *s, const canonical_type *ct, void *typed, int64_t count)
{
    int64_t lo, span;
    typed_span(ct->true_lb, ct->true_extent, ct->extent, count, &lo, &span);
    s->lo = (uintptr_t)typed + (uintptr_t)lo;
    s->hi = s->lo + (uintptr_t)span;
    s->piece = canonical_single_piece(ct, count, &s->p);
    s->base = s->piece ? (uintptr_t)typed + (uintptr_t)s->p.offset : 0;
    s->viewed = 0;
}

static void packed_side(struct side *s, void *packed, int64_t bytes)
{
    s->lo = (uintptr_t)packed;
    s->hi = s->lo + (uintptr_t)bytes;
    s->piece = 1;
    s->p.offset = 0;
    s->p.block = bytes;
    s->p.ndims = 0;
    s->base = s->lo;
    s->viewed = 0;
}

static void view(struct side *s)
{
    if (!s->viewed) piece_view_init(&s->v, &s->p, s->base);
    s->viewed = 1;
}

/* Sides whose spans meet: whether their bytes may. */
static int sides_overlap(struct side *a, struct side *b)
{
    if (!a->piece || !b->piece) return 1;
    view(a);
    view(b);
    return views_may_overlap(&a->p, &a->v, &b->p, &b->v);
}

static int meet(uintptr_t lo, uintptr_t hi, uintptr_t other_lo, uintptr_t other_hi) { return lo < other_hi && other_lo < hi; }

/* An op that must come after a held one: it writes what that one reads or writes, or
 * reads what it writes. */
static int depends(struct held_op *op)
{
    for (int i = 0; i < nheld; i++) {
        const struct spans *s = &spans[i];
        if ((meet(op->writes.lo, op->writes.hi, s->write_lo, s->write_hi) && sides_overlap(&op->writes, &held[i].writes)) ||
            (meet(op->writes.lo, op->writes.hi, s->read_lo, s->read_hi) && sides_overlap(&op->writes, &held[i].reads)) ||
            (meet(op->reads.lo, op->reads.hi, s->write_lo, s->write_hi) && sides_overlap(&op->reads, &held[i].writes)))
            return 1;
    }
    return 0;
}

/* The held ops launched while op was being made in the slot after them: op moves to the
 * first slot (rare: a dependency, a refused queue). */
static struct held_op *first_slot(struct held_op *op)
{
    if (op != &held[0]) held[0] = *op;
    return &held[0];
}

int device_hold(struct device_context *dc, const canonical_type *ct, void *typed, int64_t count, void *packed,
                int64_t bytes, int packing)
{
    if (!commlib_config.device_pack_hold || !watching()) return 0;
    cupti_quiet_begin(); /* the queries and launches below are commlib's own */
    pthread_mutex_lock(&lock);
    int ok = nheld == HOLD_MAX ? launch_held() : 1; /* launch_held empties the hold, even when it fails */
    /* made in its slot (a held op is ~1.3 KB: no copy on the common path) */
    struct held_op *op = &held[nheld];
    typed_side(packing ? &op->reads : &op->writes, ct, typed, count);
    packed_side(packing ? &op->writes : &op->reads, packed, bytes);
    if (ok && nheld && depends(op)) {
        stat_add(STAT_DEVICE_HOLD_OVERLAPS, 1);
        ok = launch_held();
        op = first_slot(op);
    }
    int taken = ok && device_hold_queue_add(&queue, dc, ct, typed, count, packed, packing);
    /* refused: the queue holds another context's jobs (those go first), or the batched kernel does
       not take this op (the caller launches it, after what is held) */
    if (ok && !taken && nheld) {
        taken = launch_held();
        op = first_slot(op);
        taken = taken && device_hold_queue_add(&queue, dc, ct, typed, count, packed, packing);
    }
    if (taken) {
        spans[nheld] = (struct spans){op->reads.lo, op->reads.hi, op->writes.lo, op->writes.hi};
        __atomic_store_n(&nheld, nheld + 1, __ATOMIC_RELEASE);
        stat_add(STAT_DEVICE_HELD, 1);
    }
    pthread_mutex_unlock(&lock);
    cupti_quiet_end();
    if (taken) device_async_leave(dc);
    return taken;
}

void device_hold_finalize(void)
{
    device_hold_flush();
    if (__atomic_load_n(&watch_state, __ATOMIC_ACQUIRE) > 0) cupti_unwatch();
    __atomic_store_n(&watch_state, 0, __ATOMIC_RELEASE);
}
