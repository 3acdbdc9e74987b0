/* The MPI path: the host MPI's nonblocking point-to-point on the engine's private
 * communicator, commlib's own reductions in between.
 *
 * Ring (all-reduce of more than COMMLIB_ENGINE_SMALL_KB, reduce-scatter, all-gather): the
 * buffer is cut into one segment per rank and every segment into chunks of
 * COMMLIB_ENGINE_CHUNK_KB.  Reduce-scatter: in step s rank r sends its partial of segment
 * r-s-1 to r+1 and receives segment r-s-2 from r-1, which it combines (received first, its
 * own second) into its partial; after size-1 steps rank r holds segment r, reduced once
 * along the ring.  All-gather: in step s rank r forwards segment r-s to r+1 and receives
 * segment r-s-1 from r-1.  The steps overlap chunk by chunk: chunk k of step s leaves as
 * soon as chunk k of step s-1 arrived (and was combined), so a message is on the wire
 * while the previous one is being reduced.  Receives of a step are posted two steps ahead
 * into a scratch buffer of two segments (reduce-scatter) or straight into place
 * (all-gather).  Messages between two ranks go in one order and are received in that
 * order (MPI never lets messages of one sender, tag and communicator overtake), so one tag
 * per operation is enough.
 *
 * Recursive doubling (small all-reduce): log2(size) exchanges of the whole buffer with the
 * partner rank ^ 2^k; ranks beyond the largest power of two first fold into their lower
 * neighbour and get the result at the end.  Every combination puts the lower ranks' value
 * first, so every rank computes the same bytes.
 *
 * Broadcast, all-to-all, send, recv, barrier and a CUDA-aware MPI's device all-reduce are
 * the host MPI's own nonblocking calls, progressed by MPI_Test. */
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "../util/config.h"
#include "../util/log.h"
#include "../util/stats.h"
#include "internal.h"

enum algorithm { ALG_LOCAL, ALG_RING, ALG_DOUBLING, ALG_CALLS };
enum phase { PH_REDUCE_SCATTER, PH_ALLGATHER, PH_FOLD, PH_EXCHANGE, PH_UNFOLD, PH_CALLS, PH_DONE };

static int tag_of(const engine_op *op) { return 1 + (int)(op->collective % 30000); }

static size_t esize(const engine_op *op) { return cl_dtype_size(op->step.dtype); }

static int64_t chunks_of(const struct mpi_run *m, int seg)
{
    return (m->counts[seg] + m->chunk - 1) / m->chunk;
}

static int mod(int64_t a, int n) { return (int)(((a % n) + n) % n); }

/* The element range of chunk k of segment seg. */
static void chunk_range(const struct mpi_run *m, int seg, int64_t k, int64_t *at, int64_t *n)
{
    *at = m->displs[seg] + k * m->chunk;
    int64_t left = m->counts[seg] - k * m->chunk;
    *n = left < m->chunk ? left : m->chunk;
}

static void free_run(struct mpi_run *m)
{
    free(m->own_counts);
    free(m->scratch);
    free(m->owned_work);
    free(m->call_arrays);
    free(m->recvs);
    free(m->sends);
    m->own_counts = NULL;
    m->scratch = m->owned_work = NULL;
    m->call_arrays = NULL;
    m->recvs = m->sends = NULL;
}

/* ---- the ring ---- */

static int ring_setup(engine_op *op, char *work, const int64_t *counts, const int64_t *displs, int reduce)
{
    struct mpi_run *m = &op->mpi;
    engine_comm *c = op->c;
    m->algorithm = ALG_RING;
    m->work = work;
    m->counts = counts;
    m->displs = displs;
    m->chunk = (int64_t)commlib_config.engine_chunk_kb * 1024 / (int64_t)esize(op);
    if (m->chunk < 1) m->chunk = 1;
    int64_t longest = 0;
    for (int q = 0; q < c->size; q++) longest = counts[q] > longest ? counts[q] : longest;
    m->max_chunks = (longest + m->chunk - 1) / m->chunk;
    /* reduce-scatter: two steps' receives; all-gather: every step's (an all-reduce has both) */
    int64_t nrecvs = (c->size - 1 > 2 ? c->size - 1 : 2) * m->max_chunks;
    m->recvs = malloc((size_t)(nrecvs ? nrecvs : 1) * sizeof *m->recvs);
    m->sends = malloc((size_t)((c->size - 1) * m->max_chunks + 1) * sizeof *m->sends);
    if (reduce) m->temp = m->scratch = malloc((size_t)(2 * m->max_chunks * m->chunk + 1) * esize(op));
    if (!m->recvs || !m->sends || (reduce && !m->temp)) {
        engine_fail(op, ENGINE_ERR_MEMORY, "out of memory for the ring's buffers");
        return 0;
    }
    for (int64_t i = 0; i < nrecvs; i++) m->recvs[i] = MPI_REQUEST_NULL;
    return 1;
}

