#define _GNU_SOURCE
#include "thread.h"

#include <mpi.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/prctl.h>
#include <unistd.h>

#include "../util/config.h"
#include "../util/log.h"
#include "../util/stats.h"
#include "requests.h"

static pthread_t thread;
static int running, stopping;
static MPI_Comm progress_comm = MPI_COMM_NULL;
static MPI_Request pending = MPI_REQUEST_NULL; /* a receive nothing will ever match */
static char pending_byte;
int progress_program_inside, progress_thread_on; /* on: set before the thread starts, cleared after it stopped */
unsigned progress_program_calls;

static int wanted(void) { return commlib_config.progress && !commlib_config.disable; }

int progress_thread_level(int required)
{
    return wanted() && required < MPI_THREAD_MULTIPLE ? MPI_THREAD_MULTIPLE : required;
}

static const char *level_name(int level)
{
    switch (level) {
    case MPI_THREAD_SINGLE: return "MPI_THREAD_SINGLE";
    case MPI_THREAD_FUNNELED: return "MPI_THREAD_FUNNELED";
    case MPI_THREAD_SERIALIZED: return "MPI_THREAD_SERIALIZED";
    case MPI_THREAD_MULTIPLE: return "MPI_THREAD_MULTIPLE";
    default: return "an unknown thread level";
    }
}

/* The testing hook of thread.h: the most commlib believes the MPI gave. */
static int level_cap(void)
{
    const char *v = getenv("COMMLIB_TEST_THREAD_LEVEL");
    static const struct { const char *name; int level; } levels[] = {
        {"single", MPI_THREAD_SINGLE}, {"funneled", MPI_THREAD_FUNNELED},
        {"serialized", MPI_THREAD_SERIALIZED}, {"multiple", MPI_THREAD_MULTIPLE}};
    for (size_t i = 0; v && i < sizeof levels / sizeof levels[0]; i++)
        if (!strcasecmp(v, levels[i].name)) return levels[i].level;
    return MPI_THREAD_MULTIPLE;
}

static int world_rank(void)
{
    int rank = 0;
    PMPI_Comm_rank(MPI_COMM_WORLD, &rank);
    return rank;
}

static void release_comm(void)
{
    if (pending != MPI_REQUEST_NULL) {
        PMPI_Cancel(&pending);
        PMPI_Wait(&pending, MPI_STATUS_IGNORE);
    }
    PMPI_Comm_free(&progress_comm);
}

/* While the program waits inside the MPI, the thread still looks at commlib's requests
 * the program is not waiting for, this often: a direct GPU-to-GPU sender waits for the
 * receiver's copy and acknowledgement, and may send what the program waits for only
 * after that (tests/c/ipc_p2p.c "waiting": without it, both ranks waited forever). */
#define INSIDE_SWEEP_NS 50000u

static void *progress_main(void *unused)
{
    (void)unused;
    int pause_us = commlib_config.progress_interval_us, busy_us = commlib_config.progress_busy_us;
    uint64_t next_sweep = 0;
    unsigned calls_seen = __atomic_load_n(&progress_program_calls, __ATOMIC_RELAXED);
    prctl(PR_SET_TIMERSLACK, 1000UL); /* this thread's sleeps: 1 us of slack, not the default 50 */
    while (!__atomic_load_n(&stopping, __ATOMIC_ACQUIRE)) {
        if (__atomic_load_n(&progress_program_inside, __ATOMIC_RELAXED)) {
            /* the program drives the MPI itself right now - but waits, perhaps, for what a
             * peer answers only once it has our pipelined chunks, which only we hand over */
            if (__atomic_load_n(&pipeline_unposted, __ATOMIC_RELAXED)) pipeline_poll_outgoing();
            if (requests_active()) {
                uint64_t now = stat_now_ns();
                if (now >= next_sweep) {
                    requests_progress_pending();
                    next_sweep = now + INSIDE_SWEEP_NS;
                }
            }
            sched_yield();
            continue;
        }
        int flag = 0;
        /* nothing is ever sent on progress_comm: the test is only for its progress */
        PMPI_Test(&pending, &flag, MPI_STATUS_IGNORE);
        stat_add(STAT_PROGRESS_POLLS, 1);
        if (flag) PMPI_Irecv(&pending_byte, 1, MPI_BYTE, MPI_ANY_SOURCE, 0, progress_comm, &pending);
        requests_progress_pending();
        requests_progress();
        /* the program called the MPI since the last poll: it drives the MPI itself, and a
         * poll of ours would contend with its calls - pause busy_us (thread.h) */
        unsigned calls = __atomic_load_n(&progress_program_calls, __ATOMIC_RELAXED);
        int busy = calls != calls_seen;
        calls_seen = calls;
        if (busy && busy_us > pause_us) {
            stat_add(STAT_PROGRESS_BUSY_PAUSES, 1);
            usleep((useconds_t)busy_us);
        }
        else if (pause_us) usleep((useconds_t)pause_us);
        else sched_yield();
    }
    return NULL;
}

