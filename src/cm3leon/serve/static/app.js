// CM3Leon web page: plain JS, no build step, nothing fetched from outside this server.
"use strict";

const $ = (sel) => document.querySelector(sel);

// ---- tabs ---------------------------------------------------------------------------
for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t === tab);
    for (const p of document.querySelectorAll(".panel")) p.classList.toggle("active", p.id === "panel-" + tab.dataset.tab);
  });
}

// ---- helpers ------------------------------------------------------------------------
function setStatus(id, text, isError = false) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("error", isError);
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    if (body && body.error) return `${resp.status}: ${body.error.message}`;
  } catch (e) { /* not JSON */ }
  return `${resp.status} ${resp.statusText}`;
}

function figure(b64, caption) {
  return figureFromUrl("data:image/png;base64," + b64, caption);
}

function figureFromUrl(url, caption) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = url;
  img.alt = caption;
  fig.appendChild(img);
  if (caption) {
    const cap = document.createElement("figcaption");
    cap.textContent = caption;
    fig.appendChild(cap);
  }
  return fig;
}

function addToGallery(images, caption, scores) {
  const gallery = $("#gallery");
  for (let i = images.length - 1; i >= 0; i--) {  // newest results first, each result in its own order
    const text = scores ? `${caption} (CLIP ${scores[i].toFixed(3)})` : caption;
    gallery.insertBefore(figure(images[i], text), gallery.firstChild);
  }
}

// Server-sent events over a POST (EventSource only does GET): yields {event, data}.
async function* readEvents(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const frame = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let event = "message", data = "";
      for (const line of frame.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      yield { event, data: data ? JSON.parse(data) : null };
    }
  }
}

// ---- model info -----------------------------------------------------------------------
fetch("/v1/info").then((r) => r.json()).then((info) => {
  $("#model-info").textContent =
    `${info.model} · ${info.size} images · retrieval ${info.retrieval ? "on" : "off"} · re-ranking ${info.rerank ? "on" : "off"}`;
  if (!info.retrieval) { $("#retrieve").disabled = true; $("#retrieve").title = "this model has no retrieval memory"; }
  if (!info.rerank) { $("#rerank").disabled = true; $("#rerank").title = "this model has no retrieval encoder"; }
  // Decoding fields start at the model's generation_config.json.
  const t2i = info.defaults.text_to_image, edit = info.defaults.edit;
  $("#guidance").value = t2i.guidance;
  $("#temperature").value = t2i.temperature;
  $("#top_p").value = t2i.top_p;
  if (info.retrieval) $("#retrieve").value = String(t2i.retrieve);
  if (info.rerank) $("#rerank").checked = t2i.rerank;
  const editForm = $("#edit-form");
  for (const name of ["image_guidance", "text_guidance", "temperature", "top_p"]) {
    const input = editForm.querySelector(`[name=${name}]`);
    if (input) input.value = edit[name];
  }
}).catch(() => { $("#model-info").textContent = "model info unavailable"; });

// ---- generate (streamed) ------------------------------------------------------------------
// A seed the page picks is shown in the field, so a result worth keeping can be made again.
function newSeed() { $("#seed").value = String(Math.floor(Math.random() * 2 ** 31)); }
$("#vary").addEventListener("click", newSeed);

