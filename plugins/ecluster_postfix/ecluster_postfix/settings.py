"""The ``[services.postfix]`` table: its schema and the check of its values. Pure (no I/O).

::

    [services.postfix]
    domains = ["example.com"]      # accepted and delivered into Maildirs under <data_dir>/<mail>/
    relayhost = ""                 # e.g. "[10.99.0.2]:2525": other mail goes there (else: MX lookup)
    mynetworks = ["127.0.0.0/8"]   # clients that may relay (send to other domains)
    port = 25                      # on every injection VIP this node holds
    loopback = true                # also on 127.0.0.1:port (local submission, the health check)
    hostname = ""                  # myhostname (default <member>.<cluster>.invalid)
    message_size_limit = 10485760
    maildir_owner = "nobody"       # the user Postfix's virtual(8) delivers as
    mail = "mail"                  # <data_dir>/<mail>/<domain>/ are the Maildirs
    log = "mainlog"                # the journal log Postfix's log lines go to
    maillog_rotate_mb = 64         # the plug-in rotates Postfix's log file past this size
    postfix = "/usr/sbin/postfix"  # the postfix command (postconf beside it)
    nonlocal_bind = true           # set net.ipv4.ip_nonlocal_bind = 1 (see service.py: why)
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from ecluster.clusterfile import NAME_RE, ClusterFileError

CONFIG_SCHEMA: dict[str, tuple] = {
    "domains": (list, []),
    "relayhost": (str, ""),
    "mynetworks": (list, ["127.0.0.0/8"]),
    "port": (int, 25),
    "loopback": (bool, True),
    "hostname": (str, ""),
    "message_size_limit": (int, 10 << 20),
    "maildir_owner": (str, "nobody"),
    "mail": (str, "mail"),
    "log": (str, "mainlog"),
    "maillog_rotate_mb": ((int, float), 64),
    "postfix": (str, "/usr/sbin/postfix"),
    "nonlocal_bind": (bool, True),
}

_DOMAIN_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+$")
_HOSTNAME_RE = _DOMAIN_RE
# "[host]:port", "[host]", "host:port", "host": what Postfix's relayhost takes (no lists here)
_RELAYHOST_RE = re.compile(r"^(\[[A-Za-z0-9.:-]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?$")
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


class PostfixConfigError(ClusterFileError):
    """A ``[services.postfix]`` value that cannot be used; one line naming the key."""


@dataclass(frozen=True)
class Settings:
    """The checked ``[services.postfix]`` table."""

    domains: tuple[str, ...]
    relayhost: str
    mynetworks: tuple[str, ...]
    port: int
    loopback: bool
    hostname: str
    message_size_limit: int
    maildir_owner: str
    mail: str
    log: str
    maillog_rotate_bytes: int
    postfix: str
    nonlocal_bind: bool = True


def check_settings(table: dict[str, Any], *, member: str, cluster: str, journal_logs: list[str],
                   where: str = "services.postfix") -> Settings:
    """Check the values (types were checked by the cluster-file parser). Pure."""
    t = {k: table.get(k, default) for k, (_, default) in CONFIG_SCHEMA.items()}
    domains = []
    for d in t["domains"]:
        if not isinstance(d, str) or not _DOMAIN_RE.match(d.lower().rstrip(".")):
            raise PostfixConfigError(f"'{where}.domains' entries must be domain names, got {d!r:.60}")
        domains.append(d.lower().rstrip("."))
    if len(set(domains)) != len(domains):
        raise PostfixConfigError(f"'{where}.domains' lists a domain twice")
    relayhost = t["relayhost"].strip()
    if relayhost:
        m = _RELAYHOST_RE.match(relayhost)
        if not m or (m.group(2) and not 1 <= int(m.group(2)[1:]) <= 65535):
            raise PostfixConfigError(f"'{where}.relayhost' must look like [host]:port or host, got {relayhost!r:.60}")
    nets = []
    for n in t["mynetworks"]:
        try:
            if not isinstance(n, str):          # ip_network(10) would be 0.0.0.10/32
                raise TypeError(n)
            nets.append(str(ipaddress.ip_network(n, strict=False)))
        except (TypeError, ValueError):
            raise PostfixConfigError(f"'{where}.mynetworks' entries must be networks like 10.0.0.0/24, "
                                     f"got {n!r:.60}") from None
    if not 1 <= t["port"] <= 65535:
        raise PostfixConfigError(f"'{where}.port' {t['port']} out of range 1-65535")
    hostname = t["hostname"].lower().rstrip(".") or f"{member}.{cluster}.invalid".replace("_", "-")
    if not _HOSTNAME_RE.match(hostname):
        raise PostfixConfigError(f"'{where}.hostname' must be a fully qualified host name, got {hostname!r:.60}")
    if t["message_size_limit"] < 1024:
        raise PostfixConfigError(f"'{where}.message_size_limit' must be at least 1024 bytes")
    if not _USER_RE.match(t["maildir_owner"]):
        raise PostfixConfigError(f"'{where}.maildir_owner' must be a user name, got {t['maildir_owner']!r:.40}")
    mail = t["mail"]
    if not mail or "/" in mail or mail.startswith(".") or mail in ("postfix", "run", "log", "jlog", "conf"):
        raise PostfixConfigError(f"'{where}.mail' must be one directory name under the data directory "
                                 f"(not a name ecluster uses), got {mail!r:.40}")
    if not NAME_RE.match(t["log"]):
        raise PostfixConfigError(f"'{where}.log' must be a log name matching {NAME_RE.pattern}")
    if t["log"] not in journal_logs:
        raise PostfixConfigError(f"'{where}.log' is {t['log']!r}, which is not a journal log: add it to [jlog].logs")
    if not 1 <= t["maillog_rotate_mb"] <= 1 << 20:
        raise PostfixConfigError(f"'{where}.maillog_rotate_mb' must be between 1 and 1048576")
    if not t["postfix"].startswith("/"):
        raise PostfixConfigError(f"'{where}.postfix' must be an absolute path, got {t['postfix']!r:.60}")
    return Settings(tuple(domains), relayhost, tuple(nets), t["port"], t["loopback"], hostname,
                    t["message_size_limit"], t["maildir_owner"], mail, t["log"],
                    int(t["maillog_rotate_mb"] * 1024 * 1024), t["postfix"], t["nonlocal_bind"])
