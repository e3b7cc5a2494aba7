"""`lvlmlp extract --ray` (Ray Data) on a local 2-CPU Ray instance started for this module: the same run folder as
the single-process extractor (tiny LLaVA and Qwen2-VL), a replica killed mid-run, the driver SIGKILLed mid-run."""

from __future__ import annotations

import json
import logging
import os
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
from test_extract import make_manifest

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


def test_llava_on_ray_equals_single_process_even_with_a_replica_killed(tiny_ckpt, tmp_path, ray_address,
                                                                       monkeypatch):
    manifest = make_manifest(tmp_path, 8)
    args = _extract_args(tiny_ckpt("llava"), manifest, "--batch-size", "2", "--shard-size", "2",
                         "--max-new-tokens", "2", "--hidden", "--layers", "0,-1")
    assert main([*args, "--out", str(tmp_path / "single"), "--workers", "0"]) == 0
    marker = tmp_path / "exited"
    monkeypatch.setenv(FAIL_ONCE_ENV, f"1:{marker}")  # the replica running batch 1 exits (os._exit), once
    assert main([*args, "--out", str(tmp_path / "ray"), "--ray"]) == 0
    assert marker.exists()  # a replica did die mid-run; Ray restarted it and ran its batch again
    run = open_run(tmp_path / "ray")
    assert run.ids == [f"r{i}" for i in range(8)]  # every row once, in manifest order
    assert run.manifest["replicas"] == 2  # one per CPU of the 2-CPU instance
    assert_same_run(tmp_path / "ray", tmp_path / "single")


def test_qwen2_vl_on_ray_equals_single_process(tiny_ckpt, tmp_path, ray_address):
    manifest = make_manifest(tmp_path, 5)
    args = _extract_args(tiny_ckpt("qwen2_vl"), manifest, "--batch-size", "2", "--hidden")
    assert main([*args, "--out", str(tmp_path / "single"), "--workers", "0"]) == 0
    assert main([*args, "--out", str(tmp_path / "ray"), "--ray", "--ray-replicas", "1"]) == 0
    assert_same_run(tmp_path / "ray", tmp_path / "single")
    assert open_run(tmp_path / "ray").manifest["replicas"] == 1


def test_driver_killed_mid_run_then_rerun_completes(tiny_ckpt, tmp_path, ray_address):
    manifest = make_manifest(tmp_path, 16)
    args = _extract_args(tiny_ckpt("llava"), manifest, "--batch-size", "2", "--shard-size", "2")
    on_ray = ["--ray-replicas", "1", "--ray"]  # one replica: fewer processes competing for the 2 CPUs
    out = tmp_path / "ray"
    # A separate driver joins this module's Ray instance; it is SIGKILLed once its first shard is committed.
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
    committed = len(list((out / "shards").glob("*.safetensors")))
    assert 1 <= committed < 8
    assert main([*args, "--out", str(out), *on_ray]) == 0  # resumes: the committed rows are skipped
    assert main([*args, "--out", str(tmp_path / "single"), "--workers", "0"]) == 0
    assert_same_run(out, tmp_path / "single")
    assert open_run(out).ids == [f"r{i}" for i in range(16)]


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
    from test_experiment import CONFIG

    manifest = tiny_manifest(tmp_path / "data")
    argv = ["run", str(CONFIG), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"),
            "--no-progress", "--set", f"data_root={manifest}", "--set", "ray={replicas: 0}"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == "lvlmlp: error: config: ray.replicas: must be >= 1, got 0"
    assert not (tmp_path / "out" / "runs").exists() or not any((tmp_path / "out" / "runs").iterdir())


def test_lvlmlp_run_on_ray_equals_the_run_in_process(tiny_ckpt, tmp_path, ray_address):
    """A whole `lvlmlp run` with `ray:` in its config: every extraction step runs on Ray, its run folders equal those
    of the same config run in this process, and the report's metrics are the same."""
    from lvlmlp.testing import tiny_manifest
    from test_experiment import CONFIG

    manifest = tiny_manifest(tmp_path / "data", n_train=8, n_test=8)
    base = ["run", str(CONFIG), "--model", str(tiny_ckpt("llava")), "--no-progress", "--set", f"data_root={manifest}",
            "--set", "prompt=oe", "--set", "n_boot=0", "--set", "extract.max_new_tokens=2"]
    assert main([*base, "--out", str(tmp_path / "ray"), "--set", f"ray={{address: '{ray_address}', replicas: 1}}"]) == 0
    assert main([*base, "--out", str(tmp_path / "here")]) == 0
    runs = sorted(p.name for p in (tmp_path / "here" / "runs").iterdir())
    assert runs and sorted(p.name for p in (tmp_path / "ray" / "runs").iterdir()) == runs
    for name in runs:
        assert_same_run(tmp_path / "ray" / "runs" / name, tmp_path / "here" / "runs" / name)
    metrics = [json.loads((tmp_path / out / "report" / "metrics.json").read_text()) for out in ("ray", "here")]
    assert metrics[1]["evaluations"] and metrics[0]["evaluations"].keys() == metrics[1]["evaluations"].keys()
    for name, ev in metrics[1]["evaluations"].items():
        assert metrics[0]["evaluations"][name]["auroc"] == pytest.approx(ev["auroc"], abs=1e-6), name
