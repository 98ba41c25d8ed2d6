"""Lightning's popen launcher (the first process re-runs the command line for the other local
ranks), with a watch that names a child that died.

Lightning's own watch polls the children every 5 s and, when one ended badly, kills every
process after one log line; the user mostly sees the survivors' gloo tracebacks. This watch
polls every half second and prints which rank died, how (exit code or signal) and in which phase
(its status file, :mod:`lightning_real.distributed.status`)::

    lightning-real: rank 1 (pid 4242) died (killed by SIGKILL) during actor_gen at step 1; stopping the other ranks

It then gives the first process ``grace_s`` to fail on its own (it usually reports the same rank
from the collective that broke, and exits non-zero), and kills what is left, as Lightning does.
When the first process fails by itself, :meth:`RealLauncher.stop_children` stops the children,
which would otherwise wait in their next collective until it times out.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.fabric.plugins import ClusterEnvironment
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from typing_extensions import override

from lightning_real.distributed.status import exit_text, read_state

PREFIX = "lightning-real"


class RealLauncher(_SubprocessScriptLauncher):
    """:class:`_SubprocessScriptLauncher` with :class:`ChildWatch` in place of Lightning's watch.

    ``status_folder`` returns the run's status folder once the strategy has set it up (None
    before).
    """

    def __init__(
        self,
        cluster_environment: ClusterEnvironment,
        num_processes: int,
        num_nodes: int,
        status_folder: Callable[[], Path | None],
        grace_s: float = 5.0,
    ) -> None:
        super().__init__(cluster_environment, num_processes, num_nodes)
        self.status_folder = status_folder
        self.grace_s = grace_s
        self.stopping = False
        """Set when this process stops the children itself: their ends are not news then."""

    @override
    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        # Lightning's launch, with this module's watch.
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            ChildWatch(self).start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)

    def global_rank(self, child: int) -> int:
        """Global rank of ``self.procs[child]`` (local ranks 1.. of this node)."""
        return self.cluster_environment.node_rank() * self.num_processes + child + 1

    def child_procs(self) -> dict[int, Any]:
        """This node's child processes by global rank."""
        return {self.global_rank(i): p for i, p in enumerate(self.procs)}

    def stop_children(self) -> None:
        """Kill the children (they would wait for this process in their next collective)."""
        self.stopping = True
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)


class ChildWatch(threading.Thread):
    """Polls the launcher's children; reports the first that ends badly, then stops the run."""

    def __init__(self, launcher: RealLauncher, period_s: float = 0.5) -> None:
        super().__init__(daemon=True, name="lightning-real-child-watch")  # ends with the process
        self.launcher = launcher
        self.period_s = period_s

    @override
    def run(self) -> None:
        while True:
            time.sleep(self.period_s)
            codes = [p.poll() for p in self.launcher.procs]
            if self.launcher.stopping or all(c == 0 for c in codes):
                return
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                self._report(failed[0], int(codes[failed[0]] or 0))
                self._stop()
                return

    def _report(self, child: int, code: int) -> None:
        rank = self.launcher.global_rank(child)
        proc = self.launcher.procs[child]
        where = ""
        folder = self.launcher.status_folder()
        if folder is not None:
            state = read_state(folder, rank)
            if state is not None:
                where = f" during {state.phase} at step {state.step}"
        print(
            f"{PREFIX}: rank {rank} (pid {proc.pid}) died ({exit_text(code)}){where}; stopping the other ranks",
            file=sys.stderr,
            flush=True,
        )

    def _stop(self) -> None:
        # The first process usually fails by itself within the grace period (this thread ends
        # with it); whatever is still there afterwards is killed, as Lightning's watch does.
        time.sleep(self.launcher.grace_s)
        self.launcher.stopping = True
        for p in self.launcher.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
