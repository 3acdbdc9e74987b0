#include "cache.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "../pack/host_pack.h"
#include "../util/config.h"
#include "../util/log.h"
#include "commlib.h"

#define BUCKETS 4096

typedef struct entry {
    intptr_t key;
    canonical_type *ct;
    struct entry *next;
} entry;

static entry *buckets[BUCKETS];
static pthread_rwlock_t lock = PTHREAD_RWLOCK_INITIALIZER;

/* Bumped under the write lock whenever an entry is replaced or removed.  Each thread
 * keeps the entries it used recently with the generation it saw; while the generation
 * is unchanged no entry it holds can have been freed, so the pack path takes no lock.
 * (Freeing a type while another thread packs with it is erroneous MPI.) */
static uint64_t generation = 1;

#define RECENT 64
static __thread struct recent {
    intptr_t key;
    const canonical_type *ct;
    uint64_t generation;
} recent[RECENT];

static size_t bucket_of(intptr_t key)
{
    uint64_t h = (uint64_t)key * 0x9E3779B97F4A7C15ull;
    return (size_t)(h >> 52) % BUCKETS;
}

static entry *find(intptr_t key)
{
    for (entry *e = buckets[bucket_of(key)]; e; e = e->next)
        if (e->key == key) return e;
    return NULL;
}

/* Predefined types are decoded on first use rather than at MPI_Init, so a program pays
 * only for the types it packs.  Anything else must have been committed through us. */
static int is_predefined(MPI_Datatype t)
{
    static const MPI_Datatype predefined[] = {
        MPI_CHAR, MPI_SIGNED_CHAR, MPI_UNSIGNED_CHAR, MPI_BYTE, MPI_WCHAR, MPI_SHORT, MPI_UNSIGNED_SHORT,
        MPI_INT, MPI_UNSIGNED, MPI_LONG, MPI_UNSIGNED_LONG, MPI_LONG_LONG_INT, MPI_LONG_LONG,
        MPI_UNSIGNED_LONG_LONG, MPI_FLOAT, MPI_DOUBLE, MPI_LONG_DOUBLE, MPI_INT8_T, MPI_INT16_T, MPI_INT32_T,
        MPI_INT64_T, MPI_UINT8_T, MPI_UINT16_T, MPI_UINT32_T, MPI_UINT64_T, MPI_C_BOOL, MPI_C_FLOAT_COMPLEX,
        MPI_C_DOUBLE_COMPLEX, MPI_C_LONG_DOUBLE_COMPLEX, MPI_AINT, MPI_OFFSET, MPI_COUNT, MPI_PACKED,
        MPI_FLOAT_INT, MPI_DOUBLE_INT, MPI_LONG_INT, MPI_2INT, MPI_SHORT_INT, MPI_LONG_DOUBLE_INT,
    };
    if (t == MPI_DATATYPE_NULL) return 0;
    for (size_t i = 0; i < sizeof predefined / sizeof predefined[0]; i++)
        if (predefined[i] == t) return 1;
    return 0;
}

static void insert(intptr_t key, canonical_type *ct)
{
    pthread_rwlock_wrlock(&lock);
    entry *e = find(key);
    if (e) {
        canonical_type_destroy(e->ct);
        e->ct = ct;
        __atomic_store_n(&generation, generation + 1, __ATOMIC_RELEASE);
    } else if ((e = malloc(sizeof *e))) {
        size_t b = bucket_of(key);
        *e = (entry){key, ct, buckets[b]};
        buckets[b] = e;
    } else {
        canonical_type_destroy(ct);
    }
    pthread_rwlock_unlock(&lock);
}

/* The entry for `key` with the read lock held, remembered for the lock-free path. */
static const canonical_type *find_locked(intptr_t key, struct recent *slot)
{
    pthread_rwlock_rdlock(&lock);
    entry *e = find(key);
    if (e) *slot = (struct recent){key, e->ct, __atomic_load_n(&generation, __ATOMIC_RELAXED)};
    return e ? e->ct : NULL;
}