static int post_rs_receives(engine_op *op, int64_t step)
{
    struct mpi_run *m = &op->mpi;
    engine_comm *c = op->c;
    if (step >= c->size - 1) return 1;
    int seg = mod(c->rank - step - 2, c->size), left = mod(c->rank - 1, c->size);
    char *temp = m->temp + (size_t)(step % 2) * (size_t)m->max_chunks * (size_t)m->chunk * esize(op);
    for (int64_t k = 0; k < chunks_of(m, seg); k++) {
        int64_t at, n;
        chunk_range(m, seg, k, &at, &n);
        if (engine_mpi_error(op, PMPI_Irecv(temp + k * m->chunk * (int64_t)esize(op), (int)(n * (int64_t)esize(op)),
                                            MPI_BYTE, left, tag_of(op), c->comm, &m->recvs[(step % 2) * m->max_chunks + k]),
                             "MPI_Irecv"))
            return 0;
    }
    return 1;
}

static int post_ag_receives(engine_op *op)
{
    struct mpi_run *m = &op->mpi;
    engine_comm *c = op->c;
    int left = mod(c->rank - 1, c->size);
    for (int64_t s = 0; s < c->size - 1; s++) {
        int seg = mod(c->rank - s - 1, c->size);
        for (int64_t k = 0; k < chunks_of(m, seg); k++) {
            int64_t at, n;
            chunk_range(m, seg, k, &at, &n);
            if (engine_mpi_error(op, PMPI_Irecv(m->work + at * (int64_t)esize(op), (int)(n * (int64_t)esize(op)), MPI_BYTE,
                                                left, tag_of(op), c->comm, &m->recvs[s * m->max_chunks + k]),
                                 "MPI_Irecv"))
                return 0;
        }
    }
    return 1;
}

static int send_chunk(engine_op *op, int seg, int64_t k)
{
    struct mpi_run *m = &op->mpi;
    engine_comm *c = op->c;
    int64_t at, n;
    chunk_range(m, seg, k, &at, &n);
    return !engine_mpi_error(op, PMPI_Isend(m->work + at * (int64_t)esize(op), (int)(n * (int64_t)esize(op)), MPI_BYTE,
                                            mod(c->rank + 1, c->size), tag_of(op), c->comm, &m->sends[m->nsends++]),
                             "MPI_Isend");
}

/* Completes sends from the oldest; 1 when all are done. */
static int sends_drained(engine_op *op)
{
    struct mpi_run *m = &op->mpi;
    while (m->sends_done < m->nsends) {
        int flag = 0;
        if (engine_mpi_error(op, PMPI_Test(&m->sends[m->sends_done], &flag, MPI_STATUS_IGNORE), "MPI_Test (send)")) return 1;
        if (!flag) return 0;
        m->sends_done++;
    }
    return 1;
}

/* Segment sent in step s and received in step s of the phase. */
static int sent_segment(const engine_op *op, int64_t s)
{
    int r = op->c->rank, n = op->c->size;
    return op->mpi.phase == PH_REDUCE_SCATTER ? mod(r - s - 1, n) : mod(r - s, n);
}

static int received_segment(const engine_op *op, int64_t s)
{
    int r = op->c->rank, n = op->c->size;
    return op->mpi.phase == PH_REDUCE_SCATTER ? mod(r - s - 2, n) : mod(r - s - 1, n);
}

