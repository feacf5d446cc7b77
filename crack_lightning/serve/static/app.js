// The inspector's page: drop photos, watch the answers fill in, look where the cracks are.
// Plain JavaScript served by the server itself: works with no internet.
"use strict";

const IN_FLIGHT = 4;          // requests at once; the server batches them together
const results = [];           // {file, name, probability, label, error, row}
const queue = [];
let running = 0;
let threshold = null;
let crackLabel = "Positive";
let apiKey = sessionStorage.getItem("crack_api_key") || "";
let segmentation = false;     // the server has a crack-map model (POST /v1/segment)
let cracks = [];              // the open photo's cracks, as /v1/segment answered
let sortKey = "max_width";
let sites = false;            // the server keeps site profiles (the review loop)

const $ = (id) => document.getElementById(id);

function headers() {
  return apiKey ? { "X-API-Key": apiKey } : {};
}

async function health() {
  const r = await fetch("/healthz", { headers: headers() });
  if (r.status === 401) {
    $("key-box").hidden = false;
    $("model").textContent = "this server needs an API key";
    return;
  }
  const h = await r.json();
  threshold = h.threshold;
  segmentation = Boolean(h.segment);
  sites = Boolean(h.sites);
  $("site-box").hidden = !sites;
  crackLabel = h.class_names ? h.class_names[1] : crackLabel;
  $("key-box").hidden = true;
  $("model").textContent = `model ${h.model}, crack when probability ≥ ${h.threshold.toFixed(3)}`;
}

function addFiles(files) {
  const images = Array.from(files).filter((f) => f.type.startsWith("image/") || /\.(jpe?g|png|bmp|tiff?|webp)$/i.test(f.name));
  if (!images.length) return;
  $("results").hidden = false;
  $("toolbar").hidden = false;
  for (const file of images) {
    const entry = { file, name: file.name, probability: null, label: "", error: "" };
    entry.row = document.createElement("tr");
    entry.row.className = "pending";
    const thumb = document.createElement("img");
    thumb.alt = file.name;
    thumb.src = URL.createObjectURL(file);
    const cells = [thumb, file.name, "…", "waiting"].map((content, i) => {
      const td = document.createElement("td");
      if (i === 3) td.className = "label";
      if (i === 2) td.className = "probability";
      if (content instanceof Node) td.appendChild(content); else td.textContent = content;
      return td;
    });
    cells.forEach((td) => entry.row.appendChild(td));
    entry.row.addEventListener("click", () => openViewer(entry));
    $("results").tBodies[0].appendChild(entry.row);
    results.push(entry);
    queue.push(entry);
  }
  pump();
}

function progress() {
  const done = results.filter((e) => e.probability !== null || e.error).length;
  const cracks = results.filter((e) => e.label === crackLabel).length;
  $("progress").textContent = `${done} of ${results.length} answered, ${cracks} with a crack`;
}

function pump() {
  progress();
  while (running < IN_FLIGHT && queue.length) {
    const entry = queue.shift();
    running += 1;
    classify(entry).finally(() => { running -= 1; pump(); });
  }
}

async function classify(entry, attempt = 0) {
  const body = new FormData();
  body.append("files", entry.file, entry.name);
  let answer;
  try {
    const r = await fetch(`/v1/predict${siteQuery()}`, { method: "POST", body, headers: headers() });
    if (r.status === 503 && attempt < 5) {  // busy: wait and try again
      await new Promise((ok) => setTimeout(ok, 1000 * (attempt + 1)));
      return classify(entry, attempt + 1);
    }
    const json = await r.json();
    if (!r.ok) throw new Error(json.error || r.statusText);
    answer = json.results[0];
    threshold = json.threshold;
  } catch (err) {
    answer = { error: String(err.message || err) };
  }
  const cells = entry.row.cells;
  if (answer.error) {
    entry.error = answer.error;
    entry.row.className = "error";
    cells[2].textContent = "";
    cells[3].textContent = `error: ${answer.error}`;
  } else {
    entry.probability = answer.probability;
    entry.label = answer.label;
    entry.row.className = answer.label === crackLabel ? "crack" : "clean";
    cells[2].textContent = answer.probability.toFixed(6);
    cells[3].textContent = answer.label;
  }
}

let viewing = null;  // the entry the viewer shows

