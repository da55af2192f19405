"""Running one test item in a container: the ``pytest_runtest_protocol`` takeover.

For an isolated item the pytest process:

1. sets up the item's parent nodes and every fixture of wider than function scope, here, as
   plain pytest would (so a session fixture is created once, not once per container);
2. forks a child into a fresh container that runs setup/call/teardown of the item itself and
   streams each report back (:mod:`pytest_isolate.child`); that container is usually started
   while the test before runs, and used if nothing it took from this process has changed
   (:func:`_launch_early`);
3. logs the reports through the normal hooks (terminal, junitxml, ``--lf``, ``-x``, xdist all see
   ordinary reports) and turns a dead or timed-out child into a clear failure;
4. tears down wider scopes for the real next item, as plain pytest does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import os
import signal
import socket
import time
import warnings
from dataclasses import dataclass
from operator import is_
from pathlib import Path
from typing import Any, Literal

import pytest
from _pytest.runner import CallInfo

from pytest_isolate import child, stash, wire
from pytest_isolate.images import SessionImages, python_paths
from pytest_isolate.options import TestContainer
from runtime import Container, ContainerSpec, Engine, Rootfs
from runtime.errors import IsolateError
from runtime.image.images import RunnableImage
from runtime.launch import ContainerProcess, ExitStatus
from runtime.spec import DEFAULT_PATH, HOST

PREPARE_BATCH = 4
"""Containers prepared ahead together (``Engine.prepare``). After each fork every page the
pytest process writes costs it a copy-on-write fault; work repeated after every test pays for
its pages every time, work done in a batch once per batch (bench/README.md, session 7)."""
COLLECT_BATCH = 8
"""Retired containers reaped together (``Engine.collect``), for the same reason."""


@dataclass
class _Outcome:
    phases: list[str]
    done: bool = False
    teardown: pytest.TestReport | None = None
    setup_passed: bool = False
    timed_out: bool = False
    status: ExitStatus | None = None


def container_spec(
    tc: TestContainer, image: RunnableImage | None = None, idle: bool = False
) -> ContainerSpec:
    """The engine spec for a test's container.

    A test runs in a fork of this process, starting in the current directory: the host image
    shows the same paths, Python and packages; another image gets them on top, copy-on-write
    (the project, ``sys.prefix`` and the import path), so imports and ``sys.executable`` keep
    working. An ``idle`` container (the ``container`` fixture) waits for ``exec`` and starts in
    the image's working directory, as ``docker run`` does.
    """
    if image is None or image.image_id is None:
        rootfs = Rootfs(host=True)
        env = {"PATH": DEFAULT_PATH}
        cwd, user = "/", None
    else:
        rootfs = image.rootfs
        if not idle and not rootfs.host:
            rootfs = dataclasses.replace(rootfs, host_paths=python_paths(Path.cwd()))
        env, cwd, user = image.env, image.cwd, image.user
    return ContainerSpec(
        rootfs=rootfs,
        env={**env, **tc.env},
        cwd=tc.workdir or (cwd if idle else os.getcwd()),
        user=tc.user or user,
        hostname=tc.hostname,
        binds=tc.volumes,
        tmpfs=tc.tmpfs,
        read_only=tc.read_only,
    )


def image_for(config: pytest.Config, tc: TestContainer, base_dir: Path) -> RunnableImage | None:
    """The test's image: ``None`` for the host, else built or resolved once per session."""
    if tc.image == HOST:
        return None
    images: SessionImages = config.stash[stash.IMAGES_KEY]
    request = images.request(tc.image, base_dir, tc.build_args, tc.target)
    result: RunnableImage = images.resolve(request)
    return result


def run_isolated(item: pytest.Item, nextitem: pytest.Item | None, tc: TestContainer) -> None:
    """The whole protocol of one isolated item, in place of pytest's own."""
    ihook = item.ihook
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    try:
        held: pytest.TestReport | None = None
        prepared = CallInfo.from_call(lambda: _prepare_wider_scopes(item), when="setup")
        if prepared.excinfo is not None:
            _log(item, ihook.pytest_runtest_makereport(item=item, call=prepared))
        else:
            held = _run_in_container(item, nextitem, tc, prepared.duration)
        _reset_request(item)
        if item.session.shouldfail or item.session.shouldstop:
            nextitem = None
        # Wider scopes end as in plain pytest; the item's own teardown already ran inside.
        # Its report and ours become one teardown report, as plain pytest has one.
        call = CallInfo.from_call(
            lambda: item.session._setupstate.teardown_exact(nextitem), when="teardown"
        )
        ours = ihook.pytest_runtest_makereport(item=item, call=call)
        _log(item, ours if held is None else _merge_teardown(held, ours))
    finally:
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)


