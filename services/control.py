"""control: every member's command endpoint (command delegation lands here).

For now it answers the basic commands; issue 6 grows it into command classes.
"""
from __future__ import annotations

import os
import platform
import time

from services.base import Service


class ControlService(Service):
    name = "control"
    builtin = True

    def rpc_status(self) -> dict:
        return {"member": self.member.name, "role": self.member.role, "cluster": self.cluster.name,
                "pid": os.getpid(), "host": platform.node(), "time": time.time(),
                "uptime": round(time.time() - self.started, 3)}

    def rpc_version(self) -> dict:
        from importlib.metadata import version
        return {"ecluster": version("ecluster"), "python": platform.python_version()}
