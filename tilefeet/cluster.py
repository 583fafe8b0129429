"""Running on an existing ``dask.distributed`` cluster: how dask-jobqueue and SLURM users run.

    cluster = connect(address, scheduler_file)     # one line if distributed is missing or the scheduler is not there
    cluster.check_reach(read=[...], write=...)      # every worker sees the input and engine, and writes the output
    cluster.compute(graph, counts=..., ...)         # a progress bar; Ctrl-C cancels the cluster's tasks

The graphs are the ones a local run computes (:func:`tilefeet.schedule.write_graph`,
:func:`tilefeet.objects.write_objects` with ``compute=False``): tasks carry the plan, paths and a
small runner spec, never a model, and a runner spec's ``"auto"`` backend is chosen by each worker
for itself. Block records make them safe to rerun: a worker killed mid-task changes nothing, and an
interrupted job resumes. What the cluster cannot do for tilefeet is share a file system: the
workers open the input, the engine and the output by the paths this process gives, so
:meth:`Cluster.check_reach` asks each worker, before any work, whether it sees them (a marker this
process writes into the output's folder tells the same folder from a namesake on another machine).

``distributed`` is an optional dependency (``pip install "tilefeet[cluster]"``), imported here only.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .console import echo
from .errors import ClusterError, ConfigError, Interrupted, TilefeetError
from .storage import LocalOutput, OutputLocation, is_url

INSTALL = 'pip install "tilefeet[cluster]"'
#: How the graphs name their tasks (:func:`tilefeet.schedule.write_graph`, :mod:`tilefeet.objects.run`):
#: the progress bars count these.
BLOCK_TASKS, OBJECTS_TASKS = "tilefeet-block-", "tilefeet-objects-"
#: dask's own setting for how long to wait for a scheduler (``DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=60s``)
TIMEOUT_CONFIG = "distributed.comm.timeouts.connect"


def absolute(path: str) -> str:
    """A local path as an absolute one (a worker's working folder is not this process's); URLs and
    names as given."""
    return path if is_url(path) else os.path.abspath(path)


def parse_resources(items: Iterable[str]) -> dict[str, float]:
    """``--resources GPU=1`` (repeatable, or ``GPU=1,MEM=8e9``) as dask's resources mapping."""
    found: dict[str, float] = {}
    for item in (part.strip() for text in items for part in text.split(",")):
        name, sep, value = item.partition("=")
        try:
            amount = float(value)
        except ValueError:
            amount = -1.0
        if not sep or not name.strip() or amount <= 0:
            raise ConfigError(f"--resources {item!r}: give NAME=AMOUNT, e.g. --resources GPU=1 (what `dask worker --resources` declares)")
        found[name.strip()] = amount
    return found


def connect_timeout() -> float:
    import dask
    from dask.utils import parse_timedelta

    return float(parse_timedelta(dask.config.get(TIMEOUT_CONFIG, "30s"), default="seconds"))


def _distributed(flag: str) -> Any:
    try:
        import distributed
    except ImportError:
        raise ClusterError(f"{flag} needs dask.distributed, which is not installed here: {INSTALL}") from None
    return distributed


def scheduler_address(scheduler_file: str, timeout: float) -> str:
    """The address a ``dask scheduler --scheduler-file`` file holds. A batch job may start the
    scheduler and tilefeet at once, so a missing file is waited for (``timeout`` seconds)."""
    path = Path(scheduler_file)
    deadline = time.monotonic() + timeout
    if not path.exists():
        echo(f"waiting up to {timeout:g} s for the scheduler file {path} (`dask scheduler --scheduler-file {path}` writes it)")
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    wait = f"waited {timeout:g} s; DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=120s waits longer"
    if not path.exists():
        raise ClusterError(f"no scheduler file at {path} ({wait}): start `dask scheduler --scheduler-file {path}` first, or check the path")
    for _ in range(20):  # a scheduler that is still writing it
        try:
            address = json.loads(path.read_text())["address"]
            if isinstance(address, str) and address:
                return address
        except (ValueError, KeyError, TypeError):
            pass
        except OSError as e:
            raise ClusterError(f"cannot read the scheduler file {path}: {e.strerror or e}") from None
        time.sleep(0.1)
    raise ClusterError(f"{path} is not a dask scheduler file (no 'address' in it): give the file `dask scheduler --scheduler-file` wrote")


