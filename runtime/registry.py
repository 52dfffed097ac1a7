"""The naming service: which endpoints serve a model, and the lookups waiting for one.

The supervisor :meth:`~Registry.register`\\ s a worker's endpoint when it becomes
ready and :meth:`~Registry.unregister`\\ s it when it exits; the control socket's
``lookup`` is answered by :meth:`~Registry.lookup`. A model maps to the endpoints
of its ready replicas (generations are unique within a supervisor).

A lookup with ``wait_ms`` waits until the model has a ready worker whose
generation is not in ``exclude`` (the caller saw those die). Waiters time out with
Unavailable, get WorkerFailed when the model fails, NotFound when it is removed
and ShuttingDown on shutdown.

In a cluster (``llamafleet ray``) the registry also knows what the other nodes
serve (:meth:`~Registry.set_cluster`, a :class:`ClusterView`): a lookup is answered
with every ready worker of the model in the cluster, numbered by cluster replica,
so any one supervisor's address reaches every model.

No sockets here: the methods that end waits return ``(waiter, answer)`` pairs and
the caller delivers them; each waiter carries an opaque ``token`` saying to whom.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from llamafleet.runtime.errors import LlamafleetError, NotFound, ShuttingDown, Unavailable, WorkerFailed
from llamafleet.runtime.protocol import ModelEndpoints, WorkerEndpoint

#: what a waiter is finally told: where the model is, or why not
Answer = ModelEndpoints | LlamafleetError


@dataclass(frozen=True)
class Waiter:
    """A lookup waiting for its model to be ready."""

    #: who to answer (the supervisor's peer identity and request id); opaque here
    token: Any
    model: str
    #: monotonic time at which it is answered Unavailable
    deadline: float
    #: generations the caller saw die (not an answer)
    exclude: frozenset[int] = frozenset()


@dataclass(frozen=True)
class ClusterView:
    """What the rest of a cluster serves, as one supervisor's lookups see it."""

    #: model -> the ready workers of the other nodes (numbered by cluster replica)
    remote: dict[str, list[WorkerEndpoint]] = field(default_factory=dict)
    #: model -> its replicas in the whole cluster
    replicas: dict[str, int] = field(default_factory=dict)
    #: (model, this node's replica) -> that worker's cluster replica
    replica_ids: dict[tuple[str, int], int] = field(default_factory=dict)
    #: the other nodes' ``status`` rows (each with its ``node``)
    workers: list[dict[str, Any]] = field(default_factory=list)


def _default_describe(model: str) -> dict[str, Any]:
    return {"model": model, "state": "unavailable"}


