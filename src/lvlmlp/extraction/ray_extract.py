"""Extraction on a Ray cluster with Ray Data, into the same run folders as `extract` (and resumable the same way).

The pending rows, cut into exactly the batches the single-process extractor would run, become a Ray dataset with one
item per batch. `map_batches` hands the items to a pool of `_Replica` actors (one model replica per GPU, or per CPU
slot without GPUs); each loads the backend once, then prepares a batch (images, processor) and runs the model with
the extractor's own code. The driver streams the results back in batch order (`iter_batches`) into the same
`RunWriter`: atomic shards, the manifest's identity check, resume by skipping committed rows.

Why the driver writes (rather than each actor writing shards): it needs no filesystem shared by the nodes, the shards
stay in manifest order, and Ray Data's streaming executor keeps only a few batches in flight (backpressure), so the
driver holds a handful of batches at a time whatever the number of rows. A batch of logits is a few MB (8 rows x
152k vocabulary in float16 = 2.4 MB); bench/extract_ray.py measures Ray's per-batch overhead, transfer included.

Faults: an actor that dies is restarted by Ray and its batch run again (Ray Data's actor pool defaults:
max_restarts=-1, max_task_retries=-1); results are committed in batch order, so no row is lost or written twice.
A killed driver leaves whole committed shards (the job's actors die with it); re-running the command resumes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.extract import batches_of, numbered_rows, run_settings
from lvlmlp.extraction.options import ExtractOptions
from lvlmlp.extraction.spec import BackendSpec
from lvlmlp.extraction.store import Run, RunWriter, identity

log = logging.getLogger("lvlmlp")

# Fault-injection hook for the tests: "B:MARKER" makes the replica that runs batch B exit at once (os._exit), the
# first time only (the marker file records that it happened).
FAIL_ONCE_ENV = "LVLMLP_RAY_TEST_EXIT"
_MISSING = "--ray needs Ray Data: pip install 'lvlmlp[ray]' (or pip install 'ray[data]')"


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide: `ray:` in a `lvlmlp run` config takes these keys."""

    address: str | None = None  # None: a local Ray instance for this run; "auto" or an address: join that cluster
    replicas: int | None = None  # default: one per GPU of the cluster, else one per `cpus_per_replica` CPUs
    cpus_per_replica: float = 1.0  # also the torch threads of a CPU replica
    gpus_per_replica: float | None = None  # default: 1 where the cluster has GPUs and the device is not cpu
    connect_timeout: float = 30.0  # seconds to wait for the cluster at `address` to answer before giving up


def ray_options(value: Any, replicas: int | None = None, connect_timeout: float | None = None) -> RayOptions:
    """RayOptions from `--ray [ADDRESS]` (+ `--ray-replicas`) or a config's `ray:` value: true / "local" (a local
    instance), "auto" or an address (join), or a mapping of RayOptions' keys."""
    keys = [f.name for f in fields(RayOptions)]
    if isinstance(value, RayOptions):
        opts = {k: getattr(value, k) for k in keys}
    elif value is True or value == "local":
        opts = {}
    elif isinstance(value, str) and value:
        opts = {"address": value}
    elif isinstance(value, Mapping):
        unknown = sorted(set(value) - set(keys))
        if unknown:
            raise LvlmlpError(f"ray: unknown key {unknown[0]!r} (keys: {', '.join(keys)})")
        opts = dict(value)
    else:
        raise LvlmlpError(f"ray: expected true, local, auto, an address or a mapping of {', '.join(keys)}; "
                          f"got {value!r}")
    if opts.get("address") in ("local", ""):
        opts["address"] = None
    if replicas is not None:
        opts["replicas"] = replicas
    if connect_timeout is not None:
        opts["connect_timeout"] = connect_timeout
    n = opts.get("replicas")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise LvlmlpError(f"ray.replicas: expected an integer >= 1, got {n!r}")
    for key in ("cpus_per_replica", "gpus_per_replica"):
        v = opts.get(key)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0):
            raise LvlmlpError(f"ray.{key}: expected a number >= 0, got {v!r}")
    if opts.get("cpus_per_replica") == 0:
        raise LvlmlpError("ray.cpus_per_replica: must be > 0")
    t = opts.get("connect_timeout", 30.0)
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 < t < float("inf"):
        raise LvlmlpError(f"ray.connect_timeout (--ray-timeout): expected a number of seconds > 0, got {t!r}")
    return RayOptions(**opts)


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - the optional extra installs both; check both before any work
    except ImportError:
        raise LvlmlpError(_MISSING) from None
    return ray


