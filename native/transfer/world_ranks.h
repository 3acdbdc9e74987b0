/* Peers by their rank in MPI_COMM_WORLD: the GPU-to-GPU path (transfer/ipc.h) asks whether a
 * destination shares our node, and both it and pipelined staging (transfer/pipeline.h) send
 * their private messages on duplicates of MPI_COMM_WORLD.  A communicator's translation is
 * made once and cached on it (an attribute, freed with the communicator). */
#ifndef COMMLIB_TRANSFER_WORLD_RANKS_H
#define COMMLIB_TRANSFER_WORLD_RANKS_H

#include <mpi.h>

/* After PMPI_Init, by each user (ipc_init, pipeline_init); world_ranks_finalize once per
 * init, before PMPI_Finalize - the cache goes with the last user. */
void world_ranks_init(void);
void world_ranks_finalize(void);

/* The world rank of `rank` in the intracommunicator comm; -1 when it has none, for an
 * intercommunicator, or outside world_ranks_init/finalize. */
int world_rank_of(MPI_Comm comm, int rank);

#endif
