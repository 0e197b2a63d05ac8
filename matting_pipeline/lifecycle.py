"""Processes die with the stage that started them; a stage dies with its launcher.

A stage that is killed (``kill -9``, out of memory, its DVC killed) must leave nothing
running: the next ``dvc repro`` would otherwise run beside an orphan. Three mechanisms,
Linux only (elsewhere they do nothing):

- **Pool workers** forked by :func:`matting_pipeline.shards.parallel_map` call
  :func:`die_with_parent` first: ``PR_SET_PDEATHSIG`` makes the kernel SIGKILL them the
  moment the stage's process ends (they used to block on their queue forever).
- **Everything else the stage starts** (a local Ray's GCS, raylet, agents and workers: the
  agents outlived a killed driver by about a minute): :func:`install`, called by
  ``python -m stages.<name>`` and the ``matting`` command before any work, starts a small
  *reaper* process. Every 0.1 s it checks the stage is alive and every 0.5 s records the
  stage's process tree. When the stage ends, whatever way, it SIGKILLs the recorded
  descendants still alive (same pid *and* start time, so a reused pid is never hit) and any
  process carrying the stage's token in its environment, then exits.
- **The launcher.** Under DVC (``DVC_STAGE`` set) the reaper also watches the ``dvc``
  process that runs the stage, and any pid listed in ``MATTING_LAUNCHER_PIDS`` (the
  pipeline runners put theirs there). When one dies the stage and its tree are killed:
  a stage must not go on alone after ``kill -9`` of its ``dvc`` (its training state is
  saved every ``checkpoint_every`` steps, so the next run resumes).

A stage run straight from a shell watches no launcher: closing a terminal behaves as it
always does for a foreground command.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

TOKEN_VARIABLE = "MATTING_STAGE_TOKEN"
LAUNCHERS_VARIABLE = "MATTING_LAUNCHER_PIDS"
_PR_SET_PDEATHSIG = 1
_POLL_S = 0.1
_TREE_EVERY_S = 0.5
_installed = False


# ----------------------------------------------------------------------------- /proc


def _stat(pid: int) -> tuple[int, str, int] | None:
    """``(ppid, state, start time in clock ticks)`` of ``pid``, None when it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # the command name may hold spaces and ')'
    return int(fields[1]), fields[0], int(fields[19])


def _running(info: tuple[int, str, int] | None) -> bool:
    """A :func:`_stat` of a process that exists and is not a zombie (or dead)."""
    return info is not None and info[1] not in ("Z", "X")


def alive(pid: int, start: int | None = None) -> bool:
    """Whether ``pid`` runs (a zombie does not) and, given ``start``, is the same process."""
    info = _stat(pid)
    return _running(info) and (start is None or info[2] == start)


def identity(pid: int) -> str | None:
    """``"<pid>:<start time>"``, a name no later process with the same pid can have."""
    info = _stat(pid)
    return None if info is None else f"{pid}:{info[2]}"


def _parse_identity(text: str) -> tuple[int, int | None]:
    pid, _, start = text.partition(":")
    return int(pid), (int(start) if start else None)


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def descendants(root: int) -> dict[int, int]:
    """``{pid: start time}`` of every live descendant of ``root``."""
    children: dict[int, list[tuple[int, int]]] = {}
    for pid in _all_pids():
        info = _stat(pid)
        if _running(info):
            children.setdefault(info[0], []).append((pid, info[2]))
    found: dict[int, int] = {}
    todo = [root]
    while todo:
        for pid, start in children.get(todo.pop(), ()):
            if pid not in found:
                found[pid] = start
                todo.append(pid)
    return found