# The HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (Ray's GCS, the Ray Client server) answers
# with a SETTINGS frame of its own (frame type 4) before anything else.
_HTTP2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def check_reachable(address: str, timeout: float) -> None:
    """Refuse, within `timeout` seconds, a cluster address (`HOST:PORT` or `ray://HOST:PORT`) where no gRPC server
    answers (nothing listens, or something that is no Ray cluster): `ray.init` itself retries such an address for
    many minutes. "auto" and other forms are left to Ray; so is a cluster with TLS (RAY_USE_TLS)."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        return

    def refuse(reason: str) -> LvlmlpError:
        return LvlmlpError(f"--ray: cannot join the Ray cluster at {address!r}: {reason}")

    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return
            sock.sendall(_HTTP2_HELLO)
            head = sock.recv(9)
    except TimeoutError:
        raise refuse(f"no answer within {timeout:g} s (--ray-timeout, ray.connect_timeout)") from None
    except (OSError, ValueError, OverflowError) as err:
        raise refuse(getattr(err, "strerror", None) or str(err) or type(err).__name__) from None
    if len(head) < 4 or head[3] != 4:
        raise refuse("what answers there is no Ray cluster (not a gRPC server)")


@contextmanager
def ray_session(address: str | None, connect_timeout: float = 30.0) -> Iterator[Any]:
    """The `ray` module, connected: to the Ray this process is already connected to (left connected), else to a
    local instance started here (address None) or the cluster at `address` (refused when nothing answers there
    within `connect_timeout` seconds); disconnected after (a local instance is shut down)."""
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    if address is not None:
        check_reachable(address, connect_timeout)
    try:
        if address is None:
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as err:
        where = "start a local Ray instance" if address is None else f"join the Ray cluster at {address!r}"
        raise LvlmlpError(f"--ray: cannot {where}: {str(err).strip().splitlines()[0]}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


@contextmanager
def _data_context(ray: Any) -> Iterator[None]:
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start
    ctx.execution_options.preserve_order = True  # results come back in batch (manifest) order
    ctx.enable_progress_bars = False  # the driver's bar (rows/s) replaces Ray Data's per-operator bars
    ctx.print_on_execution_start = False
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start = saved


def _plan(ray: Any, opts: RayOptions, device: str, n_batches: int) -> tuple[int, float, float]:
    """(replicas, CPUs and GPUs per replica) on the connected cluster."""
    resources = ray.cluster_resources()
    cluster_gpus = float(resources.get("GPU", 0))
    gpus = opts.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if cluster_gpus >= 1 and device != "cpu" else 0.0
    if device.startswith("cuda") and not gpus:
        raise LvlmlpError(f"--device {device}: the Ray cluster has no GPU (resources: {dict(resources)})")
    if opts.replicas:
        n = opts.replicas
    elif gpus:
        n = int(cluster_gpus // gpus)
    else:
        n = int(float(resources.get("CPU", 1)) // opts.cpus_per_replica)
    return max(1, min(n, n_batches)), float(opts.cpus_per_replica), float(gpus)


class _Replica:
    """One model replica in a Ray actor: loads the backend once, then extracts one batch per call."""

    def __init__(self, model: BackendSpec, options: ExtractOptions, threads: int, progress: bool, fail_once: str | None) -> None:
        import torch
        from transformers.utils import logging as hf_logging

        from lvlmlp.extraction.extract import backend_settings

        torch.set_num_threads(threads)
        if not progress:  # --no-progress: no weight-loading bars from the replicas either
            hf_logging.disable_progress_bar()
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the replicas are the parallelism
        self.backend = model.build()
        self.model_json = json.dumps(backend_settings(self.backend))
        self.options = options
        self.fail_once = fail_once

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from safetensors.numpy import save

        from lvlmlp.extraction.extract import run_batch
        from lvlmlp.extraction.loader import prepared_batches

        index, rows = int(batch["batch"][0]), json.loads(batch["rows"][0])
        self._test_exit(index)
        # new_tokens: prompts longer than the context minus the tokens to generate fail here, as in `extract`
        ok, prepared, failed = next(prepared_batches(self.backend, [rows], workers=0,
                                                     new_tokens=self.options.max_new_tokens))
        meta, blob = [], b""
        if ok:
            meta, arrays = run_batch(self.backend, ok, self.backend.to_device(prepared), self.options)
            # one binary column: any shapes and dtypes, whatever Arrow's tensor types allow; safetensors writes
            # an array's memory as it lies, so views (hidden states are slices) are made contiguous first
            blob = save({name: np.ascontiguousarray(a) for name, a in arrays.items()})
        return {
            "batch": np.array([index]),
            "model": np.array([self.model_json]),
            "meta": np.array([json.dumps(meta, default=str)]),
            "failed": np.array([json.dumps(failed)]),
            "arrays": np.array([blob], dtype=object),
        }

    def _test_exit(self, index: int) -> None:
        if self.fail_once:
            at, marker = self.fail_once.split(":", 1)
            if int(at) == index and not os.path.exists(marker):
                Path(marker).touch()
                os._exit(1)


def ray_extract(
    model: BackendSpec | Mapping[str, Any],
    rows: list[dict],
    out: str | Path,
    options: ExtractOptions | None = None,
    *,
    ray: RayOptions | Any = True,
    source: str = "rows",
    progress: bool = True,
    label_fn: Callable[[str, dict], int] | None = None,
    selection: dict | None = None,
    **changes: Any,
) -> Run:
    """`extract` on Ray (see the module docstring). `model`: the backend's spec (or a mapping of its fields); each
    replica loads its own copy. `ray`: see `ray_options`. The other arguments
    and the run folder are those of `lvlmlp.extraction.extract.extract` (`options.workers` is not used: each replica
    prepares its own batches); the manifest adds `engine: ray` and `replicas`."""
    opts = ray_options(ray)
    spec = BackendSpec.of(model)  # a template without {question} is refused here
    _import_ray()  # missing: say so before any work
    options = ExtractOptions.of(options, **changes)
    if isinstance(options.layers, str):  # "quartiles": resolved here from the checkpoint's config (the replicas get indices)
        from lvlmlp.extraction.backend import load_model_config, num_layers_of, resolve_layer_spec

        layers = resolve_layer_spec(options.layers, num_layers_of(load_model_config(spec.model, spec.trust_remote_code)))
        options = ExtractOptions.of(options, layers=layers)
    options.check_labels(label_fn is not None, source)
    rows = numbered_rows(rows, source, options.on_error)
    ids = [r["id"] for r in rows]  # closing checks that each is committed exactly once, in order
    manifest = {"labels_from_responses": label_fn is not None, "selection": selection}
    out = Path(out)
    previous = None
    if (out / "manifest.json").is_file():
        # The settings known without the model are checked now; the model's own when the first batch is back.
        old = json.loads((out / "manifest.json").read_text())
        known = run_settings({"model": spec.model}, rows, options, **manifest)
        previous = RunWriter(out, {**old, **known}, shard_size=options.shard_size)
    pending = [r for r in rows if previous is None or r["id"] not in previous.done_ids]
    if previous is not None and not pending:  # finished, or every row committed and only the consolidation left
        return previous.close(ids)
    if previous is not None:  # the writer of the full identity check below takes the folder's lock again
        previous.release()
    chunks = batches_of(pending, options.batch_size)
    on_error, batch_size, shard_size = options.on_error, options.batch_size, options.shard_size

    bar = tqdm(total=len(pending), unit="row", file=sys.stderr, disable=not progress, desc="extract (ray)")
    writer: RunWriter | None = None
    try:
        with ray_session(opts.address, opts.connect_timeout) as ray_mod, _data_context(ray_mod):
            device = str(spec.device or "auto")
            n, cpus, gpus = _plan(ray_mod, opts, device, len(chunks))
            replica_model = spec.replace(device="cuda" if gpus else "cpu")  # Ray gives each replica its GPU(s)
            log.info("extract: %s -> %s on Ray: %d rows, %d to do, %d replica(s) x (%g CPU, %g GPU), batch %d",
                     spec.model, out, len(rows), len(pending), n, cpus, gpus, batch_size)
            # absolute image paths: a replica's working directory is not ours (on a cluster, paths must be the same
            # on every node: a shared filesystem)
            items = [{"batch": i, "rows": json.dumps([{**r, "image": os.path.abspath(r["image"])} for r in c],
                                                     default=str)} for i, c in enumerate(chunks)]
            ds = ray_mod.data.from_items(items, override_num_blocks=len(items)).map_batches(
                _Replica,
                batch_size=1,
                compute=ray_mod.data.ActorPoolStrategy(size=n),
                num_cpus=cpus,
                num_gpus=gpus,
                fn_constructor_kwargs={"model": replica_model, "options": options,
                                       "threads": max(1, int(cpus)), "progress": progress,
                                       "fail_once": os.environ.get(FAIL_ONCE_ENV)},
            )
            first: dict = {}
            for result in _results(ds, ray_mod):
                if writer is None:
                    first = json.loads(result["model"])
                    settings = {**run_settings(first, rows, options, **manifest), "engine": "ray", "replicas": n}
                    writer = RunWriter(out, settings, shard_size=shard_size)  # the full identity check
                elif identity(json.loads(result["model"])) != identity(first):
                    raise LvlmlpError(f"--ray: the replicas loaded different models from {spec.model} "
                                      "(different files on different nodes?)")
                chunk = chunks[result["batch"]]
                _commit(writer, result, chunk, on_error, source, label_fn)
                bar.update(len(chunk))
    except BaseException:
        if writer is not None:
            writer.release()  # committed shards stay; the same command resumes from them
        raise
    finally:
        bar.close()
    assert writer is not None  # there was at least one batch
    run = writer.close(ids)
    if run.failures:
        log.warning("extract: %d row(s) skipped, see %s", len(run.failures), out / "failures.jsonl")
    return run


def _results(ds: Any, ray: Any) -> Iterator[dict]:
    """The dataset's results one batch at a time, in batch order; a failure of Ray or of a replica as one line."""
    expected = 0
    ready: dict[int, dict] = {}
    try:
        for block in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for j in range(len(block["batch"])):
                result = {k: block[k][j] for k in block}
                result["batch"] = int(result["batch"])
                ready[result["batch"]] = result
            while expected in ready:  # preserve_order keeps them in order; this keeps it true regardless
                yield ready.pop(expected)
                expected += 1
    except ray.exceptions.RayError as err:  # a replica that cannot start (model not found), or raised
        lines = str(err).strip().splitlines()
        cause = lines[-1].removeprefix(f"{LvlmlpError.__module__}.{LvlmlpError.__name__}: ") if lines else repr(err)
        raise LvlmlpError(f"--ray: a replica failed: {cause} (rows committed so far are kept; the same command "
                          "resumes)") from err


def _commit(writer: RunWriter, result: dict, chunk: list[dict], on_error: str, source: str,
            label_fn: Callable[[str, dict], int] | None) -> None:
    """Write one batch's result exactly as the single-process extractor does."""
    from safetensors.numpy import load

    for row_id, message in json.loads(result["failed"]):
        if on_error == "fail":
            raise LvlmlpError(f"{source}: {message}")
        writer.fail(row_id, message)
    meta = json.loads(result["meta"])
    if not meta:
        return
    arrays = load(bytes(result["arrays"]))
    if label_fn is not None:  # from the driver's rows: exactly the objects the single-process extractor passes
        by_id = {r["id"]: r for r in chunk}
        for m in meta:
            m["label"] = int(label_fn(m["response"], by_id[m["id"]]))
    writer.append(meta, arrays)
