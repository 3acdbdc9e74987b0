/* Rank placement: a balanced k-way partition of the communication graph onto nodes.
 *
 * The graph is made undirected (w(u,v) = all weight between u and v in either
 * direction; self-loops never cross a node, so they are dropped).  Node b has room for
 * exactly cap[b] vertices, its number of processes.  Two starting points are refined and
 * the better one kept:
 *   - the identity (every vertex on its own process's node): refinement from here moves
 *     few vertices, and the result can never be worse than doing nothing;
 *   - greedy graph growing: nodes are filled one after another, each from the free vertex
 *     with the most weight (a seed) and then always the free vertex most connected to
 *     what the node already holds; disconnected pieces get a new seed.
 * Refinement keeps every node's size, so it moves vertices in pairs (swaps).  Up to
 * DENSE_LIMIT vertices it runs Kernighan-Lin passes: the best swap among unlocked pairs
 * is taken even when it loses, both vertices are locked, and the pass is rolled back to
 * its best prefix; passes repeat while they gain.  Larger graphs get greedy passes that
 * take every improving swap (Kernighan-Lin there costs seconds for a few percent: 2304
 * vertices in nodes of 8, 1.6 s against 3 ms).  Either way no single swap improves the
 * result at the end (unless MAX_PASSES ran out).
 * Everything is integer arithmetic and every tie is broken by index, so each rank that
 * runs this on the same input gets the same answer. */
#include "placement.h"

#include <stdlib.h>
#include <string.h>

#define DENSE_LIMIT 512   /* vertices up to which Kernighan-Lin refines (n x k table) */
#define KL_LOOKAHEAD 64   /* swaps a KL pass tries past its best prefix before stopping */
#define MAX_PASSES 32

/* Undirected, merged, no self-loops or zero weights; adjacency sorted by neighbour. */
struct ugraph {
    int n;
    int64_t *start; /* n + 1 */
    int *adj;
    int64_t *w;
};

struct pair {
    int a, b;
    int64_t w;
};

static int cmp_pair(const void *x, const void *y)
{
    const struct pair *p = x, *q = y;
    if (p->a != q->a) return p->a < q->a ? -1 : 1;
    return p->b < q->b ? -1 : p->b > q->b;
}

static void ugraph_free(struct ugraph *u)
{
    free(u->start);
    free(u->adj);
    free(u->w);
}

static int build_ugraph(const struct placement_graph *g, struct ugraph *u)
{
    memset(u, 0, sizeof *u);
    u->n = g->n;
    int64_t m = 0;
    for (int64_t i = 0; i < g->nedges; i++)
        if (g->src[i] != g->dst[i] && g->weight[i] > 0) m++;
    struct pair *pairs = malloc((size_t)(m ? m : 1) * sizeof *pairs);
    u->start = calloc((size_t)g->n + 1, sizeof *u->start);
    if (!pairs || !u->start) goto fail;
    m = 0;
    for (int64_t i = 0; i < g->nedges; i++) {
        int s = g->src[i], d = g->dst[i];
        if (s == d || g->weight[i] <= 0) continue;
        pairs[m++] = (struct pair){s < d ? s : d, s < d ? d : s, g->weight[i]};
    }
    qsort(pairs, (size_t)m, sizeof *pairs, cmp_pair);
    int64_t merged = 0;
    for (int64_t i = 0; i < m; i++) {
        if (merged && pairs[merged - 1].a == pairs[i].a && pairs[merged - 1].b == pairs[i].b)
            pairs[merged - 1].w += pairs[i].w;
        else
            pairs[merged++] = pairs[i];
    }
    for (int64_t i = 0; i < merged; i++) {
        u->start[pairs[i].a + 1]++;
        u->start[pairs[i].b + 1]++;
    }
    for (int v = 0; v < g->n; v++) u->start[v + 1] += u->start[v];
    u->adj = malloc((size_t)(merged ? 2 * merged : 1) * sizeof *u->adj);
    u->w = malloc((size_t)(merged ? 2 * merged : 1) * sizeof *u->w);
    int64_t *fill = malloc((size_t)g->n * sizeof *fill);
    if (!u->adj || !u->w || !fill) {
        free(fill);
        goto fail;
    }
    memcpy(fill, u->start, (size_t)g->n * sizeof *fill);
    /* pairs are sorted by (a, b): x's lower neighbours (pairs (a, x)) all come before its
     * upper ones (pairs (x, b)), each group ascending, so every list ends up sorted */
    for (int64_t i = 0; i < merged; i++) {
        int a = pairs[i].a, b = pairs[i].b;
        u->adj[fill[a]] = b;
        u->w[fill[a]++] = pairs[i].w;
        u->adj[fill[b]] = a;
        u->w[fill[b]++] = pairs[i].w;
    }
    free(fill);
    free(pairs);
    return 0;
fail:
    free(pairs);
    ugraph_free(u);
    return -1;
}

