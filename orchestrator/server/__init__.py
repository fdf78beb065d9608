"""The embedded PostgreSQL server: find its binaries, initialise, start and stop it.

Writes only its own data folder and the cluster it runs; knows nothing of plans or migrations.
"""
