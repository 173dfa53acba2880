"""Roles on every RPC, and a key bundle per host, over a real cluster on loopback.

One module-wide cluster (n1..n3, m1): every member runs with its own bundle (`ecluster keys
bundle`), so no host holds another's secret; the operator's CLI uses the admin bundle. The
tests check the contract table (code == this file == docs/SECURITY.md), walk it with each
identity against the running services, drive the CLI with a node's identity, and rotate the
keys of a cluster whose hosts hold separate bundles while calls keep flowing.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path

import pytest

from bus import keys as keymod
from bus import roles
from bus.broker import Broker
from bus.client import BusError, CallTimeout, RemoteError, SyncClient
from conftest import Procs, make_cluster_file, run_cli, short_dir, wait_until
from delegation_cluster import MiniCluster
from services.base import load_service, registry, rpc_rules

NODE_SERVICES = ["membership", "election", "control", "configsync", "jlog", "as_logger"]
MANAGER_SERVICES = ["membership", "election", "control", "configsync", "cidr_server"]
MEMBERS = ["n1", "n2", "n3", "m1"]
VIP = "10.99.0.100"
ROOT = Path(__file__).resolve().parent.parent

A, M, N, S = "admin", "manager", "node", "self"
ANY = {A, M, N, S}
OPER = {A, M, S}
ADM = {A, S}
LOC = {S}
MEM = {M, N, S}

#: The security contract: service -> method -> (roles allowed, own-argument, switch).
#: Changing who may call something means changing this table on purpose.
EXPECTED: dict[str, dict[str, tuple]] = {
    "bus": {"ping": (ANY,), "status": (ANY,), "reload_keys": (ADM,), "relink": (ADM,), "switch_keys": (ADM,),
            "stage_key": (ADM,), "put_public": (ADM,), "promote_key": (ADM,), "retire_key": (ADM,)},
    "as_logger": {"add": (ADM,), "add_batch": (LOC,), "status": (ANY,)},
    "cidr_server": {"query": (OPER,), "status": (ANY,)},
    "configsync": {"propose": ({M, S}, None, "nodes_may_commit"), "bootstrap_repo": ({M, S}, None, "nodes_may_commit"),
                   "outcome": (MEM,), "store": (MEM,), "position": (MEM,), "snapshot": (MEM,),
                   "bundle_since": (MEM,), "head": (ANY,), "commit": (ADM,), "revert": (ADM,),
                   "bootstrap": (ADM,), "pull": (ADM,), "status": (ANY,), "cluster_status": (ANY,),
                   "log": (ANY,), "diff": (ANY,), "show": (ANY,)},
    "console": {"status": (ANY,)},
    "control": {"status": (ANY,), "version": (ANY,), "commands": (ANY,), "run": (OPER,), "broadcast": (OPER,),
                "unicast": (OPER,)},
    "election": {"prevote": (LOC, "candidate"), "vote": (LOC, "candidate"), "promise": (LOC, "holder"),
                 "release": (LOC, "holder"), "move": (OPER,), "unpin": (OPER,), "drain": (OPER, "node"),
                 "undrain": (OPER, "node"), "status": (ANY,)},
    "health": {"status": (ANY,), "metrics": (ANY,)},
    "hooks": {"status": (ANY,), "metrics": (ANY,)},
    "jlog": {"write": (LOC,), "read": (OPER,), "checkpoint": (OPER,), "status": (ANY,), "inspect": (OPER,),
             "subscribers": (OPER,), "repair": (ADM,), "remove_subscriber": (ADM,)},
    "logagg": {"status": (ANY,)},
    "membership": {"view": (ANY,)},
    "metrics": {"status": (ANY,)},
    "vip": {"handover": (LOC, "to"), "status": (ANY,)},
    "postfix": {"status": (ANY,), "metrics": (ANY,)},
    "smtp": {"status": (ANY,), "metrics": (ANY,)},
}


def expected_rule(spec: tuple) -> roles.Rule:
    allow, own, switch = (*spec, None, None)[:3]
    return roles.Rule(frozenset(allow), own, switch)


def code_rules() -> dict[str, dict[str, roles.Rule | None]]:
    out = {name: {m: r for m, r in rpc_rules(load_service(name)).items() if m != "ping"} for name in registry()}
    out["bus"] = dict(Broker.RULES)
    return out


# -- the contract (pure) ------------------------------------------------------------------------

def test_every_method_of_every_service_declares_the_roles_of_the_contract():
    have = code_rules()
    missing = sorted(f"{s}.{m}" for s, ms in have.items() for m, r in ms.items() if r is None)
    assert not missing, f"methods without a role declaration: {missing}"
    for s in EXPECTED:
        assert s in have, f"no service {s}"
    for s, ms in have.items():
        assert set(ms) == set(EXPECTED.get(s, {})) - ({"ping"} if s != "bus" else set()), s
        for m, r in ms.items():
            assert r == expected_rule(EXPECTED[s][m]), f"{s}.{m}: code says {r.describe()}"
    # ping is everyone's on every service (the base class)
    assert all(rpc_rules(load_service(n))["ping"] == roles.ANYONE for n in registry())


def test_the_table_in_security_md_is_the_code():
    text = (ROOT / "docs" / "SECURITY.md").read_text()
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^\| `(\w+)\.(\w+)` \| (.+?) \|$", line)
        if m:
            rows[(m.group(1), m.group(2))] = m.group(3)
    want = {(s, meth): r.describe() for s, ms in code_rules().items() for meth, r in ms.items()}
    assert rows == want, "docs/SECURITY.md's roles table differs from the code (run tools/gen_roles_table.py)"


def test_principal_comes_from_the_stamps_never_the_body():
    mr = {"n1": "node", "n2": "node", "m1": "manager"}
    assert roles.principal_of("n2", "svc:vip", "n1", mr) == roles.Principal("n2", "node")
    assert roles.principal_of("n1", "svc:vip", "n1", mr) == roles.Principal("n1", "node", local=True)
    assert roles.principal_of("n1", roles.external_client_id("ab01", "admin"), "n1", mr).role == "admin"
    assert roles.principal_of("n1", roles.external_client_id("ab01", "ops.alice"), "n1", mr).name == "ops.alice"
    # a member's key used by a client is that member, wherever it calls
    assert roles.principal_of("n1", roles.external_client_id("ab01", "n2"), "n1", mr) == roles.Principal("n2", "node")
    assert roles.principal_of("n1", roles.external_client_id("ab01", "m1"), "n1", mr).role == "manager"
    # a member's own key over tcp (a copied bundle) is that node, never "self" on its own broker
    assert roles.principal_of("n1", roles.external_client_id("ab01", "n1"), "n1", mr) == roles.Principal("n1", "node")
    assert roles.principal_of("n1", roles.external_client_id("ab01", ""), "n1", mr).role is None
    # a forwarded call is the forwarder's, even if its client id looks external
    assert roles.principal_of("n2", roles.external_client_id("ab01", "admin"), "n1", mr) == roles.Principal("n2", "node")
    assert roles.external_routing_hex(roles.external_client_id("ab01", "a.b")) == "ab01"


def test_permits_own_and_switch():
    node2 = roles.Principal("n2", "node")
    drain = roles.rule(A, M, S, own="node")
    assert roles.permits(drain, node2, {"node": "n2"})
    assert not roles.permits(drain, node2, {"node": "n1"})
    assert not roles.permits(drain, node2, {})
    assert roles.permits(drain, roles.Principal("ops", "admin"), {})
    propose = roles.rule(M, S, switch="nodes_may_commit")
    assert not roles.permits(propose, node2, {}, {"nodes_may_commit": False})
    assert roles.permits(propose, node2, {}, {"nodes_may_commit": True})
    assert not roles.permits(propose, roles.Principal("ops", "admin"), {}, {"nodes_may_commit": True})
    assert not roles.permits(roles.ANYONE, roles.Principal("?", None), {})
    assert roles.permits(roles.LOCAL_ONLY, roles.Principal("n1", "node", local=True), {})
    assert not roles.permits(roles.LOCAL_ONLY, node2, {})


# -- the cluster ------------------------------------------------------------------------------

class Site:
    def __init__(self, base: Path):
        self.base = base
        self.root = short_dir("ecro")
        extra = f'[[vip]]\naddress = "{VIP}/24"\ninterface = "lo"\n'
        self.cluster = make_cluster_file(base, n_nodes=3, n_managers=1, extra=extra, data_root=self.root,
                                         nodes_may_commit=False)
        self.cfg = str(self.cluster.path)
        self.master = self.cluster.keys_dir          # `keys init` output: the operator's safe
        self.bundles = base / "bundles"
        self.procs = Procs(base / "logs")
        self.mc = MiniCluster(self.cluster, self.procs)

    def bundle(self, name: str) -> Path:
        return self.bundles / name

    def env(self, identity: str = "admin") -> dict:
        keys = self.bundle("admin" if identity == "admin" else identity)
        return {"ECLUSTER_KEYS": str(keys), "ECLUSTER_IDENTITY": identity}

    def cli(self, *args, identity: str = "admin", timeout: float = 40.0):
        return run_cli([*args], timeout=timeout, env=self.env(identity))

    def client(self, member: str, identity: str) -> SyncClient:
        """A tcp client of ``member`` acting as ``identity`` with that identity's bundle."""
        import dataclasses
        c = dataclasses.replace(self.cluster, keys_dir=self.bundle(identity))
        return SyncClient(c, remote=member, key=identity)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    s = Site(tmp_path_factory.mktemp("roles"))
    try:
        for name in MEMBERS:
            r = run_cli(["keys", "bundle", "-c", s.cfg, "--member", name, "--out", s.bundle(name)])
            assert r.returncode == 0, r.stderr
        r = run_cli(["keys", "bundle", "-c", s.cfg, "--admin", "--out", s.bundle("admin")])
        assert r.returncode == 0, r.stderr
        shutil.rmtree(s.master)           # from here on, no directory holds every secret
        for name in MEMBERS:
            s.mc.start(name, MANAGER_SERVICES if name.startswith("m") else NODE_SERVICES, keys=s.bundle(name))
        with s.client("n1", "admin") as c:
            for m in MEMBERS:
                wait_until(lambda: c.call(m, "control", "version", timeout=0.5), 30, what=f"control on {m}")
            wait_until(lambda: c.call("n1", "election", "status", timeout=0.5).get("leader"), 30,
                       what="a coordinator")
        r = s.cli("config", "bootstrap", "-c", s.cfg, "--member", "m1")      # the manager commits
        assert r.returncode == 0, r.stderr
        yield s
    finally:
        s.procs.stop_all()
        shutil.rmtree(s.root, ignore_errors=True)


