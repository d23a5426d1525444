"""A user's mistake is one clear line and a non-zero exit, never a traceback: TorchServe already
running, a port in use, no archives, Java missing, a data directory that does not exist, a bad model name."""
import os
import socket
import subprocess
import sys

import pytest

from serving import server
from conftest import ROOT


def cli(*argv, env=None):
    done = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **(env or {})))
    assert "Traceback" not in done.stderr, done.stderr
    return done


def test_a_second_start_in_the_same_run_folder_is_refused(torchserve):
    with pytest.raises(server.StartError, match="already runs"):
        server.start(torchserve.run_dir, server.free_ports())


@pytest.mark.integration
def test_a_port_in_use_is_named(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        overrides = dict(server.free_ports(), inference_address=f"http://127.0.0.1:{port}")
        with pytest.raises(server.StartError, match=f"port {port} on 127.0.0.1 \\(inference_address"):
            server.start(tmp_path, overrides)
    assert server.pid(tmp_path) is None


def test_no_archives_and_no_java_are_named(tmp_path, monkeypatch):
    empty = tmp_path / "store"
    empty.mkdir()
    with pytest.raises(server.StartError, match="no archives in .*make archive"):
        server.start(tmp_path, server.free_ports(), store=empty)
    monkeypatch.setattr(server.shutil, "which", lambda name: None)
    with pytest.raises(server.StartError, match="needs Java 17"):
        server.start(tmp_path, server.free_ports())


@pytest.mark.integration  # five CLIs in subprocesses, each importing torch
def test_cli_errors_are_one_line():
    no_java = cli("serving.server", "start", env={"PATH": "/nonexistent"})
    assert no_java.returncode == 1 and no_java.stderr.strip().count("\n") == 0
    assert no_java.stderr.startswith("error: TorchServe needs Java 17") or "already runs" in no_java.stderr

    no_data = cli("training.train", "--model", "mnist_lenet5", env={"DATA_DIR": "/nonexistent/data"})
    assert no_data.returncode == 1
    assert no_data.stderr.strip() == ("error: training needs the real data set: the data directory /nonexistent/data "
                                      "does not exist (set DATA_DIR or pass --data-dir; see README: data sets)")

    typo = cli("training.evaluate", "--data-dir", "/nonexistent/data")
    assert typo.returncode == 2 and "the data directory /nonexistent/data does not exist" in typo.stderr

    bad_model = cli("optimize.export", "--model", "mnist_lenet6")
    assert bad_model.returncode == 2 and "invalid choice: 'mnist_lenet6'" in bad_model.stderr
