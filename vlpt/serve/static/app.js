// vlpt serve's page: search by text, by image (upload / drop) or by a result; caption, answer, generate.
// Plain DOM and fetch; everything comes from this server (no CDN).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { features: [], current: null };  // current: base64 of the image the panels work on

function showError(message) {
  const el = $("error");
  el.textContent = message || "";
  el.hidden = !message;
}

async function call(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

function toBase64(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(new Error("could not read the file"));
    reader.readAsDataURL(blob);
  });
}

function setCurrent(base64, type, source) {
  state.current = base64;
  $("current").src = `data:${type || "image/png"};base64,${base64}`;
  $("current-source").textContent = source;
  $("caption").textContent = "";
  $("answer").textContent = "";
  $("current-panel").hidden = !(state.features.includes("caption") || state.features.includes("answer"));
}

function render(results, what) {
  const grid = $("results");
  grid.replaceChildren();
  $("summary").textContent = `${results.length} result(s) for ${what}`;
  for (const r of results) {
    const card = document.createElement("figure");
    card.className = "result";
    card.tabIndex = 0;
    card.dataset.id = r.id;
    if (r.image_id !== null && r.image_id !== undefined) card.dataset.imageId = r.image_id;
    card.dataset.label = r.label || "";
    card.dataset.caption = r.caption || "";
    if (r.image_url) {
      const img = document.createElement("img");
      img.src = r.image_url;
      img.alt = r.caption || r.path || `item ${r.id}`;
      img.loading = "lazy";
      card.append(img);
    }
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = r.score.toFixed(3);
    const caption = document.createElement("div");
    caption.className = "caption";
    caption.textContent = r.caption || r.path || "";
    const label = document.createElement("div");
    label.className = "label";
    label.textContent = r.label ? `${r.label} · #${r.id}` : `#${r.id}`;
    card.append(score, caption, label);
    if (card.dataset.imageId !== undefined) {
      const open = () => searchByItem(Number(card.dataset.imageId), r);
      card.addEventListener("click", open);
      card.addEventListener("keydown", (e) => { if (e.key === "Enter") open(); });
    }
    grid.append(card);
  }
  document.body.dataset.searches = String(Number(document.body.dataset.searches || 0) + 1);
}

function options() {
  return { k: Number($("k").value), modality: $("modality").value, dedup: $("dedup").checked };
}

// true when the search succeeded (its results are shown); false when its error is shown instead
async function search(query, what) {
  showError("");
  $("search-button").disabled = true;
  try {
    const response = await call("/search", { ...query, ...options() });
    render((await response.json()).results, what);
    return true;
  } catch (err) {
    showError(err.message);
    return false;
  } finally {
    $("search-button").disabled = false;
  }
}

async function searchByItem(id, result) {
  if (!(await search({ item: id }, `item #${id}`))) return;
  if (result && result.image_url) {
    try {
      const blob = await (await fetch(result.image_url)).blob();
      setCurrent(await toBase64(blob), blob.type, `item #${id}`);
    } catch (err) { showError(err.message); }
  }
}

async function searchByFile(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) { showError(`${file.name} is not an image`); return; }
  const base64 = await toBase64(file);
  // a file the server refuses does not replace the current image: its error is shown instead
  if (await search({ image: base64 }, file.name)) setCurrent(base64, file.type, file.name);
}

function wire() {
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("query").value.trim();
    if (text) search({ text }, `“${text}”`);
  });
  $("upload").addEventListener("change", (e) => searchByFile(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    searchByFile(e.dataTransfer.files[0]);
  });
  $("caption-button").addEventListener("click", async () => {
    if (!state.current) return;
    showError("");
    try {
      const r = await (await call("/caption", { image: state.current })).json();
      $("caption").textContent = r.caption;
    } catch (err) { showError(err.message); }
  });
  $("answer-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const question = $("question").value.trim();
    if (!state.current || !question) return;
    showError("");
    $("answer").textContent = "…";
    try {
      const r = await (await call("/answer", { image: state.current, question })).json();
      $("answer").textContent = `${r.answer} (p=${r.probability.toFixed(2)})`;
      $("answer").dataset.answer = r.answer;
    } catch (err) { $("answer").textContent = ""; showError(err.message); }
  });
  $("generate-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text) return;
    showError("");
    $("generate").disabled = true;
    try {
      const blob = await (await call("/generate", { text })).blob();
      const img = $("generated");
      img.src = URL.createObjectURL(blob);
      img.hidden = false;
    } catch (err) { showError(err.message); } finally { $("generate").disabled = false; }
  });
}

async function start() {
  wire();
  try {
    const meta = await (await fetch("/meta")).json();
    state.features = meta.features || [];
    const index = meta.index;
    $("status").textContent = index
      ? `${index.counts.images} images, ${index.counts.texts} captions indexed` + (meta.ready ? "" : " (loading…)")
      : "no index loaded";
    $("caption-panel").hidden = !state.features.includes("caption");
    $("answer-panel").hidden = !state.features.includes("answer");
    $("generate-panel").hidden = !state.features.includes("generate");
    if (!state.features.includes("search")) $("query-panel").hidden = true;
    if (!(index && index.indexes.text)) $("modality").querySelector("[value=text]").disabled = true;
    document.body.dataset.ready = "1";
  } catch (err) {
    showError(`cannot reach the server: ${err.message}`);
  }
}

start();