static int ring_progress(engine_op *op)
{
    struct mpi_run *m = &op->mpi;
    engine_comm *c = op->c;
    int64_t steps = c->size - 1;
    size_t size = esize(op);
    for (;;) {
        if (op->status != ENGINE_OK) return 1;
        int moved = 0;
        /* receives, in order */
        while (m->recv_step < steps) {
            int seg = received_segment(op, m->recv_step);
            if (m->recv_chunk < chunks_of(m, seg)) {
                int64_t slot = (m->phase == PH_REDUCE_SCATTER ? (m->recv_step % 2) : m->recv_step) * m->max_chunks +
                               m->recv_chunk;
                int flag = 0;
                if (engine_mpi_error(op, PMPI_Test(&m->recvs[slot], &flag, MPI_STATUS_IGNORE), "MPI_Test (receive)"))
                    return 1;
                if (!flag) break;
                if (m->phase == PH_REDUCE_SCATTER) {
                    int64_t at, n;
                    chunk_range(m, seg, m->recv_chunk, &at, &n);
                    char *mine = m->work + at * (int64_t)size;
                    const char *got = m->temp + ((size_t)(m->recv_step % 2) * (size_t)m->max_chunks * (size_t)m->chunk +
                                                 (size_t)(m->recv_chunk * m->chunk)) * size;
                    cl_reduce(mine, got, mine, (size_t)n, op->step.dtype, op->step.op);
                }
                m->recv_chunk++;
                moved = 1;
                continue;
            }
            m->recv_step++;
            m->recv_chunk = 0;
            moved = 1;
            if (m->phase == PH_REDUCE_SCATTER && !post_rs_receives(op, m->recv_step + 1)) return 1;
        }
        /* sends: chunk k of step s after chunk k of step s-1 arrived */
        while (m->send_step < steps) {
            int seg = sent_segment(op, m->send_step);
            if (m->send_chunk < chunks_of(m, seg)) {
                int allowed = m->send_step == 0 || m->recv_step > m->send_step - 1 ||
                              (m->recv_step == m->send_step - 1 && m->recv_chunk > m->send_chunk);
                if (!allowed) break;
                if (!send_chunk(op, seg, m->send_chunk)) return 1;
                m->send_chunk++;
                moved = 1;
                continue;
            }
            m->send_step++;
            m->send_chunk = 0;
            moved = 1;
        }
        if (m->recv_step == steps && m->send_step == steps && sends_drained(op)) {
            if (m->phase == PH_REDUCE_SCATTER) {
                /* the owner finishes its segment: every rank then copies the same bytes */
                if (op->step.op == CL_AVG)
                    cl_finish_avg(m->work + m->displs[c->rank] * (int64_t)size, (size_t)m->counts[c->rank],
                                  op->step.dtype, (uint64_t)c->size);
                if (op->step.kind == ENGINE_REDUCE_SCATTER) {
                    memcpy(op->step.recv, m->work + m->displs[c->rank] * (int64_t)size, (size_t)m->counts[c->rank] * size);
                    m->phase = PH_DONE;
                    return 1;
                }
                /* the all-gather's receives land where the ring's sends came from: those
                 * sends completed above */
                m->phase = PH_ALLGATHER;
                m->recv_step = m->recv_chunk = m->send_step = m->send_chunk = 0;
                m->nsends = m->sends_done = 0;
                if (!post_ag_receives(op)) return 1;
                continue;
            }
            m->phase = PH_DONE;
            return 1;
        }
        if (!moved) return 0;
    }
}

/* ---- recursive doubling ---- */

static int partner_of(const struct mpi_run *m, int new_rank)
{
    return new_rank < m->extra ? 2 * new_rank + 1 : new_rank + m->extra;
}

static int doubling_setup(engine_op *op)
{
    struct mpi_run *m = &op->mpi;
    engine_comm *c = op->c;
    m->algorithm = ALG_DOUBLING;
    m->work = op->step.recv;
    m->temp = m->scratch = malloc((size_t)op->step.count * esize(op) + 1);
    if (!m->temp) {
        engine_fail(op, ENGINE_ERR_MEMORY, "out of memory");
        return 0;
    }
    for (m->pof2 = 1; m->pof2 * 2 <= c->size; m->pof2 *= 2) {}
    m->extra = c->size - m->pof2;
    int r = c->rank;
    m->new_rank = r < 2 * m->extra ? (r % 2 ? r / 2 : -1) : r - m->extra;
    m->mask = 1;
    m->phase = PH_FOLD;
    int bytes = (int)(op->step.count * (int64_t)esize(op));
    if (r < 2 * m->extra) {
        if (r % 2 == 0) { /* sits out: gives its value, later takes the result */
            if (engine_mpi_error(op, PMPI_Isend(m->work, bytes, MPI_BYTE, r + 1, tag_of(op), c->comm, &m->req[0]),
                                 "MPI_Isend") ||
                engine_mpi_error(op, PMPI_Irecv(m->temp, bytes, MPI_BYTE, r + 1, tag_of(op), c->comm, &m->req[1]),
                                 "MPI_Irecv"))
                return 0;
        } else if (engine_mpi_error(op, PMPI_Irecv(m->temp, bytes, MPI_BYTE, r - 1, tag_of(op), c->comm, &m->req[0]),
                                    "MPI_Irecv")) {
            return 0;
        }
    }
    return 1;
}

