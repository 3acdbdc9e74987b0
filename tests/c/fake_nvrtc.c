/* A stand-in for libnvrtc on machines without CUDA, so CI runs commlib's run-time
 * compile route (native/pack/nvrtc.c) end to end with tests/c/fake_cuda.c.
 *
 * It compiles nothing: a "compile" records what commlib asked for and returns an image
 * that fake_cuda.c accepts (FAKE_CUDA_KERNELS=1) and then runs on the CPU.  Environment:
 *   FAKE_NVRTC_RECORD=DIR   append one line per compile to DIR/compiles.txt (the options,
 *                           space-separated) and write the source to DIR/source.cu
 *   FAKE_NVRTC_FAIL=1       every compile fails, with a two-line log
 *   FAKE_NVRTC_ARCHS=75,90  the architectures it claims to know (default 75,80,86,89,90)
 *   FAKE_NVRTC_VERSION=M.m  its version (default 12.4)
 * Built with -shared -Wl,-soname,libnvrtc.so.12 and named by COMMLIB_NVRTC. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))
#define FAKE_IMAGE_MAGIC "FAKE-CUDA-IMAGE\n" /* fake_cuda.c's cuModuleLoadData checks it */

struct program {
    char *source;
    char *image; /* after a successful compile */
    char log[512];
};

EXPORT const char *nvrtcGetErrorString(int rc)
{
    return rc == 0 ? "NVRTC_SUCCESS" : rc == 6 ? "NVRTC_ERROR_COMPILATION" : "NVRTC_ERROR (fake)";
}

EXPORT int nvrtcVersion(int *major, int *minor)
{
    const char *v = getenv("FAKE_NVRTC_VERSION");
    *major = 12, *minor = 4;
    if (v) sscanf(v, "%d.%d", major, minor);
    return 0;
}

static int archs(int *out)
{
    const char *list = getenv("FAKE_NVRTC_ARCHS");
    char copy[256];
    snprintf(copy, sizeof copy, "%s", list ? list : "75,80,86,89,90");
    int n = 0;
    for (char *save = NULL, *t = strtok_r(copy, ",", &save); t && n < 64; t = strtok_r(NULL, ",", &save)) {
        if (out) out[n] = atoi(t);
        n++;
    }
    return n;
}
EXPORT int nvrtcGetNumSupportedArchs(int *n) { *n = archs(NULL); return 0; }
EXPORT int nvrtcGetSupportedArchs(int *out) { archs(out); return 0; }

EXPORT int nvrtcCreateProgram(struct program **p, const char *source, const char *name, int nheaders,
                              const char *const *headers, const char *const *include_names)
{
    (void)name, (void)headers, (void)include_names;
    if (nheaders != 0 || !source) return 3; /* commlib's source includes nothing */
    *p = calloc(1, sizeof **p);
    (*p)->source = strdup(source);
    return 0;
}

EXPORT int nvrtcDestroyProgram(struct program **p)
{
    free((*p)->source);
    free((*p)->image);
    free(*p);
    *p = NULL;
    return 0;
}

EXPORT int nvrtcCompileProgram(struct program *p, int n, const char *const *options)
{
    const char *dir = getenv("FAKE_NVRTC_RECORD");
    if (dir) {
        char path[4096];
        snprintf(path, sizeof path, "%s/compiles.txt", dir);
        FILE *f = fopen(path, "a");
        for (int i = 0; f && i < n; i++) fprintf(f, "%s%s", i ? " " : "", options[i]);
        if (f) fprintf(f, "\n"), fclose(f);
        snprintf(path, sizeof path, "%s/source.cu", dir);
        if ((f = fopen(path, "w"))) fputs(p->source, f), fclose(f);
    }
    if (getenv("FAKE_NVRTC_FAIL")) {
        snprintf(p->log, sizeof p->log, "device_kernels.cu(1): error: fake_nvrtc refuses to compile (FAKE_NVRTC_FAIL)\n"
                                        "1 error detected in the compilation of \"device_kernels.cu\".\n");
        return 6;
    }
    const char *target = "?";
    for (int i = 0; i < n; i++)
        if (!strncmp(options[i], "--gpu-architecture=", 19)) target = options[i] + 19;
    size_t len = strlen(FAKE_IMAGE_MAGIC) + strlen(target) + 2;
    p->image = malloc(len);
    snprintf(p->image, len, "%s%s\n", FAKE_IMAGE_MAGIC, target);
    return 0;
}

EXPORT int nvrtcGetProgramLogSize(struct program *p, size_t *n) { *n = strlen(p->log) + 1; return 0; }
EXPORT int nvrtcGetProgramLog(struct program *p, char *log) { strcpy(log, p->log); return 0; }

/* The image is the same text either way; the target inside tells which was asked for.
 * A cubin is only handed out for an sm_ target, PTX only for compute_, as NVRTC does. */
static int image_size(struct program *p, size_t *n, const char *kind)
{
    if (!p->image || !strstr(p->image, kind)) return 4;
    *n = strlen(p->image) + 1;
    return 0;
}
EXPORT int nvrtcGetCUBINSize(struct program *p, size_t *n) { return image_size(p, n, "\nsm_"); }
EXPORT int nvrtcGetCUBIN(struct program *p, char *out) { strcpy(out, p->image); return 0; }
EXPORT int nvrtcGetPTXSize(struct program *p, size_t *n) { return image_size(p, n, "\ncompute_"); }
EXPORT int nvrtcGetPTX(struct program *p, char *out) { strcpy(out, p->image); return 0; }
