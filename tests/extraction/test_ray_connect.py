"""`extract --ray ADDRESS` / `run --set ray=ADDRESS` where no cluster answers: a one-line error within the bound.

A file of its own: tests/test_ray.py keeps a local Ray instance for its module, to which `ray_session` would
connect whatever the address; here no Ray is started at all (the checks run before `ray.init`)."""

from __future__ import annotations

import re
import time

import pytest
import ray

from lvlmlp.cli import main
from tests.extraction.test_extract import make_manifest
from tests.extraction.test_ray_extract import _extract_args


def _refused_port() -> int:
    """A port of this machine that nothing listens on (bound, then closed: connecting to it is refused)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_cluster_fails_fast_naming_the_address(tmp_path, capsys):
    """`extract --ray HOST:PORT` and `run --set ray=HOST:PORT` where nothing answers: a one-line error naming the
    address within the bound (`ray.init` alone retried for many minutes); no Ray is started, nothing is written."""
    from lvlmlp.testing import tiny_manifest
    from tests.study.test_experiment import CONFIG

    assert not ray.is_initialized()  # else ray_session would use that instance, whatever the address
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
    assert not ray.is_initialized() and not (tmp_path / "o").exists()


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
