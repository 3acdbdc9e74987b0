#include "world_ranks.h"

#include <pthread.h>
#include <stdlib.h>

/* A communicator's ranks as world ranks (-1: not in MPI_COMM_WORLD). */
struct comm_map {
    int size;
    int world[];
};

static int keyval = MPI_KEYVAL_INVALID, users;
/* two threads' first sends on one communicator must not both set the attribute: the
 * second would free the map the first is reading */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static int drop_map(MPI_Comm comm, int key, void *value, void *extra)
{
    (void)comm, (void)key, (void)extra;
    free(value);
    return MPI_SUCCESS;
}

void world_ranks_init(void)
{
    pthread_mutex_lock(&lock);
    if (users++ == 0 && PMPI_Comm_create_keyval(MPI_COMM_NULL_COPY_FN, drop_map, &keyval, NULL) != MPI_SUCCESS)
        keyval = MPI_KEYVAL_INVALID;
    pthread_mutex_unlock(&lock);
}

void world_ranks_finalize(void)
{
    pthread_mutex_lock(&lock);
    if (users > 0 && --users == 0 && keyval != MPI_KEYVAL_INVALID) PMPI_Comm_free_keyval(&keyval);
    pthread_mutex_unlock(&lock);
}

/* The map, made and attached on first use (caller holds lock). */
static const struct comm_map *map_of(MPI_Comm comm)
{
    void *value = NULL;
    int found = 0, inter = 0;
    if (keyval == MPI_KEYVAL_INVALID || PMPI_Comm_get_attr(comm, keyval, &value, &found) != MPI_SUCCESS) return NULL;
    if (found) return value;
    if (PMPI_Comm_test_inter(comm, &inter) != MPI_SUCCESS || inter) return NULL;
    int size;
    MPI_Group group, world;
    PMPI_Comm_size(comm, &size);
    struct comm_map *map = malloc(sizeof *map + 2 * (size_t)size * sizeof(int));
    if (!map) return NULL;
    map->size = size;
    int *ranks = map->world + size;
    for (int i = 0; i < size; i++) ranks[i] = i;
    PMPI_Comm_group(comm, &group);
    PMPI_Comm_group(MPI_COMM_WORLD, &world);
    int ok = PMPI_Group_translate_ranks(group, size, ranks, world, map->world) == MPI_SUCCESS;
    PMPI_Group_free(&group);
    PMPI_Group_free(&world);
    for (int i = 0; ok && i < size; i++)
        if (map->world[i] == MPI_UNDEFINED) map->world[i] = -1;
    if (!ok || PMPI_Comm_set_attr(comm, keyval, map) != MPI_SUCCESS) {
        free(map);
        return NULL;
    }
    return map;
}

int world_rank_of(MPI_Comm comm, int rank)
{
    if (rank < 0) return -1;
    pthread_mutex_lock(&lock);
    const struct comm_map *map = map_of(comm);
    int world = map && rank < map->size ? map->world[rank] : -1;
    pthread_mutex_unlock(&lock);
    return world;
}
