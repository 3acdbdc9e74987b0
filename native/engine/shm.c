/* The shared-memory transport: the ranks of a communicator that all share one node.
 *
 * One segment per communicator (POSIX shared memory, unlinked as soon as every rank has
 * mapped it): a control line per rank, `depth` slots of `slice` bytes per rank, and
 * `depth` result slots.  Data moves in slices through a three-phase pipeline, each phase
 * a cumulative counter per rank that only its rank writes:
 *   in(t)     the rank copies its input of slice t into its slot t % depth;
 *   reduce(t) once every rank's slice t is in, the rank reduces its own part of the slice
 *             from all slots, in rank order, into the result slot (all-reduce) or its
 *             output (reduce-scatter);
 *   out(t)    once every rank reduced slice t, the rank copies the whole result out
 *             (all-reduce), or every rank's slot (all-gather), or the root's (broadcast).
 * A slot is written again (slice t + depth) only after every rank finished reduce(t) and
 * out(t), so up to `depth` slices are in flight.  Counters never reset: they count
 * slices since the communicator was made, and every rank moves the same slices in the
 * same order (the signatures were compared first), so a counter value names one slice of
 * one operation on every rank.  No MPI is called on the data path.
 *
 * Before an operation moves data, each rank posts its signature in its control line (two
 * alternating places: a rank can be at most one operation ahead of the slowest) and
 * bumps its arrival counter; once all arrived, all compare the same set and agree.
 *
 * Knobs: COMMLIB_ENGINE_SLICE_KB (slice size), COMMLIB_ENGINE_DEPTH (slots per rank). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../util/config.h"
#include "../util/log.h"
#include "../util/stats.h"
#include "internal.h"

#define CONTROL_BYTES 256 /* one rank's counters and signatures, on lines of their own */

struct control {
    uint64_t in, reduced, out;
    uint64_t arrived;
    int64_t signature[2][SIGNATURE_WORDS];
};

struct shm_segment {
    char *base;
    size_t bytes;
    int64_t slice; /* bytes */
    int depth;
    char *slots;   /* rank q's slot d: slots + (q * depth + d) * slice */
    char *result;  /* result slot d: result + d * slice */
};

static struct control *control_of(const struct shm_segment *s, int q)
{
    return (struct control *)(s->base + (size_t)q * CONTROL_BYTES);
}

int shm_attach(engine_comm *c)
{
    if (c->size < 2) return 0;
    MPI_Comm node;
    int node_size = 0;
    if (PMPI_Comm_split_type(c->comm, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) != MPI_SUCCESS) return 0;
    PMPI_Comm_size(node, &node_size);
    PMPI_Comm_free(&node);
    /* the same answer on every rank: a communicator spanning nodes leaves every rank's
     * node smaller than it */
    if (node_size != c->size) return 0;
    struct shm_segment *s = calloc(1, sizeof *s);
    int ok = s != NULL;
    if (s) {
        s->slice = (int64_t)commlib_config.engine_slice_kb * 1024;
        s->depth = commlib_config.engine_depth;
        s->bytes = (size_t)c->size * CONTROL_BYTES + ((size_t)c->size + 1) * (size_t)s->depth * (size_t)s->slice;
    }
    char name[64] = {0};
    static int made;
    int fd = -1;
    if (c->rank == 0 && ok) {
        snprintf(name, sizeof name, "/commlib-engine-%d-%d-%lx", (int)getpid(), made++, (long)(uintptr_t)s);
        fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR, 0600);
        ok = fd >= 0 && ftruncate(fd, (off_t)s->bytes) == 0;
        if (!ok) name[0] = 0;
    }
    PMPI_Bcast(name, sizeof name, MPI_CHAR, 0, c->comm);
    if (c->rank != 0 && ok) {
        ok = name[0] != 0;
        if (ok) fd = shm_open(name, O_RDWR, 0600);
        ok = ok && fd >= 0;
    }
    if (ok) {
        s->base = mmap(NULL, s->bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        ok = s->base != MAP_FAILED;
        if (!ok) s->base = NULL;
    }
    if (fd >= 0) close(fd);
    int all = 0;
    PMPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, c->comm); /* also: everyone has mapped it */
    if (c->rank == 0 && name[0]) shm_unlink(name);
    if (!all) {
        if (s && s->base) munmap(s->base, s->bytes);
        free(s);
        if (c->rank == 0) commlib_log(LOG_INFO, "engine: no shared-memory segment; collectives go over the MPI");
        return 0;
    }
    s->slots = s->base + (size_t)c->size * CONTROL_BYTES;
    s->result = s->slots + (size_t)c->size * (size_t)s->depth * (size_t)s->slice;
    c->shm = s;
    return 1;
}

