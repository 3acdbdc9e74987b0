/* Pretends to be a program of another MPI family: its own PMPI_Get_library_version
 * (exported with -rdynamic) is the one the dynamic linker finds first.  The preloaded
 * commlib must notice, say so, and run the program once, without itself. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int PMPI_Get_library_version(char *version, int *len)
{
    const char *s = getenv("FAKE_MPI_VERSION") ? getenv("FAKE_MPI_VERSION") : "Open MPI v4.1.6, package: Debian";
    strcpy(version, s);
    *len = (int)strlen(s);
    return 0;
}

int main(void)
{
    const char *preload = getenv("LD_PRELOAD");
    printf("ran: LD_PRELOAD=[%s]\n", preload ? preload : "");
    return 0;
}
