"""Training over several processes (several machines): ``--distribute multi-process``.

The engine is Keras's own: ``keras.distribution.initialize()`` joins the processes (JAX backend:
``jax.distributed``), and ``keras.distribution.DataParallel`` spans the devices of every process
(variables replicated, each global batch sharded over all devices, gradients all-reduced by XLA).
``auto_shard_dataset`` is off: each process feeds only its own slice of every global batch
(``batches.TrainBatches(shard=...)``), as Keras asks of numpy/PyDataset inputs in multi-process runs.

This module adds what the engine leaves to the tool:

- ``resolve_launch``: a process's id, the number of processes and the coordinator address, from the
  flags or from the variables that launchers set (``KERAS_DISTRIBUTION_*``, ``JAX_COORDINATOR_ADDRESS``
  / ``JAX_COORDINATOR_PORT``, SLURM's ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_STEP_NODELIST``),
  checked before any work;
- ``join``: the joining, with timeouts: how long to wait for the other processes to join, to hear
  their heartbeats and to wait inside a collective on the CPU (``--peer-timeout``);
- ``ProcessGroup``: the few exchanges the run needs besides the gradients: process 0's plan (recipe,
  run state, precision) sent to all, a check that every process is ready (same recipe, same data,
  same teacher) where any process's refusal stops all of them with the same error, process 0's
  checkpoint sent to the others on ``--resume``, and a final check that every process holds the same
  weights;
- ``PeerLostError``: what a process raises when another one died or stopped answering mid-run.

Only process 0 touches the output folder (lock, checkpoints, logs, curves, models); the others read and
write nothing there, so the folder need not be shared between machines.

What happens when a process dies (measured here on 127.0.0.1, JAX 0.10.2, CPU, gloo):
- the others' next collective fails at once ("Gloo ... Connection reset by peer"): they raise
  ``PeerLostError`` and end without JAX's shutdown barrier (which would wait for the dead process, then
  abort): the process exits at once with the error's code (``_exit_if_lost``, an ``atexit`` hook);
- a process that hangs (stopped, not dead) fails the others' collectives after ``--peer-timeout``
  seconds (``--xla_cpu_collective_timeout_seconds``), or JAX's health check ends them when its
  heartbeats stop for that long (JAX's own message: "Terminating process because the JAX distributed
  service detected fatal errors"), whichever comes first;
- when process 0 itself dies, JAX's health check may end the others before the tool prints its error
  (then the last stderr line is JAX's own, and the exit status 134).
In every case nothing is half-written: only process 0 writes, always through ``fileio`` stages.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from resnet_deploy.errors import ResnetDeployError, TrainError

MULTI_PROCESS = "multi-process"
DEFAULT_PEER_TIMEOUT = 300  # seconds: joining, heartbeats, one collective on the CPU
PEER_TIMEOUT_RANGE = (10, 24 * 3600)
FINISH_WAIT_S = 6 * 3600  # how long the other processes wait at exit for process 0 to write the model
CHUNK_WORDS = 8 << 20  # uint32 words per broadcast piece (32 MiB): one compiled shape for any payload
LAUNCH_FLAGS = ("process_id", "num_processes", "coordinator")


class PeerLostError(TrainError):
    """Another process of a multi-process run died or stopped answering: this one stops too."""

    exit_code = 3


@dataclass(frozen=True)
class Launch:
    """Where this process stands in a multi-process run; ``sources``: where each value came from."""

    process_id: int
    num_processes: int
    coordinator: str  # host:port of process 0's coordination service
    sources: dict = field(default_factory=dict)
    peer_timeout: int = DEFAULT_PEER_TIMEOUT

    def describe(self) -> str:
        origin = sorted(set(self.sources.values()))
        return (f"process {self.process_id} of {self.num_processes}, coordinator {self.coordinator} "
                f"(from {', '.join(origin)}), peer timeout {self.peer_timeout} s")

    def to_dict(self) -> dict:
        return {"process_id": self.process_id, "num_processes": self.num_processes,
                "coordinator": self.coordinator, "sources": dict(self.sources), "peer_timeout_s": self.peer_timeout}


def _first_slurm_host(node_list: str) -> str:
    """The first host of a SLURM node list: ``node001``, ``node[001-016],gpu2`` -> ``node001`` (JAX's rule)."""
    i = next((k for k, ch in enumerate(node_list) if ch in ",["), len(node_list))
    if i == len(node_list) or node_list[i] == ",":
        return node_list[:i]
    rest = node_list[i + 1:]
    j = next((k for k, ch in enumerate(rest) if ch in ",-]"), len(rest))
    return node_list[:i] + rest[:j]


def _env_candidates(environ) -> dict[str, list[tuple[str, str]]]:
    """For each launch value, what the environment offers, in order of precedence: (variable, text)."""
    found: dict[str, list[tuple[str, str]]] = {k: [] for k in LAUNCH_FLAGS}
    jobs = environ.get("KERAS_DISTRIBUTION_JOB_ADDRESSES")
    if jobs:
        found["coordinator"].append(("KERAS_DISTRIBUTION_JOB_ADDRESSES", jobs.split(",")[0].strip()))
    for key, var in (("num_processes", "KERAS_DISTRIBUTION_NUM_PROCESSES"),
                     ("process_id", "KERAS_DISTRIBUTION_PROCESS_ID")):
        if environ.get(var):
            found[key].append((var, environ[var]))
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        found["coordinator"].append(("JAX_COORDINATOR_ADDRESS", environ["JAX_COORDINATOR_ADDRESS"]))
    nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    if environ.get("SLURM_PROCID") and environ.get("SLURM_NTASKS"):
        found["process_id"].append(("SLURM_PROCID", environ["SLURM_PROCID"]))
        found["num_processes"].append(("SLURM_NTASKS", environ["SLURM_NTASKS"]))
        if nodes:
            port = environ.get("JAX_COORDINATOR_PORT")
            if not port and environ.get("SLURM_JOB_ID", "").isdigit():  # JAX's own choice of port under SLURM
                port = str(int(environ["SLURM_JOB_ID"]) % 2 ** 12 + (65535 - 2 ** 12 + 1))
            if port:
                found["coordinator"].append(("SLURM_STEP_NODELIST", f"{_first_slurm_host(nodes)}:{port}"))
    return found


def check_coordinator(address: str, source: str) -> str:
    """``host:port`` (an IPv6 host in brackets), the port 1..65535; refused otherwise."""
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})", address.strip())
    if m is None or not 0 < int(m.group(2)) < 65536:
        raise TrainError(f"The coordinator address {address!r} ({source}) is not usable.",
                         expected="HOST:PORT of process 0, e.g. 10.0.0.1:29500 or node001:29500 "
                                  "(a port from 1 to 65535 that process 0 can listen on)",
                         fix="pass --coordinator HOST:PORT, the same on every process")
    return address.strip()


