/* kernel_trace: a preload library that records, through CUPTI's activity API, when each
 * kernel and copy of the process ran on the GPU and when each driver call ran on the host,
 * and writes them to $KTRACE_DIR/trace.<pid>.txt at exit - the timeline Nsight Systems would
 * give, on a machine without it (issue 12: where a strided message's time goes in `bench
 * p2p`'s window).  Lines, times in ns on CUPTI's clock:
 *   K start end queued submitted stream correlation grid block name   a kernel
 *   M start end bytes copykind stream correlation                       a copy
 *   D start end cbid correlation thread                                 a driver call
 *   N cbid name                                                         the driver calls' names
 * Build (on the GPU machine; tests/gpu/session.sh stage `trace`):
 *   gcc -O2 -shared -fPIC -o /tmp/kernel_trace.so tests/gpu/kernel_trace.c -I$CUDA/include \
 *       -L$CUPTI_LIB -lcupti -Wl,-rpath,$CUPTI_LIB
 * Use: LD_PRELOAD=/tmp/kernel_trace.so KTRACE_DIR=/tmp/trace PROGRAM; analysed by
 * tests/gpu/kernel_trace.py.  Not part of commlib. */
#include <cupti.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BUFFER_BYTES (16u << 20)

static FILE *out;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned char seen[65536];

static void CUPTIAPI requested(uint8_t **buffer, size_t *size, size_t *max_records) {
    *buffer = aligned_alloc(8, BUFFER_BYTES);
    *size = *buffer ? BUFFER_BYTES : 0;
    *max_records = 0;
}

static void CUPTIAPI completed(CUcontext ctx, uint32_t stream, uint8_t *buffer, size_t size, size_t valid) {
    (void)ctx, (void)stream, (void)size;
    CUpti_Activity *record = NULL;
    pthread_mutex_lock(&lock);
    while (out && cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
        if (record->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL || record->kind == CUPTI_ACTIVITY_KIND_KERNEL) {
            const CUpti_ActivityKernel10 *k = (const void *)record;
            fprintf(out, "K %llu %llu %llu %llu %u %u %d,%d,%d %d,%d,%d %s\n", (unsigned long long)k->start,
                    (unsigned long long)k->end, (unsigned long long)k->queued, (unsigned long long)k->submitted,
                    k->streamId, k->correlationId, k->gridX, k->gridY, k->gridZ, k->blockX, k->blockY, k->blockZ,
                    k->name ? k->name : "?");
        } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
            const CUpti_ActivityMemcpy6 *m = (const void *)record;
            fprintf(out, "M %llu %llu %llu %u %u %u\n", (unsigned long long)m->start, (unsigned long long)m->end,
                    (unsigned long long)m->bytes, m->copyKind, m->streamId, m->correlationId);
        } else if (record->kind == CUPTI_ACTIVITY_KIND_DRIVER) {
            const CUpti_ActivityAPI *a = (const void *)record;
            fprintf(out, "D %llu %llu %u %u %u\n", (unsigned long long)a->start, (unsigned long long)a->end,
                    (unsigned)a->cbid, a->correlationId, a->threadId);
            if (a->cbid < sizeof seen)
                seen[a->cbid] = 1;
        }
    }
    pthread_mutex_unlock(&lock);
    free(buffer);
}

__attribute__((constructor)) static void start(void) {
    const char *dir = getenv("KTRACE_DIR");
    if (!dir)
        return;
    char path[4096];
    snprintf(path, sizeof path, "%s/trace.%d.txt", dir, (int)getpid());
    out = fopen(path, "w");
    if (!out)
        return;
    cuptiActivityRegisterCallbacks(requested, completed);
    cuptiActivityEnableLatencyTimestamps(1);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
    if (!getenv("KTRACE_NO_DRIVER"))
        cuptiActivityEnable(CUPTI_ACTIVITY_KIND_DRIVER);
}

__attribute__((destructor)) static void stop(void) {
    if (!out)
        return;
    cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
    pthread_mutex_lock(&lock);
    for (unsigned cbid = 0; cbid < sizeof seen; cbid++) {
        const char *name = NULL;
        if (seen[cbid] && cuptiGetCallbackName(CUPTI_CB_DOMAIN_DRIVER_API, cbid, &name) == CUPTI_SUCCESS && name)
            fprintf(out, "N %u %s\n", cbid, name);
    }
    fclose(out);
    out = NULL;
    pthread_mutex_unlock(&lock);
}
