"""`tilefeet segment` and `tilefeet objects` on an existing dask.distributed cluster, from the command line.

A real scheduler and two worker processes, started with the `dask` command as a SLURM job would
(`--scheduler-file`), in a working folder of their own; the CLI runs as a subprocess with relative
paths, and its output must equal a local run's bit for bit, also when a worker is killed mid-run
or the run is interrupted and resumed.
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from .conftest import isbi_montage
from .helpers import assert_one_line_error, cli_command, run_cli

distributed = pytest.importorskip("distributed")

# The test's own client (to ask for worker pids) may leave sockets to the garbage collector.
pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::DeprecationWarning")

#: Both sides run the network with one thread (dask's workers start with OMP_NUM_THREADS=1): oneDNN
#: rounds by thread count. 128² blocks make 64 block tasks, enough to kill a worker mid-run.
OPTIONS = ["--chunk-size", "128", "--block-size", "128", "--threads", "1", "--no-invert"]
OBJECTS = ["--block-size", "256"]


def _dask() -> str:
    found = shutil.which("dask", path=str(Path(sys.executable).parent)) or shutil.which("dask")
    if found is None:
        pytest.skip("the `dask` command is not installed")
    return found


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (a nanny closes its worker processes), then SIGKILL to the session it leads."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A scheduler on loopback and `dask worker --nworkers 2 --nthreads 1`, as subprocesses started
    from another folder than the CLI's (relative paths would point elsewhere there); yields the
    scheduler file and a client of this process (for the workers' pids)."""
    folder = tmp_path_factory.mktemp("cluster")
    scheduler_file = folder / "scheduler.json"
    logs = folder / "logs.txt"
    log = open(logs, "w")  # noqa: SIM115 - open for the cluster's lifetime
    common = {"cwd": folder, "stdout": log, "stderr": subprocess.STDOUT, "start_new_session": True}
    procs = [
        subprocess.Popen(
            # Its web server binds :8787 even without a dashboard; a free port leaves that to LocalClusters of other tests.
            [_dask(), "scheduler", "--scheduler-file", str(scheduler_file), "--port", "0", "--host", "127.0.0.1", "--no-dashboard",
             "--dashboard-address", "127.0.0.1:0"],
            **common,
        )
    ]
    client = None
    try:
        deadline = time.time() + 60
        while not scheduler_file.exists() and time.time() < deadline:
            time.sleep(0.1)
        assert scheduler_file.exists(), logs.read_text()
        procs.append(subprocess.Popen(
            [_dask(), "worker", "--scheduler-file", str(scheduler_file), "--nworkers", "2", "--nthreads", "1",
             "--host", "127.0.0.1", "--no-dashboard"],
            **common,
        ))
        client = distributed.Client(scheduler_file=str(scheduler_file), timeout=60, set_as_default=False)
        client.wait_for_workers(2, timeout=120)
        # Each worker imports the network's libraries while this process runs the local reference (`job`).
        warm = [client.submit(importlib.import_module, "tilefeet.schedule", workers=[w], pure=False) for w in client.run(os.getpid)]
        yield scheduler_file, client, warm
    finally:
        if client is not None:
            client.close()
        for proc in reversed(procs):  # workers first: a scheduler that goes first leaves them retrying
            _stop(proc)
        log.close()


@pytest.fixture(scope="module")
def job(tmp_path_factory, random_engine, cluster):
    """A 1024² section (128² chunks) and a local run of segment + objects on it: the reference bits."""
    from tilefeet.cli import main
    from tilefeet.convert import write_image

    folder = tmp_path_factory.mktemp("job")
    write_image(isbi_montage(2, 2)[0][:1024, :1024], folder / "section.ome.zarr", (4.0, 4.0), chunk=128)
    options = ["-e", str(random_engine.path), *OPTIONS]
    assert main(["-q", "segment", str(folder / "section.ome.zarr"), str(folder / "local.ome.zarr"), *options]) == 0
    assert main(["-q", "objects", str(folder / "local.ome.zarr"), *OBJECTS]) == 0
    cluster[1].gather(cluster[2])  # the workers are warm
    return folder, options


