// The web console of the dHVAE augmentation service: plain ES module, no build step, nothing from a CDN.
// Sign-in is the API key, kept in sessionStorage and sent as the bearer header (no cookies: no CSRF).
// Every call goes through `call`, which turns an error answer into an ApiError with the service's words.

const $ = (sel) => document.querySelector(sel);
const KEY = "dhvae-key";
const TERMINAL = ["succeeded", "failed", "cancelled"];
const FORM_SCHEMAS = {
  augmentations: "AugmentationRequest",
  trainings: "TrainingRequest",
  generations: "GenerationRequest",
  evaluations: "EvaluationRequest",
};
const state = { schema: null, cohorts: [], models: [], jobs: new Map(), streams: new Map(), losses: new Map(),
  results: null, page: 0 };
const PAGE = 16;

class ApiError extends Error {
  constructor(status, detail, problems = []) {
    super(detail);
    this.status = status;
    this.problems = problems;
  }
}

// --- talking to the service -----------------------------------------------------------------------
function authHeaders(extra = {}) {
  return { Authorization: `Bearer ${sessionStorage.getItem(KEY) || ""}`, ...extra };
}

async function errorOf(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  const detail = body && body.detail ? String(body.detail) : `HTTP ${response.status} ${response.statusText}`;
  return new ApiError(response.status, detail, (body && body.problems) || []);
}

async function call(method, path, { json, headers } = {}) {
  const init = { method, headers: authHeaders(headers) };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  }
  if (method === "POST") init.headers["Idempotency-Key"] = crypto.randomUUID();
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, `the service did not answer (${e.message})`);
  }
  if (!response.ok) {
    if (response.status === 401) signedOut("Your API key was refused (401). Sign in again.");
    throw await errorOf(response);
  }
  return response;
}

const getJSON = async (path) => (await call("GET", path)).json();

async function blobURL(path) {
  return URL.createObjectURL(await (await call("GET", path)).blob());
}

// --- messages -------------------------------------------------------------------------------------
function showError(e, where = "") {
  const box = $("#alert");
  box.replaceChildren();
  const p = document.createElement("p");
  p.textContent = `${where ? where + ": " : ""}${e.status ? "HTTP " + e.status + ": " : ""}${e.message}`;
  box.append(p);
  if (e.problems && e.problems.length) box.append(problemTable(e.problems));
  const close = button("Dismiss", () => { box.hidden = true; });
  box.append(close);
  box.hidden = false;
}

function problemTable(problems) {
  const t = document.createElement("table");
  t.className = "table problems";
  t.innerHTML = "<caption>Problems</caption><thead><tr><th scope='col'>File</th><th scope='col'>Problem</th></tr></thead>";
  const body = document.createElement("tbody");
  for (const p of problems) body.append(row([p.file, p.problem]));
  t.append(body);
  return t;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    const td = document.createElement("td");
    if (c instanceof Node) td.append(c); else td.textContent = c ?? "";
    tr.append(td);
  }
  return tr;
}

function button(label, onClick, cls = "") {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  if (cls) b.className = cls;
  b.addEventListener("click", onClick);
  return b;
}

// --- sign-in --------------------------------------------------------------------------------------
function signedOut(message) {
  sessionStorage.removeItem(KEY);
  for (const ctrl of state.streams.values()) ctrl.abort();
  state.streams.clear();
  $("#app").hidden = true;
  $("#signout").hidden = true;
  for (const el of ["#key", "label[for=key]", "#signin-button"]) $(el).hidden = false;
  $("#whoami").textContent = message || "";
}

async function signIn(key) {
  sessionStorage.setItem(KEY, key);
  try {
    await getJSON("/v1/cohorts");
  } catch (e) {
    signedOut(e.status === 401 ? "That API key was refused." : `Sign-in failed: ${e.message}`);
    return;
  }
  $("#whoami").textContent = "Signed in.";
  $("#signout").hidden = false;
  for (const el of ["#key", "label[for=key]", "#signin-button"]) $(el).hidden = true;
  $("#app").hidden = false;
  $("#key").value = "";
  await Promise.all([refreshCohorts(), refreshModels(), refreshJobs()]);
  await renderForm();
}