static int test_all(engine_op *op, int n)
{
    int flag = 0;
    if (engine_mpi_error(op, PMPI_Testall(n, op->mpi.req, &flag, MPI_STATUSES_IGNORE), "MPI_Testall")) return 1;
    return flag;
}

static int doubling_progress(engine_op *op)
{
    struct mpi_run *m = &op->mpi;
    engine_comm *c = op->c;
    int r = c->rank, bytes = (int)(op->step.count * (int64_t)esize(op));
    for (;;) {
        if (op->status != ENGINE_OK) return 1;
        switch (m->phase) {
        case PH_FOLD:
            if (r < 2 * m->extra && r % 2 == 0) { /* the result arrives in the end */
                if (!test_all(op, 2)) return 0;
                memcpy(m->work, m->temp, (size_t)bytes);
                m->phase = PH_DONE;
                return 1;
            }
            if (r < 2 * m->extra) {
                if (!test_all(op, 1)) return 0;
                cl_reduce(m->work, m->temp, m->work, (size_t)op->step.count, op->step.dtype, op->step.op);
            }
            m->phase = PH_EXCHANGE;
            m->nreq = 0;
            continue;
        case PH_EXCHANGE:
            if (m->mask >= m->pof2) {
                if (op->step.op == CL_AVG)
                    cl_finish_avg(m->work, (size_t)op->step.count, op->step.dtype, (uint64_t)c->size);
                m->phase = PH_UNFOLD;
                m->nreq = 0;
                if (r < 2 * m->extra &&
                    engine_mpi_error(op, PMPI_Isend(m->work, bytes, MPI_BYTE, r - 1, tag_of(op), c->comm, &m->req[0]),
                                     "MPI_Isend"))
                    return 1;
                m->nreq = r < 2 * m->extra;
                continue;
            }
            if (!m->nreq) {
                int partner = partner_of(m, m->new_rank ^ m->mask);
                if (engine_mpi_error(op, PMPI_Irecv(m->temp, bytes, MPI_BYTE, partner, tag_of(op), c->comm, &m->req[0]),
                                     "MPI_Irecv") ||
                    engine_mpi_error(op, PMPI_Isend(m->work, bytes, MPI_BYTE, partner, tag_of(op), c->comm, &m->req[1]),
                                     "MPI_Isend"))
                    return 1;
                m->nreq = 2;
            }
            if (!test_all(op, 2)) return 0;
            /* the lower half's value first: both partners compute the same bytes */
            if ((m->new_rank ^ m->mask) < m->new_rank)
                cl_reduce(m->work, m->temp, m->work, (size_t)op->step.count, op->step.dtype, op->step.op);
            else
                cl_reduce(m->work, m->work, m->temp, (size_t)op->step.count, op->step.dtype, op->step.op);
            m->mask <<= 1;
            m->nreq = 0;
            continue;
        case PH_UNFOLD:
            if (m->nreq && !test_all(op, 1)) return 0;
            m->phase = PH_DONE;
            return 1;
        default:
            return 1;
        }
    }
}

/* ---- the host MPI's own calls ---- */

static MPI_Datatype element_type(int dtype, int *ok)
{
    *ok = 1;
    switch (dtype) {
    case CL_F32: return MPI_FLOAT;
    case CL_F64: return MPI_DOUBLE;
    case CL_I8: return MPI_INT8_T;
    case CL_I16: return MPI_INT16_T;
    case CL_I32: return MPI_INT32_T;
    case CL_I64: return MPI_INT64_T;
    case CL_U8: return MPI_UINT8_T;
    case CL_U16: return MPI_UINT16_T;
    case CL_U32: return MPI_UINT32_T;
    case CL_U64: return MPI_UINT64_T;
    default: *ok = 0; return MPI_BYTE;
    }
}

