"""dbplan: plan and apply PostgreSQL databases and their SQL migrations from one file.

The pipeline, one folder per stage, each importing only from the stages before it::

    estate (dbplan.yaml -> Estate, graph) -> migrations (folders -> sets)
        -> server (the embedded cluster) -> live (facts of the servers)
        -> planning (pure planner -> Plan) -> execution (the only writer -> Result)
        -> verification (test, plan --verify: on throwaway databases)
        -> render (text | json | markdown)

The functions of ``orchestrator.api`` are the public library API; the command line in
``orchestrator.cli`` is a thin view of them. ``orchestrator.errors`` is shared by all.
"""

__version__ = "0.1.0"