static int64_t edge_weight(const struct ugraph *u, int x, int y)
{
    int64_t lo = u->start[x], hi = u->start[x + 1];
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (u->adj[mid] < y) lo = mid + 1;
        else hi = mid;
    }
    return lo < u->start[x + 1] && u->adj[lo] == y ? u->w[lo] : 0;
}

static int64_t ucut(const struct ugraph *u, const int *part)
{
    int64_t cut = 0;
    for (int x = 0; x < u->n; x++)
        for (int64_t e = u->start[x]; e < u->start[x + 1]; e++)
            if (u->adj[e] > x && part[u->adj[e]] != part[x]) cut += u->w[e];
    return cut;
}

/* A partition with fixed node sizes: members of node b are members[first[b] ..
 * first[b] + cap[b]), pos[v] is v's index there. */
struct state {
    const struct ugraph *u;
    int n, k;
    const int *first, *cap;
    int *part, *members, *pos;
    int64_t *conn; /* dense path only: conn[x * k + b] = weight from x into node b */
};

static void index_members(struct state *s)
{
    int *cursor = malloc((size_t)s->k * sizeof *cursor);
    if (cursor) {
        memcpy(cursor, s->first, (size_t)s->k * sizeof *cursor);
        for (int v = 0; v < s->n; v++) {
            s->pos[v] = cursor[s->part[v]]++;
            s->members[s->pos[v]] = v;
        }
        free(cursor);
        return;
    }
    /* no memory for k cursors: quadratic but allocation-free */
    for (int b = 0, slot = 0; b < s->k; b++)
        for (int v = 0; v < s->n; v++)
            if (s->part[v] == b) {
                s->pos[v] = slot;
                s->members[slot++] = v;
            }
}

static void swap_vertices(struct state *s, int x, int y)
{
    int px = s->part[x], py = s->part[y];
    if (s->conn) {
        const struct ugraph *u = s->u;
        for (int64_t e = u->start[x]; e < u->start[x + 1]; e++) {
            s->conn[(int64_t)u->adj[e] * s->k + px] -= u->w[e];
            s->conn[(int64_t)u->adj[e] * s->k + py] += u->w[e];
        }
        for (int64_t e = u->start[y]; e < u->start[y + 1]; e++) {
            s->conn[(int64_t)u->adj[e] * s->k + py] -= u->w[e];
            s->conn[(int64_t)u->adj[e] * s->k + px] += u->w[e];
        }
    }
    s->part[x] = py;
    s->part[y] = px;
    int slot = s->pos[x];
    s->pos[x] = s->pos[y];
    s->pos[y] = slot;
    s->members[s->pos[x]] = x;
    s->members[s->pos[y]] = y;
}

/* One Kernighan-Lin pass; returns what it gained (>= 0).  A step takes the best swap
 * among unlocked pairs (x, y) on different nodes where x has an edge into y's node: any
 * swap that gains is such a pair (seen from one side or the other), and the pairs left
 * out swap two vertices that do not touch each other's node, which only loses. */