def from_options(scheduler: str | None, scheduler_file: str | None, resources: Iterable[str] = ()) -> Cluster | None:
    """The cluster ``--scheduler`` / ``--scheduler-file`` name (None: run here), disconnected when
    the command ends; ``--resources`` only means something with one."""
    if not (scheduler or scheduler_file):
        if resources:
            raise ConfigError("--resources asks the workers of a cluster for resources: give --scheduler or --scheduler-file too")
        return None
    import logging

    _distributed("--scheduler-file" if scheduler_file else "--scheduler")  # importing it configures its logging
    if not logging.getLogger("tilefeet").isEnabledFor(logging.DEBUG):  # -v: also the client's connection notes
        logging.getLogger("distributed").setLevel(logging.ERROR)
    cluster = connect(scheduler, scheduler_file, resources=parse_resources(resources))
    import click

    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(cluster.close)
    echo(cluster.describe())
    return cluster


def connect(address: str | None = None, scheduler_file: str | None = None, *, resources: Mapping[str, float] | None = None) -> Cluster:
    """A client of the scheduler at ``address`` (``tcp://10.0.0.5:8786``) or named by
    ``scheduler_file``, waiting for its first worker and checking that some worker offers
    ``resources``. Every failure is one line (:class:`ClusterError`)."""
    if address and scheduler_file:
        raise ConfigError("give --scheduler or --scheduler-file, not both")
    if not (address or scheduler_file):
        raise ConfigError("give the cluster's --scheduler ADDRESS or --scheduler-file PATH")
    distributed = _distributed("--scheduler-file" if scheduler_file else "--scheduler")
    timeout = connect_timeout()
    where = ""
    if scheduler_file:
        address = scheduler_address(scheduler_file, timeout)
        where = f" (named by {scheduler_file})"
    assert address is not None
    try:
        client = distributed.Client(address, timeout=timeout, set_as_default=False)
    except Exception as e:  # OSError (timed out, refused), ValueError (a malformed address), garbage on the port
        reason = "" if str(e).startswith("Timed out") else f" ({e or type(e).__name__})"
        raise ClusterError(
            f"cannot reach the dask scheduler at {address}{where} within {timeout:g} s{reason}: is `dask scheduler` running "
            f"there, and its port open from here? (DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=120s waits longer)"
        ) from None
    cluster = Cluster(client, str(address), dict(resources or {}))
    try:
        cluster.wait_for_workers()
        cluster.check_resources()
    except BaseException:
        cluster.close()
        raise
    return cluster


