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


def _build(estate: Estate) -> EstateGraph:
    import networkx as nx  # heavy import, paid only by commands that need the graph

    graph = nx.DiGraph()
    rank: dict[Node, int] = {}

    def add(node: Node) -> None:
        rank.setdefault(node, len(rank))
        graph.add_node(node)

    for name in estate.servers:
        add(("server", name))
    role_keys = {(role.name, role.server): key for key, role in estate.roles.items()}
    for key, role in estate.roles.items():
        add(("role", key))  # a role on several servers has an entry (and a node) per server
        graph.add_edge(("server", role.server), ("role", key))
    for database in estate.databases.values():
        add(("database", database.name))
        graph.add_edge(("server", database.server), ("database", database.name))
        if database.owner:
            owner = role_keys.get((database.owner, database.server), database.owner)
            graph.add_edge(("role", owner), ("database", database.name))
    for service in estate.services.values():
        add(("service", service.name))
        graph.add_edge(("database", service.database), ("service", service.name))
        for dependency in service.depends_on:
            graph.add_edge(("service", dependency), ("service", service.name))

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