static int64_t kl_pass(struct state *s, unsigned char *locked, int *swapped, int *seen)
{
    const int n = s->n, k = s->k;
    const int64_t *conn = s->conn;
    const struct ugraph *u = s->u;
    memset(locked, 0, (size_t)n);
    int64_t total = 0, best = 0;
    int count = 0, best_count = 0;
    for (;;) {
        int64_t best_gain = INT64_MIN;
        int bx = -1, by = -1;
        for (int b = 0; b < k; b++) seen[b] = -1;
        for (int x = 0; x < n; x++) {
            if (locked[x]) continue;
            int px = s->part[x];
            const int64_t *cx = conn + (int64_t)x * k;
            for (int64_t e = u->start[x]; e < u->start[x + 1]; e++) {
                int py = s->part[u->adj[e]];
                if (py == px || seen[py] == x) continue;
                seen[py] = x;
                for (int i = s->first[py]; i < s->first[py] + s->cap[py]; i++) {
                    int y = s->members[i];
                    if (locked[y]) continue;
                    const int64_t *cy = conn + (int64_t)y * k;
                    int64_t gain = cx[py] - cx[px] + cy[px] - cy[py];
                    int lo = x < y ? x : y, hi = x < y ? y : x;
                    if (gain < best_gain || (gain == best_gain && (lo > bx || (lo == bx && hi >= by)))) continue;
                    gain -= 2 * edge_weight(u, x, y); /* only lowers it */
                    if (gain > best_gain || (gain == best_gain && (lo < bx || (lo == bx && hi < by)))) {
                        best_gain = gain;
                        bx = lo;
                        by = hi;
                    }
                }
            }
        }
        if (bx < 0) break;
        swap_vertices(s, bx, by);
        locked[bx] = locked[by] = 1;
        swapped[2 * count] = bx;
        swapped[2 * count + 1] = by;
        count++;
        total += best_gain;
        if (total > best) {
            best = total;
            best_count = count;
        } else if (count - best_count >= KL_LOOKAHEAD) {
            break;
        }
    }
    while (count > best_count) {
        count--;
        swap_vertices(s, swapped[2 * count], swapped[2 * count + 1]);
    }
    return best;
}

/* Weight from x into node b, from its adjacency. */
static int64_t conn_sparse(const struct state *s, int x, int b)
{
    int64_t c = 0;
    for (int64_t e = s->u->start[x]; e < s->u->start[x + 1]; e++)
        if (s->part[s->u->adj[e]] == b) c += s->u->w[e];
    return c;
}

/* One greedy pass: each vertex takes the best improving swap into a node it is more
 * connected to than to its own.  (A swap that gains has a vertex for which that holds,
 * so visiting every vertex finds every improving swap.)  Returns the gain. */
static int64_t greedy_pass(struct state *s, int64_t *into, int *touched)
{
    const struct ugraph *u = s->u;
    int64_t gained = 0;
    for (int x = 0; x < s->n; x++) {
        int px = s->part[x], nt = 0;
        for (int64_t e = u->start[x]; e < u->start[x + 1]; e++) {
            int b = s->part[u->adj[e]];
            if (!into[b]) touched[nt++] = b;
            into[b] += u->w[e]; /* weights are > 0, so touched nodes stay nonzero */
        }
        int64_t best_gain = 0, own = into[px];
        int best_y = -1;
        for (int t = 0; t < nt; t++) {
            int b = touched[t];
            int64_t gx = into[b] - own;
            if (b == px || gx <= 0) continue;
            for (int i = s->first[b]; i < s->first[b] + s->cap[b]; i++) {
                int y = s->members[i];
                int64_t gain = gx + conn_sparse(s, y, px) - conn_sparse(s, y, b);
                if (gain <= best_gain) continue;
                gain -= 2 * edge_weight(u, x, y);
                if (gain > best_gain) {
                    best_gain = gain;
                    best_y = y;
                }
            }
        }
        for (int t = 0; t < nt; t++) into[touched[t]] = 0;
        if (best_y >= 0 && best_gain > 0) {
            swap_vertices(s, x, best_y);
            gained += best_gain;
        }
    }
    return gained;
}

