"""The Ray cluster a run works on (docs/scale-out.md). ``connect`` joins one for the length of a block and tells
deeper code through ``current()``, the way ``runtime.compare.memory_budget`` passes a budget down; the work it
sends out is tracked, so that Ctrl-C (or an error) cancels what is still running and shuts down a Ray instance
the run started itself. A Ray already initialised in this process (a notebook, a test fixture) is used as it is
and left running.

Ray is imported when ``connect`` runs, never before: a run without ``--ray`` never imports it, and one with
``--ray`` but without Ray installed fails with exit status 3 and the package to install.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from onnxprune.errors import MissingDependency, UnavailableBackend
from onnxprune.options import RayOptions

log = logging.getLogger(__name__)
INSTALL_HINT = "pip install 'onnxprune[ray]'"


@dataclass
class _Connection:
    options: RayOptions
    started: bool  # this block started the Ray instance (and shuts it down)
    refs: set = field(default_factory=set)  # ObjectRefs of tasks still running
    actors: list = field(default_factory=list)  # actors still alive


_connection: contextvars.ContextVar[_Connection | None] = contextvars.ContextVar("onnxprune_ray", default=None)


def ray_module():
    """The ``ray`` package, or MissingDependency (exit status 3) saying how to install it."""
    try:
        import ray
    except ImportError:
        raise MissingDependency(f"--ray needs Ray (with Ray Train): {INSTALL_HINT}") from None
    return ray


def current() -> RayOptions | None:
    """The options of the cluster this block runs on (``connect``), None outside one: work then stays here."""
    connection = _connection.get()
    return connection.options if connection is not None else None


@contextlib.contextmanager
def connect(options: RayOptions) -> Iterator[RayOptions]:
    """Within this block, run on the cluster ``options.address`` names (see ``init``); an already initialised Ray
    is reused and left running. On an exception (Ctrl-C included) the tracked work is cancelled first."""
    ray = ray_module()
    started = not ray.is_initialized()
    try:
        if started:
            init(ray, options.address or "auto")
        resources = ray.cluster_resources()
        log.info(f"ray: {len([n for n in ray.nodes() if n.get('Alive')])} node(s), {resources.get('CPU', 0):g} CPUs"
                 + (f", {resources.get(options.resource, 0):g} {options.resource}" if options.resource else ""))
        connection = _Connection(options, started)
        token = _connection.set(connection)
        try:
            yield options
        except BaseException:
            cancel(ray, connection)
            raise
        finally:
            _connection.reset(token)
    finally:
        if started and ray.is_initialized():
            ray.shutdown()


def init(ray, address: str) -> None:
    """``ray.init`` for ``address``: "auto" joins the cluster running here (RAY_ADDRESS, or the one ``ray start``
    started on this machine) and starts a local instance when there is none; "local" always starts one; anything
    else is a cluster's address (HOST:PORT, or ray://HOST:PORT through Ray Client) that must answer. A joined
    cluster's workers get this process's onnxprune (``shipped``); a local instance's workers share its environment."""
    if address == "auto":
        try:
            ray.init(address="auto", runtime_env=shipped(), logging_level=logging.WARNING)
            return
        except ConnectionError:
            log.info("ray: no running cluster found; starting a local Ray instance for this run")
        address = "local"
    if address == "local":
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
        return
    try:
        ray.init(address=address, runtime_env=shipped(), logging_level=logging.WARNING)
    except ConnectionError as exc:
        raise UnavailableBackend(f"cannot reach the Ray cluster at {address}: {exc}") from None


def shipped() -> dict:
    """A runtime environment that puts this process's onnxprune on every worker's path (uploaded once per run, under
    a megabyte), so that the cluster's nodes need only its dependencies and never run another version of it."""
    import onnxprune

    return {"py_modules": [str(Path(onnxprune.__file__).parent)], "excludes": ["__pycache__", "*.pyc"]}


def track(refs: Iterable) -> None:
    """Remember tasks (their ObjectRefs) as running: cancelled if the block is interrupted."""
    connection = _connection.get()
    if connection is not None:
        connection.refs.update(refs)


def untrack(refs: Iterable) -> None:
    """Tasks that are done (their results are no longer held here)."""
    connection = _connection.get()
    if connection is not None:
        connection.refs.difference_update(refs)


def track_actor(actor) -> None:
    connection = _connection.get()
    if connection is not None:
        connection.actors.append(actor)


def untrack_actor(actor) -> None:
    connection = _connection.get()
    if connection is not None and actor in connection.actors:
        connection.actors.remove(actor)


def cancel(ray, connection: _Connection) -> None:
    """Cancel the tracked tasks (their workers killed) and kill the tracked actors; what is already gone is fine."""
    if connection.refs or connection.actors:
        log.info(f"ray: cancelling {len(connection.refs)} task(s) and {len(connection.actors)} actor(s)")
    for ref in list(connection.refs):
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True, recursive=True)
    for actor in connection.actors:
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)
    connection.refs.clear()
    connection.actors.clear()
