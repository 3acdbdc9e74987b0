/* dlopen of a bare name from a library whose RUNPATH ($ORIGIN) names the folder, under
 * the preloaded commlib (whose own dlopen watches for libcuda): the name must still be
 * found along the calling library's path, as libc finds it.  NVRTC from the pip wheels
 * loads libnvrtc-builtins this way, and so do torch's and cupy's libraries.
 *
 * Built three ways by tests/test_kernels_nvrtc.py:
 *   -DINNER -shared -o DIR/libcommlib_test_inner.so
 *   -DOUTER -shared -Wl,-rpath,'$ORIGIN' -Wl,--enable-new-dtags -o DIR/libcommlib_test_outer.so
 *   (plain) a program: dlopen_runpath DIR/libcommlib_test_outer.so
 * The program prints "inner=42" when the outer library found and called the inner one. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>

#if defined(INNER)
__attribute__((visibility("default"))) int commlib_test_inner(void) { return 42; }
#elif defined(OUTER)
__attribute__((visibility("default"))) int commlib_test_outer(void)
{
    void *h = dlopen("libcommlib_test_inner.so", RTLD_NOW | RTLD_LOCAL); /* bare name: RUNPATH */
    if (!h) {
        fprintf(stderr, "outer: %s\n", dlerror());
        return -1;
    }
    int (*inner)(void) = (int (*)(void))dlsym(h, "commlib_test_inner");
    return inner ? inner() : -2;
}
#else
int main(int argc, char **argv)
{
    if (argc < 2) return 2;
    void *h = dlopen(argv[1], RTLD_NOW);
    if (!h) {
        fprintf(stderr, "main: %s\n", dlerror());
        return 1;
    }
    int (*outer)(void) = (int (*)(void))dlsym(h, "commlib_test_outer");
    int v = outer ? outer() : -3;
    printf("inner=%d\n", v);
    return v == 42 ? 0 : 1;
}
#endif
