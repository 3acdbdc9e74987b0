/* Rank placement: which process of a communicator should play which vertex of a
 * weighted communication graph so that heavy edges stay inside a node.
 *
 * Pure computation, no MPI: every rank runs it on the same gathered graph and gets the
 * same answer (integer arithmetic only, every tie broken by index).  Used by
 * MPI_Dist_graph_create_adjacent with reorder = 1 (native/interpose/topology.c). */
#ifndef COMMLIB_PLACEMENT_H
#define COMMLIB_PLACEMENT_H

#include <stdint.h>

/* A directed graph on vertices 0..n-1 as an edge list; weight[i] >= 0 is the volume of
 * edge src[i] -> dst[i].  Self-loops and repeated edges are allowed (repeats add up). */
struct placement_graph {
    int n;
    int64_t nedges;
    const int *src, *dst, *weight;
};

/* Edge cut: total weight of the edges whose two vertices sit on different nodes, when
 * vertex v is played by process process_of_vertex[v] (NULL: by process v) and process p
 * lives on node node_of_process[p] (any labels; equal labels = same node). */
int64_t placement_cut(const struct placement_graph *g, const int *node_of_process, const int *process_of_vertex);

/* Fills process_of_vertex (a permutation of 0..n-1) so that the edge cut is as small as
 * the partitioner can make it with every node keeping its number of processes, and
 * never larger than the identity's (the identity is returned unless strictly better
 * was found).  Vertices stay on their own process wherever their node is unchanged.
 * *cut_before / *cut_after: the cut of the identity and of the result.
 * Returns 0, or -1 when memory ran out (process_of_vertex is then the identity). */
int placement_compute(const struct placement_graph *g, const int *node_of_process, int *process_of_vertex,
                      int64_t *cut_before, int64_t *cut_after);

#endif
