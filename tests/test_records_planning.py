"""What ``baseline`` and ``accept`` decide to record (planning.records), and what the
planner makes of those rows afterwards: pure, over the in-memory estate of test_planner."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from test_planner import World, applied

from orchestrator.errors import DbplanError
from orchestrator.live.facts import HistoryEntry, ServiceFacts
from orchestrator.planning.records import Recording, plan_accept, plan_baseline


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def after(facts: ServiceFacts, recording: Recording) -> ServiceFacts:
    """The facts once the recording's rows are written (ids after every existing row)."""
    base = max((entry.id for entry in facts.history), default=0)
    new = tuple(
        HistoryEntry(row.version, row.event, row.checksum, row.title, base + index)
        for index, row in enumerate(recording.rows, start=1)
    )
    history = {entry.version: entry for entry in facts.history + new}  # the latest event of each version
    cuts = [entry for entry in facts.history + new if entry.event in ("force", "baseline")]
    return replace(
        facts,
        table_exists=True,
        history_exists=True,
        version=recording.version_after if recording.sets_version else facts.version,
        history=tuple(sorted(history.values(), key=lambda entry: entry.version)),
        last_force=max(cuts, key=lambda entry: entry.id, default=None),
    )


def bare(service: str) -> ServiceFacts:
    """A database made by hand: no bookkeeping at all."""
    return ServiceFacts(service, database_exists=True, schema="public")


def test_baseline_counts_the_files_up_to_the_version_and_plan_goes_on_from_there(world: World) -> None:
    product = world.estate.services["product"]
    recording = plan_baseline(product, world.migration_sets()["product"], bare("product"), 2, "by hand")

    assert [(row.version, row.event, row.reason) for row in recording.rows] == [(1, "baseline", "by hand"), (2, "baseline", "by hand")]
    assert recording.rows[0].checksum == world.checksum("product", "000001_init_schema.up.sql")
    plan = world.plan(after(bare("product"), recording), applied(world, "inventory", 1, 2))
    assert plan.actions == (world.apply("product", 3, "product_search", 3),)
    assert plan.service("product").drift == ()


def test_baseline_leaves_the_rows_of_applied_versions_alone(world: World) -> None:
    product = world.estate.services["product"]
    facts = applied(world, "product", 1)
    recording = plan_baseline(product, world.migration_sets()["product"], facts, 3, None)
    assert [row.version for row in recording.rows] == [2, 3]
    world.write("product", {"000001_init_schema.up.sql": "CREATE TABLE product (id int);\n"})
    plan = world.plan(after(facts, recording), applied(world, "inventory", 1, 2))
    assert [d.version for d in plan.service("product").drift] == [1], "the baseline hid no drift"
    assert plan.actions == ()


def test_an_accept_keeps_the_version_applied_with_the_new_checksum(world: World) -> None:
    product = world.estate.services["product"]
    facts = applied(world, "product", 1, 2, 3)
    world.write("product", {"000001_init_schema.up.sql": "CREATE TABLE product (id int);  -- comment\n"})
    recording = plan_accept(product, world.migration_sets()["product"], facts, 1, "comment")
    accepted = after(facts, recording)

    plan = world.plan(accepted, applied(world, "inventory", 1, 2))
    assert (plan.actions, plan.service("product").drift) == ((), ())
    # An accept older than a force to a version above it stays what the version's state is.
    force = HistoryEntry(3, "force", None, "product_search", 99)
    forced = replace(accepted, history=(*accepted.history[:2], force), last_force=force)
    assert world.plan(forced, applied(world, "inventory", 1, 2)).service("product").drift == ()
    world.write("product", {"000001_init_schema.up.sql": "CREATE TABLE product (id int);  -- again\n"})
    assert [d.version for d in world.plan(accepted, applied(world, "inventory", 1, 2)).service("product").drift] == [1]


@pytest.mark.parametrize(
    ("version", "message"),
    [(3, "is not applied: there is nothing to accept"), (2, "has no drift"), (4, "has no migration with version 4")],
)
def test_accept_refuses(world: World, version: int, message: str) -> None:
    product = world.estate.services["product"]
    with pytest.raises(DbplanError, match=message):
        plan_accept(product, world.migration_sets()["product"], applied(world, "product", 1, 2), version, "why")