// --- cohorts --------------------------------------------------------------------------------------
function upload(file) {
  const status = $("#upload-status");
  const bar = $("#upload-progress");
  $("#upload-name").textContent = file.name;
  $("#upload-result").replaceChildren();
  status.hidden = false;
  bar.value = 0;
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/v1/cohorts");
  for (const [k, v] of Object.entries(authHeaders({ "Content-Type": "application/zip", "Idempotency-Key": crypto.randomUUID() }))) {
    xhr.setRequestHeader(k, v);
  }
  xhr.upload.addEventListener("progress", (ev) => {
    if (ev.lengthComputable) {
      bar.value = (100 * ev.loaded) / ev.total;
      $("#upload-pct").textContent = `${Math.round(bar.value)} %`;
    }
  });
  xhr.addEventListener("load", async () => {
    let body = null;
    try { body = JSON.parse(xhr.responseText); } catch { /* not JSON */ }
    status.hidden = true;
    if (xhr.status === 201) {
      const p = document.createElement("p");
      p.className = "ok";
      p.textContent = `Cohort ${body.id}: ${body.cases.length} cases (${body.cases.join(", ")}), channels ${body.channels.join(", ")}, ` +
        `${body.tumour_slices} tumour slices, ${body.training_slices} training slices.` +
        (body.warnings.length ? ` Warnings: ${body.warnings.join(" ")}` : "");
      $("#upload-result").append(p);
      await refreshCohorts();
      await showCasePreviews(body);
    } else {
      const e = new ApiError(xhr.status, body && body.detail ? body.detail : `HTTP ${xhr.status}`, (body && body.problems) || []);
      const p = document.createElement("p");
      p.className = "error";
      p.textContent = `Upload refused (HTTP ${e.status}): ${e.message}`;
      $("#upload-result").append(p);
      if (e.problems.length) $("#upload-result").append(problemTable(e.problems));
      if (xhr.status === 401) signedOut("Your API key was refused (401). Sign in again.");
    }
  });
  xhr.addEventListener("error", () => {
    status.hidden = true;
    showError(new ApiError(0, "the upload was cut off before the service answered"), "Upload");
  });
  xhr.send(file);
}

async function refreshCohorts() {
  state.cohorts = (await getJSON("/v1/cohorts")).items;
  const body = $("#cohort-table tbody");
  body.replaceChildren();
  for (const c of state.cohorts) {
    body.append(row([c.id, c.cases.length, c.channels.join(", "), c.tumour_slices, c.training_slices ?? "",
      c.warnings.join(" "), button("Cases", () => showCasePreviews(c))]));
  }
}

async function showCasePreviews(cohort) {
  const grid = $("#case-previews");
  grid.replaceChildren();
  for (const name of cohort.cases) {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.alt = `Case ${name}: slice with the most tumour, outline in red`;
    const cap = document.createElement("figcaption");
    cap.textContent = name;
    fig.append(img, cap);
    grid.append(fig);
    try {
      img.src = await blobURL(`/v1/cohorts/${cohort.id}/cases/${encodeURIComponent(name)}/preview.png`);
    } catch (e) {
      cap.textContent = `${name}: ${e.message}`;
    }
  }
}

async function refreshModels() {
  try { state.models = (await getJSON("/v1/models")).items; } catch { state.models = []; }
}

// --- job forms from the OpenAPI schema -------------------------------------------------------------
async function loadSchema() {
  if (!state.schema) state.schema = await (await fetch("/openapi.json")).json();
  return state.schema;
}

function resolve(prop) {
  if (prop.$ref) return state.schema.components.schemas[prop.$ref.split("/").pop()];
  if (prop.anyOf) {
    const real = prop.anyOf.filter((p) => p.type !== "null");
    return { ...resolve(real[0]), nullable: prop.anyOf.length > real.length, ...pick(prop, ["default", "description", "title"]) };
  }
  return prop;
}

const pick = (o, keys) => Object.fromEntries(keys.filter((k) => k in o).map((k) => [k, o[k]]));

