"""graph.build: deterministic service order, generations and cycle errors.

Estates are built in memory; the order of the dicts is the order of the plan file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import GraphError, Place
from orchestrator.estate import graph
from orchestrator.estate.model import Database, Estate, Role, Server, Service

ROOT = Path("/plans/estate")


def make_estate(services: dict[str, tuple[str, ...]], *, databases: dict[str, str | None] | None = None) -> Estate:
    """An estate on one server; ``services`` maps each name to what it depends on, in file order.

    Every service gets its own database unless ``databases`` (name -> owner) says otherwise.
    """
    databases = databases if databases is not None else {f"{name}_db": None for name in services}
    database_names = list(databases)
    return Estate(
        file=ROOT / "dbplan.yaml",
        root=ROOT,
        servers={"main": Server("main", "postgresql://localhost/postgres", embedded=None)},
        roles={
            owner: Role(owner, "main", login=True)
            for owner in dict.fromkeys(owner for owner in databases.values() if owner)
        },
        databases={name: Database(name, "main", owner) for name, owner in databases.items()},
        services={
            name: Service(
                name=name,
                database=database_names[index % len(database_names)],
                migrations_dir=ROOT / "migrations" / name,
                migrations_display=f"migrations/{name}",
                depends_on=depends_on,
                place=Place("dbplan.yaml", 10 + 3 * index, 3, f"services.{name}"),
            )
            for index, (name, depends_on) in enumerate(services.items())
        },
    )


def test_independent_services_keep_file_order() -> None:
    built = graph.build(make_estate({"zeta": (), "alpha": (), "mid": ()}))
    assert built.service_order == ("zeta", "alpha", "mid")
    assert built.service_generations == (("zeta", "alpha", "mid"),)


def test_dependencies_come_first_and_ties_follow_the_file() -> None:
    # inventory is written first but needs product; billing is free from the start.
    built = graph.build(make_estate({"inventory": ("product",), "product": (), "billing": ()}))
    # After product, both inventory and billing are free: inventory is earlier in the file.
    assert built.service_order == ("product", "inventory", "billing")


def test_chain_written_backwards_runs_forwards() -> None:
    built = graph.build(make_estate({"c": ("b",), "b": ("a",), "a": ()}))
    assert built.service_order == ("a", "b", "c")
    assert built.service_generations == (("a",), ("b",), ("c",))


def test_generations_group_independent_services() -> None:
    estate = make_estate(
        {
            "orders": ("product", "customer"),
            "product": (),
            "search": ("product",),
            "customer": (),
            "reports": ("orders", "search"),
        }
    )
    built = graph.build(estate)
    assert built.service_generations == (("product", "customer"), ("orders", "search"), ("reports",))
    # Each step takes the earliest-written service whose dependencies are done.
    assert built.service_order == ("product", "search", "customer", "orders", "reports")


def test_every_service_follows_what_it_depends_on() -> None:
    services = {
        "s1": ("s4",),
        "s2": (),
        "s3": ("s1", "s2"),
        "s4": (),
        "s5": ("s3",),
        "s6": ("s2", "s4"),
    }
    order = graph.build(make_estate(services)).service_order
    assert sorted(order) == sorted(services)
    for service, depends_on in services.items():
        for dependency in depends_on:
            assert order.index(dependency) < order.index(service), (dependency, service)


def test_nodes_and_edges_cover_servers_roles_databases_and_services() -> None:
    estate = make_estate({"product": (), "inventory": ("product",)}, databases={"products": "product_svc", "stock": None})
    built = graph.build(estate)
    assert built.nodes == (
        ("server", "main"),
        ("role", "product_svc"),
        ("database", "products"),
        ("database", "stock"),
        ("service", "product"),
        ("service", "inventory"),
    )
    assert built.edges == (
        (("server", "main"), ("role", "product_svc")),
        (("server", "main"), ("database", "products")),
        (("server", "main"), ("database", "stock")),
        (("role", "product_svc"), ("database", "products")),
        (("database", "products"), ("service", "product")),
        (("database", "stock"), ("service", "inventory")),
        (("service", "product"), ("service", "inventory")),
    )


def test_order_is_the_same_on_every_build() -> None:
    services = {f"svc{n:02d}": ((f"svc{n - 3:02d}",) if n >= 3 else ()) for n in range(30)}
    orders = {graph.build(make_estate(services)).service_order for _ in range(5)}
    assert len(orders) == 1


def test_three_service_cycle_names_every_member() -> None:
    estate = make_estate({"product": ("search",), "inventory": ("product",), "search": ("inventory",)})
    with pytest.raises(GraphError) as caught:
        graph.build(estate)
    err = caught.value
    # Starts at the member written first, and follows depends_on.
    assert err.message == (
        "dependency cycle between services ('a -> b': a depends on b): "
        "product -> search -> inventory -> product"
    )
    assert err.hint == "remove one of these depends_on entries"
    assert err.place == Place("dbplan.yaml", 10, 3, "services.product")


def test_cycle_among_later_services_names_only_the_members() -> None:
    estate = make_estate(
        {"gateway": (), "audit": ("gateway",), "a": ("c",), "b": ("a",), "c": ("b",), "tail": ("a",)}
    )
    with pytest.raises(GraphError) as caught:
        graph.build(estate)
    assert caught.value.message == "dependency cycle between services ('a -> b': a depends on b): a -> c -> b -> a"
    assert caught.value.place == Place("dbplan.yaml", 16, 3, "services.a")


def test_two_service_cycle() -> None:
    with pytest.raises(GraphError) as caught:
        graph.build(make_estate({"x": ("y",), "y": ("x",)}))
    assert caught.value.message.endswith(": x -> y -> x")


@pytest.mark.parametrize(
    "databases",
    [
        {"a_db": None, "b_db": None, "c_db": None},
        {"shared": "owner_1", "other": "owner_2", "third": "owner_1"},  # owners, a database served twice
        {"only": None},
    ],
    ids=["plain", "owners-and-a-shared-database", "one-database"],
)
def test_an_estate_without_dependencies_gets_the_graph_networkx_would_give(databases: dict[str, str | None]) -> None:
    """Without depends_on the graph is built without networkx; it must be the same graph."""
    import networkx as nx

    estate = make_estate({"a": (), "b": (), "c": (), "d": ()}, databases=databases)
    built = graph.build(estate)
    rank, edges = graph._nodes_and_edges(estate)
    expected = nx.DiGraph()
    expected.add_nodes_from(rank)
    expected.add_edges_from(edges)
    services = expected.subgraph([node for node in expected if node[0] == "service"])
    assert built.nodes == tuple(sorted(expected.nodes, key=rank.__getitem__))
    assert built.edges == tuple(sorted(expected.edges, key=lambda edge: (rank[edge[0]], rank[edge[1]])))
    assert built.service_order == tuple(
        name for _, name in nx.lexicographical_topological_sort(services, key=rank.__getitem__)
    )
    assert built.service_generations == tuple(
        tuple(name for _, name in sorted(generation, key=rank.__getitem__))
        for generation in nx.topological_generations(services)
    )


def test_a_plan_file_without_dependencies_loads_without_importing_networkx(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "migrations" / "app").mkdir(parents=True)
    (tmp_path / "dbplan.yaml").write_text(
        "version: 1\nservers:\n  main: {url: 'postgresql://localhost/postgres'}\n"
        "databases:\n  app: {server: main}\nservices:\n  app: {database: app, migrations: migrations/app}\n"
    )
    probe = (
        "import sys; from orchestrator.estate.load import load; load(sys.argv[1]); "
        "print('networkx' in sys.modules)"
    )
    ran = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "dbplan.yaml")], capture_output=True, text=True, check=False
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "False"
