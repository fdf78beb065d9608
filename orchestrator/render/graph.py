"""The estate's dependency graph as Mermaid (renders inline in a pull request) or DOT.

Node ids are generated (``n0``, ``n1``, ...), never taken from names, and every label is
escaped, so a name with quotes, spaces, brackets or any other character cannot break the
diagram. Arrows point from a prerequisite to what depends on it, the order ``apply``
follows: a server before its roles and databases, a role before the databases it owns, a
database before its services, a service before the services that depend on it. Servers
are drawn as boxes around their roles and databases. Nothing here prints a URL.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..estate.graph import EstateGraph, Node

ARROWS_NOTE = "Arrows point from a prerequisite to what depends on it (the order apply follows)."

# Mermaid: a label in double quotes, inside brackets that pick the shape.
_MERMAID_SHAPES = {"role": ('(["', '"])'), "database": ('[("', '")]'), "service": ('["', '"]')}
# Characters left as they are in a Mermaid label; every other one becomes an entity code
# (``#34;``), which Mermaid decodes. Letters and digits of any script are kept.
_MERMAID_PLAIN = frozenset(" _-.,:/()+")

_DOT_SHAPES = {"role": "ellipse", "database": "cylinder", "service": "box", "server": "box3d"}


def _node_ids(graph: EstateGraph) -> dict[Node, str]:
    return {node: f"n{index}" for index, node in enumerate(graph.nodes)}


def _members_by_server(graph: EstateGraph) -> dict[str, list[Node]]:
    """Roles and databases of each server, in plan-file order; every server is a key."""
    members: dict[str, list[Node]] = {name: [] for kind, name in graph.nodes if kind == "server"}
    for prerequisite, dependent in graph.edges:
        if prerequisite[0] == "server" and dependent[0] in ("role", "database"):
            members[prerequisite[1]].append(dependent)
    order = {node: index for index, node in enumerate(graph.nodes)}
    for nodes in members.values():
        nodes.sort(key=order.__getitem__)
    return members


def _drawn_edges(graph: EstateGraph, members: Mapping[str, list[Node]]) -> list[tuple[Node, Node]]:
    """Edges that are not already shown by a server's box holding its roles and databases."""
    held = {(("server", server), node) for server, nodes in members.items() for node in nodes}
    return [edge for edge in graph.edges if edge not in held]


def mermaid_label(text: str) -> str:
    """``text`` made safe inside a double-quoted Mermaid label."""
    return "".join(
        char if (char.isalnum() and char.isprintable()) or char in _MERMAID_PLAIN else f"#{ord(char)};"
        for char in text
    )


def render_mermaid(graph: EstateGraph, *, notes: Mapping[Node, str] | None = None) -> str:
    """The graph as a Mermaid flowchart (without the surrounding code fence).

    ``notes``: an extra line under a node's name, e.g. ``{("service", "product"): "3 to apply"}``.
    """
    ids = _node_ids(graph)
    members = _members_by_server(graph)
    notes = notes or {}

    def label(node: Node) -> str:
        lines = [node[1]] + ([notes[node]] if node in notes else [])
        return "<br>".join(mermaid_label(line) for line in lines)

    def shape(node: Node) -> str:
        opening, closing = _MERMAID_SHAPES[node[0]]
        return f"{ids[node]}{opening}{label(node)}{closing}"

    lines = ["flowchart LR", f"  %% {ARROWS_NOTE}"]
    for server, nodes in members.items():
        server_node = ("server", server)
        title = mermaid_label(f"server {server}")
        if not nodes:
            lines.append(f'  {ids[server_node]}["{title}"]')
            continue
        lines.append(f'  subgraph {ids[server_node]} ["{title}"]')
        lines += [f"    {shape(node)}" for node in nodes]
        lines.append("  end")
    lines += [f"  {shape(node)}" for node in graph.nodes if node[0] == "service"]
    for prerequisite, dependent in _drawn_edges(graph, members):
        lines.append(f"  {ids[prerequisite]} --> {ids[dependent]}")
    return "\n".join(lines) + "\n"


def dot_string(text: str) -> str:
    """``text`` as a DOT double-quoted string (also safe as an escString label)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(char if char.isprintable() else " " for char in escaped)
    return f'"{escaped}"'


def render_dot(graph: EstateGraph) -> str:
    """The graph as a Graphviz DOT digraph (``dot -Tsvg`` draws it)."""
    ids = _node_ids(graph)
    members = _members_by_server(graph)

    def node_line(node: Node, indent: str) -> str:
        return f"{indent}{ids[node]} [label={dot_string(node[1])}, shape={_DOT_SHAPES[node[0]]}];"

    lines = [
        "digraph dbplan {",
        f"  // {ARROWS_NOTE}",
        "  rankdir=LR;",
        '  node [fontname="Helvetica"];',
    ]
    for index, (server, nodes) in enumerate(members.items()):
        server_node = ("server", server)
        if not nodes:
            lines.append(f"  {ids[server_node]} [label={dot_string('server ' + server)}, shape=box3d];")
            continue
        lines.append(f"  subgraph cluster_{index} {{")
        lines.append(f"    label={dot_string('server ' + server)};")
        lines += [node_line(node, "    ") for node in nodes]
        lines.append("  }")
    lines += [node_line(node, "  ") for node in graph.nodes if node[0] == "service"]
    for prerequisite, dependent in _drawn_edges(graph, members):
        lines.append(f"  {ids[prerequisite]} -> {ids[dependent]};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(graph: EstateGraph, format: str = "mermaid") -> str:
    """The graph in ``format``: ``mermaid`` or ``dot``."""
    if format == "dot":
        return render_dot(graph)
    if format == "mermaid":
        return render_mermaid(graph)
    raise ValueError(f"unknown graph format {format!r}")
