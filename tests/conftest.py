"""Shared fixtures, the marker rules, and the private network namespace for Ray tests (tests/README.md).

The model cache defaults to <repo>/.cache/mola-search (git-ignored) for tests.

Markers: `integration` and `netns` imply `slow`, so `pytest -m "not slow"` is the fast loop. Tests marked
`netns` start or join Ray clusters. Ray rewrites 127.0.0.1 to the machine's routable address wherever
there is one, so these tests run where 127.0.0.1 is the only address: in a private network namespace.
When this pytest runs in the machine's own namespace, every selected `netns` test is run by one child
pytest (`unshare -n`, loopback up) at the point where the first of them comes, and the child's reports
become this session's: they count, show and fail as if the tests had run here. Where `unshare -n` is not
permitted, the `netns` tests are skipped and say why. A pytest already inside such a namespace (only `lo`)
runs them itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

# Set before anything reads it, and only if the caller has not chosen a cache already, so the
# embedded model is converted once per checkout rather than into the user's home cache.
REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("MOLA_CACHE_DIR", str(REPO / ".cache" / "mola-search"))


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M-Instruct in fp32, with its tokenizer (converted once, cached)."""
    from mola_search.models import load_base_model

    return load_base_model(None, dtype="fp32")


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    """The SmolLM2 tokenizer (shared: do not change its settings in a test)."""
    return smollm2[1]


@pytest.fixture
def tiny_model():
    """A fresh 4-layer random LLaMA (fp32, frozen); cheap enough to build per test."""
    from mola_search.models import tiny_llama

    return tiny_llama(num_layers=4)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny-model ops are too small to split: one thread is faster, and far faster on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------ markers

IMPLY_SLOW = ("integration", "netns")


def private_netns() -> bool:
    """True inside a network namespace of our own: loopback is the only interface."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def _loopback_up() -> bool:
    """Whether `lo` is up in this process's network namespace (SIOCGIFFLAGS; /sys shows the machine's)."""
    try:
        import fcntl
        import struct

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            request = fcntl.ioctl(s.fileno(), 0x8913, struct.pack("16sH22x", b"lo", 0))  # SIOCGIFFLAGS
        return bool(struct.unpack("16sH22x", request)[1] & 0x1)  # IFF_UP
    except (ImportError, OSError):
        return True  # cannot tell: let the tests say


# The child pytest finds its instructions in this folder (which tests to run, where to write their reports);
# conftest takes the variable out of the environment, so that no process a test starts inherits it.
CHILD = "MOLA_NETNS_CHILD"
_CHILD_DIR: list[Path] = [Path(os.environ.pop(CHILD))] if os.environ.get(CHILD) else []


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: `-m "not slow"` must see the implied marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(name) for name in IMPLY_SLOW) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
    if _CHILD_DIR:  # the child runs exactly the tests its parent handed it, nothing else
        wanted = set(json.loads((_CHILD_DIR[0] / "nodeids.json").read_text()))
        keep = [item for item in items if item.nodeid in wanted]
        config.hook.pytest_deselected(items=[item for item in items if item.nodeid not in wanted])
        items[:] = keep


# ------------------------------------------------------------------------------------------ netns


def _unshare() -> tuple[list[str] | None, str]:
    """The `unshare` command that gives this process a private network namespace with loopback up
    (as root, or else in a user namespace where those are allowed), or None and why not."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return None, "needs unshare(1) and ip(8) (util-linux, iproute2) for a private network namespace"
    errors = []
    for command in (["unshare", "-n"], ["unshare", "-r", "-n"]):
        probe = subprocess.run([*command, "--", "ip", "link", "set", "lo", "up"], capture_output=True, text=True,
                               timeout=60)
        if probe.returncode == 0:
            return command, ""
        errors.append(f"{' '.join(command)}: {probe.stderr.strip()[-200:]}")
    return None, ("`unshare -n` is not permitted here (run as root, or allow unprivileged user namespaces): "
                  + "; ".join(errors))


