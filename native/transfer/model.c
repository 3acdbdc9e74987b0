/* The method model (see model.h) and its file.
 *
 * The file, written by `commlib measure`, is plain text so that reading it in C stays
 * trivial: '#' lines are comments, the first other line is "commlib-model 1", then
 *     gpu NAME                 the device it was measured on (cuDeviceGetName)
 *     mpi TEXT                 first line of MPI_Get_library_version
 *     commlib VERSION          optional: the commlib that measured it
 *     measured WHEN            optional, not read
 *     DIRECTION METHOD LAYOUT BYTES MICROSECONDS
 * with DIRECTION send|recv, METHOD oneshot|device|aware, LAYOUT contig|derived.  Any
 * other line makes the whole file malformed: it is ignored with a warning, as is a
 * file for another GPU or MPI, and the built-in curves apply.  It is read once, at the
 * first device message (the GPU to check against is known then). */
#define _GNU_SOURCE
#include "model.h"

#include <ctype.h>
#include <dlfcn.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <mpi.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../util/config.h"
#include "../util/log.h"

#ifndef COMMLIB_VERSION
#define COMMLIB_VERSION "0.0.0"
#endif

const char *const transfer_method_name[METHOD_COUNT] = {"oneshot", "device", "aware"};
static const char *const layout_name[2] = {"contig", "derived"};
static const char *const direction_name[2] = {"send", "recv"};

#define CURVE_POINTS 32
struct curve {
    int n;
    int64_t bytes[CURVE_POINTS]; /* ascending */
    double us[CURVE_POINTS];
};

struct model {
    struct curve curve[2][METHOD_COUNT][2]; /* [receiving][method][derived] */
    int from_file;
    char path[1024];
    char note[512]; /* why the built-in curves, or what the file is */
    char gpu[256], mpi[256], commlib[64]; /* this process's GPU and MPI; the file's commlib */
};

/* A note for the report: cut short where a path is too long for it (no warning asked). */
__attribute__((format(printf, 2, 3))) static void set_note(struct model *m, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(m->note, sizeof m->note, fmt, ap);
    va_end(ap);
}

static struct model model, builtin_model;
static int model_loaded;
static pthread_mutex_t model_lock = PTHREAD_MUTEX_INITIALIZER;

/* ------------------------------------------------------------------ CUDA-awareness */

static int aware_state = -1; /* -1 not asked yet */
static char aware_how[128] = "not asked yet (MPI not initialised)";

void transfer_detect_cuda_aware(void)
{
    int state = 0;
    if (commlib_config.cuda_aware >= 0) {
        state = commlib_config.cuda_aware;
        snprintf(aware_how, sizeof aware_how, "COMMLIB_CUDA_AWARE=%d", state);
    } else {
        /* MPICH and Open MPI both may define it; other MPIs need not: look, never link */
        int (*query)(void) = (int (*)(void))dlsym(RTLD_DEFAULT, "MPIX_Query_cuda_support");
        if (query) {
            state = query() == 1;
            snprintf(aware_how, sizeof aware_how, "MPIX_Query_cuda_support() = %d", state);
        } else {
            snprintf(aware_how, sizeof aware_how, "the MPI has no MPIX_Query_cuda_support");
        }
    }
    __atomic_store_n(&aware_state, state, __ATOMIC_RELEASE);
}

int transfer_cuda_aware(void)
{
    int state = __atomic_load_n(&aware_state, __ATOMIC_ACQUIRE);
    if (state >= 0) return state;
    int initialised = 0; /* MPI_Init not intercepted (Python bindings): ask now */
    if (PMPI_Initialized(&initialised) != MPI_SUCCESS || !initialised)
        return commlib_config.cuda_aware == 1; /* the MPI cannot answer before MPI_Init */
    transfer_detect_cuda_aware();
    return aware_state;
}

/* ------------------------------------------------------------------ identities */

/* First line, whitespace runs as one space, trimmed: the form both the file and the
 * comparison use (MPICH's version text spans many lines and aligns with spaces). */
static void normalise(char *out, size_t len, const char *in)
{
    size_t n = 0;
    int space = 0;
    for (; *in && *in != '\n' && *in != '\r' && n + 1 < len; in++) {
        if (isspace((unsigned char)*in)) {
            space = n > 0;
            continue;
        }
        if (space && n + 2 < len) out[n++] = ' ';
        space = 0;
        out[n++] = *in;
    }
    out[n] = 0;
}

