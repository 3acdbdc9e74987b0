#define _GNU_SOURCE
#include "nvrtc.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../util/config.h"
#include "../util/log.h"

/* site-packages folders of the Python that built the library (setup.py): where the
 * nvidia-cuda-nvrtc wheels (pulled in by torch and cupy) put libnvrtc. */
#ifndef COMMLIB_SITE_DIRS
#define COMMLIB_SITE_DIRS ""
#endif

/* The few NVRTC types and entry points used, declared here as driver.h does for CUDA. */
typedef int nvrtcResult;
typedef struct nvrtc_program *nvrtcProgram;
#define NVRTC_SUCCESS 0

static struct {
    nvrtcResult (*nvrtcVersion)(int *major, int *minor);
    const char *(*nvrtcGetErrorString)(nvrtcResult result);
    nvrtcResult (*nvrtcCreateProgram)(nvrtcProgram *program, const char *source, const char *name, int nheaders,
                                      const char *const *headers, const char *const *include_names);
    nvrtcResult (*nvrtcDestroyProgram)(nvrtcProgram *program);
    nvrtcResult (*nvrtcCompileProgram)(nvrtcProgram program, int noptions, const char *const *options);
    nvrtcResult (*nvrtcGetProgramLogSize)(nvrtcProgram program, size_t *bytes);
    nvrtcResult (*nvrtcGetProgramLog)(nvrtcProgram program, char *log);
    nvrtcResult (*nvrtcGetPTXSize)(nvrtcProgram program, size_t *bytes);
    nvrtcResult (*nvrtcGetPTX)(nvrtcProgram program, char *ptx);
    /* Optional: 11.1 and later produce machine code, 11.2 and later list their archs. */
    nvrtcResult (*nvrtcGetCUBINSize)(nvrtcProgram program, size_t *bytes);
    nvrtcResult (*nvrtcGetCUBIN)(nvrtcProgram program, char *cubin);
    nvrtcResult (*nvrtcGetNumSupportedArchs)(int *count);
    nvrtcResult (*nvrtcGetSupportedArchs)(int *archs);
} api;

#define REQUIRED(X)                                                                                            \
    X(nvrtcVersion) X(nvrtcGetErrorString) X(nvrtcCreateProgram) X(nvrtcDestroyProgram) X(nvrtcCompileProgram) \
    X(nvrtcGetProgramLogSize) X(nvrtcGetProgramLog) X(nvrtcGetPTXSize) X(nvrtcGetPTX)
#define OPTIONAL(X) X(nvrtcGetCUBINSize) X(nvrtcGetCUBIN) X(nvrtcGetNumSupportedArchs) X(nvrtcGetSupportedArchs)

static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static int loaded;
static char library_path[4096];
static int version_major, version_minor;

/* Newest first: the newer the NVRTC, the more GPUs it compiles for.  But the driver
 * must be at least as new as the compiler's major version to load what it makes, so the
 * soname of the driver's own major version goes first (order_sonames). */
static const char *sonames[] = {"libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so.11.2", "libnvrtc.so"};
#define N_SONAMES (sizeof sonames / sizeof sonames[0])
static int driver_major; /* 0: unknown (`commlib info` without CUDA loaded) */

static void order_sonames(void)
{
    char wanted[32];
    snprintf(wanted, sizeof wanted, "libnvrtc.so.%d", driver_major);
    for (size_t i = 1; i < N_SONAMES; i++)
        if (!strncmp(sonames[i], wanted, strlen(wanted)) && (!sonames[i][strlen(wanted)] || sonames[i][strlen(wanted)] == '.')) {
            const char *s = sonames[i];
            memmove(&sonames[1], &sonames[0], i * sizeof *sonames);
            sonames[0] = s;
        }
}

static int try_open(const char *name, int quiet)
{
    void *h = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        if (quiet) commlib_log(LOG_DEBUG, "NVRTC search: %s", dlerror());
        else commlib_log(LOG_WARN, "COMMLIB_NVRTC=%s does not load (%s); searching the usual places", name, dlerror());
        return 0;
    }
#define RESOLVE(sym) *(void **)&api.sym = dlsym(h, #sym);
    REQUIRED(RESOLVE) OPTIONAL(RESOLVE)
