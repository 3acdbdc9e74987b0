/* Shared by the MPI_* entry points.  Every entry point begins with FORWARD_IF_DISABLED
 * so that COMMLIB_DISABLE=1 leaves the program talking to its MPI directly. */
#ifndef COMMLIB_INTERPOSE_H
#define COMMLIB_INTERPOSE_H

#include <mpi.h>

#include "../progress/requests.h"
#include "../progress/thread.h"
#include "../util/config.h"
#include "../util/stats.h"

#define FORWARD_IF_DISABLED(call)                       \
    do {                                                \
        commlib_config_init();                          \
        if (__builtin_expect(commlib_config.disable, 0)) \
            return call;                                \
        progress_note_call();                           \
    } while (0)

/* A blocking call into the host MPI.  With nothing of commlib's in flight, the progress
 * thread keeps out of the MPI meanwhile (progress/thread.h): the program progresses it
 * itself, and a thread polling alongside only fights it for the MPI's lock (it polled
 * 146 000 times through one 300 ms MPI_Wait; tests/c/progress.c quietwait).  With
 * commlib's requests in flight the thread goes on: a direct GPU-to-GPU sender may be
 * waiting for this rank's acknowledgement, which the thread gives (transfer/ipc.h). */
#define KEPT_OUT(call)                                                 \
    __extension__({                                                    \
        int kept_out_ = progress_thread_on && !requests_active();      \
        if (kept_out_) progress_program_enter();                       \
        int kept_out_rc_ = (call);                                     \
        if (kept_out_) progress_program_leave();                       \
        kept_out_rc_;                                                  \
    })

#endif