/* Refines s->part in place; -1 when memory ran out (s->part is still a valid partition). */
static int refine(struct state *s)
{
    index_members(s);
    if (s->n <= DENSE_LIMIT) {
        s->conn = calloc((size_t)s->n * (size_t)s->k, sizeof *s->conn);
        unsigned char *locked = malloc((size_t)s->n);
        int *swapped = malloc((size_t)s->n * sizeof *swapped); /* n/2 swaps of 2 */
        int *seen = malloc((size_t)s->k * sizeof *seen);
        int ok = s->conn && locked && swapped && seen;
        if (ok) {
            for (int x = 0; x < s->n; x++)
                for (int64_t e = s->u->start[x]; e < s->u->start[x + 1]; e++)
                    s->conn[(int64_t)x * s->k + s->part[s->u->adj[e]]] += s->u->w[e];
            for (int pass = 0; pass < MAX_PASSES && kl_pass(s, locked, swapped, seen) > 0; pass++) {
            }
        }
        free(s->conn);
        s->conn = NULL;
        free(locked);
        free(swapped);
        free(seen);
        if (ok) return 0;
    }
    int64_t *into = calloc((size_t)s->k, sizeof *into);
    int *touched = malloc((size_t)s->k * sizeof *touched);
    int ok = into && touched;
    if (ok)
        for (int pass = 0; pass < MAX_PASSES && greedy_pass(s, into, touched) > 0; pass++) {
        }
    free(into);
    free(touched);
    return ok ? 0 : -1;
}

/* Max-heap of (gain, vertex): larger gain first, then smaller vertex. */
struct entry {
    int64_t gain;
    int v;
};

static int before(struct entry a, struct entry b) { return a.gain > b.gain || (a.gain == b.gain && a.v < b.v); }

static void heap_push(struct entry *h, int64_t *size, struct entry e)
{
    int64_t i = (*size)++;
    while (i > 0 && before(e, h[(i - 1) / 2])) {
        h[i] = h[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    h[i] = e;
}

static struct entry heap_pop(struct entry *h, int64_t *size)
{
    struct entry top = h[0], last = h[--*size];
    int64_t i = 0;
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= *size) break;
        if (c + 1 < *size && before(h[c + 1], h[c])) c++;
        if (!before(h[c], last)) break;
        h[i] = h[c];
        i = c;
    }
    if (*size) h[i] = last;
    return top;
}

struct weighted_vertex {
    int64_t total;
    int v;
};

static int cmp_heavier(const void *x, const void *y)
{
    const struct weighted_vertex *a = x, *b = y;
    if (a->total != b->total) return a->total > b->total ? -1 : 1;
    return a->v < b->v ? -1 : a->v > b->v;
}

/* Greedy graph growing into part[]; -1 when memory ran out. */
static int grow(const struct ugraph *u, int k, const int *cap, int *part)
{
    const int n = u->n;
    int64_t nadj = u->start[n];
    int64_t *gain = calloc((size_t)n, sizeof *gain);
    struct weighted_vertex *order = malloc((size_t)n * sizeof *order);
    struct entry *heap = malloc((size_t)(nadj + 1) * sizeof *heap);
    int *touched = malloc((size_t)(nadj + 1) * sizeof *touched);
    int rc = -1;
    if (!gain || !order || !heap || !touched) goto out;
    for (int v = 0; v < n; v++) {
        order[v] = (struct weighted_vertex){0, v};
        part[v] = -1;
        for (int64_t e = u->start[v]; e < u->start[v + 1]; e++) order[v].total += u->w[e];
    }
    qsort(order, (size_t)n, sizeof *order, cmp_heavier); /* seeds: heaviest first */
    int next_seed = 0;
    for (int b = 0; b < k; b++) {
        int64_t size = 0, nt = 0;
        for (int filled = 0; filled < cap[b]; filled++) {
            int v = -1;
            while (size) {
                struct entry e = heap_pop(heap, &size);
                if (part[e.v] < 0 && gain[e.v] == e.gain) {
                    v = e.v;
                    break;
                }
            }
            if (v < 0) {
                while (part[order[next_seed].v] >= 0) next_seed++;
                v = order[next_seed].v;
            }
            part[v] = b;
            for (int64_t e = u->start[v]; e < u->start[v + 1]; e++) {
                int x = u->adj[e];
                if (part[x] >= 0) continue;
                if (!gain[x]) touched[nt++] = x;
                gain[x] += u->w[e];
                heap_push(heap, &size, (struct entry){gain[x], x});
            }
        }
        for (int64_t t = 0; t < nt; t++) gain[touched[t]] = 0;
    }
    rc = 0;
out:
    free(gain);
    free(order);
    free(heap);
    free(touched);
    return rc;
}

