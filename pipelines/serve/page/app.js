// The search page of `isa serve`: one query image + a change in words -> POST search -> the gallery's best k.
// Plain browser JavaScript, no build step. Paths are relative to the page (its <base href> is the app's root).
"use strict";

const OVERLAY = 128; // side of each attention canvas in pixels (drawn at this size, shown at 96 CSS px)
const form = document.getElementById("search-form");
const fileInput = document.getElementById("image");
const textInput = document.getElementById("text");
const kInput = document.getElementById("k");
const submit = document.getElementById("submit");
const statusLine = document.getElementById("status");
const results = document.getElementById("results");
const examples = document.getElementById("examples");
const preview = document.getElementById("query-preview");
const previewImage = document.getElementById("query-image");
const attentionBlock = document.getElementById("attention-block");
const attention = document.getElementById("attention");

let query = null; // {blob, name}

function setStatus(text, error = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", error);
}

function setQuery(blob, name) {
  query = { blob, name };
  submit.disabled = false;
  previewImage.src = URL.createObjectURL(blob);
  preview.hidden = false;
  attention.replaceChildren();
  attentionBlock.hidden = true;
}

fileInput.addEventListener("change", () => {
  for (const img of examples.querySelectorAll("img")) img.classList.remove("chosen");
  if (fileInput.files.length) setQuery(fileInput.files[0], fileInput.files[0].name);
});

async function loadExamples() {
  try {
    const response = await fetch("gallery?n=12");
    if (!response.ok) return;
    const { ids } = await response.json();
    for (const id of ids) {
      const img = document.createElement("img");
      img.src = `images/${encodeURIComponent(id)}?size=96`;
      img.alt = `gallery image ${id}`;
      img.title = "use as the query image";
      img.className = "example";
      img.dataset.id = id;
      img.addEventListener("click", async () => {
        const response = await fetch(`images/${encodeURIComponent(id)}?size=512`);
        if (!response.ok) return setStatus(`cannot load gallery image ${id}`, true);
        for (const other of examples.querySelectorAll("img")) other.classList.toggle("chosen", other === img);
        fileInput.value = "";
        setQuery(await response.blob(), `${id}.jpg`);
      });
      examples.appendChild(img);
    }
  } catch (error) {
    // examples are optional: the file input still works
  }
}

function showResults(hits) {
  results.replaceChildren();
  hits.forEach((hit, rank) => {
    const figure = document.createElement("figure");
    figure.className = "result";
    figure.dataset.id = hit.id;
    figure.dataset.score = String(hit.score);
    figure.dataset.rank = String(rank + 1);
    const img = document.createElement("img");
    img.src = `images/${encodeURIComponent(hit.id)}`;
    img.alt = hit.uri;
    img.loading = "lazy";
    const caption = document.createElement("figcaption");
    caption.innerHTML = `<span class="rank">#${rank + 1}</span> ${hit.score.toFixed(4)}`;
    caption.title = hit.uri;
    figure.append(img, caption);
    results.appendChild(figure);
  });
}

// The student's view is the centre square of the image; each map (h x w) lies over that square.
function centreSquare(image) {
  const side = Math.min(image.width, image.height);
  return [(image.width - side) / 2, (image.height - side) / 2, side, side];
}

async function showAttention(maps) {
  attention.replaceChildren();
  if (!maps || !maps.length) return;
  const image = await createImageBitmap(query.blob);
  const [sx, sy, sw, sh] = centreSquare(image);
  maps.forEach((map, token) => {
    const h = map.length, w = map[0].length;
    let peak = 1e-12;
    for (const row of map) for (const v of row) peak = Math.max(peak, v);
    const heat = document.createElement("canvas");
    heat.width = w;
    heat.height = h;
    const pixels = heat.getContext("2d").createImageData(w, h);
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        const at = 4 * (y * w + x);
        pixels.data[at] = 255;
        pixels.data[at + 3] = Math.round((map[y][x] / peak) * 0.7 * 255);
      }
    }
    heat.getContext("2d").putImageData(pixels, 0, 0);
    const canvas = document.createElement("canvas");
    canvas.width = OVERLAY;
    canvas.height = OVERLAY;
    canvas.dataset.token = String(token + 1);
    const context = canvas.getContext("2d");
    context.imageSmoothingEnabled = true;
    context.drawImage(image, sx, sy, sw, sh, 0, 0, OVERLAY, OVERLAY);
    context.drawImage(heat, 0, 0, OVERLAY, OVERLAY);
    const figure = document.createElement("figure");
    const caption = document.createElement("figcaption");
    caption.textContent = `word ${token + 1}`;
    figure.append(canvas, caption);
    attention.appendChild(figure);
  });
  attentionBlock.hidden = false;
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!query) return setStatus("choose a query image first", true);
  const data = new FormData();
  data.append("image", query.blob, query.name);
  data.append("text", textInput.value);
  data.append("k", kInput.value);
  document.body.dataset.state = "searching";
  setStatus("searching…");
  submit.disabled = true;
  try {
    const started = performance.now();
    const response = await fetch("search", { method: "POST", body: data });
    const body = await response.json();
    if (!response.ok) {
      setStatus(`${response.status}: ${body.detail}`, true);
      document.body.dataset.state = "error";
      return;
    }
    showResults(body.results);
    await showAttention(body.attention);
    const ms = Math.round(performance.now() - started);
    setStatus(`${body.results.length} results in ${ms} ms`);
    document.body.dataset.state = "done";
  } catch (error) {
    setStatus(`search failed: ${error}`, true);
    document.body.dataset.state = "error";
  } finally {
    submit.disabled = false;
  }
});

fetch("healthz")
  .then((r) => r.json())
  .then((health) => {
    kInput.max = String(health.limits.max_k);
  })
  .catch(() => {});
loadExamples();
