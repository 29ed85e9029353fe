// serve.py's page: plain JavaScript, no framework, no build step, nothing from the network
// beyond this server. Boxes are drawn on SVG overlays whose viewBox is the image's own pixel
// grid, so a box in original pixels (what the API speaks) needs no scaling in the page.
"use strict";

const $ = (id) => document.getElementById(id);
const SVGNS = "http://www.w3.org/2000/svg";
const state = { file: null, box: null, natural: [0, 0], info: null, queries: null, drag: null };

async function api(url, options) {
  const r = await fetch(url, options);
  let body = null;
  try { body = await r.json(); } catch (_) { body = null; }
  if (!r.ok) throw new Error((body && body.error) || `HTTP ${r.status}`);
  return body;
}

function setStatus(el, text, error = false) {
  el.textContent = text;
  el.classList.toggle("error", error);
}

function rect(svg, box, cls) {
  const r = document.createElementNS(SVGNS, "rect");
  r.setAttribute("class", cls);
  setRect(r, box);
  svg.appendChild(r);
  return r;
}

function setRect(r, box) {
  const [x1, y1, x2, y2] = box;
  r.setAttribute("x", x1); r.setAttribute("y", y1);
  r.setAttribute("width", Math.max(0, x2 - x1)); r.setAttribute("height", Math.max(0, y2 - y1));
}

// an image with an SVG overlay in its own pixel coordinates (w x h) and optional boxes
function framedImage(src, w, h, boxes, alt) {
  const frame = document.createElement("div");
  frame.className = "frame";
  const img = document.createElement("img");
  img.src = src; img.alt = alt || ""; img.loading = "lazy";
  frame.appendChild(img);
  const svg = document.createElementNS(SVGNS, "svg");
  svg.setAttribute("class", "overlay");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("preserveAspectRatio", "none");
  for (const [box, cls] of boxes) if (box) rect(svg, box, cls);
  frame.appendChild(svg);
  return frame;
}

function thumbUrl(id, size) {
  return `/thumb/${id.split("/").map(encodeURIComponent).join("/")}?size=${size}`;
}

function resultFigure(r) {
  const fig = document.createElement("figure");
  fig.className = "result" + (r.label ? " " + r.label : "");
  fig.dataset.imageId = r.image_id;
  fig.dataset.rank = r.rank;
  fig.dataset.score = r.score;
  if (r.box) fig.dataset.box = r.box.join(",");
  fig.appendChild(framedImage(thumbUrl(r.image_id, 256), r.width, r.height,
                              [[r.box, "loc-box"]], r.image_id));
  const cap = document.createElement("figcaption");
  cap.textContent = `#${r.rank} ${r.image_id} · ${r.score.toFixed(3)}`;
  fig.appendChild(cap);
  fig.addEventListener("click", () => openModal(r));
  return fig;
}

function openModal(r) {
  const frame = $("modal-frame");
  frame.replaceChildren(framedImage(thumbUrl(r.image_id, 1024), r.width, r.height,
                                    [[r.box, "loc-box"]], r.image_id));
  const box = r.box ? ` · box [${r.box.map((c) => Math.round(c)).join(", ")}]` : "";
  $("modal-caption").textContent = `#${r.rank} ${r.image_id} · score ${r.score.toFixed(4)}` +
    (r.window_score !== null && r.window_score !== undefined ?
      ` · window ${r.window_score.toFixed(4)}` : "") + box +
    (r.label ? ` · ${r.label}` : "");
  $("modal").classList.remove("hidden");
}

function timingText(t, roundTrip) {
  const parts = ["decode", "extract", "assign", "search", "rerank", "qe"]
    .filter((k) => t[k] >= 0.5).map((k) => `${k} ${Math.round(t[k])}`);
  return `${Math.round(t.total)} ms on the server (${parts.join(", ")}), ` +
    `${Math.round(roundTrip)} ms round trip`;
}