static void mpi_identity(char *out, size_t len)
{
    static char version[8192]; /* as large as any MPI_MAX_LIBRARY_VERSION_STRING; under model_lock */
    int n = 0;
    /* MPI-3 lets this be called before MPI_Init */
    if (PMPI_Get_library_version(version, &n) != MPI_SUCCESS) version[0] = 0;
    normalise(out, len, version);
}

static void gpu_identity(struct device_context *dc, char *out, size_t len)
{
    char name[256] = "";
    const struct cuda_driver *cu = cuda_driver();
    if (!dc || !cu || !cuda_check(cu->cuDeviceGetName(name, (int)sizeof name, dc->device), "cuDeviceGetName"))
        name[0] = 0;
    name[sizeof name - 1] = 0;
    normalise(out, len, name);
}

/* ------------------------------------------------------------------ built-in curves */

/* Rough figures for a PCIe-attached GPU: writing mapped host memory from a kernel is
 * cheap to start and slower in bulk, reading it (oneshot receive) slower still; a derived
 * message's device method costs a launch and a synchronised copy and runs at full speed.
 * A contiguous message's device method is that copy alone (no pack), which starts sooner
 * than a launch and its wait (H200 under MPS, tests/gpu/proxy_latency.cu: an 8-byte copy to
 * or from pinned memory and its synchronisation 5.5-6.9 us, a launch and its 9.9): the
 * copy at every size.  A CUDA-aware MPI takes a contiguous buffer without any staging,
 * cheaper still.  Only the order matters to the choice; measure to replace. */
static const struct builtin {
    int receiving, method, derived;
    double latency_us, bytes_per_us;
} builtin[] = {
    {0, METHOD_ONESHOT, 0, 10, 12000}, {0, METHOD_ONESHOT, 1, 10, 12000},
    {0, METHOD_DEVICE, 0, 9, 24000},   {0, METHOD_DEVICE, 1, 20, 24000},
    {0, METHOD_AWARE, 0, 8, 25000},    {0, METHOD_AWARE, 1, 18, 24000},
    {1, METHOD_ONESHOT, 0, 10, 8000},  {1, METHOD_ONESHOT, 1, 10, 8000},
    {1, METHOD_DEVICE, 0, 9, 24000},   {1, METHOD_DEVICE, 1, 20, 24000},
    {1, METHOD_AWARE, 0, 8, 25000},    {1, METHOD_AWARE, 1, 18, 24000},
};

static void builtin_curves(struct model *m)
{
    memset(m->curve, 0, sizeof m->curve);
    for (size_t i = 0; i < sizeof builtin / sizeof builtin[0]; i++) {
        const struct builtin *b = &builtin[i];
        struct curve *c = &m->curve[b->receiving][b->method][b->derived];
        int64_t sizes[2] = {1024, 64ll << 20};
        for (int k = 0; k < 2; k++) {
            c->bytes[k] = sizes[k];
            c->us[k] = b->latency_us + (double)sizes[k] / b->bytes_per_us;
        }
        c->n = 2;
    }
}

/* ------------------------------------------------------------------ the file */

static int default_path(char *out, size_t len)
{
    const char *cache = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
    char host[256] = "localhost";
    if (gethostname(host, sizeof host) != 0) strcpy(host, "localhost");
    host[sizeof host - 1] = 0;
    int n;
    if (cache && cache[0] == '/') n = snprintf(out, len, "%s/commlib/model-%s.txt", cache, host);
    else if (home && *home) n = snprintf(out, len, "%s/.cache/commlib/model-%s.txt", home, host);
    else return 0;
    return n > 0 && (size_t)n < len;
}

static int parse_number(const char *text, int64_t *i, double *d)
{
    char *end;
    errno = 0;
    if (i) *i = strtoll(text, &end, 10);
    else *d = strtod(text, &end);
    return end != text && !*end && errno == 0;
}

static int index_of(const char *const *names, int n, const char *word)
{
    for (int i = 0; i < n; i++)
        if (!strcmp(names[i], word)) return i;
    return -1;
}

