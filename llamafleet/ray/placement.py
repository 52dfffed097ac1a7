"""Which node runs which replicas: a pure decision over the nodes' resources.

Each replica of a model takes what the model declares (``num_cpus``,
``memory_mb``, custom ``resources``) from one node's totals. Replicas already
placed on a node that is still there stay put (a re-placement after a node is lost
moves only what that node ran); the others go, one at a time, to the node with
room that has the fewest replicas of that model (replicas spread across nodes),
then the most CPUs left. What fits nowhere is reported, not forced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from llamafleet.runtime.config import ModelConfig


@dataclass(frozen=True)
class Node:
    """A node's total resources: ``CPU``, ``memory_mb`` and any custom ones."""

    id: str
    resources: dict[str, float]


@dataclass(frozen=True)
class Demand:
    """What one replica of a model takes, and how many replicas it wants."""

    model: str
    replicas: int
    take: dict[str, float]

    @classmethod
    def of(cls, m: ModelConfig) -> Demand:
        take = {"CPU": m.num_cpus, "memory_mb": m.memory_mb or 0.0, **m.resources}
        return cls(m.name, m.replicas, {k: v for k, v in take.items() if v})


@dataclass
class Placement:
    """model -> node -> replicas there; ``missing``: model -> replicas not placed."""

    nodes: dict[str, dict[str, int]] = field(default_factory=dict)
    missing: dict[str, int] = field(default_factory=dict)

    def on(self, node: str) -> dict[str, int]:
        """The models (and replica counts) placed on ``node``."""
        return {m: n[node] for m, n in self.nodes.items() if n.get(node)}

    def total(self, model: str) -> int:
        return sum(self.nodes.get(model, {}).values())

    def replica_base(self, model: str, node: str) -> int:
        """The cluster number of ``node``'s first replica of ``model`` (nodes in id order)."""
        base = 0
        for n, count in sorted(self.nodes.get(model, {}).items()):
            if n == node:
                return base
            base += count
        raise KeyError((model, node))


def place(demands: Sequence[Demand], nodes: Sequence[Node],
          previous: Mapping[str, Mapping[str, int]] | None = None) -> Placement:
    """Place every replica of ``demands`` on ``nodes`` (keeping ``previous``
    placements on nodes still present, as far as they still fit)."""
    free = {n.id: dict(n.resources) for n in nodes}
    out = Placement()

    def fits(node: str, take: Mapping[str, float]) -> bool:
        return all(free[node].get(k, 0.0) >= v - 1e-9 for k, v in take.items())

    def take_from(node: str, d: Demand) -> None:
        for k, v in d.take.items():
            free[node][k] = free[node].get(k, 0.0) - v
        per = out.nodes.setdefault(d.model, {})
        per[node] = per.get(node, 0) + 1

    wanted = {d.model: d for d in demands}
    for model, per_node in (previous or {}).items():  # what runs stays where it runs
        d = wanted.get(model)
        if d is None:
            continue
        for node, count in sorted(per_node.items()):
            for _ in range(min(count, d.replicas - out.total(model))):
                if node in free and fits(node, d.take):
                    take_from(node, d)
    # the biggest first: they have the fewest places to go
    for d in sorted(demands, key=lambda d: (-len(d.take), -sum(d.take.values()), d.model)):
        for _ in range(d.replicas - out.total(d.model)):
            room = [n for n in free if fits(n, d.take)]
            if not room:
                out.missing[d.model] = d.replicas - out.total(d.model)
                break
            here = out.nodes.get(d.model, {})
            best = min(room, key=lambda n: (here.get(n, 0), -free[n].get("CPU", 0.0), n))
            take_from(best, d)
    return out
