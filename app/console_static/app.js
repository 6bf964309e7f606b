// spade-stream operator console. No framework, no CDN; all data comes from the console's JSON API.
"use strict";

const RED = "rgb(230, 40, 40)", CYAN = "rgb(80, 220, 255)", YELLOW = "rgb(255, 210, 0)";
const PREVIEW_MS = 500, CAMERAS_MS = 1000, SPARK_MS = 3000, SPARK_SECONDS = 300;
const $ = (id) => document.getElementById(id);
const state = { cameras: new Map(), alerts: new Map(), next: null, detail: null };

function csrf() {
  const m = document.cookie.match(/(?:^|;\s*)spade_csrf=([A-Za-z0-9_-]+)/);
  return m ? m[1] : "";
}

async function api(path, opts = {}) {
  const init = { credentials: "same-origin", ...opts };
  if (init.method && init.method !== "GET") init.headers = { "X-CSRF-Token": csrf(), ...(init.headers || {}) };
  const res = await fetch(path, init);
  if (res.status === 401) { location.href = "/login"; throw new Error("login required"); }
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(body.error || res.statusText);
  return body;
}

function fmtTime(ts) {
  if (ts == null) return "";
  const d = new Date(ts * 1000), now = new Date();
  const t = d.toLocaleTimeString([], { hour12: false });
  return d.toDateString() === now.toDateString() ? t : `${d.toLocaleDateString()} ${t}`;
}
function fmtNum(x, n = 3) { return x == null ? "n/a" : Number(x).toFixed(n); }
function fmtDur(s) {
  if (s == null) return "";
  if (s < 60) return `${s.toFixed(1)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

// -- cameras -----------------------------------------------------------------------------------------
function cameraCard(name) {
  const node = $("camera-card").content.firstElementChild.cloneNode(true);
  node.querySelector(".cam-name").textContent = name;
  const img = node.querySelector("img"), box = node.querySelector(".preview");
  const cam = { name, node, img, box, loading: false, points: [], latest: null };
  img.addEventListener("load", () => { cam.loading = false; box.classList.remove("missing"); });
  img.addEventListener("error", () => { cam.loading = false; box.classList.add("missing"); });
  $("cameras").appendChild(node);
  return cam;
}

function renderCamera(cam, c) {
  const badge = cam.node.querySelector(".state");
  badge.textContent = c.state;
  badge.className = `badge state ${c.state}`;
  cam.node.querySelector(".since").textContent = c.since ? `since ${fmtTime(c.since)}` : "";
  const score = cam.node.querySelector(".score");
  const f = c.latest;
  cam.latest = f;
  if (f) {
    score.textContent = `score ${fmtNum(f.score)} / thr ${fmtNum(f.threshold)}`;
    score.classList.toggle("hot", !!f.is_anomalous);
  } else {
    score.textContent = "no frames yet";
    score.classList.remove("hot");
  }
  cam.node.classList.toggle("anomalous", !!(f && f.is_anomalous && f.age_s < 5));
  if (!c.preview) cam.box.classList.add("missing");
}

async function pollCameras() {
  try {
    const { cameras } = await api("/api/cameras");
    for (const c of cameras) {
      let cam = state.cameras.get(c.name);
      if (!cam) { cam = cameraCard(c.name); state.cameras.set(c.name, cam); addCameraOption(c.name); refreshSpark(cam); }
      renderCamera(cam, c);
    }
    $("no-cameras").hidden = cameras.length > 0;
    $("stat-cameras").textContent = `${cameras.length} camera${cameras.length === 1 ? "" : "s"}`;
  } catch (e) { /* shown by the live indicator; retried */ }
}

function refreshPreviews() {
  for (const cam of state.cameras.values()) {
    if (cam.loading || cam.box.classList.contains("missing") && Math.random() < 0.7) continue;
    cam.loading = true;
    cam.img.src = `/api/cameras/${encodeURIComponent(cam.name)}/preview.jpg?t=${Date.now()}`;
  }
}

async function refreshSpark(cam) {
  try {
    const r = await api(`/api/cameras/${encodeURIComponent(cam.name)}/scores?seconds=${SPARK_SECONDS}&points=150`);
    // a camera that started lately: its own span, not a mostly empty window
    const t0 = r.points.length ? Math.max(r.now - r.seconds, r.points[0][0] - 2) : r.now - r.seconds;
    drawSeries(cam.node.querySelector(".spark"), r.points, t0, r.now, { thin: true });
  } catch (e) { /* retried */ }
}

function addCameraOption(name) {
  const sel = $("f-camera");
  if ([...sel.options].some((o) => o.value === name)) return;
  const o = document.createElement("option");
  o.value = name; o.textContent = name;
  sel.appendChild(o);
}

// Score (cyan, red where >= threshold) and threshold (yellow) over [t0, t1].
function drawSeries(canvas, points, t0, t1, opts = {}) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
  canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const pad = opts.thin ? 2 : 8;
  const pts = points.filter((p) => p[1] != null);
  if (!pts.length) {
    g.fillStyle = "#8d97a8"; g.font = "11px sans-serif"; g.fillText("no scores", pad, h / 2 + 4);
    return;
  }
  let lo = Infinity, hi = -Infinity;
  for (const [, s, thr] of pts) { lo = Math.min(lo, s, thr ?? s); hi = Math.max(hi, s, thr ?? s); }
  const m = (hi - lo) * 0.1 || 0.1; lo -= m; hi += m;
  const x = (t) => pad + (w - 2 * pad) * (t - t0) / Math.max(1e-9, t1 - t0);
  const y = (v) => pad + (h - 2 * pad) * (hi - v) / (hi - lo);
  g.lineWidth = opts.thin ? 1 : 1.5;
  g.strokeStyle = YELLOW; g.setLineDash([4, 3]); g.beginPath();
  pts.forEach(([t, , thr], i) => { if (thr == null) return; i ? g.lineTo(x(t), y(thr)) : g.moveTo(x(t), y(thr)); });
  g.stroke(); g.setLineDash([]);
  for (let i = 1; i < pts.length; i++) {
    const [ta, sa] = pts[i - 1], [tb, sb, thr] = pts[i];
    g.strokeStyle = thr != null && sb >= thr ? RED : CYAN;
    g.beginPath(); g.moveTo(x(ta), y(sa)); g.lineTo(x(tb), y(sb)); g.stroke();
  }
  if (opts.mark) {
    g.fillStyle = "rgba(230, 40, 40, 0.15)";
    const a = x(opts.mark[0]), b = x(opts.mark[1] ?? t1);
    g.fillRect(a, 0, Math.max(2, b - a), h);
  }
}

// -- alerts ------------------------------------------------------------------------------------------
function filters() { return { camera: $("f-camera").value, state: $("f-state").value }; }
function matches(a) {
  const f = filters();
  return (!f.camera || a.camera === f.camera) && (!f.state || a.state === f.state);
}

function alertRow(a) {
  const node = $("alert-row").content.firstElementChild.cloneNode(true);
  node.dataset.id = a.alert_id;
  const thumb = node.querySelector(".thumb"), img = thumb.querySelector("img");
  img.addEventListener("error", () => thumb.classList.add("missing"));
  if (a.has_snapshot) img.src = `/api/alerts/${encodeURIComponent(a.alert_id)}/snapshot.jpg`;
  else thumb.classList.add("missing");
  node.addEventListener("click", (e) => { if (!e.target.closest("button")) openDetail(a.alert_id); });
  node.querySelector(".a-ack").addEventListener("click", () => act(a.alert_id, "ack"));
  node.querySelector(".a-fa").addEventListener("click", () => act(a.alert_id, "false-alarm"));
  return node;
}

function renderAlert(node, a) {
  node.querySelector(".a-camera").textContent = a.camera;
  const st = node.querySelector(".a-state");
  st.textContent = a.state; st.className = `badge a-state ${a.state}`;
  const v = node.querySelector(".a-verdict");
  const vt = a.verdict ? a.verdict.type : "";
  v.textContent = vt === "false_alarm" ? "false alarm" : vt === "ack" ? "acknowledged" : "";
  v.className = `badge a-verdict ${vt}`;
  const dur = a.end_ts != null ? ` \u2192 ${fmtTime(a.end_ts)} (${fmtDur(a.end_ts - a.start_ts)})` : " \u2192 ongoing";
  node.querySelector(".a-time").textContent = fmtTime(a.start_ts) + dur;
  node.querySelector(".a-peak").textContent = `peak ${fmtNum(a.peak_score)}`;
  node.classList.toggle("is-open", a.state === "open");
  node.querySelector(".a-ack").disabled = !!vt;
  node.querySelector(".a-fa").disabled = vt === "false_alarm";
  if (a.has_snapshot && node.querySelector(".thumb").classList.contains("missing") && !node.dataset.retried) {
    node.dataset.retried = "1";
    node.querySelector(".thumb").classList.remove("missing");
    node.querySelector(".thumb img").src = `/api/alerts/${encodeURIComponent(a.alert_id)}/snapshot.jpg?t=${Date.now()}`;
  }
}

function upsertAlert(a, top) {
  const old = state.alerts.get(a.alert_id);
  if (old) { old.data = a; renderAlert(old.node, a); }
  else if (matches(a)) {
    const node = alertRow(a);
    renderAlert(node, a);
    const list = $("alerts");
    if (top) { list.insertBefore(node, list.firstChild); node.classList.add("fresh"); }
    else list.appendChild(node);
    state.alerts.set(a.alert_id, { data: a, node });
  }
  $("no-alerts").hidden = state.alerts.size > 0;
  updateOpenCount();
  if (state.detail === a.alert_id) openDetail(a.alert_id, true);
}

function updateOpenCount() {
  const n = [...state.alerts.values()].filter((x) => x.data.state === "open").length;
  const pill = $("stat-open");
  pill.textContent = `${n} open alert${n === 1 ? "" : "s"}`;
  pill.classList.toggle("alarm", n > 0);
}

async function loadAlerts(reset) {
  const f = filters();
  const q = new URLSearchParams({ limit: "30" });
  if (f.camera) q.set("camera", f.camera);
  if (f.state) q.set("state", f.state);
  if (!reset && state.next) q.set("before", state.next);
  try {
    const r = await api(`/api/alerts?${q}`);
    if (reset) { state.alerts.clear(); $("alerts").replaceChildren(); }
    for (const a of r.alerts) { addCameraOption(a.camera); upsertAlert(a, false); }
    state.next = r.next_before;
    $("more").hidden = !r.next_before;
    $("no-alerts").hidden = state.alerts.size > 0;
  } catch (e) { /* retried on reconnect */ }
}

async function act(id, kind) {
  try {
    const r = await api(`/api/alerts/${encodeURIComponent(id)}/${kind}`, { method: "POST" });
    const cur = state.alerts.get(id);
    if (cur) { cur.data.verdict = r.verdict; renderAlert(cur.node, cur.data); }
    if (state.detail === id) openDetail(id, true);
  } catch (e) { alert(`Could not record it: ${e.message}`); }
}

// -- detail ------------------------------------------------------------------------------------------
function fact(dl, k, v) {
  const dt = document.createElement("dt"), dd = document.createElement("dd");
  dt.textContent = k; dd.textContent = v; dl.append(dt, dd);
}

async function openDetail(id, refresh) {
  let a;
  try { a = await api(`/api/alerts/${encodeURIComponent(id)}`); } catch (e) { return; }
  state.detail = id;
  if (!refresh && location.hash !== `#/alert/${id}`) history.replaceState(null, "", `#/alert/${id}`);
  $("detail").hidden = false;
  $("d-title").textContent = `Alert ${a.alert_id}`;
  const dl = $("d-facts"); dl.replaceChildren();
  fact(dl, "camera", a.camera);
  fact(dl, "state", a.state + (a.reason ? ` (${a.reason})` : ""));
  fact(dl, "start", fmtTime(a.start_ts));
  fact(dl, "end", a.end_ts != null ? `${fmtTime(a.end_ts)} (${fmtDur(a.end_ts - a.start_ts)})` : "ongoing");
  if (a.start_media_ts != null) fact(dl, "in file", `${fmtNum(a.start_media_ts, 2)} s \u2192 ${fmtNum(a.end_media_ts, 2)} s`);
  fact(dl, "peak score", fmtNum(a.peak_score));
  fact(dl, "regions", String(a.peak_regions.length));
  fact(dl, "verdict", a.verdict ? `${a.verdict.type === "ack" ? "acknowledged" : "false alarm"} ${fmtTime(a.verdict.ts)}` : "none");
  $("d-ack").disabled = !!a.verdict;
  $("d-fa").disabled = !!(a.verdict && a.verdict.type === "false_alarm");
  const clip = $("d-clip");
  clip.hidden = !a.clip_url;
  if (a.clip_url) clip.href = a.clip_url;
  const hist = $("d-history"); hist.replaceChildren();
  for (const h of a.history) {
    const li = document.createElement("li");
    li.textContent = `${h.type} \u00b7 frame ${h.frame_index} \u00b7 peak ${fmtNum(h.peak_score)}${h.reason ? " \u00b7 " + h.reason : ""}`;
    hist.appendChild(li);
  }
  drawSnapshot(a);
  const tl = a.timeline;
  $("d-notimeline").hidden = tl.length > 0;
  $("d-timeline").hidden = tl.length === 0;
  if (tl.length) drawSeries($("d-timeline"), tl, tl[0][0], tl[tl.length - 1][0], { mark: [a.start_ts, a.end_ts] });
}