/* One measurement line (tokens after the direction); "" or why it is wrong. */
static const char *add_point(struct model *m, int receiving, char *rest)
{
    char *save = NULL, *words[5];
    int n = 0;
    for (char *w = strtok_r(rest, " \t", &save); w; w = strtok_r(NULL, " \t", &save))
        if (n < 5) words[n++] = w;
        else return "too many fields";
    if (n != 4) return "expected DIRECTION METHOD LAYOUT BYTES MICROSECONDS";
    int method = index_of(transfer_method_name, METHOD_COUNT, words[0]), derived = index_of(layout_name, 2, words[1]);
    int64_t bytes;
    double us;
    if (method < 0) return "unknown method";
    if (derived < 0) return "unknown layout (contig, derived)";
    if (!parse_number(words[2], &bytes, NULL) || bytes < 1 || bytes > (1ll << 40)) return "bad byte count";
    if (!parse_number(words[3], NULL, &us) || !isfinite(us) || us <= 0 || us > 1e9) return "bad time";
    struct curve *c = &m->curve[receiving][method][derived];
    if (c->n == CURVE_POINTS) return "too many sizes for one curve";
    int at = c->n;
    while (at > 0 && c->bytes[at - 1] > bytes) at--; /* keep the sizes ascending */
    if (at > 0 && c->bytes[at - 1] == bytes) return "a size measured twice";
    memmove(&c->bytes[at + 1], &c->bytes[at], (size_t)(c->n - at) * sizeof c->bytes[0]);
    memmove(&c->us[at + 1], &c->us[at], (size_t)(c->n - at) * sizeof c->us[0]);
    c->bytes[at] = bytes;
    c->us[at] = us;
    c->n++;
    return "";
}

/* Fills m's curves (and file_gpu, file_mpi) from f; NULL on success, else why not. */
static const char *parse_file(FILE *f, struct model *m, char *file_gpu, char *file_mpi, size_t len, int *line_no)
{
    char line[1024];
    int header = 0, points = 0;
    memset(m->curve, 0, sizeof m->curve);
    file_gpu[0] = file_mpi[0] = m->commlib[0] = 0;
    for (*line_no = 1; fgets(line, sizeof line, f); ++*line_no) {
        size_t n = strlen(line);
        if (n == sizeof line - 1 && line[n - 1] != '\n') return "line too long";
        while (n && isspace((unsigned char)line[n - 1])) line[--n] = 0;
        if (!n || line[0] == '#') continue;
        if (!header) {
            if (strcmp(line, "commlib-model 1")) return "not a commlib model file (first line is not \"commlib-model 1\")";
            header = 1;
            continue;
        }
        char *rest = strchr(line, ' ');
        if (!rest) return "a key without a value";
        *rest++ = 0;
        int direction = index_of(direction_name, 2, line);
        if (direction >= 0) {
            const char *why = add_point(m, direction, rest);
            if (*why) return why;
            points++;
        } else if (!strcmp(line, "gpu")) {
            normalise(file_gpu, len, rest);
        } else if (!strcmp(line, "mpi")) {
            normalise(file_mpi, len, rest);
        } else if (!strcmp(line, "commlib")) {
            normalise(m->commlib, sizeof m->commlib, rest);
        } else if (strcmp(line, "measured")) {
            return "unknown key";
        }
    }
    *line_no = 0;
    if (ferror(f)) return "read error";
    if (!header) return "empty";
    if (!file_gpu[0] || !file_mpi[0]) return "no gpu or mpi line (what it was measured on)";
    if (!points) return "no measurements";
    return NULL;
}

/* Loads the file into m if it is usable here; else notes why (a warning when the file
 * exists, or was named explicitly) and keeps the built-in curves. */