def _as_int(text, source: str, what: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise TrainError(f"The {what} {text!r} ({source}) is not a whole number.",
                         expected=f"the {what} as an integer") from None


def resolve_launch(process_id: int | None = None, num_processes: int | None = None, coordinator: str | None = None,
                   peer_timeout: int = DEFAULT_PEER_TIMEOUT, environ=None) -> Launch:
    """This process's place in the run: each value from its flag, else from the first variable that
    has it: ``KERAS_DISTRIBUTION_*``, then ``JAX_COORDINATOR_ADDRESS``, then SLURM's. Every value is
    checked here, before any work; a missing one is refused with where it is looked for."""
    environ = os.environ if environ is None else environ
    offered = _env_candidates(environ)
    flags = {"process_id": process_id, "num_processes": num_processes, "coordinator": coordinator}
    values, sources = {}, {}
    for key in LAUNCH_FLAGS:
        if flags[key] is not None:
            values[key], sources[key] = flags[key], "--" + key.replace("_", "-")
        elif offered[key]:
            sources[key], values[key] = offered[key][0]
    missing = [k for k in LAUNCH_FLAGS if k not in values]
    if missing:
        where = {"process_id": "--process-id, KERAS_DISTRIBUTION_PROCESS_ID or SLURM_PROCID",
                 "num_processes": "--num-processes, KERAS_DISTRIBUTION_NUM_PROCESSES or SLURM_NTASKS",
                 "coordinator": "--coordinator, KERAS_DISTRIBUTION_JOB_ADDRESSES, JAX_COORDINATOR_ADDRESS, or "
                                "SLURM_STEP_NODELIST with JAX_COORDINATOR_PORT/SLURM_JOB_ID"}
        names = {"process_id": "process id", "num_processes": "number of processes", "coordinator": "coordinator"}
        raise TrainError("--distribute multi-process does not know this process's "
                         + " and ".join(names[k] for k in missing) + ".",
                         expected="; ".join(f"the {names[k]} from {where[k]}" for k in missing),
                         fix="e.g. on every machine: resnet-deploy train --distribute multi-process --num-processes 2 "
                             "--process-id 0 (1 on the second) --coordinator HOST0:29500; or launch with srun")
    n = _as_int(values["num_processes"], sources["num_processes"], "number of processes")
    rank = _as_int(values["process_id"], sources["process_id"], "process id")
    address = check_coordinator(str(values["coordinator"]), sources["coordinator"])
    if n < 2:
        raise TrainError(f"--distribute multi-process with {n} process ({sources['num_processes']}).",
                         expected="2 or more processes",
                         fix="one process trains with --distribute data-parallel (every device of the machine) or none")
    if not 0 <= rank < n:
        raise TrainError(f"Process id {rank} ({sources['process_id']}) is outside 0..{n - 1} for {n} processes.",
                         expected=f"a process id from 0 to {n - 1}, a different one on each process; 0 runs the "
                                  f"coordinator and writes the run's files")
    jobs = environ.get("KERAS_DISTRIBUTION_JOB_ADDRESSES", "")
    if sources["coordinator"] == "KERAS_DISTRIBUTION_JOB_ADDRESSES" and "," in jobs and len(jobs.split(",")) != n:
        raise TrainError(f"KERAS_DISTRIBUTION_JOB_ADDRESSES lists {len(jobs.split(','))} addresses for {n} processes.",
                         expected="one address per process (the first is the coordinator), or just the coordinator's")
    lo, hi = PEER_TIMEOUT_RANGE
    if isinstance(peer_timeout, bool) or not isinstance(peer_timeout, int) or not lo <= peer_timeout <= hi:
        raise TrainError(f"--peer-timeout {peer_timeout!r} is not usable.",
                         expected=f"seconds from {lo} to {hi}: how long a process waits for the others to join, "
                                  f"answer or reach a collective",
                         fix=f"leave it out for {DEFAULT_PEER_TIMEOUT} s")
    return Launch(rank, n, address, sources, peer_timeout)


# ------------------------------------------------------------------------------------------------
# Joining
# ------------------------------------------------------------------------------------------------
_EXIT = {"code": None}  # set when this process leaves a run whose other processes may be gone


def _exit_if_lost() -> None:
    """At interpreter exit: a process that left a run because of a failure ends here, at once.

    Otherwise the JAX client's destructor would enter the shutdown barrier, wait for processes that
    are dead or still blocked in a collective, and then abort with a fatal error."""
    code = _EXIT["code"]
    if code is None:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _add_xla_flag(name: str, value) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if f"--{name}=" not in flags:  # a value the user set is kept
        os.environ["XLA_FLAGS"] = f"{flags} --{name}={value}".strip()


@dataclass
class ProcessGroup:
    """The processes of one run, once joined."""

    launch: Launch
    local_devices: int
    global_devices: int

    @property
    def rank(self) -> int:
        return self.launch.process_id

    @property
    def count(self) -> int:
        return self.launch.num_processes

    @property
    def writer(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.count

    def describe(self) -> str:
        return f"{self.local_devices} device{'s' if self.local_devices > 1 else ''} here; " + self.launch.describe()

    # -- exchanges ----------------------------------------------------------------------------
    def broadcast_bytes(self, payload: bytes | None) -> bytes:
        """Process 0's ``payload`` on every process (the others pass None)."""
        import numpy as np
        from jax.experimental import multihost_utils

        size = np.array([len(payload) >> 32, len(payload) & 0xFFFFFFFF] if self.writer else [0, 0], np.uint32)
        hi, lo = (int(v) for v in self._guard(lambda: multihost_utils.broadcast_one_to_all(size)))
        n = (hi << 32) | lo
        words = -(-n // 4)
        step = min(CHUNK_WORDS, 1 << max(10, (words - 1).bit_length()))  # few shapes: few compilations
        buf = np.zeros(-(-words // step) * step, np.uint32)
        if self.writer:
            buf.view(np.uint8)[:n] = np.frombuffer(payload, np.uint8)
        for start in range(0, len(buf), step):
            piece = buf[start:start + step]
            piece[:] = np.asarray(self._guard(lambda: multihost_utils.broadcast_one_to_all(piece)), np.uint32)
        return buf.view(np.uint8)[:n].tobytes()

    def gather_bytes(self, mine: bytes) -> list[bytes]:
        """Every process's ``mine``, in process order, on every process."""
        import numpy as np
        from jax.experimental import multihost_utils

        sizes = self._guard(lambda: multihost_utils.process_allgather(np.array([len(mine)], np.int32)))
        sizes = [int(v) for v in np.asarray(sizes).reshape(-1)]
        buf = np.zeros(max(max(sizes), 1), np.uint8)
        buf[:len(mine)] = np.frombuffer(mine, np.uint8)
        rows = np.asarray(self._guard(lambda: multihost_utils.process_allgather(buf))).reshape(self.count, -1)
        return [rows[i, :sizes[i]].tobytes() for i in range(self.count)]

    def from_zero(self, step: str, fn: Callable[[], Any]) -> Any:
        """Process 0 runs ``fn`` (its JSON-able result, or a ``TrainError``) and every process gets the outcome:
        the result, or the same error (so no process goes on alone, and none waits for one that refused)."""
        outcome, own = None, None
        if self.writer:
            try:
                outcome = {"ok": fn()}
            except ResnetDeployError as exc:
                outcome, own = {"error": [exc.what, exc.expected, exc.fix]}, exc
        got = json.loads(self.broadcast_bytes(json.dumps(outcome, default=str).encode() if self.writer else None))
        if own is not None:
            raise own
        if "error" in got:
            what, expected, fix = got["error"]
            raise TrainError(f"process 0 refused the run ({step}): {what}", expected, fix)
        return got["ok"]

    def check_all(self, step: str, fn: Callable[[], Any]) -> list:
        """Every process runs ``fn``; if any refuses (a ``ResnetDeployError``), every process raises: a process
        that refused its own error, the others the refusals, naming the processes. Returns every process's
        JSON-able result, in process order."""
        own = None
        try:
            mine = {"ok": fn()}
        except ResnetDeployError as exc:
            mine, own = {"error": [exc.what, exc.expected, exc.fix]}, exc
        mine["host"] = socket.gethostname()
        everyone = [json.loads(b) for b in self.gather_bytes(json.dumps(mine, default=str).encode())]
        refused = [(i, r) for i, r in enumerate(everyone) if "error" in r]
        if own is not None:
            raise own
        if refused:
            if len(refused) == 1:
                i, r = refused[0]
                what, expected, fix = r["error"]
                raise TrainError(f"process {i} of {self.count} ({r['host']}) refused ({step}): {what}", expected, fix)
            raise TrainError(f"{len(refused)} of {self.count} processes refused ({step}): "
                             + " | ".join(f"process {i} ({r['host']}): {r['error'][0]}" for i, r in refused),
                             fix="; ".join(dict.fromkeys(r["error"][2] for _, r in refused if r["error"][2])) or None)
        return [r["ok"] for r in everyone]

    def _guard(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a collective failing is translated, anything else re-raised
            raise translate(exc, self) from exc

    def leaving(self, code: int) -> None:
        """This process leaves the run after a failure: end at exit without JAX's shutdown barrier."""
        _EXIT["code"] = code


PEER_FAILURE = re.compile(r"gloo|coordination service|heartbeat|connection (reset|closed|refused)|"
                          r"timed out waiting|deadline_exceeded|unavailable:|nccl|barrier", re.IGNORECASE)


def is_peer_failure(exc: BaseException) -> bool:
    """A collective or the coordination service failed (another process died, hung or cannot be reached)."""
    return not isinstance(exc, TrainError) and bool(PEER_FAILURE.search(str(exc)))


def translate(exc: BaseException, group: ProcessGroup) -> BaseException:
    """``PeerLostError`` for a failed collective (and mark this process as leaving); ``exc`` otherwise."""
    if not is_peer_failure(exc):
        return exc
    first = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else type(exc).__name__
    group.leaving(PeerLostError.exit_code)
    return PeerLostError(
        f"process {group.rank} of {group.count} lost contact with the other processes: {first}",
        expected="every process of the run alive and answering within --peer-timeout "
                 f"({group.launch.peer_timeout} s)",
        fix="see the other processes' logs for the first failure; the run continues from its last checkpoint "
            "with the same command and --resume on every process")


def join(launch: Launch, seed: int, log: Callable[[str], None]) -> ProcessGroup:
    """Join the other processes through ``keras.distribution.initialize()`` (JAX backend), with timeouts.

    Before any JAX computation: the CPU collectives are gloo's (JAX CPU backend; a GPU backend uses NCCL),
    and a CPU collective gives up after ``peer_timeout`` seconds (``--xla_cpu_collective_timeout_seconds``,
    unless XLA_FLAGS sets it). The random seed is set first, identical everywhere (different initial
    weights on two processes fail the first layer: "not the same on each process"), which also spares
    Keras its seed agreement. ``keras.distribution.initialize`` passes no timeouts to
    ``jax.distributed.initialize``; they are added to that one call: ``peer_timeout`` to join and for
    the heartbeats, ``FINISH_WAIT_S`` for the other processes to wait at exit while process 0 writes."""
    import keras

    if keras.backend.backend() != "jax":
        raise TrainError("--distribute multi-process runs on the JAX backend; "
                         f"Keras runs on {keras.backend.backend()}.",
                         expected="KERAS_BACKEND=jax (keras.distribution.initialize + DataParallel across processes)",
                         fix="set KERAS_BACKEND=jax on every process (MultiWorkerMirroredStrategy is not supported: "
                             "keras-team/keras#20585)")
    import jax
    import jax._src.distributed as jax_distributed

    if jax_distributed.global_state.client is not None:
        raise TrainError("This Python process has already joined a multi-process run.",
                         fix="start one process per run (the CLI does)")
    if "jax" in sys.modules and _backend_started():
        raise TrainError("JAX has already started its devices in this process: it can no longer join other processes.",
                         fix="call train_model with --distribute multi-process before any other JAX work "
                             "(or use the CLI)")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    _add_xla_flag("xla_cpu_collective_timeout_seconds", launch.peer_timeout)
    keras.utils.set_random_seed(seed)
    log(f"process {launch.process_id} of {launch.num_processes}: joining the run at {launch.coordinator} "
        f"(waiting up to {launch.peer_timeout} s for the others)")
    original = jax.distributed.initialize

    def with_timeouts(*args, **kwargs):
        kwargs.setdefault("initialization_timeout", launch.peer_timeout + JOIN_GRACE_S)  # the watchdog ends it first
        kwargs.setdefault("heartbeat_timeout_seconds", launch.peer_timeout)
        kwargs.setdefault("shutdown_timeout_seconds", FINISH_WAIT_S)
        return original(*args, **kwargs)

    joined = threading.Event()
    threading.Thread(target=_join_watchdog, args=(launch, joined), daemon=True, name="join-watchdog").start()
    jax.distributed.initialize = with_timeouts
    try:
        keras.distribution.initialize(job_addresses=launch.coordinator, num_processes=launch.num_processes,
                                      process_id=launch.process_id)
    except Exception as exc:  # noqa: BLE001 - whatever JAX raises on a failed join becomes the tool's error
        _EXIT["code"] = PeerLostError.exit_code
        raise _join_error(launch, str(exc).strip().splitlines()[0][:300] if str(exc).strip() else repr(exc)) from exc
    finally:
        joined.set()
        jax.distributed.initialize = original
    atexit.register(_exit_if_lost)
    group = ProcessGroup(launch, jax.local_device_count(), jax.device_count())
    if group.global_devices != group.local_devices * group.count:
        group.leaving(3)
        raise TrainError(f"The processes do not have the same number of devices ({group.global_devices} in all, "
                         f"{group.local_devices} here, {group.count} processes).",
                         expected="the same number of devices on every process", fix="give every process as many GPUs")
    return group


JOIN_GRACE_S = 60  # JAX's own join deadline comes this much after the watchdog's


def _join_error(launch: Launch, why: str) -> PeerLostError:
    return PeerLostError(
        f"process {launch.process_id} of {launch.num_processes} could not join the run at {launch.coordinator}: {why}",
        expected=f"all {launch.num_processes} processes started within --peer-timeout ({launch.peer_timeout} s) of "
                 f"each other, process 0 able to listen on {launch.coordinator} and the others able to reach it",
        fix="start every process with the same --num-processes and --coordinator (process 0's address and a free "
            "port) and its own --process-id (a process that did not print 'joining the run' is missing); check the "
            "address and the firewall, or raise --peer-timeout")


def _join_watchdog(launch: Launch, joined: threading.Event) -> None:
    """End a join that lasts longer than ``--peer-timeout`` with the tool's error. JAX's own deadline (later) does
    not raise: its client aborts the process with a fatal log line about RegisterTask."""
    if joined.wait(launch.peer_timeout):
        return
    err = _join_error(launch, f"not every process joined within {launch.peer_timeout} s")
    print(f"error: {err.render()}", file=sys.stderr, flush=True)
    time.sleep(0.5)  # a log filter holding stderr forwards the lines it has
    os._exit(err.exit_code)


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge._backends)
    except (ImportError, AttributeError):
        return False


def weights_sha256(model) -> str:
    """sha256 (16 hex) of a model's weights, in order: equal on every process that holds the same model."""
    import numpy as np

    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()[:16]