def _arrays(path: Path) -> dict[str, np.ndarray]:
    import json

    found = {}
    for meta in sorted(path.rglob("zarr.json")):
        if json.loads(meta.read_text())["node_type"] == "array":
            found[str(meta.parent.relative_to(path))] = zarr.open_array(str(meta.parent), mode="r")[:]
    return found


def _assert_same(a: Path, b: Path, *, objects: bool = False) -> None:
    x, y = _arrays(a), _arrays(b)
    if not objects:  # the reference has its objects too
        y = {k: v for k, v in y.items() if not k.startswith("labels/membrane-objects/")}
    assert sorted(x) == sorted(y)
    assert any(k.startswith("labels/membrane-objects/") for k in x) == objects
    for name in x:
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)
    if objects:
        table = "labels/membrane-objects/objects.parquet"
        pd.testing.assert_frame_equal(pd.read_parquet(a / table), pd.read_parquet(b / table))


def _cli(folder: Path, *args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), cwd=folder, capture_output=True, text=True, timeout=300, **kwargs)


def _wait_for_blocks(done: Path, proc: subprocess.Popen, n: int, *, may_finish: bool = False) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (done.is_dir() and len(list(done.iterdir())) >= n):
        time.sleep(0.02)
    assert may_finish or proc.poll() is None, "the run finished (or failed) before it could be interrupted; make the section bigger"


@pytest.mark.slow
def test_segment_and_objects_on_a_cluster_equal_a_local_run(cluster, job):
    scheduler_file, client, _ = cluster
    folder, options = job
    r = _cli(folder, "segment", "section.ome.zarr", "cluster.ome.zarr", *options, "--scheduler-file", scheduler_file)
    assert r.returncode == 0, r.stderr
    assert "cluster tcp://127.0.0.1:" in r.stderr and "2 workers" in r.stderr
    r = _cli(folder, "objects", "cluster.ome.zarr", *OBJECTS, "--scheduler-file", scheduler_file)
    assert r.returncode == 0, r.stderr
    _assert_same(folder / "cluster.ome.zarr", folder / "local.ome.zarr", objects=True)
    # The workers did the work: the scheduler ran the block and object tasks.
    prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert any(p.startswith("tilefeet-block") for p in prefixes) and any(p.startswith("tilefeet-objects") for p in prefixes)
    meta = zarr.open_group(str(folder / "cluster.ome.zarr"), mode="r").attrs["ome"]["multiscales"][0]["metadata"]
    assert meta["backends"] == {"torch": 64}


