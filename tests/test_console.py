"""The web console: token auth, safe headers, the JSON API, and the pages in real headless Chromium.

Fast part: the starlette application with a fake bus behind it (starlette's TestClient).
Real part: nodes n1, n2 (membership, election, vip in dry-run, control, jlog, as_logger)
and manager m1 (membership, election, control, console, cidr_server, logagg) on loopback;
Debian's /usr/bin/chromium driven by Playwright's Python package. The configuration page
is driven against the fake bus (a real uvicorn in a thread): configsync needs a
bootstrapped repository, which its own tests cover. Screenshots go to artifacts/console/.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import stat
from pathlib import Path

import httpx
import pytest

from conftest import Procs, make_cluster_file, short_dir, wait_until
from delegation_cluster import MiniCluster

from bus.client import RemoteError
from manager.console.auth import SECURITY_HEADERS, cookie_name, ensure_token, same_origin, token_path, without_token
from manager.console.backend import BusBackend, tail_lines
from services.console import console_url

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "console"
VIP = "10.99.0.100"
TOKEN = "t" * 43


def check_safe_headers(resp) -> None:
    assert resp.headers["content-security-policy"].startswith("default-src 'self'")
    assert resp.headers["x-frame-options"] == "DENY"
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.headers["referrer-policy"] == "no-referrer"


# -- fast: the application with a fake bus -------------------------------------------------------

class FakeBus:
    """Answers the few calls the console makes; records actions."""

    def __init__(self):
        self.actions = []

    async def __call__(self, member, service, method, timeout=2.0, **args):
        if service == "election" and method == "status":
            return {"leader": "n1", "term": 3, "assignment": {"drained": []},
                    "vips": [{"address": VIP + "/24", "kind": "injection", "owner": "n1", "holders": ["n1"],
                              "state": "owned", "pinned": None, "follow": None, "settled_for": 1.0}]}
        if service == "membership":
            return {"number": 4, "members": {"n1": {"state": "alive", "inc": 1, "since": 0},
                                             "n2": {"state": "dead", "inc": 2, "since": 0}}}
        if service == "election" and method == "move":
            if args["node"] == "n2":
                raise RemoteError("node_down", "node 'n2' is down or not running its vip service: refusing the move")
            self.actions.append((method, args))
            return {"vip": args["vip"], "node": args["node"], "term": 3}
        raise RemoteError("no_service", f"no service {service!r} on {member}")


class AppClient:
    """Blocking calls to the ASGI application in-process (httpx's ASGI transport); keeps cookies."""

    def __init__(self, app):
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:7480",
                                        follow_redirects=False)
        self.cookies = self.client.cookies

    def request(self, method, path, **kw):
        return asyncio.run(self.client.request(method, path, **kw))

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, **kw):
        return self.request("POST", path, **kw)


@pytest.fixture
def app_client(make_cluster):
    from manager.console.app import create_app
    cluster = make_cluster(2, 1)
    bus = FakeBus()
    c = AppClient(create_app(BusBackend(cluster, "m1", bus), TOKEN, cookie_name(7480)))
    c.fake_bus = bus
    yield c


def test_without_the_token_every_path_is_refused(app_client):
    for path in ("/", "/vips", "/api/cluster", "/api/vips", "/static/console.js", "/nope"):
        r = app_client.get(path)
        assert r.status_code == 401, path
        check_safe_headers(r)
    assert app_client.get("/api/cluster").json()["code"] == "unauthorized"
    assert app_client.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert app_client.get("/?token=wrong").status_code == 401
    app_client.cookies.set(cookie_name(7480), "wrong")
    assert app_client.get("/api/cluster").status_code == 401
    r = app_client.post("/api/vips/move", json={"vip": VIP, "node": "n1"})
    assert r.status_code == 401 and app_client.fake_bus.actions == []


def test_token_in_the_url_becomes_a_strict_http_only_cookie(app_client):
    r = app_client.get(f"/vips?token={TOKEN}&x=1")
    assert r.status_code == 303 and r.headers["location"] == "/vips?x=1"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{cookie_name(7480)}={TOKEN}") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    check_safe_headers(r)
    page = app_client.get("/vips")            # the client kept the cookie
    assert page.status_code == 200 and "<table id=\"vips\"" in page.text
    check_safe_headers(page)
    assert "<script src=\"/static/console.js\"" in page.text and "<script>" not in page.text
    js = app_client.get("/static/console.js")
    assert js.status_code == 200 and js.headers["x-content-type-options"] == "nosniff"


