"""The dependency graph of servers, roles, databases and services.

networkx stays inside this module; the rest of dbplan sees plain tuples. Orders are
deterministic: ties are broken by the order of the plan file.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import GraphError
from .model import Estate

Node = tuple[str, str]  # (kind, name): ("server", "main"), ("service", "product"), ...


@dataclass(frozen=True)
class EstateGraph:
    nodes: tuple[Node, ...]
    edges: tuple[tuple[Node, Node], ...]  # (prerequisite, dependent)
    service_order: tuple[str, ...]  # every service after the services it depends on
    service_generations: tuple[tuple[str, ...], ...]  # services of one generation are independent


# The last estate built and its graph: load() builds it to report cycles, and the command
# then asks again for the same estate (a fleet's graph of thousands of nodes, twice).
_last_built: tuple[Estate, EstateGraph] | None = None


def build(estate: Estate) -> EstateGraph:
    """Build the graph; raise ``GraphError`` naming every member of a dependency cycle."""
    global _last_built
    last = _last_built
    if last is not None and last[0] is estate:
        return last[1]
    built = _build(estate)
    _last_built = (estate, built)  # one tuple: a thread sees the old pair or the new one
    return built


def _nodes_and_edges(estate: Estate) -> tuple[dict[Node, int], list[tuple[Node, Node]]]:
    """Every node, ranked in the order of the plan file, and every edge (prerequisite,
    dependent), in the order they were found."""
    rank: dict[Node, int] = {}
    edges: list[tuple[Node, Node]] = []

    def add(node: Node) -> None:
        rank.setdefault(node, len(rank))

    for name in estate.servers:
        add(("server", name))
    role_keys = {(role.name, role.server): key for key, role in estate.roles.items()}
    for key, role in estate.roles.items():
        add(("role", key))  # a role on several servers has an entry (and a node) per server
        edges.append((("server", role.server), ("role", key)))
    for database in estate.databases.values():
        add(("database", database.name))
        edges.append((("server", database.server), ("database", database.name)))
        if database.owner:
            owner = role_keys.get((database.owner, database.server), database.owner)
            edges.append((("role", owner), ("database", database.name)))
    for service in estate.services.values():
        add(("service", service.name))
        edges.append((("database", service.database), ("service", service.name)))
        for dependency in service.depends_on:
            edges.append((("service", dependency), ("service", service.name)))
    return rank, edges


def _build(estate: Estate) -> EstateGraph:
    rank, edges = _nodes_and_edges(estate)
    if not any(service.depends_on for service in estate.services.values()) and all(
        node in rank for edge in edges for node in edge
    ):
        return _without_dependencies(rank, edges)
    import networkx as nx  # heavy import (0.1 s), paid only where services depend on others

    graph = nx.DiGraph()
    graph.add_nodes_from(rank)
    graph.add_edges_from(edges)

    _raise_on_cycle(graph, estate)

    services = graph.subgraph([node for node in graph if node[0] == "service"])
    order = tuple(name for _, name in nx.lexicographical_topological_sort(services, key=rank.__getitem__))
    generations = tuple(
        tuple(name for _, name in sorted(generation, key=rank.__getitem__))
        for generation in nx.topological_generations(services)
    )
    return EstateGraph(
        nodes=tuple(sorted(graph.nodes, key=rank.__getitem__)),
        edges=tuple(sorted(graph.edges, key=lambda edge: (rank[edge[0]], rank[edge[1]]))),
        service_order=order,
        service_generations=generations,
    )


def _without_dependencies(rank: dict[Node, int], edges: list[tuple[Node, Node]]) -> EstateGraph:
    """The graph of an estate where no service depends on another (a fleet's, often):
    edges only go from servers to roles and databases, roles to databases, databases to
    services, so there is no cycle, the services' order is the plan file's and they are
    all one generation. What networkx would compute (a test holds them equal), without
    importing it."""
    services = tuple(name for kind, name in rank if kind == "service")
    return EstateGraph(
        nodes=tuple(rank),
        edges=tuple(sorted(set(edges), key=lambda edge: (rank[edge[0]], rank[edge[1]]))),
        service_order=services,
        service_generations=(services,) if services else (),
    )


def _raise_on_cycle(graph: object, estate: Estate) -> None:
    import networkx as nx

    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return
    # Edges point from a prerequisite to its dependent; reversed, they read "depends on".
    members = [edge[1][1] for edge in reversed(cycle)]  # only depends_on can close a cycle
    start = members.index(min(members, key=list(estate.services).index))
    members = members[start:] + members[:start]
    first = estate.services[members[0]]
    path = " -> ".join(members + [members[0]])
    raise GraphError(
        f"dependency cycle between services ('a -> b': a depends on b): {path}",
        place=first.place,
        hint="remove one of these depends_on entries",
    )
