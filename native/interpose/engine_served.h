/* MPI_Iallreduce served by the collective engine (engine_served.c says when). */
#ifndef COMMLIB_INTERPOSE_ENGINE_SERVED_H
#define COMMLIB_INTERPOSE_ENGINE_SERVED_H

#include <mpi.h>

/* 1 when the engine took the call (*rc: its return code), 0 when the caller goes on. */
int engine_serve_iallreduce(const void *sendbuf, void *recvbuf, int count, MPI_Datatype type, MPI_Op op,
                            MPI_Comm comm, MPI_Request *request, int *rc);
/* MPI_Finalize: the engine's thread stops. */
void engine_served_finalize(void);

#endif
