"""Execution: the only stage that writes to servers (roles, databases, migrations, bookkeeping).

Takes the locks, re-reads the facts and re-plans under them, then acts; reports through the
small progress protocol of ``progress`` so that callers draw or log as they like.
"""
