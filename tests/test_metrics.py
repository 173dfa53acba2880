"""The Prometheus endpoint (services/metrics.py): rendering, then a node and a manager on loopback."""
from __future__ import annotations

import re
import shutil
import signal
import urllib.error
import urllib.request

import pytest

from conftest import Procs, make_cluster_file, run_cli, short_dir, wait_until
from services.metrics import (Family, MetricsError, check_family, config_families, family_from_dict,
                              jlog_families, membership_families, render, vip_families)

pytestmark = pytest.mark.timeout(90)

VIP = "127.0.0.100"
HELP_RE = re.compile(r"^# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) (.*)$")
TYPE_RE = re.compile(r"^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|untyped|histogram|summary)$")
SAMPLE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)*)\})?'
                       r" (-?[0-9.eE+-]+|NaN|[+-]Inf)$")


def parse_exposition(text: str) -> dict[str, dict]:
    """Check ``text`` strictly against the 0.0.4 text format; {family: {type, help, samples}}."""
    assert text.endswith("\n")
    fams: dict[str, dict] = {}
    current = None
    seen_series = set()
    for line in text.splitlines():
        if m := HELP_RE.match(line):
            assert m.group(1) not in fams, f"family {m.group(1)} twice"
            current = fams[m.group(1)] = {"help": m.group(2), "type": None, "samples": []}
            continue
        if m := TYPE_RE.match(line):
            assert current is fams.get(m.group(1)) and current["type"] is None and not current["samples"], line
            current["type"] = m.group(2)
            continue
        m = SAMPLE_RE.match(line)
        assert m, f"not a valid sample line: {line!r}"
        name = m.group(1)
        assert current is fams.get(name) and current["type"], f"sample before its TYPE: {line!r}"
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        series = (name, tuple(sorted(labels.items())))
        assert series not in seen_series, f"series twice: {line!r}"
        seen_series.add(series)
        float(m.group(4).replace("Inf", "inf"))
        current["samples"].append((labels, float(m.group(4).replace("Inf", "inf"))))
    return fams


# -- pure --------------------------------------------------------------------------------------

def test_render_escapes_and_validates():
    f = Family("x_total", "counter", "a\\b\nc").add(3, path='a"b\\c\nd').add(1.5, path="z")
    text = render([f, Family("empty", "gauge", "nothing")])
    assert text == ('# HELP x_total a\\\\b\\nc\n# TYPE x_total counter\n'
                    'x_total{path="a\\"b\\\\c\\nd"} 3\nx_total{path="z"} 1.5\n')
    assert parse_exposition(text)["x_total"]["samples"][0][0]["path"] == 'a\\"b\\\\c\\nd'
    assert render([Family("nan", "gauge", "").add(float("nan")).add(float("inf"), k="v")]).splitlines()[2:] == \
        ["nan NaN", 'nan{k="v"} +Inf']
    for bad in (Family("1bad", "gauge", ""), Family("ok", "weird", ""), Family("ok", "gauge", "").add("x"),
                Family("ok", "gauge", "").add(1, **{"bad-label": 1})):
        with pytest.raises(MetricsError):
            check_family(bad)
    with pytest.raises(MetricsError):
        family_from_dict({"name": "p", "samples": [[1, 2, 3]]})
    assert family_from_dict({"name": "p_total", "type": "counter", "help": "h",
                             "samples": [[{"a": 1}, 2]]}).samples == [({"a": "1"}, 2)]


def test_families_from_replies_tolerate_odd_input():
    fams = {f.name: f for f in membership_families(
        {"number": 4, "members": {"n1": {"state": "alive", "role": "node"}, "n2": {"state": "dead", "role": "node"},
                                  "m1": "garbage"}}, "n1")}
    assert dict((lab["state"], v) for lab, v in fams["ecluster_membership_members"].samples) == \
        {"alive": 1, "suspect": 0, "dead": 1}
    assert fams["ecluster_membership_peer_up"].samples == [({"peer": "n2", "role": "node"}, 0)]
    vf = {f.name: f for f in vip_families({"held": ["1.2.3.4"], "states": {"1.2.3.4": "owned", "5.6.7.8": "odd"}})}
    assert ({"vip": "1.2.3.4"}, 1) in vf["ecluster_vip_held"].samples
    assert ({"vip": "5.6.7.8", "state": "odd"}, 1) in vf["ecluster_vip_state"].samples
    assert render(jlog_families({"logs": {"a": {"error": "x"}, "b": 5}})) .count("\n") == 3
    cf = {f.name: f for f in config_families({"state": "in sync", "rev": "r1", "height": 2},
                                             [{"rev": "r1", "time": 100}], now=130.0)}
    assert cf["ecluster_config_applied_age_seconds"].samples == [({}, 30.0)]
    assert ({"state": "in_sync"}, 1) in cf["ecluster_config_state"].samples
    assert config_families({}, None, 0.0) == []


# -- on a running member ------------------------------------------------------------------------

NODE_SERVICES = ("membership", "election", "vip", "jlog", "configsync", "metrics")
MANAGER_SERVICES = ("membership", "election", "configsync", "metrics")


