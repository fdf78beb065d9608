"""A database's schema as a set of named objects, read from the catalog, for comparing.

Each object is a (kind, name) key with a definition text: two snapshots are equal exactly
when the schema is (structure and privileges, never data). Objects that belong to an
extension are the extension's; dbplan's own bookkeeping tables are left out.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psycopg

Snapshot = dict[tuple[str, str], str]  # (kind, name) -> definition

# The schemas a migration may touch. Parameter 1: the bookkeeping tables to leave out, as
# 'schema.table' texts. Names in public are shown without "public.".
CATALOG = r"""
WITH user_ns AS (
  SELECT oid, nspname FROM pg_namespace
  WHERE nspname NOT IN ('pg_catalog', 'information_schema') AND nspname NOT LIKE 'pg\_toast%%'
    AND nspname NOT LIKE 'pg\_temp\_%%'
), rel AS (
  SELECT c.oid, c.relname, c.relkind, c.relacl, c.relowner, c.relpersistence, c.relrowsecurity, c.relpartbound,
         CASE WHEN n.nspname = 'public' THEN '' ELSE n.nspname || '.' END || c.relname AS name
  FROM pg_class c JOIN user_ns n ON n.oid = c.relnamespace
  WHERE NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
    AND (n.nspname || '.' || c.relname) <> ALL (%(excluded)s::text[])
    AND NOT EXISTS (  -- sequences owned by a bookkeeping table (its bigserial id)
      SELECT FROM pg_depend d JOIN pg_class t ON t.oid = d.refobjid JOIN pg_namespace tn ON tn.oid = t.relnamespace
      WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype IN ('a', 'i')
        AND (tn.nspname || '.' || t.relname) = ANY (%(excluded)s::text[]))
), fn AS (
  SELECT p.*, CASE WHEN n.nspname = 'public' THEN '' ELSE n.nspname || '.' END || p.proname
              || '(' || pg_get_function_identity_arguments(p.oid) || ')' AS name
  FROM pg_proc p JOIN user_ns n ON n.oid = p.pronamespace
  WHERE NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
), typ AS (
  SELECT t.*, CASE WHEN n.nspname = 'public' THEN '' ELSE n.nspname || '.' END || t.typname AS name
  FROM pg_type t JOIN user_ns n ON n.oid = t.typnamespace
  WHERE NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_type'::regclass AND d.objid = t.oid AND d.deptype = 'e')
    AND (t.typtype IN ('e', 'd', 'r', 'm')
         OR (t.typtype = 'c' AND (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c'))
)
SELECT 'schema', nspname, 'owner ' || pg_get_userbyid(nspowner) FROM pg_namespace n
  WHERE n.oid IN (SELECT oid FROM user_ns) AND nspname <> ALL (%(excluded_schemas)s::text[])
    AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_namespace'::regclass AND d.objid = n.oid AND d.deptype = 'e')
UNION ALL
SELECT 'grants on schema', nspname, nspacl::text FROM pg_namespace n
  WHERE n.oid IN (SELECT oid FROM user_ns) AND nspacl IS NOT NULL AND nspname <> ALL (%(excluded_schemas)s::text[])
UNION ALL
SELECT CASE relkind WHEN 'r' THEN 'table' WHEN 'p' THEN 'table' WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view'
                    WHEN 'S' THEN 'sequence' WHEN 'f' THEN 'foreign table' END,
       name,
       concat_ws(' ', 'owner ' || pg_get_userbyid(relowner),
                 CASE relpersistence WHEN 'u' THEN 'unlogged' END,
                 CASE relkind WHEN 'p' THEN 'partitioned by ' || pg_get_partkeydef(oid) END,
                 CASE WHEN relpartbound IS NOT NULL THEN 'partition ' || pg_get_expr(relpartbound, oid) END,
                 CASE WHEN relrowsecurity THEN 'row level security' END,
                 CASE WHEN relkind IN ('v', 'm') THEN pg_get_viewdef(oid) END,
                 CASE WHEN relkind = 'S' THEN (SELECT format('%%s start %%s increment %%s min %%s max %%s%%s',
                        format_type(seqtypid, NULL), seqstart, seqincrement, seqmin, seqmax,
                        CASE WHEN seqcycle THEN ' cycle' END) FROM pg_sequence WHERE seqrelid = rel.oid) END)
FROM rel WHERE relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
UNION ALL
SELECT 'grants on ' || CASE relkind WHEN 'S' THEN 'sequence' WHEN 'v' THEN 'view' ELSE 'table' END, name, relacl::text
FROM rel WHERE relacl IS NOT NULL AND relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
UNION ALL
SELECT 'column', rel.name || '.' || a.attname,
       concat_ws(' ', format_type(a.atttypid, a.atttypmod),
                 CASE WHEN a.attnotnull THEN 'not null' END,
                 CASE WHEN a.attidentity <> '' THEN 'identity ' || a.attidentity::text END,
                 CASE WHEN a.attgenerated <> '' THEN 'generated' END,
                 'default ' || pg_get_expr(ad.adbin, ad.adrelid),
                 CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation
                      THEN 'collate ' || (SELECT collname FROM pg_collation WHERE oid = a.attcollation) END)
FROM rel JOIN pg_attribute a ON a.attrelid = rel.oid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
WHERE rel.relkind IN ('r', 'p', 'v', 'm', 'f')
UNION ALL
SELECT 'constraint', rel.name || '.' || con.conname, pg_get_constraintdef(con.oid)
FROM pg_constraint con JOIN rel ON rel.oid = con.conrelid
UNION ALL
SELECT 'constraint', typ.name || '.' || con.conname, pg_get_constraintdef(con.oid)
FROM pg_constraint con JOIN typ ON typ.oid = con.contypid
UNION ALL
SELECT 'index', idx.name, pg_get_indexdef(i.indexrelid)
FROM pg_index i JOIN rel idx ON idx.oid = i.indexrelid
WHERE i.indrelid IN (SELECT oid FROM rel)
UNION ALL
SELECT CASE prokind WHEN 'p' THEN 'procedure' WHEN 'a' THEN 'aggregate' ELSE 'function' END, name,
       concat_ws(' ', 'owner ' || pg_get_userbyid(proowner),
                 CASE WHEN prokind IN ('f', 'p', 'w') THEN pg_get_functiondef(oid) END)
FROM fn
UNION ALL
SELECT 'grants on function', name, proacl::text FROM fn WHERE proacl IS NOT NULL
UNION ALL
SELECT 'trigger', rel.name || '.' || tg.tgname, pg_get_triggerdef(tg.oid)
FROM pg_trigger tg JOIN rel ON rel.oid = tg.tgrelid WHERE NOT tg.tgisinternal
UNION ALL
SELECT 'policy', rel.name || '.' || pol.polname,
       concat_ws(' ', pol.polcmd::text, CASE WHEN pol.polpermissive THEN 'permissive' ELSE 'restrictive' END,
                 'using ' || pg_get_expr(pol.polqual, pol.polrelid), 'check ' || pg_get_expr(pol.polwithcheck, pol.polrelid))
FROM pg_policy pol JOIN rel ON rel.oid = pol.polrelid
UNION ALL
SELECT 'type', typ.name,
       CASE typ.typtype
         WHEN 'e' THEN 'enum (' || (SELECT string_agg(quote_literal(enumlabel), ', ' ORDER BY enumsortorder)
                                    FROM pg_enum WHERE enumtypid = typ.oid) || ')'
         WHEN 'd' THEN concat_ws(' ', 'domain over ' || format_type(typ.typbasetype, typ.typtypmod),
                                 CASE WHEN typ.typnotnull THEN 'not null' END, 'default ' || typ.typdefault)
         WHEN 'r' THEN 'range of ' || (SELECT format_type(rngsubtype, NULL) FROM pg_range WHERE rngtypid = typ.oid)
         WHEN 'm' THEN 'multirange'
         ELSE 'composite (' || (SELECT string_agg(quote_ident(attname) || ' ' || format_type(atttypid, atttypmod), ', '
                                                  ORDER BY attnum)
                                FROM pg_attribute WHERE attrelid = typ.typrelid AND attnum > 0 AND NOT attisdropped) || ')'
       END
FROM typ WHERE typ.typtype <> 'm'
UNION ALL
SELECT 'extension', extname, 'version ' || extversion || ' in ' || (SELECT nspname FROM pg_namespace WHERE oid = extnamespace)
FROM pg_extension WHERE extname <> 'plpgsql'
"""


def snapshot(
    conn: psycopg.Connection, *, excluded_tables: Collection[str] = (), excluded_schemas: Collection[str] = ()
) -> Snapshot:
    """The schema of the connected database; ``excluded_tables`` as 'schema.table' texts."""
    rows = conn.execute(
        CATALOG, {"excluded": list(excluded_tables), "excluded_schemas": list(excluded_schemas)}
    ).fetchall()
    return {(kind, name): definition or "" for kind, name, definition in rows}


def differences(before: Snapshot, after: Snapshot) -> list[tuple[str, str, str, str | None, str | None]]:
    """(change, kind, name, before, after) for every object that is not the same in both,
    change being 'added', 'dropped' or 'changed', in a stable order."""
    found = []
    for key in sorted(before.keys() | after.keys()):
        was, now = before.get(key), after.get(key)
        if was == now:
            continue
        change = "added" if was is None else "dropped" if now is None else "changed"
        found.append((change, key[0], key[1], was, now))
    return found
