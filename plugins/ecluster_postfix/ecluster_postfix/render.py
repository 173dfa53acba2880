"""What the plug-in writes for Postfix: main.cf, master.cf and the virtual mailbox map, from
the settings, the VIPs this node holds and the operator's main.cf fragments. Pure (no I/O).

Who owns which parameter: :data:`MANAGED` are written here from ``[services.postfix]`` and
the VIPs, and a fragment may not set them (it would undo what makes the instance follow the
cluster); every other main.cf parameter is the operator's, through fragments in the
replicated configuration (``postfix/main.cf.d/*.cf``), appended after the managed block.

Listening: one ``smtpd`` service per held injection VIP (``ADDRESS:port``) in master.cf,
plus ``127.0.0.1:port`` when ``loopback``. master.cf changes take effect on ``postfix
reload``, which keeps the listening sockets of services that did not change and lets
running sessions finish: a move never drops a connection on an address this node keeps.

Sending: one ``smtp`` transport per held outbound VIP, bound to it (``smtp_bind_address``);
``default_transport`` and ``relay_transport`` pick among them (``randmap`` when several). A
node that holds none of the configured outbound VIPs defers outbound mail (``retry``) until
it holds one; a cluster without outbound VIPs sends from the host's own addresses.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ecluster_postfix.settings import Settings

#: parameters the plug-in sets and a fragment may not
MANAGED = frozenset({
    "compatibility_level", "config_directory", "queue_directory", "data_directory", "meta_directory",
    "command_directory", "daemon_directory", "shlib_directory", "sample_directory", "html_directory",
    "manpage_directory", "readme_directory", "mail_owner", "setgid_group", "maillog_file",
    "maillog_file_prefixes", "maillog_file_compressor", "maillog_file_rotate_suffix",
    "inet_interfaces", "inet_protocols", "myhostname", "mydestination", "mynetworks",
    "mynetworks_style", "relayhost", "default_transport", "relay_transport",
    "sender_dependent_default_transport_maps", "local_transport", "smtp_bind_address",
    "smtp_bind_address6", "virtual_mailbox_domains", "virtual_mailbox_base", "virtual_mailbox_maps",
    "virtual_uid_maps", "virtual_gid_maps", "virtual_minimum_uid", "alias_maps", "alias_database",
    "multi_instance_enable", "multi_instance_directories", "multi_instance_name",
    "multi_instance_group", "message_size_limit", "import_environment", "syslog_name",
    "master_service_disable", "postlog_service_name",
})

_NAME_RE = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass(frozen=True)
class Paths:
    """Where one node's Postfix instance lives (all under its data directory)."""

    root: Path                  # <data_dir>/postfix

    @property
    def etc(self) -> Path:      # config_directory: main.cf, master.cf, vmailbox
        return self.root / "etc"

    @property
    def queue(self) -> Path:
        return self.root / "queue"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def maillog(self) -> Path:
        return self.log_dir / "maillog"


@dataclass(frozen=True)
class Parameter:
    """One ``name = value`` of a fragment, with where it was written."""

    file: str
    line: int
    name: str
    value: str


class FragmentError(ValueError):
    """A fragment line that is not main.cf syntax, or sets a managed parameter."""

    def __init__(self, file: str, line: int, reason: str):
        super().__init__(f"{file}:{line}: {reason}")
        self.file, self.line, self.reason = file, line, reason


def parse_fragment(file: str, text: str) -> list[Parameter]:
    """main.cf syntax: ``name = value``; a line starting with whitespace continues the one
    before; blank lines and lines whose first non-blank character is ``#`` are ignored.
    Raises FragmentError (first problem) naming the file and line. Pure."""
    out: list[Parameter] = []
    cur: list | None = None            # [line, name, value parts]
    for i, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if "\0" in raw:
            raise FragmentError(file, i, "NUL character")
        if raw[0] in " \t":
            if cur is None:
                raise FragmentError(file, i, "continuation line without a parameter before it")
            cur[2].append(stripped)
            continue
        if cur is not None:
            out.append(Parameter(file, cur[0], cur[1], " ".join(cur[2])))
        name, eq, value = raw.partition("=")
        name = name.rstrip()   # a line starting with other whitespace (U+00A0...) is a bad name
        if not eq:
            raise FragmentError(file, i, f"not 'name = value': {stripped[:60]!r}")
        if not _NAME_RE.match(name):
            raise FragmentError(file, i, f"bad parameter name {name[:60]!r}")
        if name in MANAGED:
            raise FragmentError(file, i, f"parameter {name} is set by ecluster ([services.postfix] and the VIPs), "
                                         "not by a fragment")
        cur = [i, name, [value.strip()] if value.strip() else []]
    if cur is not None:
        out.append(Parameter(file, cur[0], cur[1], " ".join(cur[2])))
    return out