async function renderForm() {
  const schema = await loadSchema();
  const kind = $("#job-kind").value;
  const model = schema.components.schemas[FORM_SCHEMAS[kind]];
  const box = $("#job-fields");
  box.replaceChildren();
  const required = new Set(model.required || []);
  for (const [name, raw] of Object.entries(model.properties)) {
    const prop = { ...resolve(raw), ...pick(raw, ["default", "description"]) };
    const id = `f-${name}`;
    const label = document.createElement("label");
    label.htmlFor = id;
    label.textContent = name + (required.has(name) ? " *" : "");
    let input;
    if (name === "cohort_id" || name === "model_id" || name === "base_model_id") {
      input = document.createElement("select");
      const items = name === "cohort_id" ? state.cohorts : state.models.filter((m) => m.status === "ready");
      if (!required.has(name)) input.append(new Option("(none)", ""));
      for (const it of items) input.append(new Option(it.id, it.id));
    } else if (prop.enum) {
      input = document.createElement("select");
      for (const v of prop.enum) input.append(new Option(v, v));
      if (prop.default !== undefined) input.value = prop.default;
    } else if (prop.type === "array") {
      input = document.createElement("input");
      input.type = "text";
      input.dataset.array = prop.items && prop.items.enum ? "string" : "integer";
      if (prop.default) input.value = prop.default.join(", ");
      input.placeholder = prop.items && prop.items.enum ? prop.items.enum.join(", ") : "e.g. 250, 500";
    } else if (prop.type === "integer" || prop.type === "number") {
      input = document.createElement("input");
      input.type = "number";
      input.step = prop.type === "integer" ? "1" : "any";
      if (prop.minimum !== undefined) input.min = prop.minimum;
      if (prop.exclusiveMinimum !== undefined) input.min = prop.exclusiveMinimum;
      if (prop.maximum !== undefined) input.max = prop.maximum;
      if (prop.default !== undefined && prop.default !== null) input.value = prop.default;
    } else if (prop.type === "boolean") {
      input = document.createElement("input");
      input.type = "checkbox";
      input.checked = Boolean(prop.default);
    } else {
      input = document.createElement("input");
      input.type = "text";
      if (prop.default) input.value = prop.default;
    }
    input.id = id;
    input.name = name;
    input.required = required.has(name);
    if (prop.description) input.title = prop.description;
    const wrap = document.createElement("div");
    wrap.className = "field";
    wrap.append(label, input);
    box.append(wrap);
  }
}

function formBody() {
  const body = {};
  for (const el of $("#job-fields").querySelectorAll("input, select")) {
    if (el.type === "checkbox") { body[el.name] = el.checked; continue; }
    if (el.value === "") continue;
    if (el.dataset.array) {
      const parts = el.value.split(/[,\s]+/).filter(Boolean);
      body[el.name] = el.dataset.array === "integer" ? parts.map(Number) : parts;
    } else if (el.type === "number") body[el.name] = Number(el.value);
    else body[el.name] = el.value;
  }
  return body;
}

async function startJob(ev) {
  ev.preventDefault();
  const kind = $("#job-kind").value;
  try {
    const accepted = await (await call("POST", `/v1/${kind}`, { json: formBody() })).json();
    await refreshJobs();
    follow(accepted.job_id);
  } catch (e) {
    showError(e, "Starting the job");
  }
}

// --- jobs, live -----------------------------------------------------------------------------------
async function refreshJobs() {
  const items = (await getJSON("/v1/jobs")).items;
  for (const j of items) state.jobs.set(j.id, j);
  renderJobs();
  for (const j of items) if (!TERMINAL.includes(j.state)) follow(j.id);
}

function eta(p) {
  if (p.eta_s === null || p.eta_s === undefined) return "";
  const s = Math.round(p.eta_s);
  return s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}

// The loss terms of a training, each scaled to its own range: a sparkline per term, up to four.
const COLOURS = ["#0b5cad", "#a4161a", "#1b6e3a", "#7a4f01"];
const NOT_LOSSES = new Set(["epoch", "slices_per_s", "draws", "acceptance", "dice_slice"]);

function lossCanvas(id) {
  const c = document.createElement("canvas");
  c.width = 140;
  c.height = 32;
  c.setAttribute("role", "img");
  const hist = state.losses.get(id) || [];
  const names = hist.length ? Object.keys(hist[hist.length - 1]).slice(0, COLOURS.length) : [];
  c.setAttribute("aria-label", names.length
    ? names.map((k) => `${k} ${Number(hist[hist.length - 1][k]).toPrecision(3)}`).join(", ") + ` after ${hist.length} updates`
    : "no loss yet");
  c.title = c.getAttribute("aria-label");
  const ctx = c.getContext("2d");
  names.forEach((name, k) => {
    const ys = hist.map((h) => h[name]).filter((v) => typeof v === "number");
    if (ys.length < 2) return;
    const lo = Math.min(...ys), hi = Math.max(...ys);
    ctx.strokeStyle = COLOURS[k];
    ctx.beginPath();
    ys.forEach((v, i) => {
      const x = (i / (ys.length - 1)) * (c.width - 2) + 1;
      const y = c.height - 2 - ((v - lo) / (hi - lo || 1)) * (c.height - 4);
      if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y);
    });
    ctx.stroke();
  });
  return c;
}

