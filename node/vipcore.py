"""Pure VIP decisions: which node owns each VIP, one VIP's owner state machine, lease arithmetic.

Nothing here performs I/O or reads a clock: every input is passed in, every decision is returned.
The VIP service (I/O edge: ``node/netlink.py``) and the coordinator call these functions.

Addresses
---------
A VIP is configured as ``"10.99.0.100/24"`` or ``"fd00::100/64"`` (IPv4 or IPv6, prefix
required: the prefix is what gets plumbed and exactly that prefix is removed again); the two
families mix freely in one cluster. Everywhere a VIP is *named* (result keys of
:func:`assign_vips`, ``pinned``, ``current``, ``follow``) the bare address is the key, in its
canonical text (IPv6 compressed, lower case): use :func:`vip_key`, which accepts either form
(``"10.99.0.100"`` or ``"10.99.0.100/24"``). Addresses no VIP can be (multicast, unspecified,
IPv6 link-local, loopback or IPv4-mapped, with a zone) are refused here, so a cluster file
naming one fails to load instead of a vip service failing at run time.

Privileges (:func:`vip_plumbing_refusal`)
-----------------------------------------
Plumbing needs CAP_NET_ADMIN, the announcements (AF_PACKET) CAP_NET_RAW; the effective set
is read from ``/proc/self/status`` (:func:`effective_capabilities`).

Assignment (:func:`assign_vips`)
--------------------------------
See the function's docstring for the rule order: pin, preference, stability, load, followers.

Owner state machine (:class:`VipOwnerFSM`)
------------------------------------------
One VIP seen from one node, in the style of the zguide's Binary Star: an explicit table
``TRANSITIONS[(state, event)] -> (next_state, actions)``. Every (state, event) pair is in exactly
one of ``TRANSITIONS``, ``IGNORED`` (harmless: a duplicate, or a stale completion) or ``INVALID``
(cannot happen when the caller keeps the contract below: count it, it points at a bug). Neither
ignored nor invalid events raise or change the state.

States::

    RELEASED   not plumbed here, not ours (the start state: the service unplumbs every managed
               address it holds at start, then waits for an election)
    ACQUIRING  lease granted, PLUMB issued, not yet confirmed
    OWNED      plumbed, lease valid, GARP sent
    HANDING_OVER  plumbed, lease valid, but the assignment names another node: keeps serving
               (no renewals) until that node asks for the handover or the lease runs out, so
               the successor collects its promises while clients are still answered here
    RELEASING  unplumbing (release ordered, lease expired, plumbing failed, or found plumbed
               without a lease)
    FENCED     we lost quorum: must not hold, and must not accept a grant until quorum is back

Events::

    LEASE_GRANTED, LEASE_RENEWED   from the coordinator (the caller has already checked the
                                   lease with lease_valid and dropped a stale one)
    LEASE_EXPIRED                  our own monotonic clock says the lease ran out
    REASSIGNED                     the assignment names another node (manual move, failback,
                                   drain): an owner keeps the address until the handover
    RELEASE_ORDERED                unplumb now: the successor asked for the handover, or we
                                   are stopping
    PLUMB_DONE, UNPLUMB_DONE       the I/O we asked for completed
    PLUMB_FAILED, UNPLUMB_FAILED   the I/O we asked for failed (the address is as it was)
    QUORUM_LOST, QUORUM_REGAINED   from membership/election
    FOUND_PLUMBED_UNEXPECTEDLY     reconciliation saw the address on our interface (it matters
                                   only when we do not claim it: RELEASED, RELEASING, FENCED)
    FOUND_MISSING                  reconciliation saw the address missing (it matters only when
                                   we own it or are releasing it: OWNED, RELEASING)
    OTHER_OWNER_SEEN               an ARP/announcement of another holder while we claim it

Actions: ``PLUMB``, ``UNPLUMB``, ``GARP_BURST``, ``SCHEDULE_GARP_REPEAT``, ``CANCEL_GARP_REPEAT``,
``REPORT_OWNED``, ``REPORT_RELEASED`` (tell the coordinator), and alarms, which the caller raises
as cluster alarms, not log lines: ``ALARM_TWO_OWNERS`` (a safety violation),
``ALARM_PLUMB_FAILED``, ``ALARM_UNPLUMB_FAILED``.

Contract for the caller: execute actions in the order given, serialise the plumbing I/O of one
VIP (a PLUMB issued after an UNPLUMB completes after it), and feed exactly one completion
(``*_DONE`` or ``*_FAILED``) per PLUMB/UNPLUMB. :class:`VipOwnerFSM` counts the operations in
flight and applies two rules before the table:

* a completion counts only when it finishes the *last* operation issued; earlier ones are
  superseded (IGNORED), because only the last one says what is plumbed now;
* reconciliation events are IGNORED while an operation is in flight (the observation may
  predate it).

With no operation in flight, a "not ours" state answers ``PLUMB_DONE`` or a reconciliation
finding with another (idempotent) ``UNPLUMB``: when in doubt, do not hold. A failed UNPLUMB is
retried by the next reconciliation (``FOUND_PLUMBED_UNEXPECTEDLY``), not in a tight loop.

Why lease expiry goes to RELEASING and not FENCED: FENCED is left only when quorum returns. An
expired lease with quorum intact (a lost renewal) is an involuntary release: unplumb now, then
report, so the coordinator may grant it again at once. Quorum loss is what fences.

Leases (:func:`lease_valid`, :func:`handover_wait`)
---------------------------------------------------
The holder measures its lease on its own monotonic clock from *before* it asked, so any delay in
the request or the grant only shortens the lease it believes in. Whoever hands the address on
(the coordinator granting it elsewhere, a new coordinator) waits out the longest lease that could
still be held: ``lease * (1 + max_drift_ppm / 1e6) + margin``, where ``max_drift_ppm`` bounds the
rate ratio of any two members' monotonic clocks: over any span, one advances at most
``1 + max_drift_ppm / 1e6`` times as much as another (Chubby; Raft thesis section 6.4). (Read as
"a clock runs slow by at most d", the exact wait would be ``lease / (1 - d)``; the difference,
``lease * d**2`` to first order, is far below any sensible margin.)
"""

