"""What every process of a run shares: the console prefix, how Ray is started, and keeping Ray quiet.

trainer.py, tune.py, study.py and worker.py import this module; it imports none of them, so the
driver, the Tune trial actors and the Ray Train workers agree on one prefix and one Ray set-up
without an import cycle. Ray itself is imported only inside the functions that need it.

Console policy (issue 14, item 14): the console shows kn_dist's own progress lines, Tune's status
table and real errors. Ray's INFO/WARNING records stay in Ray's log files under
/tmp/ray/session_latest/logs (train/ for Ray Train's own files).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from kn_dist.ray_compat import PREEMPTION_WATCHER_ENV_VAR, PRINT_PATCH_ENV_VAR

PROGRESS_PREFIX = "[kn-dist]"

# Settings every Ray worker process of a kn_dist job needs. They travel in the job's runtime_env, so
# they reach the workers of a remote cluster too (a driver's os.environ does not, issue 12 item 4).
WORKER_ENV_VARS = {PRINT_PATCH_ENV_VAR: "0"}  # our progress lines once, not twice
WORKER_SETUP_HOOK = "kn_dist.runtime.quiet_ray_logs"


# Wall-clock marks of this process's start-up, kept as an MLflow tag per run (kn_dist.timeline.driver,
# kn_dist.timeline.rank0) so the cost of starting a run can be read next to the run: `kn-dist bench startup`.
TIMELINE_TAG = "kn_dist.timeline.{role}"
_timeline: dict[str, float] = {}


def mark(name: str) -> None:
    """Record that this process reached `name` now (the first time only)."""
    _timeline.setdefault(name, time.time())


def restart_timeline(name: str) -> None:
    """Forget earlier marks (a process that runs several loops, e.g. a reused actor) and mark `name`."""
    _timeline.clear()
    mark(name)


def timeline_json() -> str:
    """This process's marks, oldest first, as JSON ({"name": unix seconds})."""
    return json.dumps(dict(sorted(_timeline.items(), key=lambda kv: kv[1])))


def say(message: str) -> None:
    """One kn_dist progress line on the console (stdout, flushed: Ray forwards worker output line by line)."""
    print(f"{PROGRESS_PREFIX} {message}", flush=True)


# glibc's mallopt parameters (malloc.h): M_TRIM_THRESHOLD and M_MMAP_MAX.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
HEAP_KEEP_BYTES = 1 << 30
_heap_kept = False


def keep_freed_cpu_memory() -> bool:
    """Reuse freed CPU tensor memory instead of returning it to the OS at every free (glibc only).

    Why: by default glibc serves each allocation above its (dynamic) mmap threshold with fresh pages
    and trims the heap's top when memory is freed, so a CPU training step that allocates the same large
    temporaries every step page-faults them in again every step. Measured on the 2-core dev machine
    (batch 32, fp32): KNResNet-18 took 220 k minor faults and 1.11 s per step, 0.82 s with this; BN
    ResNet-18 and DenseNet, which reuse their blocks, were unchanged. Allocations then come from the
    heap (no mmap) and up to HEAP_KEEP_BYTES of free memory stays mapped: resident memory stays at the
    step's peak, which the next step needs again. GPU memory has its own caching allocator.
    Returns whether it is in effect (False on other C libraries, where nothing is changed).
    """
    global _heap_kept
    if _heap_kept:
        return True
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    _heap_kept = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, HEAP_KEEP_BYTES))
    return _heap_kept


def quiet_ray_logs() -> None:
    """Keep Ray's own INFO and WARNING records off the console in this process (they still reach Ray's files).

    Runs as Ray's `worker_process_setup_hook` in every worker process of the job, and on the driver.
    Ray Train configures its `ray.train` logger itself when a worker starts; its console output is
    filtered by the RunConfig's LoggingConfig (kn_dist.trainer), not here.
    """
    logging.getLogger("ray").setLevel(logging.ERROR)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..."
    sys.unraisablehook = _quiet_shutdown_exit


def _quiet_shutdown_exit(unraisable: Any) -> None:
    """Drop the one "Exception ignored in ... SystemExit" a Ray worker prints when it is stopped at shutdown.

    Ray's SIGTERM handler raises SystemExit; when the signal lands inside a garbage-collection callback
    Python cannot raise it and prints it as a traceback, which reads as a failure. Every other
    unraisable exception still reaches Python's default hook.
    """
    if isinstance(unraisable.exc_value, SystemExit):
        return
    sys.__unraisablehook__(unraisable)


def ray_runtime_env(*, local: bool = False) -> dict[str, Any]:
    """The runtime_env of every kn_dist Ray job: worker env vars and the log-quieting hook."""
    env_vars = dict(WORKER_ENV_VARS)
    if local:
        env_vars[PREEMPTION_WATCHER_ENV_VAR] = "0"  # one machine cannot be preempted (ray_compat)
    return {"env_vars": env_vars, "worker_process_setup_hook": WORKER_SETUP_HOOK}


def is_local_address(address: str | None) -> bool:
    """True when `init_ray(address)` starts a Ray of its own on this machine rather than joining a cluster."""
    chosen = address or os.environ.get("RAY_ADDRESS")
    return chosen in (None, "", "local")


def init_ray(
    address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = False, worker_output: bool = True
) -> bool:
    """Start a local Ray (no address and no RAY_ADDRESS, or "local") or join a cluster; False if Ray was up.

    A local Ray starts its dashboard only when asked (it costs a process and start-up time): sweeps whose
    trials are TorchTrainers need it, because Ray Train's placement-group cleaner asks the dashboard's
    state API whether a stopped trial's controller is gone before it frees the trial's workers. Ray's own
    log records below ERROR stay in its files. Joining a cluster ("auto", "ray://...", host:port) uses
    the same runtime_env, so remote workers get the same settings. `worker_output=False` keeps the workers'
    stdout and stderr in Ray's log files (sweeps and studies print their own lines, kn_dist.tune_console).
    """
    import ray

    if ray.is_initialized():
        return False
    local = is_local_address(address)
    kwargs: dict[str, Any] = {
        # "local": our own Ray even when `ray start` left a cluster on this machine.
        "address": "local" if local else (address or os.environ.get("RAY_ADDRESS")),
        "logging_level": logging.ERROR,
        "log_to_driver": worker_output,  # `kn-dist train`: our progress lines are printed by rank 0 of the workers
        "runtime_env": ray_runtime_env(local=local),
    }
    if local:
        kwargs["include_dashboard"] = dashboard
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
    quiet_ray_logs()
    ray.init(**kwargs)
    return True
