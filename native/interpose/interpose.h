/* Shared by the MPI_* entry points.  Every entry point begins with FORWARD_IF_DISABLED
 * so that COMMLIB_DISABLE=1 leaves the program talking to its MPI directly. */
#ifndef COMMLIB_INTERPOSE_H
#define COMMLIB_INTERPOSE_H

#include <mpi.h>

#include "../util/config.h"
#include "../util/stats.h"

#define FORWARD_IF_DISABLED(call)                       \
    do {                                                \
        commlib_config_init();                          \
        if (__builtin_expect(commlib_config.disable, 0)) \
            return call;                                \
    } while (0)

#endif
