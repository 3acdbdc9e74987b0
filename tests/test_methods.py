"""Send/receive methods for device buffers (native/transfer/model.h), the model that
picks one, its file, and `commlib measure`.

Runs on the stand-in CUDA driver (tests/c/fake_cuda.c): no kernels, so every method
takes its host-side fallbacks, and "device" memory the CPU cannot touch, so a device
pointer handed to the host MPI would crash.  For `aware`, FAKE_CUDA_HOST_VISIBLE=1 makes
device memory readable and COMMLIB_CUDA_AWARE=1 makes the library believe the MPI takes
device pointers.  Every run of tests/c/p2p_device.c compares each received buffer with
what the host MPI makes of the message (Send/Recv/Isend/Irecv/Sendrecv, contiguous and
derived types)."""
import json
import os
import re
import subprocess

import pytest

from commlib import measure
from harness import build_c, commlib_cli, gpu_count, run_mpi

COUNTERS = ("send_oneshot", "send_device", "send_aware", "recv_oneshot", "recv_device", "recv_aware", "handed_off")
METHOD_COUNTERS = COUNTERS[:6]


@pytest.fixture(scope="module")
def p2p_device(tmp_path_factory):
    return build_c("tests/c/p2p_device.c", tmp_path_factory.mktemp("p2p_device"))


def run_p2p(exe, out_dir, env, ranks=2):
    """Runs p2p_device; asserts every buffer arrived right; returns (per-rank method
    counters, stderr)."""
    prefix = out_dir / "p2p"
    proc = run_mpi(ranks, [exe, str(prefix)], env={"COMMLIB_STATS": "1", "COMMLIB_STAGE_HOST": "0", **env})
    text = "\n".join((out_dir / f"p2p.{r}").read_text() for r in range(ranks) if (out_dir / f"p2p.{r}").exists())
    assert proc.returncode == 0, f"rc={proc.returncode}\n{text}\n{proc.stdout}\n{proc.stderr}"
    assert "skipped" not in text and "FAIL" not in text, text
    assert text.count("done failures=0") == ranks, text
    assert len(re.findall(r"ok=1", text)) >= 50 * ranks // 2, text
    counts = [dict(zip(COUNTERS, map(int, m))) for m in re.findall(
        r"stats: rank \d+ .* " + " ".join(f"{c}=(\\d+)" for c in COUNTERS), text)]
    assert len(counts) == ranks, text
    return counts, proc.stderr


def probe(env):
    """The library's model as a 1-rank MPI process sees it, and that run's stderr."""
    argv = [*commlib_cli(), "run", "-n", "1", "--", measure.paths.example_binary("measure_methods"), "--probe"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=dict(os.environ, **env))
    line = next((line for line in proc.stdout.splitlines() if line.startswith("# model=")), None)
    assert line, proc.stdout + proc.stderr
    return json.loads(line[len("# model="):]), proc.stderr


def model_file(path, gpu="fake_cuda", mpi=None, rows=()):
    mpi = mpi if mpi is not None else probe({"COMMLIB_MODEL": "0"})[0]["mpi"]
    path.write_text("# test model\ncommlib-model 1\n"
                    f"gpu {gpu}\nmpi {mpi}\ncommlib 0.1.0\n" + "".join(f"{r}\n" for r in rows))
    return str(path)


def linear(method, latency, per_kib, directions=("send", "recv"), layouts=("contig", "derived")):
    return [f"{d} {method} {layout} {size} {latency + per_kib * size / 1024:.3f}"
            for d in directions for layout in layouts for size in (1024, 1 << 20)]


@pytest.mark.parametrize("method", ["oneshot", "device"])
def test_forced_method_moves_the_right_bytes(p2p_device, fake_cuda_env, method, tmp_path):
    counts, _ = run_p2p(p2p_device, tmp_path, {**fake_cuda_env, "COMMLIB_METHOD": method})
    for c in counts:
        assert c[f"send_{method}"] > 20 and c[f"recv_{method}"] > 20, counts
        assert sum(c[k] for k in METHOD_COUNTERS) == c[f"send_{method}"] + c[f"recv_{method}"], counts
        assert c["handed_off"] == 0, counts


@pytest.mark.parametrize("method", ["oneshot", "device", "auto"])
def test_methods_on_a_gpu(p2p_device, method, tmp_path):
    """Real kernels: pack into mapped pinned memory, into device staging, unpack from both."""
    if gpu_count() < 1:
        pytest.skip("no GPU (libcuda.so.1 with a device)")
    counts, _ = run_p2p(p2p_device, tmp_path, {"COMMLIB_METHOD": method, "COMMLIB_MODEL": "0"})
    for c in counts:
        if method != "auto":
            assert c[f"send_{method}"] > 20 and c[f"recv_{method}"] > 20, counts
        assert sum(c[k] for k in METHOD_COUNTERS) > 40 and c["handed_off"] == 0, counts