@dataclass
class Cluster:
    """A connected client and what the run asks of the workers."""

    client: Any
    address: str
    resources: dict[str, float]

    def workers(self) -> dict[str, Any]:
        try:
            info = self.client.scheduler_info(n_workers=-1)  # all of them (recent distributed lists 5 by default)
        except TypeError:  # distributed before 2025.1 lists all, and takes no n_workers
            info = self.client.scheduler_info()
        return dict(info["workers"])

    def describe(self) -> str:
        workers = self.workers()
        threads = sum(int(w.get("nthreads", 0)) for w in workers.values())
        return f"cluster {self.address}: {len(workers)} workers, {threads} threads"

    def wait_for_workers(self) -> None:
        """A scheduler whose workers are still starting (a batch job, dask-jobqueue) is waited for,
        saying so; Ctrl-C stops waiting."""
        if not self.workers():
            echo(f"waiting for the first worker to join {self.address} (Ctrl-C to stop)")
            self.client.wait_for_workers(1)

    def check_resources(self) -> None:
        """Tasks that ask for a resource no worker offers would wait for ever: refuse them now."""
        if not self.resources:
            return
        offered = [w.get("resources") or {} for w in self.workers().values()]
        for name, amount in self.resources.items():
            if not any(float(r.get(name, 0)) >= amount for r in offered):
                have = sorted({f"{k}={v:g}" for r in offered for k, v in r.items()}) or ["none"]
                raise ClusterError(
                    f"no worker of {self.address} offers {name}={amount:g} (they offer: {', '.join(have)}); start workers with "
                    f"`dask worker --resources {name}={amount:g}`, or drop --resources"
                )

    def check_reach(self, *, read: Iterable[tuple[str, str]] = (), write: tuple[str, Path | OutputLocation] | None = None) -> None:
        """Ask every worker whether it sees ``read`` (what, path) and can write ``write`` (what, a
        local folder or an output location) as this process does; refuse in one line otherwise.
        Workers that join later are not asked (they fail their first task instead, in one line too).

        A local folder is recognized by a marker this process writes into it (and removes): a worker
        that sees a folder of the same name on another file system does not find it.
        """
        reads = [(what, p) for what, p in read if not is_url(p)]
        folder: str | None = None
        location: OutputLocation | None = None
        what_out = ""
        if write is not None:
            what_out, target = write
            if isinstance(target, LocalOutput):
                target = target.final.parent
            if isinstance(target, OutputLocation):
                location = target  # an object store: each worker probes it with its own credentials
            else:
                folder = str(Path(target).absolute())
        marker, token = f".tilefeet-reach-{uuid.uuid4().hex}", uuid.uuid4().hex
        if folder is not None:
            Path(folder, marker).write_text(token)
        try:
            found = self.client.run(_probe, reads, what_out, folder, marker, token, location, on_error="return")
        finally:
            if folder is not None:
                Path(folder, marker).unlink(missing_ok=True)
        self._judge(found)

    def _judge(self, found: Mapping[str, Any]) -> None:
        from . import __version__

        problems: list[tuple[str, str, str]] = []  # (worker, what is wrong, the fix)
        for worker, answer in sorted(found.items()):
            if isinstance(answer, BaseException):
                if isinstance(answer, ImportError) and "tilefeet" in str(answer):
                    problems.append((worker, "cannot import tilefeet", "install tilefeet in the workers' environment"))
                else:
                    problems.append((worker, f"failed the check ({type(answer).__name__}: {answer})", "look at the worker's log"))
                continue
            at = f"{worker} ({answer['host']})"
            if answer["version"] != __version__:
                problems.append((at, f"runs tilefeet {answer['version']}, this process {__version__}", "install the same version on both"))
            problems += [(at, problem, fix) for problem, fix in answer["problems"]]
        if not problems:
            return
        worker, problem, fix = problems[0]
        more = f" (and {len(problems) - 1} more such problems)" if len(problems) > 1 else ""
        bad = len({w for w, _, _ in problems})
        raise ClusterError(f"{bad} of {len(found)} workers of {self.address} cannot do the job: {worker} {problem}{more}; {fix}")

    def check_segment(self, run: Any, location: OutputLocation) -> None:
        """:meth:`check_reach` for a segment run (a :class:`tilefeet.schedule.Run`): its input, its
        engine bundle, its output."""
        image = run.plan.image
        reads = [("the input", str(image.source))] if image.version else []
        self.check_reach(read=[*reads, ("the engine", str(run.runner.engine))], write=("the output", location))

    def write_segment(self, graph: Any, location: OutputLocation, *, progress: bool) -> Any:
        """Compute a segment job's graph (``write_planned(compute=False)``); returns the output."""
        self.compute(
            graph, progress=progress, description="segment", counts=lambda k: str(k).startswith(BLOCK_TASKS), unit="block",
            then="pyramid", kept=f"the finished blocks are kept in {location.staging}",
        )
        return location.final

    def compute(
        self,
        graph: Any,
        *,
        progress: bool,
        description: str,
        counts: Callable[[Any], bool],
        kept: str,
        unit: str = "task",
        then: str | None = None,
    ) -> Any:
        """Compute a ``Delayed`` on the cluster and return its result, with a bar over the tasks
        ``counts`` accepts (``then``: a note shown once they are all done, e.g. "pyramid").

        Ctrl-C, or an error, cancels the job's tasks (those already running on a worker finish
        first: block records keep that safe) and says how to resume: ``kept`` says what is kept
        where. A task that killed workers in turn, or a lost scheduler, is one line (:class:`ClusterError`).
        """
        from tqdm.auto import tqdm

        distributed = _distributed("--scheduler")
        dsk = graph.__dask_graph__()
        keys = [k for k in dsk if counts(k)]
        # The counted tasks are outputs too, so each has a future to follow (their results are tiny
        # records). One submission of the graph as it is (its layers keep their resource annotations):
        # 0.1 s for 4096 blocks, where a Delayed per block costs seconds to merge.
        futures = self.client.get(dsk, [graph.key, *keys], sync=False)
        final, parts = futures[0], futures[1:]
        bar = tqdm(total=len(parts), desc=description, unit=unit, disable=not progress, dynamic_ncols=True)
        try:
            for f in distributed.as_completed(parts, loop=self.client.loop):
                if f.status == "error":
                    break
                bar.update(1)
            if then and bar.n == len(parts):
                bar.set_postfix_str(then)
            return final.result()
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt) and self._started(final):
                # The last task (it publishes the output) already runs on a worker, where a running
                # task cannot be stopped: cancelling would report an interrupted job while the
                # output becomes complete behind the message. Let it finish and say so.
                echo("Ctrl-C came after the job's last task had started on a worker; it finishes the output")
                return final.result()
            self.client.cancel(futures, force=True)
            raise self._error(e, distributed, kept) from None
        finally:
            bar.close()

    def _started(self, future: Any) -> bool:
        """Whether ``future``'s task is running on a worker or done (asked of the scheduler)."""
        try:
            return self.client.run_on_scheduler(_task_state, future.key) in ("processing", "memory")
        except Exception:  # the scheduler is gone: nothing runs
            return False

    def _error(self, e: BaseException, distributed: Any, kept: str) -> BaseException:
        """What a failure of the job is, in one line where it is the cluster's doing."""
        from concurrent.futures import CancelledError

        resume = f"{kept}; rerun the same command with --resume to continue"
        if isinstance(e, KeyboardInterrupt):
            return Interrupted(f"interrupted: the job's tasks on {self.address} are cancelled (those running finish first); {resume}")
        if isinstance(e, distributed.KilledWorker):
            return ClusterError(
                f"a task of the job ({getattr(e, 'task', '?')}) was running on {_address(getattr(e, 'last_worker', None))} each "
                f"time a worker died, and was given up: see the workers' logs (out of memory? fewer threads per worker or a "
                f"smaller --block-size); {resume}"
            )
        if isinstance(e, CancelledError) or self.client.status != "running":
            return ClusterError(f"lost the dask scheduler {self.address} during the job ({e or type(e).__name__}); {resume} once it is back")
        return e

    def close(self) -> None:
        """Disconnect (the cluster itself is the user's and keeps running). A Ctrl-C while
        disconnecting interrupts no work (the job has ended, done or cancelled): it is said, not
        raised, so a finished output is not reported as an interrupted run (found in CI)."""
        import contextlib

        try:
            with contextlib.suppress(Exception):
                self.client.close()
        except KeyboardInterrupt:
            echo("Ctrl-C while disconnecting from the cluster: the job had already ended")


