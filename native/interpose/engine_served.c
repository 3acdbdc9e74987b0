/* A C program's MPI_Iallreduce served by commlib's collective engine (native/engine), so
 * that it moves while the program computes: with COMMLIB_PROGRESS=thread (the program
 * then runs under MPI_THREAD_MULTIPLE) and COMMLIB_ENGINE_IALLREDUCE=1 (the default),
 * for predefined integer and floating types and the predefined arithmetic and bitwise
 * ops, on intracommunicators.  Anything else (MPI_LAND, MAXLOC, user ops, derived types,
 * bool, long double, intercommunicators) goes on as before.
 *
 * The program gets a real request of the host MPI: a generalized request
 * (MPI_Grequest_start) that the engine completes (MPI_Grequest_complete, from whichever
 * thread finished the operation).  The host MPI's own MPI_Wait and friends then work as
 * they always do; unlike the MPI_Isendrecv case (interpose/isendrecv.c), nothing has to
 * poll, because the engine's thread finishes the operation without anyone waiting.
 *
 * The engine works on a private duplicate of the program's communicator, made at the
 * first served MPI_Iallreduce on it (a collective call of the same communicator on every
 * rank, so the duplication happens at the same point everywhere) and kept as an attribute
 * of the communicator: MPI_Comm_free deletes it. */
#include <pthread.h>
#include <stdlib.h>

#include "../engine/engine.h"
#include "../progress/thread.h"
#include "../util/log.h"
#include "../util/stats.h"
#include "commlib.h"
#include "interpose.h"
#include "engine_served.h"

static int keyval = MPI_KEYVAL_INVALID;
static pthread_mutex_t keyval_lock = PTHREAD_MUTEX_INITIALIZER;
static int finalizing;

static int delete_engine(MPI_Comm comm, int key, void *attribute, void *extra)
{
    (void)comm;
    (void)key;
    (void)extra;
    if (!finalizing) engine_comm_free(attribute); /* at MPI_Finalize: left to the exit */
    return MPI_SUCCESS;
}

static engine_comm *engine_of(MPI_Comm comm)
{
    pthread_mutex_lock(&keyval_lock);
    if (keyval == MPI_KEYVAL_INVALID &&
        PMPI_Comm_create_keyval(MPI_COMM_NULL_COPY_FN, delete_engine, &keyval, NULL) != MPI_SUCCESS)
        keyval = MPI_KEYVAL_INVALID;
    pthread_mutex_unlock(&keyval_lock);
    if (keyval == MPI_KEYVAL_INVALID) return NULL;
    void *attribute = NULL;
    int found = 0;
    if (PMPI_Comm_get_attr(comm, keyval, &attribute, &found) != MPI_SUCCESS) return NULL;
    if (found) return attribute;
    engine_comm *c = NULL;
    char err[256];
    if (engine_comm_create(comm, &c, err, sizeof err) != ENGINE_OK) {
        commlib_log(LOG_WARN, "MPI_Iallreduce: no engine for the communicator (%s); the host MPI serves it", err);
        return NULL;
    }
    PMPI_Comm_set_attr(comm, keyval, c);
    return c;
}

/* The engine's dtype of a predefined type (by its size for the C integer types), -1 for
 * any other. */
static int dtype_of(MPI_Datatype type)
{
    if (type == MPI_FLOAT) return CL_F32;
    if (type == MPI_DOUBLE) return CL_F64;
    static const MPI_Datatype signed_types[] = {MPI_SIGNED_CHAR, MPI_SHORT, MPI_INT, MPI_LONG, MPI_LONG_LONG,
                                                MPI_INT8_T, MPI_INT16_T, MPI_INT32_T, MPI_INT64_T};
    static const MPI_Datatype unsigned_types[] = {MPI_UNSIGNED_CHAR, MPI_UNSIGNED_SHORT, MPI_UNSIGNED, MPI_UNSIGNED_LONG,
                                                  MPI_UNSIGNED_LONG_LONG, MPI_UINT8_T, MPI_UINT16_T, MPI_UINT32_T,
                                                  MPI_UINT64_T};
    int size = 0;
    for (int u = 0; u < 2; u++) {
        const MPI_Datatype *types = u ? unsigned_types : signed_types;
        for (int i = 0; i < 9; i++)
            if (type == types[i] && PMPI_Type_size(type, &size) == MPI_SUCCESS) {
                switch (size) {
                case 1: return u ? CL_U8 : CL_I8;
                case 2: return u ? CL_U16 : CL_I16;
                case 4: return u ? CL_U32 : CL_I32;
                case 8: return u ? CL_U64 : CL_I64;
                default: return -1;
                }
            }
    }
    return -1;
}