function drawSnapshot(a) {
  const canvas = $("d-snapshot");
  $("d-nosnap").hidden = !!a.snapshot_url;
  canvas.hidden = !a.snapshot_url;
  if (!a.snapshot_url) return;
  const img = new Image();
  img.addEventListener("load", () => {
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    const g = canvas.getContext("2d");
    g.drawImage(img, 0, 0);
    const lw = Math.max(2, Math.round(img.naturalHeight / 240));
    g.lineWidth = lw; g.strokeStyle = RED; g.fillStyle = RED;
    g.font = `${Math.max(11, Math.round(img.naturalHeight / 28))}px sans-serif`;
    for (const r of a.peak_regions) {
      const [x1, y1, x2, y2, peak] = r;
      g.strokeRect(x1, y1, x2 - x1, y2 - y1);
      const label = peak == null ? "" : Number(peak).toFixed(2);
      if (label) {
        const tw = g.measureText(label).width + 6, th = parseInt(g.font, 10) + 4;
        const ty = y2 + th <= img.naturalHeight ? y2 : Math.max(0, y1 - th);
        g.fillRect(x1, ty, tw, th);
        g.fillStyle = "#fff"; g.fillText(label, x1 + 3, ty + th - 4); g.fillStyle = RED;
      }
    }
  });
  img.src = `${a.snapshot_url}?t=${Date.now()}`;
}

