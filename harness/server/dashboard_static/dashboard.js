// The harness dashboard. Every value from the results goes into the page through textContent or an attribute,
// never as markup; labels handed to plotly have their markup characters escaped (plotly reads a few tags).
"use strict";

const POLL_MS = 2000;
let version = null;
let selected = null; // the sweep folder shown
let sweep = null; // its data
let runsCache = [];

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

function plotText(s) {
  return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

function fmt(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  const a = Math.abs(x);
  if (a !== 0 && (a < 0.01 || a >= 1e5)) return x.toExponential(2);
  return a >= 100 ? x.toFixed(0) : a >= 10 ? x.toFixed(1) : x.toFixed(3);
}

async function api(path) {
  const response = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  if (response.status === 401) {
    window.location.assign("/dashboard/");
    throw new Error("unauthorized");
  }
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function renderRuns(runs) {
  runsCache = runs;
  const rows = runs.map((r) => {
    const tr = el("tr", null, { class: "clickable", "data-folder": r.folder });
    tr.append(el("td", r.started_utc), el("td", r.folder, { class: "mono" }), el("td", r.points, { class: "num" }),
      el("td", r.ok, { class: "num ok" }), el("td", r.failed, { class: r.failed ? "num failed" : "num" }),
      el("td", (r.git_commits || []).map((c) => c.slice(0, 10)).join(", ") || "–", { class: "mono" }),
      el("td", r.command, { class: "mono" }));
    if (r.folder === selected) tr.classList.add("selected");
    tr.addEventListener("click", () => selectSweep(r.folder));
    return tr;
  });
  fill(document.querySelector("#runs tbody"), rows);
  for (const id of ["compare-a", "compare-b"]) {
    const select = document.getElementById(id);
    const keep = select.value;
    select.replaceChildren(...runs.map((r) => el("option", r.folder, { value: r.folder })));
    if (keep) select.value = keep;
  }
  if (runs.length > 1 && !document.getElementById("compare-b").dataset.touched) {
    document.getElementById("compare-a").value = runs[runs.length - 2].folder;
    document.getElementById("compare-b").value = runs[runs.length - 1].folder;
  }
}

function renderJobs(jobs) {
  fill(document.querySelector("#jobs tbody"), jobs.map((j) => {
    const tr = el("tr");
    const point = Object.entries(j.point || {}).map(([k, v]) => `${k}=${v}`).join(" ");
    tr.append(el("td", j.id, { class: "mono" }), el("td", j.status, { class: j.status === "failed" ? "failed" : "" }),
      el("td", point), el("td", j.submitted ? new Date(j.submitted * 1000).toISOString() : ""),
      el("td", j.folder, { class: "mono" }));
    return tr;
  }));
}

function firstCase(metrics, name) {
  const key = Object.keys(metrics).find((k) => k === name || k.startsWith(name + "["));
  return key ? metrics[key] : null;
}

function renderSweep() {
  const section = document.getElementById("sweep-section");
  section.hidden = false;
  document.getElementById("sweep-name").textContent = sweep.folder;
  document.getElementById("sweep-command").textContent = sweep.command;
  const head = el("tr");
  head.append(el("th", "status"), el("th", "point"));
  for (const m of sweep.headline) head.append(el("th", m));
  head.append(el("th", "error"));
  document.querySelector("#points thead").replaceChildren(head);
  fill(document.querySelector("#points tbody"), sweep.points.map((p) => {
    const tr = el("tr", null, { "data-folder": p.folder });
    tr.append(el("td", p.status, { class: p.status === "ok" ? "ok" : "failed" }), el("td", p.label));
    for (const m of sweep.headline) {
      const s = firstCase(p.metrics, m);
      tr.append(el("td", s ? `${fmt(s.mean)}${s.ci95 ? " ±" + fmt(s.ci95) : ""} ${s.unit || ""}` : "–", { class: "num" }));
    }
    tr.append(el("td", p.error || "", { class: "failed" }));
    return tr;
  }));
  const names = [...new Set(sweep.points.flatMap((p) => Object.keys(p.metrics).map((k) => k.split("[")[0])))].sort();
  const metric = document.getElementById("metric");
  const keep = metric.value;
  metric.replaceChildren(...names.map((n) => el("option", n, { value: n })));
  metric.value = names.includes(keep) ? keep : (sweep.headline[0] || names[0] || "");
  const picks = document.getElementById("point-picks");
  const unchecked = new Set([...picks.querySelectorAll("input:not(:checked)")].map((i) => i.value));
  picks.replaceChildren(el("legend", "points"), ...sweep.points.map((p) => {
    const box = el("input", null, { type: "checkbox", value: p.folder });
    box.checked = !unchecked.has(p.folder);
    box.addEventListener("change", drawChart);
    const label = el("label");
    label.append(box, document.createTextNode(" " + p.label));
    return label;
  }));
  const link = document.getElementById("report-link");
  link.replaceChildren();
  if (sweep.report) {
    link.append(el("a", "the sweep's report", { href: "/dashboard/files/" + encodePath(sweep.report), target: "_blank",
      rel: "noopener" }));
  }
  document.getElementById("plots").replaceChildren(...sweep.plots.map((p) => el("img", null,
    { src: "/dashboard/files/" + encodePath(p), alt: p, loading: "lazy" })));
  drawChart();
}

function encodePath(path) {
  return path.split("/").map(encodeURIComponent).join("/");
}

function drawChart() {
  if (!sweep || typeof Plotly === "undefined") return;
  const name = document.getElementById("metric").value;
  const chosen = new Set([...document.querySelectorAll("#point-picks input:checked")].map((i) => i.value));
  const traces = [];
  let unit = "";
  for (const p of sweep.points) {
    if (!chosen.has(p.folder)) continue;
    const keys = Object.keys(p.metrics).filter((k) => k.split("[")[0] === name);
    if (!keys.length) continue;
    const cases = keys.map((k) => (k.includes("[") ? k.slice(k.indexOf("[") + 1, -1) : "(point)"));
    unit = p.metrics[keys[0]].unit || unit;
    traces.push({
      type: "bar", name: plotText(p.label), x: cases.map(plotText), y: keys.map((k) => p.metrics[k].mean),
      error_y: { type: "data", array: keys.map((k) => p.metrics[k].ci95 || 0), visible: true },
      hovertemplate: "%{x}: %{y:.4g} ± %{error_y.array:.2g}<extra>%{fullData.name}</extra>",
    });
  }
  const layout = { barmode: "group", margin: { t: 30 }, yaxis: { title: { text: plotText(`${name} (${unit})`) } },
    legend: { orientation: "h" } };
  Plotly.react("chart", traces, layout, { responsive: true, displaylogo: false });
  document.getElementById("chart").dataset.traces = String(traces.length);
}

async function selectSweep(folder) {
  selected = folder;
  for (const tr of document.querySelectorAll("#runs tbody tr")) {
    tr.classList.toggle("selected", tr.dataset.folder === folder);
  }
  sweep = await api("/dashboard/api/sweep?folder=" + encodeURIComponent(folder));
  renderSweep();
}

async function compare() {
  document.getElementById("compare-b").dataset.touched = "1";
  const a = document.getElementById("compare-a").value;
  const b = document.getElementById("compare-b").value;
  const data = await api(`/dashboard/api/compare?a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}`);
  fill(document.querySelector("#compare tbody"), data.rows.map((r) => {
    const tr = el("tr");
    tr.append(el("td", r.point), el("td", `${r.metric} (${r.unit})`, { class: "mono" }),
      el("td", `${fmt(r.a)} ±${fmt(r.a_ci)}`, { class: "num" }), el("td", `${fmt(r.b)} ±${fmt(r.b_ci)}`, { class: "num" }),
      el("td", fmt(r.delta_pct), { class: "num" }), el("td", r.significant ? "yes" : "no"));
    return tr;
  }));
  document.getElementById("compare").dataset.rows = String(data.rows.length);
}

async function poll() {
  try {
    const now = await api("/dashboard/api/state");
    document.getElementById("status").textContent =
      `${now.runs.length} run(s), ${now.jobs.length} job(s); checked ${new Date().toLocaleTimeString()}`;
    if (now.version !== version) {
      version = now.version;
      renderRuns(now.runs);
      renderJobs(now.jobs);
      if (selected === null && now.runs.length) selected = now.runs[now.runs.length - 1].folder;
      if (selected !== null) await selectSweep(selected);
      document.body.dataset.version = version;
    }
  } catch (error) {
    document.getElementById("status").textContent = `not updated: ${error.message}`;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

document.getElementById("metric").addEventListener("change", drawChart);
document.getElementById("compare-go").addEventListener("click", compare);
poll();
