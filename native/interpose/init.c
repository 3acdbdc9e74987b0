/* MPI_Init, MPI_Init_thread, MPI_Finalize: knobs are read on the way in, the per-rank
 * report printed and the type cache emptied on the way out. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "../datatype/cache.h"
#include "../pack/device_hold.h"
#include "../progress/requests.h"
#include "../progress/thread.h"
#include "../transfer/ipc.h"
#include "../transfer/model.h"
#include "../transfer/pipeline.h"
#include "../util/log.h"
#include "commlib.h"
#include "interpose.h"
#include "engine_served.h"

static void after_init(int provided)
{
    if (commlib_config.disable) return;
    commlib_log(LOG_DEBUG, "active (pack %s)", commlib_config.no_pack ? "off" : "on");
    transfer_detect_cuda_aware();
    if (commlib_config.device_pack_async && transfer_cuda_aware()) { /* the MPI itself reads device memory */
        commlib_log(LOG_INFO, "COMMLIB_DEVICE_PACK_ASYNC/HOLD ignored: the MPI is CUDA-aware");
        commlib_config.device_pack_async = commlib_config.device_pack_hold = 0;
    }
    progress_thread_start(provided);
    ipc_init(); /* collective over MPI_COMM_WORLD when COMMLIB_IPC=1; after the thread: it asks */
    pipeline_init(); /* collective over MPI_COMM_WORLD when COMMLIB_PIPELINE=1 */
}

/* With COMMLIB_PROGRESS=thread both ask for MPI_THREAD_MULTIPLE (progress/thread.h). */
COMMLIB_EXPORT int MPI_Init(int *argc, char ***argv)
{
    commlib_config_init();
    int provided = MPI_THREAD_SINGLE, level = progress_thread_level(MPI_THREAD_SINGLE);
    int rc = level == MPI_THREAD_SINGLE ? PMPI_Init(argc, argv) : PMPI_Init_thread(argc, argv, level, &provided);
    if (rc == MPI_SUCCESS) after_init(provided);
    return rc;
}

COMMLIB_EXPORT int MPI_Init_thread(int *argc, char ***argv, int required, int *provided)
{
    commlib_config_init();
    int rc = PMPI_Init_thread(argc, argv, progress_thread_level(required), provided);
    if (rc == MPI_SUCCESS) after_init(*provided);
    return rc;
}

COMMLIB_EXPORT int MPI_Finalize(void)
{
    FORWARD_IF_DISABLED(PMPI_Finalize());
    progress_thread_stop(); /* first: what follows assumes one thread */
    device_hold_finalize(); /* held MPI_Pack/MPI_Unpack launched; CUPTI let go */
    engine_served_finalize();
    requests_finalize(); /* staged requests the program freed: their data lands now */
    ipc_finalize();      /* acknowledgements in, mappings closed, arenas freed (collective) */
    pipeline_finalize(); /* its communicator freed (collective) */
    if (commlib_config.stats) {
        int rank = 0;
        PMPI_Comm_rank(MPI_COMM_WORLD, &rank);
        /* one write per rank: the lines of ranks sharing stderr do not interleave */
        char *text = NULL;
        size_t len = 0;
        FILE *mem = open_memstream(&text, &len);
        if (mem) {
            stats_print(mem, rank);
            transfer_model_print(mem, rank);
            fclose(mem);
            for (size_t done = 0; text && done < len;) {
                ssize_t n = write(STDERR_FILENO, text + done, len - done);
                if (n <= 0) break;
                done += (size_t)n;
            }
            free(text);
        }
    }
    type_cache_clear();
    return PMPI_Finalize();
}