from __future__ import annotations

import enum
import ipaddress
import math
from dataclasses import dataclass

__all__ = [
    "KINDS",
    "DEFAULT_MAX_DRIFT_PPM",
    "VipError",
    "VipSpec",
    "parse_vip_address",
    "vip_key",
    "vip_version",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "effective_capabilities",
    "missing_vip_capabilities",
    "vip_plumbing_refusal",
    "validate_vips",
    "subnet_address_problem",
    "interface_problem",
    "assign_vips",
    "State",
    "Event",
    "Action",
    "Outcome",
    "Step",
    "TRANSITIONS",
    "IGNORED",
    "INVALID",
    "step",
    "VipOwnerFSM",
    "lease_valid",
    "lease_remaining",
    "handover_wait",
]

KINDS = ("injection", "outbound")

# Quartz oscillators are specified around +-100 ppm; 500 ppm leaves room for a bad one and for
# NTP slewing (which changes CLOCK_MONOTONIC's rate by at most 500 ppm on Linux).
DEFAULT_MAX_DRIFT_PPM = 500.0

_IFNAMSIZ = 16  # Linux interface names are at most 15 bytes plus NUL


class VipError(ValueError):
    """A bad VIP specification or a bad argument to a VIP decision; the message is one line."""


# --------------------------------------------------------------------------- addresses


@dataclass(frozen=True)
class VipSpec:
    """One configured VIP.

    ``address`` is ``"a.b.c.d/prefix"`` or an IPv6 ``"address/prefix"``; ``kind`` is ``"injection"`` (listener) or ``"outbound"``
    (binding); ``preference`` names the node that should hold it when up; ``follow`` names another
    VIP (with or without prefix) that this one always moves with. Checked by :func:`validate_vips`.
    """

    address: str
    interface: str
    kind: str = "injection"
    preference: str | None = None
    follow: str | None = None

    @property
    def key(self) -> str:
        """The bare address that names this VIP (raises VipError when malformed)."""
        return vip_key(self.address)


def parse_vip_address(text: str, *, require_prefix: bool = True) -> tuple[str, int]:
    """Split ``"10.99.0.100/24"`` into ``("10.99.0.100", 24)``, ``"fd00::100/64"`` into
    ``("fd00::100", 64)``; the address comes back in canonical text.

    Without ``require_prefix`` a bare address is accepted and gets prefix 32 (IPv4) or 128
    (IPv6). Raises VipError with a one-line message on anything else, and on addresses that
    cannot be a VIP (:func:`_unusable`).
    """
    if not isinstance(text, str) or not text.strip():
        raise VipError(f"bad VIP address {text!r}: expected a.b.c.d/prefix or an IPv6 address/prefix")
    raw = text.strip()
    addr_part, sep, prefix_part = raw.partition("/")
    if not sep and require_prefix:
        example = "64" if ":" in addr_part else "24"
        raise VipError(f"bad VIP address {text!r}: a prefix is required (e.g. {raw}/{example})")
    if "%" in addr_part:
        raise VipError(f"bad VIP address {text!r}: a zone (%...) is not allowed; the interface says where")
    try:
        addr = ipaddress.ip_address(addr_part)
    except ValueError:
        raise VipError(f"bad VIP address {text!r}: not an IPv4 or IPv6 address") from None
    problem = _unusable(addr)
    if problem:
        raise VipError(f"bad VIP address {text!r}: {problem}")
    longest = addr.max_prefixlen
    if not sep:
        return str(addr), longest
    if not prefix_part.isdigit() or not 1 <= int(prefix_part) <= longest:
        raise VipError(f"bad VIP address {text!r}: prefix must be a number from 1 to {longest}")
    return str(addr), int(prefix_part)