// ---------------------------------------------------------------- search with a photo
function loadFile(file) {
  return new Promise((resolve, reject) => {
    if (!file || (file.type && !file.type.startsWith("image/"))) {
      setStatus($("status"), `${file ? file.name : "file"}: not an image`, true);
      reject(new Error("not an image"));
      return;
    }
    state.file = file;
    const img = $("query-img");
    img.onload = () => {
      state.natural = [img.naturalWidth, img.naturalHeight];
      $("query-svg").setAttribute("viewBox", `0 0 ${img.naturalWidth} ${img.naturalHeight}`);
      $("query-stage").classList.remove("hidden");
      setBox(null);
      $("go").disabled = false;
      setStatus($("status"), `${file.name}: ${img.naturalWidth}x${img.naturalHeight}`);
      resolve();
    };
    img.onerror = () => {
      setStatus($("status"), `${file.name}: the browser cannot show this image`, true);
      $("go").disabled = false;  // the server may still read it and says why if not
      resolve();
    };
    if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
    img.src = URL.createObjectURL(file);
  });
}

function setBox(box) {
  state.box = box;
  const r = $("query-box");
  if (box) { setRect(r, box); r.classList.remove("hidden"); } else r.classList.add("hidden");
  $("box-text").textContent = box ? `box [${box.join(", ")}]` : "whole image";
}

function toNatural(ev) {
  const rc = $("query-img").getBoundingClientRect();
  const [w, h] = state.natural;
  const x = Math.min(Math.max((ev.clientX - rc.left) / rc.width * w, 0), w);
  const y = Math.min(Math.max((ev.clientY - rc.top) / rc.height * h, 0), h);
  return [x, y];
}

function dragBox(a, b) {
  return [Math.floor(Math.min(a[0], b[0])), Math.floor(Math.min(a[1], b[1])),
          Math.ceil(Math.max(a[0], b[0])), Math.ceil(Math.max(a[1], b[1]))];
}

function initDrawing() {
  const img = $("query-img");
  img.addEventListener("mousedown", (ev) => {
    ev.preventDefault();
    state.drag = toNatural(ev);
  });
  window.addEventListener("mousemove", (ev) => {
    if (state.drag) setBox(dragBox(state.drag, toNatural(ev)));
  });
  window.addEventListener("mouseup", (ev) => {
    if (!state.drag) return;
    const b = dragBox(state.drag, toNatural(ev));
    state.drag = null;
    setBox(b[2] - b[0] >= 2 && b[3] - b[1] >= 2 ? b : null);  // a click: whole image
  });
}

async function runSearch() {
  if (!state.file) return;
  const form = new FormData();
  form.append("image", state.file, state.file.name || "photo.jpg");
  if (state.box) form.append("box", state.box.join(","));
  form.append("top", $("top").value);
  $("go").disabled = true;
  setStatus($("status"), "searching…");
  document.body.dataset.state = "searching";
  const t0 = performance.now();
  try {
    const res = await api("/api/search", { method: "POST", body: form });
    $("results").replaceChildren(...res.results.map(resultFigure));
    setStatus($("status"), `${res.results.length} of ${res.n_db} images: ` +
      timingText(res.timings_ms, performance.now() - t0));
    document.body.dataset.state = "done";
  } catch (e) {
    $("results").replaceChildren();
    setStatus($("status"), e.message, true);
    document.body.dataset.state = "error";
  } finally {
    $("go").disabled = false;
  }
}

function initUpload() {
  const drop = $("drop");
  $("file").addEventListener("change", (ev) => {
    if (ev.target.files.length) loadFile(ev.target.files[0]).catch(() => {});
  });
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    if (ev.dataTransfer.files.length) loadFile(ev.dataTransfer.files[0]).catch(() => {});
  });
  $("whole").addEventListener("click", () => setBox(null));
  $("go").addEventListener("click", runSearch);
  initDrawing();
}

