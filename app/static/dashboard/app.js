/* LMForge dashboard: one page, no build step, no third-party code but uPlot (vendored).
 *
 * Routes (location.hash): "#/" jobs table, "#/jobs/<id>" one job, "#/new" upload + submit.
 * Every /v1 request carries "Authorization: Bearer <key>"; the key is asked for once (on the
 * first 401) and kept in sessionStorage (this tab only, gone when it closes).
 * A job page follows GET /v1/jobs/{id}/events (Server-Sent Events) read with fetch(), which,
 * unlike EventSource, can send the Authorization header; it reconnects with Last-Event-ID,
 * and falls back to polling GET /v1/jobs/{id}/metrics on an API without the event route.
 * All text from the API is put into the page with textContent, never as HTML.
 */
"use strict";

(function () {
  const KEY_STORAGE = "lmforge.apiKey";
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const REFRESH_MS = 3000;
  const RETRY_MS = 2000;

  // -- small DOM helpers ----------------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  const view = () => document.getElementById("view");
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  function fmt(x, digits) {
    if (x === null || x === undefined || Number.isNaN(x)) return "—";
    if (typeof x !== "number") return String(x);
    if (Number.isInteger(x) && digits === undefined) return x.toLocaleString("en-US");
    const a = Math.abs(x);
    if (a !== 0 && (a < 1e-3 || a >= 1e6)) return x.toExponential(2);
    return x.toFixed(digits === undefined ? 3 : digits);
  }

  function fmtBytes(n) {
    if (n === null || n === undefined) return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return `${i === 0 ? n : n.toFixed(1)} ${units[i]}`;
  }

  function fmtAge(iso) {
    if (!iso) return "—";
    const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    if (s < 60) return `${Math.floor(s)} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return `${Math.floor(s / 86400)} d ago`;
  }

  function fmtDuration(s) {
    if (s === null || s === undefined) return "—";
    s = Math.round(s);
    const hh = Math.floor(s / 3600), mm = Math.floor((s % 3600) / 60), ss = s % 60;
    return hh ? `${hh}:${String(mm).padStart(2, "0")}:${String(ss).padStart(2, "0")}`
      : `${mm}:${String(ss).padStart(2, "0")}`;
  }

  // A queued job that no live worker serves: what it waits for ("cuda", "worker x2", ...).
  function waitingText(job) {
    return job.status === "queued" && job.waiting_for ? `waiting for ${job.waiting_for}` : null;
  }

  function statusBadge(status, extra) {
    return h("span", { class: `badge status-${status}`, "data-status": status },
      status + (extra ? ` (${extra})` : ""));
  }

  function progressBar(p) {
    const total = p.total_steps || 0, step = p.step || 0;
    const pct = total ? Math.min(100, (100 * step) / total) : 0;
    const bar = h("div", { class: "progress", role: "progressbar", "aria-valuemin": 0,
      "aria-valuemax": total, "aria-valuenow": step });
    const fill = h("div", { class: "fill" });
    fill.style.width = `${pct.toFixed(1)}%`;
    bar.append(fill);
    return h("div", { class: "progress-cell" }, bar,
      h("span", { class: "muted small" }, `${fmt(step)} / ${fmt(total)}`));
  }

  // -- messages -------------------------------------------------------------------------------

  function showBanner(message, kind) {
    const b = document.getElementById("banner");
    b.textContent = message;
    b.className = `banner ${kind || "error"}`;
    b.hidden = false;
  }

  function clearBanner() {
    const b = document.getElementById("banner");
    b.hidden = true;
    b.textContent = "";
  }

  // -- the API --------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, body, requestId) {
      const e = (body && body.error) || {};
      super(e.message || `HTTP ${status}`);
      this.status = status;
      this.code = e.code || `http_${status}`;
      this.field = e.field || null;
      this.details = e.details || [];
      this.requestId = requestId || e.request_id || null;
    }

    describe() {
      let s = `${this.status} ${this.code}: ${this.message}`;
      if (this.field) s += ` (field: ${this.field})`;
      if (this.requestId && this.status >= 500) s += ` [request ${this.requestId}]`;
      return s;
    }
  }

  const getKey = () => sessionStorage.getItem(KEY_STORAGE);

  function authHeaders(extra) {
    const headers = Object.assign({}, extra || {});
    const key = getKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    return headers;
  }

  async function errorOf(resp) {
    let body = null;
    try { body = await resp.json(); } catch (_) { /* not JSON */ }
    return new ApiError(resp.status, body, resp.headers.get("X-Request-ID"));
  }

  async function api(path, opts) {
    opts = opts || {};
    const init = { method: opts.method || "GET", headers: authHeaders(opts.headers),
      cache: "no-store", signal: opts.signal };
    if (opts.json !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(opts.json);
    } else if (opts.body !== undefined) {
      init.body = opts.body;
    }
    const resp = await fetch(path, init);
    if (!resp.ok) {
      const err = await errorOf(resp);
      if (resp.status === 401) askForKey(err.message);
      throw err;
    }
    if (resp.status === 204) return null;
    return resp.json();
  }

  // -- the API key ----------------------------------------------------------------------------

  let keyPromptShown = false;

  function askForKey(reason) {
    if (keyPromptShown) return;
    keyPromptShown = true;
    stopPage();
    const hadKey = !!getKey();
    sessionStorage.removeItem(KEY_STORAGE);
    const input = h("input", { type: "password", id: "api-key", name: "api-key",
      autocomplete: "off", placeholder: "lmf_…", required: true, size: 48 });
    const form = h("form", { class: "card key-form", id: "key-form" },
      h("h2", { text: "API key" }),
      h("p", {}, "Every request of this dashboard needs an API key (",
        h("code", { text: "lmforge keys create --name NAME" }), " prints one). It is kept in ",
        "this browser tab only (sessionStorage) and sent as ",
        h("code", { text: "Authorization: Bearer" }), "."),
      h("label", { for: "api-key" }, "Key "), input, " ",
      h("button", { type: "submit", id: "use-key" }, "Use key"));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_STORAGE, key);
      keyPromptShown = false;
      clearBanner();
      route();
    });
    view().replaceChildren(form);
    if (hadKey) showBanner(`The API refused the key: ${reason || "401 Unauthorized"}`);
    input.focus();
  }

  function updateKeyButton() {
    document.getElementById("forget-key").hidden = !getKey();
  }

  // -- page lifecycle: each page registers what to stop when the user leaves it --------------

  let stoppers = [];

  function onLeave(fn) { stoppers.push(fn); }

  function stopPage() {
    const fns = stoppers;
    stoppers = [];
    for (const fn of fns) { try { fn(); } catch (_) { /* already stopped */ } }
  }

  function every(ms, fn) {
    let stopped = false;
    let timer = null;
    let failed = false;  // the banner shows this loop's last error until it succeeds again
    const loop = async () => {
      if (stopped) return;
      try {
        await fn();
        if (failed) { clearBanner(); failed = false; }
      } catch (e) {
        if (!(e instanceof ApiError && e.status === 401)) { showError(e); failed = true; }
      }
      if (!stopped) timer = setTimeout(loop, ms);
    };
    onLeave(() => { stopped = true; clearTimeout(timer); });
    loop();
  }

  function showError(e) {
    if (e && e.name === "AbortError") return;
    showBanner(e instanceof ApiError ? e.describe() : `Error: ${e && e.message ? e.message : e}`);
  }

  // -- jobs table -----------------------------------------------------------------------------

  // Best validation value per job id, cached for finished jobs (it no longer changes).
  const bestCache = new Map();

  function bestFromCheckpoints(job, ckpts) {
    // Each new best validation loss writes a "best" checkpoint whose metrics carry it.
    let bestLoss = null, bestF1 = null;
    for (const c of ckpts) {
      const m = c.metrics || {};
      if (typeof m.best_val_loss === "number" && (bestLoss === null || m.best_val_loss < bestLoss)) {
        bestLoss = m.best_val_loss;
      }
      if (typeof m.best_val_macro_f1 === "number" && (bestF1 === null || m.best_val_macro_f1 > bestF1)) {
        bestF1 = m.best_val_macro_f1;
      }
    }
    if ((job.spec || {}).task === "classify") return bestF1 === null ? "—" : `F1 ${fmt(bestF1)}`;
    return bestLoss === null ? "—" : fmt(Math.exp(bestLoss), 2);
  }

  async function bestValue(job) {
    if (bestCache.has(job.id)) return bestCache.get(job.id);
    if (job.status === "queued") return "—";
    const ckpts = (await api(`/v1/jobs/${encodeURIComponent(job.id)}/checkpoints`)).data;
    const value = bestFromCheckpoints(job, ckpts);
    if (TERMINAL.has(job.status)) bestCache.set(job.id, value);
    return value;
  }

  async function renderJobs() {
    const table = h("table", { class: "jobs", id: "jobs-table" },
      h("thead", {}, h("tr", {},
        h("th", { text: "Job" }), h("th", { text: "Status" }), h("th", { text: "Progress" }),
        h("th", { text: "Best val. perplexity", title: "exp(lowest validation loss); a " +
          "classifier: its best macro-F1" }),
        h("th", { text: "Tokens/s" }), h("th", { text: "Age" }))),
      h("tbody"));
    const empty = h("p", { class: "muted", id: "no-jobs", hidden: true },
      "No jobs yet. ", h("a", { href: "#/new" }, "Upload a dataset and submit one."));
    view().replaceChildren(
      h("div", { class: "title-row" }, h("h1", { text: "Jobs" }),
        h("a", { class: "button", href: "#/new" }, "New job")),
      table, empty);
    every(REFRESH_MS, async () => {
      const jobs = (await api("/v1/jobs?limit=100")).data;
      const rows = await Promise.all(jobs.map(async (job) => {
        let best = "…";
        try { best = await bestValue(job); } catch (e) { if (e.status === 401) throw e; best = "?"; }
        const lm = job.latest_metrics || {};
        const link = h("a", { href: `#/jobs/${job.id}` }, job.name || job.id);
        return h("tr", { "data-job-id": job.id },
          h("td", {}, link, h("div", { class: "muted small mono" }, job.id)),
          h("td", {}, statusBadge(job.status, job.cancel_requested && job.status === "running"
            ? "cancelling" : waitingText(job))),
          h("td", {}, progressBar(job.progress || {})),
          h("td", { class: "num best" }, best),
          h("td", { class: "num" }, job.status === "running" ? fmt(lm.tokens_per_s ?? lm.rollout_tokens_per_s, 0) : "—"),
          h("td", { title: job.created_at }, fmtAge(job.created_at)));
      }));
      table.tBodies[0].replaceChildren(...rows);
      empty.hidden = jobs.length > 0;
      table.hidden = jobs.length === 0;
    });
  }

  // -- charts ---------------------------------------------------------------------------------

  // One chart: x = optimizer step; series named by the metric keys they plot.
  function makeChart(container, title, series, opts) {
    const width = () => Math.max(280, container.clientWidth - 8);
    const u = new uPlot({
      title, width: width(), height: 220,
      legend: { live: false },  // the series' names only; no values under the cursor
      scales: { x: { time: false }, y: opts && opts.log ? { distr: 3 } : {} },
      axes: [{ label: "step" }, { label: (opts && opts.unit) || "" , size: 70 }],
      series: [{ label: "step" }].concat(series.map((s) => ({
        label: s.label, stroke: s.color, width: 1.5, spanGaps: true,
        points: { show: !!s.points, size: 5 },
      }))),
    }, [[]].concat(series.map(() => [])), container);
    // Follow the box's width (the grid reflows with the window and the number of columns).
    let last = width();
    const observer = new ResizeObserver(() => {
      const w = width();
      if (w !== last) { last = w; u.setSize({ width: w, height: 220 }); }
    });
    observer.observe(container);
    onLeave(() => { observer.disconnect(); u.destroy(); });
    return u;
  }

  // The charts of a job, by task: [id, title, series]; each series plots one metric key.
  const CHARTS = {
    lm: [
      ["loss", "Loss (cross-entropy, nats/token)", [
        { label: "train", key: "train_loss", color: "#2b6cb0" },
        { label: "validation", key: "val_loss", color: "#d9480f", points: true }]],
      ["lr", "Learning rate", [{ label: "lr", key: "lr", color: "#2f9e44" }]],
      ["tps", "Throughput (tokens/s)", [{ label: "tokens/s", key: "tokens_per_s", color: "#7048e8" }]],
    ],
    classify: [
      ["loss", "Loss (cross-entropy, nats/example)", [
        { label: "train", key: "train_loss", color: "#2b6cb0" },
        { label: "validation", key: "val_loss", color: "#d9480f", points: true }]],
      ["f1", "Validation macro-F1 and accuracy", [
        { label: "macro-F1", key: "val_macro_f1", color: "#d9480f", points: true },
        { label: "accuracy", key: "val_accuracy", color: "#2b6cb0", points: true }]],
      ["lr", "Learning rate", [{ label: "lr", key: "lr", color: "#2f9e44" }]],
      ["tps", "Throughput (tokens/s)", [{ label: "tokens/s", key: "tokens_per_s", color: "#7048e8" }]],
    ],
    ppo: [
      ["reward", "Reward (mean per response)", [
        { label: "rollouts", key: "reward_mean", color: "#2b6cb0" },
        { label: "validation", key: "val_reward_mean", color: "#d9480f", points: true }]],
      ["kl", "KL to the reference model (nats/response)", [
        { label: "rollouts", key: "kl", color: "#2b6cb0" },
        { label: "validation", key: "val_kl", color: "#d9480f", points: true }]],
      ["lr", "Learning rate", [{ label: "lr", key: "lr", color: "#2f9e44" }]],
      ["tps", "Throughput (rollout tokens/s)", [
        { label: "tokens/s", key: "rollout_tokens_per_s", color: "#7048e8" }]],
    ],
  };

  // The metric rows of a job, by step; a resumed job that replays steps overwrites them.
  class Curves {
    constructor(root, task) {
      this.rows = new Map();
      this.steps = [];
      this.root = root;
      const grid = h("div", { class: "charts" });
      root.append(grid);
      // Every box is laid out in the grid before a chart measures its width.
      const specs = CHARTS[task] || CHARTS.lm;
      const boxes = specs.map(([id]) => h("figure", { class: "chart", id: `chart-${id}`, "data-points": 0 }));
      grid.append(...boxes);
      this.charts = specs.map(([, title, series], i) =>
        ({ box: boxes[i], series, plot: makeChart(boxes[i], title, series) }));
      this.frame = null;
      onLeave(() => { if (this.frame) cancelAnimationFrame(this.frame); });
    }

    add(row) {
      if (typeof row.step !== "number") return;
      const known = this.rows.has(row.step);
      this.rows.set(row.step, row);
      if (!known) {
        const last = this.steps.length ? this.steps[this.steps.length - 1] : -Infinity;
        if (row.step > last) this.steps.push(row.step);
        else { this.steps.push(row.step); this.steps.sort((a, b) => a - b); }
      }
      this.schedule();
    }

    get lastStep() { return this.steps.length ? this.steps[this.steps.length - 1] : null; }

    schedule() {
      if (this.frame) return;
      this.frame = requestAnimationFrame(() => { this.frame = null; this.draw(); });
    }

    column(key) { return this.steps.map((s) => { const v = this.rows.get(s)[key]; return typeof v === "number" ? v : null; }); }

    draw() {
      const x = this.steps;
      for (const c of this.charts) {
        c.plot.setData([x].concat(c.series.map((sr) => this.column(sr.key))));
        c.box.setAttribute("data-points", String(x.length));
      }
    }
  }

  // -- Server-Sent Events over fetch ----------------------------------------------------------

  // Reads GET /v1/jobs/{id}/events and calls onEvent({event, id, data}) per event. Resolves
  // when the server closes the stream; rejects with ApiError on a non-2xx answer.
  async function readEvents(jobId, lastEventId, onEvent, signal) {
    const headers = authHeaders({ Accept: "text/event-stream" });
    if (lastEventId !== null && lastEventId !== undefined) headers["Last-Event-ID"] = String(lastEventId);
    const resp = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/events`,
      { headers, signal, cache: "no-store" });
    if (!resp.ok) {
      const err = await errorOf(resp);
      if (resp.status === 401) askForKey(err.message);
      throw err;
    }
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let ev = { event: "", id: null, data: [] };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      // A trailing "\r" may be the first half of a "\r\n" split across chunks: keep it back.
      const cut = buffer.endsWith("\r") ? buffer.length - 1 : buffer.length;
      const lines = buffer.slice(0, cut).split(/\r\n|\r|\n/);
      buffer = lines.pop() + buffer.slice(cut);  // a partial line waits for the next chunk
      for (const line of lines) {
        if (line === "") {  // a blank line ends an event (WHATWG HTML, "server-sent events")
          if (ev.data.length) onEvent({ event: ev.event || "message", id: ev.id, data: ev.data.join("\n") });
          ev = { event: "", id: null, data: [] };
          continue;
        }
        if (line.startsWith(":")) continue;  // a comment: the heartbeat
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        let val = i < 0 ? "" : line.slice(i + 1);
        if (val.startsWith(" ")) val = val.slice(1);
        if (field === "event") ev.event = val;
        else if (field === "data") ev.data.push(val);
        else if (field === "id") ev.id = val;
      }
    }
  }

  // -- job page -------------------------------------------------------------------------------

  function kv(pairs) {
    return h("dl", { class: "kv" }, pairs.map(([k, v, id]) =>
      [h("dt", { text: k }), h("dd", id ? { id } : {}, v)]));
  }

  async function downloadCheckpoint(job, ckpt, button) {
    const label = button.textContent;
    button.disabled = true;
    button.textContent = "Downloading…";
    try {
      const resp = await fetch(
        `/v1/jobs/${encodeURIComponent(job.id)}/checkpoints/${encodeURIComponent(ckpt.id)}/download`,
        { headers: authHeaders(), cache: "no-store" });
      if (!resp.ok) throw await errorOf(resp);
      const blob = await resp.blob();
      const url = URL.createObjectURL(blob);
      const a = h("a", { href: url, download: `${job.id}-${ckpt.kind}-step${ckpt.step}.safetensors` });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
    } catch (e) {
      showError(e);
    } finally {
      button.disabled = false;
      button.textContent = label;
    }
  }

  function renderCheckpoints(box, job, ckpts) {
    if (!ckpts.length) {
      box.replaceChildren(h("p", { class: "muted", text: "No checkpoints yet." }));
      return;
    }
    const rows = ckpts.map((c) => {
      const m = c.metrics || {};
      const btn = h("button", { type: "button", class: "small download", "data-checkpoint-id": c.id },
        "Download");
      btn.addEventListener("click", () => downloadCheckpoint(job, c, btn));
      return h("tr", { "data-checkpoint-id": c.id },
        h("td", { text: c.kind }), h("td", { class: "num", text: fmt(c.step) }),
        h("td", { class: "num", text: fmt(m.val_loss) }),
        h("td", { class: "num", text: fmtBytes(c.bytes) }),
        h("td", { class: "mono small", title: c.sha256, text: `${c.sha256.slice(0, 12)}…` }),
        h("td", {}, btn));
    });
    box.replaceChildren(h("table", { class: "checkpoints" },
      h("thead", {}, h("tr", {}, ["Kind", "Step", "Val. loss", "Size", "sha256", ""].map(
        (t) => h("th", { text: t })))),
      h("tbody", {}, rows)));
  }

  function renderSamples(box, steps) {
    const items = [];
    for (const s of steps) {
      for (const sample of s.samples) {
        const text = sample.response !== undefined ? sample.response : (sample.text || "");
        items.push(h("div", { class: "sample" },
          h("div", { class: "muted small" }, `step ${fmt(s.step)}` +
            (typeof sample.reward === "number" ? ` · reward ${fmt(sample.reward)}` : "")),
          sample.prompt ? h("pre", { class: "prompt", text: sample.prompt }) : null,
          h("pre", { text })));
      }
    }
    box.replaceChildren(...items.slice(-20));
  }

  function generateForm(job, out) {
    const prompt = h("textarea", { id: "gen-prompt", rows: 2, placeholder: "a prompt to continue (may be empty)" });
    const tokens = h("input", { id: "gen-tokens", type: "number", min: 0, value: 200 });
    const temp = h("input", { id: "gen-temperature", type: "number", min: 0, step: "0.1", value: "0.8" });
    const btn = h("button", { type: "submit", id: "generate" }, "Generate");
    const form = h("form", { class: "generate", novalidate: true },
      h("label", { for: "gen-prompt" }, "Prompt"), prompt,
      h("div", { class: "row" },
        h("label", { for: "gen-tokens" }, "New tokens "), tokens,
        h("label", { for: "gen-temperature" }, " Temperature "), temp, " ", btn));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      btn.disabled = true;
      try {
        const res = await api(`/v1/jobs/${encodeURIComponent(job.id)}/generate`, { method: "POST",
          json: { prompt: prompt.value, max_new_tokens: Number(tokens.value),
            temperature: Number(temp.value), checkpoint: "best" } });
        out.replaceChildren(...res.samples.map((s) => h("pre", { class: "generated" },
          h("span", { class: "prompt", text: prompt.value }), s.text)),
        h("div", { class: "muted small" },
          `from the ${res.checkpoint_kind} checkpoint at step ${fmt(res.checkpoint_step)}`));
      } catch (e) {
        out.replaceChildren(h("p", { class: "error", role: "alert", text: e instanceof ApiError ? e.describe() : String(e) }));
      } finally {
        btn.disabled = false;
      }
    });
    return form;
  }

  async function renderJob(jobId) {
    let job = await api(`/v1/jobs/${encodeURIComponent(jobId)}`);
    const head = h("div", { class: "title-row" });
    const stats = h("div", { class: "card" });
    const errorBox = h("div", { id: "job-error" });
    const warningsBox = h("div", { id: "job-warnings" });
    const chartsBox = h("section", { class: "card", id: "charts" });
    const resultBox = h("section", { class: "card", id: "result", hidden: true });
    const ckptBox = h("div", { id: "checkpoints" });
    const samplesBox = h("div", { id: "samples" });
    const genOut = h("div", { id: "generated" });
    const genBox = h("div", { id: "generate-box" });
    const specBox = h("pre", { class: "spec", id: "spec", text: JSON.stringify(job.spec, null, 2) });
    view().replaceChildren(
      head, errorBox, warningsBox, stats, chartsBox, resultBox,
      h("section", { class: "card" }, h("h2", { text: "Checkpoints" }), ckptBox),
      h("section", { class: "card", id: "samples-section" }, h("h2", { text: "Sampled text" }),
        samplesBox, genBox, genOut),
      h("section", { class: "card" }, h("h2", { text: "Spec" }), specBox));
    const curves = new Curves(chartsBox, (job.spec || {}).task || "lm");
    let stopped = false;
    const controller = new AbortController();
    onLeave(() => { stopped = true; controller.abort(); });

    const cancelBtn = h("button", { type: "button", id: "cancel", class: "danger" }, "Cancel job");
    cancelBtn.addEventListener("click", async () => {
      if (!window.confirm(`Cancel job ${job.name || job.id}? A running job stops at its next step and keeps a last checkpoint.`)) return;
      cancelBtn.disabled = true;
      try {
        job = await api(`/v1/jobs/${encodeURIComponent(job.id)}/cancel`, { method: "POST" });
        drawHead();
      } catch (e) { showError(e); cancelBtn.disabled = false; }
    });

    let headKey = null;
    function drawHead() {
      const cancelling = job.cancel_requested && !TERMINAL.has(job.status);
      const extra = cancelling ? "cancelling" : waitingText(job);
      const canCancel = !TERMINAL.has(job.status) && !job.cancel_requested;
      // The title and the cancel button change only with the status: rebuilding them at every
      // metrics event (many per second) would detach the button under the user's pointer.
      const key = JSON.stringify([job.name || job.id, job.status, extra, canCancel]);
      if (key !== headKey) {
        headKey = key;
        head.replaceChildren(h("h1", {}, job.name || job.id, " ", statusBadge(job.status, extra)));
        if (canCancel) head.append(cancelBtn);
      }
      const lm = job.latest_metrics || {};
      const p = job.progress || {};
      stats.replaceChildren(kv([
        ["Job", h("span", { class: "mono", text: job.id })],
        ["Progress", progressBar(p)],
        ["Train loss", fmt(lm.train_loss), "stat-train-loss"],
        ["Val. loss / perplexity", `${fmt(lm.val_loss)} / ${fmt(lm.val_ppl, 2)}` +
          (lm.val_step ? ` (step ${fmt(lm.val_step)})` : "")],
        ["Learning rate", fmt(lm.lr)],
        ["Tokens/s", fmt(lm.tokens_per_s, 0), "stat-tps"],
        ["ETA", p.eta_s !== undefined && p.eta_s !== null ? fmtDuration(p.eta_s) : "—"],
        ["Created", `${job.created_at} (${fmtAge(job.created_at)})`],
      ]));
      errorBox.replaceChildren(job.error ? h("div", { class: "banner error", role: "alert" },
        h("strong", { text: `${job.error.code}: ` }), job.error.message,
        job.error.step !== null && job.error.step !== undefined ? ` (step ${job.error.step})` : "") : "");
    }

    function applyLatest(row) {
      // Keep the header's numbers current from the stream between job refreshes; validation
      // values stay those of the last step that had them (as the API's latest_metrics does).
      const lm = Object.assign({}, job.latest_metrics || {});
      for (const [k, v] of Object.entries(row)) if (!k.startsWith("val_")) lm[k] = v;
      if (typeof row.val_loss === "number") {
        for (const [k, v] of Object.entries(row)) if (k.startsWith("val_")) lm[k] = v;
        lm.val_step = row.step;
      }
      job.latest_metrics = lm;
      job.progress = Object.assign({}, job.progress, { step: row.step });
    }

    async function refreshCheckpoints() {
      renderCheckpoints(ckptBox, job, (await api(`/v1/jobs/${encodeURIComponent(job.id)}/checkpoints`)).data);
    }

    async function refreshSamples() {
      let steps = [];
      try {
        steps = (await api(`/v1/jobs/${encodeURIComponent(job.id)}/samples?limit=100`)).data;
      } catch (e) { if (!(e instanceof ApiError && e.status === 404)) throw e; }
      renderSamples(samplesBox, steps);
      const canGenerate = (job.spec || {}).task !== "classify";  // a classifier has no text
      if (canGenerate && !genBox.firstChild) genBox.append(generateForm(job, genOut));
      if (!steps.length && !canGenerate) samplesBox.replaceChildren(h("p", { class: "muted", text: "This job has no sampled text." }));
    }

    async function refreshResult() {
      if (!TERMINAL.has(job.status)) return;
      try {
        const r = await api(`/v1/jobs/${encodeURIComponent(job.id)}/result`);
        const pairs = [];
        for (const [k, v] of Object.entries(r)) {
          if (v === null || typeof v === "object" || k === "job_id" || k === "status") continue;
          pairs.push([k, typeof v === "number" ? fmt(v) : String(v)]);
        }
        resultBox.replaceChildren(h("h2", { text: "Result" }), kv(pairs));
        resultBox.hidden = false;
      } catch (e) { if (!(e instanceof ApiError && e.status === 409)) throw e; }
    }

    async function refreshJob() {
      job = await api(`/v1/jobs/${encodeURIComponent(job.id)}`);
      drawHead();
    }

    async function onTerminal() {
      await refreshJob();
      await Promise.all([refreshCheckpoints(), refreshResult(), refreshSamples()]);
    }

    function handle(ev) {
      let data = null;
      try { data = JSON.parse(ev.data); } catch (_) { return; }
      if (ev.event === "metrics") {
        curves.add(data);
        applyLatest(data);
        drawHead();
      } else if (ev.event === "status") {
        if (data.status) job.status = data.status;
        if (data.error !== undefined) job.error = data.error;
        drawHead();
        refreshJob().catch(showError);
        if (TERMINAL.has(job.status)) onTerminal().catch(showError);
      } else if (ev.event === "checkpoint") {
        refreshCheckpoints().catch(showError);
      } else if (ev.event === "warning") {
        // e.g. fresh_state_gap, replayed_step_differs (docs/events.md)
        warningsBox.append(h("div", { class: "banner info" },
          h("strong", { text: `${data.code || "warning"}: ` }), data.message || ""));
      }
    }

    async function pollMetrics() {
      // For an API without GET /v1/jobs/{id}/events: page through the metrics, then refresh.
      while (!stopped) {
        let more = true;
        while (more && !stopped) {
          const after = curves.lastStep === null ? 0 : curves.lastStep;
          const page = await api(`/v1/jobs/${encodeURIComponent(job.id)}/metrics?after_step=${after}&limit=10000`,
            { signal: controller.signal });
          page.data.forEach((row) => curves.add(row));
          more = page.has_more && page.data.length > 0;
        }
        await refreshJob();
        if (TERMINAL.has(job.status)) { await onTerminal(); return; }
        await refreshCheckpoints();
        await sleep(REFRESH_MS);
      }
    }

    async function follow() {
      let lastId = null;
      while (!stopped) {
        try {
          await readEvents(job.id, lastId, (ev) => {
            if (ev.id !== null) lastId = ev.id;
            handle(ev);
          }, controller.signal);
          if (TERMINAL.has(job.status)) return;  // the stream ends after the terminal status
        } catch (e) {
          if (stopped || (e && e.name === "AbortError")) return;
          if (e instanceof ApiError) {
            if (e.status === 401) return;
            if (e.status === 404 || e.status === 405) { await pollMetrics(); return; }
          }
          chartsBox.dataset.streamError = String(e && e.message ? e.message : e);
        }
        await sleep(RETRY_MS);  // dropped: reconnect with Last-Event-ID (no gap, no duplicate)
        await refreshJob().catch(() => {});
      }
    }

    drawHead();
    await Promise.all([refreshCheckpoints(), refreshSamples(), refreshResult()]);
    follow().catch(showError);
  }

  // -- new job page: upload a dataset, submit a job -------------------------------------------

  let openapiCache = null;

  async function openapi() {
    if (!openapiCache) {
      const r = await fetch("/openapi.json", { cache: "no-store" });
      if (!r.ok) throw await errorOf(r);
      openapiCache = await r.json();
    }
    return openapiCache;
  }

  function resolve(doc, schema) {
    while (schema && schema.$ref) schema = doc.components.schemas[schema.$ref.split("/").pop()];
    return schema;
  }

  // The non-null alternative of an Optional field, and whether null is allowed.
  function unwrap(doc, schema) {
    if (schema.anyOf) {
      const alts = schema.anyOf.filter((s) => s.type !== "null");
      return { schema: resolve(doc, alts[0] || {}), nullable: alts.length < schema.anyOf.length };
    }
    return { schema: resolve(doc, schema), nullable: false };
  }

  // A form input for one scalar field (integer, number, boolean, string, enum, array).
  function fieldInput(doc, path, schema, dflt) {
    const { schema: s, nullable } = unwrap(doc, schema);
    if (!s || s.type === "object" || s.properties) return null;  // nested sections: JSON box
    const id = `f-${path}`;
    let input;
    if (s.enum) {
      input = h("select", { id, name: path });
      if (nullable) input.append(h("option", { value: "", text: "(none)" }));
      for (const v of s.enum) input.append(h("option", { value: String(v), text: String(v) }));
      input.value = dflt === null || dflt === undefined ? "" : String(dflt);
    } else if (s.type === "boolean") {
      input = h("input", { id, name: path, type: "checkbox" });
      input.checked = !!dflt;
    } else if (s.type === "integer" || s.type === "number") {
      input = h("input", { id, name: path, type: "number", step: s.type === "integer" ? 1 : "any",
        value: dflt === null || dflt === undefined ? "" : String(dflt),
        placeholder: nullable ? "(none)" : "" });
    } else if (s.type === "array") {
      input = h("input", { id, name: path, type: "text", value: dflt === undefined ? "" : JSON.stringify(dflt) });
    } else {
      input = h("input", { id, name: path, type: "text", value: dflt === null || dflt === undefined ? "" : String(dflt),
        placeholder: nullable ? "(none)" : "" });
    }
    input.dataset.path = path;
    input.dataset.kind = s.type === "array" ? "json" : (s.type || "string");
    input.dataset.default = input.type === "checkbox" ? String(input.checked) : input.value;
    const title = schema.description || s.description || "";
    return h("div", { class: "field" },
      h("label", { for: id, title }, path.split(".").pop().replace(/_/g, " ")), input);
  }

  function readInput(input) {
    const raw = input.type === "checkbox" ? input.checked : input.value.trim();
    if (input.type === "checkbox") return raw;
    if (raw === "") return null;
    if (input.dataset.kind === "integer" || input.dataset.kind === "number") {
      const n = Number(raw);
      return Number.isFinite(n) ? n : raw;  // a non-number is sent as typed: the API says why
    }
    if (input.dataset.kind === "json") { try { return JSON.parse(raw); } catch (_) { return raw; } }
    return raw;
  }

  function setPath(obj, path, value) {
    const parts = path.split(".");
    let o = obj;
    for (const p of parts.slice(0, -1)) o = o[p] = o[p] || {};
    o[parts[parts.length - 1]] = value;
  }

  function deepMerge(a, b) {
    for (const [k, v] of Object.entries(b)) {
      if (v && typeof v === "object" && !Array.isArray(v) && a[k] && typeof a[k] === "object") deepMerge(a[k], v);
      else a[k] = v;
    }
    return a;
  }

  async function renderNew() {
    const doc = await openapi();
    const jobSpec = doc.components.schemas.JobSpec;
    const datasetSelect = h("select", { id: "f-dataset_id", name: "dataset_id" });

    async function loadDatasets(selectId) {
      const ds = (await api("/v1/datasets?limit=100")).data;
      datasetSelect.replaceChildren(...ds.map((d) => h("option", { value: d.id },
        `${d.name} (${fmtBytes(d.bytes)}, ${d.kind || "text"}) ${d.id}`)));
      if (!ds.length) datasetSelect.append(h("option", { value: "", text: "(upload a dataset first)" }));
      if (selectId) datasetSelect.value = selectId;
    }

    // Upload
    const fileInput = h("input", { type: "file", id: "upload-file", name: "file", multiple: true });
    const dsName = h("input", { type: "text", id: "upload-name", name: "name", placeholder: "(the file name)" });
    const dsFormat = h("select", { id: "upload-format" },
      ["text", "jsonl", "csv", "tsv"].map((f) => h("option", { value: f, text: f })));
    const uploadMsg = h("p", { id: "upload-message", class: "muted" });
    const uploadBtn = h("button", { type: "submit", id: "upload" }, "Upload");
    const uploadForm = h("form", { class: "card", id: "upload-form", novalidate: true },
      h("h2", { text: "1. Upload a dataset" }),
      h("div", { class: "row" }, h("label", { for: "upload-file" }, "Files "), fileInput),
      h("div", { class: "row" }, h("label", { for: "upload-name" }, "Name "), dsName,
        h("label", { for: "upload-format" }, " Format "), dsFormat, " ", uploadBtn),
      uploadMsg);
    uploadForm.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      if (!fileInput.files.length) { uploadMsg.textContent = "Choose a file first."; uploadMsg.className = "error"; return; }
      const body = new FormData();
      for (const f of fileInput.files) body.append("file", f);
      if (dsName.value.trim()) body.append("name", dsName.value.trim());
      uploadBtn.disabled = true;
      uploadMsg.className = "muted";
      uploadMsg.textContent = "Uploading…";
      try {
        const d = await api(`/v1/datasets?format=${encodeURIComponent(dsFormat.value)}`, { method: "POST", body });
        // The dataset list (with the new one selected) first, then the message: whoever sees
        // "ok" sees the form ready to submit.
        await loadDatasets(d.id);
        uploadMsg.textContent = `Uploaded ${d.name}: ${fmtBytes(d.bytes)}, ${fmt(d.num_chars)} characters, ` +
          `${fmt(d.num_lines)} lines (${d.id}).`;
        uploadMsg.className = "ok";
      } catch (e) {
        uploadMsg.textContent = e instanceof ApiError ? e.describe() : String(e);
        uploadMsg.className = "error";
      } finally { uploadBtn.disabled = false; }
    });

    // Job form, defaults from the JobSpec schema of the OpenAPI document
    const fields = [];
    const sections = [];
    const split = [];  // the top-level numbers: how much of the dataset is held out
    const name = h("input", { type: "text", id: "f-name", name: "name", placeholder: "(none)" });
    for (const [key, prop] of Object.entries(jobSpec.properties)) {
      const target = resolve(doc, prop);
      if (target && target.properties && prop.default && typeof prop.default === "object") {
        const inputs = [];
        for (const [sub, subProp] of Object.entries(target.properties)) {
          const dflt = sub in prop.default ? prop.default[sub] : subProp.default;
          const f = fieldInput(doc, `${key}.${sub}`, subProp, dflt);
          if (f) { inputs.push(f); fields.push(f.querySelector("input,select")); }
        }
        sections.push(h("fieldset", { class: "section" }, h("legend", { text: key }), inputs));
      } else if (["val_fraction", "test_fraction"].includes(key)) {
        const f = fieldInput(doc, key, prop, prop.default);
        if (f) { split.push(f); fields.push(f.querySelector("input,select")); }
      }
    }
    if (split.length) sections.unshift(h("fieldset", { class: "section" }, h("legend", { text: "data split" }), split));
    const extra = h("textarea", { id: "f-extra", rows: 3,
      placeholder: "{\"training\": {\"early_stopping\": {\"patience\": 5}}}" });
    const submitMsg = h("div", { id: "submit-message", role: "alert" });
    const submitBtn = h("button", { type: "submit", id: "submit-job" }, "Submit job");
    const jobForm = h("form", { class: "card", id: "job-form", novalidate: true },
      h("h2", { text: "2. Submit a language-model job" }),
      h("p", { class: "muted small" }, "Defaults are the API's own (the JobSpec schema of ",
        h("a", { href: "/docs" }, "/openapi.json"), "); only fields you change are sent."),
      h("div", { class: "row" }, h("label", { for: "f-name" }, "Name "), name),
      h("div", { class: "row" }, h("label", { for: "f-dataset_id" }, "Dataset "), datasetSelect),
      h("div", { class: "sections" }, sections),
      h("label", { for: "f-extra" }, "More fields (JSON, merged over the form: other tasks, early stopping, …)"),
      extra, h("div", { class: "row" }, submitBtn), submitMsg);

    jobForm.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      for (const el of jobForm.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
      submitMsg.replaceChildren();
      const spec = {};
      if (name.value.trim()) spec.name = name.value.trim();
      if (datasetSelect.value) spec.dataset_id = datasetSelect.value;
      for (const input of fields) {
        const now = input.type === "checkbox" ? String(input.checked) : input.value;
        if (now !== input.dataset.default) setPath(spec, input.dataset.path, readInput(input));
      }
      if (extra.value.trim()) {
        try { deepMerge(spec, JSON.parse(extra.value)); } catch (e) {
          extra.setAttribute("aria-invalid", "true");
          submitMsg.replaceChildren(h("p", { class: "error", text: `More fields: not JSON (${e.message})` }));
          return;
        }
      }
      submitBtn.disabled = true;
      try {
        const job = await api("/v1/jobs", { method: "POST", json: spec });
        location.hash = `#/jobs/${job.id}`;
      } catch (e) {
        if (!(e instanceof ApiError)) { showError(e); return; }
        const lines = [e.describe()].concat((e.details || []).filter((d) => d.field && d.field !== e.field)
          .map((d) => `${d.field}: ${d.message || d.msg || ""}`));
        submitMsg.replaceChildren(...lines.map((l) => h("p", { class: "error", text: l })));
        const fieldsAtFault = [e.field].concat((e.details || []).map((d) => d.field)).filter(Boolean);
        for (const f of fieldsAtFault) {
          const el = document.getElementById(`f-${f}`);
          if (el) el.setAttribute("aria-invalid", "true");
        }
      } finally { submitBtn.disabled = false; }
    });

    view().replaceChildren(h("h1", { text: "New job" }), uploadForm, jobForm);
    await loadDatasets();
  }

  // -- router ---------------------------------------------------------------------------------

  async function route() {
    stopPage();
    clearBanner();
    updateKeyButton();
    const hash = location.hash || "#/";
    const m = hash.match(/^#\/jobs\/([^/?#]+)$/);
    try {
      if (m) await renderJob(decodeURIComponent(m[1]));
      else if (hash === "#/new") await renderNew();
      else await renderJobs();
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) return;  // the key prompt is shown
      showError(e);
    }
    updateKeyButton();
  }

  document.getElementById("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    updateKeyButton();
    askForKey(null);
  });
  window.addEventListener("hashchange", () => { keyPromptShown = false; route(); });
  route();
})();