def transport_name(address: str) -> str:
    """The master.cf service that sends from ``address``. Pure."""
    return "ecl_out_" + re.sub(r"[^0-9A-Za-z]", "_", address)


def main_cf(s: Settings, paths: Paths, *, uid: int, gid: int, held_outbound: tuple[str, ...],
            outbound_configured: bool, fragments: list[Parameter], postfix_bin: str | None = None) -> str:
    """The whole main.cf. Pure."""
    command_dir = str(Path(postfix_bin or s.postfix).parent)
    if held_outbound:
        names = [transport_name(a) for a in held_outbound]
        default = names[0]
        spread = f"randmap:{{{', '.join(names)}}}" if len(names) > 1 else ""
    elif outbound_configured:
        default, spread = "retry:4.4.0 no outbound VIP held by this node", ""
    else:
        default, spread = "smtp", ""
    domains = ", ".join(s.domains)
    lines = [
        "# Written by ecluster-postfix: do not edit (the next change overwrites it).",
        "# Your settings go into postfix/main.cf.d/*.cf of the replicated configuration (eccfg).",
        "compatibility_level = 3.6",
        f"config_directory = {paths.etc}",
        f"queue_directory = {paths.queue}",
        f"data_directory = {paths.data}",
        "meta_directory = /etc/postfix",
        f"command_directory = {command_dir}",
        "daemon_directory = /usr/lib/postfix/sbin",
        "shlib_directory = /usr/lib/postfix",
        "mail_owner = postfix",
        "setgid_group = postdrop",
        f"maillog_file = {paths.maillog}",
        f"maillog_file_prefixes = {paths.log_dir}",
        # the plug-in reads a rotated file to its end, then removes it: never compress it away
        "maillog_file_compressor = true",
        "maillog_file_rotate_suffix = %Y%m%d-%H%M%S",
        # addresses come from master.cf (one smtpd per held VIP); nothing binds the wildcard
        "inet_interfaces = all",
        "inet_protocols = ipv4",
        f"myhostname = {s.hostname}",
        "mydestination =",
        f"mynetworks = {', '.join(s.mynetworks)}",
        f"relayhost = {s.relayhost}",
        f"default_transport = {default}",
        f"relay_transport = {default}",
        f"sender_dependent_default_transport_maps = {spread}",
        "local_transport = error:5.1.1 no local delivery on this node",
        f"virtual_mailbox_domains = {domains}",
        f"virtual_mailbox_base = {paths.root.parent / s.mail}",
        f"virtual_mailbox_maps = texthash:{paths.etc / 'vmailbox'}",
        f"virtual_uid_maps = static:{uid}",
        f"virtual_gid_maps = static:{gid}",
        "virtual_minimum_uid = 1",
        "alias_maps =",
        "alias_database =",
        f"message_size_limit = {s.message_size_limit}",
        "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination",
        "",
    ]
    if fragments:
        lines.append("# -- from the replicated configuration --")
        for p in fragments:
            lines.append(f"# {p.file}:{p.line}")
            lines.append(f"{p.name} = {p.value}")
        lines.append("")
    return "\n".join(lines)


# internal services: name, type, private, unpriv, chroot, wakeup, maxproc, command
_INTERNAL = [
    ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
    ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
    ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
    ("tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr"),
    ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
    ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
    ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
    ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
    ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
    ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
    ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
    ("error", "unix", "-", "-", "n", "-", "-", "error"),
    ("retry", "unix", "-", "-", "n", "-", "-", "error"),
    ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
    ("virtual", "unix", "-", "n", "n", "-", "-", "virtual"),
    ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
    ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
    ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
]


def listen_addresses(s: Settings, held_injection: tuple[str, ...]) -> list[str]:
    """``ADDRESS:port`` of every smtpd listener, in a stable order. Pure."""
    out = [f"{a}:{s.port}" for a in sorted(held_injection)]
    if s.loopback:
        out.insert(0, f"127.0.0.1:{s.port}")
    return out


def master_cf(s: Settings, *, held_injection: tuple[str, ...], held_outbound: tuple[str, ...]) -> str:
    """The whole master.cf. Pure."""
    rows = ["# Written by ecluster-postfix: do not edit.",
            "# service type private unpriv chroot wakeup maxproc command"]
    for endpoint in listen_addresses(s, held_injection):
        rows.append(f"{endpoint} inet n - n - - smtpd")
    for row in _INTERNAL:
        rows.append(" ".join(row))
    for a in sorted(held_outbound):
        rows.append(f"{transport_name(a)} unix - - n - - smtp")
        rows.append(f"  -o smtp_bind_address={a}")
        rows.append(f"  -o syslog_name=postfix/out-{a}")
    return "\n".join(rows) + "\n"


def vmailbox(s: Settings) -> str:
    """The virtual mailbox map: every address of an accepted domain goes to that domain's
    Maildir (the trailing slash makes virtual(8) deliver Maildir-style). Pure."""
    return "".join(f"@{d} {d}/\n" for d in s.domains)