static void load_file(struct model *m)
{
    const char *knob = commlib_config.model;
    if (knob && !strcmp(knob, "0")) {
        set_note(m, "COMMLIB_MODEL=0: no file read");
        return;
    }
    if (knob) snprintf(m->path, sizeof m->path, "%s", knob);
    else if (!default_path(m->path, sizeof m->path)) {
        set_note(m, "no cache directory (neither XDG_CACHE_HOME nor HOME set)");
        return;
    }
    FILE *f = fopen(m->path, "r");
    if (!f) {
        set_note(m, "no file %s (`commlib measure` writes one)", m->path);
        if (knob) commlib_log(LOG_WARN, "COMMLIB_MODEL=%s: %s; using the built-in method model", knob, strerror(errno));
        return;
    }
    struct model *file = calloc(1, sizeof *file);
    char file_gpu[256], file_mpi[256];
    int line_no = 0;
    const char *why = file ? parse_file(f, file, file_gpu, file_mpi, sizeof file_gpu, &line_no) : "out of memory";
    fclose(f);
    if (!why && m->gpu[0] && strcmp(file_gpu, m->gpu)) {
        set_note(m, "%s was measured on GPU \"%s\", this is \"%s\"", m->path, file_gpu, m->gpu);
    } else if (!why && strcmp(file_mpi, m->mpi)) {
        set_note(m, "%s was measured with MPI \"%s\", this is \"%s\"", m->path, file_mpi, m->mpi);
    } else if (why) {
        if (line_no) set_note(m, "%s is malformed (line %d: %s)", m->path, line_no, why);
        else set_note(m, "%s is malformed (%s)", m->path, why);
    } else {
        memcpy(m->curve, file->curve, sizeof m->curve);
        snprintf(m->commlib, sizeof m->commlib, "%s", file->commlib);
        m->from_file = 1;
        set_note(m, "%s (GPU %s)", m->path, m->gpu[0] ? m->gpu : "not checked: no GPU in use");
        commlib_log(LOG_INFO, "method model from %s", m->path);
        if (m->commlib[0] && strcmp(m->commlib, COMMLIB_VERSION))
            commlib_log(LOG_INFO, "%s was measured with commlib %s (this is %s)", m->path, m->commlib, COMMLIB_VERSION);
        free(file);
        return;
    }
    free(file);
    commlib_log(LOG_WARN, "method model ignored: %s; using the built-in defaults (rerun `commlib measure`)", m->note);
}