def test_each_host_holds_only_its_own_secret_and_the_cluster_works(site):
    for name in [*MEMBERS, "admin"]:
        d = site.bundle(name)
        assert keymod.secrets_in(d) == [name]
        assert set(keymod.public_keys(d).values()) == {*MEMBERS, "admin"}
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        assert stat.S_IMODE((d / f"{name}.key_secret").stat().st_mode) == 0o600
    with site.client("m1", "admin") as c:
        view = c.call("m1", "membership", "view", timeout=2.0)
        assert {m for m, v in view["members"].items() if v["state"] == "alive"} == set(MEMBERS)
        rev = c.call("m1", "configsync", "status", timeout=2.0)["committed"]
        wait_until(lambda: all(c.call(m, "configsync", "status", timeout=2.0)["rev"] == rev for m in MEMBERS), 20,
                   what="the bootstrap applied on every member")


SAFE_WITHOUT_ARGS = {"ping", "status", "view", "version", "commands", "head", "cluster_status", "log", "diff",
                     "show", "subscribers", "reload_keys"}


def required_args(service: str, method: str) -> bool:
    if service == "bus":
        return method in ("relink", "put_public", "promote_key", "retire_key")
    import inspect
    fn = getattr(load_service(service), f"rpc_{method}")
    return any(p.default is p.empty and p.name not in ("self", "caller")
               for p in inspect.signature(fn).parameters.values())