def test_bearer_token_and_the_json_api(app_client):
    h = {"Authorization": f"Bearer {TOKEN}"}
    c = app_client.get("/api/cluster", headers=h).json()
    assert c["coordinator"] == "n1" and c["term"] == 3
    assert {m["name"]: m["state"] for m in c["members"]} == {"n1": "alive", "n2": "dead", "m1": "unknown"}
    v = app_client.get("/api/vips", headers=h).json()
    assert v["vips"][0]["owner"] == "n1" and [n["name"] for n in v["nodes"]] == ["n1", "n2"]
    # a service that is not there is "not available", not a failed page
    cfg = app_client.get("/api/config", headers=h).json()
    assert cfg["status"]["available"] is False and "not available" in cfg["status"]["error"]
    assert app_client.get("/api/logs", headers=h).json()["aggregation"]["available"] is False
    assert app_client.get("/api/cidr", headers=h).json()["available"] is False


def test_posts_need_json_same_origin_and_report_refusals(app_client):
    h = {"Authorization": f"Bearer {TOKEN}"}
    ok = app_client.post("/api/vips/move", json={"vip": VIP, "node": "n1"}, headers=h)
    assert ok.status_code == 200 and app_client.fake_bus.actions == [("move", {"vip": VIP, "node": "n1"})]
    refused = app_client.post("/api/vips/move", json={"vip": VIP, "node": "n2"}, headers=h)
    assert refused.status_code == 409 and refused.json()["code"] == "node_down"
    assert app_client.post("/api/vips/move", json={"vip": "nope", "node": "n1"}, headers=h).status_code == 400
    assert app_client.post("/api/vips/move", json={"vip": VIP, "node": "n7"}, headers=h).status_code == 400
    assert app_client.post("/api/vips/move", content=b"vip=1", headers={**h, "Content-Type":
                           "application/x-www-form-urlencoded"}).status_code == 400
    cross = app_client.post("/api/vips/move", json={"vip": VIP, "node": "n1"},
                            headers={**h, "Origin": "http://evil.example"})
    assert cross.status_code == 403
    # a browser's cookie alone, without any origin information, is not enough for a POST
    app_client.get(f"/?token={TOKEN}")
    assert app_client.post("/api/vips/move", json={"vip": VIP, "node": "n1"}).status_code == 403
    same = app_client.post("/api/vips/move", json={"vip": VIP, "node": "n1"},
                           headers={"Origin": "http://127.0.0.1:7480"})
    assert same.status_code == 200
    assert len(app_client.fake_bus.actions) == 2


def test_same_origin_rules_and_token_stripping_are_pure():
    assert same_origin("GET", {}, "http", False)
    assert same_origin("POST", {"origin": "http://h:1", "host": "h:1"}, "http", False)
    assert not same_origin("POST", {"origin": "http://x:1", "host": "h:1"}, "http", True)
    assert same_origin("POST", {"sec-fetch-site": "same-origin"}, "http", False)
    assert not same_origin("POST", {"sec-fetch-site": "cross-site"}, "http", True)
    assert not same_origin("POST", {}, "http", False) and same_origin("POST", {}, "http", True)
    assert without_token("/a", "token=x") == "/a" and without_token("/a", "b=1&token=x") == "/a?b=1"
    assert {k.decode() for k, _ in SECURITY_HEADERS} >= {"content-security-policy", "x-frame-options"}


def test_token_file_is_private_stable_and_made_once(tmp_path):
    keys = tmp_path / "keys"
    t1 = ensure_token(keys)
    assert len(t1) >= 40 and stat.S_IMODE(os.stat(token_path(keys)).st_mode) == 0o600
    assert ensure_token(keys) == t1


def test_tail_lines_reads_only_the_end(tmp_path):
    f = tmp_path / "log"
    f.write_bytes(b"".join(b"line %d\n" % i for i in range(10000)))
    assert tail_lines(f, 3) == ["line 9997", "line 9998", "line 9999"]
    assert tail_lines(f, 5, max_bytes=20) == ["line 9998", "line 9999"]


def test_console_url_command(make_cluster, capsys):
    from ecluster.cli import main
    cluster = make_cluster(1, 1)
    assert main(["console", "url", "-c", str(cluster.path), "--manager", "m1"]) == 0
    m1 = cluster.member("m1")
    assert capsys.readouterr().out.strip() == \
        f"http://127.0.0.1:{m1.console_port}/?token={ensure_token(cluster.keys_dir)}"
    assert main(["console", "url", "-c", str(cluster.path), "--manager", "n1"]) == 1
    assert "is a node" in capsys.readouterr().err


