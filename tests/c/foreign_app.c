/* An ordinary MPI program that knows nothing of commlib: a ring exchange with a vector
 * type, packing of a struct array, and a reduction.  Each rank prints what it received;
 * the output must be the same with and without the interposer. */
#include <mpi.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct particle {
    double x, y, z;
    int id;
    char tag;
};

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);

    /* Column of a 16x16 matrix sent around the ring. */
    double matrix[16][16], column[16];
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++) matrix[i][j] = rank * 1000 + i * 16 + j;
    MPI_Datatype col;
    MPI_Type_vector(16, 1, 16, MPI_DOUBLE, &col);
    MPI_Type_commit(&col);
    int right = (rank + 1) % size, left = (rank + size - 1) % size;
    MPI_Sendrecv(&matrix[0][3], 1, col, right, 7, column, 16, MPI_DOUBLE, left, 7, MPI_COMM_WORLD,
                 MPI_STATUS_IGNORE);

    /* Array of structs: the x, id and tag members packed, then unpacked elsewhere. */
    struct particle parts[10], back[10] = {{0}};
    for (int i = 0; i < 10; i++) parts[i] = (struct particle){rank + i, 2.0 * i, 3.0 * i, 100 * rank + i, (char)('a' + i)};
    int blocks[3] = {1, 1, 1};
    MPI_Aint displs[3] = {offsetof(struct particle, x), offsetof(struct particle, id), offsetof(struct particle, tag)};
    MPI_Datatype types[3] = {MPI_DOUBLE, MPI_INT, MPI_CHAR}, member, member_array;
    MPI_Type_create_struct(3, blocks, displs, types, &member);
    MPI_Type_create_resized(member, 0, sizeof(struct particle), &member_array);
    MPI_Type_commit(&member_array);
    int packed_size, position = 0;
    MPI_Pack_size(10, member_array, MPI_COMM_WORLD, &packed_size);
    char *packed = malloc((size_t)packed_size);
    MPI_Pack(parts, 10, member_array, packed, packed_size, &position, MPI_COMM_WORLD);
    int unpacked = 0;
    MPI_Unpack(packed, packed_size, &unpacked, back, 10, member_array, MPI_COMM_WORLD);

    /* A duplicate of a predefined type is committed without MPI_Type_commit. */
    MPI_Datatype dup_double;
    MPI_Type_dup(MPI_DOUBLE, &dup_double);
    double pair[2] = {rank + 0.5, rank + 0.25}, pair_back[2];
    char pair_packed[16];
    int pair_position = 0;
    MPI_Pack(pair, 2, dup_double, pair_packed, (int)sizeof pair_packed, &pair_position, MPI_COMM_WORLD);
    memcpy(pair_back, pair_packed, sizeof pair_back);
    MPI_Type_free(&dup_double);

    double local = 0, total = 0;
    for (int i = 0; i < 16; i++) local += column[i] * (i + 1);
    for (int i = 0; i < 10; i++) local += back[i].x + back[i].id + back[i].tag + back[i].y;
    local += pair_back[0] * 3 + pair_back[1] + pair_position;
    MPI_Allreduce(&local, &total, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    printf("rank %d: column[0]=%g column[15]=%g packed=%d/%d checksum=%.1f total=%.1f\n", rank, column[0],
           column[15], position, packed_size, local, total);

    free(packed);
    MPI_Type_free(&col);
    MPI_Type_free(&member);
    MPI_Type_free(&member_array);
    MPI_Finalize();
    return 0;
}