#undef RESOLVE
#define CHECK(sym)                                                                              \
    if (!api.sym) {                                                                             \
        commlib_log(LOG_WARN, "%s lacks %s: not an NVRTC commlib can use", name, #sym);         \
        dlclose(h);                                                                             \
        memset(&api, 0, sizeof api);                                                            \
        return 0;                                                                               \
    }
    REQUIRED(CHECK)
#undef CHECK
    Dl_info where;
    const char *path = dladdr(*(void **)&api.nvrtcVersion, &where) && where.dli_fname ? where.dli_fname : name;
    snprintf(library_path, sizeof library_path, "%s", path);
    if (api.nvrtcVersion(&version_major, &version_minor) != NVRTC_SUCCESS) version_major = version_minor = 0;
    return 1;
}

/* Each soname in dir, newest first. */
static int try_dir(const char *dir)
{
    if (!dir || !*dir) return 0;
    for (size_t i = 0; i < N_SONAMES; i++) {
        char path[4096];
        int n = snprintf(path, sizeof path, "%s/%s", dir, sonames[i]);
        if (n > 0 && (size_t)n < sizeof path && access(path, R_OK) == 0 && try_open(path, 1)) return 1;
    }
    return 0;
}

static int by_name(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* Every folder matching a glob pattern, last (newest version) first. */
static int try_glob(const char *pattern)
{
    glob_t g;
    int found = 0;
    if (glob(pattern, GLOB_ONLYDIR | GLOB_NOSORT, NULL, &g) != 0) return 0;
    qsort(g.gl_pathv, g.gl_pathc, sizeof *g.gl_pathv, by_name); /* cuda-12.4 < cuda-13.0 */
    for (size_t i = g.gl_pathc; i-- > 0 && !found;) found = try_dir(g.gl_pathv[i]);
    globfree(&g);
    return found;
}

/* The wheels' folders under one site-packages: nvidia-cuda-nvrtc 13 puts the library in
 * nvidia/cu13/lib, the -cu12 and -cu11 wheels in nvidia/cuda_nvrtc/lib. */
static int try_site(const char *site)
{
    static const char *const under[] = {"nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib"};
    for (size_t i = 0; i < sizeof under / sizeof *under; i++) {
        char dir[4096];
        int n = snprintf(dir, sizeof dir, "%s/%s", site, under[i]);
        if (n > 0 && (size_t)n < sizeof dir && try_dir(dir)) return 1;
    }
    return 0;
}

static int try_prefix(const char *prefix)
{
    if (!prefix || !*prefix) return 0;
    char pattern[4096];
    snprintf(pattern, sizeof pattern, "%s/lib", prefix); /* conda keeps libnvrtc there */
    if (try_dir(pattern)) return 1;
    snprintf(pattern, sizeof pattern, "%s/lib/python3*/site-packages", prefix);
    glob_t g;
    int found = 0;
    if (glob(pattern, GLOB_ONLYDIR, NULL, &g) == 0) {
        for (size_t i = 0; i < g.gl_pathc && !found; i++) found = try_site(g.gl_pathv[i]);
        globfree(&g);
    }
    return found;
}

static void find_nvrtc(void)
{
    order_sonames();
    /* 1. the knob */
    if (commlib_config.nvrtc && try_open(commlib_config.nvrtc, 0)) goto found;
    /* 2. the sonames: a copy the process already loaded (torch, cupy), LD_LIBRARY_PATH,
     * the linker cache */
    for (size_t i = 0; i < N_SONAMES; i++)
        if (try_open(sonames[i], 1)) goto found;
    /* 3. the CUDA toolkit's usual places */
    const char *homes[] = {getenv("CUDA_HOME"), getenv("CUDA_PATH"), "/usr/local/cuda"};
    for (size_t i = 0; i < sizeof homes / sizeof homes[0]; i++)
        if (homes[i] && *homes[i]) {
            char dir[4096];
            snprintf(dir, sizeof dir, "%s/lib64", homes[i]);
            if (try_dir(dir)) goto found;
        }
    if (try_glob("/usr/local/cuda-*/lib64")) goto found;
    /* 4. the pip wheels: beside this library (installed from a wheel it sits in
     * site-packages/commlib/), in the active environments, in the building Python's */
    Dl_info self;
    if (dladdr((void *)find_nvrtc, &self) && self.dli_fname) {
        char site[4096];
        snprintf(site, sizeof site, "%s", self.dli_fname);
        for (int up = 0; up < 2; up++) {
            char *slash = strrchr(site, '/');
            if (!slash) break;
            *slash = 0;
        }
        if (*site && try_site(site)) goto found;
    }
    if (try_prefix(getenv("VIRTUAL_ENV")) || try_prefix(getenv("CONDA_PREFIX"))) goto found;
    char sites[] = COMMLIB_SITE_DIRS;
    for (char *save = NULL, *dir = strtok_r(sites, ":", &save); dir; dir = strtok_r(NULL, ":", &save))
        if (try_site(dir)) goto found;
    commlib_log(LOG_INFO, "no NVRTC found (set COMMLIB_NVRTC=/path/to/libnvrtc.so)");
    return;
found:
    loaded = 1;
    commlib_log(LOG_INFO, "NVRTC %d.%d found: %s", version_major, version_minor, library_path);
}

static int nvrtc_load(void)
{
    pthread_once(&load_once, find_nvrtc);
    return loaded;
}

void nvrtc_prefer_driver(int cuda_version) { __atomic_store_n(&driver_major, cuda_version / 1000, __ATOMIC_RELAXED); }

/* FNV-1a, 64-bit: a cache key, not a defence (the cache directory is the user's own). */
static uint64_t fnv1a(uint64_t h, const void *data, size_t n)
{
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * UINT64_C(0x100000001b3);
    return h;
}
#define FNV_START UINT64_C(0xcbf29ce484222325)

/* $XDG_CACHE_HOME/commlib, else ~/.cache/commlib; "" when neither can be named. */
static void cache_dir(char *out, size_t len)
{
    const char *xdg = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
    if (xdg && xdg[0] == '/') snprintf(out, len, "%s/commlib", xdg);
    else if (home && *home) snprintf(out, len, "%s/.cache/commlib", home);
    else out[0] = 0;
}

int nvrtc_plan_for(int cc, struct nvrtc_plan *plan)
{
    memset(plan, 0, sizeof *plan);
    if (!nvrtc_load()) {
        commlib_log(LOG_WARN, "no NVRTC to compile the device pack kernels for sm_%d (install the nvidia-cuda-nvrtc "
                              "wheel or a CUDA toolkit, or set COMMLIB_NVRTC=/path/to/libnvrtc.so)", cc);
        return 0;
    }
    if (driver_major && version_major > driver_major)
        commlib_log(LOG_WARN, "NVRTC %d.%d (%s) is newer than the CUDA %d driver: what it compiles may not load "
                              "(COMMLIB_NVRTC can name an NVRTC %d)", version_major, version_minor, library_path,
                    driver_major, driver_major);
    snprintf(plan->library, sizeof plan->library, "%s", library_path);
    plan->major = version_major;
    plan->minor = version_minor;
    /* Machine code when this NVRTC knows the device exactly; else PTX for the newest
     * architecture it knows that the device can run (the driver compiles it on load). */
    int exact = 1, best = cc;
    int count = 0;
    if (api.nvrtcGetNumSupportedArchs && api.nvrtcGetSupportedArchs &&
        api.nvrtcGetNumSupportedArchs(&count) == NVRTC_SUCCESS && count > 0 && count < 1024) {
        int archs[1024];
        exact = 0;
        best = 0;
        if (api.nvrtcGetSupportedArchs(archs) == NVRTC_SUCCESS)
            for (int i = 0; i < count; i++) {
                if (archs[i] == cc) exact = 1;
                if (archs[i] <= cc && archs[i] > best) best = archs[i];
            }
    }
    if (!exact && !best) {
        commlib_log(LOG_WARN, "NVRTC %d.%d (%s) compiles for no architecture that sm_%d runs", version_major,
                    version_minor, library_path, cc);
        return 0;
    }
    plan->cubin = exact && api.nvrtcGetCUBIN && api.nvrtcGetCUBINSize;
    snprintf(plan->target, sizeof plan->target, "%s_%d", plan->cubin ? "sm" : "compute", plan->cubin ? cc : best);
    /* nvcc's -O3 is the host compiler's level; device code is optimised by default in
     * both, and ptxas (run by NVRTC for machine code) at -O3 unless told otherwise. */
    snprintf(plan->options[plan->noptions++], sizeof plan->options[0], "--gpu-architecture=%s", plan->target);
    snprintf(plan->options[plan->noptions++], sizeof plan->options[0], "--std=c++17");
    if (plan->cubin) snprintf(plan->options[plan->noptions++], sizeof plan->options[0], "--ptxas-options=-O3");

    char dir[3900];
    cache_dir(dir, sizeof dir);
    if (*dir) {
        uint64_t h = fnv1a(FNV_START, commlib_device_kernels_source, commlib_device_kernels_source_size);
        for (int i = 0; i < plan->noptions; i++) h = fnv1a(h, plan->options[i], strlen(plan->options[i]) + 1);
        int version[2] = {version_major, version_minor};
        h = fnv1a(h, version, sizeof version);
        snprintf(plan->cache_path, sizeof plan->cache_path, "%s/kernels-%016llx-%s.%s", dir, (unsigned long long)h,
                 plan->target, plan->cubin ? "cubin" : "ptx");
    }
    return 1;
}

/* A cache entry: this header, then the image.  The length and hash catch a truncated or
 * damaged file (a crash mid-write cannot leave one: entries are renamed into place). */
#define CACHE_MAGIC "commlib-kernels1"
struct cache_header {
    char magic[16];
    uint64_t bytes;
    uint64_t hash;
};

void *nvrtc_cache_read(const struct nvrtc_plan *plan, size_t *bytes)
{
    if (!plan->cache_path[0]) return NULL;
    FILE *f = fopen(plan->cache_path, "rb");
    if (!f) return NULL;
    struct cache_header h;
    void *image = NULL;
    struct stat st;
    if (fstat(fileno(f), &st) == 0 && fread(&h, sizeof h, 1, f) == 1 && !memcmp(h.magic, CACHE_MAGIC, 16) &&
        h.bytes > 0 && (uint64_t)st.st_size == sizeof h + h.bytes && (image = malloc(h.bytes + 1))) {
        if (fread(image, 1, h.bytes, f) != h.bytes || fnv1a(FNV_START, image, h.bytes) != h.hash) {
            free(image);
            image = NULL;
        } else {
            ((char *)image)[h.bytes] = 0;
            *bytes = h.bytes;
        }
    }
    fclose(f);
    if (!image) commlib_log(LOG_INFO, "ignoring the damaged kernel cache entry %s", plan->cache_path);
    return image;
}

static int make_dirs(char *path)
{
    for (char *p = path + 1; *p; p++)
        if (*p == '/') {
            *p = 0;
            int ok = mkdir(path, 0755) == 0 || errno == EEXIST;
            *p = '/';
            if (!ok) return 0;
        }
    return mkdir(path, 0755) == 0 || errno == EEXIST;
}

void nvrtc_cache_write(const struct nvrtc_plan *plan, const void *image, size_t bytes)
{
    if (!plan->cache_path[0]) return;
    char dir[4096], tmp[4200];
    snprintf(dir, sizeof dir, "%s", plan->cache_path);
    *strrchr(dir, '/') = 0;
    /* a private name, renamed into place: ranks compiling at once never see half a file */
    snprintf(tmp, sizeof tmp, "%s.%ld.tmp", plan->cache_path, (long)getpid());
    struct cache_header h;
    memcpy(h.magic, CACHE_MAGIC, 16);
    h.bytes = bytes;
    h.hash = fnv1a(FNV_START, image, bytes);
    FILE *f = make_dirs(dir) ? fopen(tmp, "wb") : NULL;
    int ok = f && fwrite(&h, sizeof h, 1, f) == 1 && fwrite(image, 1, bytes, f) == bytes;
    if (f && fclose(f) != 0) ok = 0;
    if (ok && rename(tmp, plan->cache_path) == 0) {
        commlib_log(LOG_INFO, "device pack kernels cached in %s", plan->cache_path);
        return;
    }
    commlib_log(LOG_INFO, "could not cache the device pack kernels in %s (%s): the next process compiles again",
                plan->cache_path, strerror(errno));
    if (f) unlink(tmp);
}

/* NVRTC's log, whole, at warn level (one line per log line: commlib_log cuts at 1 KiB). */
static void log_compile_failure(const struct nvrtc_plan *plan, nvrtcProgram program, nvrtcResult rc)
{
    commlib_log(LOG_WARN, "NVRTC %d.%d (%s) failed to compile the device pack kernels for %s: %s", plan->major,
                plan->minor, plan->library, plan->target, api.nvrtcGetErrorString(rc));
    size_t n = 0;
    char *log = NULL;
    if (program && api.nvrtcGetProgramLogSize(program, &n) == NVRTC_SUCCESS && n > 1 && (log = malloc(n + 1)) &&
        api.nvrtcGetProgramLog(program, log) == NVRTC_SUCCESS) {
        log[n] = 0;
        for (char *save = NULL, *line = strtok_r(log, "\n", &save); line; line = strtok_r(NULL, "\n", &save))
            commlib_log(LOG_WARN, "nvrtc: %s", line);
    }
    free(log);
}

static void *compile_now(const struct nvrtc_plan *plan, size_t *bytes)
{
    nvrtcProgram program = NULL;
    const char *options[4];
    for (int i = 0; i < plan->noptions; i++) options[i] = plan->options[i];
    nvrtcResult rc = api.nvrtcCreateProgram(&program, commlib_device_kernels_source, "device_kernels.cu", 0, NULL, NULL);
    if (rc == NVRTC_SUCCESS) rc = api.nvrtcCompileProgram(program, plan->noptions, options);
    if (rc != NVRTC_SUCCESS) {
        log_compile_failure(plan, program, rc);
        if (program) api.nvrtcDestroyProgram(&program);
        return NULL;
    }
    size_t n = 0;
    char *image = NULL;
    rc = plan->cubin ? api.nvrtcGetCUBINSize(program, &n) : api.nvrtcGetPTXSize(program, &n);
    if (rc == NVRTC_SUCCESS && n > 0 && (image = malloc(n + 1))) {
        rc = plan->cubin ? api.nvrtcGetCUBIN(program, image) : api.nvrtcGetPTX(program, image);
        image[n] = 0; /* PTX is text: cuModuleLoadData wants it terminated */
    }
    if (rc != NVRTC_SUCCESS || !image || !n) {
        commlib_log(LOG_WARN, "NVRTC compiled the device pack kernels but gave no %s: %s",
                    plan->cubin ? "cubin" : "PTX", api.nvrtcGetErrorString(rc));
        free(image);
        image = NULL;
    } else {
        *bytes = n;
    }
    api.nvrtcDestroyProgram(&program);
    return image;
}

struct compile_job {
    const struct nvrtc_plan *plan;
    size_t bytes;
    void *image;
};

static void *compile_job_run(void *arg)
{
    struct compile_job *job = arg;
    job->image = compile_now(job->plan, &job->bytes);
    return NULL;
}

/* NVRTC's front end recurses deeply, and the first device pack may come from any thread
 * (the progress thread, a program's own small-stack threads): compile on a thread of
 * ours with a generous stack (address space only; pages are touched as used). */
#define COMPILE_STACK_BYTES ((size_t)256 << 20)

void *nvrtc_compile(const struct nvrtc_plan *plan, size_t *bytes)
{
    struct compile_job job = {plan, 0, NULL};
    pthread_attr_t attr;
    pthread_t thread;
    int threaded = pthread_attr_init(&attr) == 0;
    if (threaded) {
        threaded = pthread_attr_setstacksize(&attr, COMPILE_STACK_BYTES) == 0 &&
                   pthread_create(&thread, &attr, compile_job_run, &job) == 0;
        pthread_attr_destroy(&attr);
    }
    if (threaded) pthread_join(thread, NULL);
    else compile_job_run(&job);
    if (job.image) *bytes = job.bytes;
    return job.image;
}

/* Paths into JSON: quotes and backslashes escaped, control characters dropped. */
static void json_string(char *out, size_t len, const char *s)
{
    size_t at = 0;
    for (; *s && at + 3 < len; s++) {
        if ((unsigned char)*s < 0x20) continue;
        if (*s == '"' || *s == '\\') out[at++] = '\\';
        out[at++] = *s;
    }
    out[at] = 0;
}

size_t nvrtc_info_json(char *buf, size_t len)
{
    char dir[4096], dir_json[8192], library_json[8192];
    cache_dir(dir, sizeof dir);
    int found = nvrtc_load();
    json_string(dir_json, sizeof dir_json, dir);
    json_string(library_json, sizeof library_json, library_path);
    return (size_t)snprintf(buf, len, "{\"nvrtc\":%s%s%s,\"nvrtc_version\":\"%d.%d\",\"cache_dir\":\"%s\"}",
                            found ? "\"" : "", found ? library_json : "null", found ? "\"" : "", version_major,
                            version_minor, dir_json);
}
