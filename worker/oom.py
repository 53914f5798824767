"""Was a dead pool process killed by the kernel's out-of-memory killer?

The kernel does not tell a parent why its child got SIGKILL. The heuristic (docs/operations.md,
"Faults: queues, sweeps and worker deaths"): the child died of SIGKILL *and* the ``oom_kill``
counter of the worker's memory cgroup went up while it ran the task. That counter counts the
processes of the cgroup killed by an OOM killer, whether the cgroup's own limit or the whole
machine ran out of memory:

- cgroup v2: ``oom_kill`` in ``memory.events`` (hierarchical: it includes the cgroups below)
  (https://docs.kernel.org/admin-guide/cgroup-v2.html#memory-interface-files);
- cgroup v1 (the memory controller still on v1, as in "hybrid" set-ups): ``oom_kill`` in
  ``memory.oom_control`` (since Linux 4.13; this cgroup only).

The cgroup is found from ``/proc/<pid>/cgroup`` and the mount points in
``/proc/self/mountinfo``. No cgroup with such a counter (not Linux, the root cgroup, no memory
controller): :func:`memory_cgroup` returns None, and a SIGKILL is then never read as an OOM
kill.

Nothing here imports torch or Celery.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: Above this, a cgroup v1 ``memory.limit_in_bytes`` means "no limit" (the kernel reports
#: PAGE_COUNTER_MAX pages, about 2**63 bytes).
_V1_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class MemoryCgroup:
    """A memory cgroup directory (``version`` 1 or 2) and its OOM-kill counter."""

    path: Path
    version: int

    @property
    def counter_file(self) -> Path:
        return self.path / ("memory.events" if self.version == 2 else "memory.oom_control")

    def oom_kills(self) -> int | None:
        """How many processes of this cgroup an OOM killer has killed so far; None when the
        counter cannot be read."""
        try:
            text = self.counter_file.read_text()
        except OSError:
            return None
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                try:
                    return int(value)
                except ValueError:
                    return None
        return None

    def limit_bytes(self) -> int | None:
        """The cgroup's memory limit in bytes (``memory.max``, ``memory.limit_in_bytes``);
        None when there is none or it cannot be read."""
        name = "memory.max" if self.version == 2 else "memory.limit_in_bytes"
        try:
            value = (self.path / name).read_text().strip()
            limit = int(value)
        except (OSError, ValueError):  # "max": no limit
            return None
        return None if limit >= _V1_UNLIMITED else limit


def _mounts(mountinfo: Path) -> list[tuple[str, str, str, str]]:
    """``(fstype, root, mount point, super options)`` of each mount (proc(5),
    /proc/pid/mountinfo)."""
    out: list[tuple[str, str, str, str]] = []
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        pre, _, post = line.partition(" - ")
        pre_fields, post_fields = pre.split(), post.split()
        if len(post_fields) < 3:
            continue
        out.append((post_fields[0], pre_fields[3], pre_fields[4], post_fields[2]))
    return out


def _under(mount_point: str, mount_root: str, cgroup_path: str) -> Path:
    rel = cgroup_path
    if mount_root != "/" and (rel == mount_root or rel.startswith(mount_root + "/")):
        rel = rel[len(mount_root):]
    return Path(mount_point) / rel.lstrip("/")


def _cgroup_paths(lines: list[str]) -> tuple[str | None, str | None]:
    """The cgroup v2 path and the v1 memory controller's path in ``/proc/<pid>/cgroup``
    lines (``hierarchy:controllers:path``; v2 is ``0::path``)."""
    v2_path = v1_path = None
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            v2_path = path
        elif "memory" in controllers.split(","):
            v1_path = path
    return v2_path, v1_path


def memory_cgroup(pid: int | str = "self", *, proc: Path = Path("/proc")) -> MemoryCgroup | None:
    """The memory cgroup of process ``pid`` whose OOM-kill counter can be read: cgroup v2
    when its directory has ``memory.events``, else the v1 memory controller's. None when
    neither can be found (see the module docstring). Raises nothing."""
    try:
        lines = (proc / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return None
    v2_path, v1_path = _cgroup_paths(lines)
    candidates = []
    for fstype, root, point, opts in _mounts(proc / "self" / "mountinfo"):
        if fstype == "cgroup2" and v2_path is not None:
            candidates.append(MemoryCgroup(_under(point, root, v2_path), 2))
        elif fstype == "cgroup" and v1_path is not None and "memory" in opts.split(","):
            candidates.append(MemoryCgroup(_under(point, root, v1_path), 1))
    candidates.sort(key=lambda cg: -cg.version)  # v2 first
    return next((cg for cg in candidates if cg.counter_file.exists()), None)


def exit_signal(message: str) -> int | None:
    """The signal number in billiard's ``WorkerLostError`` text ("Worker exited prematurely:
    signal 9 (SIGKILL) Job: 0."; ``billiard.common.human_status``), else None."""
    marker = "signal "
    at = message.find(marker)
    if at < 0:
        return None
    digits = ""
    for ch in message[at + len(marker):]:
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else None


def killed_by_oom(signum: int | None, before: int | None, after: int | None) -> bool:
    """The heuristic: a death by SIGKILL while the cgroup's OOM-kill counter went from
    ``before`` to a larger ``after``. False when either count is unknown."""
    return (signum == signal.SIGKILL and before is not None and after is not None
            and after > before)


def describe_oom(pid: int, cgroup: MemoryCgroup | None, before: int | None,
                 after: int | None) -> str:
    """The ``out_of_memory`` error message for pool process ``pid``, naming the memory."""
    where = "its memory cgroup"
    limit = None
    if cgroup is not None:
        where = f"memory cgroup {cgroup.path}"
        limit = cgroup.limit_bytes()
    if limit is not None:
        room = f"the worker's memory limit of {limit / 2**20:.0f} MiB"
    else:
        total = _machine_memory_bytes()
        room = ("the machine's memory" if total is None
                else f"the machine's memory ({total / 2**20:.0f} MiB)")
    return (f"the worker process (pid {pid}) was killed by the kernel's out-of-memory killer "
            f"(SIGKILL while the oom_kill count of {where} rose from {before} to {after}): "
            f"training needed more than {room}; use a smaller batch_size, seq_len or model, "
            f"or give the worker more memory")


def _machine_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