static MPI_Op mpi_op(int op, int *ok)
{
    *ok = 1;
    switch (op) {
    case CL_SUM: return MPI_SUM;
    case CL_MIN: return MPI_MIN;
    case CL_MAX: return MPI_MAX;
    case CL_PROD: return MPI_PROD;
    case CL_BAND: return MPI_BAND;
    case CL_BOR: return MPI_BOR;
    case CL_BXOR: return MPI_BXOR;
    default: *ok = 0; return MPI_OP_NULL;
    }
}

/* Whether the host MPI can reduce this dtype and op itself (a CUDA-aware MPI's device all-reduce). */
int engine_mpi_reduces(int dtype, int op)
{
    int a, b;
    element_type(dtype, &a);
    mpi_op(op, &b);
    return a && b;
}

#define PIECE ((int64_t)1 << 30) /* bytes per call of the calls that take an int count */

static int calls_setup(engine_op *op)
{
    struct mpi_run *m = &op->mpi;
    engine_comm *c = op->c;
    const struct step *st = &op->step;
    size_t size = esize(op);
    int64_t bytes = st->count * (int64_t)size;
    m->algorithm = ALG_CALLS;
    m->phase = PH_CALLS;
    m->nreq = 0;
    switch (st->kind) {
    case ENGINE_BARRIER:
        return !engine_mpi_error(op, PMPI_Ibarrier(c->comm, &m->req[m->nreq++]), "MPI_Ibarrier");
    case ENGINE_ALLREDUCE: { /* a CUDA-aware MPI, device buffers */
        int ok, ok2;
        MPI_Datatype t = element_type(st->dtype, &ok);
        MPI_Op o = mpi_op(st->op, &ok2);
        if (st->count > INT_MAX) {
            engine_fail(op, ENGINE_ERR_ARG, "all_reduce of more than INT_MAX elements on device memory");
            return 0;
        }
        return !engine_mpi_error(op, PMPI_Iallreduce(st->send == st->recv ? MPI_IN_PLACE : st->send, st->recv,
                                                     (int)st->count, t, o, c->comm, &m->req[m->nreq++]),
                                 "MPI_Iallreduce");
    }
    case ENGINE_BROADCAST:
    case ENGINE_SEND:
    case ENGINE_RECV:
        if (bytes > PIECE * 64) {
            engine_fail(op, ENGINE_ERR_ARG, "messages of more than 64 GiB are not supported");
            return 0;
        }
        for (int64_t at = 0; at < bytes || (at == 0 && bytes == 0); at += PIECE) {
            int n = (int)(bytes - at < PIECE ? bytes - at : PIECE);
            char *p = st->kind == ENGINE_SEND ? (char *)st->send + at : st->recv + at;
            int rc = st->kind == ENGINE_BROADCAST ? PMPI_Ibcast(p, n, MPI_BYTE, st->root, c->comm, &m->req[m->nreq])
                     : st->kind == ENGINE_SEND
                         ? PMPI_Isend(p, n, MPI_BYTE, st->root, op->a.tag, c->p2p, &m->req[m->nreq])
                         : PMPI_Irecv(p, n, MPI_BYTE, at == 0 ? (st->root < 0 ? MPI_ANY_SOURCE : st->root) : m->source,
                                      op->a.tag, c->p2p, &m->req[m->nreq]);
            if (engine_mpi_error(op, rc, "a nonblocking call")) return 0;
            m->nreq++;
            if (st->kind == ENGINE_RECV && st->root < 0 && bytes > PIECE) {
                /* the further pieces must come from the first one's sender */
                engine_fail(op, ENGINE_ERR_ARG, "a receive from any source of more than 1 GiB");
                return 0;
            }
            if (bytes == 0) break;
        }
        return 1;
    case ENGINE_ALLTOALL: {
        int *sc = malloc(sizeof(int) * 4 * (size_t)c->size), ok = sc != NULL;
        int *sd = sc + c->size, *rc_ = sd + c->size, *rd = rc_ + c->size;
        for (int q = 0; ok && q < c->size; q++) {
            int64_t sb = st->counts[q] * (int64_t)size, so = st->displs[q] * (int64_t)size;
            int64_t rb = st->counts[c->rank] * (int64_t)size, ro = (int64_t)q * rb;
            if (sb > INT_MAX || so > INT_MAX || rb > INT_MAX || ro > INT_MAX) ok = 0;
            else sc[q] = (int)sb, sd[q] = (int)so, rc_[q] = (int)rb, rd[q] = (int)ro;
        }
        if (!ok) {
            free(sc);
            engine_fail(op, ENGINE_ERR_ARG, "all_to_all of more than 2 GiB");
            return 0;
        }
        m->call_arrays = sc; /* the MPI may read them until completion */
        int rc = PMPI_Ialltoallv(st->send, sc, sd, MPI_BYTE, st->recv, rc_, rd, MPI_BYTE, c->comm, &m->req[m->nreq++]);
        return !engine_mpi_error(op, rc, "MPI_Ialltoallv");
    }
    default:
        engine_fail(op, ENGINE_ERR_ARG, "no MPI call for this operation");
        return 0;
    }
}

