"""The estate: ``dbplan.yaml`` read, expanded and validated into a frozen model, and its graph.

Reads the plan file and the environment; talks to no server and writes nothing.
Imports only ``orchestrator.errors``.
"""
