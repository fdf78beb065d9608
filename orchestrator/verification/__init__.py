"""Verification: prove migrations on throwaway databases of the embedded server before a merge.

Reads the migration folders and the catalog of throwaway databases it creates (and drops,
even on failure) on the embedded server; never touches the servers the plan file names.
Applies and reverts through ``execution``, exactly as ``apply`` would.
"""
