/* The multi-rank C tests' check: on failure, one line "rank R: FAIL (line L): why" on stdout
 * (what the Python side looks for) and the program's `failures` counted; the including file
 * defines `rank` and `failures`. */
#ifndef COMMLIB_TESTS_CHECK_H
#define COMMLIB_TESTS_CHECK_H

#include <stdio.h>

#define CHECK(cond, ...)                                         \
    do {                                                         \
        if (!(cond)) {                                           \
            printf("rank %d: FAIL (line %d): ", rank, __LINE__); \
            printf(__VA_ARGS__);                                 \
            printf("\n");                                        \
            failures++;                                          \
        }                                                        \
    } while (0)

#endif