async function openViewer(entry) {
  if (entry.error) return;
  if (viewing !== entry) $("review-status").textContent = "";
  viewing = entry;
  $("crack-map").hidden = true;
  const canvas = $("cracks");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  $("viewer").hidden = false;
  $("viewer-title").textContent = entry.name;
  $("viewer-status").textContent = "finding the cracks…";
  $("photo").src = entry.row.cells[0].firstChild.src;
  $("heat").removeAttribute("src");
  $("tiles").innerHTML = "";
  const body = new FormData();
  body.append("file", entry.file, entry.name);
  const r = await fetch(`/v1/localize${siteQuery()}`, { method: "POST", body, headers: headers() });
  const loc = await r.json();
  $("review").hidden = !(sites && site());
  if (!r.ok) {
    $("viewer-status").textContent = `error: ${loc.error}`;
    return;
  }
  $("heat").src = `data:image/png;base64,${loc.heatmap_png}`;
  const svg = $("tiles");
  svg.onclick = (ev) => {  // a click off the outlined tiles: "a crack is here" (the 112 px tile around it)
    if (ev.target !== svg || !sites || !site()) return;
    const box = svg.getBoundingClientRect();
    const side = Math.min(112, loc.width, loc.height);
    const cx = ((ev.clientX - box.left) / box.width) * loc.width, cy = ((ev.clientY - box.top) / box.height) * loc.height;
    const x = Math.round(Math.min(Math.max(cx - side / 2, 0), loc.width - side));
    const y = Math.round(Math.min(Math.max(cy - side / 2, 0), loc.height - side));
    mark(entry, "crack", { x, y, width: side, height: side });
  };
  svg.setAttribute("viewBox", `0 0 ${loc.width} ${loc.height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  for (const t of loc.tiles.filter((t) => t.probability >= loc.threshold)) {
    const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    for (const [k, v] of Object.entries({ x: t.x, y: t.y, width: t.width, height: t.height })) rect.setAttribute(k, v);
    rect.addEventListener("click", () => mark(entry, "no crack", t));  // a false alarm: this tile shows no crack
    svg.appendChild(rect);
  }
  $("viewer-status").textContent = `${loc.label} (${loc.probability.toFixed(6)}): ${loc.crack_tiles} of ` +
    `${loc.tiles.length} tiles show a crack (${(100 * loc.crack_fraction).toFixed(1)}% of the surface; outlined in yellow)`;
  if (segmentation) await crackMap(entry);
}

function site() { return $("site").value.trim(); }
function siteQuery() { return sites && site() ? `?site=${encodeURIComponent(site())}` : ""; }

// The review loop: the inspector's mark goes to the site's profile, the site's model is refitted, and the
// photo and its row are answered again by it
async function mark(entry, label, tile = null) {
  if (!sites || !site()) return;
  $("review-status").textContent = "learning…";
  const body = new FormData();
  body.append("file", entry.file, entry.name);
  const q = new URLSearchParams({ label });
  if (tile) for (const k of ["x", "y", "width", "height"]) q.set(k, tile[k]);
  const r = await fetch(`/v1/sites/${encodeURIComponent(site())}/marks?${q}`, { method: "POST", body, headers: headers() });
  const out = await r.json();
  if (!r.ok) {
    $("review-status").textContent = `error: ${out.error}`;
    return;
  }
  await Promise.all(results.filter((e) => !e.error).map((e) => classify(e)));  // every row, by the site's model
  progress();
  if (viewing === entry && !$("viewer").hidden) await openViewer(entry);
  $("review-status").textContent = `learned: ${out.marks} mark(s) on site ${out.site}, threshold ${out.threshold.toFixed(3)}`;
}

// The crack map: every crack pixel in magenta over the photo, and a table of the cracks (sortable)
async function crackMap(entry) {
  $("crack-map").hidden = false;
  $("crack-status").textContent = "tracing each crack…";
  const body = new FormData();
  body.append("file", entry.file, entry.name);
  const scale = parseFloat($("scale").value);
  const query = scale > 0 ? `?mm_per_pixel=${scale}` : "";
  const r = await fetch(`/v1/segment${query}`, { method: "POST", body, headers: headers() });
  const seg = await r.json();
  if (!r.ok) {
    $("crack-status").textContent = `error: ${seg.error}`;
    return;
  }
  const mask = new Image();
  mask.onload = () => {
    const canvas = $("cracks");
    canvas.width = seg.width;
    canvas.height = seg.height;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(mask, 0, 0);
    const px = ctx.getImageData(0, 0, seg.width, seg.height);
    for (let i = 0; i < px.data.length; i += 4) {  // crack pixels solid magenta, the rest untouched
      const on = px.data[i] > 127;
      px.data[i] = 255; px.data[i + 1] = 0; px.data[i + 2] = 255; px.data[i + 3] = on ? 255 : 0;
    }
    ctx.putImageData(px, 0, 0);
  };
  mask.src = `data:image/png;base64,${seg.mask_png}`;
  const mm = scale > 0;
  cracks = seg.cracks.map((c) => ({
    id: c.id, length: mm ? c.length_mm : c.length_px, max_width: mm ? c.max_width_mm : c.max_width_px,
    mean_width: mm ? c.mean_width_mm : c.mean_width_px, severity: c.severity || "", unit: mm ? "mm" : "px",
  }));
  // a measurement of what is there, not a second verdict: the photo's answer is the table's (its tiles)
  $("crack-status").textContent = `${seg.cracks.length} crack(s) traced and measured (magenta on the photo)`;
  renderCracks();
}

function renderCracks() {
  const body = $("crack-table").tBodies[0];
  body.innerHTML = "";
  const sorted = [...cracks].sort((a, b) => (sortKey === "id" ? a.id - b.id : (b[sortKey] > a[sortKey] ? 1 : -1)));
  for (const c of sorted) {
    const tr = body.insertRow();
    const fmt = (v) => `${Number(v).toFixed(c.unit === "mm" ? 3 : 1)} ${c.unit}`;
    for (const v of [c.id, fmt(c.length), fmt(c.max_width), fmt(c.mean_width), c.severity]) tr.insertCell().textContent = v;
    tr.cells[4].className = c.severity;
  }
  for (const th of $("crack-table").tHead.rows[0].cells) th.classList.toggle("sorted", th.dataset.key === sortKey);
}

function download(name, type, text) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([text], { type }));
  a.download = name;
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

function rows() {
  return results.map((e) => ({ filename: e.name, probability: e.probability === null ? null : e.probability.toFixed(6),
    label: e.label, error: e.error }));
}

function csvCell(value) {
  let s = value === null || value === undefined ? "" : String(value);
  if (/^[=+\-@\t\r]/.test(s)) s = `'${s}`;  // never a formula when opened in a spreadsheet
  return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

$("csv").addEventListener("click", () => {
  const lines = [["filename", "probability", "label", "error"].join(",")];
  for (const r of rows()) lines.push([r.filename, r.probability, r.label, r.error].map(csvCell).join(","));
  download("crack_predictions.csv", "text/csv", lines.join("\r\n") + "\r\n");
});
$("json").addEventListener("click", () => {
  download("crack_predictions.json", "application/json", JSON.stringify({ threshold, results: rows() }, null, 2));
});
$("clear").addEventListener("click", () => {
  queue.length = 0;
  results.splice(0).forEach((e) => { URL.revokeObjectURL(e.row.cells[0].firstChild.src); e.row.remove(); });
  progress();
});
$("close").addEventListener("click", () => { $("viewer").hidden = true; });
for (const th of $("crack-table").tHead.rows[0].cells) {
  th.addEventListener("click", () => { sortKey = th.dataset.key; renderCracks(); });
}
$("mark-clean").addEventListener("click", () => { if (viewing) mark(viewing, "no crack"); });
$("mark-crack").addEventListener("click", () => { if (viewing) mark(viewing, "crack"); });
$("site").value = localStorage.getItem("crack_site") || "";
$("site").addEventListener("change", () => { localStorage.setItem("crack_site", site()); });
$("measure").addEventListener("click", () => { if (viewing) crackMap(viewing); });
$("viewer").addEventListener("click", (ev) => { if (ev.target === $("viewer")) $("viewer").hidden = true; });
document.addEventListener("keydown", (ev) => { if (ev.key === "Escape") $("viewer").hidden = true; });
$("key-save").addEventListener("click", () => {
  apiKey = $("api-key").value;
  sessionStorage.setItem("crack_api_key", apiKey);
  health();
});
$("files").addEventListener("change", (ev) => { addFiles(ev.target.files); ev.target.value = ""; });
const drop = $("drop");
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (ev) => { ev.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
drop.addEventListener("drop", (ev) => { ev.preventDefault(); addFiles(ev.dataTransfer.files); });
health();