class NetnsChild:
    """Runs the session's `netns` tests in one child pytest inside `unshare -n` and hands back their reports."""

    def __init__(self, config, items, command: list[str]) -> None:
        self.config, self.items, self.command = config, items, command
        self.reports: dict[str, list] | None = None
        self.problem = ""

    def _folder(self) -> Path:
        try:  # beside this session's tmp_path folders (pytest keeps the last few sessions')
            base = self.config._tmp_path_factory.getbasetemp()
        except AttributeError:
            import tempfile

            base = Path(tempfile.mkdtemp(prefix="pytest-netns-"))
        folder = base / "netns"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _argv(self, folder: Path) -> list[str]:
        option = self.config.option
        files = list(dict.fromkeys(str(item.path) for item in self.items))  # in the session's order
        argv = [sys.executable, "-m", "pytest", *files, "-v", "-p", "no:cacheprovider",
                "--rootdir", str(self.config.rootpath), "--basetemp", str(folder / "tmp")]
        if self.config.inipath:
            argv += ["-c", str(self.config.inipath)]
        for flag, value in (("--tb", getattr(option, "tbstyle", None)), ("--capture", getattr(option, "capture", None)),
                            ("--import-mode", getattr(option, "importmode", None))):
            if value:
                argv.append(f"{flag}={value}")
        argv += ["-l"] if getattr(option, "showlocals", False) else []
        for override in getattr(option, "override_ini", None) or []:
            argv += ["-o", override]
        for warning in getattr(option, "pythonwarnings", None) or []:
            argv += ["-W", warning]
        return [*self.command, "--", "sh", "-c", 'ip link set lo up && exec "$@"', "netns", *argv]

    def run(self) -> None:
        folder = self._folder()
        (folder / "nodeids.json").write_text(json.dumps([item.nodeid for item in self.items]))
        reports_file = folder / "reports.jsonl"
        reports_file.write_text("")
        log = folder / "child.log"
        env = {**os.environ, CHILD: str(folder)}
        env.pop("PYTEST_ADDOPTS", None)  # the child takes what it is given here, nothing more
        terminal = self.config.pluginmanager.get_plugin("terminalreporter")
        if terminal is not None:
            terminal.ensure_newline()
            terminal.write_line(f"netns: {len(self.items)} test(s) run by a child pytest in a private network "
                                f"namespace ({' '.join(self.command)}); its log: {log}")
        with log.open("w") as out:
            proc = subprocess.Popen(self._argv(folder), cwd=self.config.rootpath, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                proc.wait()
            except BaseException:  # Ctrl-C reached the child too: let it tear its clusters down, then stop it
                try:
                    proc.wait(timeout=60)
                except BaseException:
                    proc.kill()
                    proc.wait()
                raise
        self.reports = {}
        collect_errors = []
        for line in reports_file.read_text().splitlines():
            data = json.loads(line)
            if isinstance(data.get("longrepr"), list):  # a skip's (path, line, reason): JSON made it a list
                data["longrepr"] = tuple(data["longrepr"])
            report = self.config.hook.pytest_report_from_serializable(config=self.config, data=data)
            if report.__class__.__name__ == "CollectReport":
                collect_errors.append(f"{report.nodeid}: {report.longreprtext[-2000:]}")
            else:
                self.reports.setdefault(report.nodeid, []).append(report)
        tail = log.read_text(errors="replace")[-3000:]
        self.problem = (f"the netns child pytest (exit status {proc.returncode}) left no result for this test.\n"
                        + "".join(f"collection error in the child: {e}\n" for e in collect_errors)
                        + f"its log ({log}) ends:\n{tail}")

    def report(self, item, nextitem) -> None:
        """Log the child's reports for `item` as this session's, and tear down what `nextitem` does not share."""
        from _pytest.reports import TestReport
        from _pytest.runner import CallInfo

        if self.reports is None:
            self.run()
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        reports = self.reports.get(item.nodeid) or [
            TestReport(item.nodeid, item.location, {k: 1 for k in item.keywords}, "failed", self.problem, "call")]
        # Fixtures of the test before, which pytest keeps up for the next test when it shares their scope:
        # tear down here what the test after this one does not share (pytest's own protocol does the same).
        call = CallInfo.from_call(lambda: item.session._setupstate.teardown_exact(nextitem), when="teardown")
        if call.excinfo is not None:
            reports = [*reports, TestReport.from_item_and_call(item, call)]
        for report in reports:
            ihook.pytest_runtest_logreport(report=report)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)


def pytest_collection_finish(session):
    config = session.config
    if _CHILD_DIR and not private_netns():
        pytest.exit(f"{CHILD} is set but this pytest is not in a private network namespace", returncode=3)
    items = [item for item in session.items if item.get_closest_marker("netns")]
    if not items or config.option.collectonly:
        return
    if private_netns():  # this pytest has a network namespace of its own: they run here, as any other test
        if not _loopback_up():
            for item in items:
                item.add_marker(pytest.mark.skip(reason="loopback is down in this network namespace: "
                                                        "`ip link set lo up` first"))
        return
    command, why = _unshare()
    if command is None:
        for item in items:
            item.add_marker(pytest.mark.skip(reason=why))
        return
    child = NetnsChild(config, items, command)
    for item in items:
        item.stash[_NETNS] = child


_NETNS = pytest.StashKey[NetnsChild]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    child = item.stash.get(_NETNS, None)
    if child is None:
        return None  # pytest runs it here, as usual
    child.report(item, nextitem)
    return True


def _hand_over(report) -> None:
    """In the child: append a report for the parent to log as its own."""
    with (_CHILD_DIR[0] / "reports.jsonl").open("a") as f:
        f.write(json.dumps(_CONFIG[0].hook.pytest_report_to_serializable(config=_CONFIG[0], report=report)) + "\n")


def pytest_runtest_logreport(report):
    if _CHILD_DIR:
        _hand_over(report)


def pytest_collectreport(report):
    if _CHILD_DIR and report.failed:
        _hand_over(report)


_CONFIG: list = []


def pytest_configure(config):
    _CONFIG[:] = [config]


# ------------------------------------------------------------------------------------------ no Ray outside

# Outside a private network namespace, a test that starts a Ray node (gcs_server, raylet, `ray start`)
# would bind the machine's routable address: refuse it while any test runs here. The `netns` tests are
# not run in this process (the child runs them, or they are skipped), so only an unmarked test trips this.
_RUNNING: list[str] = []
_RAY_NODE = re.compile(r"(^|[\s/])(gcs_server|raylet)(\s|$)|(^|[\s/])ray start(\s|$)")


def _refuse_ray_nodes(event: str, args: tuple) -> None:
    if event != "subprocess.Popen" or not _RUNNING:
        return
    argv = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
    command = " ".join(os.fsdecode(a) if isinstance(a, (bytes, os.PathLike)) else str(a) for a in argv)
    if _RAY_NODE.search(command):
        raise RuntimeError(f"{_RUNNING[0]} starts a Ray node outside a private network namespace, where Ray binds "
                           f"this machine's routable address ({command[:120]}): mark the test `netns` "
                           f"(tests/README.md)")


if not private_netns():
    sys.addaudithook(_refuse_ray_nodes)


def pytest_runtest_logstart(nodeid, location):
    _RUNNING[:] = [nodeid]


def pytest_runtest_logfinish(nodeid, location):
    _RUNNING.clear()
