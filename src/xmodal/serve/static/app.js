// xmodal search page: no build step, no dependencies; talks to /indices-list and /search.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { index: "", q: "" };

function setStatus(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function api(path, body) {
  const res = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(data.detail || `HTTP ${res.status}`);
  return data;
}

function el(tag, attrs, children) {
  const e = document.createElement(tag);
  Object.entries(attrs || {}).forEach(([k, v]) => { if (k === "text") e.textContent = v; else e.setAttribute(k, v); });
  (children || []).forEach((c) => e.appendChild(c));
  return e;
}

function openPlayer(hit) {
  const box = $("player"), video = $("video");
  const old = box.querySelector("img.still");
  if (old) old.remove();
  $("player-caption").textContent = hit.captions[0] || hit.id;
  if (hit.kind === "video") {
    video.hidden = false;
    const start = hit.best_time || 0;
    video.onloadedmetadata = () => { video.currentTime = start; video.play().catch(() => {}); };
    video.src = hit.media_url;
    video.dataset.start = String(start);
  } else {
    video.hidden = true;
    video.removeAttribute("src");
    video.insertAdjacentElement("afterend", el("img", { class: "still", src: hit.media_url, alt: hit.id }));
  }
  box.hidden = false;
}

function closePlayer() {
  const video = $("video");
  video.pause();
  $("player").hidden = true;
}

function render(data) {
  const grid = $("results");
  grid.replaceChildren();
  data.hits.forEach((hit) => {
    const t = hit.best_time != null ? hit.best_time : 0;
    const img = el("img", { src: `${hit.thumb_url}?t=${t}`, alt: hit.id, loading: "lazy" });
    const meta = el("div", { class: "meta" }, [
      el("span", { class: "score", text: hit.score.toFixed(3) }),
      el("span", { class: "at", text: hit.best_time != null ? `▶ ${hit.best_time.toFixed(1)} s` : "" }),
      el("div", { class: "caption", text: hit.captions[0] || hit.id }),
    ]);
    if (hit.moments) {
      const max = Math.max(...hit.moments.map((m) => m.weight)) || 1;
      meta.appendChild(el("div", { class: "bar", title: "where the query attends" },
        hit.moments.map((m) => el("span", { style: `opacity:${(0.15 + 0.85 * m.weight / max).toFixed(2)}`,
                                            title: `${m.time.toFixed(1)} s: ${m.weight.toFixed(3)}` }))));
    }
    const card = el("div", { class: "card", "data-id": hit.id, tabindex: "0" }, [img, meta]);
    card.addEventListener("click", () => openPlayer(hit));
    grid.appendChild(card);
  });
  setStatus(`${data.hits.length} results from ${data.index} (${data.pooling} pooling, ${data.took_ms.toFixed(0)} ms)`);
}

async function search(body, urlState) {
  setStatus("searching...");
  try {
    render(await api("/search", body));
    if (urlState) {
      const params = new URLSearchParams({ index: body.index, q: body.query });
      history.replaceState(null, "", `?${params}`);
    }
  } catch (err) {
    $("results").replaceChildren();
    setStatus(err.message, true);
  }
}

function searchText() {
  const q = $("query").value.trim();
  if (!q) { setStatus("type a query", true); return; }
  search({ index: $("index").value, query: q, k: 24 }, true);
}

function searchImage(file) {
  const reader = new FileReader();
  reader.onload = () => {
    const b64 = String(reader.result).split(",")[1] || "";
    search({ index: $("index").value, image: b64, k: 24 }, false);
  };
  reader.readAsDataURL(file);
}

async function init() {
  const params = new URLSearchParams(location.search);
  try {
    const names = await api("/indices-list");
    names.forEach((n) => $("index").appendChild(el("option", { value: n, text: n })));
    if (params.get("index") && names.includes(params.get("index"))) $("index").value = params.get("index");
  } catch (err) { setStatus(`cannot list indices: ${err.message}`, true); return; }
  $("search-form").addEventListener("submit", (ev) => { ev.preventDefault(); searchText(); });
  $("image").addEventListener("change", (ev) => { if (ev.target.files[0]) searchImage(ev.target.files[0]); });
  $("close").addEventListener("click", closePlayer);
  $("player").addEventListener("click", (ev) => { if (ev.target === $("player")) closePlayer(); });
  if (params.get("q")) { $("query").value = params.get("q"); searchText(); }
  else setStatus("ready");
}

init();
