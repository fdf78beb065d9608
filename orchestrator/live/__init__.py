"""The live servers: connections, the read-only snapshot of their facts, advisory locks.

Reads servers in read-only transactions and never writes a row; starts the embedded server
when the plan file declares one.
"""