struct overlap {
    int group, node, count;
};

static int cmp_overlap(const void *x, const void *y)
{
    const struct overlap *p = x, *q = y;
    if (p->count != q->count) return p->count > q->count ? -1 : 1;
    if (p->group != q->group) return p->group < q->group ? -1 : 1;
    return p->node < q->node ? -1 : p->node > q->node;
}

/* Renames the groups of part[] among nodes of the same size so that as many vertices as
 * possible stay on the node they started on (the cut does not change). */
static void keep_in_place(int n, int k, const int *cap, const int *home, int *part)
{
    struct overlap *o = malloc((size_t)n * sizeof *o);
    int *name = malloc((size_t)k * sizeof *name), *taken = calloc((size_t)k, sizeof *taken);
    if (!o || !name || !taken) goto out;
    /* count (group, home node) pairs: sort by (group, node), then run-length */
    for (int v = 0; v < n; v++) o[v] = (struct overlap){part[v], home[v], 0};
    qsort(o, (size_t)n, sizeof *o, cmp_overlap); /* count 0 everywhere: sorts by group, node */
    int m = 0;
    for (int v = 0; v < n; v++) {
        if (m && o[m - 1].group == o[v].group && o[m - 1].node == o[v].node) o[m - 1].count++;
        else o[m++] = (struct overlap){o[v].group, o[v].node, 1};
    }
    qsort(o, (size_t)m, sizeof *o, cmp_overlap);
    for (int g = 0; g < k; g++) name[g] = -1;
    for (int i = 0; i < m; i++) {
        int g = o[i].group, b = o[i].node;
        if (name[g] < 0 && !taken[b] && cap[g] == cap[b]) {
            name[g] = b;
            taken[b] = 1;
        }
    }
    for (int g = 0; g < k; g++) /* the rest: the first free node of the same size */
        for (int b = 0; name[g] < 0 && b < k; b++)
            if (!taken[b] && cap[b] == cap[g]) {
                name[g] = b;
                taken[b] = 1;
            }
    for (int v = 0; v < n; v++) part[v] = name[part[v]];
out:
    free(o);
    free(name);
    free(taken);
}

int64_t placement_cut(const struct placement_graph *g, const int *node_of_process, const int *process_of_vertex)
{
    int64_t cut = 0;
    for (int64_t i = 0; i < g->nedges; i++) {
        int s = g->src[i], d = g->dst[i];
        if (process_of_vertex) {
            s = process_of_vertex[s];
            d = process_of_vertex[d];
        }
        if (node_of_process[s] != node_of_process[d]) cut += g->weight[i];
    }
    return cut;
}

struct labelled {
    int label, process;
};

static int cmp_labelled(const void *x, const void *y)
{
    const struct labelled *p = x, *q = y;
    if (p->label != q->label) return p->label < q->label ? -1 : 1;
    return p->process < q->process ? -1 : p->process > q->process;
}

