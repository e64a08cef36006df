"""Several processes, one JAX program (`num_processes`; docs/design.md, "Several processes").

Under `jax.distributed` every process must run the same jitted programs in the same order
on the same (global) inputs. Process 0 is the engine: its scheduler and block manager
decide each step. Before the step, its runner sends a message through the coordination
service's key-value store: a fixed-shape control header (the operation and its sizes: a
step's bucket (N, B, Q, P), a block copy's length and count, stop) and the operation's
arrays (by a broadcast after it when they are large). Every other process (`follow`,
behind `jpaged worker`) reads it and runs the same step or block copy on its own devices,
whose shards the step's collectives join. Only process 0 samples (the logits come back
whole everywhere).

Why the key-value store: a worker waits as long as process 0 idles, and a gloo collective
gives up after 30 minutes; and a message costs process 0 about 1.7 ms a step where a
broadcast (a psum over the global devices) cost 6-15. When a process dies, the others'
next collective fails at once (a closed peer connection), or their wait for a message does
(process 0 hosts the service): `DistributedError`, and at exit the process leaves with
status 1 (`_exit_if_broken`) instead of waiting at JAX's shutdown barrier. An idle process
0 learns of a dead worker from the coordination service's heartbeats, which end it
(`HEARTBEAT_TIMEOUT_S`).
"""
from __future__ import annotations

import atexit
import enum
import itertools
import logging
import os
import sys
import zlib

import jax
import numpy as np

from jpaged.exceptions import DistributedError

log = logging.getLogger(__name__)

HEADER_LEN = 8  # int32s: the operation, up to 6 of its sizes, whether its arrays are inline
HEADER_POLL_MS = 60_000  # a worker's wait for the next message, renewed while process 0 idles
# Arrays up to this size travel in the message itself (a decode step's are a few KB, a
# 2,048-token prefill's ~200 KB), bigger ones by a broadcast after it: the coordination
# service's gRPC messages are capped (4 MB by default).
INLINE_BYTES = 1 << 20
# Messages kept in the store: process 0 is at most two ahead of the slowest worker (each
# step's all-reduces wait for every process, and process 0 waits for each step's logits).
KEPT_MESSAGES = 16
# How long the coordination service waits for a silent process before it ends the others,
# and how long a stopping process waits for the rest at shutdown: bounded, so that a dead
# process never leaves the others hanging (JAX's defaults are 100 and 300 s).
HEARTBEAT_TIMEOUT_S = 10
SHUTDOWN_TIMEOUT_S = 30


class Op(enum.IntEnum):
    STEP = 1  # sizes: the bucket (N, B, Q, P); arrays: the StepInputs
    COPY = 2  # sizes: padded length, count; arrays: i32[2, length] (src, dst)
    STOP = 3  # process 0 is shutting down: workers return


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """Join the JAX program (`jax.distributed.initialize`), with gloo collectives on the CPU.
    Must come before anything touches a JAX backend in this process."""
    if jax.distributed.is_initialized():
        if (jax.process_count(), jax.process_index()) != (num_processes, process_id):
            raise DistributedError(f"jax.distributed is already initialized as process "
                                   f"{jax.process_index()} of {jax.process_count()}, not "
                                   f"{process_id} of {num_processes}")
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
                                   shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
    except RuntimeError as e:
        raise DistributedError(f"could not join the JAX program at {coordinator_address} as "
                               f"process {process_id} of {num_processes}: {e} (initialize "
                               "before any JAX computation runs in this process)") from e
    atexit.register(_exit_if_broken)  # runs before jax's own shutdown (registered earlier)


_broken: list[str] = []  # why the JAX program lost a process, once it has


def _exit_if_broken() -> None:
    """At exit after a lost process, leave at once with status 1: JAX's shutdown would wait
    for the dead process at its barrier and then abort this one."""
    if _broken:
        log.error("exiting: %s", _broken[0])
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def lost(error: Exception) -> DistributedError:
    """The DistributedError for a collective (a broadcast, a sharded step) that failed: the
    processes are out of step for good, whatever the cause; marks the program broken."""
    first = (str(error).splitlines() or [type(error).__name__])[0][:300]
    gone = any(s in str(error) for s in ("Gloo", "closed by peer", "UNAVAILABLE", "Socket closed"))
    _broken.append(f"a process of the JAX program is gone (its collective failed: {first})" if gone
                   else f"a step over several processes failed, and they are out of step: {first}")
    return DistributedError(_broken[-1])


def _broadcast(tree):
    """Process 0's `tree` on every process (others pass a same-shaped template)."""
    from jax.experimental import multihost_utils
    try:
        return multihost_utils.broadcast_one_to_all(tree)
    except Exception as e:  # noqa: BLE001 - XLA reports a lost peer as ValueError/RuntimeError
        raise lost(e) from e


def _flatten(tree) -> np.ndarray:
    """A tree of int32 arrays as one flat array (one message, one collective)."""
    return np.concatenate([np.asarray(x, np.int32).ravel() for x in jax.tree_util.tree_leaves(tree)])


