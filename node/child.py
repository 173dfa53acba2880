"""One-off work in a short-lived child interpreter, so a long-lived process does not keep its imports.

Light on purpose (stdlib only at import): the node runner and the services both use it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ecluster.clusterfile import Cluster


def in_a_child(target: str, cluster: "Cluster", member: str, timeout: float = 120.0) -> Any:
    """``target(cluster, member)`` (``"module:function"``, returning JSON) run in a fresh
    interpreter, used once, and its result returned.

    For one-off work whose imports a long-lived service should not keep: finding which
    services run on a member loads every service class (GitPython, lmdb, starlette, the
    plug-ins: ~10-17 MB), which the node runner and the control and metrics services then
    carried for their whole life. A plain child process (not multiprocessing, whose resource tracker would stay as
    one more process). Blocking: call it offloaded. Raises RuntimeError if the child fails."""
    import json
    import subprocess
    import sys
    job = json.dumps({"target": target, "config": str(cluster.path), "keys": str(cluster.keys_dir), "member": member})
    r = subprocess.run([sys.executable, "-c", "from node.child import _child_job; _child_job()"], input=job,
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        lines = r.stderr.strip().splitlines()
        raise RuntimeError(f"{target} in a child: exit {r.returncode}: {lines[-1] if lines else ''}")
    return json.loads(r.stdout)


def _child_job() -> None:
    """The child's side of :func:`in_a_child`: the job on stdin, its result on stdout."""
    import dataclasses
    import importlib
    import json
    import sys
    from pathlib import Path

    from ecluster.clusterfile import load_cluster
    job = json.loads(sys.stdin.read())
    cluster = dataclasses.replace(load_cluster(job["config"]), keys_dir=Path(job["keys"]))
    module, _, fn = job["target"].partition(":")
    json.dump(getattr(importlib.import_module(module), fn)(cluster, job["member"]), sys.stdout)