void shm_detach(engine_comm *c)
{
    if (!c->shm) return;
    munmap(c->shm->base, c->shm->bytes);
    free(c->shm);
    c->shm = NULL;
}

static uint64_t load(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static void store(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

int shm_check(engine_op *op, const int64_t *signature)
{
    engine_comm *c = op->c;
    struct shm_segment *s = c->shm;
    uint64_t n = c->shm_ops;
    struct control *mine = control_of(s, c->rank);
    if (!op->checked) {
        memcpy(mine->signature[n & 1], signature, sizeof mine->signature[0]);
        store(&mine->arrived, n + 1);
        op->checked = 1;
    }
    for (int q = 0; q < c->size; q++)
        if (load(&control_of(s, q)->arrived) < n + 1) return 0;
    for (int q = 0; q < c->size; q++)
        if (memcmp(control_of(s, q)->signature[n & 1], signature, sizeof mine->signature[0])) {
            engine_fail(op, ENGINE_ERR_MISMATCH, "mismatch");
            break;
        }
    c->shm_ops = n + 1;
    return 1;
}

/* Elements per slice and per rank's portion of one. */
static int64_t slice_elements(const engine_op *op) { return op->c->shm->slice / (int64_t)cl_dtype_size(op->step.dtype); }

static int64_t portion(const engine_op *op)
{
    int64_t p = slice_elements(op) / op->c->size;
    return p > 0 ? p : 1;
}

void shm_step_begin(engine_op *op)
{
    const struct step *st = &op->step;
    engine_comm *c = op->c;
    int64_t slices = 0;
    switch (st->kind) {
    case ENGINE_ALLREDUCE: {
        int64_t per = portion(op) * c->size;
        slices = (st->count + per - 1) / per;
        break;
    }
    case ENGINE_BROADCAST:
        slices = (st->count + slice_elements(op) - 1) / slice_elements(op);
        break;
    case ENGINE_REDUCE_SCATTER:
    case ENGINE_ALLGATHER: {
        int64_t most = 0;
        for (int q = 0; q < c->size; q++) most = st->counts[q] > most ? st->counts[q] : most;
        slices = (most + portion(op) - 1) / portion(op);
        break;
    }
    default: /* a barrier: the signature exchange was the synchronisation */
        break;
    }
    op->shm = (struct shm_run){.slices = slices, .base = c->shm_slices};
    c->shm_slices += (uint64_t)slices;
    stat_add(STAT_ENGINE_SHM_OPS, 1);
}

/* Slots are chosen by the communicator's slice counter (base + t), never by the slice's
 * index within its step: consecutive steps (the parts of a partitioned operation) must not
 * land in the slots the previous step's slices are still read from. */
static char *slot_of(const engine_op *op, int q, int64_t t)
{
    const struct shm_segment *s = op->c->shm;
    uint64_t slice = op->shm.base + (uint64_t)t;
    return s->slots + ((size_t)q * (size_t)s->depth + (size_t)(slice % (uint64_t)s->depth)) * (size_t)s->slice;
}

static char *result_of(const engine_op *op, int64_t t)
{
    const struct shm_segment *s = op->c->shm;
    return s->result + (size_t)((op->shm.base + (uint64_t)t) % (uint64_t)s->depth) * (size_t)s->slice;
}

/* [*lo, *lo + *n) of n_total elements, for slice t of `per` elements (clipped). */
static int64_t clip(int64_t total, int64_t at, int64_t per)
{
    int64_t left = total - at;
    return left <= 0 ? 0 : left < per ? left : per;
}

static void copy_in(engine_op *op, int64_t t)
{
    const struct step *st = &op->step;
    engine_comm *c = op->c;
    size_t size = cl_dtype_size(st->dtype);
    char *mine = slot_of(op, c->rank, t);
    switch (st->kind) {
    case ENGINE_ALLREDUCE: {
        int64_t per = portion(op) * c->size, at = t * per;
        memcpy(mine, st->send + at * (int64_t)size, (size_t)clip(st->count, at, per) * size);
        break;
    }
    case ENGINE_BROADCAST:
        if (c->rank == st->root) {
            int64_t per = slice_elements(op), at = t * per;
            memcpy(mine, st->recv + at * (int64_t)size, (size_t)clip(st->count, at, per) * size);
        }
        break;
    case ENGINE_REDUCE_SCATTER: {
        int64_t per = portion(op), at = t * per;
        for (int q = 0; q < c->size; q++)
            memcpy(mine + (size_t)q * (size_t)per * size, st->send + (st->displs[q] + at) * (int64_t)size,
                   (size_t)clip(st->counts[q], at, per) * size);
        break;
    }
    case ENGINE_ALLGATHER: {
        int64_t per = portion(op), at = t * per;
        memcpy(mine, st->send + at * (int64_t)size, (size_t)clip(st->counts[c->rank], at, per) * size);
        break;
    }
    default:
        break;
    }
}

static void reduce_slice(engine_op *op, int64_t t)
{
    const struct step *st = &op->step;
    engine_comm *c = op->c;
    size_t size = cl_dtype_size(st->dtype);
    const void *inputs[c->size];
    if (st->kind == ENGINE_ALLREDUCE) {
        int64_t per = portion(op), whole = per * c->size, len = clip(st->count, t * whole, whole);
        int64_t lo = per * c->rank, n = clip(len, lo, per);
        if (n <= 0) return;
        for (int q = 0; q < c->size; q++) inputs[q] = slot_of(op, q, t) + lo * (int64_t)size;
        char *out = result_of(op, t) + lo * (int64_t)size;
        cl_reduce_many(out, inputs, c->size, (size_t)n, st->dtype, st->op);
        if (st->op == CL_AVG) cl_finish_avg(out, (size_t)n, st->dtype, (uint64_t)c->size);
    } else if (st->kind == ENGINE_REDUCE_SCATTER) {
        int64_t per = portion(op), at = t * per, n = clip(st->counts[c->rank], at, per);
        if (n <= 0) return;
        for (int q = 0; q < c->size; q++) inputs[q] = slot_of(op, q, t) + (size_t)c->rank * (size_t)per * size;
        char *out = st->recv + at * (int64_t)size;
        cl_reduce_many(out, inputs, c->size, (size_t)n, st->dtype, st->op);
        if (st->op == CL_AVG) cl_finish_avg(out, (size_t)n, st->dtype, (uint64_t)c->size);
    }
}

static void copy_out(engine_op *op, int64_t t)
{
    const struct step *st = &op->step;
    engine_comm *c = op->c;
    size_t size = cl_dtype_size(st->dtype);
    switch (st->kind) {
    case ENGINE_ALLREDUCE: {
        int64_t per = portion(op) * c->size, at = t * per;
        memcpy(st->recv + at * (int64_t)size, result_of(op, t), (size_t)clip(st->count, at, per) * size);
        break;
    }
    case ENGINE_BROADCAST:
        if (c->rank != st->root) {
            int64_t per = slice_elements(op), at = t * per;
            memcpy(st->recv + at * (int64_t)size, slot_of(op, st->root, t), (size_t)clip(st->count, at, per) * size);
        }
        break;
    case ENGINE_ALLGATHER: {
        int64_t per = portion(op), at = t * per;
        for (int q = 0; q < c->size; q++) {
            char *dst = st->recv + (st->displs[q] + at) * (int64_t)size;
            const char *src = slot_of(op, q, t);
            if (dst != src) memcpy(dst, src, (size_t)clip(st->counts[q], at, per) * size);
        }
        break;
    }
    default:
        break;
    }
}

/* The lowest of a counter over the ranks. */
static uint64_t lowest(const struct shm_segment *s, int size, size_t field)
{
    uint64_t low = UINT64_MAX;
    for (int q = 0; q < size; q++) {
        uint64_t v = load((const uint64_t *)((const char *)control_of(s, q) + field));
        low = v < low ? v : low;
    }
    return low;
}

int shm_step_progress(engine_op *op)
{
    engine_comm *c = op->c;
    struct shm_segment *s = c->shm;
    struct shm_run *r = &op->shm;
    struct control *mine = control_of(s, c->rank);
    for (;;) {
        int moved = 0;
        /* a slot (and the result slot) is free once every rank reduced and copied out the
         * slice `depth` earlier */
        if (r->in < r->slices) {
            int64_t need = (int64_t)r->base + r->in + 1 - s->depth;
            if (need <= 0 || ((int64_t)lowest(s, c->size, offsetof(struct control, reduced)) >= need &&
                              (int64_t)lowest(s, c->size, offsetof(struct control, out)) >= need)) {
                copy_in(op, r->in);
                store(&mine->in, r->base + (uint64_t)++r->in);
                moved = 1;
            }
        }
        if (r->reduced < r->in && lowest(s, c->size, offsetof(struct control, in)) >= r->base + (uint64_t)r->reduced + 1) {
            reduce_slice(op, r->reduced);
            store(&mine->reduced, r->base + (uint64_t)++r->reduced);
            moved = 1;
        }
        if (r->out < r->reduced &&
            lowest(s, c->size, offsetof(struct control, reduced)) >= r->base + (uint64_t)r->out + 1) {
            copy_out(op, r->out);
            store(&mine->out, r->base + (uint64_t)++r->out);
            moved = 1;
        }
        if (r->out == r->slices) return 1;
        if (!moved) return 0;
    }
}
