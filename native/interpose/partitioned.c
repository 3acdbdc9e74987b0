/* MPI-4 partitioned point-to-point with buffers the host MPI may not read (device memory,
 * or any with COMMLIB_STAGE_HOST=1): MPI_Psend_init, MPI_Precv_init, MPI_Pready,
 * MPI_Pready_range, MPI_Pready_list and MPI_Parrived.  MPI_Start/MPI_Startall and the
 * completion calls treat these requests as the persistent ones they are
 * (interpose/persistent.c, interpose/request.c).
 *
 * At init commlib stages the buffer as for a persistent request (transfer/staged.h: the
 * packed bytes as MPI_PACKED, or the span with the program's own type) and creates the
 * host MPI's own partitioned request over the staging with the program's partition count,
 * so partition i on the wire is the program's partition i (MPI_PACKED matches any type
 * signature of the same size: a host-memory peer with its own datatype matches, as the
 * test checks both ways).  The program gets the host request; the entry is parked like a
 * persistent one and listed in the registry MPI_Pready/MPI_Parrived consult
 * (progress/requests.h).
 *
 * MPI_Pready packs the partition (or copies its type map's bytes) into the staging before
 * telling the host MPI, so the message carries what the partition held when it was
 * declared ready.  MPI_Parrived asks the host MPI and, the first time a partition is
 * reported, moves it into the program's buffer before answering flag = 1; the completion
 * moves the partitions nobody asked about.  Either way only the elements' type-map bytes
 * are written (transfer/typemap.h).  A staging failure is reported on MPI_COMM_WORLD (the
 * request does not name its communicator to the program; it may be freed) and the
 * partition is not declared ready.
 *
 * Host buffers, COMMLIB_DISABLE, requests of no staged entry and invalid partition numbers
 * go to the host MPI unchanged (it raises its own errors).  An MPI without partitioned
 * calls (MPI-3, such as Open MPI 4) gets none of these entry points. */
#include "../progress/requests.h"
#include "commlib.h"
#include "interpose.h"

#if MPI_VERSION >= 4

typedef int (*partitioned_init_fn)(const void *, int, MPI_Count, MPI_Datatype, int, int, MPI_Comm, MPI_Info,
                                   MPI_Request *);

static int staging_failed(MPI_Comm comm)
{
    PMPI_Comm_call_errhandler(comm, MPI_ERR_OTHER);
    return MPI_ERR_OTHER;
}

static int init_any(partitioned_init_fn init, const void *buf, int partitions, MPI_Count count, MPI_Datatype type,
                    int peer, int tag, MPI_Comm comm, MPI_Info info, MPI_Request *request, int receiving)
{
    requests_progress();
    staged_transfer *t;
    int s = staged_partitioned_prepare(&t, buf, partitions, count, type, receiving);
    if (s == STAGED_FORWARD) return init(buf, partitions, count, type, peer, tag, comm, info, request);
    if (s == STAGED_FAILED) return staging_failed(comm);
    int rc = init(t->wire_buf, partitions, t->wire_count, t->wire_type, peer, tag, comm, info, request);
    if (rc != MPI_SUCCESS) {
        staged_release(t);
        return rc;
    }
    requests_park(*request, t);
    requests_register(*request, t);
    return rc;
}

/* PMPI_Precv_init takes a non-const buffer; the staged path hands it commlib's staging. */
static int precv_init(const void *buf, int partitions, MPI_Count count, MPI_Datatype type, int source, int tag,
                      MPI_Comm comm, MPI_Info info, MPI_Request *request)
{
    return PMPI_Precv_init((void *)buf, partitions, count, type, source, tag, comm, info, request);
}

COMMLIB_EXPORT int MPI_Psend_init(const void *buf, int partitions, MPI_Count count, MPI_Datatype type, int dest,
                                  int tag, MPI_Comm comm, MPI_Info info, MPI_Request *request)
{
    FORWARD_IF_DISABLED(PMPI_Psend_init(buf, partitions, count, type, dest, tag, comm, info, request));
    return init_any(PMPI_Psend_init, buf, partitions, count, type, dest, tag, comm, info, request, 0);
}

COMMLIB_EXPORT int MPI_Precv_init(void *buf, int partitions, MPI_Count count, MPI_Datatype type, int source, int tag,
                                  MPI_Comm comm, MPI_Info info, MPI_Request *request)
{
    FORWARD_IF_DISABLED(PMPI_Precv_init(buf, partitions, count, type, source, tag, comm, info, request));
    return init_any(precv_init, buf, partitions, count, type, source, tag, comm, info, request, 1);
}

/* The staged send behind `request`, when there is one (NULL: the host MPI's alone). */
static staged_transfer *staged_send(MPI_Request request)
{
    staged_transfer *t = requests_any_registered() ? requests_lookup(request) : NULL;
    return t && !t->receiving ? t : NULL;
}

static int valid_partition(const staged_transfer *t, int partition) { return partition >= 0 && partition < t->partitions; }

COMMLIB_EXPORT int MPI_Pready(int partition, MPI_Request request)
{
    FORWARD_IF_DISABLED(PMPI_Pready(partition, request));
    staged_transfer *t = staged_send(request);
    if (t && valid_partition(t, partition) && !staged_partitions_ready(t, partition, 1))
        return staging_failed(MPI_COMM_WORLD);
    return PMPI_Pready(partition, request);
}

COMMLIB_EXPORT int MPI_Pready_range(int partition_low, int partition_high, MPI_Request request)
{
    FORWARD_IF_DISABLED(PMPI_Pready_range(partition_low, partition_high, request));
    staged_transfer *t = staged_send(request);
    if (t && valid_partition(t, partition_low) && valid_partition(t, partition_high) &&
        partition_low <= partition_high &&
        !staged_partitions_ready(t, partition_low, partition_high - partition_low + 1))
        return staging_failed(MPI_COMM_WORLD);
    return PMPI_Pready_range(partition_low, partition_high, request);
}

/* Runs of consecutive partitions in the list are packed in one go. */
COMMLIB_EXPORT int MPI_Pready_list(int length, const int array_of_partitions[], MPI_Request request)
{
    FORWARD_IF_DISABLED(PMPI_Pready_list(length, array_of_partitions, request));
    staged_transfer *t = staged_send(request);
    int valid = t && length > 0 && array_of_partitions;
    for (int i = 0; valid && i < length; i++) valid = valid_partition(t, array_of_partitions[i]);
    for (int i = 0, n; valid && i < length; i += n) {
        n = 1;
        while (i + n < length && array_of_partitions[i + n] == array_of_partitions[i] + n) n++;
        if (!staged_partitions_ready(t, array_of_partitions[i], n)) return staging_failed(MPI_COMM_WORLD);
    }
    return PMPI_Pready_list(length, array_of_partitions, request);
}

COMMLIB_EXPORT int MPI_Parrived(MPI_Request request, int partition, int *flag)
{
    FORWARD_IF_DISABLED(PMPI_Parrived(request, partition, flag));
    staged_transfer *t = requests_any_registered() ? requests_lookup(request) : NULL;
    if (!t || !t->receiving || !valid_partition(t, partition)) return PMPI_Parrived(request, partition, flag);
    int rc = PMPI_Parrived(request, partition, flag);
    if (rc != MPI_SUCCESS || !*flag) return rc;
    int moved = staged_partition_arrived(t, partition);
    if (moved < 0) {
        *flag = 0;
        return staging_failed(MPI_COMM_WORLD);
    }
    *flag = moved; /* 0: another thread is still moving it into the program's buffer */
    return MPI_SUCCESS;
}

#endif