// ---------------------------------------------------------------- dataset queries
async function loadQueries() {
  if (state.queries) return;
  const res = await api("/api/queries");
  state.queries = res.queries;
  $("query-list").replaceChildren(...res.queries.map((q) => {
    const fig = document.createElement("figure");
    fig.className = "result";
    fig.dataset.query = q.index;
    const img = document.createElement("img");
    img.src = `/query_image/${q.index}?size=160`; img.alt = q.name; img.loading = "lazy";
    const frame = document.createElement("div");
    frame.className = "frame";
    frame.appendChild(img);
    fig.appendChild(frame);
    const cap = document.createElement("figcaption");
    cap.textContent = `${q.name} (${q.n_positives} positives)`;
    fig.appendChild(cap);
    fig.addEventListener("click", () => showDatasetQuery(q.index));
    return fig;
  }));
}

async function showDatasetQuery(i) {
  $("gt-panel").classList.remove("hidden");
  setStatus($("gt-status"), "searching…");
  document.body.dataset.state = "searching";
  const t0 = performance.now();
  try {
    const res = await api(`/api/queries/${i}?top=${$("top").value}`);
    const dq = res.dataset_query;
    $("gt-title").textContent = `${dq.name} (${dq.n_positives} positives)`;
    const [w, h] = res.image_size;
    $("gt-query").replaceChildren(framedImage(`/query_image/${i}?size=512`, w, h,
                                              [[res.box, "query-box"]], dq.name));
    $("gt-results").replaceChildren(...res.results.map(resultFigure));
    setStatus($("gt-status"), `AP ${dq.ap === null ? "–" : dq.ap.toFixed(4)} · ` +
      timingText(res.timings_ms, performance.now() - t0));
    document.body.dataset.state = "done";
  } catch (e) {
    setStatus($("gt-status"), e.message, true);
    document.body.dataset.state = "error";
  }
}

function showView(name) {
  for (const b of document.querySelectorAll(".tab")) {
    b.classList.toggle("active", b.dataset.view === name);
  }
  $("view-upload").classList.toggle("hidden", name !== "upload");
  $("view-queries").classList.toggle("hidden", name !== "queries");
  if (name === "queries") {
    loadQueries().catch((e) => setStatus($("gt-status"), e.message, true));
  }
}

// ---------------------------------------------------------------- start
// URL parameters drive the page without a mouse (headless browser tests, screenshots):
// ?demo_query=I[&box=x1,y1,x2,y2] uploads dataset query I's photo through the upload path,
// draws the box and searches; ?view=queries[&query=I] opens the query browser.
async function fromUrl() {
  const p = new URLSearchParams(window.location.search);
  if (p.has("top")) $("top").value = p.get("top");
  if (p.has("demo_query")) {
    const i = p.get("demo_query");
    const r = await fetch(`/query_image/${encodeURIComponent(i)}/file`);
    if (!r.ok) { setStatus($("status"), `query ${i}: HTTP ${r.status}`, true); return; }
    const blob = await r.blob();
    await loadFile(new File([blob], `query_${i}.jpg`, { type: blob.type || "image/jpeg" }));
    if (p.has("box")) setBox(p.get("box").split(",").map(Number));
    await runSearch();
  } else if (p.get("view") === "queries") {
    showView("queries");
    if (p.has("query")) await showDatasetQuery(Number(p.get("query")));
  }
}

async function main() {
  for (const b of document.querySelectorAll(".tab")) {
    b.addEventListener("click", () => showView(b.dataset.view));
  }
  $("modal-close").addEventListener("click", () => $("modal").classList.add("hidden"));
  $("modal").addEventListener("click", (ev) => {
    if (ev.target === $("modal")) $("modal").classList.add("hidden");
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape") $("modal").classList.add("hidden");
  });
  initUpload();
  try {
    const info = await api("/api/info");
    state.info = info;
    $("dataset").textContent = `· ${info.dataset}`;
    $("top").value = info.default_top;
    const s = info.settings;
    $("run-info").textContent = `${info.n_db} images · ${s.network}, ${s.n_centers} words · ` +
      `masking ${s.masking}, augmentation ${s.augmentation}, re-ranking ${s.rerank ? "on" : "off"}` +
      `, query expansion ${s.query_expansion} · uploads up to ` +
      `${Math.round(info.limits.max_upload_bytes / 1048576)} MB`;
  } catch (e) {
    setStatus($("status"), e.message, true);
  }
  await fromUrl();
}

main();
