#define _GNU_SOURCE
#include "cupti.h"

#include <dlfcn.h>
#include <glob.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../util/log.h"
#include "pointer_cache.h"

/* From CUDA's cupti_callbacks.h (the same in CUDA 11 to 13). */
typedef int cupti_result;
enum { CUPTI_API_ENTER = 0, CUPTI_API_EXIT = 1 };
enum { CUPTI_CB_DOMAIN_DRIVER_API = 1, CUPTI_CB_DOMAIN_RUNTIME_API = 2 };
struct cupti_callback_data { /* CUpti_CallbackData */
    int callback_site;
    const char *function_name;
    const void *function_params;
    void *function_return_value;
    const char *symbol_name;
    void *context;
    uint32_t context_uid;
    uint64_t *correlation_data;
    uint32_t correlation_id;
};
typedef void (*cupti_callback)(void *userdata, int domain, uint32_t cbid, const void *data);
typedef struct cupti_subscriber *cupti_subscriber;

static struct {
    cupti_result (*subscribe)(cupti_subscriber *, cupti_callback, void *);
    cupti_result (*unsubscribe)(cupti_subscriber);
    cupti_result (*enable_domain)(uint32_t, cupti_subscriber, int);
    cupti_result (*result_string)(cupti_result, const char **);
    cupti_result (*enable_callback)(uint32_t, cupti_subscriber, int, uint32_t);
    cupti_result (*callback_name)(int, uint32_t, const char **);
} api;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int asked, watching;
static cupti_subscriber subscriber;
static void (*listener)(const char *);
static char failure[256];
static __thread int quiet;          /* inside commlib's own calls (cupti_quiet_begin) */
static __thread int runtime_depth;  /* inside a runtime call: it called back at its entry */

/* Calls that only ask: they neither queue work nor observe device memory, so held work
 * need not be launched before them - and commlib's own buffer queries on every MPI call
 * (cuPointerGetAttributes) must not launch it one call at a time. */
static int asks_only(const char *f)
{
    static const char *const prefixes[] = {
        "cuPointerGetAttribute", "cuCtxGetCurrent", "cuCtxSetCurrent", "cuCtxGetDevice", "cuCtxPushCurrent",
        "cuCtxPopCurrent", "cuDeviceGet", "cuDriverGetVersion", "cuGetErrorString", "cuGetErrorName",
        "cuGetProcAddress", "cuGetExportTable", "cuMemGetAddressRange", "cuFuncGetAttribute", "cuModuleGetFunction",
        "cuEventQuery", "cudaGetDevice", "cudaGetLastError", "cudaPeekAtLastError", "cudaPointerGetAttributes",
        "cudaDeviceGetAttribute", "cudaGetErrorString", "cudaGetErrorName", "cudaSetDevice", "cudaEventQuery",
        "cudaFuncGetAttributes", "cudaDriverGetVersion", "cudaRuntimeGetVersion", "cudaGetFuncBySymbol"};
    if (!f) return 0;
    for (size_t i = 0; i < sizeof prefixes / sizeof *prefixes; i++)
        if (!strncmp(f, prefixes[i], strlen(prefixes[i]))) return 1;
    return 0;
}

/* Calls that may change the calling thread's current context (1), or any thread's - they end a
 * context (2); pointer_cache.h keeps the one commlib made current.  Their callbacks stay on even
 * where they only ask (quiet_queries), while that is kept. */
static int switches_context(const char *f)
{
    static const char *const own[] = {"cuCtxSetCurrent", "cuCtxPushCurrent", "cuCtxPopCurrent", "cuCtxCreate",
                                      "cuCtxAttach", "cudaSetDevice", "cudaSetValidDevices", "cudaInitDevice"};
    static const char *const all[] = {"cuCtxDestroy", "cuCtxDetach", "cuDevicePrimaryCtxRelease",
                                      "cuDevicePrimaryCtxReset", "cudaDeviceReset", "cudaThreadExit"};
    if (!f) return 2;
    for (size_t i = 0; i < sizeof all / sizeof *all; i++)
        if (!strncmp(f, all[i], strlen(all[i]))) return 2;
    for (size_t i = 0; i < sizeof own / sizeof *own; i++)
        if (!strncmp(f, own[i], strlen(own[i]))) return 1;
    return 0;
}

/* Calls that may allocate, free or map memory (pointer_cache.h forgets what it kept, at
 * their entry and exit): any name with one of these in it.  More than needed costs only
 * queries; none may be missed. */
static int changes_memory(const char *f)
{
    static const char *const parts[] = {"Alloc", "Malloc", "Free", "Map", "Register", "Release", "CtxDestroy",
                                        "PoolDestroy", "GraphDestroy", "GraphExecDestroy", "DestroyExternalMemory",
                                        "Reset", "Trim", "IpcOpen", "IpcClose", "Detach", "Unload", "Import"};
    if (!f) return 1;
    for (size_t i = 0; i < sizeof parts / sizeof *parts; i++)
        if (strstr(f, parts[i])) return 1;
    return 0;
}