$("#generate-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const prompt = $("#prompt").value.trim();
  const body = {
    prompt,
    n: Number($("#n").value || 1),
    guidance: Number($("#guidance").value),
    temperature: Number($("#temperature").value),
    top_p: Number($("#top_p").value),
    retrieve: Number($("#retrieve").value),
    rerank: $("#rerank").checked,
    response_format: "b64_json",
  };
  if ($("#cd_k").value) body.cd_k = Number($("#cd_k").value);
  if ($("#new-seed-each").checked) newSeed();
  if ($("#seed").value) body.seed = Number($("#seed").value);
  const seedNote = body.seed !== undefined ? `, seed ${body.seed}` : ", random seed";
  const button = $("#generate-button");
  const preview = $("#preview");
  button.disabled = true;
  preview.replaceChildren();
  setStatus("#generate-status", "queued…");
  try {
    const resp = await fetch("/v1/images/generations/stream", {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body),
    });
    if (!resp.ok) { setStatus("#generate-status", await errorText(resp), true); return; }
    for await (const { event, data } of readEvents(resp)) {
      if (event === "progress") {
        setStatus("#generate-status", `decoding: ${data.tokens}/${data.total} tokens`);
        preview.replaceChildren(...data.images.map((b64) => figure(b64, `${data.tokens}/${data.total}`)));
      } else if (event === "result") {
        preview.replaceChildren();
        const scores = data.data[0].clip_score !== undefined ? data.data.map((d) => d.clip_score) : null;
        addToGallery(data.data.map((d) => d.b64_json), prompt, scores);
        setStatus("#generate-status", `done: ${data.data.length} image(s)${seedNote}`);
      } else if (event === "error") {
        setStatus("#generate-status", data.error.message, true);
      }
    }
  } catch (e) {
    setStatus("#generate-status", `request failed: ${e}`, true);
  } finally {
    button.disabled = false;
  }
});

// ---- caption / ask / edit (multipart uploads) ---------------------------------------------
function formTask(formId, url, statusId, onResult) {
  $(formId).addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const form = ev.target;
    const button = form.querySelector("button[type=submit]");
    const data = new FormData(form);
    for (const [k, v] of [...data.entries()]) if (v === "") data.delete(k);  // let the server defaults apply
    button.disabled = true;
    setStatus(statusId, "working…");
    try {
      const resp = await fetch(url, { method: "POST", body: data });
      if (!resp.ok) { setStatus(statusId, await errorText(resp), true); return; }
      onResult(await resp.json(), data);
      setStatus(statusId, "done");
    } catch (e) {
      setStatus(statusId, `request failed: ${e}`, true);
    } finally {
      button.disabled = false;
    }
  });
}

// The chosen file is shown at once (an object URL: nothing is uploaded until the form is sent).
const previewUrls = {};
function showUpload(inputId, imgId) {
  $(inputId).addEventListener("change", (ev) => {
    const file = ev.target.files[0];
    const img = $(imgId);
    if (previewUrls[imgId]) URL.revokeObjectURL(previewUrls[imgId]);
    previewUrls[imgId] = file ? URL.createObjectURL(file) : null;
    if (file) img.src = previewUrls[imgId]; else img.removeAttribute("src");
    img.closest("figure").hidden = !file;
  });
}
showUpload("#caption-image", "#caption-preview");
showUpload("#ask-image", "#ask-preview");
showUpload("#edit-image", "#edit-preview");

formTask("#caption-form", "/v1/captions", "#caption-status", (r) => { $("#caption-out").textContent = r.caption; });
formTask("#ask-form", "/v1/answers", "#ask-status", (r, data) => {
  const out = $("#ask-out");
  const q = document.createElement("p"), a = document.createElement("p");
  q.className = "question"; q.textContent = `Q: ${data.get("question")}`;
  a.textContent = `A: ${r.answer}`;
  out.replaceChildren(q, a);
});
// Each edit gets a row of its own, newest first: the image sent (before), then the edited image(s) (after).
formTask("#edit-form", "/v1/images/edits", "#edit-status", (r, data) => {
  const row = document.createElement("div");
  row.className = "edit-result";
  const title = document.createElement("p");
  title.className = "edit-instruction";
  title.textContent = `edit: ${data.get("prompt")}`;
  const pair = document.createElement("div");
  pair.className = "gallery";
  const before = figureFromUrl(URL.createObjectURL(data.get("image")), "before");
  before.classList.add("before");
  pair.appendChild(before);
  r.data.forEach((d, i) => {
    const after = figure(d.b64_json, r.data.length > 1 ? `after (${i + 1})` : "after");
    after.classList.add("after");
    pair.appendChild(after);
  });
  row.append(title, pair);
  $("#edit-out").insertBefore(row, $("#edit-out").firstChild);
});