# -- real: processes and headless Chromium ----------------------------------------------------------

def playwright_or_skip():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python package is not installed (pip install playwright)")
    return sync_playwright


TAIL_LINES = [f"console tail line {i}" for i in range(5)]
AUDIT = [["connections", "10.1.2.3", 5], ["connections", "10.1.9.9", 2], ["connections", "10.2.0.1", 1],
         ["rejects", "10.1.2.3", 3]]


def feed(cluster) -> None:
    """Records for the logs page (n1's mainlog) and audit counts for the CIDR page."""
    from bus.client import SyncClient
    with SyncClient(cluster, via="n1") as c:
        wait_until(lambda: c.call("n1", "jlog", "write", timeout=2, log="mainlog", records=TAIL_LINES),
                   timeout=10, what="jlog.write on n1")
        wait_until(lambda: c.call("n1", "as_logger", "add_batch", timeout=2, events=AUDIT),
                   timeout=10, what="as_logger.add_batch on n1")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    base = tmp_path_factory.mktemp("console")
    root = short_dir()
    procs = Procs(base / "logs")
    extra = (f'[as_logger]\nlog_interval = 1\n\n'
             f'[[vip]]\naddress = "{VIP}/24"\ninterface = "lo"\npreference = "n1"\n')
    try:
        cluster = make_cluster_file(base, n_nodes=2, n_managers=1, data_root=root, extra=extra)
        mc = MiniCluster(cluster, procs)
        for n in ("n1", "n2"):
            mc.start(n, ["membership", "election", "vip", "control", "jlog", "as_logger"])
        mc.start("m1", ["membership", "election", "control", "console", "cidr_server", "logagg"])
        mc.wait_ready(["n1", "n2", "m1"], via="m1")
        mc.wait_ready(["m1"], service="console", method="status", via="m1")
        m1 = cluster.member("m1")
        token = ensure_token(cluster.keys_dir)
        url = console_url(m1.console_address, m1.console_port, token)       # what `ecluster console url` prints
        base_url = f"http://{m1.console_address}:{m1.console_port}"
        api = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=5)
        wait_until(lambda: api.get("/api/vips").json()["vips"][0]["state"] == "owned", timeout=20,
                   what="the VIP owned")
        feed(cluster)
        yield {"cluster": cluster, "url": url, "base": base_url, "api": api, "mc": mc}
        api.close()
    finally:
        procs.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def test_real_console_refuses_without_token_and_sends_safe_headers(live):
    r = httpx.get(live["base"] + "/api/cluster", timeout=5)
    assert r.status_code == 401
    check_safe_headers(r)
    r = live["api"].get("/api/cluster")
    assert r.status_code == 200 and r.json()["coordinator"] in ("n1", "n2", "m1")
    check_safe_headers(r)
    assert live["url"].startswith(live["base"] + "/?token=")


def owner(live) -> str | None:
    return live["api"].get("/api/vips").json()["vips"][0]["owner"]