@pytest.mark.slow
def test_ctrl_c_cancels_the_cluster_job_and_resume_finishes_it(cluster, job, tmp_path, capsys):
    scheduler_file, _, _ = cluster
    folder, options = job
    out = tmp_path / "interrupted.ome.zarr"
    args = ["segment", folder / "section.ome.zarr", out, *options, "--scheduler-file", scheduler_file]
    # Ctrl-C once the first blocks are done. On a loaded machine the workers may finish the other
    # blocks before this process is scheduled to send it: then the run is complete (exit 0, the
    # output whole), and it is tried again on a fresh output, up to three times.
    for attempt in range(3):
        with open(tmp_path / "stderr.txt", "w") as err:
            proc = subprocess.Popen(cli_command("-q", *args), stderr=err)
            try:
                _wait_for_blocks(tmp_path / "interrupted.ome.zarr.partial" / ".tilefeet" / "done", proc, 1 + attempt % 2, may_finish=True)
                proc.send_signal(signal.SIGINT)
                code = proc.wait(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
        if code != 0 and not out.exists():
            break
        # Too late to interrupt: complete and right, exit 0 (also when Ctrl-C landed while the last
        # task, the publish, was already running on a worker: test_ctrl_c_while_the_last_task_runs...).
        assert code == 0
        _assert_same(out, folder / "local.ome.zarr")
        shutil.rmtree(out)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert_one_line_error(code, stderr, "interrupted", "cancelled", str(out) + ".partial", "--resume")
    assert code == 130 and not out.exists()
    code, _, err = run_cli(capsys, *args, "--resume")
    assert code == 0, err
    _assert_same(out, folder / "local.ome.zarr")


def test_what_the_workers_cannot_see_is_one_line(cluster, job, capsys):
    """The workers open files by the paths given to the client: one they do not see is refused before any work."""
    from tilefeet.cluster import connect
    from tilefeet.errors import ClusterError

    scheduler_file, _, _ = cluster
    folder, _ = job
    c = connect(scheduler_file=str(scheduler_file))
    try:
        c.check_reach(read=[("the input", str(folder / "section.ome.zarr"))], write=("the output", folder))  # all there
        with pytest.raises(ClusterError, match=r"2 of 2 workers .* does not see the input /nonexistent/in\.ome\.zarr.*same path"):
            c.check_reach(read=[("the input", "/nonexistent/in.ome.zarr")])
    finally:
        c.close()


def test_a_namesake_output_folder_on_another_machine_is_told_apart(tmp_path):
    """A worker on another machine may have a folder of the same name (/scratch/out): the marker the
    client wrote is not in it."""
    from tilefeet.cluster import _probe

    (tmp_path / ".marker").write_text("another run's token")
    found = _probe([], "the output", str(tmp_path), ".marker", "this run's token", None)
    assert [p for p, _ in found["problems"]] == [
        f"does not see the folder of the output, {tmp_path}, as this process does (a folder of that name, not the one this process sees)"
    ]
    (tmp_path / ".marker").write_text("this run's token")
    assert _probe([], "the output", str(tmp_path), ".marker", "this run's token", None)["problems"] == []


def test_resources_no_worker_offers_are_refused(cluster, job, capsys):
    scheduler_file, _, _ = cluster
    folder, options = job
    code, _, err = run_cli(capsys, "segment", folder / "section.ome.zarr", folder / "gpu.ome.zarr", *options,
                           "--scheduler-file", scheduler_file, "--resources", "GPU=1")
    assert_one_line_error(code, err, "no worker", "GPU=1", "dask worker --resources GPU=1")
    assert not (folder / "gpu.ome.zarr.partial").exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_scheduler_that_cannot_be_reached_is_one_line(tmp_path, job, capsys):
    import dask

    folder, options = job
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        address = f"tcp://127.0.0.1:{_closed_port()}"
        code, _, err = run_cli(capsys, "segment", folder / "section.ome.zarr", tmp_path / "o.ome.zarr", *options, "--scheduler", address)
        assert_one_line_error(code, err, f"cannot reach the dask scheduler at {address} within 1 s", "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT")
        code, _, err = run_cli(capsys, "objects", folder / "local.ome.zarr", "--scheduler-file", tmp_path / "none.json")
        assert_one_line_error(code, err, f"no scheduler file at {tmp_path / 'none.json'}", "dask scheduler --scheduler-file")
    assert code == 2 and not (tmp_path / "o.ome.zarr.partial").exists()


def test_resources_without_a_cluster_is_one_line(tmp_path, job, capsys):
    folder, options = job
    code, _, err = run_cli(capsys, "segment", folder / "section.ome.zarr", tmp_path / "o.ome.zarr", *options, "--resources", "GPU=1")
    assert_one_line_error(code, err, "--resources", "--scheduler")


def test_without_distributed_the_fix_is_named(tmp_path, job, capsys, monkeypatch):
    """An environment without dask.distributed (it is the optional `cluster` extra)."""
    folder, options = job
    monkeypatch.setitem(sys.modules, "distributed", None)  # what `import distributed` meets where it is not installed
    code, _, err = run_cli(capsys, "segment", folder / "section.ome.zarr", tmp_path / "o.ome.zarr", *options, "--scheduler", "tcp://127.0.0.1:8786")
    assert_one_line_error(code, err, "--scheduler needs dask.distributed", 'pip install "tilefeet[cluster]"')


@pytest.mark.slow
def test_a_worker_killed_mid_run_changes_nothing(cluster, job, tmp_path):
    """SIGKILL one worker process while blocks are being written: dask reruns its tasks elsewhere
    (and those whose results it held), blocks own their chunks, so the output is a local run's.
    (Last in the module: the nanny restarts the worker, which takes a while.)"""
    scheduler_file, client, _ = cluster
    folder, options = job
    out = tmp_path / "killed.ome.zarr"
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(
            cli_command("segment", folder / "section.ome.zarr", out, *options, "--scheduler-file", scheduler_file), stderr=err
        )
        try:
            _wait_for_blocks(tmp_path / "killed.ome.zarr.partial" / ".tilefeet" / "done", proc, 6)
            os.kill(next(iter(client.run(os.getpid).values())), signal.SIGKILL)
            code = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert code == 0 and "Traceback" not in stderr, stderr
    _assert_same(out, folder / "local.ome.zarr")


@pytest.fixture
def ctrl_c(cluster):
    """``ctrl_c(c, key)``: Ctrl-C once the scheduler reports task ``key`` running: SIGINT sent to
    the main thread, as a terminal does (it wakes a blocked wait; ``_thread.interrupt_main`` only
    sets a flag that a blocked main thread sees late). Python's own SIGINT handler is installed for
    the test (pytest-xdist's workers ignore SIGINT), and the watcher never fires after the test: a
    stray interrupt would land in a later one."""
    import threading

    from tilefeet.cluster import _task_state

    done, threads = threading.Event(), []
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)

    def start(c, key, timeout=60.0):
        def watch():
            end = time.monotonic() + timeout
            while not done.is_set() and time.monotonic() < end:
                if c.client.run_on_scheduler(_task_state, key) == "processing":
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                    return
                time.sleep(0.02)

        threads.append(threading.Thread(target=watch, daemon=True))
        threads[-1].start()

    try:
        yield start
    finally:
        done.set()
        for t in threads:
            t.join()
        signal.signal(signal.SIGINT, previous)