class Registry:
    """Model name -> the endpoints that serve it, plus the lookups waiting on them.

    ``describe(model)`` gives the error data of a model that is not ready (its
    ``state``, restarts, last exit...); the supervisor passes its workers' view."""

    def __init__(self, models: Iterable[str],
                 describe: Callable[[str], dict[str, Any]] | None = None,
                 replicas: Callable[[str], int] | None = None) -> None:
        self._endpoints: dict[str, list[WorkerEndpoint]] = {m: [] for m in models}
        self._replicas = replicas or (lambda model: 1)
        self._failed: dict[str, WorkerFailed] = {}
        self._waiters: list[Waiter] = []
        self._describe = describe or _default_describe
        self.cluster = ClusterView()
        self.closed = False

    # -- queries ---------------------------------------------------------------------
    @property
    def models(self) -> list[str]:
        """The names this registry knows, in configuration order (then those only
        other nodes of the cluster serve)."""
        return [*self._endpoints, *(m for m in self.cluster.remote if m not in self._endpoints)]

    def local(self, model: str) -> bool:
        """Whether this supervisor's own configuration has ``model``."""
        return model in self._endpoints

    def endpoints(self, model: str) -> list[WorkerEndpoint]:
        """The endpoints serving ``model`` now, here and (in a cluster) on the other
        nodes (a copy; empty when none is ready)."""
        ids = self.cluster.replica_ids
        here = [e if (model, e.replica) not in ids else
                replace(e, replica=ids[(model, e.replica)])
                for e in self._endpoints.get(model, ())]
        return here + list(self.cluster.remote.get(model, ()))

    def replicas(self, model: str) -> int:
        """The replicas ``model`` has (in the whole cluster, when in one)."""
        n = self.cluster.replicas.get(model)
        return n if n is not None else self._replicas(model)

    def waiters(self, model: str | None = None) -> list[Waiter]:
        """The waiting lookups (of ``model``, or all)."""
        return [w for w in self._waiters if model is None or w.model == model]

    def next_deadline(self) -> float | None:
        """The earliest waiter deadline, or None when nobody waits."""
        return min((w.deadline for w in self._waiters), default=None)

    # -- lookups ---------------------------------------------------------------------
    def lookup(self, model: str, token: Any, now: float, wait_ms: int = 0,
               exclude: Iterable[int] = ()) -> ModelEndpoints | None:
        """The ready endpoints of ``model`` (none of the ``exclude``\\ d generations);
        None when the lookup now waits (``wait_ms`` > 0; answered later through
        ``token``).

        Raises ShuttingDown, NotFound, WorkerFailed or (not waiting) Unavailable."""
        self.check(model)
        skip = frozenset(exclude)
        found = self._answer(model, skip)
        if found is not None:
            return found
        if model in self._failed:
            err = self._failed[model]
            raise WorkerFailed(err.message, data=dict(err.data), retryable=err.retryable)
        if wait_ms > 0:
            self._waiters.append(Waiter(token, model, now + wait_ms / 1000, skip))
            return None
        raise self._unavailable(model)

    def check(self, model: str) -> None:
        """Raise ShuttingDown or NotFound unless ``model`` can be looked up."""
        if self.closed:
            raise ShuttingDown("the supervisor is shutting down")
        if model not in self._endpoints and model not in self.cluster.remote:
            raise NotFound(f"no model named {model!r} (known: {', '.join(self.models)})",
                           data={"model": model})

    def _answer(self, model: str, exclude: frozenset[int]) -> ModelEndpoints | None:
        eps = [e for e in self.endpoints(model) if e.generation not in exclude]
        if not eps:
            return None
        return ModelEndpoints(model=model, endpoints=eps, replicas=self.replicas(model))

    def _unavailable(self, model: str) -> Unavailable:
        data = self._describe(model)
        return Unavailable(f"model {model} is {data.get('state', 'unavailable')}", data=data)

    # -- changes -----------------------------------------------------------------------
    def register(self, endpoint: WorkerEndpoint) -> list[tuple[Waiter, Answer]]:
        """Publish a ready worker; returns the waiters it answers.

        It replaces the entry of the same replica (a restarted worker)."""
        model = endpoint.model
        if model not in self._endpoints:
            raise NotFound(f"no model named {model!r}")
        self._failed.pop(model, None)
        eps = [e for e in self._endpoints[model] if e.replica != endpoint.replica]
        self._endpoints[model] = sorted([*eps, endpoint], key=lambda e: e.replica)
        return self._release(lambda w: w.model == model
                             and endpoint.generation not in w.exclude,
                             lambda w: self._answer(model, w.exclude)
                             or self._unavailable(model))

    def set_cluster(self, view: ClusterView) -> list[tuple[Waiter, Answer]]:
        """Take what the other nodes serve now; returns the waiters it answers (a
        model that is only remote and is gone from the view gets NotFound)."""
        self.cluster = view
        gone = {w.model for w in self._waiters
                if w.model not in self._endpoints and w.model not in view.remote}
        answered = self._release(
            lambda w: w.model in gone or self._answer(w.model, w.exclude) is not None,
            lambda w: NotFound(f"no model named {w.model!r} in the cluster any more",
                               data={"model": w.model}) if w.model in gone
            else self._answer(w.model, w.exclude) or self._unavailable(w.model))
        return answered

    def unregister(self, model: str, generation: int | None = None) -> None:
        """Withdraw ``model``'s endpoints of ``generation`` (default: all of them)."""
        if model in self._endpoints:
            self._endpoints[model] = [e for e in self._endpoints[model]
                                      if generation is not None and e.generation != generation]

    def add(self, model: str) -> None:
        """Know a new model (a reload added it)."""
        self._endpoints.setdefault(model, [])

    def remove(self, model: str) -> list[tuple[Waiter, Answer]]:
        """Forget ``model`` (a reload removed it): its waiters get NotFound."""
        self._endpoints.pop(model, None)
        self._failed.pop(model, None)
        return self._release(lambda w: w.model == model,
                             lambda w: NotFound(f"model {model!r} was removed from the "
                                                "configuration", data={"model": model}))

    def clear_failure(self, model: str) -> None:
        """Forget that ``model`` failed (it is being loaded again)."""
        self._failed.pop(model, None)

    def failed(self, model: str) -> bool:
        return model in self._failed

    def fail(self, model: str, error: WorkerFailed) -> list[tuple[Waiter, Answer]]:
        """Mark ``model`` failed: its waiters and later lookups get ``error``."""
        self._failed[model] = error
        if model in self._endpoints:
            self._endpoints[model] = []
        return self._release(lambda w: w.model == model, lambda w: error)

    def refuse(self, model: str, error: LlamafleetError) -> list[tuple[Waiter, Answer]]:
        """End the waits of ``model`` with ``error`` (it cannot be loaded now)."""
        return self._release(lambda w: w.model == model, lambda w: error)

    def expire(self, now: float) -> list[tuple[Waiter, Answer]]:
        """End the waits whose deadline has come, with Unavailable."""
        return self._release(lambda w: now >= w.deadline,
                             lambda w: self._unavailable(w.model))

    def shutdown(self) -> list[tuple[Waiter, Answer]]:
        """Refuse lookups from now on; every waiter gets ShuttingDown."""
        self.closed = True
        return self._release(lambda w: True,
                             lambda w: ShuttingDown("the supervisor is shutting down"))

    def _release(self, which: Callable[[Waiter], bool],
                 answer: Callable[[Waiter], Answer]) -> list[tuple[Waiter, Answer]]:
        done = [w for w in self._waiters if which(w)]
        if done:
            self._waiters = [w for w in self._waiters if not which(w)]
        return [(w, answer(w)) for w in done]
