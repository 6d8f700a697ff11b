"""The compiled pipeline: an immutable DAG of invocations and a ready-set protocol to drive it.

Like `graphlib.TopologicalSorter`, the graph is pure and synchronous: the runner asks it which
nodes are ready and tells it which finished or failed. Order is the declaration order, so it is
deterministic whatever `PYTHONHASHSEED` is.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flowcore.exceptions import PipelineDefinitionError

__all__ = ["Graph", "MapSpec", "Node", "OutputRef", "ReadySet"]


@dataclass(slots=True, unsafe_hash=True)
class OutputRef:
    """A reference to one output of an upstream invocation, resolved at run time.

    Read-only by convention, hashed by value: not frozen, because a frozen dataclass costs
    ~3x more to build and a compile makes one per handle passed on.
    """

    node_id: str
    output: str


@dataclass(frozen=True, slots=True)
class MapSpec:
    """How a `.map()` / `.product()` invocation expands at run time.

    `mapped` names the arguments iterated over; the rest of the node's arguments are passed
    whole to every element.
    """

    mapped: tuple[str, ...]
    product: bool


@dataclass(slots=True, eq=False)
class Node:
    """One invocation of a step in a compiled graph (read-only by convention: not frozen,
    because frozen dataclasses cost ~3x more to build and a graph may have 10,000 nodes)."""

    id: str
    index: int
    step: Any
    config: Any
    arguments: Mapping[str, Any]
    parents: tuple[int, ...]
    data_parents: tuple[int, ...]
    map_spec: MapSpec | None = None
    # Arguments split by kind once, so the runner resolves inputs without inspecting values.
    constants: Mapping[str, Any] = field(default_factory=dict)
    direct_refs: tuple[tuple[str, OutputRef], ...] = ()
    nested_refs: tuple[tuple[str, Any], ...] = ()
    # The parameter-independent part of the cache key, computed on first use (see _cache).
    static_digest: str | None = None

    @property
    def name(self) -> str:
        return self.id

    def __repr__(self) -> str:
        return f"<Node {self.id} step={getattr(self.step, 'name', '?')}>"


def contains_ref(value: Any) -> bool:
    """Whether a parameter value holds an upstream reference anywhere inside lists/tuples/dicts."""
    if isinstance(value, OutputRef):
        return True
    if isinstance(value, list | tuple):
        return any(contains_ref(v) for v in value)
    if isinstance(value, dict):
        return any(contains_ref(v) for v in value.values())
    return False


def iter_refs(value: Any) -> Iterator[OutputRef]:
    """Every upstream reference inside a parameter value."""
    if isinstance(value, OutputRef):
        yield value
    elif isinstance(value, list | tuple):
        for v in value:
            yield from iter_refs(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from iter_refs(v)


class Graph:
    """An immutable DAG of invocations in declaration order.

    Attributes:
        pipeline_name: the pipeline it was compiled from.
        nodes: the nodes, in declaration order (node.index is the position).
        parameters: the pipeline parameters it was compiled with.
    """

    __slots__ = ("_by_id", "children", "data_consumers", "nodes", "outputs", "parameters",
                 "pipeline_name")

    def __init__(
        self,
        pipeline_name: str,
        nodes: Sequence[Node],
        parameters: Mapping[str, Any] | None = None,
        outputs: Any = None,
        *,
        by_id: dict[str, Node] | None = None,
    ) -> None:
        """`by_id`, if given, maps each node's ID to it (the compile has that map already)."""
        self.pipeline_name = pipeline_name
        self.nodes: tuple[Node, ...] = tuple(nodes)
        self.parameters = dict(parameters or {})
        self.outputs = outputs
        self._by_id = by_id if by_id is not None else {n.id: n for n in self.nodes}
        children: list[list[int]] = [[] for _ in self.nodes]
        consumers = [0] * len(self.nodes)
        # Recorded invocations come in a topological order unless an edge points forward (an
        # `after=` naming a later invocation): only then can there be a cycle to look for.
        forward = False
        for n in self.nodes:
            parents = n.parents
            if not parents:
                continue
            i = n.index
            for p in parents:
                children[p].append(i)
            if max(parents) >= i:
                forward = True
            for p in n.data_parents:
                consumers[p] += 1
        self.children: tuple[tuple[int, ...], ...] = tuple(map(tuple, children))
        self.data_consumers: tuple[int, ...] = tuple(consumers)
        if forward:
            self._check_acyclic()

    def __getitem__(self, node_id: str) -> Node:
        return self._by_id[node_id]

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._by_id

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __repr__(self) -> str:
        edges = sum(len(n.parents) for n in self.nodes)
        return f"<Graph {self.pipeline_name} {len(self.nodes)} nodes {edges} edges>"

    @property
    def edges(self) -> list[tuple[str, str, str]]:
        """(upstream ID, downstream ID, 'data' | 'order') for every edge."""
        out = []
        for n in self.nodes:
            data = set(n.data_parents)
            for p in n.parents:
                out.append((self.nodes[p].id, n.id, "data" if p in data else "order"))
        return out

    def descendants(self, index: int) -> list[int]:
        """Indices of every node downstream of `index`, in declaration order."""
        seen: set[int] = set()
        stack = list(self.children[index])
        while stack:
            i = stack.pop()
            if i not in seen:
                seen.add(i)
                stack.extend(self.children[i])
        return sorted(seen)

    def ready_set(self) -> ReadySet:
        """A fresh, mutable scheduling state for one run of this graph."""
        return ReadySet(self)

    def to_mermaid(self) -> str:
        """The graph as a Mermaid flowchart (order-only edges dotted)."""
        lines = ["flowchart TD"]
        for n in self.nodes:
            label = n.id if n.map_spec is None else f"{n.id} (map)"
            lines.append(f'    n{n.index}["{label}"]')
        for n in self.nodes:
            data = set(n.data_parents)
            for p in n.parents:
                arrow = "-->" if p in data else "-.->"
                lines.append(f"    n{p} {arrow} n{n.index}")
        return "\n".join(lines)

    def _check_acyclic(self) -> None:
        remaining = [len(n.parents) for n in self.nodes]
        queue = [i for i, r in enumerate(remaining) if r == 0]
        seen = 0
        while queue:
            i = queue.pop()
            seen += 1
            for c in self.children[i]:
                remaining[c] -= 1
                if remaining[c] == 0:
                    queue.append(c)
        if seen == len(self.nodes):
            return
        cycle = self._find_cycle({i for i, r in enumerate(remaining) if r > 0})
        names = " -> ".join(self.nodes[i].id for i in cycle)
        raise PipelineDefinitionError(
            f"pipeline '{self.pipeline_name}' has a dependency cycle: {names}; "
            "remove one of the `after=` or data dependencies in it"
        )

    def _find_cycle(self, candidates: set[int]) -> list[int]:
        # Walk parent edges inside the unresolved set until a node repeats.
        start = min(candidates)
        path: list[int] = []
        pos: dict[int, int] = {}
        node = start
        while node not in pos:
            pos[node] = len(path)
            path.append(node)
            node = next(p for p in self.nodes[node].parents if p in candidates)
        cycle = path[pos[node]:]
        cycle.reverse()
        return [*cycle, cycle[0]]


