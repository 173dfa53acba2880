// ecluster console: fills the page from the JSON API and keeps it live by polling.
// No framework and no innerHTML with data: every value goes in through textContent.
"use strict";

const POLL_MS = 1500;

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(e.dataset, v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function show(id, text) {
  const e = $(id);
  if (!e) return;
  if (text) { e.textContent = text; e.hidden = false; } else { e.hidden = true; e.textContent = ""; }
}

function message(text, ok) {
  const m = $("message");
  m.textContent = text;
  m.className = "message " + (ok ? "ok" : "bad");
  m.hidden = !text;
}

function fmtTime(t) {
  if (t === null || t === undefined) return "-";
  return new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19);
}

function dash(v) { return v === null || v === undefined || v === "" ? "-" : v; }

function setRows(table, rows) {
  const body = $(table).tBodies[0];
  body.replaceChildren(...rows);
}

async function api(path, body) {
  const opts = { credentials: "same-origin", cache: "no-store", headers: {} };
  if (body !== undefined) {
    opts.method = "POST";
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (e) { data = { error: r.status + " " + r.statusText }; }
  if (!r.ok) throw new Error((data && data.error) || (r.status + " " + r.statusText));
  return data;
}

// poll: call load() now and every POLL_MS; one request in flight at a time.
function poll(load) {
  let busy = false;
  async function tick() {
    if (busy) return;
    busy = true;
    try {
      await load();
      $("live").textContent = "live · " + new Date().toLocaleTimeString();
      $("live").classList.remove("stale");
    } catch (e) {
      $("live").textContent = "no answer: " + e.message;
      $("live").classList.add("stale");
    } finally {
      busy = false;
    }
  }
  tick();
  return setInterval(tick, POLL_MS);
}

// confirm(text) -> Promise<boolean>, with the page's <dialog>.
function confirmDialog(text) {
  const d = $("confirm");
  $("confirm-text").textContent = text;
  return new Promise((resolve) => {
    d.addEventListener("close", () => resolve(d.returnValue === "ok"), { once: true });
    d.returnValue = "";
    d.showModal();
  });
}

function badge(text, cls) { return el("span", { class: "badge " + (cls || text) }, text); }

// a node's health checks: "ok", "failing: a, b", "starting: a" or "-" (none reported)
function checksCell(text) {
  if (!text) return "";
  if (text.startsWith("failing")) return badge(text, "unhealthy");
  return text === "ok" ? badge("ok", "healthy") : text;
}

// -- pages ---------------------------------------------------------------------------------

const pages = {};

pages.cluster = function () {
  poll(async () => {
    const d = await api("/api/cluster");
    $("coordinator").textContent = dash(d.coordinator);
    $("term").textContent = dash(d.term);
    $("quorum").textContent = d.quorum + " of " + d.voters;
    $("view-number").textContent = dash(d.view_number);
    const problems = [d.election && d.election.error, d.membership && d.membership.error].filter(Boolean);
    show("cluster-problem", problems.join("; "));
    setRows("members", d.members.map((m) => el("tr", { dataset: { member: m.name } },
      el("td", {}, m.name), el("td", {}, m.role), el("td", {}, m.address),
      el("td", {}, badge(m.state)), el("td", {}, dash(m.incarnation)), el("td", {}, fmtTime(m.since)),
      el("td", { class: "checks" }, checksCell(m.checks)),
      el("td", {}, m.coordinator ? badge("coordinator", "coord") : ""))));
  });
};

pages.vips = function () {
  let last = null;
  const chosen = {};       // vip -> node picked in its select, kept across refreshes

  async function act(path, body, what) {
    try {
      await api(path, body);
      message(what + ": done", true);
    } catch (e) {
      message(what + ": " + e.message, false);
    }
    await load();
  }

  function moveRow(v, nodes) {
    const sel = el("select", { class: "move-target", "aria-label": "move " + v.address + " to" },
      nodes.map((n) => el("option", { value: n.name, selected: chosen[v.address] === n.name }, n.name)));
    sel.addEventListener("change", () => { chosen[v.address] = sel.value; });
    if (!chosen[v.address]) chosen[v.address] = sel.value;
    const move = el("button", { class: "move", type: "button", disabled: !!v.follow }, "Move");
    move.addEventListener("click", async () => {
      const node = sel.value;
      if (await confirmDialog("Move VIP " + v.address + " from " + dash(v.owner) + " to " + node + "?")) {
        act("/api/vips/move", { vip: v.address, node: node }, "move " + v.address + " to " + node);
      }
    });
    const buttons = [move];
    if (v.pinned) {
      const unpin = el("button", { class: "unpin", type: "button" }, "Unpin");
      unpin.addEventListener("click", async () => {
        if (await confirmDialog("Unpin VIP " + v.address + " (back to its normal election)?")) {
          act("/api/vips/unpin", { vip: v.address }, "unpin " + v.address);
        }
      });
      buttons.push(unpin);
    }
    return el("tr", { dataset: { vip: v.address } },
      el("td", {}, v.address), el("td", {}, v.kind), el("td", { class: "owner" }, dash(v.owner)),
      el("td", {}, (v.holders || []).join(", ") || "-"), el("td", {}, badge(v.state)),
      el("td", {}, dash(v.pinned)), el("td", {}, dash(v.settled_for)),
      el("td", { class: "unhealthy-on" }, (v.unhealthy || []).length ? badge((v.unhealthy || []).join(", "), "unhealthy") : "-"),
      el("td", {}, v.follow ? "follows " + v.follow : sel), el("td", {}, buttons));
  }

  function nodeRow(n) {
    const b = el("button", { class: n.drained ? "undrain" : "drain", type: "button" }, n.drained ? "Undrain" : "Drain");
    b.addEventListener("click", async () => {
      const verb = n.drained ? "Undrain" : "Drain";
      const text = n.drained ? "Let node " + n.name + " hold VIPs again?"
        : "Drain node " + n.name + "? Every VIP moves off it until it is undrained.";
      if (await confirmDialog(text)) {
        act("/api/nodes/drain", { node: n.name, drain: !n.drained }, verb.toLowerCase() + " " + n.name);
      }
    });
    return el("tr", { dataset: { node: n.name } }, el("td", {}, n.name), el("td", {}, badge(n.state)),
      el("td", {}, n.drained ? "yes" : "no"), el("td", { class: "checks" }, checksCell(n.checks)), el("td", {}, b));
  }

  async function load() {
    const d = await api("/api/vips");
    last = d;
    $("coordinator").textContent = dash(d.coordinator);
    $("term").textContent = dash(d.term);
    show("vips-problem", d.election && d.election.error);
    // do not rebuild a select the user has open
    if (document.activeElement && document.activeElement.classList.contains("move-target")) return;
    setRows("vips", d.vips.map((v) => moveRow(v, d.nodes)));
    setRows("nodes", d.nodes.map(nodeRow));
  }
  poll(load);
};

pages.config = function () {
  let diffRev = null;
  poll(async () => {
    const d = await api("/api/config" + (diffRev ? "?diff=" + encodeURIComponent(diffRev) : ""));
    $("committed").textContent = d.committed ? d.committed.slice(0, 12) : "-";
    $("coordinator").textContent = dash(d.coordinator);
    show("config-problem", [d.status && d.status.error, d.log_error].filter(Boolean).join("; "));
    setRows("config-members", d.members.map((m) => el("tr", { dataset: { member: m.member } },
      el("td", {}, m.member), el("td", {}, dash(m.role)), el("td", { class: "rev" }, m.rev ? m.rev.slice(0, 12) : "-"),
      el("td", {}, m.head ? m.head.slice(0, 12) : "-"), el("td", {}, badge(dash(m.state))), el("td", {}, dash(m.height)))));
    setRows("commits", d.log.map((c) => {
      const tr = el("tr", { class: "clickable" + (c.rev === diffRev ? " selected" : ""), dataset: { rev: c.rev } },
        el("td", { class: "rev" }, c.rev.slice(0, 12)), el("td", {}, fmtTime(c.time)), el("td", {}, c.author),
        el("td", {}, c.subject));
      tr.addEventListener("click", () => {
        diffRev = c.rev;
        $("diff").textContent = "loading…";
        $("diff").hidden = false;
      });
      return tr;
    }));
    if (d.diff) {
      $("diff-title").hidden = false;
      $("diff-title").textContent = "Diff of " + d.diff.rev.slice(0, 12);
      $("diff").hidden = false;
      $("diff").textContent = d.diff.text !== null ? (d.diff.text || "(no changes)") : d.diff.error;
    }
  });
};

pages.logs = function () {
  let lane = null;
  poll(async () => {
    const q = lane ? "?node=" + encodeURIComponent(lane.node) + "&log=" + encodeURIComponent(lane.log) + "&lines=60" : "";
    const d = await api("/api/logs" + q);
    show("logs-problem", d.aggregation && d.aggregation.error);
    $("subscriber").textContent = d.subscriber ? "as " + d.subscriber : "";
    if (!lane && d.lanes.length) {
      lane = { node: d.lanes[0].node, log: d.lanes[0].log };
    }
    setRows("lanes", d.lanes.map((l) => {
      const sel = lane && lane.node === l.node && lane.log === l.log;
      const tr = el("tr", { class: "clickable" + (sel ? " selected" : ""), dataset: { node: l.node, log: l.log } },
        el("td", {}, l.node), el("td", {}, l.log), el("td", {}, dash(l.written_seq)), el("td", {}, dash(l.node_last_seq)),
        el("td", {}, dash(l.lag_records)), el("td", {}, dash(l.lag_bytes)), el("td", {}, dash(l.records_written)),
        el("td", { class: "err" }, dash(l.error)));
      tr.addEventListener("click", () => { lane = { node: l.node, log: l.log }; $("tail").textContent = "loading…"; });
      return tr;
    }));
    setRows("subscribers", d.subscribers.map((s) => el("tr", {},
      el("td", {}, s.node), el("td", {}, dash(s.log)), el("td", {}, s.subscriber || dash(s.error)),
      el("td", {}, dash(s.checkpoint)), el("td", {}, dash(s.last_seq)), el("td", {}, dash(s.lag_records)),
      el("td", {}, dash(s.lag_bytes)), el("td", {}, s.stalled ? "yes" : "no"))));
    if (d.tail) {
      $("tail-name").textContent = d.tail.node + "/" + d.tail.log + (d.tail.file ? " · " + d.tail.file : "");
      $("tail").textContent = d.tail.error ? d.tail.error : (d.tail.lines.join("\n") || "(empty)");
    }
  });
};

pages.cidr = function () {
  let path = [];              // drill-down path of blocks, the last is shown
  let seriesKnown = null;

  function maxLen(block) { return block.includes(":") ? 128 : 32; }
  function prefix(block) { const p = block.split("/")[1]; return p === undefined ? maxLen(block) : parseInt(p, 10); }

  function chosenSeries() {
    return Array.from(document.querySelectorAll("#cidr-series input:checked")).map((i) => i.value);
  }

  function buildQuery() {
    const block = path.length ? path[path.length - 1] : $("cidr-block").value.trim();
    const series = chosenSeries();
    if (!block || !series.length) return null;
    const size = Math.min(maxLen(block), prefix(block) + parseInt($("cidr-step").value, 10));
    let q = "show count for " + block + " in " + series.join(",");
    if (size > prefix(block)) q += " cidrsize " + size;
    const since = $("cidr-since").value.trim();
    if (since) q += " since " + since;
    q += " order by count";
    const limit = parseInt($("cidr-limit").value, 10);
    if (limit > 0) q += " limit " + limit;
    return q;
  }

  function renderPath() {
    const p = $("cidr-path");
    const crumbs = [el("span", { class: "muted" }, "path: ")];
    path.forEach((b, i) => {
      if (i) crumbs.push(" › ");
      const a = el("a", { href: "#", class: "crumb", dataset: { block: b } }, b);
      a.addEventListener("click", (ev) => { ev.preventDefault(); path = path.slice(0, i + 1); run(); });
      crumbs.push(a);
    });
    p.replaceChildren(...crumbs);
  }

  async function loadSeries() {
    const d = await api("/api/cidr");
    const box = $("cidr-series");
    if (!d.available) {
      box.replaceChildren(el("legend", {}, "Series"), el("span", { class: "problem" }, d.error));
      return;
    }
    const names = d.series || [];
    if (JSON.stringify(names) === JSON.stringify(seriesKnown)) return;
    const before = new Set(chosenSeries());
    seriesKnown = names;
    box.replaceChildren(el("legend", {}, "Series"),
      ...(names.length ? names.map((s, i) => el("label", {},
        el("input", { type: "checkbox", value: s, checked: before.size ? before.has(s) : i === 0 }), " " + s))
        : [el("span", { class: "muted" }, "no series yet")]));
  }

  async function run() {
    renderPath();
    const q = buildQuery();
    $("cidr-query").textContent = q || "(pick a block and a series)";
    if (!q) return;
    let d;
    try {
      d = await api("/api/cidr?q=" + encodeURIComponent(q));
    } catch (e) {
      show("cidr-problem", e.message);
      setRows("cidr-rows", []);
      return;
    }
    if (d.available === false) { show("cidr-problem", d.error); return; }
    show("cidr-problem", "");
    const r = d.result || { columns: [], rows: [] };
    const head = $("cidr-rows").tHead.rows[0];
    head.replaceChildren(el("th", {}, "block"), ...r.columns.map((c) => el("th", {}, c)), el("th", {}, "total"));
    setRows("cidr-rows", r.rows.length ? r.rows.map((row) => {
      const drill = prefix(row.cidr) < maxLen(row.cidr);
      const tr = el("tr", { class: drill ? "clickable" : "", dataset: { cidr: row.cidr } },
        el("td", {}, (row.day ? row.day + " " : "") + row.cidr), ...row.counts.map((c) => el("td", { class: "num" }, c)),
        el("td", { class: "num" }, row.total));
      if (drill) tr.addEventListener("click", () => { path.push(row.cidr); run(); });
      return tr;
    }) : [el("tr", {}, el("td", { colspan: r.columns.length + 2, class: "muted" }, "no counts in this block"))]);
  }

  $("cidr-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    path = [$("cidr-block").value.trim()];
    run();
  });
  poll(async () => {
    await loadSeries();
    if (!path.length && chosenSeries().length) path = [$("cidr-block").value.trim()];
    await run();
  });
};

