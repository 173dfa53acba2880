"""The cluster file: the documented shape parses; every mistake is one line naming file and key."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import ecluster.clusterfile as cf
from conftest import run_cli
from ecluster.clusterfile import ClusterFileError, load_cluster, parse_cluster
from ecluster.timing import PRESETS

P = Path("/etc/ecluster/cluster.toml")

DOCUMENTED = re.search(r"Shape .*?::\n\n(.*?)\n\nRelative", cf.__doc__, re.S).group(1)

MINIMAL = """
[cluster]
name = "c"
[nodes.n1]
address = "127.0.0.1"
data_dir = "d1"
"""


def parse(text: str):
    return parse_cluster(text, P)


def error(text: str) -> str:
    with pytest.raises(ClusterFileError) as err:
        parse(text)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{P}: "), msg
    return msg


def test_documented_shape_parses():
    text = "\n".join(line[4:] for line in DOCUMENTED.splitlines())
    # the example's VIP follows 10.99.0.101, which the example does not list: add it
    text += '\n[[vip]]\naddress = "10.99.0.101/24"\ninterface = "eth0"\nkind = "outbound"\n'
    c = parse(text)
    assert c.name == "lab" and c.keys_dir == P.parent / "keys" and c.timing.name == "lan"
    n1 = c.member("n1")
    assert (n1.role, n1.address, n1.bus_port, n1.pub_port, n1.metrics_port) == ("node", "10.99.0.11", 7400, 7401, 7402)
    assert n1.bus_endpoint == "tcp://10.99.0.11:7400"
    m1 = c.member("m1")
    assert (m1.role, m1.console_address, m1.console_port) == ("manager", "127.0.0.1", 7480)
    assert c.voters == ["m1", "n1"] and c.quorum == 2
    vip, other = c.vips
    assert (vip.ip, vip.preference, vip.kind, vip.follow) == ("10.99.0.100", "n1", "injection", "10.99.0.101")
    assert (other.ip, other.kind, other.follow) == ("10.99.0.101", "outbound", None)
    assert c.section("jlog")["policy"] == "block"


def test_defaults_and_relative_paths():
    c = parse(MINIMAL)
    m = c.member("n1")
    assert m.data_dir == P.parent / "d1"
    assert m.ipc_router == f"ipc://{P.parent / 'd1' / 'run' / 'bus.ipc'}"
    assert c.managers == {} and c.vips == [] and not c.vip_dry_run


def test_unknown_top_level_key():
    msg = error("bogus = 1\n" + MINIMAL)
    assert msg.endswith("unknown key 'bogus'")


@pytest.mark.parametrize("extra, key", [
    ('[nodes.n1.deeper]\nx = 1\n', "'nodes.n1.deeper'"),
    ('[nodes.n2]\naddress = "127.0.0.2"\ndata_dir = "d2"\ncolour = "red"\n', "'nodes.n2.colour'"),
    ('[as_logger]\nlog_intervall = 5\n', "'as_logger.log_intervall'"),
    ('[services.nosuchplugin]\nx = 1\n', "'services.nosuchplugin'"),
])
def test_unknown_keys_are_named(extra, key):
    msg = error(MINIMAL + extra)
    assert "unknown key" in msg and key in msg


def test_unknown_cluster_key():
    msg = error(MINIMAL.replace('name = "c"', 'name = "c"\nflavour = 2'))
    assert "unknown key 'cluster.flavour'" in msg


@pytest.mark.parametrize("change, words", [
    (('data_dir = "d1"', 'data_dir = "d1"\nbus_port = "7400"'), ["nodes.n1.bus_port", "must be int", "got str"]),
    (('data_dir = "d1"', 'data_dir = "d1"\nbus_port = true'), ["nodes.n1.bus_port", "boolean"]),
    (('data_dir = "d1"', 'data_dir = "d1"\npub_port = 70000'), ["nodes.n1.pub_port", "out of range"]),
    (('address = "127.0.0.1"', 'address = 12'), ["nodes.n1.address", "must be str"]),
    (('address = "127.0.0.1"', 'address = "localhost"'), ["not an IP address"]),
    (('name = "c"', 'name = "c"\nvip_dry_run = "yes"'), ["cluster.vip_dry_run", "must be bool"]),
])
def test_wrong_types(change, words):
    msg = error(MINIMAL.replace(*change))
    for w in words:
        assert w in msg


def test_missing_pieces():
    assert "missing key 'nodes.n1.data_dir'" in error(MINIMAL.replace('data_dir = "d1"', ""))
    assert "missing table '[cluster]'" in error('[nodes.n1]\naddress = "127.0.0.1"\ndata_dir = "d"\n')
    assert "at least one node" in error('[cluster]\nname = "c"\n')
    assert "invalid TOML" in error("[cluster\n")


def test_duplicate_endpoints_and_data_dirs():
    two = MINIMAL + '[nodes.n2]\naddress = "127.0.0.1"\ndata_dir = "d2"\n'
    msg = error(two)
    assert "'n1' and 'n2' both use 127.0.0.1:7400" in msg
    ok = two.replace('data_dir = "d2"', 'data_dir = "d2"\nbus_port = 7500\npub_port = 7501\nmetrics_port = 7502')
    assert set(parse(ok).members) == {"n1", "n2"}
    assert "share data_dir" in error(ok.replace('data_dir = "d2"', 'data_dir = "d1"'))
    assert "uses one port twice" in error(MINIMAL.replace('data_dir = "d1"', 'data_dir = "d1"\npub_port = 7400'))
    same_name = MINIMAL + '[managers.n1]\naddress = "127.0.0.2"\n'
    assert "used twice" in error(same_name)


def vip(address: str, follow: str | None = None) -> str:
    return f'[[vip]]\naddress = "{address}"\ninterface = "eth0"\n' + (f'follow = "{follow}"\n' if follow else "")


def test_follow_cycles_and_dangling_follows():
    assert "cycle" in error(MINIMAL + vip("10.0.0.1/24", "10.0.0.2") + vip("10.0.0.2/24", "10.0.0.1"))
    assert "cycle" in error(MINIMAL + vip("10.0.0.1/24", "10.0.0.1"))
    assert "not a VIP" in error(MINIMAL + vip("10.0.0.1/24", "10.0.0.9"))
    chain = parse(MINIMAL + vip("10.0.0.1/24", "10.0.0.2/24") + vip("10.0.0.2/24", "10.0.0.3") + vip("10.0.0.3/24"))
    assert [v.follow for v in chain.vips] == ["10.0.0.2", "10.0.0.3", None]
    assert "listed twice" in error(MINIMAL + vip("10.0.0.1/24") + vip("10.0.0.1/24"))
    assert "needs a prefix" in error(MINIMAL + vip("10.0.0.1"))
    assert "unknown node" in error(MINIMAL + vip("10.0.0.1/24").replace('interface', 'preference = "n9"\ninterface'))


def test_preset_names():
    for name in PRESETS:
        assert parse(MINIMAL.replace('name = "c"', f'name = "c"\npreset = "{name}"')).timing.name == name
    msg = error(MINIMAL.replace('name = "c"', 'name = "c"\npreset = "wan"'))
    assert "cluster.preset" in msg and "fast" in msg and "lan" in msg


def test_timing_presets_respect_their_own_ordering():
    for t in PRESETS.values():
        assert t.probe_interval < t.suspect_after < t.dead_after
        assert t.renew_every < t.lease < t.handover_wait
        assert t.election_timeout == t.dead_after


def test_load_cluster_file_errors(tmp_path):
    with pytest.raises(ClusterFileError, match="no such cluster file"):
        load_cluster(tmp_path / "nope.toml")
    f = tmp_path / "c.toml"
    f.write_text(MINIMAL)
    assert load_cluster(f).member("n1").data_dir == tmp_path / "d1"
    with pytest.raises(ClusterFileError, match="no member named 'n5'"):
        load_cluster(f).member("n5")


def test_cli_with_a_bad_file_is_one_line_and_exit_1(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("surprise = true\n" + MINIMAL)
    for args in (["status", "-c", f], ["supervisor-conf", "-c", f, "-m", "n1"], ["keys", "init", "-c", f]):
        r = run_cli(args)
        assert r.returncode == 1, args
        assert "Traceback" not in r.stderr
        lines = r.stderr.strip().splitlines()
        assert lines == [f"ecluster: {f}: unknown key 'surprise'"], lines
    r = run_cli(["status", "-c", tmp_path / "missing.toml"])
    assert (r.returncode, r.stderr.strip()) == (1, f"ecluster: {tmp_path / 'missing.toml'}: no such cluster file")


def test_ipv6_and_ipv4_vips_mix_with_canonical_keys():
    c = parse(MINIMAL + vip("FD00:0::100/64") + vip("10.0.0.1/24", "fd00::0100") + vip("2001:db8::1/128"))
    assert [v.address for v in c.vips] == ["fd00::100/64", "10.0.0.1/24", "2001:db8::1/128"]
    assert [v.ip for v in c.vips] == ["fd00::100", "10.0.0.1", "2001:db8::1"]
    assert c.vips[1].follow == "fd00::100"              # canonical, so it finds its target
    assert "listed twice" in error(MINIMAL + vip("fd00::100/64") + vip("fd00:0:0::100/80"))
    assert "needs a prefix length, e.g. fd00::100/64" in error(MINIMAL + vip("fd00::100"))


@pytest.mark.parametrize("address,needle", [
    ("fe80::100/64", "link-local"),
    ("ff02::1/64", "multicast"),
    ("fd00::/64", "subnet-router anycast"),
    ("fd00::1/129", "prefix must be a number from 1 to 128"),
    ("::ffff:10.0.0.1/96", "IPv4-mapped"),
    ("fd00::1%eth0/64", "zone"),
    ("::1/128", "loopback"),
    ("::/0", "unspecified"),
    ("224.0.0.9/24", "multicast"),
    ("10.0.0.0/24", "network address"),
    ("10.0.0.255/24", "broadcast address"),
    ("nonsense/24", "not an IPv4 or IPv6 address"),
])
def test_a_vip_the_vip_service_cannot_plumb_is_refused_at_parse_time(address, needle):
    """Refused when the file is loaded, naming the key: never a crash-looping vip service."""
    msg = error(MINIMAL + vip("10.0.0.1/24") + vip("10.0.0.2/24") + vip(address))
    assert "'vip[2].address'" in msg and needle in msg, msg
    assert "\n" not in msg


def test_bad_vip_interface_or_follow_is_refused_naming_the_key():
    assert "'vip[0].interface'" in error(MINIMAL + vip("10.0.0.1/24").replace('"eth0"', '"eth0:1"'))
    assert "'vip[0].interface'" in error(MINIMAL + vip("10.0.0.1/24").replace('"eth0"', '"' + "x" * 16 + '"'))
    assert "'vip[0].follow'" in error(MINIMAL + vip("10.0.0.1/24", "fe80::1"))


def test_ipv6_member_addresses():
    c = parse(MINIMAL.replace('"127.0.0.1"', '"FD00:0::11"'))
    assert c.nodes["n1"].address == "fd00::11"
    assert c.nodes["n1"].bus_endpoint == "tcp://[fd00::11]:7400"
    for bad, needle in (("fe80::11", "link-local"), ("fe80::11%eth0", "link-local"), ("ff02::1", "unicast"),
                        ("::", "unicast"), ("0.0.0.0", "unicast")):
        msg = error(MINIMAL.replace('"127.0.0.1"', f'"{bad}"'))
        assert "'nodes.n1.address'" in msg and needle in msg, msg
    two = MINIMAL + '[nodes.n2]\naddress = "fd00::0011"\ndata_dir = "d2"\n'
    assert "both use fd00::11:7400" in error(two.replace('"127.0.0.1"', '"fd00::11"'))
