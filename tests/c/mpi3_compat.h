/* Lets the test programs build against an MPI-3 library (Open MPI 4.x): the MPI-4
 * large-count functions become stubs that are never reached, because the programs
 * check COMMLIB_TEST_HAVE_LARGE_COUNT before choosing them.  The arguments are still
 * evaluated so that no variable is left unused. */
#ifndef COMMLIB_TEST_MPI3_COMPAT_H
#define COMMLIB_TEST_MPI3_COMPAT_H

#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

#if MPI_VERSION >= 4
#define COMMLIB_TEST_HAVE_LARGE_COUNT 1
#else
#define COMMLIB_TEST_HAVE_LARGE_COUNT 0
static inline int large_count_missing(int unused, ...)
{
    (void)unused;
    fprintf(stderr, "large-count function called on an MPI-3 library\n");
    abort();
}
#define MPI_Type_contiguous_c(...) large_count_missing(0, __VA_ARGS__)
#define MPI_Type_vector_c(...) large_count_missing(0, __VA_ARGS__)
#define MPI_Type_create_hvector_c(...) large_count_missing(0, __VA_ARGS__)
#define MPI_Type_indexed_c(...) large_count_missing(0, __VA_ARGS__)
#define MPI_Type_create_hindexed_c(...) large_count_missing(0, __VA_ARGS__)
#define MPI_Type_create_indexed_block_c(...) large_count_missing(0, __VA_ARGS__)
#define MPI_Type_create_hindexed_block_c(...) large_count_missing(0, __VA_ARGS__)
#define MPI_Type_create_struct_c(...) large_count_missing(0, __VA_ARGS__)
#define MPI_Type_create_subarray_c(...) large_count_missing(0, __VA_ARGS__)
#define MPI_Type_create_resized_c(...) large_count_missing(0, __VA_ARGS__)
#define MPI_Pack_c(...) large_count_missing(0, __VA_ARGS__)
#define PMPI_Pack_c(...) large_count_missing(0, __VA_ARGS__)
#define MPI_Unpack_c(...) large_count_missing(0, __VA_ARGS__)
#define PMPI_Unpack_c(...) large_count_missing(0, __VA_ARGS__)
#define MPI_Pack_size_c(...) large_count_missing(0, __VA_ARGS__)
#define PMPI_Pack_size_c(...) large_count_missing(0, __VA_ARGS__)
#endif

#endif
