"""The teacher pool: N Ray actor replicas serving teacher logits, and the client students use.

The actor is a thin async shell over `TeacherServer` and `RequestBatcher`: requests from all
students that reach a replica within `teacher_max_wait_ms` share one forward. The client keeps
`prefetch_batches` requests in flight ahead of its student (backpressure: never more), spread
over the replicas by least outstanding work, so a student's step overlaps the teacher's forward
for the next batches instead of waiting on a round trip; a request whose replica dies goes to
another replica while Ray restarts the dead one.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import ray

from specs.job import JobSpec
from trainers.engine_config import replica_options


SHARED_NAMESPACE = "stillhouse-pools"
MAX_SOURCES = 4  # input arrays a replica keeps mapped (one per student worker that streams)


class PoolStartError(RuntimeError):
    """The replicas could not be placed or failed to load the teacher."""


def teacher_fingerprint(blob: bytes, precision: str, features: list[str] = ()) -> str:
    """What a replica serves: the teacher file's bytes, the precision and the features."""
    extra = "-" + ",".join(features) if features else ""
    return hashlib.sha256(blob).hexdigest()[:16] + f"-{precision}{extra}"


def feature_layers(spec: JobSpec) -> list[str]:
    return [f.teacher for f in spec.distillation.features]


class TeacherReplica:
    """One replica: loads the teacher once, then answers `logits` calls, batching concurrent
    requests from all students into one forward (an async actor around `RequestBatcher`)."""

    def __init__(self, spec_json: str, teacher_path: str, image_shape: tuple, num_classes: int,
                 trusted: tuple[str, ...] = ()):
        """`teacher_path`: the teacher file, on storage every node sees (the run dir). A replica
        reads it here, and a restarted one reads it again: no constructor argument lives in the
        object store, where Ray cannot rebuild it for a restart (ray-project/ray#53727)."""
        import torch

        from trainers.device import teacher_device
        from trainers.teacher_server import RequestBatcher, TeacherServer, load_teacher

        with open(teacher_path, "rb") as f:
            blob = f.read()
        spec = JobSpec.model_validate_json(spec_json)
        # one intra-op thread per CPU the replica was given; more would fight the student workers
        torch.set_num_threads(max(1, int(spec.resources.teacher_cpus)))
        model = load_teacher(spec.teacher, blob, tuple(image_shape), num_classes, frozenset(trusted))
        self.server = TeacherServer(model, spec.teacher_precision, feature_layers(spec),
                                    device=teacher_device(spec))
        self.fingerprint = teacher_fingerprint(blob, spec.teacher_precision, feature_layers(spec))
        self.batcher = RequestBatcher(self.server.logits, spec.resources.teacher_max_batch,
                                      spec.resources.teacher_max_wait_ms / 1000.0,
                                      coalesce=not spec.deterministic)
        self.served = 0
        self._sources: dict = {}  # ObjectRef -> the array it holds (a zero-copy view)

    async def logits(self, x: np.ndarray) -> np.ndarray:
        self.served += len(x)
        return await self.batcher.submit(x)

    async def logits_rows(self, source: list, idx: np.ndarray) -> np.ndarray:
        """Logits for rows `idx` of the array that `source[0]` (an ObjectRef) holds.

        The array goes into the object store once and every request carries only its row
        indices, so neither side copies or serializes the inputs per request. The ref arrives
        wrapped in a list, which keeps Ray from resolving it on every call; it is resolved once
        here (a read-only view of shared memory) and kept while the ref is in use.
        """
        ref = source[0]
        x = self._sources.get(ref)
        if x is None:
            x = await ref
            if len(self._sources) >= MAX_SOURCES:  # the oldest source is done with
                self._sources.pop(next(iter(self._sources)))
            self._sources[ref] = x
        self.served += len(idx)
        return await self.batcher.submit(x[idx])

    async def stats(self) -> dict:
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "served": self.served, "forwards": self.batcher.calls,
                "requests": self.batcher.requests, "fingerprint": self.fingerprint,
                "device": str(self.server.device)}


class PoolError(RuntimeError):
    """No replica could answer a request: every retry failed."""