def test_walk_the_roles_table_with_each_identity(site):
    """Each identity calls every method of the services running on n1 (and m1's cidr_server):
    what the contract forbids answers ``forbidden`` and did nothing; what it allows is not
    refused (called only where that is harmless: without its required arguments, or read-only)."""
    targets = [("n1", s) for s in ["bus", *NODE_SERVICES]] + [("m1", "cidr_server")]
    identities = {"admin": roles.Principal("admin", "admin"), "m1": roles.Principal("m1", "manager"),
                  "n2": roles.Principal("n2", "node")}
    checked = refused = 0
    for ident, who in [*identities.items(), ("self", None)]:
        for member, service in targets:
            client = SyncClient(site.cluster, via=member) if ident == "self" else site.client(member, ident)
            with client as c:
                for method, spec in EXPECTED[service].items():
                    # the member itself (self) is in every rule; own arguments are not given
                    allowed = True if who is None else who.role in spec[0]
                    if not allowed:
                        with pytest.raises(RemoteError) as e:
                            c.call(member, service, method, timeout=3.0)
                        assert e.value.code == "forbidden", (ident, service, method, e.value)
                        assert e.value.message.startswith(f"{ident} ("), e.value.message
                        refused += 1
                    elif required_args(service, method) or method in SAFE_WITHOUT_ARGS:
                        try:
                            c.call(member, service, method, timeout=3.0)
                        except RemoteError as e:
                            assert e.code != "forbidden", (ident, service, method, e)
                    checked += 1
    assert refused > 40 and checked > 150
    # every refusal was counted where it happened
    with site.client("n1", "admin") as c:
        assert c.call("n1", "bus", "status", timeout=2.0)["counters"]["forbidden"] > 0
        assert c.call("n1", "jlog", "ping", timeout=2.0)["forbidden"] > 0
        assert c.call("n1", "election", "ping", timeout=2.0)["forbidden_by_method"].get("move", 0) >= 1