@pytest.fixture(scope="module")
def browser():
    sync_playwright = playwright_or_skip()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    """A fresh page (own cookies); fails the test on a script error or a CSP violation."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(f"page error: {e}"))
    # a CSP violation is a console error; an expected 400 (a refused command) is not counted
    pg.on("console", lambda m: pg.errors.append(m.text)
          if m.type == "error" and "status of 400" not in m.text else None)
    pg.set_default_timeout(10_000)
    yield pg
    context.close()
    assert pg.errors == [], pg.errors


def expect(locator):
    from playwright.sync_api import expect as pw_expect
    return pw_expect(locator)


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_cluster_and_vip_pages_move_and_drain_with_confirmation(live, page):
    # -- cluster: members and the coordinator, filled in by the page itself
    page.goto(live["url"])
    assert "token=" not in page.url            # the token became a cookie
    page.wait_for_selector("#members tbody tr[data-member='m1']")
    # (no wait_for_function: the page's CSP forbids the eval it needs)
    page.wait_for_selector("#coordinator:text-matches('^(n1|n2|m1)$')")
    coordinator = page.inner_text("#coordinator").strip()
    assert coordinator == live["api"].get("/api/cluster").json()["coordinator"]
    expect(page.locator("#members tbody .badge.alive")).to_have_count(3, timeout=10_000)
    assert page.inner_text(f"#members tr[data-member='{coordinator}']").endswith("coordinator")
    shot(page, "cluster")

    # -- VIPs: move with confirmation; the owner changes in the table without a reload
    page.click("nav a[href='/vips']")
    row = f"#vips tr[data-vip='{VIP}/24']"
    page.wait_for_selector(f"{row} td.owner:text-is('n1')")
    page.evaluate("window.__no_reload = 1")
    page.select_option(f"{row} select.move-target", "n2")
    page.click(f"{row} button.move")
    page.wait_for_selector("#confirm[open]")
    assert "Move VIP 10.99.0.100/24 from n1 to n2?" in page.inner_text("#confirm-text")
    shot(page, "vips-confirm")
    page.click("#confirm-cancel")              # cancelled: nothing happens
    assert page.is_hidden("#confirm") and owner(live) == "n1"
    page.select_option(f"{row} select.move-target", "n2")
    page.click(f"{row} button.move")
    page.click("#confirm-ok")
    page.wait_for_selector(f"{row} td.owner:text-is('n2')", timeout=15_000)
    page.wait_for_selector(f"{row} .badge.owned", timeout=15_000)
    assert page.evaluate("window.__no_reload") == 1
    assert "move 10.99.0.100/24 to n2: done" in page.inner_text("#message")
    assert owner(live) == "n2"
    shot(page, "vips-moved")

    # drain n2 with its button: the VIP goes back to n1; then undrain
    page.click("#nodes tr[data-node='n2'] button.drain")
    assert "Drain node n2?" in page.inner_text("#confirm-text")
    page.click("#confirm-ok")
    page.wait_for_selector(f"{row} td.owner:text-is('n1')", timeout=15_000)
    page.wait_for_selector("#nodes tr[data-node='n2'] button.undrain")
    page.click("#nodes tr[data-node='n2'] button.undrain")
    page.click("#confirm-ok")
    page.wait_for_selector("#nodes tr[data-node='n2'] button.drain")
    assert page.evaluate("window.__no_reload") == 1


def test_command_form_broadcast_and_unicast(live, page):
    page.goto(live["url"].replace("/?", "/commands?"))
    page.wait_for_selector("#command-help tbody tr")
    page.fill("#cmd-text", "version")
    page.click("#cmd-run")
    page.wait_for_selector("#replies section[data-member='n2'][data-status='ok']")
    assert page.locator("#replies section[data-status='ok']").count() == 2
    assert '"member": "n1"' in page.inner_text("#replies section[data-member='n1'] pre")
    page.select_option("#cmd-mode", "unicast")
    page.select_option("#cmd-node", "m1")
    page.fill("#cmd-text", "bogus thing")
    page.click("#cmd-run")
    page.wait_for_selector("#message.bad")
    assert "unknown command 'bogus thing'" in page.inner_text("#message")
    page.fill("#cmd-text", "membership")
    page.click("#cmd-run")
    page.wait_for_selector("#replies section[data-member='m1'][data-status='ok']")
    shot(page, "commands")


def test_logs_page_shows_lag_and_a_live_tail(live, page):
    page.goto(live["url"].replace("/?", "/logs?"))
    lane = "#lanes tr[data-node='n1'][data-log='mainlog']"
    page.wait_for_selector(lane)
    page.click(lane)
    page.wait_for_selector("#tail:has-text('console tail line 4')", timeout=15_000)
    assert page.inner_text("#tail").splitlines()[-5:] == TAIL_LINES
    assert page.inner_text(f"{lane} td:nth-child(3)") == "5"          # written seq
    assert page.locator("#subscribers tbody tr", has_text="logagg-m1").count() >= 1
    # a record written now shows up without a reload
    from bus.client import SyncClient
    with SyncClient(live["cluster"], via="n1") as c:
        c.call("n1", "jlog", "write", timeout=2, log="mainlog", records=["a later line"])
    page.wait_for_selector("#tail:has-text('a later line')", timeout=15_000)
    shot(page, "logs")


def test_cidr_paths_page_counts_and_drills_down(live, page):
    q = "show count for 10.0.0.0/8 in connections cidrsize 16"
    wait_until(lambda: live["api"].get("/api/cidr", params={"q": q}).json().get("rows"), timeout=20,
               what="audit counts at the manager")
    page.goto(live["url"].replace("/?", "/cidr?"))
    page.wait_for_selector("#cidr-series input[value='connections']")
    page.fill("#cidr-block", "10.0.0.0/8")
    page.click("#cidr-go")
    page.wait_for_selector("#cidr-rows tr[data-cidr='10.1.0.0/16']")
    assert page.inner_text("#cidr-rows tr[data-cidr='10.1.0.0/16'] td:last-child") == "7"
    assert page.inner_text("#cidr-rows tr[data-cidr='10.2.0.0/16'] td:last-child") == "1"
    assert page.inner_text("#cidr-query").startswith("show count for 10.0.0.0/8 in connections cidrsize 16")
    page.click("#cidr-rows tr[data-cidr='10.1.0.0/16']")          # drill into the block
    page.wait_for_selector("#cidr-rows tr[data-cidr='10.1.2.0/24']")
    assert page.inner_text("#cidr-rows tr[data-cidr='10.1.2.0/24'] td:last-child") == "5"
    assert page.inner_text("#cidr-rows tr[data-cidr='10.1.9.0/24'] td:last-child") == "2"
    assert page.locator("#cidr-rows tr[data-cidr='10.2.0.0/16']").count() == 0
    assert "10.0.0.0/8 › 10.1.0.0/16" in page.inner_text("#cidr-path")
    # two series: one column each
    page.check("#cidr-series input[value='rejects']")
    page.click("#cidr-path a[data-block='10.1.0.0/16']")
    page.wait_for_selector("#cidr-rows thead th:text-is('rejects')")
    assert page.inner_text("#cidr-rows tr[data-cidr='10.1.2.0/24']").split() == ["10.1.2.0/24", "5", "3", "8"]
    shot(page, "cidr")
    # back up the path
    page.click("#cidr-path a[data-block='10.0.0.0/8']")
    page.wait_for_selector("#cidr-rows tr[data-cidr='10.2.0.0/16']")


class ConfigBus(FakeBus):
    REV1, REV2 = "a" * 40, "b" * 40

    async def __call__(self, member, service, method, timeout=2.0, **args):
        if service == "configsync" and method == "cluster_status":
            return {"coordinator": "n1", "term": 2, "committed": self.REV2, "members": [
                {"member": "n1", "role": "node", "rev": self.REV2, "head": self.REV2, "state": "applied", "height": 2},
                {"member": "n2", "role": "node", "rev": self.REV1, "head": self.REV1, "state": "behind", "height": 1},
                {"member": "m1", "role": "manager", "rev": None, "head": None, "state": "unreachable"}]}
        if service == "configsync" and method == "log":
            return [{"rev": self.REV2, "parents": [self.REV1], "author": "ops <ops@example>", "time": 1_700_000_100,
                     "subject": "raise the connection limit"},
                    {"rev": self.REV1, "parents": [], "author": "ops <ops@example>", "time": 1_700_000_000,
                     "subject": "bootstrap"}]
        if service == "configsync" and method == "diff":
            return f"diff --git a/global/ecelerity.conf b/global/ecelerity.conf\n-limit 10\n+limit 20 ({args['rev'][:4]})\n"
        return await super().__call__(member, service, method, timeout=timeout, **args)


@pytest.fixture
def fake_console(make_cluster):
    """The console app with the fake bus behind a real uvicorn (a thread), for pages whose
    services this test cluster does not run."""
    import threading

    import uvicorn
    from conftest import free_ports
    from manager.console.app import create_app
    cluster = make_cluster(2, 1, sub="fake")
    port = free_ports(1)[0]
    app = create_app(BusBackend(cluster, "m1", ConfigBus()), TOKEN, cookie_name(port))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                                           ws="none", http="h11", timeout_graceful_shutdown=0.5))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        wait_until(lambda: server.started, timeout=10, what="uvicorn started")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(timeout=10)


def test_config_page_shows_revisions_commits_and_a_diff(fake_console, page):
    page.goto(f"{fake_console}/config?token={TOKEN}")
    page.wait_for_selector("#config-members tr[data-member='n2']")
    assert page.inner_text("#config-members tr[data-member='n1'] td.rev") == "b" * 12
    assert page.inner_text("#config-members tr[data-member='n2'] .badge") == "behind"
    assert page.inner_text("#committed") == "b" * 12
    page.click(f"#commits tr[data-rev='{'b' * 40}']")
    page.wait_for_selector("#diff:has-text('+limit 20 (bbbb)')")
    assert not page.is_hidden("#diff-title")
    page.wait_for_selector(f"#commits tr.selected[data-rev='{'b' * 40}']")
    shot(page, "config")