@pytest.fixture(scope="module")
def cluster_procs(tmp_path_factory):
    base = tmp_path_factory.mktemp("metrics")
    root = short_dir()
    procs = Procs(base / "logs")
    extra = f'[[vip]]\naddress = "{VIP}/8"\ninterface = "lo"\npreference = "n1"\n'
    try:
        cluster = make_cluster_file(base / "c", 1, 1, extra=extra, data_root=root)
        started = {}
        for member, services in (("n1", NODE_SERVICES), ("m1", MANAGER_SERVICES)):
            procs.start(["bus", "run", "-c", cluster.path, "-m", member], name=f"bus-{member}")
            for s in services:
                started[(member, s)] = procs.start(["service", "run", s, "-c", cluster.path, "-m", member],
                                                   name=f"{s}-{member}")
        wait_until(lambda: run_cli(["config", "bootstrap", "-c", cluster.path, "-m", "n1"], timeout=30).returncode == 0,
                   timeout=40, interval=0.5, what="config bootstrap")
        yield cluster, procs, started
    finally:
        procs.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def scrape(member) -> tuple[dict[str, dict], str]:
    with urllib.request.urlopen(f"http://{member.address}:{member.metrics_port}/metrics", timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    return parse_exposition(text), text


def values(fams, name) -> dict[tuple, float]:
    return {tuple(sorted(lab.items())): v for lab, v in fams[name]["samples"]}


def test_node_endpoint_serves_every_area(cluster_procs):
    cluster, _, _ = cluster_procs
    n1 = cluster.member("n1")

    def complete():
        fams, _ = scrape(n1)
        held = values(fams, "ecluster_vip_held") if "ecluster_vip_held" in fams else {}
        ok = (held.get((("vip", VIP),)) == 1 and "ecluster_config_applied_age_seconds" in fams
              and values(fams, "ecluster_membership_members").get((("state", "alive"),)) == 2)
        return fams if ok else None
    fams = wait_until(complete, timeout=30, interval=0.3, what="a complete scrape of n1")
    for name in ("ecluster_member_info", "ecluster_service_up", "ecluster_membership_view_number",
                 "ecluster_membership_peer_up", "ecluster_election_term", "ecluster_vip_state",
                 "ecluster_vip_events_total", "ecluster_vip_lease_remaining_seconds", "ecluster_jlog_last_seq",
                 "ecluster_jlog_subscriber_lag_records", "ecluster_jlog_subscriber_lag_bytes", "ecluster_config_state",
                 "ecluster_config_in_sync", "ecluster_scrape_duration_seconds"):
        assert name in fams, name
    assert fams["ecluster_vip_events_total"]["type"] == "counter"
    assert values(fams, "ecluster_vip_state")[(("state", "owned"), ("vip", VIP))] == 1
    assert values(fams, "ecluster_member_info") == {(("cluster", "test"), ("member", "n1"), ("role", "node")): 1}
    assert values(fams, "ecluster_membership_peer_up") == {(("peer", "m1"), ("role", "manager")): 1}
    lags = values(fams, "ecluster_jlog_subscriber_lag_records")
    assert (("log", "mainlog"), ("subscriber", "logagg-m1")) in lags
    assert 0 <= values(fams, "ecluster_config_applied_age_seconds")[()] < 600
    assert all(v == 1 for v in values(fams, "ecluster_service_up").values())


def test_manager_endpoint_has_no_node_families(cluster_procs):
    cluster, _, _ = cluster_procs
    fams = wait_until(lambda: scrape(cluster.member("m1"))[0], timeout=20, what="m1 scrape")
    assert "ecluster_membership_members" in fams and "ecluster_config_state" in fams
    assert not any(n.startswith(("ecluster_vip_", "ecluster_jlog_")) for n in fams)
    assert set(dict(k)["service"] for k in values(fams, "ecluster_service_up")) == \
        {"membership", "election", "configsync"}


def test_missing_service_is_absent_not_an_error(cluster_procs):
    cluster, procs, started = cluster_procs
    n1 = cluster.member("n1")
    procs.stop(started[("n1", "jlog")], sig=signal.SIGKILL)

    def jlog_gone():
        fams, _ = scrape(n1)
        return fams if values(fams, "ecluster_service_up")[(("service", "jlog"),)] == 0 else None
    fams = wait_until(jlog_gone, timeout=20, interval=0.3, what="jlog reported down")
    assert not any(n.startswith("ecluster_jlog_") for n in fams)
    assert "ecluster_vip_held" in fams                      # everything else still there


def test_other_paths_and_methods(cluster_procs):
    cluster, _, _ = cluster_procs
    n1 = cluster.member("n1")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://{n1.address}:{n1.metrics_port}/nope", timeout=5)
    assert e.value.code == 404
    req = urllib.request.Request(f"http://{n1.address}:{n1.metrics_port}/metrics", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 405


def test_metric_sources_are_found_in_a_child_process(make_cluster):
    """What runs on a member is found in a short-lived child (node.child.in_a_child), with
    the same answer as in this process, so the metrics and control services do not keep every
    service class loaded."""
    from node.child import in_a_child
    from services.base import load_service, services_for
    from services.metrics import local_metric_sources, metrics_sources
    cluster = make_cluster(1, 1)
    for member in ("n1", "m1"):
        here = services_for(cluster, member)
        plugins, builtin = metrics_sources(here, load_service)
        assert in_a_child("services.metrics:local_metric_sources", cluster, member) == \
            [here, plugins, sorted(builtin)] == local_metric_sources(cluster, member)
        assert in_a_child("services.base:services_for", cluster, member) == here
    import pytest
    with pytest.raises(RuntimeError, match="in a child: exit 1"):
        in_a_child("services.base:no_such_function", cluster, "n1")