def test_a_node_key_cannot_act_for_the_operator(site):
    def refused(r, what: str) -> None:
        assert r.returncode == 1, (what, r.stdout, r.stderr)
        line = r.stderr.strip()
        assert "\n" not in line and "Traceback" not in r.stderr, (what, r.stderr)
        assert "may not" in line, (what, line)

    as_n2 = {"identity": "n2"}
    refused(site.cli("broadcast", "version", "-c", site.cfg, **as_n2), "broadcast")
    refused(site.cli("unicast", "n1", "version", "-c", site.cfg, **as_n2), "unicast")
    refused(site.cli("vip", "move", VIP, "n1", "-c", site.cfg, **as_n2), "vip move")
    refused(site.cli("node", "drain", "n1", "-c", site.cfg, **as_n2), "drain another node")
    refused(site.cli("keys", "rotate", "-c", site.cfg, **as_n2), "keys rotate")
    conf = site.cluster.member("n2").data_dir / "conf" / "global" / "roles-test.txt"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text("edited on n2\n")
    try:
        r = site.cli("config", "commit", "-c", site.cfg, "--member", "n2", "-m", "from a node", "--add-all", **as_n2)
        refused(r, "config commit from a node")
        # n2's key over tcp is the node n2, refused by the role check (a commit made on n2
        # itself, over its ipc socket, is refused by the nodes_may_commit switch instead)
        assert "n2 (node) may not call configsync.commit" in r.stderr
    finally:
        conf.unlink()
    # the refusals are logged with the caller's name where they happened
    m1_log = site.procs.log(site.mc.members["m1"][1])
    assert re.search(r"forbidden: n2 \(node\) may not call control\.broadcast", m1_log), m1_log[-2000:]
    # what a node may do for itself, it may: drain itself, then undrain
    r = site.cli("node", "drain", "n2", "-c", site.cfg, **as_n2)
    assert r.returncode == 0 and "n2" in r.stdout, r.stderr
    r = site.cli("node", "undrain", "n2", "-c", site.cfg, **as_n2)
    assert r.returncode == 0, r.stderr
    # and the operator may do what the node was refused
    r = site.cli("broadcast", "version", "-c", site.cfg)
    assert r.returncode == 0, r.stderr


def test_keys_rotate_with_a_bundle_per_host_keeps_calls_flowing(site, tmp_path):
    from test_security import CallPoller
    before = {n: keymod.public_of(site.bundle("admin"), n) for n in [*MEMBERS, "admin"]}
    old_secret = tmp_path / "old-admin.key_secret"
    shutil.copy(site.bundle("admin") / "admin.key_secret", old_secret)
    poller = CallPoller(site.cluster)
    poller.start()
    try:
        wait_until(lambda: poller.ok >= 6, timeout=10, what="calls flow before the rotation")
        r = site.cli("keys", "rotate", "-c", site.cfg, timeout=90)
        assert r.returncode == 0, r.stderr
        at_end = poller.ok
        wait_until(lambda: poller.ok >= at_end + 6, timeout=10, what="calls flow after the rotation")
    finally:
        poller.stop.set()
        poller.join(5)
    assert not poller.failures, poller.failures[:5]
    after = {n: keymod.public_of(site.bundle("admin"), n) for n in [*MEMBERS, "admin"]}
    assert all(after[n] != before[n] for n in after), "every key changed"
    for name in [*MEMBERS, "admin"]:
        d = site.bundle(name)
        assert keymod.secrets_in(d) == [name], "still only its own secret"
        assert keymod.load(d, name).public == after[name], "the secret here is the new one"
        assert {n: keymod.public_of(d, n) for n in after} == after, f"{name}'s bundle knows every new key"
        assert not [p.name for p in d.iterdir() if ".next." in p.name or ".old." in p.name], "no rotation leftovers"
    with site.client("n1", "admin") as c:                  # the new admin key works ...
        assert c.call("n3", "control", "version", timeout=3.0)
    import dataclasses
    old_admin = tmp_path / "old-admin"          # today's public keys, yesterday's admin secret
    shutil.copytree(site.bundle("admin"), old_admin)
    shutil.copy(old_secret, old_admin / "admin.key_secret")
    old = dataclasses.replace(site.cluster, keys_dir=old_admin)
    with SyncClient(old, remote="n1") as c:                # ... the old one is refused
        with pytest.raises((CallTimeout, BusError)):
            c.call("n1", "bus", "ping", timeout=1.5)


def test_refusals_are_a_metrics_family():
    from services.metrics import check_family, forbidden_family, render
    f = check_family(forbidden_family({"control": {"forbidden": 3}, "jlog": None,
                                       "bus": {"counters": {"forbidden": 2}}, "vip": {"forbidden": True}}))
    text = render([f])
    assert 'ecluster_rpc_forbidden_total{service="control"} 3' in text
    assert 'ecluster_rpc_forbidden_total{service="bus"} 2' in text
    assert "jlog" not in text and "vip" not in text
