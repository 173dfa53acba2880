"""The plug-in's delegated command: ``ecluster broadcast postfix status`` (entry-point group
``ecluster.commands``), answered by each node's control service."""
from __future__ import annotations

from services.control import Command


class PostfixStatusCommand(Command):
    """Postfix on this node: running, VIPs listened on and sent from, applied configuration, log position.

    Example: ecluster broadcast postfix status
    """

    name = "postfix status"
    roles = ("node",)

    async def execute(self, service, args):
        return await service.ask_local("postfix", "status")
