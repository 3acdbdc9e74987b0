/* The progress thread (COMMLIB_PROGRESS=thread) and staged MPI_Iallreduce.
 *
 *   progress lifecycle [init|init_thread]
 *       MPI_Init (or MPI_Init_thread(MPI_THREAD_SINGLE)); prints the thread level the
 *       program was given and whether a thread named "commlib-prog" exists while
 *       MPI runs and after MPI_Finalize.
 *   progress background [SECONDS]
 *       Staged Isend/Irecv of vector types (COMMLIB_STAGE_HOST=1) between rank pairs
 *       r, r^1; the main thread then computes without calling MPI until commlib's
 *       progress.completed counter says the progress thread finished both operations
 *       (or SECONDS, default 30, passed),
 *       checks that the received data is already in the buffer, then calls MPI_Waitall
 *       and checks data and status again.
 *   progress host
 *       Host buffers, nothing staged: MPI_Isend/MPI_Irecv of 4 MiB between r and r^1 and
 *       an MPI_Iallreduce of 2 MiB; the main thread sleeps 300 ms without calling MPI,
 *       then counts the MPI_Test calls until the operations complete (1: the host MPI's
 *       own progress engine moved them in the background).
 *   progress quietwait
 *       Host buffers: rank 0 waits in MPI_Wait, MPI_Waitall, MPI_Recv, MPI_Sendrecv and
 *       MPI_Allreduce for rank 1, which joins each after sleeping 300 ms; prints the
 *       progress thread's polls of the host MPI meanwhile (commlib's progress.polls
 *       counter): the thread keeps out while the program waits inside the MPI.  Each
 *       form three times (a line each): a busy machine that deschedules rank 0 between
 *       reading the counter and entering the call lets the thread poll then.
 *   progress busycall
 *       Rank 0 calls MPI_Pack (of 4 ints, which commlib packs itself: the MPI's lock stays
 *       free for the thread) for 300 ms, then computes 300 ms without calling the MPI;
 *       prints the progress thread's polls and its pauses for the program's calls
 *       (progress.busy_pauses) in each phase.  (Run on 1 rank: a 2-core machine then has a
 *       core for each thread.)
 *   progress iallreduce
 *       MPI_Iallreduce of doubles and of a vector type with gaps, in place and not,
 *       completed by MPI_Wait, MPI_Test loops and MPI_Waitall; checks every element and
 *       that the gaps kept their bytes.
 *
 * Each rank prints "rank R: ..." lines; "rank R: done failures=N" last.  Exit status 1
 * when a check failed. */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check.h"

static int rank, nranks, failures;


typedef long long (*stat_fn)(const char *);
static stat_fn commlib_stat;
static long long stat_value(const char *name) { return commlib_stat ? commlib_stat(name) : -1; }

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Threads of this process named name (from /proc/self/task/N/comm). */
static int threads_named(const char *name)
{
    DIR *dir = opendir("/proc/self/task");
    if (!dir) return -1;
    int found = 0;
    for (struct dirent *e; (e = readdir(dir));) {
        if (e->d_name[0] == '.') continue;
        char path[300], comm[64] = "";
        snprintf(path, sizeof path, "/proc/self/task/%s/comm", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f) continue;
        if (fgets(comm, sizeof comm, f)) comm[strcspn(comm, "\n")] = 0;
        fclose(f);
        found += !strcmp(comm, name);
    }
    closedir(dir);
    return found;
}

static const char *level_name(int level)
{
    return level == MPI_THREAD_SINGLE       ? "single"
           : level == MPI_THREAD_FUNNELED   ? "funneled"
           : level == MPI_THREAD_SERIALIZED ? "serialized"
           : level == MPI_THREAD_MULTIPLE   ? "multiple"
                                            : "unknown";
}