def _merge_teardown(inside: pytest.TestReport, outside: pytest.TestReport) -> pytest.TestReport:
    if outside.failed and not inside.failed:
        inside.outcome = "failed"
        inside.longrepr = outside.longrepr
    inside.sections = [*inside.sections, *outside.sections]
    inside.duration += outside.duration
    inside.stop = outside.stop
    return inside


def _prepare_wider_scopes(item: pytest.Item) -> None:
    """Set up the parent nodes and every non-function-scoped fixture of ``item`` in this process."""
    ss = item.session._setupstate
    assert item.parent is not None
    ss.setup(item.parent)  # type: ignore[arg-type]
    request = getattr(item, "_request", None)
    info = getattr(item, "_fixtureinfo", None)
    if request is None or info is None:
        return
    if not request:
        item._initrequest()  # type: ignore[attr-defined]
        request = item._request  # type: ignore[attr-defined]
    # The item must look active while its fixtures are requested (pytest >= 9.1 checks), but
    # its own setup (function-scoped fixtures) happens in the container.
    ss.stack[item] = ([], None)
    try:
        for name in item.fixturenames:  # type: ignore[attr-defined]
            defs = info.name2fixturedefs.get(name)
            if defs and defs[-1].scope != "function":
                request.getfixturevalue(name)
    finally:
        del ss.stack[item]


def _reset_request(item: pytest.Item) -> None:
    if hasattr(item, "_request"):
        item._request = False  # type: ignore[attr-defined]
        item.funcargs = None  # type: ignore[attr-defined]


def _log(item: pytest.Item, report: pytest.TestReport) -> None:
    item.ihook.pytest_runtest_logreport(report=report)


def _run_in_container(
    item: pytest.Item, nextitem: pytest.Item | None, tc: TestContainer, prepare_time: float
) -> pytest.TestReport | None:
    """Run the item's phases in a container; return its teardown report, not yet logged."""
    config = item.config
    engine = stash.engine(config)
    launch = _take_early(item)
    if launch is None:
        started = CallInfo.from_call(lambda: _launch(item, engine, tc), when="setup")
        if started.excinfo is not None:
            _log(item, item.ihook.pytest_runtest_makereport(item=item, call=started))
            return None
        launch = started.result
    outcome = _Outcome([])
    start = time.time()
    try:
        launch.go()
        if _same_container(item, nextitem):
            assert nextitem is not None
            # The next test's container, started now so that its turn begins with its test;
            # then the namespaces and mounts of the ones after it, set up by the engine's
            # helper while this test runs (runtime.prepare), a batch at a time, asked for
            # when the last one is taken, so that none is waited for.
            _launch_early(nextitem, engine, tc, running=launch)
            engine.prepare(launch.container.spec, PREPARE_BATCH)
        # The previous tests' containers, while this one runs on another core.
        engine.collect(batch=COLLECT_BATCH)
        deadline = None if tc.timeout is None else time.monotonic() + tc.timeout
        # The setup report's duration covers what plain pytest's would: the wider fixtures
        # set up here, and the container's start in this process (the price of isolation,
        # shown honestly; for a container started early, its fork, made while the previous
        # test ran, without the setup its child did meanwhile).
        extra = prepare_time + launch.duration
        _receive(item, launch.sock, outcome, deadline, launch.props, extra)
        if outcome.timed_out:
            launch.container.kill()
        if not outcome.done:
            outcome.status = launch.proc.wait()
    finally:
        launch.end(exited=outcome.done)
    if not outcome.done:
        return _report_crash(item, tc, outcome, start)
    return outcome.teardown


@dataclass
class Launch:
    """A test's container, started: its child waits for :meth:`go` to run the test."""

    item: pytest.Item
    container: Container
    proc: ContainerProcess
    sock: socket.socket
    props: list[tuple[str, str]]
    duration: float
    inherited: tuple[tuple[object, ...], tuple[object, ...]]
    """What the child took from this process (:func:`_inherited`)."""

    def go(self) -> None:
        with contextlib.suppress(OSError):  # a child already dead is reported as a crash
            self.sock.sendall(_GO)

    def end(self, exited: bool) -> None:
        """Let go of the container: reap it later if it is exiting, else remove it now."""
        self.sock.close()
        if exited:
            self.container.retire()  # off this test's critical path
        else:
            self.container.remove()


