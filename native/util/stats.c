#include "stats.h"

#include <string.h>
#include <time.h>

#include "commlib.h"

static uint64_t counters[STAT_COUNTER_COUNT];
static uint64_t fallbacks[FALLBACK_REASON_COUNT];
static uint64_t type_reasons[TYPE_REASON_COUNT];

static const char *const counter_name[STAT_COUNTER_COUNT] = {
    "pack.calls", "pack.fast", "pack.fallback", "pack.bytes", "pack.ns",
    "unpack.calls", "unpack.fast", "unpack.fallback", "unpack.bytes", "unpack.ns",
    "pack_size.calls",
    "types.committed", "types.canonical", "types.unsupported",
};

const char *const fallback_reason_name[FALLBACK_REASON_COUNT] = {
    "no-pack-knob", "unknown-type", "unsupported-type", "bad-argument", "truncate",
};

const char *const type_reason_name[TYPE_REASON_COUNT] = {
    "none", "combiner", "predefined-with-holes", "too-many-pieces", "too-many-dims",
    "large-count", "overflow", "mpi-error",
};

void stat_add(enum stat_counter c, uint64_t v) { __atomic_fetch_add(&counters[c], v, __ATOMIC_RELAXED); }
void stat_fallback(enum fallback_reason r) { __atomic_fetch_add(&fallbacks[r], 1, __ATOMIC_RELAXED); }
void stat_type_unsupported(enum type_reason r)
{
    __atomic_fetch_add(&type_reasons[r], 1, __ATOMIC_RELAXED);
    stat_add(STAT_TYPES_UNSUPPORTED, 1);
}

uint64_t stat_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t load(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }

long long commlib_stat(const char *name)
{
    if (!name) return -1;
    for (int i = 0; i < STAT_COUNTER_COUNT; i++)
        if (!strcmp(name, counter_name[i])) return (long long)load(&counters[i]);
    if (!strncmp(name, "fallback.", 9))
        for (int i = 0; i < FALLBACK_REASON_COUNT; i++)
            if (!strcmp(name + 9, fallback_reason_name[i])) return (long long)load(&fallbacks[i]);
    if (!strncmp(name, "unsupported.", 12))
        for (int i = 0; i < TYPE_REASON_COUNT; i++)
            if (!strcmp(name + 12, type_reason_name[i])) return (long long)load(&type_reasons[i]);
    return -1;
}

#define APPEND(...) \
    (used += (size_t)snprintf(buf + (used < len ? used : len), used < len ? len - used : 0, __VA_ARGS__))

size_t commlib_stats_json(char *buf, size_t len)
{
    size_t used = 0;
    APPEND("{");
    for (int i = 0; i < STAT_COUNTER_COUNT; i++)
        APPEND("%s\"%s\":%llu", i ? "," : "", counter_name[i], (unsigned long long)load(&counters[i]));
    for (int i = 0; i < FALLBACK_REASON_COUNT; i++)
        APPEND(",\"fallback.%s\":%llu", fallback_reason_name[i], (unsigned long long)load(&fallbacks[i]));
    for (int i = 1; i < TYPE_REASON_COUNT; i++)
        APPEND(",\"unsupported.%s\":%llu", type_reason_name[i], (unsigned long long)load(&type_reasons[i]));
    APPEND("}");
    return used;
}

void stats_print(FILE *out, int rank)
{
    char line[1024];
    size_t len = sizeof line, used = 0;
    char *buf = line;
    const uint64_t *c = counters;
    APPEND("commlib[rank %d]: MPI_Pack calls=%llu fast=%llu fallback=%llu bytes=%llu time=%.3fms"
           " | MPI_Unpack calls=%llu fast=%llu fallback=%llu bytes=%llu time=%.3fms | MPI_Pack_size calls=%llu",
           rank, (unsigned long long)load(&c[STAT_PACK_CALLS]), (unsigned long long)load(&c[STAT_PACK_FAST]),
           (unsigned long long)load(&c[STAT_PACK_FALLBACK]), (unsigned long long)load(&c[STAT_PACK_BYTES]),
           load(&c[STAT_PACK_NS]) / 1e6, (unsigned long long)load(&c[STAT_UNPACK_CALLS]),
           (unsigned long long)load(&c[STAT_UNPACK_FAST]), (unsigned long long)load(&c[STAT_UNPACK_FALLBACK]),
           (unsigned long long)load(&c[STAT_UNPACK_BYTES]), load(&c[STAT_UNPACK_NS]) / 1e6,
           (unsigned long long)load(&c[STAT_PACK_SIZE_CALLS]));
    fprintf(out, "%s\n", line);
    used = 0;
    APPEND("commlib[rank %d]: types committed=%llu canonical=%llu unsupported=%llu", rank,
           (unsigned long long)load(&c[STAT_TYPES_COMMITTED]), (unsigned long long)load(&c[STAT_TYPES_CANONICAL]),
           (unsigned long long)load(&c[STAT_TYPES_UNSUPPORTED]));
    for (int i = 1; i < TYPE_REASON_COUNT; i++)
        if (load(&type_reasons[i])) APPEND(" %s=%llu", type_reason_name[i], (unsigned long long)load(&type_reasons[i]));
    APPEND(" | fallbacks:");
    int any = 0;
    for (int i = 0; i < FALLBACK_REASON_COUNT; i++)
        if (load(&fallbacks[i])) {
            APPEND(" %s=%llu", fallback_reason_name[i], (unsigned long long)load(&fallbacks[i]));
            any = 1;
        }
    if (!any) APPEND(" none");
    fprintf(out, "%s\n", line);
    fflush(out);
}
