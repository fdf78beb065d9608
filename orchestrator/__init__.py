"""dbplan: plan and apply PostgreSQL databases and their SQL migrations from one file.

The pipeline, one module per stage::

    config (dbplan.yaml -> Estate) -> graph -> migrations (folders) -> facts (live servers)
        -> planner (pure) -> Plan -> render (text | json | markdown)
                                  -> executor (the only writer) -> Result

The functions of ``orchestrator.api`` are the public library API; the command line in
``orchestrator.cli`` is a thin view of them.
"""

__version__ = "0.1.0"
