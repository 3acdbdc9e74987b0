/* Background progress (COMMLIB_PROGRESS=thread): one thread per process that drives the
 * host MPI's progress engine and finishes commlib's staged operations (progress/requests.h)
 * while the program computes.
 *
 * The thread calls the MPI concurrently with the program, so it needs
 * MPI_THREAD_MULTIPLE: MPI_Init and MPI_Init_thread ask for it (progress_thread_level),
 * and the program is told the level the MPI actually gave (the standard lets `provided`
 * exceed `required`).  When the MPI refuses, one warning line says so and there is no
 * thread; everything else works as with COMMLIB_PROGRESS=none.
 *
 * The MPI's progress engine is driven by PMPI_Test of a receive that nothing matches,
 * posted on a private duplicate of MPI_COMM_SELF (local to the process, so ranks may
 * differ in the knob without a collective mismatch): testing an incomplete request
 * advances every pending operation in MPICH and Open MPI, nonblocking collectives
 * included.  (PMPI_Iprobe does not: MPICH 5 answered it without moving a rendezvous
 * or an Iallreduce along.)
 *
 * Testing hook (not a user knob, not in the knob table): COMMLIB_TEST_THREAD_LEVEL=
 * single|funneled|serialized|multiple makes commlib treat the level the MPI gave as at
 * most that one, to exercise the refusal path on an MPI that always grants MULTIPLE. */
#ifndef COMMLIB_PROGRESS_THREAD_H
#define COMMLIB_PROGRESS_THREAD_H

/* The level to ask PMPI_Init_thread for when the program asks for `required`. */
int progress_thread_level(int required);

/* After a successful PMPI_Init / PMPI_Init_thread: starts the thread when the knob is on
 * and `provided` allows it (else warns once). */
void progress_thread_start(int provided);

/* In MPI_Finalize, before anything else: stops and joins the thread, frees its
 * communicator.  Nothing when no thread runs. */
void progress_thread_stop(void);

int progress_thread_running(void);

/* Blocking completion calls bracket their host MPI call with these.  While the program is
 * inside the MPI it progresses everything itself, and a second thread polling the same
 * engine only fights it for the MPI's lock: MPICH 5 under MPI_THREAD_MULTIPLE made
 * post + wait of 1 MiB four times slower that way.  The thread stays out of the MPI
 * until the program leaves it. */
extern int progress_program_inside, progress_thread_on;
static inline void progress_program_enter(void)
{
    if (__builtin_expect(progress_thread_on, 0)) __atomic_add_fetch(&progress_program_inside, 1, __ATOMIC_RELAXED);
}
static inline void progress_program_leave(void)
{
    if (__builtin_expect(progress_thread_on, 0)) __atomic_sub_fetch(&progress_program_inside, 1, __ATOMIC_RELAXED);
}

/* Every MPI call of the program's (FORWARD_IF_DISABLED) bumps this.  When it changed
 * since the thread's last poll, the program drives the MPI itself, and each poll of the
 * thread's would contend with its calls for the MPI's and the CUDA driver's locks (a 32^3
 * halo exchange GPU to GPU on the H200: 155-205 us without the thread, 400-530 us with a
 * thread that polled between the program's calls, 200-255 with this): the thread sleeps
 * COMMLIB_PROGRESS_BUSY_US (100) before its next poll.  While the program computes and
 * calls nothing, the thread polls at full rate.  A longer pause costs overlap: at 300 us the
 * halo exchange lost another 40 us to the thread, but a 1 MiB Isend/Irecv posted before a
 * compute phase overlapped 0-6 % of it instead of 47-58 % (commlib bench overlap).  (Tried
 * and not kept: polling whenever the program had called nothing for 20 us - 294 us.)  A plain
 * store: only whether it changed matters, so a lost increment between threads does no harm. */
extern unsigned progress_program_calls;
static inline void progress_note_call(void)
{
    if (__builtin_expect(progress_thread_on, 0))
        __atomic_store_n(&progress_program_calls, progress_program_calls + 1, __ATOMIC_RELAXED);
}

#endif
