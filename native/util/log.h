#ifndef COMMLIB_LOG_H
#define COMMLIB_LOG_H

#include "config.h" /* the levels */

/* One line to stderr, prefixed "commlib:", if level <= COMMLIB_LOG. */
void commlib_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
