"""Where each rank is, so that a rank that died or did not arrive can be named.

Every rank keeps one small file in a folder the ranks share on their host, ``rank<r>.json``: its
pid, host, step and the phase it is in (a call, a move, a checkpoint write), rewritten at each
phase change (an atomic rename of a hundred bytes, beside calls of milliseconds to minutes).
Nothing reads the files while the run is healthy. When a collective fails or times out, the rank
that saw it reads its peers' files (:func:`describe_failure`): a peer whose process is gone from
this host died (and how, when the caller knows its exit status), a live peer in another phase is
the one that did not arrive. The launcher reads them too, to say in which phase a child died.
Ranks on other hosts write into their own host's folder: from here they have no status.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.distributed as dist

_COLLECTIVE = re.compile(
    r"gloo|nccl|connection (closed|reset) by peer|timed out waiting|broken pipe|processgroup|socket timeout",
    re.IGNORECASE,
)


class RankFailure(RuntimeError):
    """A collective failed because a peer rank died or did not arrive; the message names it."""


@dataclass(frozen=True)
class RankState:
    """One rank's last written status."""

    rank: int
    """Global rank."""
    pid: int
    """Its process id (on ``host``)."""
    host: str
    """Host name it runs on."""
    step: int
    """Training step it was in."""
    phase: str
    """What it was doing: a call's name, ``realloc of <role> for <call>``, ``checkpoint write ...``."""
    since: float
    """When it entered the phase (``time.time()``)."""


def shared_folder(rank: int) -> Path:
    """A fresh folder for this run's status files, the same path on every rank (collective over
    the default group: rank 0 creates it and broadcasts its name)."""
    name = [str(tempfile.mkdtemp(prefix="lightning-real-status-")) if rank == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(name, src=0)
    folder = Path(str(name[0]))
    folder.mkdir(parents=True, exist_ok=True)  # ranks on other hosts keep theirs locally
    return folder


def exit_text(code: int) -> str:
    """How a process ended, from its exit status (negative: the signal that killed it)."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` of this host has ended (a zombie, not yet reaped, has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state in ("Z", "X")
    except FileNotFoundError:
        return True
    except (OSError, IndexError):  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def first_line(error: BaseException) -> str:
    """The error's message without gloo's source path and advice (``[.../pair.cc:553] ...``)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". This is typically")[0]


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` came from a collective or point-to-point operation (gloo, NCCL)."""
    if isinstance(error, RankFailure):
        return False
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(error, dist_error):
        return True
    return isinstance(error, RuntimeError) and bool(_COLLECTIVE.search(str(error)))


class StatusBoard:
    """This rank's status file in ``folder``, and its peers' files."""

    def __init__(self, folder: Path, rank: int) -> None:
        self.folder = folder
        """The shared folder of the run."""
        self.rank = rank
        """This process's global rank."""
        self.host = socket.gethostname()
        self.state = RankState(rank, os.getpid(), self.host, 0, "setup", time.time())
        """What this rank last wrote."""
        self._write()

    def _write(self) -> None:
        tmp = self.folder / f".rank{self.rank}.json.tmp"
        try:
            tmp.write_text(json.dumps(asdict(self.state)))
            os.replace(tmp, self.folder / f"rank{self.rank}.json")
        except OSError:  # a full or removed /tmp must not stop training; the report says less
            pass

    def enter(self, phase: str, step: int | None = None) -> None:
        """This rank is now in ``phase`` (of ``step``, or the current step)."""
        self.state = RankState(
            self.rank,
            self.state.pid,
            self.host,
            self.state.step if step is None else step,
            phase,
            time.time(),
        )
        self._write()

    @contextlib.contextmanager
    def phase(self, name: str, step: int | None = None) -> Iterator[None]:
        """In ``name`` for the block, then back to the phase before; a block that raises stays
        the phase (it is where this rank failed)."""
        before = self.state
        self.enter(name, step)
        yield
        self.enter(before.phase, before.step)

    def read(self, rank: int) -> RankState | None:
        """Rank ``rank``'s last status on this host (None: it has none here)."""
        return read_state(self.folder, rank)


def read_state(folder: Path, rank: int) -> RankState | None:
    """Rank ``rank``'s last status in ``folder`` (None: it has none there)."""
    try:
        return RankState(**json.loads((folder / f"rank{rank}.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _where(s: RankState) -> str:
    return f"{s.phase} at step {s.step}"


def describe_failure(
    board: StatusBoard,
    world_size: int,
    error: BaseException,
    exit_code: Callable[[int], int | None] | None = None,
    wait_s: float = 2.0,
) -> str:
    """One line naming what failed: dead peers (pid, how they ended when ``exit_code(rank)``
    knows, their last phase), or else the live peers that were elsewhere, and this rank's phase.

    A peer's process may take a moment to end after the connection to it broke: peers that are
    still there are looked at again for up to ``wait_s``.
    """
    me = board.state
    timed_out = "timed out" in str(error).lower() or "timeout" in type(error).__name__.lower()
    here = f"rank {board.rank} {'timed out' if timed_out else 'stopped'} in {_where(me)}: {first_line(error)}"
    peers = {r: board.read(r) for r in range(world_size) if r != board.rank}
    deadline = time.time() + (0.0 if timed_out else wait_s)
    while True:
        dead = {
            r: s for r, s in peers.items() if s is not None and s.host == board.host and process_gone(s.pid)
        }
        if dead or time.time() >= deadline:
            break
        time.sleep(0.1)
    parts = []
    for r, s in sorted(dead.items()):
        code = exit_code(r) if exit_code is not None else None
        how = f"died ({exit_text(code)})" if code is not None else "died"
        parts.append(f"rank {r} (pid {s.pid}) {how} during {_where(s)}")
    if dead:
        return f"{'; '.join(parts)}; {here}"
    unknown = sorted(r for r, s in peers.items() if s is None or s.host != board.host)
    elsewhere = {r: s for r, s in peers.items() if s is not None and r not in unknown and s.phase != me.phase}
    now = time.time()
    for r, s in sorted(elsewhere.items()):
        parts.append(f"rank {r} (pid {s.pid}, alive) is in {_where(s)} for {now - s.since:.0f} s")
    if unknown:
        parts.append(
            f"no status here for rank(s) {', '.join(map(str, unknown))} (another host, or not started)"
        )
    if not parts:
        parts.append("every other rank on this host is alive and in the same phase")
    return f"{here}; {'; '.join(parts)}"


def exit_codes(procs: Mapping[int, object], wait_s: float = 1.0) -> Callable[[int], int | None]:
    """``exit_code(rank)`` for child processes this process started (``{rank: Popen}``).

    ``Popen.poll`` answers None while another thread (the launcher's watch) polls the same
    child, so an ended child is asked again for up to ``wait_s``.
    """

    def code(rank: int) -> int | None:
        poll = getattr(procs.get(rank), "poll", None)
        if poll is None:
            return None
        deadline = time.time() + wait_s
        while (result := poll()) is None and time.time() < deadline:
            time.sleep(0.05)
        return result if isinstance(result, int) else None

    return code