int placement_compute(const struct placement_graph *g, const int *node_of_process, int *process_of_vertex,
                      int64_t *cut_before, int64_t *cut_after)
{
    const int n = g->n;
    for (int v = 0; v < n; v++) process_of_vertex[v] = v;
    *cut_before = *cut_after = placement_cut(g, node_of_process, NULL);
    if (n <= 1 || *cut_before == 0) return 0;

    int rc = -1, k = 0;
    struct ugraph u = {0};
    struct labelled *lab = malloc((size_t)n * sizeof *lab);
    int *home = malloc((size_t)n * sizeof *home), *cap = calloc((size_t)n, sizeof *cap);
    int *first = malloc((size_t)n * sizeof *first), *procs = malloc((size_t)n * sizeof *procs);
    int *part[2] = {malloc((size_t)n * sizeof(int)), malloc((size_t)n * sizeof(int))};
    int *members = malloc((size_t)n * sizeof *members), *pos = malloc((size_t)n * sizeof *pos);
    int *node_min = malloc((size_t)n * sizeof *node_min), *rank_of = malloc((size_t)n * sizeof *rank_of);
    unsigned char *used = calloc((size_t)n, 1);
    if (!lab || !home || !cap || !first || !procs || !part[0] || !part[1] || !members || !pos || !node_min ||
        !rank_of || !used)
        goto out;

    /* nodes numbered 0..k-1 in the order of their lowest process; procs lists each
     * node's processes ascending, from first[b] */
    for (int p = 0; p < n; p++) lab[p] = (struct labelled){node_of_process[p], p};
    qsort(lab, (size_t)n, sizeof *lab, cmp_labelled);
    for (int i = 0; i < n; i++)
        if (i == 0 || lab[i].label != lab[i - 1].label) node_min[k++] = lab[i].process;
    /* rank the groups (label order) by their lowest process */
    for (int p = 0; p < n; p++) pos[p] = -1;
    for (int a = 0; a < k; a++) pos[node_min[a]] = a;
    for (int p = 0, r = 0; p < n; p++)
        if (pos[p] >= 0) rank_of[pos[p]] = r++;
    for (int i = 0, group = -1; i < n; i++) {
        if (i == 0 || lab[i].label != lab[i - 1].label) group++;
        home[lab[i].process] = rank_of[group];
    }
    if (k <= 1 || k >= n) { /* one node, or one process per node: every placement cuts the same */
        rc = 0;
        goto out;
    }
    for (int p = 0; p < n; p++) cap[home[p]]++;
    first[0] = 0;
    for (int b = 1; b < k; b++) first[b] = first[b - 1] + cap[b - 1];
    {
        int *cursor = pos; /* free until the partitions need it */
        memcpy(cursor, first, (size_t)k * sizeof *cursor);
        for (int p = 0; p < n; p++) procs[cursor[home[p]]++] = p;
    }
    if (build_ugraph(g, &u) < 0) goto out;

    int64_t identity_cut = ucut(&u, home), cut[2];
    memcpy(part[0], home, (size_t)n * sizeof(int));
    int grown = grow(&u, k, cap, part[1]) == 0;
    for (int c = 0; c < 1 + grown; c++) {
        struct state s = {&u, n, k, first, cap, part[c], members, pos, NULL};
        refine(&s); /* out of memory: part[c] stays a valid, if worse, partition */
        cut[c] = ucut(&u, part[c]);
    }
    int best = grown && cut[1] < cut[0] ? 1 : 0;
    if (cut[best] >= identity_cut) {
        rc = 0;
        goto out;
    }
    keep_in_place(n, k, cap, home, part[best]);

    /* vertices whose node did not change keep their own process; the others take the
     * node's free processes in ascending order */
    for (int v = 0; v < n; v++) process_of_vertex[v] = -1;
    for (int v = 0; v < n; v++)
        if (part[best][v] == home[v]) {
            process_of_vertex[v] = v;
            used[v] = 1;
        }
    memcpy(pos, first, (size_t)k * sizeof *pos); /* per node: next process to look at */
    for (int v = 0; v < n; v++) {
        if (process_of_vertex[v] >= 0) continue;
        int b = part[best][v];
        while (used[procs[pos[b]]]) pos[b]++;
        process_of_vertex[v] = procs[pos[b]];
        used[procs[pos[b]]] = 1;
    }
    *cut_after = placement_cut(g, node_of_process, process_of_vertex);
    rc = 0;
out:
    if (rc < 0) {
        for (int v = 0; v < n; v++) process_of_vertex[v] = v;
        *cut_after = *cut_before;
    }
    ugraph_free(&u);
    free(lab);
    free(home);
    free(cap);
    free(first);
    free(procs);
    free(part[0]);
    free(part[1]);
    free(members);
    free(pos);
    free(node_min);
    free(rank_of);
    free(used);
    return rc;
}
