/* MPI_Dist_graph_create_adjacent with reorder = 1: rank placement, opt-in.
 *
 * The standard's semantics, which commlib keeps by default (the call goes to the host MPI
 * unchanged): each process passes the edges of its own vertex, named by comm_old ranks,
 * and keeps them - with reorder the MPI may give it another rank in the new
 * communicator, and its topology queries and neighbourhood collectives then name its
 * own neighbours by their new ranks.  Renumbering alone cannot move communication off
 * the network (the same pairs of processes still talk), so there is nothing for commlib
 * to gain there.
 *
 * COMMLIB_PLACEMENT=1 opts in to another contract, for programs written for it: the
 * vertices are what get placed.  Vertex v, described by the comm_old process of rank v,
 * may be played by another process, and in comm_dist_graph rank v is the process that
 * plays vertex v: MPI_Dist_graph_neighbors_count and MPI_Dist_graph_neighbors on new
 * rank v give exactly the lists comm_old rank v passed, in v's order, with v's weights,
 * and a neighbourhood collective on new rank v talks to v's neighbours.  Such a program,
 * after the call, learns which vertex it plays from MPI_Comm_rank on the new
 * communicator and takes on that vertex's data (ranks of comm_old and of the new
 * communicator name the same processes only through MPI_Group_translate_ranks); heavy
 * edges can then move inside a node.  A program that keeps working on its own data after
 * the call (any program written for the standard's semantics) gets wrong neighbours
 * under the opt-in - which is why it is not the default.
 *
 * How commlib does it, with the host MPI unaware: every process gathers the whole
 * weighted graph (all vertices' lists) and the node of every process, the partitioner
 * (native/transfer/placement.c) decides which process plays which vertex, PMPI_Comm_split
 * with key = the vertex a process plays gives a communicator whose rank v is that
 * process, and on it each process creates the topology, reorder = 0, from the lists of
 * the vertex it plays.  The result is an ordinary communicator of the host MPI: queries,
 * neighbourhood collectives, point-to-point and group translation need no translation
 * layer, so nothing of commlib stays in the communication path.
 *
 * Nodes: the processes that share memory (MPI_COMM_TYPE_SHARED), or with
 * COMMLIB_RANKS_PER_NODE=K consecutive blocks of K comm_old ranks (the last may be
 * smaller), so that one machine can pretend to be several.  The cost is the sum of the
 * weights (read as bytes) of the edges between vertices on different nodes, from the
 * destination lists.
 *
 * Left to the host MPI unchanged: reorder = 0, COMMLIB_PLACEMENT=0 (the default), intercommunicators,
 * one process, unweighted graphs (MPI_UNWEIGHTED), a graph without edges, one node or
 * one process per node (every placement cuts the same), and arguments commlib does not
 * accept (negative degrees, ranks out of range, negative weights) so that the MPI raises
 * its own error.  MPI_Dist_graph_create (the non-adjacent form) is not intercepted. */
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../transfer/placement.h"
#include "../util/log.h"
#include "commlib.h"
#include "interpose.h"

/* One int per field so that the header travels as MPI_INT. */
enum { H_INDEGREE, H_OUTDEGREE, H_FLAGS, H_NODE, H_FIELDS };
enum {
    F_INVALID = 1,         /* arguments commlib leaves to the MPI to reject */
    F_SOURCES_UNWEIGHTED = 2, /* sourceweights == MPI_UNWEIGHTED */
    F_DESTS_UNWEIGHTED = 4,   /* destweights == MPI_UNWEIGHTED */
};

static int is_intercomm(MPI_Comm comm)
{
    int inter = 0;
    return PMPI_Comm_test_inter(comm, &inter) == MPI_SUCCESS && inter;
}

static int check_list(int degree, const int *ranks, const int *weights, int weighted, int size)
{
    if (degree < 0) return 0;
    if (degree == 0) return 1;
    if (!ranks || (weighted && (!weights || weights == MPI_WEIGHTS_EMPTY))) return 0;
    for (int i = 0; i < degree; i++)
        if (ranks[i] < 0 || ranks[i] >= size || (weighted && weights[i] < 0)) return 0;
    return 1;
}

/* This process's node, named by the lowest comm_old rank on it (so that a node's name is
 * the rank of exactly one process, its lowest). */
static int my_node(MPI_Comm comm, int rank, int *node)
{
    if (commlib_config.ranks_per_node > 0) {
        *node = rank / commlib_config.ranks_per_node * commlib_config.ranks_per_node;
        return MPI_SUCCESS;
    }
    MPI_Comm shared;
    int rc = PMPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &shared);
    if (rc != MPI_SUCCESS) return rc;
    rc = PMPI_Allreduce(&rank, node, 1, MPI_INT, MPI_MIN, shared);
    PMPI_Comm_free(&shared);
    return rc;
}