_GO = b"g"


def _launch(
    item: pytest.Item, engine: Engine, tc: TestContainer, running: Launch | None = None
) -> Launch:
    """Start the item's container; its child runs the item once told to go.

    Early, while ``running`` (the launch of the test that runs now) runs, this returns right
    after the fork: the child sets its container up meanwhile, and :func:`_take_early` checks
    that it did at the item's turn. The child must not hold the running test's socket.
    """
    began = time.perf_counter()
    try:
        image = image_for(item.config, tc, item.path.parent)
    except IsolateError as e:
        problem = str(e)
    else:
        problem = ""
    if problem:
        # The image is the test's setup: a short error, not a traceback through this plugin.
        pytest.fail(f"pytest-isolate: {problem}", pytrace=False)
    # A callable keeps this process's environment; the image's and the marker's go on top.
    env = {**(image.env if image is not None and image.image_id is not None else {}), **tc.env}
    basetemp = _basetemp(item.config)
    container = engine.create(container_spec(tc, image), prepared=True)
    parent_end, child_end = socket.socketpair()
    # Under xdist the process has an I/O thread; forking is safe here (the child never
    # touches execnet), so Python 3.12's warning about it, raised in this process after the
    # fork, is noise. The child leaves this filter as the parent does: the test has its own.
    quiet_fork = warnings.catch_warnings()

    def target() -> None:
        quiet_fork.__exit__(None, None, None)
        parent_end.close()
        if running is not None:
            running.sock.close()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if child_end.recv(1) != _GO:  # the pytest process let this container go unused
            os._exit(0)
        os.environ.update(env)
        child.run_item(item, child_end, basetemp)

    try:
        with quiet_fork:
            warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
            # Objects that exist now are never scanned by the child's garbage collector: fewer
            # copy-on-write page faults in the child, which is most of a test's cost there.
            gc.freeze()
            try:
                proc = container.start(target=target, wait=running is None)
            finally:
                gc.unfreeze()
    except BaseException:
        parent_end.close()
        container.remove()
        raise
    finally:
        child_end.close()
    # Each report names the exact image, so that a CI failure can be reproduced with it.
    props = [("container_image", tc.image)]
    if image is not None and image.image_id is not None:
        props.append(("container_image_id", image.image_id))
    duration = time.perf_counter() - began
    return Launch(item, container, proc, parent_end, props, duration, _inherited(item))


def _launch_early(item: pytest.Item, engine: Engine, tc: TestContainer, running: Launch) -> None:
    """Start ``item``'s container now, while the test before it runs; :func:`_take_early`
    uses it at the item's turn if nothing it saw has changed by then.

    Only for an item of the same parent node (a new module or class sets up fixtures first).
    A failed start is not reported here: the item's own turn starts it again and reports it.
    """
    if item.parent is not running.item.parent:
        return
    if hasattr(item, "_request") and not item._request:  # as runtestprotocol does
        item._initrequest()  # type: ignore[attr-defined]
    with contextlib.suppress(Exception, pytest.fail.Exception):
        item.config.stash[stash.EARLY_KEY] = _launch(item, engine, tc, running)


def _take_early(item: pytest.Item) -> Launch | None:
    """The container started early for ``item``, if its child saw what the item sees now."""
    launch = item.config.stash.get(stash.EARLY_KEY, None)
    if launch is None:
        return None
    del item.config.stash[stash.EARLY_KEY]
    objects, filters = _inherited(item)
    seen, seen_filters = launch.inherited
    if (
        launch.item is item
        and filters == seen_filters
        and len(objects) == len(seen)
        and all(map(is_, objects, seen))
    ):
        try:
            launch.proc.wait_ready()
        except BaseException as e:
            launch.end(exited=False)
            if not isinstance(e, Exception):  # Ctrl-C: nothing is left behind
                raise
            return None  # started again the usual way, which reports what is wrong
        return launch
    launch.end(exited=False)
    return None


def drop_early(config: pytest.Config) -> None:
    """Remove a container started early that no test will use (the session ends)."""
    launch = config.stash.get(stash.EARLY_KEY, None)
    if launch is not None:
        del config.stash[stash.EARLY_KEY]
        launch.end(exited=False)