def _job(tmp_path, slow_block: float, name: str):
    """Three block tasks, then a last task that leaves ``published`` as it starts and runs 2 s
    (stdlib callables only: the workers, started elsewhere, unpickle them)."""
    from dask import delayed

    blocks = [delayed(time.sleep, pure=False)(slow_block if i == 0 else 0.01, dask_key_name=f"tilefeet-block-{name}-{i}") for i in range(3)]
    (tmp_path / "3").mkdir()
    folder = delayed(os.path.join)(str(tmp_path), delayed(str)(delayed(len)(blocks)))
    return delayed(subprocess.run)(["sh", "-c", "touch published && sleep 2"], cwd=folder, check=True, dask_key_name=f"tilefeet-finalize-{name}")


def test_ctrl_c_while_the_last_task_runs_lets_it_finish_and_says_so(cluster, ctrl_c, tmp_path, capsys):
    """Found in CI: a Ctrl-C landing while the publish already ran on a worker (which cannot stop it)
    reported "interrupted, --resume" over a complete output. Now: the output is finished, exit 0."""
    from tilefeet.cluster import connect

    c = connect(scheduler_file=str(cluster[0]))
    try:
        graph = _job(tmp_path, 0.01, "late")
        ctrl_c(c, graph.key)
        result = c.compute(graph, progress=False, description="t", counts=lambda k: str(k).startswith("tilefeet-block"), kept="k")
        assert result.returncode == 0 and (tmp_path / "3" / "published").exists()
        assert "after the job's last task had started on a worker; it finishes the output" in capsys.readouterr().err
    finally:
        c.close()


def test_ctrl_c_before_the_last_task_cancels_the_job(cluster, ctrl_c, tmp_path):
    from tilefeet.cluster import connect
    from tilefeet.errors import Interrupted

    c = connect(scheduler_file=str(cluster[0]))
    try:
        graph = _job(tmp_path, 1.5, "early")
        ctrl_c(c, "tilefeet-block-early-0")
        with pytest.raises(Interrupted, match=r"cancelled .* rerun the same command with --resume"):
            c.compute(graph, progress=False, description="t", counts=lambda k: str(k).startswith("tilefeet-block"), kept="k")
        time.sleep(2.5)  # the running block ends at 1.5 s: the last task would have started (and left ``published``)
        assert not (tmp_path / "3" / "published").exists()
    finally:
        c.close()