/* All processes agree that every one of them is ok (and, given hash, computed the same). */
static int all_agree(MPI_Comm comm, int ok, int64_t hash, int *agreed)
{
    long long mine[3] = {ok, (long long)hash, -(long long)hash}, all[3];
    int rc = PMPI_Allreduce(mine, all, 3, MPI_LONG_LONG, MPI_MIN, comm);
    *agreed = rc == MPI_SUCCESS && all[0] == 1 && all[1] == -all[2];
    return rc;
}

static int64_t hash_ints(const int *v, int n)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (int i = 0; i < n; i++) {
        h ^= (uint32_t)v[i];
        h *= 1099511628211ull;
    }
    return (int64_t)(h >> 2); /* room to negate */
}

COMMLIB_EXPORT int MPI_Dist_graph_create_adjacent(MPI_Comm comm_old, int indegree, const int sources[],
                                                  const int sourceweights[], int outdegree,
                                                  const int destinations[], const int destweights[], MPI_Info info,
                                                  int reorder, MPI_Comm *comm_dist_graph)
{
#define FORWARD()                                                                                              \
    PMPI_Dist_graph_create_adjacent(comm_old, indegree, sources, sourceweights, outdegree, destinations,       \
                                    destweights, info, reorder, comm_dist_graph)
    FORWARD_IF_DISABLED(FORWARD());
    /* reorder and the knobs are the same on every process (reorder as the other
     * arguments of a collective constructor; the knobs from one environment) */
    if (!reorder || !commlib_config.placement || comm_old == MPI_COMM_NULL || is_intercomm(comm_old))
        return FORWARD();
    int rank, size;
    if (PMPI_Comm_rank(comm_old, &rank) != MPI_SUCCESS || PMPI_Comm_size(comm_old, &size) != MPI_SUCCESS ||
        size <= 1)
        return FORWARD();

    /* Whether the graph is weighted can only be told together: a process without edges
     * may pass anything as its weights. */
    int header[H_FIELDS] = {indegree, outdegree, 0, 0};
    if (sourceweights == MPI_UNWEIGHTED) header[H_FLAGS] |= F_SOURCES_UNWEIGHTED;
    if (destweights == MPI_UNWEIGHTED) header[H_FLAGS] |= F_DESTS_UNWEIGHTED;
    if (!check_list(indegree, sources, sourceweights, sourceweights != MPI_UNWEIGHTED, size) ||
        !check_list(outdegree, destinations, destweights, destweights != MPI_UNWEIGHTED, size))
        header[H_FLAGS] |= F_INVALID;
    int rc = my_node(comm_old, rank, &header[H_NODE]);
    if (rc != MPI_SUCCESS) return rc;
    int *headers = malloc((size_t)size * H_FIELDS * sizeof *headers);
    int agreed;
    if ((rc = all_agree(comm_old, headers != NULL, 0, &agreed)) != MPI_SUCCESS) goto out_headers;
    if (!agreed) {
        free(headers);
        return FORWARD();
    }
    rc = PMPI_Allgather(header, H_FIELDS, MPI_INT, headers, H_FIELDS, MPI_INT, comm_old);
    if (rc != MPI_SUCCESS) goto out_headers;

    /* From here every decision is taken from gathered data: the same on every process. */
    int64_t total = 0, edges = 0;
    int forward = 0, nodes = 0;
    for (int r = 0; r < size; r++) {
        const int *h = headers + (size_t)r * H_FIELDS;
        if (h[H_FLAGS] & F_INVALID) forward = 1;
        else if (((h[H_FLAGS] & F_SOURCES_UNWEIGHTED) && h[H_INDEGREE] > 0) ||
                 ((h[H_FLAGS] & F_DESTS_UNWEIGHTED) && h[H_OUTDEGREE] > 0))
            forward = 1; /* unweighted: nothing to weigh a placement by */
        else {
            total += 2 * ((int64_t)h[H_INDEGREE] + h[H_OUTDEGREE]);
            edges += h[H_OUTDEGREE];
        }
        nodes += h[H_NODE] == r;
    }
    /* one node, or one process per node: every placement cuts the same */
    if (forward || edges == 0 || nodes <= 1 || nodes >= size || total > INT_MAX) {
        if (!forward && total > INT_MAX)
            commlib_log(LOG_INFO, "placement: graph of %lld ints too large to gather; left to the MPI",
                        (long long)total);
        free(headers);
        return FORWARD();
    }

    /* Every vertex's lists: sources, sourceweights, destinations, destweights. */
    int *counts = malloc((size_t)size * sizeof *counts), *displs = malloc((size_t)size * sizeof *displs);
    int *lists = malloc((size_t)(total ? total : 1) * sizeof *lists);
    int *mine = malloc((size_t)(2 * (indegree + outdegree) + 1) * sizeof *mine);
    int *src = malloc((size_t)edges * sizeof *src), *dst = malloc((size_t)edges * sizeof *dst);
    int *weight = malloc((size_t)edges * sizeof *weight);
    int *process_of_vertex = malloc((size_t)size * sizeof *process_of_vertex);
    int *node_of_process = malloc((size_t)size * sizeof *node_of_process);
    int ok = counts && displs && lists && mine && src && dst && weight && process_of_vertex && node_of_process;
    if ((rc = all_agree(comm_old, ok, 0, &agreed)) != MPI_SUCCESS) goto out;
    if (!agreed) goto forward_out;
    for (int r = 0, at = 0; r < size; r++) {
        const int *h = headers + (size_t)r * H_FIELDS;
        counts[r] = 2 * (h[H_INDEGREE] + h[H_OUTDEGREE]);
        displs[r] = at;
        at += counts[r];
        node_of_process[r] = h[H_NODE];
    }
    {
        int *m = mine;
        for (int i = 0; i < indegree; i++) *m++ = sources[i];
        for (int i = 0; i < indegree; i++) *m++ = sourceweights[i];
        for (int i = 0; i < outdegree; i++) *m++ = destinations[i];
        for (int i = 0; i < outdegree; i++) *m++ = destweights[i];
    }
    rc = PMPI_Allgatherv(mine, counts[rank], MPI_INT, lists, counts, displs, MPI_INT, comm_old);
    if (rc != MPI_SUCCESS) goto out;

    int64_t e = 0;
    for (int r = 0; r < size; r++) {
        const int *h = headers + (size_t)r * H_FIELDS;
        const int *dests = lists + displs[r] + 2 * h[H_INDEGREE];
        for (int i = 0; i < h[H_OUTDEGREE]; i++, e++) {
            src[e] = r;
            dst[e] = dests[i];
            weight[e] = dests[h[H_OUTDEGREE] + i];
        }
    }
    struct placement_graph graph = {size, edges, src, dst, weight};
    int64_t cut_before, cut_after;
    uint64_t t0 = stat_now_ns();
    ok = placement_compute(&graph, node_of_process, process_of_vertex, &cut_before, &cut_after) == 0;
    double ms = (stat_now_ns() - t0) / 1e6;
    /* a guard, not a step of the algorithm: every process must have computed the same */
    if ((rc = all_agree(comm_old, ok, hash_ints(process_of_vertex, size), &agreed)) != MPI_SUCCESS) goto out;
    if (!agreed) {
        if (rank == 0) commlib_log(LOG_WARN, "placement: processes disagree on the placement; left to the MPI");
        goto forward_out;
    }
    stat_add(STAT_PLACEMENT_CALLS, 1);
    stat_add(STAT_PLACEMENT_CUT_BEFORE, (uint64_t)cut_before);
    stat_add(STAT_PLACEMENT_CUT_AFTER, (uint64_t)cut_after);
    int vertex = -1, moved = 0;
    for (int v = 0; v < size; v++) {
        if (process_of_vertex[v] == rank) vertex = v;
        moved += process_of_vertex[v] != v;
    }
    if (rank == 0)
        commlib_log(LOG_INFO,
                    "placement: %d ranks on %d %s nodes, %lld edges; edge cut %lld -> %lld bytes, %d ranks moved, %.3f ms",
                    size, nodes, commlib_config.ranks_per_node > 0 ? "pretended" : "shared-memory", (long long)edges,
                    (long long)cut_before, (long long)cut_after, moved, ms);
    if (!moved) { /* the identity is best: the program's own call, commlib's decision */
        rc = PMPI_Dist_graph_create_adjacent(comm_old, indegree, sources, sourceweights, outdegree, destinations,
                                             destweights, info, 0, comm_dist_graph);
        goto out;
    }

    MPI_Comm placed;
    if ((rc = PMPI_Comm_split(comm_old, 0, vertex, &placed)) != MPI_SUCCESS) goto out;
    {
        const int *h = headers + (size_t)vertex * H_FIELDS;
        const int *v_sources = lists + displs[vertex], *v_sourceweights = v_sources + h[H_INDEGREE];
        const int *v_dests = v_sourceweights + h[H_INDEGREE], *v_destweights = v_dests + h[H_OUTDEGREE];
        /* the weight arrays as the vertex's own process passed them, in kind */
        if (h[H_FLAGS] & F_SOURCES_UNWEIGHTED) v_sourceweights = MPI_UNWEIGHTED;
        else if (!h[H_INDEGREE]) v_sourceweights = MPI_WEIGHTS_EMPTY;
        if (h[H_FLAGS] & F_DESTS_UNWEIGHTED) v_destweights = MPI_UNWEIGHTED;
        else if (!h[H_OUTDEGREE]) v_destweights = MPI_WEIGHTS_EMPTY;
        rc = PMPI_Dist_graph_create_adjacent(placed, h[H_INDEGREE], v_sources, v_sourceweights, h[H_OUTDEGREE],
                                             v_dests, v_destweights, info, 0, comm_dist_graph);
    }
    PMPI_Comm_free(&placed);
    goto out;

forward_out:
    rc = FORWARD();
out:
    free(counts);
    free(displs);
    free(lists);
    free(mine);
    free(src);
    free(dst);
    free(weight);
    free(process_of_vertex);
    free(node_of_process);
out_headers:
    free(headers);
    return rc;
#undef FORWARD
}
