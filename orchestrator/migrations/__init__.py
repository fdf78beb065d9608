"""Migration folders: scan them into ordered sets, split each file with PostgreSQL's parser, lint it.

Reads the migration files only; knows the estate's services but no server, and writes nothing.
"""
