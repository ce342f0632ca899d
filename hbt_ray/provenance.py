"""Where a number came from: :func:`provenance` — the command, commit, date and host that produced a
result file — so that every file under ``results/`` can say how to regenerate it.

    >>> p = provenance("python -m hbt_ray.evaluate --model tiny")
    >>> sorted(p)
    ['command', 'commit', 'date', 'host']
    >>> sorted(p["host"])
    ['cores', 'cpu', 'hostname', 'memory_gib', 'python', 'torch', 'torch_threads']
    >>> print(provenance_lines({"command": "make run", "commit": "abc1234", "date": "2026-12-02T10:00:00Z",
    ...        "host": {"hostname": "box", "cpu": "Xeon", "cores": 2, "torch_threads": 2, "memory_gib": 23.4}}, "tiny"))
    - command: `make run`
    - commit: `abc1234`
    - date: 2026-12-02T10:00:00Z
    - host: box, Xeon, 2 cores, 2 torch threads, 23.4 GiB memory
    - model: tiny
    >>> seconds_since({"date": "2026-12-02T10:00:00Z"}, now="2026-12-02T10:57:30Z")
    3450.0
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]


def git_commit(repo: Path = _REPO) -> str:
    """HEAD's hash, ``+dirty(<files>)`` when tracked files outside ``results/`` differ from it (the first
    three named);
    ``unknown`` outside a git checkout (an installed wheel) — a result then says so rather than naming a
    commit it did not come from."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()  # fmt: skip
        # results/ holds outputs, not the code that made them: a result file rewritten by an earlier
        # step of a regeneration does not make the code dirty
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":(exclude)results"],
                               capture_output=True, text=True, timeout=10, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    files = [line[3:] for line in dirty.splitlines() if line.strip()]  # "XY path": two status letters, a space
    if not files:
        return head
    return f"{head}+dirty({', '.join(files[:3])}{', …' if len(files) > 3 else ''})"


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    """The machine's memory (``/proc/meminfo``), GiB: what decides whether a benchmark's side fits."""
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as a benchmark prints them beside its numbers (other work
    on the box shows there)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def host_facts() -> dict[str, Any]:
    """Hostname, CPU, cores this process may use, torch's intra-op threads, memory, Python and torch
    versions."""
    try:
        import torch

        threads, torch_version = torch.get_num_threads(), torch.__version__
    except ImportError:  # provenance must not be what fails
        threads, torch_version = None, None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"hostname": socket.gethostname(), "cpu": cpu_model(), "cores": cores, "torch_threads": threads,
            "memory_gib": memory_gib(), "python": platform.python_version(), "torch": torch_version}  # fmt: skip


def provenance(command: str | None = None) -> dict[str, Any]:
    """The command (default: this process's ``sys.argv``), commit, UTC date and host of a result."""
    if command is None:
        command = " ".join([_program(), *(shlex.quote(a) for a in sys.argv[1:])])
    date = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    return {"command": command, "commit": git_commit(), "date": date, "host": host_facts()}


def _program() -> str:
    """How this process was started: ``python -m hbt_ray.tune`` for a package's ``__main__``, else
    ``python <script>``."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "__main__.py":
        try:
            return "python -m " + ".".join(argv0.resolve().parent.relative_to(_REPO).parts)
        except ValueError:
            return "python -m " + argv0.parent.name
    if argv0.suffix == ".py":
        try:
            return "python " + str(argv0.resolve().relative_to(_REPO))
        except ValueError:
            return "python " + str(argv0)
    return argv0.name


def seconds_since(prov: dict[str, Any], now: str | None = None) -> float:
    """Seconds from a provenance's ``date`` (a run's start) to ``now`` (default: now): a run's wall time."""
    end = _utc(now) if now else _dt.datetime.now(_dt.timezone.utc)
    return (end - _utc(prov["date"])).total_seconds()


def _utc(date: str) -> _dt.datetime:
    return _dt.datetime.strptime(date, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=_dt.timezone.utc)


def provenance_lines(prov: dict[str, Any], model: str | None = None) -> str:
    """Markdown bullet lines for the head of a report."""
    host = prov.get("host", {})
    lines = [f"- command: `{prov.get('command')}`", f"- commit: `{prov.get('commit')}`", f"- date: {prov.get('date')}",
             f"- host: {host.get('hostname')}, {host.get('cpu')}, {host.get('cores')} cores, "
             f"{host.get('torch_threads')} torch threads"
             + (f", {host['memory_gib']} GiB memory" if host.get("memory_gib") else "")]  # fmt: skip
    if model is not None:
        lines.append(f"- model: {model}")
    return "\n".join(lines)
