// csearch web page: upload a photo, show the category, the cut-out and the top-k matches; click a
// match to compare its object mask with the photo's. Every text from the server (product names
// come from whoever added the item) goes through textContent, never innerHTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { queryMask: null, running: null, photoUrl: null };

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const message = body && body.error ? body.error : `${response.status} ${response.statusText}`;
    throw new Error(message);
  }
  return body;
}

function setStatus(text, kind) {
  const status = $("status");
  status.textContent = text;
  status.className = kind || "";
}

function fmt(value, digits = 3) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

async function loadIndexInfo() {
  try {
    const [stats, health] = await Promise.all([api("/stats"), api("/health")]);
    const names = Object.keys(stats.categories);
    $("index-info").textContent =
      `${stats.items} catalogue images · ${names.length} categories · extractor ${stats.models.extractor}`;
    const select = $("category");
    // without a classifier nothing is predicted: every search covers all categories
    select.options[0].textContent = health.classifier ? "predicted" : "all categories";
    for (const name of names) {
      const option = document.createElement("option");
      option.value = name;
      option.textContent = name;
      select.append(option);
    }
  } catch (error) {
    $("index-info").textContent = `index information unavailable: ${error.message}`;
  }
}

function searchForm(file) {
  const form = new FormData();
  form.append("file", file);
  form.append("k", $("k").value);
  form.append("visuals", "true");
  if ($("category").value) form.append("category", $("category").value);
  if ($("rerank").value) form.append("rerank", $("rerank").value);
  return form;
}

async function search(file) {
  if (state.running) state.running.abort(); // the newest photo wins
  const controller = new AbortController();
  state.running = controller;
  showPhoto(file);
  setStatus("Searching…", "busy");
  try {
    const result = await api("/search", { method: "POST", body: searchForm(file), signal: controller.signal });
    render(result);
    setStatus(`${result.results.length} matches`);
  } catch (error) {
    if (error.name === "AbortError") return;
    clearQuery(); // a failed search shows only its error, nothing of the photo or the last search
    setStatus(error.message, "error");
  } finally {
    if (state.running === controller) state.running = null;
  }
}

function showPhoto(file) {
  if (state.photoUrl) URL.revokeObjectURL(state.photoUrl);
  state.photoUrl = URL.createObjectURL(file);
  $("query-photo").src = state.photoUrl;
  $("cutout").removeAttribute("src");
  $("localizer").textContent = "";
  $("predicted").textContent = "…";
  $("timings").textContent = "";
  $("query").hidden = false;
}

function clearQuery() {
  if (state.photoUrl) URL.revokeObjectURL(state.photoUrl);
  state.photoUrl = null;
  state.queryMask = null;
  $("query").hidden = true;
  $("query-photo").removeAttribute("src");
  $("cutout").removeAttribute("src");
  $("localizer").textContent = "";
  $("predicted").textContent = "";
  $("timings").textContent = "";
  $("results").replaceChildren();
  $("results-title").hidden = true;
}

function render(result) {
  state.queryMask = result.query_mask || null;
  if (result.cutout) $("cutout").src = result.cutout;
  $("localizer").textContent = result.localizer ? `(${result.localizer})` : "";
  $("predicted").textContent = result.category || "all categories";
  const t = result.timings_ms || {};
  $("timings").textContent = `server time ${fmt(t.total, 0)} ms` + (t.queue ? ` + ${fmt(t.queue, 0)} ms queued` : "");
  $("results").replaceChildren(...result.results.map(card));
  $("results-title").hidden = result.results.length === 0;
}

function card(hit, index) {
  const item = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "card";
  button.dataset.id = hit.id;
  const image = document.createElement("img");
  image.src = hit.thumbnail_url;
  image.alt = hit.product || `item ${hit.id}`;
  image.loading = "lazy";
  const rank = document.createElement("div");
  rank.className = "rank";
  rank.textContent = `#${index + 1}`;
  const product = document.createElement("p");
  product.className = "product";
  product.textContent = hit.product || `item ${hit.id}`;
  product.title = product.textContent; // the card shows two lines at most
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = `${hit.category || "unlabelled"} · score ${fmt(hit.score)}` +
    (hit.iou === null ? "" : ` · IoU ${fmt(hit.iou)}`);
  meta.title = meta.textContent;
  button.append(image, rank, product, meta);
  button.addEventListener("click", () => openDetail(hit));
  item.append(button);
  return item;
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error(`could not load ${src.slice(0, 40)}`));
    image.src = src;
  });
}

// The IoU of two same-size RGBA mask images (a pixel is in a mask where its alpha is set):
// the overlay's own IoU, available even when the search did not re-rank by masks.
async function maskIoU(srcA, srcB) {
  const [a, b] = await Promise.all([loadImage(srcA), loadImage(srcB)]);
  const size = a.naturalWidth;
  const pixels = (image) => {
    const canvas = document.createElement("canvas");
    canvas.width = canvas.height = size;
    const context = canvas.getContext("2d");
    context.drawImage(image, 0, 0, size, size);
    return context.getImageData(0, 0, size, size).data;
  };
  const pa = pixels(a), pb = pixels(b);
  let inter = 0, union = 0;
  for (let i = 3; i < pa.length; i += 4) {
    const x = pa[i] > 0, y = pb[i] > 0;
    if (x && y) inter += 1;
    if (x || y) union += 1;
  }
  return union === 0 ? 0 : inter / union;
}

async function openDetail(hit) {
  $("detail-title").textContent = hit.product || `item ${hit.id}`;
  $("detail-category").textContent = `${hit.category || "unlabelled"} · id ${hit.id}`;
  $("detail-image").src = hit.image_url;
  $("detail-item-mask").src = hit.mask_url;
  $("detail-query-mask").hidden = !state.queryMask;
  if (state.queryMask) $("detail-query-mask").src = state.queryMask;
  $("detail-iou").textContent = "…";
  $("detail-scores").textContent = `distance ${fmt(hit.distance)} · score ${fmt(hit.score)}` +
    (hit.iou === null ? "" : ` · IoU used for ranking ${fmt(hit.iou)}`);
  $("detail").showModal();
  try {
    $("detail-iou").textContent = state.queryMask ? fmt(await maskIoU(state.queryMask, hit.mask_url)) : "–";
  } catch (error) {
    $("detail-iou").textContent = `unavailable (${error.message})`;
  }
}

function wireDropZone() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => {
    if (event.target.files.length) search(event.target.files[0]);
  });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file) search(file);
  });
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("file").click(); }
  });
}

function wireDialog() {
  const dialog = $("detail");
  $("close").addEventListener("click", () => dialog.close());
  dialog.addEventListener("click", (event) => { if (event.target === dialog) dialog.close(); });
  $("show-query").addEventListener("change", (e) => { $("detail-query-mask").style.visibility = e.target.checked ? "" : "hidden"; });
  $("show-item").addEventListener("change", (e) => { $("detail-item-mask").style.visibility = e.target.checked ? "" : "hidden"; });
}

wireDropZone();
wireDialog();
loadIndexInfo();