/* Per domain and callback id (0 is none: asked by name each time), what its name says, found
 * at its first call: 0 not yet, else KNOWN | MEMORY (changes_memory) | ASKS (asks_only) |
 * SWITCH or SWITCH_ALL (switches_context) - the program's own calls come here with the
 * callbacks of the queries off, and asks_only's 33 string compares cost ~0.5 us a call. */
#define CALLBACK_IDS 4096
enum { KNOWN = 1, MEMORY = 2, ASKS = 4, SWITCH = 8, SWITCH_ALL = 16 };
static unsigned char traits[3][CALLBACK_IDS];

static unsigned traits_of(int domain, uint32_t cbid, const char *function)
{
    int known = domain >= 1 && domain <= 2 && cbid > 0 && cbid < CALLBACK_IDS;
    unsigned char t = known ? __atomic_load_n(&traits[domain][cbid], __ATOMIC_RELAXED) : 0;
    if (!t) {
        int switches = switches_context(function);
        t = (unsigned char)(KNOWN | (changes_memory(function) ? MEMORY : 0) | (asks_only(function) ? ASKS : 0) |
                            (switches == 1 ? SWITCH : switches ? SWITCH_ALL : 0));
        if (known) __atomic_store_n(&traits[domain][cbid], t, __ATOMIC_RELAXED);
    }
    return t;
}

static void on_api(void *userdata, int domain, uint32_t cbid, const void *data)
{
    (void)userdata;
    const struct cupti_callback_data *d = data;
    unsigned t = traits_of(domain, cbid, d->function_name);
    if (t & MEMORY) pointer_cache_forget(); /* entry and exit, any depth, commlib's own too */
    if (t & (SWITCH | SWITCH_ALL)) pointer_cache_context_switched(t & SWITCH_ALL);
    int enter = d->callback_site == CUPTI_API_ENTER;
    if (domain == CUPTI_CB_DOMAIN_RUNTIME_API) {
        runtime_depth += enter ? 1 : -1;
        if (runtime_depth < 0) runtime_depth = 0; /* subscribed inside a runtime call */
        if (!enter || runtime_depth != 1) return;
    } else if (domain != CUPTI_CB_DOMAIN_DRIVER_API || !enter || runtime_depth) {
        return;
    }
    if (quiet || (t & ASKS)) return;
    void (*f)(const char *) = __atomic_load_n(&listener, __ATOMIC_ACQUIRE);
    if (f) {
        quiet++; /* what it launches does not call back */
        f(d->function_name);
        quiet--;
    }
}

void cupti_quiet_begin(void) { quiet++; }
void cupti_quiet_end(void) { quiet--; }

static void *open_named(const char *name)
{
    void *h = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (h) commlib_log(LOG_INFO, "CUPTI: %s", name);
    return h;
}

/* COMMLIB_CUPTI (a path or name), a libcupti already loaded (torch's), the sonames on the
 * library path, then the toolkit's folders: CUDA_HOME, CUDA_PATH, /usr/local/cuda, the
 * nvcc on PATH's, /usr/local/cuda-*. */
