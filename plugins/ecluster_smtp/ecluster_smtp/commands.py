"""The plug-in's delegated command: ``ecluster broadcast smtp status`` (entry-point group
``ecluster.commands``), answered by each node's control service."""
from __future__ import annotations

from services.control import Command


class SmtpStatusCommand(Command):
    """The SMTP plug-in on this node: VIPs listened on, sessions, counters, spooled messages.

    Example: ecluster broadcast smtp status
    """

    name = "smtp status"
    roles = ("node",)

    async def execute(self, service, args):
        return await service.ask_local("smtp", "status")