static const struct model *model_get(struct device_context *dc)
{
    if (__atomic_load_n(&model_loaded, __ATOMIC_ACQUIRE)) return &model;
    pthread_mutex_lock(&model_lock);
    if (!model_loaded) {
        builtin_curves(&builtin_model);
        builtin_curves(&model);
        gpu_identity(dc, model.gpu, sizeof model.gpu);
        mpi_identity(model.mpi, sizeof model.mpi);
        load_file(&model);
        __atomic_store_n(&model_loaded, 1, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&model_lock);
    return &model;
}

/* ------------------------------------------------------------------ the choice */

static double predict(const struct curve *c, int64_t bytes)
{
    if (bytes <= c->bytes[0]) return c->us[0]; /* below the smallest size: latency-bound */
    int i = 1;
    while (i < c->n && c->bytes[i] < bytes) i++;
    if (i == c->n) { /* beyond the largest: the slope of the last two, else proportional */
        if (c->n == 1) return c->us[0] * (double)bytes / (double)c->bytes[0];
        i = c->n - 1;
        double slope = (c->us[i] - c->us[i - 1]) / (double)(c->bytes[i] - c->bytes[i - 1]);
        return c->us[i] + (slope > 0 ? slope : 0) * (double)(bytes - c->bytes[i]);
    }
    double f = (double)(bytes - c->bytes[i - 1]) / (double)(c->bytes[i] - c->bytes[i - 1]);
    return c->us[i - 1] + f * (c->us[i] - c->us[i - 1]);
}

/* The fastest predicted method (a layout without a curve borrows the other's); -1 when
 * the curves hold no candidate. */
static int pick(const struct model *m, int receiving, int contiguous, int64_t bytes, int aware, double *us)
{
    int best = -1;
    for (int method = 0; method < METHOD_COUNT; method++) {
        if (method == METHOD_AWARE && !aware) continue;
        const struct curve *c = &m->curve[receiving][method][!contiguous];
        if (!c->n) c = &m->curve[receiving][method][contiguous];
        if (!c->n) continue;
        double t = predict(c, bytes);
        if (best < 0 || t < *us) best = method, *us = t;
    }
    return best;
}

static int choose(struct device_context *dc, int receiving, int contiguous, int64_t bytes, double *us)
{
    int aware = transfer_cuda_aware(), forced = commlib_config.method;
    *us = NAN;
    if (forced == METHOD_AWARE && !aware) {
        static int warned;
        if (!__atomic_exchange_n(&warned, 1, __ATOMIC_RELAXED))
            commlib_log(LOG_WARN, "COMMLIB_METHOD=aware but the MPI is not CUDA-aware (%s); the model chooses instead",
                        aware_how);
        forced = -1;
    }
    if (forced >= 0) return forced;
    int method = pick(model_get(dc), receiving, contiguous, bytes, aware, us);
    /* a file without any curve for this direction: the built-in ones */
    return method >= 0 ? method : pick(&builtin_model, receiving, contiguous, bytes, aware, us);
}

enum transfer_method transfer_method_choose(struct device_context *dc, int receiving, int contiguous, int64_t bytes)
{
    double us;
    return (enum transfer_method)choose(dc, receiving, contiguous, bytes, &us);
}

void transfer_model_line(struct device_context *dc, int receiving, int contiguous, int method, double *latency_us,
                         double *bytes_per_us)
{
    const struct model *m = model_get(dc);
    const struct curve *c = &m->curve[receiving][method][!contiguous];
    if (!c->n) c = &m->curve[receiving][method][contiguous];
    if (!c->n) c = &builtin_model.curve[receiving][method][!contiguous];
    const int64_t lo = (int64_t)1 << 20, hi = (int64_t)64 << 20;
    double t_lo = predict(c, lo), t_hi = predict(c, hi);
    double slope = t_hi > t_lo ? (t_hi - t_lo) / (double)(hi - lo) : 1.0 / 24000; /* us per byte */
    double latency = t_lo - slope * (double)lo;
    *bytes_per_us = 1.0 / slope;
    *latency_us = latency > 1 ? latency : 1; /* a launch and a wait cost at least this */
}

/* ------------------------------------------------------------------ description */

#define APPEND(...) \
    (used += (size_t)snprintf(buf + (used < len ? used : len), used < len ? len - used : 0, __VA_ARGS__))

/* A JSON string: quotes and backslashes escaped, control characters dropped. */
static size_t json_string(char *buf, size_t len, size_t used, const char *s)
{
    APPEND("\"");
    for (; *s; s++)
        if (*s == '"' || *s == '\\') APPEND("\\%c", *s);
        else if ((unsigned char)*s >= 0x20) APPEND("%c", *s);
    APPEND("\"");
    return used;
}

size_t transfer_model_json(char *buf, size_t len)
{
    commlib_config_init();
    struct device_context *dc = cuda_driver() ? device_context_current() : NULL;
    int aware = transfer_cuda_aware();
    const struct model *m = model_get(dc);
    size_t used = 0;
    APPEND("{\"cuda_aware\":%d,\"cuda_aware_how\":", aware);
    used = json_string(buf, len, used, aware_how);
    APPEND(",\"method\":\"%s\",\"model\":\"%s\",\"path\":", commlib_config.method < 0 ? "auto" :
           transfer_method_name[commlib_config.method], m->from_file ? "file" : "built-in");
    used = json_string(buf, len, used, m->path);
    APPEND(",\"note\":");
    used = json_string(buf, len, used, m->note);
    APPEND(",\"gpu\":");
    used = json_string(buf, len, used, m->gpu);
    APPEND(",\"mpi\":");
    used = json_string(buf, len, used, m->mpi);
    APPEND(",\"commlib\":\"%s\",\"choices\":[", COMMLIB_VERSION);
    static const int64_t sizes[] = {1024, 64 << 10, 1 << 20, 64 << 20};
    int first = 1;
    for (int receiving = 0; receiving < 2; receiving++)
        for (int derived = 0; derived < 2; derived++)
            for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
                double us;
                int method = choose(dc, receiving, !derived, sizes[i], &us);
                APPEND("%s{\"direction\":\"%s\",\"layout\":\"%s\",\"bytes\":%lld,\"method\":\"%s\",\"us\":%.3f}",
                       first ? "" : ",", direction_name[receiving], layout_name[derived], (long long)sizes[i],
                       transfer_method_name[method], isnan(us) ? -1.0 : us);
                first = 0;
            }
    APPEND("]}");
    return used;
}

void transfer_model_print(FILE *out, int rank)
{
    if (__atomic_load_n(&model_loaded, __ATOMIC_ACQUIRE))
        fprintf(out, "commlib[rank %d]: method model %s: %s | cuda-aware=%d (%s)\n", rank,
                model.from_file ? "from file" : "built-in", model.note, transfer_cuda_aware(), aware_how);
    else if (commlib_config.method >= 0) /* forced: the model was never consulted */
        fprintf(out, "commlib[rank %d]: method forced: COMMLIB_METHOD=%s | cuda-aware=%d (%s)\n", rank,
                transfer_method_name[commlib_config.method], transfer_cuda_aware(), aware_how);
}