class TeacherPoolClient:
    """Streams teacher logits for a sequence of input batches, in order, with requests in flight.

    Failover: a request whose replica dies is sent again to the replica with the least
    outstanding work among the others (Ray restarts the dead one meanwhile, up to its
    `max_restarts`), so every batch's logits are handed back exactly once and in order. After
    `max_attempts` failures of one request the stream raises `PoolError`.

    Picklable (it holds only actor handles), so the driver hands one to every student worker.
    """

    def __init__(self, replicas: list, prefetch: int, max_attempts: int = 4):
        self.replicas = replicas
        self.prefetch = prefetch
        self.max_attempts = max_attempts
        self.failovers = 0  # requests sent again after their replica died

    def stream(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Yield (B, num_classes) logits for each (B, C, H, W) batch, in the order given."""
        for _, logits in self._stream(("logits", (x,), None) for x in batches):
            yield logits

    def stream_rows(self, source: ray.ObjectRef, index_batches: Iterable[np.ndarray],
                    request_rows: int = 1) -> Iterator[np.ndarray]:
        """Like `stream`, for batches of rows of the array `source` holds (put once with
        `ray.put`): each request carries only its indices. Consecutive batches share one request
        until it has `request_rows` rows (a round trip costs the same for more rows), and the
        answer is split back into one array per batch."""

        def request(group: list[np.ndarray]) -> tuple:
            return "logits_rows", ([source], np.concatenate(group)), [len(g) for g in group]

        def requests():
            group: list[np.ndarray] = []
            rows = 0
            for idx in index_batches:
                group.append(idx)
                rows += len(idx)
                if rows >= request_rows:
                    yield request(group)
                    group, rows = [], 0
            if group:
                yield request(group)

        for sizes, logits in self._stream(requests()):
            yield from np.split(logits, np.cumsum(sizes)[:-1])

    def _stream(self, requests: Iterator[tuple]) -> Iterator[tuple]:
        """(tag, logits) per request (method name, args, tag), in order, requests in flight."""
        outstanding = [0] * len(self.replicas)
        pending: deque = deque()  # [ObjectRef, replica index, request, attempts], oldest first

        def send(request: tuple, avoid: int | None = None) -> list:
            choices = [i for i in range(len(self.replicas)) if i != avoid] or [avoid]
            i = min(choices, key=outstanding.__getitem__)
            outstanding[i] += 1
            method, args, _ = request
            return [getattr(self.replicas[i], method).remote(*args), i, request, 0]

        def submit() -> bool:
            request = next(requests, None)
            if request is None:
                return False
            pending.append(send(request))
            return True

        for _ in range(self.prefetch):
            if not submit():
                break
        while pending:
            entry = pending[0]
            ray.wait([entry[0]], num_returns=1)  # only the oldest is needed now; the rest run on
            try:
                logits = ray.get(entry[0])
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
                outstanding[entry[1]] -= 1
                attempts = entry[3] + 1
                if attempts >= self.max_attempts:
                    raise PoolError(
                        f"no teacher replica answered after {attempts} attempts (last: "
                        f"{type(err).__name__}): the replicas died more often than "
                        "`resources.teacher_max_restarts` allows"
                    ) from None
                self.failovers += 1
                pending[0] = send(entry[2], avoid=entry[1])
                pending[0][3] = attempts
                continue
            pending.popleft()
            outstanding[entry[1]] -= 1
            submit()  # refill before handing back, so the window stays full during the step
            yield entry[2][2], logits


class TeacherPool:
    """Driver-side owner of the replicas.

    With `resources.shared_pool: NAME` the replicas are named, detached actors in the
    `stillhouse-pools` namespace: the first job creates them, later jobs with the same teacher
    (same file bytes and precision) join them, and a job that ends leaves them running for the
    others. `stop_shared_pool(NAME)` (`stillhouse pool stop NAME`) removes them. A replica that
    dies is restarted from the teacher file (up to `teacher_max_restarts`), so the file must stay
    where it was (in the run dir of the job that made the pool); meanwhile the pool's clients
    fail over to the other replicas.
    """

    def __init__(
        self, replicas: list, spec: JobSpec, shared: bool = False, num_classes: int | None = None,
    ):
        self.replicas = replicas
        self.num_classes = num_classes
        self.spec = spec
        self.shared = shared

    @classmethod
    def start(
        cls, spec: JobSpec, teacher_path: str | Path, image_shape: tuple, num_classes: int,
        trusted: frozenset[str] = frozenset(),
    ) -> "TeacherPool":
        """Start the replicas, each loading the teacher file at `teacher_path` (a path every
        node can read: the run dir on a cluster's shared storage)."""
        teacher_path = str(Path(teacher_path).resolve())
        blob = Path(teacher_path).read_bytes()
        wanted = teacher_fingerprint(blob, spec.teacher_precision, feature_layers(spec))
        args = (spec.model_dump_json(), teacher_path, tuple(image_shape), num_classes,
                tuple(sorted(trusted)))
        return cls.launch(spec, TeacherReplica, args, wanted, num_classes)

    @classmethod
    def launch(cls, spec: JobSpec, replica: type, args: tuple, fingerprint: str,
               num_classes: int | None = None) -> "TeacherPool":
        """Start `resources.teacher_replicas` actors of class `replica` (`TeacherReplica`, or a
        subclass serving another kind of teacher) with constructor `args`, and wait until each
        has loaded its teacher; a shared pool must serve `fingerprint` (its replicas' own)."""
        name = spec.resources.shared_pool
        replica_cls = ray.remote(replica)
        base = replica_options(spec)
        replicas = []
        for i in range(spec.resources.teacher_replicas):
            options = base if not name else {
                **base, "name": f"{name}-{i}", "namespace": SHARED_NAMESPACE,
                "lifetime": "detached", "get_if_exists": True,
            }
            replicas.append(replica_cls.options(**options).remote(*args))
        pool = cls(replicas, spec, shared=bool(name), num_classes=num_classes)
        timeout = spec.resources.placement_timeout_s
        ready, not_ready = ray.wait(
            [r.stats.remote() for r in replicas], num_returns=len(replicas), timeout=timeout
        )
        if not_ready:
            pool.shutdown(force=True)
            raise PoolStartError(
                f"{len(not_ready)} of {len(replicas)} teacher replicas were not up after "
                f"{timeout:.0f}s (each asks for {spec.resources.teacher_cpus} CPU); "
                "the cluster lacks free CPUs or the replicas are stuck loading"
            )
        try:
            stats = ray.get(ready)
        except ray.exceptions.RayActorError as err:
            pool.shutdown(force=True)
            raise PoolStartError(f"a teacher replica failed to start: {err}") from None
        if any(s["fingerprint"] != fingerprint for s in stats):
            pool.replicas = []  # they belong to the jobs that made them
            raise PoolStartError(
                f"shared pool {name!r} serves another teacher or precision; "
                "use another `resources.shared_pool` name"
            )
        return pool

    def client(self) -> TeacherPoolClient:
        return TeacherPoolClient(self.replicas, self.spec.resources.prefetch_batches)

    def predict(self, x: np.ndarray | ray.ObjectRef, batch_size: int = 512) -> np.ndarray:
        """Teacher logits for a whole array, through the pool: (N, ...) -> (N, num_classes).

        `x` may already be in the object store (an ObjectRef), as when the same inputs are
        asked for again; otherwise it is put there once, and requests carry row ranges."""
        source = x if isinstance(x, ray.ObjectRef) else ray.put(np.ascontiguousarray(x))
        n = len(ray.get(source))  # a zero-copy view: only the length is read
        batches = (np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size))
        rows = np.concatenate(list(self.client().stream_rows(source, batches)))
        return rows[:, : self.num_classes]  # without the features that may follow the logits

    def predict_batches(self, batches) -> np.ndarray:
        """Teacher logits for a stream of (x, ...) batches (e.g. a streamed test set), with
        requests in flight: (N, num_classes) in order."""
        out = self.client().stream(b[0] for b in batches)
        rows = np.concatenate([np.asarray(r) for r in out])
        return rows[:, : self.num_classes]

    def stats(self) -> list[dict]:
        return ray.get([r.stats.remote() for r in self.replicas])

    def shutdown(self, force: bool = False) -> None:
        """Stop the replicas; a shared pool's are left running for other jobs unless forced."""
        if not self.shared or force:
            for r in self.replicas:
                ray.kill(r, no_restart=True)
        self.replicas = []


def stop_shared_pool(name: str) -> int:
    """Kill a shared pool's replicas; returns how many there were."""
    from ray.util import list_named_actors

    stopped = 0
    for entry in list_named_actors(all_namespaces=True):
        if entry["namespace"] == SHARED_NAMESPACE and entry["name"].rsplit("-", 1)[0] == name:
            ray.kill(ray.get_actor(entry["name"], namespace=SHARED_NAMESPACE), no_restart=True)
            stopped += 1
    return stopped