static int op_of(MPI_Op op, int dtype)
{
    if (op == MPI_SUM) return CL_SUM;
    if (op == MPI_PROD) return CL_PROD;
    if (op == MPI_MIN) return CL_MIN;
    if (op == MPI_MAX) return CL_MAX;
    if (cl_dtype_is_float(dtype)) return -1;
    if (op == MPI_BAND) return CL_BAND;
    if (op == MPI_BOR) return CL_BOR;
    if (op == MPI_BXOR) return CL_BXOR;
    return -1;
}

struct served {
    MPI_Request request;
    int error;
};

static int query(void *extra, MPI_Status *status)
{
    struct served *s = extra;
    PMPI_Status_set_elements(status, MPI_BYTE, 0);
    PMPI_Status_set_cancelled(status, 0);
    status->MPI_SOURCE = MPI_UNDEFINED;
    status->MPI_TAG = MPI_UNDEFINED;
    status->MPI_ERROR = s->error;
    return s->error;
}

static int free_served(void *extra)
{
    free(extra);
    return MPI_SUCCESS;
}

static int cancel_served(void *extra, int complete)
{
    (void)extra;
    (void)complete;
    return MPI_SUCCESS; /* a collective is not cancelled (the MPI standard has no way to) */
}

static void completed(void *arg, int status)
{
    struct served *s = arg;
    s->error = status == ENGINE_OK ? MPI_SUCCESS : MPI_ERR_OTHER;
    PMPI_Grequest_complete(s->request);
}

int engine_serve_iallreduce(const void *sendbuf, void *recvbuf, int count, MPI_Datatype type, MPI_Op op,
                            MPI_Comm comm, MPI_Request *request, int *rc)
{
    if (!commlib_config.engine_iallreduce || !progress_thread_running() || count <= 0 || !request || !recvbuf ||
        comm == MPI_COMM_NULL)
        return 0;
    int dtype = dtype_of(type), code = dtype < 0 ? -1 : op_of(op, dtype), inter = 0;
    if (code < 0 || PMPI_Comm_test_inter(comm, &inter) != MPI_SUCCESS || inter) return 0;
    engine_comm *c = engine_of(comm);
    if (!c) return 0;
    struct served *s = calloc(1, sizeof *s);
    if (!s) return 0;
    if ((*rc = PMPI_Grequest_start(query, free_served, cancel_served, s, &s->request)) != MPI_SUCCESS) {
        free(s);
        return 1;
    }
    struct engine_args a = {.kind = ENGINE_ALLREDUCE, .dtype = dtype, .op = code,
                            .send = sendbuf == MPI_IN_PLACE ? NULL : sendbuf, .recv = recvbuf, .count = count,
                            .partitions = 1, .done = completed, .done_arg = s};
    engine_op *o = NULL;
    char err[256];
    *request = s->request;
    if (engine_start(c, &a, &o, err, sizeof err) != ENGINE_OK) {
        commlib_log(LOG_ERROR, "MPI_Iallreduce: %s", err);
        s->error = MPI_ERR_OTHER;
        PMPI_Grequest_complete(s->request);
        *rc = MPI_SUCCESS; /* the error is the request's */
        return 1;
    }
    engine_op_free(o); /* the engine keeps it until it ended */
    stat_add(STAT_ENGINE_IALLREDUCE, 1);
    *rc = MPI_SUCCESS;
    return 1;
}

void engine_served_finalize(void)
{
    finalizing = 1;
    engine_shutdown();
}