static int calls_progress(engine_op *op)
{
    struct mpi_run *m = &op->mpi;
    MPI_Status statuses[64];
    int flag = 0;
    int rc = PMPI_Testall(m->nreq, m->req, &flag, statuses);
    if (rc == MPI_ERR_IN_STATUS) {
        for (int i = 0; i < m->nreq; i++) {
            int error = statuses[i].MPI_ERROR, class = MPI_SUCCESS;
            if (error == MPI_SUCCESS) continue;
            PMPI_Error_class(error, &class);
            if (class == MPI_ERR_TRUNCATE && op->step.kind == ENGINE_RECV) /* the sizes disagree */
                engine_fail(op, ENGINE_ERR_TRUNCATE, "recv: the message from rank %d is longer than the buffer "
                            "(%lld bytes)", statuses[i].MPI_SOURCE, (long long)(op->step.count * (int64_t)esize(op)));
            else
                engine_mpi_error(op, error, "a receive");
            break;
        }
        return 1;
    }
    if (engine_mpi_error(op, rc, "MPI_Testall")) return 1;
    if (!flag) return 0;
    if (op->step.kind == ENGINE_RECV) {
        int64_t got = 0;
        for (int i = 0; i < m->nreq; i++) {
            int n = 0;
            PMPI_Get_count(&statuses[i], MPI_BYTE, &n);
            got += n;
        }
        m->source = statuses[0].MPI_SOURCE;
        int64_t want = op->step.count * (int64_t)esize(op);
        if (got != want)
            engine_fail(op, ENGINE_ERR_TRUNCATE, "recv: the message from rank %d has %lld bytes, the buffer %lld",
                        m->source, (long long)got, (long long)want);
    }
    m->phase = PH_DONE;
    return 1;
}

/* ---- the step ---- */

static void local_step(engine_op *op)
{
    const struct step *st = &op->step;
    size_t size = esize(op);
    switch (st->kind) {
    case ENGINE_ALLREDUCE:
        if (st->send != st->recv) memmove(st->recv, st->send, (size_t)st->count * size);
        break;
    case ENGINE_REDUCE_SCATTER:
        memmove(st->recv, st->send + st->displs[0] * (int64_t)size, (size_t)st->counts[0] * size);
        break;
    case ENGINE_ALLGATHER:
        if (st->send != st->recv + st->displs[0] * (int64_t)size)
            memmove(st->recv + st->displs[0] * (int64_t)size, st->send, (size_t)st->counts[0] * size);
        break;
    case ENGINE_ALLTOALL:
        if (st->send != st->recv) memmove(st->recv, st->send, (size_t)st->counts[0] * size);
        break;
    default:
        break;
    }
}