class ReadySet:
    """graphlib-style scheduling state: `get_ready()`, `done(i)`, `failed(i)`.

    Indices are node positions; every node ends in exactly one of done, failed or skipped.
    """

    __slots__ = ("_children", "_pending", "_ready", "_remaining", "finished", "n")

    def __init__(self, graph: Graph) -> None:
        self._children = graph.children
        self._remaining = [len(n.parents) for n in graph.nodes]
        self._ready = [i for i, r in enumerate(self._remaining) if r == 0]
        # Nodes not yet handed out by get_ready() and not skipped.
        self._pending = set(range(len(graph.nodes))) - set(self._ready)
        self.finished = 0
        self.n = len(graph.nodes)

    def get_ready(self) -> list[int]:
        """Nodes whose dependencies have all finished successfully; each is returned once."""
        ready, self._ready = self._ready, []
        return ready

    def done(self, index: int) -> list[int]:
        """Mark `index` finished successfully; returns the nodes that became ready by it."""
        self.finished += 1
        remaining = self._remaining
        newly: list[int] = []
        for c in self._children[index]:
            remaining[c] -= 1
            if remaining[c] == 0 and c in self._pending:
                self._pending.discard(c)
                newly.append(c)
        return newly

    def failed(self, index: int) -> list[int]:
        """Mark `index` failed (or stopped); returns its not-yet-started descendants, now skipped."""
        self.finished += 1
        skipped: list[int] = []
        stack = list(self._children[index])
        while stack:
            i = stack.pop()
            if i in self._pending:
                self._pending.discard(i)
                skipped.append(i)
                stack.extend(self._children[i])
        self.finished += len(skipped)
        skipped.sort()
        return skipped

    def skip_rest(self) -> list[int]:
        """Skip every node not yet handed out (and any ready but not fetched); returns them."""
        rest = sorted(self._pending | set(self._ready))
        self._pending.clear()
        self._ready = []
        self.finished += len(rest)
        return rest

    @property
    def is_finished(self) -> bool:
        return self.finished >= self.n
