// The ops console: reads the ops API with the signed-in token and refreshes every 5 s.
// Actions are shown only to the roles that the API admits for them.
"use strict";

const REFRESH_MS = 5000;
const DAY_MS = 86400000;
const state = { token: sessionStorage.getItem("amigw-token") || "", role: null, name: null,
                meter: "", account: "", charts: {} };

const $ = (id) => document.getElementById(id);
const ROLE_ACTS = { operate: ["operate", "payments"], admin: ["operate", "payments"], payments: ["payments"] };

function showError(text) {
  const el = $("error");
  el.textContent = text || "";
  el.hidden = !text;
}

async function api(method, path, body) {
  const headers = { "Authorization": "Bearer " + state.token };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await resp.json().catch(() => null);
  if (!resp.ok) {
    const err = new Error((data && (data.error + ": " + data.detail)) || resp.statusText);
    err.status = resp.status;
    throw err;
  }
  return data;
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "-" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function fillTable(id, rows, render) {
  const body = $(id).querySelector("tbody");
  body.replaceChildren();
  for (const r of rows) {
    const tr = document.createElement("tr");
    render(tr, r);
    body.appendChild(tr);
  }
}

const fmtTime = (ms) => (ms ? new Date(ms).toLocaleString() : "-");
const pct = (v) => (v === null || v === undefined ? "-" : (100 * v).toFixed(1) + " %");

function chart(key, el, opts, data) {
  const old = state.charts[key];
  if (old && old.series.length === opts.series.length) {
    old.setData(data);
    return old;
  }
  if (old) old.destroy();
  el.replaceChildren();
  const width = Math.max(400, Math.min(1100, el.parentElement.clientWidth - 20));
  state.charts[key] = new uPlot(Object.assign({ width, height: 240 }, opts), data, el);
  return state.charts[key];
}

// -- fleet ------------------------------------------------------------------------------------
async function loadFleet() {
  const f = await api("GET", "/v1/fleet");
  $("fleet-summary").textContent =
    `${f.online} online, ${f.offline} offline, ${f.stale} stale`;
  fillTable("fleet", f.gateways, (tr, g) => {
    cell(tr, g.gateway);
    cell(tr, g.state, "state-" + g.state);
    cell(tr, g.age_s === null ? "-" : `${Math.round(g.age_s)} s ago`);
    cell(tr, pct(g.read_success_rate));
    cell(tr, g.outbox_pending);
    cell(tr, (g.buses_down || []).join(", ") || "none");
    cell(tr, g.loss ? g.loss.missing : "-");
  });
}

// -- collection -------------------------------------------------------------------------------
function isoDay(ms) {
  return new Date(ms + 8 * 3600000).toISOString().slice(0, 10);  // local days are UTC+8
}

async function loadCollection() {
  const now = Date.now();
  const c = await api("GET", `/v1/collection?from=${isoDay(now - 6 * DAY_MS)}&to=${isoDay(now)}&by=gateway`);
  fillTable("collection", c.groups, (tr, g) => {
    cell(tr, g.id); cell(tr, g.received); cell(tr, g.expected); cell(tr, g.estimated);
    cell(tr, (g.rate_bp / 100).toFixed(2) + " %");
  });
  const days = [...new Set(c.groups.flatMap((g) => g.days.map((d) => d.day)))].sort();
  if (!days.length) return;
  const xs = days.map((d) => Date.parse(d + "T00:00:00+08:00") / 1000);
  const series = [{}];
  const data = [xs];
  c.groups.forEach((g, i) => {
    const byDay = Object.fromEntries(g.days.map((d) => [d.day, d.rate_bp / 100]));
    series.push({ label: g.id, stroke: `hsl(${(i * 67) % 360} 65% 42%)`, width: 2, points: { show: true } });
    data.push(days.map((d) => (d in byDay ? byDay[d] : null)));
  });
  chart("collection", $("collection-chart"), { series, axes: [{}, { label: "success %" }] }, data);
}

// -- a meter ----------------------------------------------------------------------------------
async function loadMeter() {
  if (!state.meter) return;
  const span = Number($("meter-range").value) * 1000;
  const end = Date.now();
  const m = encodeURIComponent(state.meter);
  const [curve, latest] = await Promise.all([
    api("GET", `/v1/meters/${m}/load-curve?start_ms=${end - span}&end_ms=${end}`),
    api("GET", `/v1/meters/${m}/latest`),
  ]);
  const xs = curve.intervals.map((r) => r.ts_ms / 1000);
  const kwh = curve.intervals.map((r) => r.kwh);
  const est = curve.intervals.map((r) => (r.estimated ? r.kwh : null));
  const flagged = curve.intervals.map((r) => (r.flags && !r.estimated ? r.kwh : null));
  chart("load", $("load-chart"), {
    series: [{}, { label: "kWh per interval", stroke: "#2b6cb0", width: 2 },
             { label: "estimated", stroke: "#b35c00", width: 0, points: { show: true, size: 9, fill: "#b35c00" } },
             { label: "flagged", stroke: "#b00020", width: 0, points: { show: true, size: 9, fill: "#b00020" } }],
    axes: [{}, { label: "kWh" }],
  }, [xs, kwh, est, flagged]);
  $("load-summary").textContent =
    `${curve.count} intervals of ${curve.meter}, ${curve.estimated} estimated`;
  fillTable("latest", latest.quantities, (tr, q) => {
    cell(tr, q.quantity); cell(tr, q.value); cell(tr, q.unit); cell(tr, fmtTime(q.ts_ms));
    cell(tr, (q.flag_names || []).join(" ") || "ok", q.flags ? "flagged" : "");
  });
}

// -- alarms -----------------------------------------------------------------------------------
async function loadAlarms() {
  const end = Date.now();
  const a = await api("GET", `/v1/alarms?start_ms=${end - 7 * DAY_MS}&end_ms=${end}`);
  const canAck = (ROLE_ACTS[state.role] || []).includes("operate");
  fillTable("alarms", a.alarms, (tr, al) => {
    cell(tr, fmtTime(al.ts_ms)); cell(tr, al.kind);
    cell(tr, [al.area, al.gateway, al.meter].filter(Boolean).join(" / "));
    cell(tr, typeof al.detail === "string" ? al.detail : JSON.stringify(al.detail));
    const td = cell(tr, al.ack ? `by ${al.ack.by}` : "");
    if (!al.ack && canAck) {
      const b = document.createElement("button");
      b.textContent = "Acknowledge";
      b.className = "ack";
      b.onclick = () => act(() => api("POST", `/v1/alarms/${encodeURIComponent(al.id)}/ack`, { note: "" }),
                            `alarm ${al.id} acknowledged`);
      td.appendChild(b);
    }
  });
}

// -- an account -------------------------------------------------------------------------------
async function loadAccount() {
  if (!state.account) return;
  const id = encodeURIComponent(state.account);
  const [acc, journal] = await Promise.all([
    api("GET", `/v1/accounts/${id}`),
    api("GET", `/v1/accounts/${id}/journal?limit=1000`),
  ]);
  $("account-view").hidden = false;
  const meters = acc.meters.map((m) => `${m.meter} (relay ${m.relay})`).join(", ");
  $("account-summary").textContent =
    `${acc.account}: balance ${acc.balance_fen} fen, level ${acc.level}, tariff ${acc.tariff}` +
    `${acc.protected ? ", protected" : ""}; meters ${meters}`;
  // the balance after each row, from the balance now backwards
  const rows = journal.entries;
  let after = acc.balance_fen;
  const balance = new Array(rows.length);
  for (let i = rows.length - 1; i >= 0; i--) {
    balance[i] = after;
    after -= rows[i].amount_fen || 0;
  }
  const xs = rows.map((r) => r.ts_ms / 1000);
  const mark = (pred) => rows.map((r, i) => (pred(r) ? balance[i] : null));
  chart("balance", $("balance-chart"), {
    series: [{}, { label: "balance (fen)", stroke: "#2b6cb0", width: 2 },
             { label: "payments", stroke: "#137333", width: 0, points: { show: true, size: 10, fill: "#137333" } },
             { label: "trips", stroke: "#b00020", width: 0, points: { show: true, size: 10, fill: "#b00020" } },
             { label: "restores", stroke: "#6b46c1", width: 0, points: { show: true, size: 10, fill: "#6b46c1" } }],
    axes: [{}, { label: "fen" }],
  }, [xs, balance, mark((r) => r.kind === "payment"),
      mark((r) => r.kind === "decision" && r.code === "TRIP_ISSUED"),
      mark((r) => r.kind === "decision" && r.code === "RESTORE_ISSUED")]);
  fillTable("journal", rows.slice(-50).reverse(), (tr, r) => {
    cell(tr, fmtTime(r.ts_ms)); cell(tr, r.kind); cell(tr, r.code); cell(tr, r.meter);
    cell(tr, r.energy_centi_kwh === null || r.energy_centi_kwh === undefined ? null : (r.energy_centi_kwh / 100).toFixed(2));
    cell(tr, r.amount_fen); cell(tr, r.ref);
  });
  const acts = ROLE_ACTS[state.role] || [];
  $("pay-form").hidden = !acts.includes("payments");
  const relay = $("relay-actions");
  relay.replaceChildren();
  if (acts.includes("operate")) {
    for (const m of acc.meters) {
      for (const action of ["trip", "restore"]) {
        const b = document.createElement("button");
        b.textContent = `${action === "trip" ? "Trip" : "Restore"} ${m.meter}`;
        b.className = action;
        b.onclick = () => act(() => api("POST", `/v1/meters/${encodeURIComponent(m.meter)}/relay`,
                                        { action, reason: "operator, from the console" }),
                              `${action} of ${m.meter} issued`);
        relay.appendChild(b);
      }
    }
  }
}

async function act(call, done) {
  try {
    const res = await call();
    $("action-result").textContent = done + (res && res.balance_fen !== undefined ? `: balance ${res.balance_fen} fen` : "");
    showError("");
    await refresh();
  } catch (e) {
    showError(e.message);
  }
}

async function pay(event) {
  event.preventDefault();
  const amount = Number($("pay-amount").value);
  const paymentId = "console-" + Date.now() + "-" + Math.random().toString(16).slice(2, 8);
  await act(() => api("POST", "/v1/payments", { account: state.account, payment_id: paymentId, amount_fen: amount }),
            `payment ${paymentId} of ${amount} fen recorded`);
}

// -- refresh loop -----------------------------------------------------------------------------
async function refresh() {
  if (!state.role) return;
  const jobs = [loadFleet(), loadCollection(), loadAlarms(), loadMeter(), loadAccount()];
  const results = await Promise.allSettled(jobs);
  const failed = results.filter((r) => r.status === "rejected").map((r) => r.reason.message);
  showError(failed.length ? failed.join("; ") : "");
  document.body.dataset.refreshed = String(Date.now());
}

async function signIn(event) {
  if (event) event.preventDefault();
  state.token = $("token").value.trim() || state.token;
  try {
    const me = await api("GET", "/v1/whoami");
    state.role = me.role;
    state.name = me.name;
    sessionStorage.setItem("amigw-token", state.token);
    $("who").textContent = `signed in as ${me.name} (${me.role})`;
    document.body.dataset.role = me.role;
    await refresh();
  } catch (e) {
    state.role = null;
    showError("sign-in failed: " + e.message);
  }
}

function init() {
  const params = new URLSearchParams(location.search);
  const frag = new URLSearchParams(location.hash.slice(1));
  if (frag.get("token")) {
    state.token = frag.get("token");
    history.replaceState(null, "", location.pathname + location.search);
  }
  state.meter = params.get("meter") || "";
  state.account = params.get("account") || "";
  $("meter").value = state.meter;
  $("account").value = state.account;
  $("login").addEventListener("submit", signIn);
  $("meter-form").addEventListener("submit", (e) => { e.preventDefault(); state.meter = $("meter").value.trim(); refresh(); });
  $("meter-range").addEventListener("change", () => refresh());
  $("account-form").addEventListener("submit", (e) => { e.preventDefault(); state.account = $("account").value.trim(); refresh(); });
  $("pay-form").addEventListener("submit", pay);
  if (state.token) signIn();
  setInterval(refresh, REFRESH_MS);
}

init();
