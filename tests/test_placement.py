"""Rank placement: MPI_Dist_graph_create_adjacent with reorder=1.

By default commlib keeps the standard's semantics - each process keeps the edges it
passed - and leaves the call to the host MPI: the new communicator's neighbour lists,
weights and neighbourhood collectives are exactly what the host MPI gives, with nodes
simulated (COMMLIB_RANKS_PER_NODE) or not.  With COMMLIB_PLACEMENT=1 (opt-in, for
programs written for it) the process at new rank v plays vertex v and takes on its data,
so heavy edges can move inside a node.  One machine pretends to be several nodes of K
ranks.  The C program (tests/c/placement.c) checks, on every rank, that the new
communicator is consistent with the semantics asked for (topology queries, a neighbour
exchange and all-gather with values derived from vertex ids, group translation) and
computes the edge cut before and after; these tests check that the cut shrinks under the
opt-in, that the counters agree, that what commlib must leave alone stays alone, and that
the program is right without the interposer too.  The partitioner alone runs in the
program's "unit" mode."""
import re
import subprocess

import pytest

from harness import ROOT, build_c, run_mpi

EVERY_SCENARIO = ["far:1:1", "mixed:1:1", "random:1:1", "far:0:1", "far:1:0", "mixed:1:0"]


@pytest.fixture(scope="module")
def placement(tmp_path_factory):
    return build_c("tests/c/placement.c", tmp_path_factory.mktemp("placement"),
                   extra_flags=[f"{ROOT}/native/transfer/placement.c"])


def results(proc):
    """(kind, reorder, weighted) -> dict of the fields of the program's result line."""
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("result: "):
            fields = dict(item.split("=", 1) for item in line[len("result: "):].split())
            key = (fields["kind"], int(fields["reorder"]), int(fields["weighted"]))
            out[key] = {k: (v if k in ("kind", "map") else int(v)) for k, v in fields.items()}
    return out


ROLES = {"COMMLIB_PLACEMENT": "1"}  # the opt-in: processes take on other vertices' roles


def run(exe, ranks, per_node, scenarios, seed=7, env=None, preload=True, semantics=None):
    full_env = {"COMMLIB_RANKS_PER_NODE": str(per_node)} if per_node else {}
    full_env.update(env or {})
    if semantics is None:
        semantics = "roles" if preload and full_env.get("COMMLIB_PLACEMENT") == "1" else "own"
    proc = run_mpi(ranks, [exe, "graph", str(per_node), str(seed), semantics, *scenarios], env=full_env,
                   preload=preload, timeout=120)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    found = results(proc)
    assert len(found) == len(scenarios), proc.stdout
    for result in found.values():
        assert result["failures"] == 0 and result["checks"] > 0, (result, proc.stderr)
    return proc, found