pages.commands = function () {
  const mode = $("cmd-mode");
  mode.addEventListener("change", () => { $("cmd-node-label").hidden = mode.value !== "unicast"; });

  function renderReplies(d) {
    $("cmd-summary").textContent = d.command + (d.args && d.args.length ? " " + d.args.join(" ") : "") +
      " via " + d.manager + " · " + d.elapsed + " s (timeout " + d.timeout + " s)";
    $("replies").replaceChildren(...Object.entries(d.replies).map(([member, r]) =>
      el("section", { class: "reply " + r.status, dataset: { member: member, status: r.status } },
        el("h3", {}, member, " ", badge(r.status)),
        el("pre", {}, r.status === "ok" ? JSON.stringify(r.result, null, 2)
          : (r.code ? r.code + ": " : "") + (r.message || "")))));
  }

  $("command-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = { mode: mode.value, command: $("cmd-text").value, timeout: parseFloat($("cmd-timeout").value) || 3,
                   include_managers: $("cmd-managers").checked };
    if (mode.value === "unicast") body.node = $("cmd-node").value;
    $("cmd-run").disabled = true;
    $("cmd-summary").textContent = "running…";
    try {
      renderReplies(await api("/api/command", body));
      message("", true);
    } catch (e) {
      $("cmd-summary").textContent = "";
      $("replies").replaceChildren();
      message(e.message, false);
    } finally {
      $("cmd-run").disabled = false;
    }
  });

  let filled = false;
  poll(async () => {
    const [c, cl] = await Promise.all([api("/api/commands"), filled ? null : api("/api/cluster")]);
    if (cl) {
      $("cmd-node").replaceChildren(...cl.members.map((m) => el("option", { value: m.name }, m.name + " (" + m.role + ")")));
      filled = true;
    }
    $("cmd-list").replaceChildren(...c.commands.map((x) => el("option", { value: x.name })));
    setRows("command-help", c.commands.map((x) => el("tr", {}, el("td", {}, el("code", {}, x.usage)), el("td", {}, x.summary))));
  });
};

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (pages[page]) pages[page]();
});
