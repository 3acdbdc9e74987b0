/* MPI_Type_commit / MPI_Type_dup / MPI_Type_free keep the canonical-form cache in step
 * with the handles the program owns. */
#include "../datatype/cache.h"
#include "../util/log.h"
#include "commlib.h"
#include "interpose.h"

static void remember(MPI_Datatype type)
{
    stat_add(STAT_TYPES_COMMITTED, 1);
    enum type_reason reason = type_cache_add(type);
    if (reason == TYPE_REASON_NONE) {
        stat_add(STAT_TYPES_CANONICAL, 1);
    } else {
        stat_type_unsupported(reason);
        commlib_log(LOG_INFO, "datatype left to the host MPI: %s", type_reason_name[reason]);
    }
}

COMMLIB_EXPORT int MPI_Type_commit(MPI_Datatype *type)
{
    FORWARD_IF_DISABLED(PMPI_Type_commit(type));
    int rc = PMPI_Type_commit(type);
    if (rc == MPI_SUCCESS) remember(*type);
    return rc;
}

COMMLIB_EXPORT int MPI_Type_dup(MPI_Datatype oldtype, MPI_Datatype *newtype)
{
    FORWARD_IF_DISABLED(PMPI_Type_dup(oldtype, newtype));
    int rc = PMPI_Type_dup(oldtype, newtype);
    if (rc != MPI_SUCCESS) return rc;
    /* A duplicate of a committed (or predefined) type is committed without an
     * MPI_Type_commit call. */
    int locked;
    int known = type_cache_acquire(oldtype, &locked) != NULL;
    type_cache_release(locked);
    if (known) remember(*newtype);
    return rc;
}

COMMLIB_EXPORT int MPI_Type_free(MPI_Datatype *type)
{
    FORWARD_IF_DISABLED(PMPI_Type_free(type));
    if (type) type_cache_remove(*type);
    return PMPI_Type_free(type);
}