function renderJobs() {
  const body = $("#job-table tbody");
  body.replaceChildren();
  const jobs = [...state.jobs.values()].sort((a, b) => (a.created_at < b.created_at ? 1 : -1));
  for (const j of jobs) {
    const p = j.progress || {};
    const bar = document.createElement("progress");
    bar.max = p.total || 1;
    bar.value = p.done || 0;
    bar.setAttribute("aria-label", `${j.id} progress`);
    const text = document.createElement("span");
    text.textContent = p.total ? ` ${p.stage} ${p.done}/${p.total} ${p.unit}` : ` ${p.stage || ""}`;
    const cell = document.createElement("span");
    cell.append(bar, text);
    const actions = document.createElement("span");
    if (!TERMINAL.includes(j.state)) actions.append(button("Cancel", () => cancelJob(j.id), "danger"));
    if (["augmentation", "generation", "evaluation"].includes(j.kind) && j.state !== "failed" && j.state !== "cancelled") {
      actions.append(button("Results", () => showResults(j.id)));
    }
    const stateCell = document.createElement("span");
    stateCell.className = `state ${j.state}`;
    stateCell.textContent = j.state + (j.error ? `: ${j.error.type}: ${j.error.message}` : "");
    const tr = row([j.id, j.kind, stateCell, cell, eta(p), lossCanvas(j.id), actions]);
    tr.dataset.job = j.id;
    body.append(tr);
  }
}

function follow(id) {
  if (state.streams.has(id)) return;
  const ctrl = new AbortController();
  state.streams.set(id, ctrl);
  readEvents(id, ctrl.signal).catch((e) => {
    if (e.name !== "AbortError") showError(e, `Following ${id}`);
  }).finally(() => state.streams.delete(id));
}

// Server-Sent Events over fetch (EventSource cannot send the bearer header): one JobOut per event.
async function readEvents(id, signal) {
  let last = null;
  for (let attempt = 0; attempt < 20; attempt++) {
    const headers = authHeaders({ Accept: "text/event-stream" });
    if (last) headers["Last-Event-ID"] = last;
    let response;
    try {
      response = await fetch(`/v1/jobs/${id}/events`, { headers, signal });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      await new Promise((r) => setTimeout(r, 1000 * Math.min(attempt + 1, 5)));
      continue;
    }
    if (!response.ok) throw await errorOf(response);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0 || (cut = buffer.indexOf("\r\n\r\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + (buffer.startsWith("\r\n\r\n", cut) ? 4 : 2));
        let data = "";
        for (const line of block.split(/\r?\n/)) {
          if (line.startsWith("data:")) data += line.slice(5).trim();
          else if (line.startsWith("id:")) last = line.slice(3).trim();
        }
        if (data) onJob(JSON.parse(data));
      }
    }
    const job = state.jobs.get(id);
    if (job && TERMINAL.includes(job.state)) return;
    onJob(await getJSON(`/v1/jobs/${id}`));
    if (TERMINAL.includes(state.jobs.get(id).state)) return;
  }
}

function onJob(job) {
  state.jobs.set(job.id, job);
  const m = (job.progress && job.progress.metrics) || {};
  const terms = Object.fromEntries(Object.entries(m).filter(([k, v]) => typeof v === "number" && !NOT_LOSSES.has(k)));
  if (job.progress && job.progress.stage === "train" && Object.keys(terms).length) {
    const hist = state.losses.get(job.id) || [];
    hist.push(terms);
    if (hist.length > 300) hist.shift();
    state.losses.set(job.id, hist);
  }
  renderJobs();
  if (state.results === job.id && (TERMINAL.includes(job.state) || (job.progress && job.progress.stage === "generate"))) {
    showResults(job.id, false);
  }
}

async function cancelJob(id) {
  if (!window.confirm(`Cancel job ${id}? Its output is deleted.`)) return;
  try {
    onJob(await (await call("DELETE", `/v1/jobs/${id}`)).json());
  } catch (e) {
    showError(e, `Cancelling ${id}`);
  }
}

// --- results --------------------------------------------------------------------------------------
async function showResults(id, scroll = true) {
  const job = state.jobs.get(id);
  if (state.results !== id) state.page = 0;
  state.results = id;
  $("#results-job").textContent = `of ${id}`;
  $("#results-empty").hidden = true;
  $("#results-body").hidden = false;
  const evaluation = job.kind === "evaluation";
  for (const el of ["#download", "#preview-figure", ".pager", "#pair-table"]) $(el).hidden = evaluation;
  $("#report").hidden = !evaluation;
  if (scroll) $("#results").scrollIntoView();
  if (evaluation) return showReport(job);
  await showPage();
}

