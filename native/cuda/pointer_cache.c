#include "pointer_cache.h"

#include <pthread.h>
#include <string.h>

#include "../util/config.h"
#include "../util/stats.h"

#define KEPT 256 /* allocations; one more forgets them all (a program with more asks as before) */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct kept {
    uintptr_t lo, hi;
    CUcontext context;
} kept[KEPT]; /* sorted by lo, disjoint */
static int nkept;
static int on;              /* read without the lock as a hint; decided under it */
static uint64_t generation; /* bumped by every forget */

static uint64_t context_generation; /* bumped by every call that ends a context, start and stop */
static __thread CUcontext known_current;
static __thread uint64_t known_generation;

/* COMMLIB_TEST_CONTEXT_EACH=1: every context made current again, as before stop 39 (A/B) */
static int context_each(void)
{
    static int each = -1;
    return test_hook("COMMLIB_TEST_CONTEXT_EACH", &each);
}

int pointer_cache_context_kept(void) { return commlib_config.pointer_cache && !context_each(); }

void pointer_cache_context_switched(int every_thread)
{
    if (every_thread) __atomic_add_fetch(&context_generation, 1, __ATOMIC_RELEASE);
    else known_current = NULL;
}

int pointer_cache_current_is(CUcontext c)
{
    return c && known_current == c && __atomic_load_n(&on, __ATOMIC_ACQUIRE) &&
           known_generation == __atomic_load_n(&context_generation, __ATOMIC_ACQUIRE) && !context_each();
}

void pointer_cache_note_current(CUcontext c)
{
    known_current = c;
    known_generation = __atomic_load_n(&context_generation, __ATOMIC_ACQUIRE);
}

void pointer_cache_start(void)
{
    pthread_mutex_lock(&lock);
    nkept = 0;
    __atomic_add_fetch(&generation, 1, __ATOMIC_RELEASE);
    __atomic_add_fetch(&context_generation, 1, __ATOMIC_RELEASE);
    __atomic_store_n(&on, commlib_config.pointer_cache, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&lock);
}

void pointer_cache_stop(void)
{
    pthread_mutex_lock(&lock);
    __atomic_store_n(&on, 0, __ATOMIC_RELEASE);
    nkept = 0;
    __atomic_add_fetch(&generation, 1, __ATOMIC_RELEASE);
    __atomic_add_fetch(&context_generation, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&lock);
}

void pointer_cache_forget(void)
{
    if (!__atomic_load_n(&on, __ATOMIC_ACQUIRE)) return;
    pthread_mutex_lock(&lock);
    nkept = 0;
    __atomic_add_fetch(&generation, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&lock);
    stat_add(STAT_POINTER_CACHE_FORGETS, 1);
}

int pointer_cache_on(void) { return __atomic_load_n(&on, __ATOMIC_ACQUIRE); }

/* The first kept range with lo > a. */
static int after(uintptr_t a)
{
    int lo = 0, hi = nkept;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (kept[mid].lo <= a) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* Each thread's recent hits by the exact pointer asked about (a program passes the same
 * pointers to MPI every step: a 32^3 halo exchange in pack mode asks 156 times, into 53
 * allocations), valid while the generation they were found in holds - every forget, start
 * and stop bumps it - so they are found again without the lock.  A slot another pointer took
 * is a miss that takes the lock (on the stand-in driver, 64 slots still left 90 of the 156 to
 * the lock; 256 leave none after the first exchanges). */
#define NEAR_BITS 8
#define NEAR (1 << NEAR_BITS)
static __thread struct near {
    uintptr_t pointer;
    CUcontext context;
    uint64_t generation;
} near[NEAR];

/* Fibonacci hashing: the top NEAR_BITS bits of the pointer times 2^64 / golden ratio */
static unsigned near_slot(uintptr_t a) { return (unsigned)(((uint64_t)a * 0x9E3779B97F4A7C15u) >> (64 - NEAR_BITS)); }

int pointer_cache_find(const void *p, CUcontext *context)
{
    uintptr_t a = (uintptr_t)p;
    struct near *n = &near[near_slot(a)];
    if (n->pointer == a && n->generation == __atomic_load_n(&generation, __ATOMIC_ACQUIRE)) {
        *context = n->context;
        stat_add(STAT_POINTER_CACHE_HITS, 1);
        return 1;
    }
    pthread_mutex_lock(&lock);
    int i = on ? after(a) - 1 : -1;
    int hit = i >= 0 && a < kept[i].hi;
    if (hit) {
        *context = kept[i].context;
        *n = (struct near){a, kept[i].context, generation};
    }
    pthread_mutex_unlock(&lock);
    stat_add(hit ? STAT_POINTER_CACHE_HITS : STAT_POINTER_CACHE_ASKED, 1);
    return hit;
}

uint64_t pointer_cache_generation(void) { return __atomic_load_n(&generation, __ATOMIC_ACQUIRE); }

void pointer_cache_add(uint64_t seen, CUdeviceptr start, size_t size, CUcontext context)
{
    uintptr_t lo = (uintptr_t)start, hi = lo + size;
    if (!size || hi < lo || !context) return;
    pthread_mutex_lock(&lock);
    if (on && seen == generation) {
        int i = after(lo);
        /* a range it meets was kept from an older answer: the driver's is the one now */
        if ((i > 0 && kept[i - 1].hi > lo) || (i < nkept && kept[i].lo < hi)) nkept = 0, i = 0;
        if (nkept == KEPT) nkept = 0, i = 0;
        memmove(&kept[i + 1], &kept[i], (size_t)(nkept - i) * sizeof *kept);
        kept[i] = (struct kept){lo, hi, context};
        nkept++;
    }
    pthread_mutex_unlock(&lock);
}
