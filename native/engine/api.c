/* The engine's exported face, for the Python bindings (collectives.mpi, through cffi):
 * handles as opaque pointers, the communicator as its Fortran handle (what mpi4py's
 * Comm.py2f gives, the same on every MPI), errors as (status, message). */
#include <string.h>

#include "commlib.h"
#include "engine.h"

COMMLIB_EXPORT int commlib_engine_comm_create(int64_t fortran_comm, void **out, char *err, size_t errlen)
{
    engine_comm *c = NULL;
    int rc = engine_comm_create(MPI_Comm_f2c((MPI_Fint)fortran_comm), &c, err, errlen);
    *out = c;
    return rc;
}

COMMLIB_EXPORT void commlib_engine_comm_free(void *c) { engine_comm_free(c); }

COMMLIB_EXPORT int commlib_engine_comm_info(void *c, int *rank, int *size, char *transport, size_t len)
{
    *rank = engine_comm_rank(c);
    *size = engine_comm_size(c);
    if (transport && len) {
        strncpy(transport, engine_comm_transport(c), len - 1);
        transport[len - 1] = 0;
    }
    return ENGINE_OK;
}

COMMLIB_EXPORT int commlib_engine_start(void *c, int kind, int dtype, int op, const void *send, void *recv, int64_t count,
                                        const int64_t *counts, int root, int tag, int partitions, int64_t unit,
                                        void *stream, int flags, int64_t shape, void **out, char *err, size_t errlen)
{
    /* flags: 1 = the caller waits for it at once; 2 = partitioned (parts wait for engine_ready) */
    struct engine_args a = {.kind = kind, .dtype = dtype, .op = op, .send = send, .recv = recv, .count = count,
                            .counts = counts, .root = root, .tag = tag, .partitions = partitions, .unit = unit,
                            .stream = stream, .caller_waits = flags & 1, .partitioned = (flags & 2) != 0,
                            .shape = shape};
    engine_op *o = NULL;
    int rc = engine_start(c, &a, &o, err, errlen);
    *out = o;
    return rc;
}

COMMLIB_EXPORT int commlib_engine_ready(void *op, int lo, int hi) { return engine_ready(op, lo, hi); }
COMMLIB_EXPORT int commlib_engine_ready_after(void *op, int partition, void *event)
{
    return engine_ready_after(op, partition, event);
}
COMMLIB_EXPORT int commlib_engine_test(void *op, int partition) { return engine_test_partition(op, partition); }
COMMLIB_EXPORT int commlib_engine_wait(void *op, int partition, int64_t timeout_ns)
{
    return engine_wait_partition(op, partition, timeout_ns);
}
COMMLIB_EXPORT int commlib_engine_wait_passive(void *op, int64_t timeout_ns)
{
    return engine_wait_passive(op, timeout_ns);
}
COMMLIB_EXPORT int commlib_engine_status(void *op, char *msg, size_t len, int *source)
{
    int rc = engine_status(op, msg, len);
    if (source) *source = engine_source(op);
    return rc;
}
COMMLIB_EXPORT int commlib_engine_stream_wait(void *op, void *stream) { return engine_stream_wait(op, stream); }
COMMLIB_EXPORT void commlib_engine_op_free(void *op) { engine_op_free(op); }