@pytest.mark.parametrize("method", ["aware", "auto"])
def test_aware_hands_device_buffers_to_a_cuda_aware_mpi(p2p_device, fake_cuda_env, method, tmp_path):
    env = {**fake_cuda_env, "FAKE_CUDA_HOST_VISIBLE": "1", "COMMLIB_CUDA_AWARE": "1", "COMMLIB_METHOD": method,
           "COMMLIB_MODEL": "0"}
    counts, stderr = run_p2p(p2p_device, tmp_path, env)
    for c in counts:
        assert c["send_aware"] >= 10 and c["recv_aware"] >= 10, counts
        if method == "aware":  # contiguous messages went to the MPI unstaged, derived ones as device staging
            assert 0 < c["handed_off"] < c["send_aware"] + c["recv_aware"], counts
            assert c["send_aware"] + c["recv_aware"] == sum(c[k] for k in METHOD_COUNTERS), counts
        else:  # built-in curves: contiguous messages handed off, small derived ones oneshot
            assert c["handed_off"] == c["send_aware"] + c["recv_aware"], counts
            assert c["send_oneshot"] > 0 and c["recv_oneshot"] > 0 and c["send_device"] == 0, counts
    assert "cuda-aware=1 (COMMLIB_CUDA_AWARE=1)" in stderr and re.search(r"handed-off=[1-9]", stderr), stderr


def test_aware_is_refused_when_the_mpi_is_not_cuda_aware(p2p_device, fake_cuda_env, tmp_path):
    """Device memory the CPU cannot touch: handing it to the MPI would crash the run."""
    model, _ = probe({**fake_cuda_env, "COMMLIB_MODEL": "0"})
    if model["cuda_aware"]:
        pytest.skip(f"this MPI is CUDA-aware ({model['cuda_aware_how']})")
    counts, stderr = run_p2p(p2p_device, tmp_path, {**fake_cuda_env, "COMMLIB_METHOD": "aware", "COMMLIB_MODEL": "0"})
    assert "COMMLIB_METHOD=aware but the MPI is not CUDA-aware" in stderr, stderr
    for c in counts:
        assert c["send_aware"] == c["recv_aware"] == c["handed_off"] == 0 and c["send_oneshot"] > 0, counts


@pytest.mark.parametrize("cheap", ["oneshot", "device"])
def test_the_choice_follows_the_model_file(p2p_device, fake_cuda_env, cheap, tmp_path):
    other = "device" if cheap == "oneshot" else "oneshot"
    path = model_file(tmp_path / "model.txt", rows=linear(cheap, 1, 0.001) + linear(other, 50, 1))
    counts, stderr = run_p2p(p2p_device, tmp_path, {**fake_cuda_env, "COMMLIB_MODEL": path})
    for c in counts:
        assert c[f"send_{cheap}"] > 20 and c[f"recv_{cheap}"] > 20, counts
        assert c[f"send_{other}"] == c[f"recv_{other}"] == 0, counts
    assert f"method model from file: {path}" in stderr, stderr


def test_mixed_methods_in_one_sendrecv_replace(p2p_device, fake_cuda_env, tmp_path):
    """Sends handed to the (believed) CUDA-aware MPI as they are, receives staged."""
    rows = linear("aware", 1, 0.001, directions=("send",)) + linear("oneshot", 1, 0.001, directions=("recv",)) + \
        linear("aware", 90, 1, directions=("recv",)) + linear("oneshot", 90, 1, directions=("send",))
    path = model_file(tmp_path / "model.txt", rows=rows)
    env = {**fake_cuda_env, "FAKE_CUDA_HOST_VISIBLE": "1", "COMMLIB_CUDA_AWARE": "1", "COMMLIB_MODEL": path}
    counts, _ = run_p2p(p2p_device, tmp_path, env)
    for c in counts:
        assert c["send_aware"] > 10 and c["recv_oneshot"] > 10 and c["send_oneshot"] == c["recv_aware"] == 0, counts


def test_crossover_between_measured_sizes(fake_cuda_env, tmp_path):
    """oneshot 10 us + 1 us/KiB, device 50 us + 0.1 us/KiB: equal at 44.4 KiB."""
    path = model_file(tmp_path / "model.txt", rows=linear("oneshot", 10, 1) + linear("device", 50, 0.1))
    model, stderr = probe({**fake_cuda_env, "COMMLIB_MODEL": path})
    assert model["model"] == "file" and model["path"] == path, (model, stderr)
    picks = {(c["direction"], c["layout"], c["bytes"]): (c["method"], c["us"]) for c in model["choices"]}
    assert picks[("send", "contig", 1024)] == ("oneshot", 11.0)
    assert picks[("recv", "derived", 65536)][0] == "device"
    assert picks[("send", "derived", 1 << 20)] == ("device", pytest.approx(152.4))
    # beyond the largest size: the slope of the last two
    assert picks[("recv", "contig", 64 << 20)] == ("device", pytest.approx(50 + 0.1 * 65536))


