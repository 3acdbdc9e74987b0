/* Canonical forms by datatype handle: filled at MPI_Type_commit (and lazily for the
 * predefined types), dropped at MPI_Type_free.  Readers hold a shared lock while they
 * use an entry (or a generation check proves it unchanged), so a concurrent free of
 * another type never pulls an entry away. */
#ifndef COMMLIB_TYPE_CACHE_H
#define COMMLIB_TYPE_CACHE_H

#include <mpi.h>
#include <stdint.h>

#include "canonical.h"

/* Returns the entry (NULL if the handle is unknown); sets *locked when the shared lock
 * was taken.  Always pair with type_cache_release(locked). */
const canonical_type *type_cache_acquire(MPI_Datatype type, int *locked);
void type_cache_release(int locked);

/* Decodes and stores `type` (replacing an older entry); returns its unsupported reason. */
enum type_reason type_cache_add(MPI_Datatype type);
int type_cache_remove(MPI_Datatype type);
void type_cache_clear(void);

/* Handles as integers: an int (MPICH) or a pointer (Open MPI) both convert. */
#define TYPE_KEY(t) ((intptr_t)(t))
#define TYPE_FROM_KEY(k) ((MPI_Datatype)(k))

#endif
