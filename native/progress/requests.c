#include "requests.h"

#include <pthread.h>

#include "../util/log.h"

#define BUCKETS 256

int requests_outstanding;
int requests_detached;

static staged_transfer *buckets[BUCKETS];
static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;
static staged_transfer *detached;
static pthread_mutex_t detached_lock = PTHREAD_MUTEX_INITIALIZER;

static size_t bucket_of(intptr_t key) { return (size_t)(((uint64_t)key * 0x9E3779B97F4A7C15ull) >> 56) % BUCKETS; }

void requests_add(MPI_Request request, staged_transfer *t)
{
    t->request = request;
    staged_transfer **head = &buckets[bucket_of(REQUEST_KEY(request))];
    pthread_mutex_lock(&table_lock);
    t->next = *head;
    *head = t;
    __atomic_add_fetch(&requests_outstanding, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&table_lock);
}

staged_transfer *requests_take(MPI_Request request)
{
    staged_transfer **link = &buckets[bucket_of(REQUEST_KEY(request))], *t = NULL;
    pthread_mutex_lock(&table_lock);
    for (; *link; link = &(*link)->next)
        if (REQUEST_KEY((*link)->request) == REQUEST_KEY(request)) {
            t = *link;
            *link = t->next;
            __atomic_sub_fetch(&requests_outstanding, 1, __ATOMIC_RELAXED);
            break;
        }
    pthread_mutex_unlock(&table_lock);
    return t;
}

void requests_detach(MPI_Request request, staged_transfer *t)
{
    t->request = request;
    pthread_mutex_lock(&detached_lock);
    t->next = detached;
    detached = t;
    __atomic_add_fetch(&requests_outstanding, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&requests_detached, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&detached_lock);
}

/* wait = 0: finish those that completed; 1: wait for every one. */
static void finish_detached(int wait)
{
    staged_transfer **link = &detached;
    while (*link) {
        staged_transfer *t = *link;
        int flag = 1;
        MPI_Status status;
        int rc = wait ? PMPI_Wait(&t->request, &status) : PMPI_Test(&t->request, &flag, &status);
        if (!flag && rc == MPI_SUCCESS) {
            link = &t->next;
            continue;
        }
        *link = t->next;
        __atomic_sub_fetch(&requests_outstanding, 1, __ATOMIC_RELAXED);
        __atomic_sub_fetch(&requests_detached, 1, __ATOMIC_RELAXED);
        staged_complete(t, &status, rc);
    }
}

void requests_poll_detached(void)
{
    /* another thread polling already makes the progress this call would */
    if (pthread_mutex_trylock(&detached_lock)) return;
    finish_detached(0);
    pthread_mutex_unlock(&detached_lock);
}

void requests_finalize(void)
{
    pthread_mutex_lock(&detached_lock);
    finish_detached(1);
    pthread_mutex_unlock(&detached_lock);
    int left = __atomic_load_n(&requests_outstanding, __ATOMIC_RELAXED);
    if (left) commlib_log(LOG_WARN, "%d staged nonblocking operation(s) never completed before MPI_Finalize", left);
}