void mpi_step_begin(engine_op *op)
{
    struct mpi_run *m = &op->mpi;
    engine_comm *c = op->c;
    const struct step *st = &op->step;
    size_t size = esize(op);
    *m = (struct mpi_run){.phase = PH_DONE};
    for (int i = 0; i < 64; i++) m->req[i] = MPI_REQUEST_NULL;
    stat_add(STAT_ENGINE_MPI_OPS, 1);
    if (c->size == 1 && st->kind != ENGINE_SEND && st->kind != ENGINE_RECV) {
        m->algorithm = ALG_LOCAL;
        local_step(op);
        return;
    }
    int calls = op->aware || st->kind == ENGINE_BROADCAST || st->kind == ENGINE_ALLTOALL ||
                st->kind == ENGINE_SEND || st->kind == ENGINE_RECV || st->kind == ENGINE_BARRIER;
    if (calls) {
        calls_setup(op);
        return;
    }
    if (st->kind == ENGINE_ALLREDUCE) {
        if (st->send != st->recv) memcpy(st->recv, st->send, (size_t)st->count * size);
        int64_t bytes = st->count * (int64_t)size;
        if (st->count < c->size || bytes <= (int64_t)commlib_config.engine_small_kb * 1024) {
            doubling_setup(op); /* a failure is the operation's status */
            return;
        }
        m->own_counts = malloc(2 * sizeof(int64_t) * (size_t)c->size);
        if (!m->own_counts) {
            engine_fail(op, ENGINE_ERR_MEMORY, "out of memory");
            return;
        }
        engine_split(st->count, c->size, m->own_counts, m->own_counts + c->size);
        m->phase = PH_REDUCE_SCATTER;
        if (ring_setup(op, st->recv, m->own_counts, m->own_counts + c->size, 1) && post_rs_receives(op, 0))
            post_rs_receives(op, 1);
        return;
    }
    if (st->kind == ENGINE_REDUCE_SCATTER) {
        int64_t total = 0;
        for (int q = 0; q < c->size; q++) total = st->displs[q] + st->counts[q] > total ? st->displs[q] + st->counts[q] : total;
        /* the ring accumulates in a copy of the input (the input stays the program's) */
        m->phase = PH_REDUCE_SCATTER;
        if (!ring_setup(op, NULL, st->counts, st->displs, 1)) return;
        char *work = malloc((size_t)total * size + 1);
        if (!work) {
            engine_fail(op, ENGINE_ERR_MEMORY, "out of memory");
            return;
        }
        memcpy(work, st->send, (size_t)total * size);
        m->work = m->owned_work = work;
        if (post_rs_receives(op, 0)) post_rs_receives(op, 1);
        return;
    }
    if (st->kind == ENGINE_ALLGATHER) {
        char *own = st->recv + st->displs[c->rank] * (int64_t)size;
        if (st->send != own) memcpy(own, st->send, (size_t)st->counts[c->rank] * size);
        m->phase = PH_ALLGATHER;
        if (ring_setup(op, st->recv, st->counts, st->displs, 0)) post_ag_receives(op);
        return;
    }
    engine_fail(op, ENGINE_ERR_ARG, "no algorithm for this operation");
}

int mpi_step_progress(engine_op *op)
{
    struct mpi_run *m = &op->mpi;
    int done;
    if (op->status != ENGINE_OK) done = 1;
    else if (m->phase == PH_DONE) done = 1;
    else if (m->algorithm == ALG_RING) done = ring_progress(op);
    else if (m->algorithm == ALG_DOUBLING) done = doubling_progress(op);
    else done = calls_progress(op);
    if (done) {
        if (op->status != ENGINE_OK) mpi_step_abandon(op);
        free_run(m);
    }
    return done;
}

/* After a failure: cancel what is still pending (receives), wait for the rest. */
void mpi_step_abandon(engine_op *op)
{
    struct mpi_run *m = &op->mpi;
    for (int i = 0; i < m->nreq; i++)
        if (m->req[i] != MPI_REQUEST_NULL) {
            PMPI_Cancel(&m->req[i]);
            PMPI_Wait(&m->req[i], MPI_STATUS_IGNORE);
        }
    m->nreq = 0;
    if (m->algorithm == ALG_RING && m->recvs) {
        int64_t n = m->phase == PH_REDUCE_SCATTER ? 2 * m->max_chunks : (op->c->size - 1) * m->max_chunks;
        for (int64_t i = 0; i < n; i++)
            if (m->recvs[i] != MPI_REQUEST_NULL) {
                PMPI_Cancel(&m->recvs[i]);
                PMPI_Wait(&m->recvs[i], MPI_STATUS_IGNORE);
            }
        for (int64_t i = m->sends_done; i < m->nsends; i++) PMPI_Wait(&m->sends[i], MPI_STATUS_IGNORE);
    }
    free_run(m);
}