def test_builtin_curves_copy_contiguous_messages(fake_cuda_env):
    """Without a file, a contiguous device message takes one copy (device) at every size - a
    copy and its wait start sooner than a launch and its wait - and a small derived one the
    oneshot kernel (no copy after the pack); large derived ones the device method."""
    model, _ = probe({**fake_cuda_env, "COMMLIB_MODEL": "0", "COMMLIB_CUDA_AWARE": "0"})
    picks = {(c["direction"], c["layout"], c["bytes"]): c["method"] for c in model["choices"]}
    sizes = sorted({b for _, _, b in picks})
    assert sizes[0] <= 1024 and sizes[-1] >= 1 << 20, sizes
    for d in ("send", "recv"):
        assert all(picks[(d, "contig", b)] == "device" for b in sizes), picks
        assert picks[(d, "derived", sizes[0])] == "oneshot" and picks[(d, "derived", sizes[-1])] == "device", picks


@pytest.mark.parametrize("case", ["malformed-line", "not-a-model", "foreign-gpu", "foreign-mpi", "no-rows"])
def test_a_bad_or_foreign_file_gives_a_warning_and_the_defaults(fake_cuda_env, case, tmp_path):
    path = tmp_path / "model.txt"
    rows = linear("device", 1, 0.001)
    if case == "malformed-line":
        model_file(path, rows=rows[:3] + ["send device contig 4096 fast"] + rows[3:])
        why = "malformed (line 9: bad time)"
    elif case == "not-a-model":
        path.write_text("gpu fake_cuda\n")
        why = "not a commlib model file"
    elif case == "foreign-gpu":
        model_file(path, gpu="NVIDIA H200", rows=rows)
        why = 'measured on GPU "NVIDIA H200", this is "fake_cuda"'
    elif case == "foreign-mpi":
        model_file(path, mpi="Open MPI v9.9", rows=rows)
        why = 'measured with MPI "Open MPI v9.9"'
    else:
        model_file(path)
        why = "no measurements"
    model, stderr = probe({**fake_cuda_env, "COMMLIB_MODEL": str(path)})
    assert model["model"] == "built-in" and why in model["note"], model
    assert "warning: method model ignored" in stderr and why in stderr, stderr
    builtin, _ = probe({**fake_cuda_env, "COMMLIB_MODEL": "0"})
    assert model["choices"] == builtin["choices"]
    assert "COMMLIB_MODEL=0" in builtin["note"]


def test_measure_writes_a_file_the_library_reads(fake_cuda_env, tmp_path):
    path = tmp_path / "cache" / "model.txt"
    env = dict(os.environ, **fake_cuda_env)
    proc = subprocess.run([*commlib_cli(), "measure", "--quick", "--sizes", "1024,16384", "--output", str(path)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"wrote {path}" in proc.stdout, proc.stdout
    lines = path.read_text().splitlines()
    assert "commlib-model 1" in lines and "gpu fake_cuda" in lines, lines
    points = [line.split() for line in lines if line.startswith(("send ", "recv "))]
    # 2 methods (the MPI is not CUDA-aware) x 2 directions x 2 layouts x 2 sizes
    assert {(p[0], p[1], p[2], p[3]) for p in points} == {
        (d, m, layout, s) for d in ("send", "recv") for m in ("oneshot", "device") for layout in ("contig", "derived")
        for s in ("1024", "16384")}, points
    assert all(float(p[4]) > 0 for p in points)
    info = subprocess.run([*commlib_cli(), "info"], capture_output=True, text=True, timeout=120,
                          env=dict(env, COMMLIB_MODEL=str(path)))
    assert info.returncode == 0, info.stderr
    assert f"method model    : file {path}" in info.stdout, info.stdout
    assert "CUDA-aware MPI  : no" in info.stdout or "CUDA-aware MPI  : yes" in info.stdout


def test_measure_without_a_gpu_writes_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    if subprocess.run(["python3", "-c", "import ctypes; ctypes.CDLL('libcuda.so.1')"], env=env).returncode == 0:
        pytest.skip("a CUDA driver is installed here")
    path = tmp_path / "model.txt"
    proc = subprocess.run([*commlib_cli(), "measure", "--output", str(path)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0 and "no GPU" in proc.stdout and not path.exists(), proc.stdout + proc.stderr


def test_default_model_path_follows_xdg(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path), "HOME": "/nonexistent"}
    assert measure.default_model_path(env) == str(tmp_path / "commlib" / f"model-{measure.socket.gethostname()}.txt")
    assert measure.model_path(dict(env, COMMLIB_MODEL="/x/y.txt")) == "/x/y.txt"
    assert measure.model_path(dict(env, COMMLIB_MODEL="0")) == measure.default_model_path(env)
    model, _ = probe({"XDG_CACHE_HOME": str(tmp_path), "COMMLIB_MODEL": "auto"})
    assert model["path"] == measure.default_model_path(env)
