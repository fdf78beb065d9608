"""Run dbplan commands in forked children of one warm interpreter (crash tests only).

Starting Python and importing dbplan takes half a second; a crash test kills dbplan
dozens of times. This script imports everything once, then for each request forks a
child: a real process of its own (own pid, own connections, killed by a real SIGKILL)
that runs ``orchestrator.cli.main``. Requests and replies are JSON lines:

  -> {"args": ["apply", "--yes", "-f", "dbplan.yaml"], "env": {"K": "V"}, "out": "/path", "err": "/path"}
  <- {"status": 0}        exit code, or minus the signal number that ended the child
"""

from __future__ import annotations

import json
import os
import sys


def _warm_up() -> None:
    # Everything an apply imports lazily, so that no child pays for it.
    import pglast  # noqa: F401
    import psycopg  # noqa: F401
    from psycopg import errors, sql  # noqa: F401

    import orchestrator.cli  # noqa: F401
    from orchestrator import api  # noqa: F401
    from orchestrator.execution import bookkeeping, executor, force  # noqa: F401
    from orchestrator.live import facts  # noqa: F401
    from orchestrator.planning import planner  # noqa: F401
    from orchestrator.render import json as render_json  # noqa: F401
    from orchestrator.render import text  # noqa: F401


def _child(request: dict[str, object]) -> None:
    os.environ.update(request.get("env") or {})  # type: ignore[arg-type]
    for fd, path in ((1, request["out"]), (2, request["err"])):
        target = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    code = 1
    try:
        from orchestrator.cli import main

        code = main(list(request["args"]))  # type: ignore[arg-type]
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    _warm_up()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"status": code}), flush=True)


if __name__ == "__main__":
    serve()