def _task_state(key: Any, dask_scheduler: Any = None) -> str | None:
    """The scheduler's state of task ``key`` (runs on the scheduler: ``Client.run_on_scheduler``)."""
    task = dask_scheduler.tasks.get(key) if dask_scheduler is not None else None
    return task.state if task is not None else None


def _address(worker: Any) -> str:
    return str(getattr(worker, "address", worker) or "a worker")


def _probe(
    read: list[tuple[str, str]], output: str, folder: str | None, marker: str, token: str, location: OutputLocation | None
) -> dict:
    """Run on each worker (``client.run``): what of the run it cannot see or write, each with its fix."""
    import tempfile

    from . import __version__

    shared = "put the input, the engine and the output on a file system every node mounts at the same path (or use s3:// URLs)"
    problems = [(f"does not see {what} {path}", shared) for what, path in read if not os.path.exists(path)]
    if folder is not None:
        try:
            same = Path(folder, marker).read_text() == token
        except OSError:
            same = False
        if not same:
            seen = "a folder of that name, not the one this process sees" if os.path.isdir(folder) else "no such folder"
            problems.append((f"does not see the folder of {output}, {folder}, as this process does ({seen})", shared))
        else:
            try:
                with tempfile.NamedTemporaryFile(dir=folder, prefix=".tilefeet-reach-"):
                    pass
            except OSError as e:
                problems.append((f"cannot write {output} in {folder} ({e.strerror or e})", "let the workers' user write there"))
    if location is not None:
        try:
            location.check_writable()
        except (OSError, TilefeetError) as e:
            problems.append((f"cannot write {output}: {e}", "give the workers credentials that may write there"))
    return {"version": __version__, "host": socket.gethostname(), "problems": problems}