function closeDetail() {
  $("detail").hidden = true;
  state.detail = null;
  if (location.hash) history.replaceState(null, "", location.pathname);
}

function route() {
  const m = location.hash.match(/^#\/alert\/([A-Za-z0-9_.-]+)$/);
  if (m) openDetail(m[1]); else if (state.detail) closeDetail();
}

// -- live events -------------------------------------------------------------------------------------
function connectEvents() {
  const live = $("live");
  const es = new EventSource("/api/events");
  es.addEventListener("open", () => { live.textContent = "live"; live.className = "pill live-on"; loadAlerts(true); });
  es.addEventListener("error", () => { live.textContent = "reconnecting\u2026"; live.className = "pill live-off"; });
  es.addEventListener("alert", (e) => { const a = JSON.parse(e.data); addCameraOption(a.camera); upsertAlert(a, true); });
  es.addEventListener("verdict", (e) => {
    const v = JSON.parse(e.data), cur = state.alerts.get(v.alert_id);
    if (cur && !(cur.data.verdict && cur.data.verdict.type === "false_alarm" && v.type === "ack")) {
      cur.data.verdict = v; renderAlert(cur.node, cur.data);
    }
  });
  es.addEventListener("status", () => pollCameras());
  es.addEventListener("redis", (e) => {
    const up = JSON.parse(e.data).up;
    live.textContent = up ? "live" : "redis down"; live.className = `pill ${up ? "live-on" : "live-off"}`;
  });
}

document.addEventListener("DOMContentLoaded", () => {
  $("f-camera").addEventListener("change", () => loadAlerts(true));
  $("f-state").addEventListener("change", () => loadAlerts(true));
  $("more").addEventListener("click", () => loadAlerts(false));
  $("d-close").addEventListener("click", closeDetail);
  $("detail").addEventListener("click", (e) => { if (e.target === $("detail")) closeDetail(); });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") closeDetail(); });
  $("d-ack").addEventListener("click", () => state.detail && act(state.detail, "ack"));
  $("d-fa").addEventListener("click", () => state.detail && act(state.detail, "false-alarm"));
  $("logout").addEventListener("click", async () => {
    try { await api("/logout", { method: "POST" }); } catch (e) { /* ignore */ }
    location.href = "/login";
  });
  window.addEventListener("hashchange", route);
  pollCameras();
  loadAlerts(true);
  connectEvents();
  route();
  setInterval(pollCameras, CAMERAS_MS);
  setInterval(refreshPreviews, PREVIEW_MS);
  setInterval(() => state.cameras.forEach(refreshSpark), SPARK_MS);
});