def _unflatten(flat: np.ndarray, template):
    """`flat` cut back into arrays shaped as `template`'s."""
    leaves, treedef = jax.tree_util.tree_flatten(template)
    ends = np.cumsum([x.size for x in leaves])[:-1]
    return treedef.unflatten([part.reshape(x.shape) for part, x in zip(np.split(flat, ends), leaves)])


def agree(identity: str) -> None:
    """Every process checks that all of them run the same engine arguments and pool plan
    (`identity`); a DistributedError on every process where they differ."""
    from jax.experimental import multihost_utils
    mine = np.int64(zlib.crc32(identity.encode()))
    try:
        every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1)
    except Exception as e:  # noqa: BLE001
        raise DistributedError(f"the processes could not exchange their engine arguments: {e}") from e
    if len(set(every.tolist())) > 1:
        differ = [i for i, v in enumerate(every.tolist()) if v != every[0]]
        raise DistributedError(f"processes {differ} run other engine arguments or another model "
                               f"than process 0 (each process must get the same flags): {identity}")


_leaders: list[Leader] = []


def _client():
    """The coordination service's client of this process (JAX keeps it private)."""
    from jax._src import distributed as jax_distributed
    return jax_distributed.global_state.client


def _message_key(index: int) -> str:
    return f"jpaged/step/{index}"


class Leader:
    """Process 0's side: announce each operation before running it. One per JAX program:
    the workers follow one engine."""

    def __init__(self):
        if _leaders:
            raise DistributedError("this process already runs an engine over several processes; "
                                   "its workers follow that one (one engine per JAX program)")
        _leaders.append(self)
        self.stopped = False
        self.sent = 0  # messages sent

    def send(self, op: Op, sizes=(), arrays=None) -> None:
        """The header (and `arrays`, a tree of int32 arrays) to every worker: in the message
        up to INLINE_BYTES, else by a broadcast after it."""
        if self.stopped:
            raise DistributedError("the worker processes were stopped (or one is gone)")
        header = np.zeros(HEADER_LEN, np.int32)
        header[0] = op
        header[1:1 + len(sizes)] = sizes
        flat = None if arrays is None else _flatten(arrays)
        inline = flat is not None and flat.nbytes <= INLINE_BYTES
        header[-1] = inline
        try:
            client = _client()
            client.key_value_set_bytes(_message_key(self.sent),
                                       header.tobytes() + (flat.tobytes() if inline else b""))
            if self.sent >= KEPT_MESSAGES:
                client.key_value_delete(_message_key(self.sent - KEPT_MESSAGES))
            self.sent += 1
        except Exception as e:  # noqa: BLE001 - the coordination service is gone
            self.stopped = True
            _broken.append(f"the coordination service failed: {e}")
            raise DistributedError(_broken[-1]) from e
        if flat is not None and not inline:
            try:
                _broadcast(flat)
            except DistributedError:
                self.stopped = True
                raise

    def fail(self, error: Exception) -> DistributedError:
        """An operation the workers were told of failed here: they are out of step for good."""
        self.stopped = True
        return lost(error)

    def stop(self) -> None:
        """Release the workers (once; a lost worker is not waited for)."""
        if not self.stopped:
            try:
                self.send(Op.STOP)
            except DistributedError as e:
                log.warning("stopping the worker processes: %s", e)
            self.stopped = True


def _receive(index: int) -> tuple[np.ndarray, np.ndarray]:
    """Message `index` (header, inline arrays) from the coordination service's key-value
    store, waiting as long as process 0 idles (a collective would time out: gloo gives up
    after 30 minutes)."""
    while True:
        try:
            value = _client().blocking_key_value_get_bytes(_message_key(index), HEADER_POLL_MS)
            message = np.frombuffer(value, np.int32)
            return message[:HEADER_LEN], message[HEADER_LEN:]
        except Exception as e:  # noqa: BLE001 - the client raises one type for every status
            if "DEADLINE_EXCEEDED" not in str(e):  # not a timeout: process 0 (the service) is gone
                _broken.append(f"process 0 is gone ({str(e).splitlines()[0][:300]})")
                raise DistributedError(_broken[-1]) from e


def follow(runner) -> int:
    """A worker's loop: receive each operation process 0 announces and run it on this
    process's devices, until STOP; returns the number of steps run."""
    steps = 0
    for index in itertools.count():
        header, body = _receive(index)
        op, sizes = int(header[0]), [int(x) for x in header[1:]]

        def arrays(template):
            flat = body if header[-1] else _broadcast(np.zeros(_flatten(template).size, np.int32))
            return _unflatten(flat, template)
        if op == Op.STEP:
            shape = tuple(sizes[:4])
            runner.run_step(shape, arrays(runner.input_builder.dummy(*shape)))
            steps += 1
        elif op == Op.COPY:
            length, count = sizes[:2]
            pairs = arrays(np.zeros((2, length), np.int32))
            runner.copy_blocks(list(zip(pairs[0, :count].tolist(), pairs[1, :count].tolist())))
        elif op == Op.STOP:
            return steps
        else:
            raise DistributedError(f"unknown operation {op} from process 0 (another jpaged "
                                   "version?)")