const canonical_type *type_cache_acquire(MPI_Datatype type, int *locked)
{
    intptr_t key = TYPE_KEY(type);
    struct recent *slot = &recent[bucket_of(key) % RECENT];
    if (slot->key == key && slot->generation == __atomic_load_n(&generation, __ATOMIC_ACQUIRE)) {
        *locked = 0;
        return slot->ct;
    }
    *locked = 1;
    const canonical_type *ct = find_locked(key, slot);
    if (ct || !is_predefined(type)) return ct;
    pthread_rwlock_unlock(&lock);
    canonical_type *fresh = canonical_type_create(type, commlib_config.max_pieces);
    if (fresh) insert(key, fresh);
    return find_locked(key, slot);
}

void type_cache_release(int locked)
{
    if (locked) pthread_rwlock_unlock(&lock);
}

/* Types spanning at most this much (two elements) are packed once at commit by both
 * the host MPI and commlib from a patterned buffer; any difference leaves the type to
 * the host MPI.  MPIs deviate from the standard's type map in corners (Open MPI 4
 * reorders negative-stride vectors inside structs), and this catches every such corner
 * without knowing it in advance. */
#define VERIFY_SPAN_LIMIT (1 << 20)

static int agrees_with_host(MPI_Datatype type, const canonical_type *ct)
{
    int64_t first = ct->true_lb, last = ct->true_lb + ct->true_extent;
    int64_t lo = ct->extent < 0 ? first + ct->extent : first, hi = ct->extent < 0 ? last : last + ct->extent;
    int64_t bytes = 2 * ct->size;
    if (hi - lo > VERIFY_SPAN_LIMIT || bytes > INT32_MAX) return 1; /* too big to check cheaply */
    unsigned char *typed = malloc((size_t)(hi - lo) + 1), *host = malloc((size_t)bytes + 1),
                  *mine = malloc((size_t)bytes + 1);
    int agree = 0;
    if (typed && host && mine) {
        for (int64_t i = 0; i < hi - lo; i++) typed[i] = (unsigned char)(i * 131 + i / 251 + 7);
        const void *base = (const void *)((uintptr_t)typed - (uintptr_t)lo);
        int host_position = 0;
        int64_t my_position = 0;
        agree = PMPI_Pack(base, 2, type, host, (int)bytes, &host_position, MPI_COMM_SELF) == MPI_SUCCESS &&
                host_pack_message(ct, base, 2, mine, bytes, &my_position) == COMMLIB_OK &&
                host_position == my_position && !memcmp(host, mine, (size_t)bytes);
    }
    free(typed);
    free(host);
    free(mine);
    return agree;
}

enum type_reason type_cache_add(MPI_Datatype type)
{
    canonical_type *ct = canonical_type_create(type, commlib_config.max_pieces);
    if (!ct) return TYPE_REASON_MPI_ERROR;
    if (!ct->unsupported && !agrees_with_host(type, ct)) {
        ct->unsupported = TYPE_REASON_MPI_DISAGREES;
        commlib_log(LOG_INFO, "datatype packs differently in the host MPI than its type map says; left to it");
    }
    enum type_reason reason = ct->unsupported;
    insert(TYPE_KEY(type), ct);
    return reason;
}

int type_cache_remove(MPI_Datatype type)
{
    intptr_t key = TYPE_KEY(type);
    pthread_rwlock_wrlock(&lock);
    entry **link = &buckets[bucket_of(key)];
    while (*link && (*link)->key != key) link = &(*link)->next;
    entry *e = *link;
    if (e) {
        *link = e->next;
        __atomic_store_n(&generation, generation + 1, __ATOMIC_RELEASE);
    }
    pthread_rwlock_unlock(&lock);
    if (!e) return 0;
    canonical_type_destroy(e->ct);
    free(e);
    return 1;
}

void type_cache_clear(void)
{
    pthread_rwlock_wrlock(&lock);
    for (size_t b = 0; b < BUCKETS; b++) {
        entry *e = buckets[b];
        while (e) {
            entry *next = e->next;
            canonical_type_destroy(e->ct);
            free(e);
            e = next;
        }
        buckets[b] = NULL;
    }
    __atomic_store_n(&generation, generation + 1, __ATOMIC_RELEASE);
    pthread_rwlock_unlock(&lock);
}
