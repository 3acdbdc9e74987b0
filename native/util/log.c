#include "log.h"

#include <stdarg.h>
#include <stdio.h>

#include "config.h"

void commlib_log(int level, const char *fmt, ...)
{
    if (level > commlib_config.log_level) return;
    static const char *names[] = {"error", "warning", "info", "debug"};
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    /* One fprintf so lines from ranks sharing a terminal do not interleave mid-line. */
    fprintf(stderr, "commlib: %s: %s\n", names[level < 0 ? 0 : level > 3 ? 3 : level], line);
}
