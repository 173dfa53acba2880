"""Who is calling, and may they: the roles every RPC method declares. Pure: no sockets.

A call's caller is decided from what the broker stamped into the envelope, never from
the body (see :mod:`bus.broker`):

* ``src`` is another member: a peer broker sent it, and ZAP proved that peer holds that
  member's key (the broker drops a peer message whose ``src`` is not the peer's own name).
  The caller is that member, in its role from the cluster file (``node`` or ``manager``).
* ``src`` is this member and ``sc`` starts with ``x:``: a client that connected to this
  member's tcp port with a CURVE key; the broker wrote the key's name into ``sc``
  (``x:<routing id hex>.<key name>``). A member's name is that member (a client holding
  ``n1``'s key *is* ``n1`` as far as anyone can tell); any other key is an ``admin``
  identity (the admin CLI, ``ecluster --identity NAME``).
* otherwise a local process of this member (its services, a CLI over the 0700 ipc socket):
  the member itself (``local``), in its own role. Whoever can open that socket is root on
  this host and holds this member's key anyway, so ``local`` never means ``admin``.

A forwarded call carries the forwarder's identity, not the original caller's: a member
never vouches for someone else (a stolen node key must not become an admin by claiming
to forward one). Methods that only the coordinator serves therefore answer a remote caller
at another member with ``not_coordinator`` (naming it) instead of forwarding.

A method's :class:`Rule` lists the roles that may call it (``admin``, ``manager``,
``node``, ``self`` = the member itself, locally), optionally "or the member named by the
argument ``own``" (a node may drain itself, promise leases for itself) and optionally a
cluster-file switch that widens it (``[security] nodes_may_commit``). A refusal is the
typed error ``forbidden``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

ADMIN = "admin"
MANAGER = "manager"
NODE = "node"
SELF = "self"
ROLES = (ADMIN, MANAGER, NODE, SELF)

#: the prefix of the client id the broker gives a client connected on its tcp port
EXTERNAL_PREFIX = "x:"
FORBIDDEN = "forbidden"


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller of one message."""

    name: str              # a member name, or an admin identity's key name; "?" unknown
    role: str | None       # "admin" | "manager" | "node"; None: not one we know
    local: bool = False    # this member itself (its own processes over ipc)

    @property
    def member(self) -> bool:
        return self.role in (NODE, MANAGER)

    def __str__(self) -> str:
        return f"{self.name} ({'local ' if self.local else ''}{self.role or 'unknown'})"


def external_client_id(routing_hex: str, key_name: str) -> str:
    """The ``sc`` a broker gives a tcp client: its routing id and its key's name. Pure."""
    return f"{EXTERNAL_PREFIX}{routing_hex}.{key_name}"


def external_routing_hex(client_id: str) -> str:
    """The routing id (hex) in a client id made by :func:`external_client_id`. Pure."""
    return client_id[len(EXTERNAL_PREFIX):].partition(".")[0]


def principal_of(src: str, sc: str, me: str, member_roles: Mapping[str, str]) -> Principal:
    """The caller of a message that reached member ``me`` with these stamps. Pure.

    ``member_roles``: member name -> "node" | "manager" (the cluster file's)."""
    if src != me:
        return Principal(src, member_roles.get(src))
    if sc.startswith(EXTERNAL_PREFIX):
        name = sc[len(EXTERNAL_PREFIX):].partition(".")[2] or "?"
        if name in member_roles:
            # never local, even with this member's own key: "self" is this member's own
            # processes over ipc; a key used over tcp (a copied bundle) is only that member
            return Principal(name, member_roles[name])
        return Principal(name, ADMIN if name != "?" else None)
    return Principal(me, member_roles.get(me), local=True)


@dataclass(frozen=True, slots=True)
class Rule:
    """Who may call one method."""

    allow: frozenset[str]
    own: str | None = None          # ...or the member this argument names
    switch: str | None = None       # ...or a node when this [security] switch is true

    def describe(self) -> str:
        """The rule in words, for docs and the error message. Pure."""
        parts = [r for r in ROLES if r in self.allow]
        if self.own:
            parts.append(f"the member named by '{self.own}'")
        if self.switch:
            parts.append(f"node if [security] {self.switch}")
        return ", ".join(parts) or "nobody"


def rule(*roles: str, own: str | None = None, switch: str | None = None) -> Rule:
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise ValueError(f"unknown roles {unknown} (known: {', '.join(ROLES)})")
    return Rule(frozenset(roles), own, switch)


#: common rules
ANYONE = rule(ADMIN, MANAGER, NODE, SELF)
OPERATOR = rule(ADMIN, MANAGER, SELF)      # the operator's verbs; a manager acts for its console
ADMIN_ONLY = rule(ADMIN, SELF)
LOCAL_ONLY = rule(SELF)
MEMBERS = rule(MANAGER, NODE, SELF)        # the cluster's own protocol (members only)


def permits(r: Rule, who: Principal, args: Any = None, switches: Mapping[str, bool] | None = None) -> bool:
    """May ``who`` call a method with rule ``r`` and these arguments? Pure.

    ``self`` admits only the member itself (local); a member's remote role admits it from
    anywhere; ``own`` admits a member when the named argument is its own name."""
    if who.role is None:
        return False
    if who.local and SELF in r.allow:
        return True
    if who.role in r.allow:
        return True
    if r.own and who.member and isinstance(args, dict) and args.get(r.own) == who.name:
        return True
    if r.switch and who.role == NODE and switches and switches.get(r.switch) is True:
        return True
    return False


def refusal(service: str, method: str, r: Rule, who: Principal) -> str:
    """The one-line message of a ``forbidden`` error. Pure."""
    return f"{who} may not call {service}.{method} (allowed: {r.describe()})"
