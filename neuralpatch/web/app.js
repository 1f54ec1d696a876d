// neuralpatch serve: the page. The brush paints on an HTML canvas the size of the image; the
// server decodes uploads, runs the pipeline and encodes every PNG, so a download is its bytes.
"use strict";

const $ = (id) => document.getElementById(id);
const imageCanvas = $("image-canvas");
const maskCanvas = $("mask-canvas");
const maskCtx = maskCanvas.getContext("2d", { willReadFrequently: false });
const HOLE_COLOUR = "rgb(255, 0, 110)";
const UNDO_BYTES = 512 * 1024 * 1024; // snapshots kept for undo, at most (one is always kept)

const state = {
  name: "image",
  pngBlob: null,       // the server's PNG of the image: painted on, and sent back to run
  width: 0,
  height: 0,
  undo: [],            // [{data: ImageData, box}]
  box: null,           // bounding box [y0, y1, x0, x1] of what was painted (never shrunk by the eraser)
  painting: false,
  last: null,
  running: null,       // AbortController of the run in flight
  urls: [],
  info: null,
};

function showMessage(text) {
  const el = $("message");
  el.textContent = text || "";
  el.hidden = !text;
}

function setStatus(text) {
  $("status").textContent = text;
}

function b64ToBlob(b64, type = "image/png") {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type });
}

function keepUrl(blob) {
  const url = URL.createObjectURL(blob);
  state.urls.push(url);
  return url;
}