def _inherited(item: pytest.Item) -> tuple[tuple[object, ...], tuple[object, ...]]:
    """What a child forked now takes from this process into ``item``'s run: the nodes set up,
    the cached value of each of its wider-scoped fixtures, and the warning filters (pytest
    applies a test's ``filterwarnings`` marks around its whole protocol, here).

    A container started early (:func:`_launch_early`) is used only if this is the same at the
    item's turn: the objects are compared by identity (any fixture set up, torn down or set up
    again for another parameter since then is a new cached value), the filters by value.
    """
    objects: list[object] = list(item.session._setupstate.stack)
    info = getattr(item, "_fixtureinfo", None)
    if info is not None:
        for defs in info.name2fixturedefs.values():
            objects.extend(d.cached_result for d in defs if d.scope != "function")
    return tuple(objects), tuple(warnings.filters)


def _same_container(item: pytest.Item, nextitem: pytest.Item | None) -> bool:
    """Will ``nextitem`` run in a container like ``item``'s? (Same options, same directory
    for a relative image path: so, the same spec.)"""
    return (
        nextitem is not None
        and nextitem.stash.get(stash.PLAN_KEY, None) == item.stash.get(stash.PLAN_KEY, None)
        and nextitem.path.parent == item.path.parent
    )


def _receive(
    item: pytest.Item,
    sock: socket.socket,
    outcome: _Outcome,
    deadline: float | None,
    image_props: list[tuple[str, str]],
    setup_extra: float,
) -> None:
    config = item.config
    if deadline is not None:
        sock.settimeout(max(0.0, deadline - time.monotonic()))
    try:
        for msg in wire.receive(sock):
            kind = msg["kind"]
            if kind == "report":
                data = msg["report"]
                if isinstance(data.get("longrepr"), list):  # JSON has no tuples (skip location)
                    data["longrepr"] = tuple(data["longrepr"])
                rep = config.hook.pytest_report_from_serializable(config=config, data=data)
                rep.user_properties.extend(image_props)
                outcome.phases.append(rep.when)
                if rep.when == "setup":
                    rep.duration += setup_extra
                    outcome.setup_passed = rep.passed
                if rep.when == "teardown":
                    outcome.teardown = rep
                else:
                    _log(item, rep)
            elif kind == "warning":
                _reemit_warning(msg)
            elif kind == "done":
                # Stop here: the end of stream would come only once the child's exit (and
                # its namespaces' teardown) is over, which retire() takes off this path.
                outcome.done = True
                break
            if deadline is not None:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
    except TimeoutError:
        outcome.timed_out = True


def _reemit_warning(msg: dict[str, Any]) -> None:
    module, _, name = msg["category"].rpartition(".")
    category: type[Warning] = UserWarning
    with contextlib.suppress(Exception):
        found = getattr(importlib.import_module(module), name)
        if isinstance(found, type) and issubclass(found, Warning):
            category = found
    warnings.warn_explicit(msg["message"], category, msg["filename"], msg["lineno"])


def _basetemp(config: pytest.Config) -> str | None:
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is None:
        return None
    return str(factory.getbasetemp())


def _report_crash(
    item: pytest.Item, tc: TestContainer, outcome: _Outcome, start: float
) -> pytest.TestReport:
    """A child that died (or timed out) becomes a failure of the phase it was in."""
    when: Literal["setup", "call", "teardown"]
    if "setup" not in outcome.phases:
        when = "setup"
    elif outcome.setup_passed and "call" not in outcome.phases:
        when = "call"
    else:
        when = "teardown"
    if outcome.timed_out:
        what = (
            f"Timeout: the test exceeded its timeout of {tc.timeout:g} s; its container was killed"
        )
    else:
        what = f"The test's container crashed during {when}: {outcome.status}"
    sections = []
    capman = item.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        with contextlib.suppress(Exception):
            out, err = capman.read_global_capture()
            if out:
                sections.append((f"Captured stdout {when}", out))
            if err:
                sections.append((f"Captured stderr {when}", err))
    stop = time.time()
    rep = pytest.TestReport(
        item.nodeid,
        item.location,
        {k: 1 for k in item.keywords},
        "failed",
        what,
        when,
        sections,
        stop - start,
        start,
        stop,
        user_properties=[*item.user_properties, ("container_image", tc.image)],
    )
    if when == "teardown":
        return rep
    _log(item, rep)
    # The sequence stays whole (a teardown report closes every test) without counting twice.
    return pytest.TestReport(
        item.nodeid, item.location, {}, "passed", None, "teardown", [], 0.0, stop, stop
    )