static void *open_cupti(void)
{
    const char *knob = getenv("COMMLIB_CUPTI");
    void *h;
    if (knob && *knob && strcmp(knob, "auto")) {
        if (!(h = open_named(knob))) snprintf(failure, sizeof failure, "COMMLIB_CUPTI=%s: %s", knob, dlerror());
        return h;
    }
    static const char *const names[] = {"libcupti.so.13", "libcupti.so.12", "libcupti.so"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
        if ((h = dlopen(names[i], RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD))) return h;
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
        if ((h = open_named(names[i]))) return h;
    const char *homes[] = {getenv("CUDA_HOME"), getenv("CUDA_PATH"), "/usr/local/cuda"};
    for (size_t i = 0; i < sizeof homes / sizeof *homes; i++) {
        if (!homes[i] || !*homes[i]) continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/extras/CUPTI/lib64/libcupti.so", homes[i]);
        if ((h = open_named(path))) return h;
        snprintf(path, sizeof path, "%s/lib64/libcupti.so", homes[i]);
        if ((h = open_named(path))) return h;
    }
    const char *path_env = getenv("PATH"); /* the toolkit of the nvcc on PATH */
    for (const char *p = path_env; p && *p;) {
        const char *end = strchr(p, ':');
        int len = end ? (int)(end - p) : (int)strlen(p);
        char path[4096];
        snprintf(path, sizeof path, "%.*s/nvcc", len, p);
        if (len && access(path, X_OK) == 0) {
            snprintf(path, sizeof path, "%.*s/../extras/CUPTI/lib64/libcupti.so", len, p);
            if ((h = open_named(path))) return h;
            snprintf(path, sizeof path, "%.*s/../lib64/libcupti.so", len, p);
            if ((h = open_named(path))) return h;
        }
        p = end ? end + 1 : NULL;
    }
    static const char *const patterns[] = {"/usr/local/cuda-*/extras/CUPTI/lib64/libcupti.so",
                                           "/usr/local/cuda-*/lib64/libcupti.so"};
    h = NULL;
    for (size_t k = 0; k < 2 && !h; k++) {
        glob_t g;
        if (glob(patterns[k], 0, NULL, &g) != 0) continue;
        for (size_t i = g.gl_pathc; i-- > 0 && !h;) h = open_named(g.gl_pathv[i]); /* the newest first */
        globfree(&g);
    }
    if (!h) snprintf(failure, sizeof failure, "no libcupti found (set COMMLIB_CUPTI=/path/to/libcupti.so)");
    return h;
}

/* A callback costs the calling thread ~0.5-0.8 us (H200, tests/gpu/cupti_flush_probe.cu), and
 * commlib alone makes ~5 pointer queries per MPI call on device buffers (260 per halo
 * exchange in pack mode): the callbacks of the calls that only ask are turned off, found by
 * their names (the ids differ between CUDA versions).  Without cuptiGetCallbackName (older
 * CUPTI) they stay on and on_api skips them. */
static void quiet_queries(void)
{
    if (!api.enable_callback || !api.callback_name) return;
    int off = 0;
    for (int domain = CUPTI_CB_DOMAIN_DRIVER_API; domain <= CUPTI_CB_DOMAIN_RUNTIME_API; domain++)
        for (uint32_t cbid = 1; cbid < 4096; cbid++) {
            const char *name = NULL;
            if (api.callback_name(domain, cbid, &name) == 0 && asks_only(name) &&
                !(pointer_cache_context_kept() && switches_context(name)) &&
                api.enable_callback(0, subscriber, domain, cbid) == 0)
                off++;
        }
    commlib_log(LOG_INFO, "CUPTI: the callbacks of %d query calls off", off);
}

static const char *result_text(cupti_result rc)
{
    const char *s = NULL;
    if (api.result_string) api.result_string(rc, &s);
    return s ? s : "unknown";
}

int cupti_watch(void (*on_call)(const char *function))
{
    pthread_mutex_lock(&lock);
    if (!asked) {
        asked = 1;
        __atomic_store_n(&listener, on_call, __ATOMIC_RELEASE);
        void *h = api.subscribe ? NULL : open_cupti();
        if (h) {
            *(void **)&api.subscribe = dlsym(h, "cuptiSubscribe");
            *(void **)&api.unsubscribe = dlsym(h, "cuptiUnsubscribe");
            *(void **)&api.enable_domain = dlsym(h, "cuptiEnableDomain");
            *(void **)&api.result_string = dlsym(h, "cuptiGetResultString");
            *(void **)&api.enable_callback = dlsym(h, "cuptiEnableCallback");
            *(void **)&api.callback_name = dlsym(h, "cuptiGetCallbackName");
            if (!api.subscribe || !api.unsubscribe || !api.enable_domain) {
                snprintf(failure, sizeof failure, "libcupti lacks cuptiSubscribe/cuptiEnableDomain");
                api.subscribe = NULL;
            }
        }
        cupti_result rc = 0;
        if (api.subscribe) {
            if ((rc = api.subscribe(&subscriber, on_api, NULL)) != 0)
                snprintf(failure, sizeof failure, "cuptiSubscribe: %s (%d; a profiler holds CUPTI?)", result_text(rc), rc);
            else if ((rc = api.enable_domain(1, subscriber, CUPTI_CB_DOMAIN_DRIVER_API)) != 0 ||
                     (rc = api.enable_domain(1, subscriber, CUPTI_CB_DOMAIN_RUNTIME_API)) != 0) {
                snprintf(failure, sizeof failure, "cuptiEnableDomain: %s (%d)", result_text(rc), rc);
                api.unsubscribe(subscriber);
            } else {
                watching = 1;
                quiet_queries();
                pointer_cache_start();
            }
        }
    }
    int w = watching;
    pthread_mutex_unlock(&lock);
    return w;
}

const char *cupti_failure(void) { return failure; }

void cupti_unwatch(void)
{
    pthread_mutex_lock(&lock);
    if (watching) api.unsubscribe(subscriber);
    if (watching) pointer_cache_stop();
    watching = 0;
    asked = 0;
    failure[0] = 0;
    pthread_mutex_unlock(&lock);
}
