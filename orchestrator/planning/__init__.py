"""Planning: the pure planner, the Plan value it returns, and saved plans with their fingerprint.

The planner never sees a connection: estate, migration sets and live facts in, a Plan out.
Only ``savedplan`` touches the file system, for the plan file it writes and reads.
"""