def _unusable(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``addr`` cannot be a VIP (None when it can). Pure.

    IPv4 loopback stays allowed (dry-run clusters use 127.0.0.0/8 on ``lo``); IPv6 loopback
    cannot be announced on any link, and a link-local VIP would need a zone in every client.
    """
    if addr.is_multicast:
        return "a multicast address cannot be a VIP"
    if addr.is_unspecified:
        return "the unspecified address cannot be a VIP"
    if addr.version == 4:
        if addr == ipaddress.IPv4Address("255.255.255.255"):
            return "the limited broadcast address cannot be a VIP"
        return None
    if addr.is_loopback:
        return "the IPv6 loopback address cannot be a VIP"
    if addr.is_link_local:
        return "an IPv6 link-local address cannot be a VIP (clients would need a zone)"
    if addr.ipv4_mapped is not None:
        return f"an IPv4-mapped IPv6 address cannot be a VIP: use {addr.ipv4_mapped}"
    return None


def vip_key(text: str) -> str:
    """The canonical bare address naming a VIP; accepts ``"a.b.c.d"`` or ``"a.b.c.d/p"`` (or IPv6)."""
    return parse_vip_address(text, require_prefix=False)[0]


def vip_version(text: str) -> int:
    """4 or 6: the IP version of a VIP given with or without prefix (VipError when malformed)."""
    return ipaddress.ip_address(vip_key(text)).version


# --------------------------------------------------------------------------- privileges

CAP_NET_ADMIN = 12   # add and remove addresses
CAP_NET_RAW = 13     # AF_PACKET sockets: gratuitous ARP, neighbour advertisements, probes


def effective_capabilities(proc_status: str) -> int:
    """The effective capability mask from the text of ``/proc/<pid>/status`` (its ``CapEff:``
    line, hexadecimal). Pure; VipError when there is no such line or it is not hex."""
    for line in proc_status.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "CapEff":
            try:
                return int(value.strip(), 16)
            except ValueError:
                raise VipError(f"bad CapEff line in the process status: {line.strip()!r}") from None
    raise VipError("no CapEff line in the process status")


def missing_vip_capabilities(mask: int) -> list[str]:
    """The capabilities plumbing and announcing VIPs need that ``mask`` lacks, by name. Pure."""
    return [name for name, bit in (("CAP_NET_ADMIN", CAP_NET_ADMIN), ("CAP_NET_RAW", CAP_NET_RAW))
            if not mask >> bit & 1]


def vip_plumbing_refusal(dry_run: bool, cap_mask: int, cluster_file: str) -> str | None:
    """The one-line reason the vip service must not start, or None. Pure.

    Without the capabilities it could only pretend: say so and stop, unless the cluster file
    asks for exactly that (``vip_dry_run = true``).
    """
    if dry_run:
        return None
    missing = missing_vip_capabilities(cap_mask)
    if not missing:
        return None
    return (f"plumbing VIPs needs root or CAP_NET_ADMIN and CAP_NET_RAW (missing: {', '.join(missing)}); "
            f"set vip_dry_run = true in {cluster_file} to record VIPs without plumbing them")


def interface_problem(name: object) -> str | None:
    """Why ``name`` cannot be a Linux interface name (None when it can). Pure."""
    return _interface_error(name)


def _interface_error(name: object) -> str | None:
    if not isinstance(name, str) or not name:
        return "interface name is empty"
    if len(name.encode()) >= _IFNAMSIZ:
        return f"interface name {name!r} is longer than {_IFNAMSIZ - 1} bytes"
    if name in (".", "..") or any(c == "/" or c == ":" or c.isspace() for c in name):
        return f"interface name {name!r} contains a character Linux does not allow"
    return None


# --------------------------------------------------------------------------- validation


def subnet_address_problem(ip: str, prefix: int) -> str | None:
    """Why ``ip`` is its subnet's own address and no host's (None when it is a host's). Pure.

    IPv4: the network and broadcast address (prefix up to 30). IPv6: the subnet-router
    anycast address (host part all zeros, RFC 4291 section 2.6.1; prefix up to 126), which
    routers answer for.
    """
    addr = ipaddress.ip_address(ip)
    net = ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
    if addr.version == 4:
        if prefix <= 30 and addr == net.network_address:
            return f"is the network address of {net}"
        if prefix <= 30 and addr == net.broadcast_address:
            return f"is the broadcast address of {net}"
        return None
    if prefix <= 126 and addr == net.network_address:
        return f"is the subnet-router anycast address of {net}"
    return None


def validate_vips(vips: list[VipSpec], node_names: list[str]) -> list[str]:
    """Check a VIP configuration; return one-line error messages (empty when valid).

    Checks: address syntax and prefix (IPv4 prefix 1..32, IPv6 1..128; not its subnet's own
    address: :func:`subnet_address_problem`), duplicate addresses (by bare address, whatever the prefix), interface name,
    ``kind``, ``preference`` naming a configured node, ``follow`` naming a configured VIP (not
    itself), ``follow`` together with ``preference`` (the preference could never apply), and
    follow cycles. The order of the messages is deterministic.
    """
    errors: list[str] = []
    known_nodes = set(node_names)
    keys: dict[str, str] = {}  # bare address -> configured text of its first occurrence
    follow_of: dict[str, str] = {}  # follower key -> target key (only well-formed ones)

    for spec in vips:
        label = f"VIP {spec.address!r}"
        try:
            ip, prefix = parse_vip_address(spec.address)
        except VipError as exc:
            errors.append(str(exc))
            continue
        problem = subnet_address_problem(ip, prefix)
        if problem:
            errors.append(f"{label}: {problem}")
        if ip in keys:
            errors.append(f"{label}: duplicate address (also configured as {keys[ip]!r})")
        else:
            keys[ip] = spec.address
        problem = _interface_error(spec.interface)
        if problem:
            errors.append(f"{label}: {problem}")
        if spec.kind not in KINDS:
            errors.append(f"{label}: kind {spec.kind!r} is not one of {', '.join(KINDS)}")
        if spec.preference is not None and spec.preference not in known_nodes:
            errors.append(f"{label}: preference {spec.preference!r} is not a configured node")
        if spec.follow is not None:
            if spec.preference is not None:
                errors.append(f"{label}: has both follow and preference; a follower goes "
                              "wherever its target goes, so remove one")
            try:
                target = vip_key(spec.follow)
            except VipError as exc:
                errors.append(f"{label}: follow: {exc}")
                continue
            follow_of[ip] = target

    for follower, target in follow_of.items():
        if target == follower:
            errors.append(f"VIP {keys[follower]!r}: follows itself")
        elif target not in keys:
            errors.append(f"VIP {keys[follower]!r}: follows {target!r}, which is not a configured VIP")

    reported: set[str] = set()
    for start in follow_of:
        cycle = _find_cycle(start, follow_of)
        if cycle and len(cycle) > 1 and not reported.intersection(cycle):
            reported.update(cycle)
            errors.append("follow cycle: " + " -> ".join(cycle + [cycle[0]]))
    return errors


def _find_cycle(start: str, follow_of: dict[str, str]) -> list[str] | None:
    """The cycle reached from ``start`` along follow links, in order, or None."""
    path: list[str] = []
    seen: dict[str, int] = {}
    node: str | None = start
    while node is not None and node in follow_of:
        if node in seen:
            return path[seen[node]:]
        seen[node] = len(path)
        path.append(node)
        node = follow_of[node]
    return None


# --------------------------------------------------------------------------- assignment


def _leader_of(key: str, follow_of: dict[str, str], known: set[str]) -> str:
    """Resolve a follow chain to the VIP that actually decides where the group goes."""
    seen = [key]
    while key in follow_of:
        key = follow_of[key]
        if key not in known:
            raise VipError(f"VIP {seen[-1]!r} follows {key!r}, which is not a configured VIP")
        if key in seen:
            raise VipError("follow cycle: " + " -> ".join(seen[seen.index(key):] + [key]))
        seen.append(key)
    return key


def assign_vips(
    vips: list[VipSpec],
    candidates: list[str],
    loads: dict[str, float],
    drained: set[str],
    pinned: dict[str, str],
    current: dict[str, str],
    avoid: dict[str, set[str]] | None = None,
    ineligible: dict[str, set[str]] | None = None,
) -> dict[str, str | None]:
    """Choose an owner for every VIP; returns ``{bare address: node or None}``.

    ``candidates`` are the live nodes eligible to hold VIPs; a candidate that is in ``drained``
    is not eligible. ``loads`` is extra load per node (missing means 0). ``pinned`` holds manual
    moves (VIP -> node) and ``current`` the present owners; their keys may carry a prefix or not.

    Rule order for a VIP that does not follow another (first rule that applies wins):

    1. pinned: the node of a manual move, when it is eligible;
    2. preference: the preferred node, when it is eligible (so a VIP goes back when its
       preferred node returns: preference beats stability);
    3. stability: the current owner, when it is still eligible (no needless moves);
    4. load: the eligible node with the lowest load, where load = ``loads[node]`` + the number
       of VIPs assigned to it so far in this round; ties go to the first node in name order.

    ``avoid`` ({vip: nodes}, see :class:`HoldRecord`): nodes that could not keep that VIP
    lately (or, from :class:`node.health.HealthBook`, with no health result for it yet);
    rules 2-4 pass them over while another eligible node exists (a pin still wins).

    ``ineligible`` ({vip: nodes}, node/health.py: a health check guarding the VIP fails
    there): such a node is not eligible for that VIP under any rule, a pin included. Both
    ``avoid`` and ``ineligible`` apply to a VIP together with its followers, as one group: a
    group goes only to a node eligible for every VIP in it (and is passed over softly where
    any of them is avoided); with no such node the whole group has no owner.

    Rules 1-3 are applied to every VIP before rule 4 places the rest, in configured order, so the
    load counts every VIP placed by rules 1-3. A VIP placed on a node counts together with all
    its (transitive) followers. A follower goes wherever the VIP it follows (resolved along the
    chain) goes; its own pin is ignored (move the VIP it follows instead). With no eligible node
    every owner is None (per group: with none eligible for it). The result depends only on the arguments (not on the order of
    ``candidates`` or of set/dict iteration). Raises VipError for a malformed address, an unknown
    follow target or a follow cycle (:func:`validate_vips` reports these up front).
    """
    keys = [spec.key for spec in vips]
    known = set(keys)
    if len(known) != len(keys):
        raise VipError("duplicate VIP addresses: run validate_vips first")
    follow_of = {spec.key: vip_key(spec.follow) for spec in vips if spec.follow is not None}
    pinned_by_key = {vip_key(k): v for k, v in pinned.items()}
    current_by_key = {vip_key(k): v for k, v in current.items()}

    eligible = sorted(set(candidates) - set(drained))

    leader = {key: _leader_of(key, follow_of, known) for key in keys}
    group_size: dict[str, int] = {}
    for key in keys:
        group_size[leader[key]] = group_size.get(leader[key], 0) + 1

    load = {node: float(loads.get(node, 0.0)) for node in eligible}
    owner_of_leader: dict[str, str | None] = {}
    leaders = [spec for spec in vips if spec.key not in follow_of]

    # avoid and ineligible, per group (keyed by the group's leader): the union over its VIPs
    avoided: dict[str, set[str]] = {}
    for k, v in (avoid or {}).items():
        k = vip_key(k)
        if k in leader:
            avoided.setdefault(leader[k], set()).update(v)
    barred: dict[str, set[str]] = {}
    for k, v in (ineligible or {}).items():
        k = vip_key(k)
        if k in leader:
            barred.setdefault(leader[k], set()).update(v)
    # eligible nodes per group, in name order
    group_eligible = {spec.key: [n for n in eligible if n not in barred.get(spec.key, ())] for spec in leaders}
    for spec in leaders:  # rules 1-3
        key = spec.key
        pool = group_eligible[key]
        shunned = avoided.get(key, set()) if set(pool) - avoided.get(key, set()) else set()
        for rule, choice in enumerate((pinned_by_key.get(key), spec.preference, current_by_key.get(key))):
            if choice is not None and choice in pool and (rule == 0 or choice not in shunned):
                owner_of_leader[key] = choice
                load[choice] += group_size[key]
                break
    for spec in leaders:  # rule 4
        key = spec.key
        if key in owner_of_leader or not group_eligible[key]:
            continue
        # min() keeps the first of equal loads, and eligible is in name order
        pool = [n for n in group_eligible[key] if n not in avoided.get(key, set())] or group_eligible[key]
        choice = min(pool, key=lambda node: load[node])
        owner_of_leader[key] = choice
        load[choice] += group_size[key]

    return {key: owner_of_leader.get(leader[key]) for key in keys}


# --------------------------------------------------------------------------- owners that cannot hold


class HoldRecord:
    """How each VIP's assigned owner fares, as the coordinator sees it: pure (times passed in).

    A node can be alive in every view and still unable to keep a VIP: a slow or lossy link
    makes its promise round trips outlast the lease, so it lapses, asks again, lapses. The
    preference rule would keep the address on it, dark most of the time. This record turns
    that into a *penalty*: :func:`assign_vips` passes the node over for that VIP (``avoid``)
    while another eligible node exists, for ``penalty`` seconds, doubling (up to
    ``penalty_max``) when it happens again soon after.

    A *lapse*: the owner reported the VIP held and then not, while still assigned; or it has
    not held it for ``struggle_after`` since it was assigned (or since its last lapse). Never
    holding it in time is a penalty at once (the address is dark); losing it needs ``lapses``
    within ``window`` (one lapse is a blip, and holding again is quick). A change of owner
    starts afresh, so failovers and graceful moves count nothing.
    """

    def __init__(self, struggle_after: float, window: float, lapses: int, penalty: float, penalty_max: float):
        self.struggle_after, self.window, self.lapses_allowed = struggle_after, window, lapses
        self.penalty, self.penalty_max = penalty, penalty_max
        self.owner: dict[str, str | None] = {}
        self.since: dict[str, float] = {}                    # assigned, last held, or last lapse
        self.held: dict[str, bool] = {}
        self.lapses: dict[tuple[str, str], list[float]] = {}
        self.until: dict[tuple[str, str], float] = {}        # (vip, node) -> penalty ends
        self.length: dict[tuple[str, str], float] = {}       # (vip, node) -> last penalty's length

    def observe(self, vip: str, owner: str | None, held: bool | None, now: float) -> float | None:
        """One look at ``vip``: assigned to ``owner``, which holds it (``held``; None: no fresh
        report: nothing learnt, and the time until one comes does not count against the
        owner). Returns the penalty's length when one starts now, else None."""
        if owner != self.owner.get(vip):
            self.owner[vip], self.since[vip], self.held[vip] = owner, now, False
            return None
        if owner is None:
            return None
        if held is None:                  # no report: the time it takes does not count
            self.since[vip] = max(self.since[vip], now)
            return None
        if held:
            self.held[vip], self.since[vip] = True, now
            return None
        lost = self.held.get(vip, False)
        if not lost and now - self.since[vip] < self.struggle_after:
            return None
        self.held[vip], self.since[vip] = False, now
        key = (vip, owner)
        recent = [t for t in self.lapses.get(key, []) if now - t < self.window] + [now]
        if lost and len(recent) < self.lapses_allowed:
            self.lapses[key] = recent
            return None
        self.lapses.pop(key, None)
        last = self.length.get(key)
        recently = last is not None and now - self.until.get(key, -math.inf) < self.penalty_max
        length = min(self.penalty_max, 2 * last) if recently else self.penalty
        self.length[key], self.until[key] = length, now + length
        return length

    def penalties(self, now: float) -> dict[str, dict[str, float]]:
        """{vip: {node: seconds of its penalty left}} for the penalties running now."""
        out: dict[str, dict[str, float]] = {}
        for (vip, node), until in self.until.items():
            if until > now:
                out.setdefault(vip, {})[node] = until - now
        return out

    def avoid(self, now: float) -> dict[str, set[str]]:
        """{vip: nodes in a penalty for it now}: :func:`assign_vips`'s ``avoid``."""
        return {vip: set(nodes) for vip, nodes in self.penalties(now).items()}


# --------------------------------------------------------------------------- owner state machine


class State(enum.Enum):
    """States of one VIP on one node (see the module docstring)."""

    RELEASED = "released"
    ACQUIRING = "acquiring"
    OWNED = "owned"
    HANDING_OVER = "handing_over"
    RELEASING = "releasing"
    FENCED = "fenced"


class Event(enum.Enum):
    """Inputs to the owner state machine (see the module docstring)."""

    LEASE_GRANTED = "lease_granted"
    LEASE_RENEWED = "lease_renewed"
    LEASE_EXPIRED = "lease_expired"
    RELEASE_ORDERED = "release_ordered"
    REASSIGNED = "reassigned"
    PLUMB_DONE = "plumb_done"
    UNPLUMB_DONE = "unplumb_done"
    PLUMB_FAILED = "plumb_failed"
    UNPLUMB_FAILED = "unplumb_failed"
    QUORUM_LOST = "quorum_lost"
    QUORUM_REGAINED = "quorum_regained"
    FOUND_PLUMBED_UNEXPECTEDLY = "found_plumbed_unexpectedly"
    FOUND_MISSING = "found_missing"
    OTHER_OWNER_SEEN = "other_owner_seen"


class Action(enum.Enum):
    """What the caller must do, in order, after a transition."""

    PLUMB = "plumb"
    UNPLUMB = "unplumb"
    GARP_BURST = "garp_burst"
    SCHEDULE_GARP_REPEAT = "schedule_garp_repeat"
    CANCEL_GARP_REPEAT = "cancel_garp_repeat"
    REPORT_OWNED = "report_owned"
    REPORT_RELEASED = "report_released"
    ALARM_TWO_OWNERS = "alarm_two_owners"
    ALARM_PLUMB_FAILED = "alarm_plumb_failed"
    ALARM_UNPLUMB_FAILED = "alarm_unplumb_failed"


class Outcome(enum.Enum):
    """How an event was taken: applied (in TRANSITIONS), ignored, or invalid for the state."""

    APPLIED = "applied"
    IGNORED = "ignored"
    INVALID = "invalid"


S, E, A = State, Event, Action

TRANSITIONS: dict[tuple[State, Event], tuple[State, list[Action]]] = {
    # RELEASED: not ours, not plumbed
    (S.RELEASED, E.LEASE_GRANTED): (S.ACQUIRING, [A.PLUMB]),
    (S.RELEASED, E.RELEASE_ORDERED): (S.RELEASED, [A.REPORT_RELEASED]),  # idempotent ack
    (S.RELEASED, E.PLUMB_DONE): (S.RELEASING, [A.UNPLUMB]),  # plumbed without a lease: undo
    (S.RELEASED, E.QUORUM_LOST): (S.FENCED, []),
    (S.RELEASED, E.FOUND_PLUMBED_UNEXPECTEDLY): (S.RELEASING, [A.UNPLUMB]),
    # ACQUIRING: lease granted, PLUMB in flight
    (S.ACQUIRING, E.LEASE_RENEWED): (S.ACQUIRING, []),
    (S.ACQUIRING, E.LEASE_EXPIRED): (S.RELEASING, [A.UNPLUMB]),
    (S.ACQUIRING, E.RELEASE_ORDERED): (S.RELEASING, [A.UNPLUMB]),
    (S.ACQUIRING, E.REASSIGNED): (S.RELEASING, [A.UNPLUMB]),     # not serving yet: just give it up
    (S.ACQUIRING, E.PLUMB_DONE): (
        S.OWNED, [A.GARP_BURST, A.SCHEDULE_GARP_REPEAT, A.REPORT_OWNED]),
    # give the lease back (the coordinator decides elsewhere); UNPLUMB undoes any partial work
    (S.ACQUIRING, E.PLUMB_FAILED): (S.RELEASING, [A.ALARM_PLUMB_FAILED, A.UNPLUMB]),
    (S.ACQUIRING, E.QUORUM_LOST): (S.FENCED, [A.UNPLUMB]),
    (S.ACQUIRING, E.OTHER_OWNER_SEEN): (S.ACQUIRING, [A.ALARM_TWO_OWNERS]),
    # OWNED: plumbed, lease valid
    (S.OWNED, E.LEASE_GRANTED): (S.OWNED, []),  # a re-grant (e.g. new term) acts as a renewal
    (S.OWNED, E.LEASE_RENEWED): (S.OWNED, []),
    (S.OWNED, E.LEASE_EXPIRED): (S.RELEASING, [A.CANCEL_GARP_REPEAT, A.UNPLUMB]),
    (S.OWNED, E.RELEASE_ORDERED): (S.RELEASING, [A.CANCEL_GARP_REPEAT, A.UNPLUMB]),
    (S.OWNED, E.REASSIGNED): (S.HANDING_OVER, []),
    (S.OWNED, E.QUORUM_LOST): (S.FENCED, [A.CANCEL_GARP_REPEAT, A.UNPLUMB]),
    (S.OWNED, E.FOUND_MISSING): (S.ACQUIRING, [A.CANCEL_GARP_REPEAT, A.PLUMB]),
    # we hold a valid lease: alarm, and re-announce so clients come back to the rightful holder
    (S.OWNED, E.OTHER_OWNER_SEEN): (S.OWNED, [A.ALARM_TWO_OWNERS, A.GARP_BURST]),
    # HANDING_OVER: still plumbed and counted, not renewed; the successor's handover request
    # (RELEASE_ORDERED) or the lease's end (LEASE_EXPIRED) unplumbs
    (S.HANDING_OVER, E.RELEASE_ORDERED): (S.RELEASING, [A.CANCEL_GARP_REPEAT, A.UNPLUMB]),
    (S.HANDING_OVER, E.LEASE_EXPIRED): (S.RELEASING, [A.CANCEL_GARP_REPEAT, A.UNPLUMB]),
    (S.HANDING_OVER, E.QUORUM_LOST): (S.FENCED, [A.CANCEL_GARP_REPEAT, A.UNPLUMB]),
    # the assignment came back before the successor asked: renewing again (voters that
    # promised the successor refuse the renewal, so the lease rule still decides)
    (S.HANDING_OVER, E.LEASE_GRANTED): (S.OWNED, []),
    (S.HANDING_OVER, E.LEASE_RENEWED): (S.OWNED, []),
    # nobody may count the successor promises before our confirmation: a real alarm
    (S.HANDING_OVER, E.OTHER_OWNER_SEEN): (S.HANDING_OVER, [A.ALARM_TWO_OWNERS]),
    # gone from the interface while on our way out: nothing left to unplumb
    (S.HANDING_OVER, E.FOUND_MISSING): (S.RELEASED, [A.CANCEL_GARP_REPEAT, A.REPORT_RELEASED]),
    # RELEASING: UNPLUMB in flight (or failed, awaiting reconciliation)
    (S.RELEASING, E.UNPLUMB_DONE): (S.RELEASED, [A.REPORT_RELEASED]),
    (S.RELEASING, E.UNPLUMB_FAILED): (S.RELEASING, [A.ALARM_UNPLUMB_FAILED]),
    (S.RELEASING, E.FOUND_PLUMBED_UNEXPECTEDLY): (S.RELEASING, [A.UNPLUMB]),  # retry
    (S.RELEASING, E.FOUND_MISSING): (S.RELEASED, [A.REPORT_RELEASED]),  # gone after all
    (S.RELEASING, E.QUORUM_LOST): (S.FENCED, []),  # the UNPLUMB is already queued
    # FENCED: no quorum; hold nothing, take nothing
    (S.FENCED, E.PLUMB_DONE): (S.FENCED, [A.UNPLUMB]),  # a late plumb: take it off again
    (S.FENCED, E.UNPLUMB_DONE): (S.FENCED, []),
    (S.FENCED, E.UNPLUMB_FAILED): (S.FENCED, [A.ALARM_UNPLUMB_FAILED]),
    # unplumb once more (idempotent) so that the report follows every earlier UNPLUMB
    (S.FENCED, E.QUORUM_REGAINED): (S.RELEASING, [A.UNPLUMB]),
    (S.FENCED, E.FOUND_PLUMBED_UNEXPECTEDLY): (S.FENCED, [A.UNPLUMB]),
}

# Harmless events: duplicates, stale news, news that needs no action in this state.
IGNORED: frozenset[tuple[State, Event]] = frozenset({
    (S.RELEASED, E.LEASE_RENEWED),  # renewal of a lease we no longer hold
    (S.RELEASED, E.LEASE_EXPIRED),
    (S.RELEASED, E.UNPLUMB_DONE),  # an UNPLUMB of ours that was not needed
    (S.RELEASED, E.PLUMB_FAILED),  # a plumb we no longer wanted did not happen: fine
    (S.RELEASED, E.QUORUM_REGAINED),
    (S.RELEASED, E.FOUND_MISSING),  # not ours: missing is right
    (S.RELEASED, E.OTHER_OWNER_SEEN),  # someone else holds it: fine
    (S.RELEASED, E.REASSIGNED),
    (S.ACQUIRING, E.LEASE_GRANTED),  # duplicate
    (S.ACQUIRING, E.QUORUM_REGAINED),
    (S.ACQUIRING, E.FOUND_PLUMBED_UNEXPECTEDLY),  # the PLUMB in flight decides
    (S.ACQUIRING, E.FOUND_MISSING),
    (S.OWNED, E.PLUMB_DONE),  # duplicate
    (S.OWNED, E.QUORUM_REGAINED),
    (S.OWNED, E.FOUND_PLUMBED_UNEXPECTEDLY),  # ours, and plumbed: as it should be
    (S.HANDING_OVER, E.REASSIGNED),  # duplicate
    (S.HANDING_OVER, E.PLUMB_DONE),  # duplicate
    (S.HANDING_OVER, E.QUORUM_REGAINED),
    (S.HANDING_OVER, E.FOUND_PLUMBED_UNEXPECTEDLY),  # still ours until the handover
    (S.RELEASING, E.LEASE_GRANTED),  # finish releasing first; the coordinator re-grants
    (S.RELEASING, E.LEASE_RENEWED),
    (S.RELEASING, E.LEASE_EXPIRED),  # already unplumbing
    (S.RELEASING, E.RELEASE_ORDERED),  # duplicate
    (S.RELEASING, E.REASSIGNED),
    (S.RELEASING, E.QUORUM_REGAINED),
    (S.RELEASING, E.OTHER_OWNER_SEEN),  # the next owner: expected
    (S.FENCED, E.LEASE_GRANTED),  # never act on a grant without quorum
    (S.FENCED, E.LEASE_RENEWED),
    (S.FENCED, E.LEASE_EXPIRED),
    (S.FENCED, E.RELEASE_ORDERED),  # reported when quorum returns
    (S.FENCED, E.REASSIGNED),
    (S.FENCED, E.PLUMB_FAILED),
    (S.FENCED, E.QUORUM_LOST),
    (S.FENCED, E.FOUND_MISSING),  # not holding is right
    (S.FENCED, E.OTHER_OWNER_SEEN),
})

# Impossible when the caller keeps the contract (all are completions that do not match the last
# operation issued): counted, they point at a bug. For instance (OWNED, UNPLUMB_DONE): no
# UNPLUMB was issued since the PLUMB that made us owner; (RELEASING, PLUMB_DONE): every way into
# RELEASING issues an UNPLUMB, so the last completion there is an UNPLUMB's.
INVALID: frozenset[tuple[State, Event]] = frozenset(
    (state, event)
    for state in State
    for event in Event
    if (state, event) not in TRANSITIONS and (state, event) not in IGNORED
)

del S, E, A


@dataclass(frozen=True)
class Step:
    """The result of feeding one event: outcome, next state, actions to perform in order."""

    outcome: Outcome
    state: State
    actions: tuple[Action, ...]


def step(state: State, event: Event) -> Step:
    """Pure transition function over TRANSITIONS/IGNORED/INVALID; never raises for enum inputs."""
    if not isinstance(state, State) or not isinstance(event, Event):
        raise VipError(f"step() needs a State and an Event, got {state!r}, {event!r}")
    entry = TRANSITIONS.get((state, event))
    if entry is not None:
        return Step(Outcome.APPLIED, entry[0], tuple(entry[1]))
    outcome = Outcome.IGNORED if (state, event) in IGNORED else Outcome.INVALID
    return Step(outcome, state, ())


_COMPLETIONS = frozenset({Event.PLUMB_DONE, Event.UNPLUMB_DONE,
                          Event.PLUMB_FAILED, Event.UNPLUMB_FAILED})
_OBSERVATIONS = frozenset({Event.FOUND_PLUMBED_UNEXPECTEDLY, Event.FOUND_MISSING})
_IO_ACTIONS = frozenset({Action.PLUMB, Action.UNPLUMB})


class VipOwnerFSM:
    """Owner state machine of one VIP on one node: :func:`step` plus the I/O-in-flight rules.

    ``handle(event)`` returns the actions to perform, in order (a new list; empty when the event
    was ignored or invalid), and records ``last_outcome``. ``pending_io`` counts PLUMB/UNPLUMB
    actions not yet completed; ``invalid_events`` counts invalid events (see the module
    docstring for both rules and the caller's contract).
    """

    def __init__(self, vip: str = "", state: State = State.RELEASED) -> None:
        if not isinstance(state, State):
            raise VipError(f"VipOwnerFSM state must be a State, got {state!r}")
        self.vip = vip
        self.state = state
        self.pending_io = 0
        self.last_outcome: Outcome | None = None
        self.invalid_events = 0

    def handle(self, event: Event) -> list[Action]:
        """Feed one event; return the actions for the caller to perform, in order."""
        if not isinstance(event, Event):
            raise VipError(f"VipOwnerFSM.handle needs an Event, got {event!r}")
        if event in _COMPLETIONS and self.pending_io:
            self.pending_io -= 1
            if self.pending_io:  # superseded by a later operation
                self.last_outcome = Outcome.IGNORED
                return []
        elif event in _OBSERVATIONS and self.pending_io:
            self.last_outcome = Outcome.IGNORED
            return []
        result = step(self.state, event)
        self.last_outcome = result.outcome
        if result.outcome is Outcome.INVALID:
            self.invalid_events += 1
        self.state = result.state
        self.pending_io += sum(1 for action in result.actions if action in _IO_ACTIONS)
        return list(result.actions)

    @property
    def holds(self) -> bool:
        """True while this node claims the VIP (it may have it plumbed)."""
        return self.state in (State.ACQUIRING, State.OWNED, State.HANDING_OVER)

    def __repr__(self) -> str:
        return f"VipOwnerFSM({self.vip!r}, {self.state.name}, pending_io={self.pending_io})"


# --------------------------------------------------------------------------- leases


def _check_number(name: str, value: float, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise VipError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise VipError(f"{name} must be {'positive' if positive else 'non-negative'}, got {value!r}")
    return float(value)


def lease_remaining(granted_at_monotonic: float, duration: float, now_monotonic: float,
                    drift_ppm: float = 0.0) -> float:
    """Seconds of lease left (0.0 when expired), measured on the holder's monotonic clock.

    ``granted_at_monotonic`` must be the holder's clock reading from *before* it sent the request.
    ``drift_ppm`` optionally shortens the lease further on the holder's side; the default 0 is
    right when the handing-on side uses :func:`handover_wait` with the drift bound.
    """
    start = _check_number("granted_at_monotonic", granted_at_monotonic)
    length = _check_number("duration", duration)
    now = _check_number("now_monotonic", now_monotonic)
    drift = _check_number("drift_ppm", drift_ppm)
    if drift >= 1e6:
        raise VipError(f"drift_ppm must be below 1000000, got {drift_ppm!r}")
    if now < start:
        raise VipError(f"now_monotonic {now} is before granted_at_monotonic {start}: "
                       "both must come from the same monotonic clock")
    return max(0.0, start + length * (1.0 - drift / 1e6) - now)


def lease_valid(granted_at_monotonic: float, duration: float, now_monotonic: float,
                drift_ppm: float = 0.0) -> bool:
    """True while the holder may keep the address (see :func:`lease_remaining`)."""
    return lease_remaining(granted_at_monotonic, duration, now_monotonic, drift_ppm) > 0.0


def handover_wait(lease_duration: float, max_drift_ppm: float = DEFAULT_MAX_DRIFT_PPM,
                  margin: float = 0.0) -> float:
    """Seconds whoever hands an address on must wait after the last grant or renewal it sent.

    ``lease_duration * (1 + max_drift_ppm / 1e6) + margin``: the longest a holder could still
    believe its lease valid when our clock advances at most ``1 + max_drift_ppm / 1e6`` times as
    much as the holder's, plus a margin for the holder's scheduling delay in unplumbing.
    """
    length = _check_number("lease_duration", lease_duration)
    drift = _check_number("max_drift_ppm", max_drift_ppm)
    extra = _check_number("margin", margin)
    return length * (1.0 + drift / 1e6) + extra


# --------------------------------------------------------------------------- one node's promises


class LeaseBook:
    """The promises of one VIP as one node counts them: the node's rule of docs/ELECTION.md §3.

    Pure bookkeeping (every time is passed in, on the node's monotonic clock); services/vip.py
    does the asking, docs/model/election.pml checks the rule.

    * A granted *current* promise counts from ``t_req`` (the clock before asking) for ``lease``.
    * A granted *successor* promise ("after H") is only *pending*: it counts once H answered a
      handover request that was **sent after the promise was received** (:meth:`confirm` with the
      time the request was sent). A successor's renewal is pending again; the entry it renews
      keeps counting meanwhile. One confirmation never covers promises received after it was
      asked for (the bug of the wanting-epoch rule: ``-DEPOCH_CONFIRM`` in the model).
    * :meth:`fence` (we released, or confirmed a handover to someone else) forgets everything
      and voids replies to requests sent at or before that instant.
    """

    def __init__(self, quorum: int, lease: float, guard: float = 0.0):
        self.quorum = quorum
        self.lease = lease
        self.guard = guard
        #: voter -> (expiry, previous holder of a confirmed successor promise, else None)
        self.counted: dict[str, tuple[float, str | None]] = {}
        #: voter -> (expiry, previous holder, received at): successor promises awaiting confirmation
        self.pending: dict[str, tuple[float, str, float]] = {}
        self.fenced_at = -math.inf

    def take_reply(self, voter: str, t_req: float, granted: bool, after: str | None, now: float) -> str | None:
        """Record ``voter``'s answer to a request sent at ``t_req``, received at ``now``.

        Returns the previous holder to ask for a handover when the answer is a successor
        promise, else None. Replies to requests sent before the fence change nothing.
        """
        if t_req <= self.fenced_at:
            return None
        if not granted:
            self.counted.pop(voter, None)
            self.pending.pop(voter, None)
            return None
        expiry = t_req + self.lease
        if after is None:
            self.counted[voter] = (expiry, None)
            self.pending.pop(voter, None)
            return None
        self.pending[voter] = (expiry, after, now)
        return after

    def confirm(self, holder: str, asked_at: float) -> int:
        """``holder`` answered a handover request sent at ``asked_at``: it does not hold the VIP
        (and has fenced itself). Successor promises after ``holder`` received at or before
        ``asked_at`` count from now on; returns how many."""
        moved = 0
        for voter, (expiry, after, received) in list(self.pending.items()):
            if after == holder and received <= asked_at:
                self.counted[voter] = (expiry, after)
                del self.pending[voter]
                moved += 1
        return moved

    def awaiting(self, holder: str) -> bool:
        """Is some successor promise after ``holder`` waiting for its confirmation?"""
        return any(after == holder for _, after, _ in self.pending.values())

    def fence(self, now: float) -> None:
        """Forget every promise and void replies to requests sent at or before ``now``."""
        self.counted.clear()
        self.pending.clear()
        self.fenced_at = now

    def quorum_until(self) -> float:
        """Instant until which a majority of counted promises is valid, less the guard (0.0: none)."""
        expiries = sorted((e for e, _ in self.counted.values()), reverse=True)
        if len(expiries) < self.quorum:
            return 0.0
        return expiries[self.quorum - 1] - self.guard

    def confirmed_successor(self, now: float) -> bool:
        """Does an unexpired, confirmed successor promise count? Then the previous holder has
        unplumbed and fenced itself, and no ARP probe is needed before plumbing."""
        return any(after is not None and e > now for e, after in self.counted.values())