def _carrying(token: str) -> dict[int, int]:
    """Processes whose environment holds ``MATTING_STAGE_TOKEN=<token>`` (exec'd descendants)."""
    needle = f"{TOKEN_VARIABLE}={token}".encode()
    found = {}
    for pid in _all_pids():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            info = _stat(pid)
            if info is not None:
                found[pid] = info[2]
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        return [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0") if a]
    except OSError:
        return []


def _is_dvc(argv: list[str]) -> bool:
    """``dvc ...``, ``python .../bin/dvc ...`` or ``python -m dvc ...``."""
    heads = [Path(a).name for a in argv[:3]]
    return "dvc" in heads or any(argv[i:i + 2] == ["-m", "dvc"] for i in range(min(len(argv), 3)))


def dvc_ancestor(pid: int, levels: int = 4) -> int | None:
    """The nearest ``dvc`` process among ``pid``'s ancestors (DVC runs a stage through a shell)."""
    for _ in range(levels):
        info = _stat(pid)
        if info is None or info[0] <= 1:
            return None
        pid = info[0]
        if _is_dvc(_cmdline(pid)):
            return pid
    return None


# ----------------------------------------------------------------------------- the stage side


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent ends (a pool initializer);
    exit at once when the parent is already gone."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def launchers() -> list[str]:
    """Identities of the processes this stage must not outlive: its ``dvc`` (when DVC runs
    it) and the pids a pipeline runner listed in ``MATTING_LAUNCHER_PIDS``."""
    found = []
    if os.environ.get("DVC_STAGE"):
        pid = dvc_ancestor(os.getpid())
        if pid is not None and (ident := identity(pid)):
            found.append(ident)
    for item in os.environ.get(LAUNCHERS_VARIABLE, "").split(","):
        if item.strip():
            found.append(item.strip())
    return found


def launcher_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with this process added to ``MATTING_LAUNCHER_PIDS``:
    for a runner that starts stages, so they die with it."""
    env = dict(os.environ if env is None else env)
    own = identity(os.getpid())
    listed = [i for i in env.get(LAUNCHERS_VARIABLE, "").split(",") if i]
    env[LAUNCHERS_VARIABLE] = ",".join([*listed, own] if own else listed)
    return env


def install(name: str = "stage") -> subprocess.Popen | None:
    """Start the reaper for this process (once per process; Linux). Returns it (tests)."""
    global _installed
    if _installed or not sys.platform.startswith("linux") or not Path("/proc/self/stat").exists():
        return None
    _installed = True
    token = uuid.uuid4().hex
    os.environ[TOKEN_VARIABLE] = token  # inherited by every program the stage starts
    own = identity(os.getpid())
    env = {k: v for k, v in os.environ.items() if k != TOKEN_VARIABLE}
    return subprocess.Popen(
        [sys.executable, "-m", "matting_pipeline.lifecycle", own or str(os.getpid()), token, name, *launchers()],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True,
    )


# ----------------------------------------------------------------------------- the reaper


def _kill(targets: dict[int, int]) -> list[str]:
    """SIGKILL the live processes of ``targets`` (pid and start time match); their names."""
    killed = []
    for pid, start in targets.items():
        if pid != os.getpid() and alive(pid, start):
            name = (_cmdline(pid) or ["?"])[0]
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(Path(name).name if name.startswith("/") else name)
            except ProcessLookupError:
                pass
    return killed


def reap(stage: str, token: str, watched: Iterable[str], name: str = "stage") -> int:
    """Wait for the stage to end (or a watched launcher to die, then kill the stage), then
    kill what it left; returns how many processes were killed."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # a Ctrl-C for the group: let the stage go first, then sweep
    pid, start = _parse_identity(stage)
    launchers_ = [_parse_identity(w) for w in watched]
    tree: dict[int, int] = {}
    next_tree = 0.0
    reason = None
    while reason is None:
        if not alive(pid, start):
            reason = "ended"
            break
        for lpid, lstart in launchers_:
            if not alive(lpid, lstart):
                reason = f"its launcher {' '.join(_cmdline(lpid)[:2]) or lpid} (pid {lpid}) died"
        if reason is not None:
            if alive(pid, start):
                tree.update(descendants(pid))
                os.kill(pid, signal.SIGKILL)
            break
        now = time.monotonic()
        if now >= next_tree:
            tree.update(descendants(pid))
            tree = {p: s for p, s in tree.items() if alive(p, s)}
            next_tree = now + _TREE_EVERY_S
        time.sleep(_POLL_S)
    killed: list[str] = []
    for _ in range(3):  # again while processes were forking as their parents were killed
        now_killed = _kill({**tree, **_carrying(token)})
        if not now_killed:
            break
        killed += now_killed
        time.sleep(0.2)
    if killed or reason != "ended":
        what = f"stopped {len(killed)} process(es) it had started: {', '.join(sorted(set(killed)))}" if killed \
            else "nothing else was running"
        try:
            print(f"[{name}] {reason}; {what}", file=sys.stderr, flush=True)
        except OSError:
            pass
    return len(killed)


if __name__ == "__main__":
    reap(sys.argv[1], sys.argv[2], sys.argv[4:], sys.argv[3])