def assert_untouched(result, with_commlib=True):
    assert result["moved"] == 0 and result["map"] == ",".join(map(str, range(result["ranks"]))), result
    assert result["cut_after"] == result["cut_before"], result
    if with_commlib:
        assert result["stat_calls"] == 0 and result["stat_before"] == 0 and result["stat_after"] == 0, result


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_partitioner(placement, seed):
    print(f"seed={seed}")
    proc = subprocess.run([placement, "unit", str(seed), "400"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert re.search(r"unit: checks=\d+ failures=0", proc.stdout), proc.stdout


@pytest.mark.parametrize("ranks,per_node", [(4, 2), (8, 2), (8, 4)])
def test_heavy_edges_move_inside_nodes(placement, ranks, per_node):
    proc, found = run(placement, ranks, per_node, EVERY_SCENARIO,
                      env={**ROLES, "COMMLIB_LOG": "info", "COMMLIB_STATS": "1"})
    for kind in ("far", "mixed", "random"):
        r = found[(kind, 1, 1)]
        # the program's own cuts and commlib's counters agree
        assert r["stat_calls"] == 1 and (r["stat_before"], r["stat_after"]) == (r["cut_before"], r["cut_after"]), r
        assert r["cut_after"] < r["cut_before"], r
        assert r["moved"] > 0
        if kind != "random":
            # every heavy pair (i, ranks-1-i) now shares a node: only light edges cross
            assert r["cut_after"] < 1000 // 2, r
        vertices_on = [int(p) for p in r["map"].split(",")]
        assert sorted(vertices_on) == list(range(ranks))
    # left alone: reorder=0, and unweighted graphs
    for key in (("far", 0, 1), ("far", 1, 0), ("mixed", 1, 0)):
        assert_untouched(found[key])
    log = re.findall(r"commlib: info: placement: (\d+) ranks on (\d+) pretended nodes, \d+ edges; "
                     r"edge cut (\d+) -> (\d+) bytes", proc.stderr)
    assert [(int(n), int(k), int(b), int(a)) for n, k, b, a in log] == [
        (ranks, ranks // per_node, found[(kind, 1, 1)]["cut_before"], found[(kind, 1, 1)]["cut_after"])
        for kind in ("far", "mixed", "random")], proc.stderr
    report = re.findall(r"commlib\[rank (\d+)\]: .*\| placement calls=(\d+) cut before=(\d+) after=(\d+)", proc.stderr)
    assert len(report) == ranks
    assert {(int(c), int(b), int(a)) for _, c, b, a in report} == {(
        3, sum(found[(k, 1, 1)]["cut_before"] for k in ("far", "mixed", "random")),
        sum(found[(k, 1, 1)]["cut_after"] for k in ("far", "mixed", "random")))}


@pytest.mark.parametrize("ranks,per_node", [(6, 4), (7, 2)])
def test_unequal_nodes(placement, ranks, per_node):
    # 6 ranks in nodes of 4: {0..3} {4,5}; 7 in nodes of 2: the last node holds one rank
    # (and the mixed graph's middle vertex 3 is isolated)
    _, found = run(placement, ranks, per_node, ["mixed:1:1", "far:1:1", "random:1:1"], env=ROLES)
    mixed = found[("mixed", 1, 1)]
    assert mixed["cut_before"] > 0 and mixed["cut_after"] == 0, mixed  # the pairs all fit
    assert found[("far", 1, 1)]["cut_after"] < found[("far", 1, 1)]["cut_before"]
    assert found[("random", 1, 1)]["cut_after"] <= found[("random", 1, 1)]["cut_before"]
    for r in found.values():
        assert r["stat_calls"] == 1 and r["stat_after"] == r["cut_after"], r


def test_one_pretended_node_changes_nothing(placement):
    _, found = run(placement, 4, 4, ["far:1:1"], env=ROLES)
    assert_untouched(found[("far", 1, 1)])


def test_real_nodes_one_machine(placement):
    # without COMMLIB_RANKS_PER_NODE the nodes are the shared-memory domains: one here
    _, found = run(placement, 4, 0, ["far:1:1", "random:1:1"], env=ROLES)
    for r in found.values():
        assert_untouched(r)


def test_same_placement_every_run(placement):
    maps = [{key: r["map"] for key, r in run(placement, 8, 2, ["random:1:1", "far:1:1"], seed=11, env=ROLES)[1].items()}
            for _ in range(2)]
    assert maps[0] == maps[1]


@pytest.mark.parametrize("env", [{"COMMLIB_PLACEMENT": "0"}, {"COMMLIB_DISABLE": "1"},
                                 {"COMMLIB_PLACEMENT": "1", "COMMLIB_DISABLE": "1"}])
def test_knobs_leave_it_to_the_mpi(placement, env):
    _, found = run(placement, 4, 2, ["far:1:1"], env=env, semantics="own")
    assert_untouched(found[("far", 1, 1)])


@pytest.mark.parametrize("ranks,per_node", [(4, 2), (8, 2), (8, 4), (7, 2)])
def test_default_keeps_each_process_its_own_edges(placement, ranks, per_node):
    """The standard's semantics by default: the program checks that each process's
    queries return the lists it passed (in new ranks) with their weights, and that the
    neighbour all-to-all and all-gather arrive from the processes it named; the results
    equal the host MPI's own, process by process."""
    _, mine = run(placement, ranks, per_node, EVERY_SCENARIO, env={"COMMLIB_STATS": "1"})
    _, host = run(placement, ranks, per_node, EVERY_SCENARIO, preload=False)
    for key, r in mine.items():
        assert r["stat_calls"] == 0 and r["cut_after"] == r["cut_before"], r
        h = host[key]
        assert (r["map"], r["cut_before"], r["cut_after"], r["checks"]) == \
            (h["map"], h["cut_before"], h["cut_after"], h["checks"]), (r, h)


def test_program_right_without_commlib(placement):
    # the same checks pass under the bare MPI, which may or may not reorder
    _, found = run(placement, 8, 2, EVERY_SCENARIO, preload=False, semantics="own")
    for r in found.values():
        assert r["stat_calls"] == -1, r
    for key in (("far", 0, 1),):
        assert_untouched(found[key], with_commlib=False)
