/* What this build targets, and the guard against being preloaded into a program of
 * another MPI family: handles and constants differ between families, so forwarding a
 * call would hand garbage to the program's MPI.  The guard runs before main(), says so
 * in one line, and re-executes the program without commlib in LD_PRELOAD. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "commlib.h"

#ifndef COMMLIB_VERSION
#define COMMLIB_VERSION "0.0.0"
#endif

#if defined(OPEN_MPI)
#define BUILT_FAMILY "Open MPI"
#define BUILT_IMPL_VERSION OMPI_MAJOR_VERSION, OMPI_MINOR_VERSION, OMPI_RELEASE_VERSION
#define BUILT_IMPL_FORMAT "%d.%d.%d"
#elif defined(MPI_ABI_VERSION)
#define BUILT_FAMILY "MPI standard ABI"
#define BUILT_IMPL_VERSION MPI_ABI_VERSION, MPI_ABI_SUBVERSION
#define BUILT_IMPL_FORMAT "%d.%d"
#elif defined(MPICH_VERSION)
#define BUILT_FAMILY "MPICH"
#define BUILT_IMPL_VERSION MPICH_VERSION
#define BUILT_IMPL_FORMAT "%s"
#else
#define BUILT_FAMILY "unknown"
#define BUILT_IMPL_VERSION "?"
#define BUILT_IMPL_FORMAT "%s"
#endif

#ifdef COMMLIB_HAVE_CUDA_HEADERS
#define CUDA_AT_BUILD "true"
#else
#define CUDA_AT_BUILD "false"
#endif

const char *commlib_build_info(void)
{
    static char info[512];
    if (!info[0]) {
        char impl[64];
        snprintf(impl, sizeof impl, BUILT_IMPL_FORMAT, BUILT_IMPL_VERSION);
        snprintf(info, sizeof info,
                 "{\"version\":\"%s\",\"mpi_family\":\"%s\",\"mpi_impl_version\":\"%s\","
                 "\"mpi_standard\":\"%d.%d\",\"handle_bytes\":%zu,\"aint_bytes\":%zu}",
                 COMMLIB_VERSION, BUILT_FAMILY, impl, MPI_VERSION, MPI_SUBVERSION, sizeof(MPI_Datatype),
                 sizeof(MPI_Aint));
    }
    return info;
}

/* The family of the MPI library that a program's PMPI_* calls land in. */
static const char *running_family(const char **library)
{
    int (*get_version)(char *, int *) = (int (*)(char *, int *))dlsym(RTLD_DEFAULT, "PMPI_Get_library_version");
    *library = "?";
    if (!get_version) return NULL;
    Dl_info where;
    if (dladdr((void *)get_version, &where) && where.dli_fname) *library = where.dli_fname;
    if (strstr(*library, "libmpi_abi")) return "MPI standard ABI";
    static char version[8192]; /* larger than any MPI_MAX_LIBRARY_VERSION_STRING */
    int len = 0;
    if (get_version(version, &len) != 0) return NULL;
    if (strstr(version, "Open MPI")) return "Open MPI";
    if (strstr(version, "MPICH") || strstr(version, "Intel(R) MPI") || strstr(version, "MVAPICH")) return "MPICH";
    return NULL;
}

/* Removes every LD_PRELOAD entry naming this library. */
static void drop_self_from_preload(const char *self)
{
    const char *old = getenv("LD_PRELOAD");
    if (!old) return;
    size_t n = strlen(old);
    char *kept = calloc(1, n + 1), *copy = strdup(old);
    if (!kept || !copy) return;
    const char *base = strrchr(self, '/') ? strrchr(self, '/') + 1 : self;
    for (char *save = NULL, *tok = strtok_r(copy, " :", &save); tok; tok = strtok_r(NULL, " :", &save)) {
        const char *tok_base = strrchr(tok, '/') ? strrchr(tok, '/') + 1 : tok;
        if (!strcmp(tok, self) || !strcmp(tok_base, base)) continue;
        if (*kept) strcat(kept, ":");
        strcat(kept, tok);
    }
    setenv("LD_PRELOAD", kept, 1);
    free(kept);
    free(copy);
}

__attribute__((constructor)) static void check_mpi_family(int argc, char **argv, char **envp)
{
    (void)argc;
    (void)envp;
    const char *library;
    const char *family = running_family(&library);
    if (!family || !strcmp(family, BUILT_FAMILY) || !strcmp(BUILT_FAMILY, "unknown")) return;
    Dl_info self;
    const char *self_path = dladdr((void *)check_mpi_family, &self) && self.dli_fname ? self.dli_fname : "libcommlib.so";
    fprintf(stderr,
            "commlib: this program uses %s (%s) but %s was built for " BUILT_FAMILY
            "; running it without commlib (rebuild commlib with COMMLIB_MPICC=<that MPI's mpicc>)\n",
            family, library, self_path);
    if (getenv("COMMLIB_REEXECUTED")) _exit(127); /* never loop */
    drop_self_from_preload(self_path);
    setenv("COMMLIB_REEXECUTED", "1", 1);
    if (argv) execv("/proc/self/exe", argv);
    fprintf(stderr, "commlib: could not re-execute the program; stopping it instead\n");
    _exit(127);
}