async function showPage() {
  const id = state.results;
  const offset = state.page * PAGE;
  try {
    const page = await getJSON(`/v1/jobs/${id}/pairs?offset=${offset}&limit=${PAGE}`);
    const pages = Math.max(1, Math.ceil(page.total / PAGE));
    $("#page-label").textContent = `page ${state.page + 1} of ${pages} (${page.total} pairs so far)`;
    $("#prev-page").disabled = state.page === 0;
    $("#next-page").disabled = state.page + 1 >= pages;
    const body = $("#pair-table tbody");
    body.replaceChildren();
    for (const p of page.items) body.append(row([p.case, p.slices, p.mask_area_px]));
    if (page.items.length) {
      $("#preview").src = await blobURL(`/v1/jobs/${id}/preview.png?offset=${offset}&n=${PAGE}`);
      $("#preview-caption").textContent = `pairs ${offset + 1} to ${offset + page.items.length}, 4 per row, read left to right`;
    } else {
      $("#preview").removeAttribute("src");
      $("#preview-caption").textContent = "No generated pair yet.";
    }
  } catch (e) {
    $("#preview-caption").textContent = e.message;
  }
}

async function download() {
  const id = state.results;
  const status = $("#download-status");
  status.textContent = "Downloading...";
  try {
    const url = await blobURL(`/v1/jobs/${id}/download`);
    const a = document.createElement("a");
    a.href = url;
    a.download = `${id}.zip`;
    document.body.append(a);
    a.click();
    a.remove();
    status.textContent = `Saved ${id}.zip.`;
  } catch (e) {
    status.textContent = `Download failed: ${e.message}`;
  }
}

function recommendation(report) {
  if (report.recommendation && report.recommendation.words) return report.recommendation.words;
  const v = report.verdict && (report.verdict.step_matched || Object.values(report.verdict)[0]);
  if (!v) return "The report has no verdict.";
  const wins = Object.entries(v.methods || {}).filter(([, m]) => m.gain > 0 && m.beyond_seed_spread);
  if (!wins.length) {
    return `Nothing beats your real data: no method raised ${v.metric} beyond the seed spread over real-only ` +
      `(${(100 * v.none).toFixed(1)} %).`;
  }
  const [name, m] = wins.sort((a, b) => b[1].gain - a[1].gain)[0];
  return `${name} with N = ${m.best_n} pairs: ${(100 * m.best).toFixed(1)} % ${v.metric}, ` +
    `${(100 * m.gain).toFixed(1)} points above real-only, beyond the seed spread.`;
}

async function showReport(job) {
  if (job.state !== "succeeded") {
    $("#recommendation").textContent = `The report exists once the evaluation has succeeded (now ${job.state}).`;
    return;
  }
  try {
    const report = await getJSON(`/v1/jobs/${job.id}/report.json`);
    $("#recommendation").textContent = recommendation(report);
    $("#report-png").src = await blobURL(`/v1/jobs/${job.id}/report.png`);
    const head = $("#report-table thead");
    head.replaceChildren(row(["protocol", "method", "N", "seeds", "dice_slice (%)", "dice_3d (%)"]));
    const body = $("#report-table tbody");
    body.replaceChildren();
    const pct = (d) => (d ? `${(100 * d.mean).toFixed(1)} ± ${(100 * d.std).toFixed(1)}` : "");
    for (const s of report.summary || []) {
      body.append(row([s.protocol, s.method, s.n_synthetic, s.n_seeds, pct(s.dice_slice), pct(s.dice_3d)]));
    }
  } catch (e) {
    $("#recommendation").textContent = e.message;
  }
}

// --- wiring ---------------------------------------------------------------------------------------
function wire() {
  $("#signin").addEventListener("submit", (ev) => {
    ev.preventDefault();
    signIn($("#key").value.trim());
  });
  $("#signout").addEventListener("click", () => signedOut("Signed out."));
  const drop = $("#drop");
  const input = $("#zip");
  drop.addEventListener("click", () => input.click());
  drop.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); input.click(); }
  });
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    if (ev.dataTransfer.files.length) upload(ev.dataTransfer.files[0]);
  });
  input.addEventListener("change", () => { if (input.files.length) upload(input.files[0]); input.value = ""; });
  $("#job-kind").addEventListener("change", () => renderForm().catch((e) => showError(e, "The form")));
  $("#job-form").addEventListener("submit", startJob);
  $("#download").addEventListener("click", download);
  $("#prev-page").addEventListener("click", () => { state.page -= 1; showPage(); });
  $("#next-page").addEventListener("click", () => { state.page += 1; showPage(); });
  window.addEventListener("unhandledrejection", (ev) => showError(ev.reason instanceof Error ? ev.reason : new Error(String(ev.reason))));
  if (sessionStorage.getItem(KEY)) signIn(sessionStorage.getItem(KEY));
}

wire();