void progress_thread_start(int provided)
{
    if (!wanted() || running) return;
    int cap = level_cap(), level = provided < cap ? provided : cap;
    if (level < MPI_THREAD_MULTIPLE) {
        /* one line for the job, not one per rank */
        commlib_log(world_rank() == 0 ? LOG_WARN : LOG_INFO,
                    "COMMLIB_PROGRESS=thread needs MPI_THREAD_MULTIPLE but the MPI provides %s; no progress thread",
                    level_name(level));
        return;
    }
    if (PMPI_Comm_dup(MPI_COMM_SELF, &progress_comm) != MPI_SUCCESS) {
        commlib_log(LOG_WARN, "COMMLIB_PROGRESS=thread: MPI_Comm_dup failed; no progress thread");
        return;
    }
    PMPI_Comm_set_errhandler(progress_comm, MPI_ERRORS_RETURN);
    if (PMPI_Irecv(&pending_byte, 1, MPI_BYTE, MPI_ANY_SOURCE, 0, progress_comm, &pending) != MPI_SUCCESS) {
        commlib_log(LOG_WARN, "COMMLIB_PROGRESS=thread: MPI_Irecv failed; no progress thread");
        PMPI_Comm_free(&progress_comm);
        return;
    }
    /* Signals stay with the program's threads: the progress thread starts with all
     * asynchronous ones blocked (it inherits the mask in effect here). */
    sigset_t all, old;
    sigfillset(&all);
    int synchronous[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL};
    for (size_t i = 0; i < sizeof synchronous / sizeof synchronous[0]; i++) sigdelset(&all, synchronous[i]);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    __atomic_store_n(&stopping, 0, __ATOMIC_RELAXED);
    progress_thread_on = 1;
    int rc = pthread_create(&thread, NULL, progress_main, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) {
        progress_thread_on = 0;
        commlib_log(LOG_WARN, "COMMLIB_PROGRESS=thread: cannot start a thread (%s); no progress thread", strerror(rc));
        release_comm();
        return;
    }
    pthread_setname_np(thread, "commlib-prog");
    running = 1;
    cpu_set_t cpus;
    if (!sched_getaffinity(0, sizeof cpus, &cpus) && CPU_COUNT(&cpus) < 2)
        commlib_log(world_rank() == 0 ? LOG_WARN : LOG_INFO,
                    "COMMLIB_PROGRESS=thread: this rank is bound to one core, which the progress thread shares "
                    "with the program (launch with --bind-to none or more cores per rank)");
    commlib_log(LOG_DEBUG, "progress thread started (pause %d us, %d us after the program's calls)",
                commlib_config.progress_interval_us, commlib_config.progress_busy_us);
}

void progress_thread_stop(void)
{
    if (!running) return;
    __atomic_store_n(&stopping, 1, __ATOMIC_RELEASE);
    pthread_join(thread, NULL);
    running = 0;
    progress_thread_on = 0;
    release_comm();
}

int progress_thread_running(void) { return running; }