function formatSeconds(s) {
  if (s < 90) return `${Math.max(1, Math.round(s))} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error || JSON.stringify(body);
  } catch (e) {
    return `the server answered ${response.status} ${response.statusText}`;
  }
}

// ------------------------------------------------------------------ loading

async function loadInfo() {
  const response = await fetch("/api/info");
  state.info = await response.json();
  const select = $("preset");
  for (const name of state.info.presets) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    select.appendChild(option);
  }
  select.value = state.info.default_preset;
}

async function openImage(response, name) {
  if (!response.ok) {
    showMessage(await errorText(response));
    return;
  }
  const body = await response.json();
  const blob = b64ToBlob(body.png);
  const bitmap = await createImageBitmap(blob);
  for (const url of state.urls) URL.revokeObjectURL(url);
  state.urls = [];
  state.name = name;
  state.pngBlob = blob;
  state.width = body.width;
  state.height = body.height;
  for (const canvas of [imageCanvas, maskCanvas]) {
    canvas.width = body.width;
    canvas.height = body.height;
  }
  imageCanvas.getContext("2d").drawImage(bitmap, 0, 0);
  state.undo = [];
  state.box = null;
  if (body.mask_png) {
    await drawMaskPng(body.mask_png);
  }
  $("stage").hidden = false;
  fitStage();
  $("scales").replaceChildren();
  showResult(null);
  updateButtons();
  await updateEstimate();
}

async function drawMaskPng(b64) {
  // a white-on-black mask -> the hole colour where white
  const bitmap = await createImageBitmap(b64ToBlob(b64));
  const scratch = new OffscreenCanvas(state.width, state.height);
  const ctx = scratch.getContext("2d");
  ctx.drawImage(bitmap, 0, 0);
  const pixels = ctx.getImageData(0, 0, state.width, state.height);
  const out = maskCtx.createImageData(state.width, state.height);
  let y0 = state.height, y1 = 0, x0 = state.width, x1 = 0;
  for (let i = 0; i < pixels.data.length; i += 4) {
    if (pixels.data[i] >= 128) {
      out.data.set([255, 0, 110, 255], i);
      const p = i / 4, y = Math.floor(p / state.width), x = p % state.width;
      y0 = Math.min(y0, y); y1 = Math.max(y1, y + 1); x0 = Math.min(x0, x); x1 = Math.max(x1, x + 1);
    }
  }
  maskCtx.putImageData(out, 0, 0);
  state.box = y1 > y0 ? [y0, y1, x0, x1] : null;
}

function fitStage() {
  // as large as the window allows, up to 3x the image (small images are shown enlarged)
  if (!state.width) return;
  const room = document.querySelector("main").clientWidth - 2;
  const tall = Math.max(240, window.innerHeight - 330) * (state.width / state.height);
  const width = Math.min(room, 1200, tall, state.width * 3);
  $("stage").style.width = `${Math.max(64, Math.floor(width))}px`;
}
window.addEventListener("resize", fitStage);

$("file").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  event.target.value = "";
  if (!file) return;
  showMessage("");
  setStatus(`Reading ${file.name}…`);
  const form = new FormData();
  form.append("image", file, file.name);
  try {
    await openImage(await fetch("/api/image", { method: "POST", body: form }), file.name.replace(/\.[^.]*$/, ""));
  } catch (e) {
    showMessage(`Could not open ${file.name}: ${e.message}`);
  }
  setStatus("");
});

$("demo").addEventListener("click", async () => {
  showMessage("");
  setStatus("Loading the demo photo…");
  try {
    await openImage(await fetch("/api/demo"), "rocket");
  } catch (e) {
    showMessage(`Could not load the demo: ${e.message}`);
  }
  setStatus("");
});

// ------------------------------------------------------------------ estimate

async function updateEstimate() {
  if (!state.pngBlob) return;
  const preset = $("preset").value;
  const response = await fetch("/api/estimate", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ width: state.width, height: state.height, preset, box: state.box }),
  });
  const where = `${state.info.device}`;
  let time = "no estimate yet";
  if (response.ok) {
    const e = await response.json();
    if (e.seconds !== null) {
      const what = e.whole_image ? "up to" : "about";
      const hole = e.whole_image ? "for a hole as large as the image" : "for this hole";
      time = `${preset}: ${what} ${formatSeconds(e.seconds)} on ${where} ${hole}, ${e.scales} scale${e.scales > 1 ? "s" : ""} (${e.basis})`;
    } else {
      time = `${preset}: ${e.basis}`;
    }
  }
  $("info").textContent = `${state.name}: ${state.width}×${state.height}, long side ${Math.max(state.width, state.height)} px · ${time}`;
}

$("preset").addEventListener("change", updateEstimate);

// ------------------------------------------------------------------ brush

function toImage(event) {
  const rect = maskCanvas.getBoundingClientRect();
  return {
    x: ((event.clientX - rect.left) * maskCanvas.width) / rect.width,
    y: ((event.clientY - rect.top) * maskCanvas.height) / rect.height,
  };
}

function brushSize() {
  return Number($("brush-size").value);
}

function erasing() {
  return $("tool-eraser").checked;
}

function pushUndo() {
  const snapshot = { data: maskCtx.getImageData(0, 0, maskCanvas.width, maskCanvas.height), box: state.box };
  state.undo.push(snapshot);
  let bytes = state.undo.reduce((n, s) => n + s.data.data.length, 0);
  while (state.undo.length > 1 && bytes > UNDO_BYTES) {
    bytes -= state.undo.shift().data.data.length;
  }
}

function grow(box, p, r) {
  const y0 = Math.max(0, Math.floor(p.y - r)), y1 = Math.min(state.height, Math.ceil(p.y + r));
  const x0 = Math.max(0, Math.floor(p.x - r)), x1 = Math.min(state.width, Math.ceil(p.x + r));
  if (!box) return [y0, y1, x0, x1];
  return [Math.min(box[0], y0), Math.max(box[1], y1), Math.min(box[2], x0), Math.max(box[3], x1)];
}

function segment(from, to) {
  maskCtx.globalCompositeOperation = erasing() ? "destination-out" : "source-over";
  maskCtx.strokeStyle = HOLE_COLOUR;
  maskCtx.lineWidth = brushSize();
  maskCtx.lineCap = "round";
  maskCtx.lineJoin = "round";
  maskCtx.beginPath();
  maskCtx.moveTo(from.x, from.y);
  maskCtx.lineTo(to.x, to.y);
  maskCtx.stroke();
  if (!erasing()) {
    state.box = grow(grow(state.box, from, brushSize() / 2 + 1), to, brushSize() / 2 + 1);
  }
}

function moveCursor(event) {
  const cursor = $("cursor");
  const rect = maskCanvas.getBoundingClientRect();
  const stage = $("stage").getBoundingClientRect();
  const d = (brushSize() * rect.width) / maskCanvas.width;
  cursor.style.width = cursor.style.height = `${d}px`;
  cursor.style.left = `${event.clientX - stage.left}px`;
  cursor.style.top = `${event.clientY - stage.top}px`;
  cursor.hidden = false;
}

maskCanvas.addEventListener("pointerdown", (event) => {
  if (!state.pngBlob || state.running || event.button !== 0) return;
  maskCanvas.setPointerCapture(event.pointerId);
  pushUndo();
  state.painting = true;
  state.last = toImage(event);
  segment(state.last, state.last);
  updateButtons();
});

maskCanvas.addEventListener("pointermove", (event) => {
  moveCursor(event);
  if (!state.painting) return;
  const p = toImage(event);
  segment(state.last, p);
  state.last = p;
});

function endStroke() {
  if (!state.painting) return;
  state.painting = false;
  updateEstimate();
}
maskCanvas.addEventListener("pointerup", endStroke);
maskCanvas.addEventListener("pointercancel", endStroke);
maskCanvas.addEventListener("pointerleave", () => { $("cursor").hidden = true; });

$("brush-size").addEventListener("input", () => {
  $("brush-size-value").textContent = `${brushSize()} px`;
});

$("undo").addEventListener("click", () => {
  const snapshot = state.undo.pop();
  if (!snapshot) return;
  maskCtx.putImageData(snapshot.data, 0, 0);
  state.box = snapshot.box;
  updateButtons();
  updateEstimate();
});

$("clear").addEventListener("click", () => {
  pushUndo();
  maskCtx.clearRect(0, 0, maskCanvas.width, maskCanvas.height);
  state.box = null;
  updateButtons();
  updateEstimate();
});

// ------------------------------------------------------------------ result and compare

function showResult(url) {
  const result = $("result");
  if (url) {
    result.src = url;
    result.hidden = false;
    maskCanvas.hidden = true;
    $("compare-row").hidden = false;
    applyCompare();
  } else {
    result.hidden = true;
    result.removeAttribute("src");
    maskCanvas.hidden = false;
    $("compare-row").hidden = true;
  }
}

function applyCompare() {
  // left of the slider: before; right of it: after
  $("result").style.clipPath = `inset(0 0 0 ${$("compare").value}%)`;
}
$("compare").addEventListener("input", applyCompare);
$("edit").addEventListener("click", () => showResult(null));

function addScale(event) {
  const figure = document.createElement("figure");
  figure.className = "scale";
  const img = document.createElement("img");
  const url = keepUrl(b64ToBlob(event.png));
  img.src = url;
  img.alt = `scale ${event.scale + 1}`;
  const caption = document.createElement("figcaption");
  caption.textContent = `scale ${event.scale + 1}/${event.scales}: ${event.size[1]}×${event.size[0]}, ${event.iteration} iterations, ${event.elapsed.toFixed(1)} s`;
  figure.append(img, caption);
  $("scales").appendChild(figure);
  return url;
}

// ------------------------------------------------------------------ run

function updateButtons() {
  const loaded = Boolean(state.pngBlob);
  const busy = Boolean(state.running);
  $("run").disabled = !loaded || busy;
  $("undo").disabled = !loaded || busy || state.undo.length === 0;
  $("clear").disabled = !loaded || busy;
  $("demo").disabled = busy;
  $("file").disabled = busy;
  $("preset").disabled = busy;
  $("cancel").hidden = !busy;
}

function handle(event) {
  const progress = $("progress");
  switch (event.type) {
    case "queued":
      setStatus(event.place === 0 ? "Starting…" : `Waiting: place ${event.place + 1} in the queue (${event.place} run${event.place > 1 ? "s" : ""} ahead of this one)`);
      break;
    case "started":
      setStatus(`Running ${event.preset} on ${event.device}…`);
      progress.hidden = false;
      progress.value = 0;
      break;
    case "progress":
      setStatus(`Scale ${event.scale + 1}/${event.scales} (${event.size[1]}×${event.size[0]}): iteration ${event.iteration}/${event.iterations}, ${event.elapsed.toFixed(1)} s`);
      progress.value = (event.scale + event.iteration / event.iterations) / event.scales;
      break;
    case "scale":
      showResult(addScale(event));
      break;
    case "done": {
      const result = b64ToBlob(event.png);
      const mask = b64ToBlob(event.mask_png);
      const link = $("download-result");
      link.href = keepUrl(result);
      link.download = `${state.name}_inpainted.png`;
      const maskLink = $("download-mask");
      maskLink.href = keepUrl(mask);
      maskLink.download = `${state.name}_mask.png`;
      showResult(link.href);
      progress.value = 1;
      setStatus(`Done in ${event.seconds.toFixed(1)} s. Drag the slider to compare before and after.`);
      document.body.dataset.done = "1";
      break;
    }
    case "error":
      showMessage(event.message);
      setStatus("");
      break;
    default:
      break; // heartbeat, end
  }
}

async function run() {
  showMessage("");
  delete document.body.dataset.done;
  const mask = await new Promise((resolve) => maskCanvas.toBlob(resolve, "image/png"));
  const form = new FormData();
  form.append("image", state.pngBlob, `${state.name}.png`);
  form.append("mask", mask, `${state.name}_mask.png`);
  form.append("preset", $("preset").value);
  const controller = new AbortController();
  state.running = controller;
  updateButtons();
  $("scales").replaceChildren();
  setStatus("Sending…");
  try {
    const response = await fetch("/api/run", { method: "POST", body: form, signal: controller.signal });
    if (!response.ok) {
      showMessage(await errorText(response));
      setStatus("");
      return;
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, newline);
        buffer = buffer.slice(newline + 1);
        if (line) handle(JSON.parse(line));
      }
    }
  } catch (e) {
    if (e.name === "AbortError") {
      setStatus("Cancelled.");
    } else {
      showMessage(`The run stopped: ${e.message}`);
    }
  } finally {
    state.running = null;
    $("progress").hidden = true;
    updateButtons();
    updateEstimate();
  }
}

$("run").addEventListener("click", run);
$("cancel").addEventListener("click", () => state.running && state.running.abort());

loadInfo().catch((e) => showMessage(`The server did not answer: ${e.message}`));