/* ---------------------------------------------------------------- lifecycle */
static int lifecycle(int argc, char **argv)
{
    int provided = -1;
    if (argc > 2 && !strcmp(argv[2], "init_thread")) MPI_Init_thread(&argc, &argv, MPI_THREAD_SINGLE, &provided);
    else MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    int queried = -1;
    MPI_Query_thread(&queried);
    CHECK(provided < 0 || provided == queried, "MPI_Init_thread gave %d, MPI_Query_thread says %d", provided, queried);
    int during = threads_named("commlib-prog");
    /* some traffic while the thread runs */
    double x = rank + 1, sum = 0;
    MPI_Allreduce(&x, &sum, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    CHECK(sum == nranks * (nranks + 1) / 2.0, "allreduce sum %g", sum);
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Finalize();
    int after = threads_named("commlib-prog");
    printf("rank %d: level=%s progress_threads_during=%d after_finalize=%d\n", rank, level_name(queried), during,
           after);
    printf("rank %d: done failures=%d\n", rank, failures);
    return failures != 0;
}

/* --------------------------------------------------------------- background */
static volatile double sink;

static double pattern_value(int sender, int round, int i) { return sender * 1000.0 + round * 100000.0 + i; }

static int background(int argc, char **argv)
{
    int provided;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_SINGLE, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    if (nranks % 2) {
        if (!rank) fprintf(stderr, "background: needs an even number of ranks\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    int partner = rank ^ 1;
    double deadline = argc > 2 ? atof(argv[2]) : 30; /* seconds of "compute" at most */
    /* small (eager) and large (rendezvous) messages: vectors of 2 of every 3 doubles */
    static const int blocks[] = {16, 4096, 131072};
    for (int round = 0; round < 3; round++) {
        int n = blocks[round], extent = 3 * n; /* doubles spanned */
        MPI_Datatype vec;
        MPI_Type_vector(n, 2, 3, MPI_DOUBLE, &vec);
        MPI_Type_commit(&vec);
        double *out = malloc(sizeof(double) * (size_t)extent), *in = malloc(sizeof(double) * (size_t)extent);
        for (int i = 0; i < extent; i++) {
            out[i] = pattern_value(rank, round, i);
            in[i] = -1.0;
        }
        MPI_Barrier(MPI_COMM_WORLD);
        long long before = stat_value("progress.completed");
        MPI_Request reqs[2];
        MPI_Irecv(in, 1, vec, partner, round, MPI_COMM_WORLD, &reqs[0]);
        MPI_Isend(out, 1, vec, partner, round, MPI_COMM_WORLD, &reqs[1]);
        /* "compute" without any MPI call until the progress thread finished both */
        double start = now(), acc = 0;
        long long moved = 0;
        while (now() - start < deadline) {
            for (int k = 0; k < 10000; k++) acc += 1e-9 * k;
            moved = stat_value("progress.completed") - before;
            if (moved >= 2) break;
        }
        double waited = now() - start;
        sink = acc;
        /* the received elements, read before MPI_Waitall (x86 keeps them ordered after
           the counter the progress thread raised once they were written) */
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        const volatile double *early = in;
        int ready = 1;
        for (int i = 0; i < extent; i++) ready &= early[i] == (i % 3 == 2 ? -1.0 : pattern_value(partner, round, i));
        MPI_Status statuses[2];
        int rc = MPI_Waitall(2, reqs, statuses);
        CHECK(rc == MPI_SUCCESS, "Waitall rc %d", rc);
        int bad = 0, count = -1;
        for (int i = 0; i < extent; i++) bad += in[i] != (i % 3 == 2 ? -1.0 : pattern_value(partner, round, i));
        MPI_Get_count(&statuses[0], vec, &count);
        CHECK(bad == 0, "round %d: %d doubles differ after MPI_Waitall", round, bad);
        CHECK(count == 1, "round %d: MPI_Get_count %d", round, count);
        CHECK(statuses[0].MPI_SOURCE == partner && statuses[0].MPI_TAG == round, "round %d: source %d tag %d", round,
              statuses[0].MPI_SOURCE, statuses[0].MPI_TAG);
        printf("rank %d: round %d bytes=%d completed_in_background=%lld data_before_wait=%s verified=%s (%.3f s)\n",
               rank, round, n * 16, moved, ready ? "yes" : "no", bad ? "no" : "yes", waited);
        free(out);
        free(in);
        MPI_Type_free(&vec);
    }
    MPI_Finalize();
    printf("rank %d: done failures=%d\n", rank, failures);
    return failures != 0;
}

/* --------------------------------------------------------------------- host */
static int tests_until_done(MPI_Request *reqs, int n)
{
    int tests = 0, flag = 0;
    while (!flag) {
        MPI_Testall(n, reqs, &flag, MPI_STATUSES_IGNORE);
        tests++;
    }
    return tests;
}

static int host(int argc, char **argv)
{
    int provided;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_SINGLE, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    int partner = (rank ^ 1) < nranks ? rank ^ 1 : rank, n = 1 << 19; /* doubles: 4 MiB */
    double *out = malloc(sizeof(double) * (size_t)n), *in = malloc(sizeof(double) * (size_t)n);
    for (int round = 0; round < 2; round++) {
        for (int i = 0; i < n; i++) out[i] = pattern_value(rank, round, i), in[i] = -1;
        MPI_Request reqs[2];
        MPI_Barrier(MPI_COMM_WORLD);
        MPI_Irecv(in, n, MPI_DOUBLE, partner, 5, MPI_COMM_WORLD, &reqs[0]);
        MPI_Isend(out, n, MPI_DOUBLE, partner, 5, MPI_COMM_WORLD, &reqs[1]);
        nanosleep(&(struct timespec){0, 300000000}, NULL);
        int p2p_tests = tests_until_done(reqs, 2), bad = 0;
        for (int i = 0; i < n; i++) bad += in[i] != pattern_value(partner, round, i);
        CHECK(bad == 0, "isend/irecv: %d doubles differ", bad);

        MPI_Barrier(MPI_COMM_WORLD);
        MPI_Iallreduce(out, in, n / 2, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD, &reqs[0]);
        nanosleep(&(struct timespec){0, 300000000}, NULL);
        int reduce_tests = tests_until_done(reqs, 1);
        bad = 0;
        for (int i = 0; i < n / 2; i++) {
            double want = 0;
            for (int r = 0; r < nranks; r++) want += pattern_value(r, round, i);
            bad += in[i] != want;
        }
        CHECK(bad == 0, "iallreduce: %d sums differ", bad);
        printf("rank %d: host round %d isend_irecv_tests=%d iallreduce_tests=%d\n", rank, round, p2p_tests,
               reduce_tests);
    }
    free(out);
    free(in);
    MPI_Finalize();
    printf("rank %d: done failures=%d\n", rank, failures);
    return failures != 0;
}

static int quietwait(int argc, char **argv)
{
    static const char *forms[] = {"wait", "waitall", "recv", "sendrecv", "allreduce"};
    int provided;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_SINGLE, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    for (int step = 0; step < 15; step++) {
        int form = step / 3, value = -1, mine = 1234 + form;
        MPI_Barrier(MPI_COMM_WORLD);
        if (rank == 0) {
            MPI_Request request;
            long long before = stat_value("progress.polls");
            if (form <= 1) MPI_Irecv(&value, 1, MPI_INT, 1, 9, MPI_COMM_WORLD, &request);
            if (form == 0) MPI_Wait(&request, MPI_STATUS_IGNORE);
            if (form == 1) MPI_Waitall(1, &request, MPI_STATUSES_IGNORE);
            if (form == 2) MPI_Recv(&value, 1, MPI_INT, 1, 9, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            if (form == 3) MPI_Sendrecv(&mine, 1, MPI_INT, 1, 9, &value, 1, MPI_INT, 1, 9, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            if (form == 4) MPI_Allreduce(&mine, &value, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
            long long polls = stat_value("progress.polls") - before;
            CHECK(value == 1234 + form, "%s: received %d", forms[form], value);
            printf("rank 0: %s polls_during_wait=%lld\n", forms[form], before < 0 ? -1 : polls);
        } else if (rank == 1) {
            nanosleep(&(struct timespec){0, 300000000}, NULL);
            value = mine;
            if (form <= 2) MPI_Send(&value, 1, MPI_INT, 0, 9, MPI_COMM_WORLD);
            if (form == 3) MPI_Sendrecv(&mine, 1, MPI_INT, 0, 9, &value, 1, MPI_INT, 0, 9, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            if (form == 4) MPI_Allreduce(&mine, &value, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
        } else if (form == 4) {
            MPI_Allreduce(&mine, &value, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
        }
    }
    MPI_Finalize();
    printf("rank %d: done failures=%d\n", rank, failures);
    return failures != 0;
}

/* ---------------------------------------------------------------- busycall */
static int busycall(int argc, char **argv)
{
    int provided;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_SINGLE, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    if (rank == 0) {
        long long before = stat_value("progress.polls"), paused = stat_value("progress.busy_pauses");
        int calls = 0, in[4] = {1, 2, 3, 4}, ok = 1;
        char out[64];
        for (double end = now() + 0.3; now() < end; calls++) { /* commlib packs, the MPI's lock stays free */
            int position = 0;
            MPI_Pack(in, 4, MPI_INT, out, sizeof out, &position, MPI_COMM_WORLD);
            ok &= position == (int)sizeof in;
        }
        CHECK(ok && !memcmp(out, in, sizeof in), "MPI_Pack packed something else");
        long long calling = stat_value("progress.polls") - before;
        long long paused_calling = stat_value("progress.busy_pauses") - paused;
        before = stat_value("progress.polls");
        paused = stat_value("progress.busy_pauses");
        volatile double x = 0;
        for (double end = now() + 0.3; now() < end;) x += 1;
        long long computing = stat_value("progress.polls") - before;
        long long paused_computing = stat_value("progress.busy_pauses") - paused;
        printf("rank 0: busycall calls=%d polls_calling=%lld polls_computing=%lld pauses_calling=%lld "
               "pauses_computing=%lld\n", calls, before < 0 ? -1 : calling, before < 0 ? -1 : computing,
               paused < 0 ? -1 : paused_calling, paused < 0 ? -1 : paused_computing);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Finalize();
    printf("rank %d: done failures=%d\n", rank, failures);
    return failures != 0;
}

/* ---------------------------------------------------------------- iallreduce */
#define GAP_VALUE -7.0

/* The sum over the vector type's elements (3 doubles at 0, 2, 4 of every 6): predefined
 * operations on derived types are not portable (Open MPI reduces them as if dense). */
static void sum_vector(void *in, void *inout, int *len, MPI_Datatype *type)
{
    (void)type;
    const double *a = in;
    double *b = inout;
    for (int e = 0; e < *len; e++)
        for (int k = 0; k < 6; k += 2) b[6 * e + k] += a[6 * e + k];
}

/* completion: 0 MPI_Wait, 1 MPI_Test loop, 2 MPI_Waitall with a second operation */
static void one_iallreduce(const char *what, int vector, int in_place, int completion, int n)
{
    MPI_Datatype type = MPI_DOUBLE;
    int count = n, span = n; /* doubles in the buffers */
    if (vector) {                 /* 3 doubles of every 4, n/3 elements of 3 blocks */
        MPI_Type_vector(3, 1, 2, MPI_DOUBLE, &type); /* x . x . x: 3 values over 5 doubles */
        MPI_Datatype resized;
        MPI_Type_create_resized(type, 0, 6 * (MPI_Aint)sizeof(double), &resized); /* one double of gap after */
        MPI_Type_free(&type);
        type = resized;
        MPI_Type_commit(&type);
        count = n / 3;
        span = count * 6;
    }
    double *send = malloc(sizeof(double) * (size_t)span), *recv = malloc(sizeof(double) * (size_t)span);
    for (int i = 0; i < span; i++) {
        int used = !vector || (i % 6 < 5 && i % 2 == 0);
        send[i] = used ? (rank + 1) * 1.0 + i : -100.0 - rank;
        recv[i] = in_place ? send[i] : (used ? -200.0 - rank : GAP_VALUE);
        if (in_place && !used) recv[i] = GAP_VALUE;
    }
    MPI_Op op = MPI_SUM;
    if (vector) MPI_Op_create(sum_vector, 1, &op);
    MPI_Request reqs[2];
    int rc = MPI_Iallreduce(in_place ? MPI_IN_PLACE : send, recv, count, type, op, MPI_COMM_WORLD, &reqs[0]);
    CHECK(rc == MPI_SUCCESS, "%s: Iallreduce rc %d", what, rc);
    if (completion == 0) {
        MPI_Wait(&reqs[0], MPI_STATUS_IGNORE);
    } else if (completion == 1) {
        int flag = 0;
        while (!flag) MPI_Test(&reqs[0], &flag, MPI_STATUS_IGNORE);
    } else {
        double x = rank, y = -1;
        MPI_Iallreduce(&x, &y, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD, &reqs[1]);
        MPI_Waitall(2, reqs, MPI_STATUSES_IGNORE);
        CHECK(y == nranks - 1, "%s: second Iallreduce %g", what, y);
    }
    int bad = 0, gaps = 0;
    double ranks_sum = nranks * (nranks + 1) / 2.0;
    for (int i = 0; i < span; i++) {
        int used = !vector || (i % 6 < 5 && i % 2 == 0);
        if (used) bad += recv[i] != ranks_sum + nranks * (double)i;
        else gaps += recv[i] != GAP_VALUE;
    }
    CHECK(bad == 0 && gaps == 0, "%s: %d wrong sums, %d gap values changed", what, bad, gaps);
    printf("rank %d: iallreduce %s verified=%s\n", rank, what, bad || gaps ? "no" : "yes");
    free(send);
    free(recv);
    if (vector) {
        MPI_Type_free(&type);
        MPI_Op_free(&op);
    }
}

static int iallreduce(int argc, char **argv)
{
    int provided;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_SINGLE, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    long long before = stat_value("collective.staged");
    static const char *completions[] = {"wait", "test", "waitall"};
    int calls = 0;
    for (int vector = 0; vector < 2; vector++)
        for (int in_place = 0; in_place < 2; in_place++)
            for (int completion = 0; completion < 3; completion++)
                for (int big = 0; big < 2; big++) {
                    char what[128];
                    snprintf(what, sizeof what, "%s %s %s %s", vector ? "vector" : "double",
                             in_place ? "in-place" : "separate", completions[completion], big ? "large" : "small");
                    one_iallreduce(what, vector, in_place, completion, big ? 3 * 65536 : 30);
                    calls++;
                }
    long long staged = stat_value("collective.staged");
    if (staged >= 0) printf("stats: rank %d collective_staged=%lld calls=%d\n", rank, staged - before, calls);
    else printf("stats: rank %d no-commlib\n", rank);
    MPI_Finalize();
    printf("rank %d: done failures=%d\n", rank, failures);
    return failures != 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    commlib_stat = (stat_fn)dlsym(RTLD_DEFAULT, "commlib_stat");
    const char *mode = argc > 1 ? argv[1] : "";
    if (!strcmp(mode, "lifecycle")) return lifecycle(argc, argv);
    if (!strcmp(mode, "background")) return background(argc, argv);
    if (!strcmp(mode, "iallreduce")) return iallreduce(argc, argv);
    if (!strcmp(mode, "host")) return host(argc, argv);
    if (!strcmp(mode, "quietwait")) return quietwait(argc, argv);
    if (!strcmp(mode, "busycall")) return busycall(argc, argv);
    fprintf(stderr, "usage: progress lifecycle [init|init_thread] | background [SECONDS] | host | quietwait | busycall | "
                    "iallreduce\n");
    return 2;
}
