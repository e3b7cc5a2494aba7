"""`lvlmlp extract --ray` (Ray Data) on a local 2-CPU Ray instance started for this module: the same run folder as
the single-process extractor (tiny LLaVA and Qwen2-VL), a replica killed mid-run, the driver SIGKILLed mid-run."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from lvlmlp.cli import main
from lvlmlp.extraction.ray_extract import FAIL_ONCE_ENV, RayOptions, ray_options
from lvlmlp.extraction.store import open_run
from tests.extraction.test_extract import make_manifest

# Manifest keys that legitimately differ between the two engines (when, where, how wide).
ENGINE_KEYS = {"created_at", "device", "engine", "replicas"}


@pytest.fixture(scope="module")
def ray_address() -> str:
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _extract_args(ckpt: Path, manifest: Path, *extra: str) -> list[str]:
    return ["extract", "--model", str(ckpt), "--data", str(manifest), "--device", "cpu", "--store-dtype", "float32",
            "--no-progress", *extra]


def assert_same_run(ray_dir: Path, single_dir: Path) -> None:
    """Same rows in the same order, same metadata and settings, same arrays (float32, 1e-5: the replicas run the same
    batches with the same code, one torch thread each, but we state a tolerance rather than rely on bits)."""
    on_ray, single = open_run(ray_dir), open_run(single_dir)
    assert on_ray.meta == single.meta
    assert {k: v for k, v in on_ray.manifest.items() if k not in ENGINE_KEYS} == {
        k: v for k, v in single.manifest.items() if k not in ENGINE_KEYS
    }
    names = sorted(p.name for p in single_dir.glob("*.npy"))
    assert sorted(p.name for p in ray_dir.glob("*.npy")) == names
    for name in names:
        a, b = np.load(ray_dir / name), np.load(single_dir / name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=name)
    assert on_ray.manifest["engine"] == "ray"
    assert "engine" not in single.manifest


def test_driver_killed_then_rerun_with_a_replica_killed_equals_single_process(tiny_ckpt, tmp_path, ray_address,
                                                                              monkeypatch, caplog):
    """The two faults of a Ray run, one after the other (one test: each Ray extraction starts model replicas, ~10 s
    here): the driver SIGKILLed once its first shard is committed, then the same command re-run, during which a
    replica dies (os._exit) and Ray restarts it and runs its batch again. The run folder equals the single-process
    run's: every row once, in manifest order, the committed rows not redone."""
    manifest = make_manifest(tmp_path, 16)
    args = _extract_args(tiny_ckpt("llava"), manifest, "--batch-size", "2", "--shard-size", "2",
                         "--max-new-tokens", "2", "--hidden", "--layers", "0,-1")
    out = tmp_path / "ray"
    on_ray = ["--ray-replicas", "1", "--ray"]  # one replica: fewer processes competing for the 2 CPUs
    # A separate driver joins this module's Ray instance.
    proc = subprocess.Popen([sys.executable, "-m", "lvlmlp.cli", *args, "--out", str(out), *on_ray, ray_address],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 150
    while proc.poll() is None and time.time() < deadline and not list((out / "shards").glob("*.safetensors")):
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    committed = len(list((out / "shards").glob("*.safetensors")))  # 2 rows each
    assert 1 <= committed < 8
    marker = tmp_path / "exited"
    monkeypatch.setenv(FAIL_ONCE_ENV, f"0:{marker}")  # the replica running the re-run's first batch exits, once
    with caplog.at_level(logging.INFO, logger="lvlmlp"):
        assert main([*args, "--out", str(out), *on_ray]) == 0
    assert f"on Ray: 16 rows, {16 - 2 * committed} to do," in caplog.text  # the committed rows are not redone
    assert marker.exists()  # a replica did die mid-run; Ray restarted it and ran its batch again
    run = open_run(out)
    assert run.ids == [f"r{i}" for i in range(16)]  # every row once, in manifest order
    assert main([*args, "--out", str(tmp_path / "single"), "--workers", "0"]) == 0
    assert_same_run(out, tmp_path / "single")


def test_replicas_default_to_one_per_cpu_or_gpu_capped_at_the_batches(ray_address):
    """The plan of a run on this module's 2-CPU instance, without starting replicas: (replicas, CPUs, GPUs each)."""
    from lvlmlp.extraction.ray_extract import _plan

    assert _plan(ray, RayOptions(), "cpu", 8) == (2, 1.0, 0.0)  # one per CPU
    assert _plan(ray, RayOptions(), "auto", 1) == (1, 1.0, 0.0)  # no more replicas than batches
    assert _plan(ray, RayOptions(cpus_per_replica=2), "cpu", 8) == (1, 2.0, 0.0)
    assert _plan(ray, RayOptions(replicas=3), "cpu", 2) == (2, 1.0, 0.0)  # as asked, at most one per batch
    with pytest.raises(Exception, match=r"--device cuda: the Ray cluster has no GPU \(resources: "):
        _plan(ray, RayOptions(), "cuda", 8)


def test_the_reachability_check_accepts_a_real_cluster(ray_address):
    """`check_reachable` (run before `ray.init` joins an address) lets a real Ray cluster's GCS through, at its
    address as given and as a Ray Client-style ray:// address of the same port."""
    from lvlmlp.extraction.ray_extract import check_reachable

    assert check_reachable(ray_address, 5) is None
    assert check_reachable(f"ray://{ray_address}", 5) is None


def test_options_and_errors(tmp_path, monkeypatch, capsys):
    assert ray_options(True) == RayOptions()
    assert ray_options("auto", replicas=3) == RayOptions(address="auto", replicas=3)
    assert ray_options({"address": "local", "cpus_per_replica": 2}) == RayOptions(cpus_per_replica=2)
    with pytest.raises(Exception, match="ray: unknown key 'replica'"):
        ray_options({"replica": 2})
    with pytest.raises(Exception, match=r"ray.replicas: expected an integer >= 1, got 0"):
        ray_options({"replicas": 0})
    manifest = make_manifest(tmp_path, 2)
    args = _extract_args(tmp_path / "no-model", manifest, "--out", str(tmp_path / "o"))
    assert main([*args, "--ray-replicas", "2"]) == 2
    assert capsys.readouterr().err.strip() == "lvlmlp: error: --ray-replicas applies to --ray [ADDRESS] only"
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the optional extra were not installed
    assert main([*args, "--ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "lvlmlp: error: --ray needs Ray Data: pip install 'lvlmlp[ray]' (or pip install 'ray[data]')"
    assert not (tmp_path / "o").exists()


def test_run_config_ray_section_reaches_the_ray_extractor(tmp_path, capsys):
    """`ray:` in a `lvlmlp run` config is read by the Ray extractor (a bad value fails before any model work)."""
    from lvlmlp.testing import tiny_manifest
    from tests.study.test_experiment import CONFIG

    manifest = tiny_manifest(tmp_path / "data")
    argv = ["run", str(CONFIG), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"),
            "--no-progress", "--set", f"data_root={manifest}", "--set", "ray={replicas: 0}"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == "lvlmlp: error: config: ray.replicas: must be an integer >= 1, got 0"
    assert not (tmp_path / "out" / "runs").exists() or not any((tmp_path / "out" / "runs").iterdir())


def test_lvlmlp_run_on_ray_equals_the_run_in_process(tiny_ckpt, tmp_path, ray_address):
    """A whole `lvlmlp run` with `ray:` in its config, on tiny Qwen2-VL (LLaVA is the other test's): its extraction
    step runs on Ray, its run folder equals that of the same config run in this process, and the report's metrics
    are the same (one cross-validated split, so one extraction: each starts a model replica, ~10 s here)."""
    from lvlmlp.testing import tiny_manifest
    from tests.study.test_experiment import CONFIG

    manifest = tiny_manifest(tmp_path / "data", n_train=0, n_test=8)
    base = ["run", str(CONFIG), "--model", str(tiny_ckpt("qwen2_vl")), "--no-progress", "--set",
            f"data_root={manifest}", "--set", "prompt=oe", "--set", "n_boot=0", "--set", "extract.max_new_tokens=2",
            "--set", "splits={cv: 2, split: test}"]
    assert main([*base, "--out", str(tmp_path / "ray"), "--set", f"ray={{address: '{ray_address}', replicas: 1}}"]) == 0
    assert main([*base, "--out", str(tmp_path / "here")]) == 0
    runs = sorted(p.name for p in (tmp_path / "here" / "runs").iterdir())
    assert len(runs) == 1 and sorted(p.name for p in (tmp_path / "ray" / "runs").iterdir()) == runs
    assert_same_run(tmp_path / "ray" / "runs" / runs[0], tmp_path / "here" / "runs" / runs[0])
    assert open_run(tmp_path / "ray" / "runs" / runs[0]).manifest["replicas"] == 1
    metrics = [json.loads((tmp_path / out / "report" / "metrics.json").read_text()) for out in ("ray", "here")]
    assert metrics[1]["evaluations"] and metrics[0]["evaluations"].keys() == metrics[1]["evaluations"].keys()
    for name, ev in metrics[1]["evaluations"].items():
        assert metrics[0]["evaluations"][name]["auroc"] == pytest.approx(ev["auroc"], abs=1e-6), name


# `extract --ray ADDRESS` / `run --set ray=ADDRESS` where no cluster answers: a one-line error within the bound
# (the checks run before `ray.init`).

def _refused_port() -> int:
    """A port of this machine that nothing listens on (bound, then closed: connecting to it is refused)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_cluster_fails_fast_naming_the_address(tmp_path, capsys, monkeypatch):
    """`extract --ray HOST:PORT` and `run --set ray=HOST:PORT` where nothing answers: a one-line error naming the
    address within the bound (`ray.init` alone retried for many minutes); no Ray is started, nothing is written."""
    from lvlmlp.testing import tiny_manifest
    from tests.study.test_experiment import CONFIG

    # This process looks unconnected to Ray: `ray_address` (this module's local instance) may be up, and
    # ray_session would use it, whatever the address. No `ray.init` may be reached.
    inits: list = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: inits.append((args, kwargs)))
    address = f"127.0.0.1:{_refused_port()}"
    manifest = make_manifest(tmp_path, 2)
    args = _extract_args(tmp_path / "no-model", manifest, "--out", str(tmp_path / "o"))
    started = time.monotonic()
    assert main([*args, "--ray", address, "--ray-timeout", "5"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"lvlmlp: error: --ray: cannot join the Ray cluster at {address!r}: Connection refused")
    assert main([*args, "--ray", "ray://" + address]) == 2
    assert f"cannot join the Ray cluster at 'ray://{address}': Connection refused" in capsys.readouterr().err
    assert main([*args, "--ray-timeout", "5"]) == 2
    assert capsys.readouterr().err.strip() == "lvlmlp: error: --ray-timeout applies to --ray [ADDRESS] only"
    assert main([*args, "--ray", address, "--ray-timeout", "0"]) == 2
    assert "ray.connect_timeout (--ray-timeout): expected a number of seconds > 0, got 0.0" in capsys.readouterr().err
    data = tiny_manifest(tmp_path / "data")
    argv = ["run", str(CONFIG), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"),
            "--no-progress", "--set", f"data_root={data}", "--set", f"ray={address}"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().endswith(f"cannot join the Ray cluster at {address!r}: Connection refused")
    assert time.monotonic() - started < 20
    assert inits == [] and not (tmp_path / "o").exists()


def test_a_cluster_that_never_answers_fails_within_the_timeout():
    """A listening socket whose backlog is full accepts no more connections: the wait ends at --ray-timeout."""
    import socket

    from lvlmlp.errors import LvlmlpError
    from lvlmlp.extraction.ray_extract import check_reachable

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    address = f"127.0.0.1:{server.getsockname()[1]}"
    fillers = []
    try:
        for _ in range(8):  # fill the accept queue: the next connection attempt then waits unanswered
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", server.getsockname()[1]))
            fillers.append(filler)
        started = time.monotonic()
        with pytest.raises(LvlmlpError, match=re.escape(f"--ray: cannot join the Ray cluster at {address!r}: no "
                                                        "answer within 0.5 s (--ray-timeout, ray.connect_timeout)")):
            check_reachable(address, 0.5)
        assert time.monotonic() - started < 5
    finally:
        for filler in fillers:
            filler.close()
        server.close()


def test_a_server_that_is_no_ray_cluster_is_refused_within_the_timeout():
    """Something listens but is no gRPC server (Ray's GCS answers the HTTP/2 preface with its SETTINGS frame):
    silent, or answering HTTP/1; `ray.init` would retry it for many minutes."""
    import socket
    import threading

    from lvlmlp.errors import LvlmlpError
    from lvlmlp.extraction.ray_extract import check_reachable

    for reply, reason in [(None, "no answer within 0.5 s (--ray-timeout, ray.connect_timeout)"),
                          (b"HTTP/1.1 400 Bad Request\r\n\r\n", "what answers there is no Ray cluster (not a gRPC "
                                                                "server)")]:
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        address = f"127.0.0.1:{server.getsockname()[1]}"
        accepted = []

        def serve(reply=reply, server=server, accepted=accepted):
            conn, _ = server.accept()
            accepted.append(conn)
            conn.recv(100)
            if reply is not None:
                conn.sendall(reply)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        started = time.monotonic()
        try:
            with pytest.raises(LvlmlpError, match=re.escape(f"cannot join the Ray cluster at {address!r}: {reason}")):
                check_reachable(address, 0.5)
            assert time.monotonic() - started < 5
        finally:
            thread.join(5)
            for conn in accepted:
                conn.close()
            server.close()
