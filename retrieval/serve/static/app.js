// crossmodal serve: the search page. Plain ES module, no dependencies; talks to the API in
// retrieval/serve/app.py with relative URLs (so the page also works behind a path prefix).
// query.js keeps what a search sends besides its words: feedback chips, mode, duplicates, filters.

import { $, el, svgIcon } from "./dom.js";
import { FEEDBACK_WEIGHT, Feedback, FilterPanel, Options } from "./query.js";

const PAGE_SIZE = 30;
const THUMB_2X = 512;
const DETAIL_SIZE = 1024;

const state = {
  indexes: [],
  index: null, // name of the chosen index; null = the server's default
  target: "image", // what to find: image | text
  query: null, // {kind: "text", text} | {kind: "image", file, url, name} | {kind: "item", id, thumb, label}
  hits: [],
  hasMore: false,
  loading: false,
  seq: 0, // bumps with every new search; answers to older searches are dropped
  detail: -1, // index into hits of the open detail view
};

const ui = {
  form: $("#search-form"),
  q: $("#q"),
  fileInput: $("#file-input"),
  chip: $("#query-chip"),
  chipImg: $("#query-chip-img"),
  chipLabel: $("#query-chip-label"),
  targets: [$("#target-images"), $("#target-texts")],
  pickerWrap: $("#index-picker-wrap"),
  picker: $("#index-picker"),
  status: $("#status"),
  notes: $("#notes"),
  indexInfo: $("#index-info"),
  error: $("#error"),
  errorText: $("#error-text"),
  welcome: $("#welcome"),
  welcomeCounts: $("#welcome-counts"),
  empty: $("#empty"),
  results: $("#results"),
  loadMore: $("#load-more"),
  spinner: $("#more-spinner"),
  sentinel: $("#sentinel"),
  dropOverlay: $("#drop-overlay"),
  detail: $("#detail"),
  login: $("#login"),
};

// What a search sends besides its words or picture (query.js). A chip or an option re-runs it.
const feedback = new Feedback($("#feedback"), { onRemove: removeFeedback });
const options = new Options({ onMode: () => rerun({ textOnly: true }), onDuplicates: () => rerun() });
const filters = new FilterPanel({ onChange: () => rerun() });

// ---------------------------------------------------------------------------------------------
// HTTP

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

let loginPromise = null;

async function api(path, options = {}, attempt = 0) {
  let response;
  try {
    response = await fetch(path, { credentials: "same-origin", ...options });
  } catch {
    throw new ApiError("The server cannot be reached. Is crossmodal serve still running?", 0);
  }
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json().catch(() => null) : null;
  if (response.ok) return body;
  if (response.status === 401 && body && body.login) {
    await signIn();
    return api(path, options, attempt);
  }
  if (response.status === 503 && attempt < 3) {
    const wait = Math.min(Number(response.headers.get("retry-after")) || 1, 10);
    showStatus(`The server is busy; trying again in ${wait} s…`);
    await new Promise((resolve) => setTimeout(resolve, wait * 1000));
    return api(path, options, attempt + 1);
  }
  const message = (body && body.error) || `The server answered ${response.status} ${response.statusText}`.trim();
  throw new ApiError(message, response.status);
}

function signIn() {
  if (loginPromise) return loginPromise;
  loginPromise = new Promise((resolve) => {
    const form = $("#login-form");
    const input = $("#login-token");
    const error = $("#login-error");
    error.hidden = true;
    input.value = "";
    const onSubmit = async (event) => {
      event.preventDefault();
      error.hidden = true;
      const response = await fetch("api/login", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        credentials: "same-origin",
        body: JSON.stringify({ token: input.value }),
      }).catch(() => null);
      if (response && response.ok) {
        form.removeEventListener("submit", onSubmit);
        ui.login.close();
        loginPromise = null;
        resolve();
        return;
      }
      const body = response ? await response.json().catch(() => null) : null;
      error.textContent = (body && body.error) || "That token was not accepted.";
      error.hidden = false;
      input.select();
    };
    form.addEventListener("submit", onSubmit);
    ui.login.addEventListener("cancel", (event) => event.preventDefault()); // the page is useless without it
    ui.login.showModal();
    input.focus();
  });
  return loginPromise;
}

const withIndex = (url) => {
  if (!state.index) return url;
  const u = new URL(url, document.baseURI);
  u.searchParams.set("index", state.index);
  return u.pathname.replace(/^\//, "") + u.search;
};

const sized = (url, size) => {
  if (!url) return null;
  const u = new URL(url, document.baseURI);
  u.searchParams.set("size", String(size));
  return u.href;
};

// ---------------------------------------------------------------------------------------------
// Indexes

async function loadIndexes() {
  try {
    const answer = await api("api/indexes");
    state.indexes = answer.indexes || [];
  } catch (error) {
    showError(error.message);
    return;
  }
  const wanted = new URLSearchParams(location.search).get("index");
  const known = state.indexes.map((ix) => ix.name);
  state.index = known.includes(wanted) ? wanted : known[0] || null;
  ui.picker.replaceChildren(
    ...state.indexes.map((ix) =>
      el("option", { value: ix.name, title: `${describeCounts(ix.counts)} · ${ix.model.name}` },
        `${ix.name} · ${plural(ix.counts.image || 0, "image")} · ${ix.model.name}`)),
  );
  if (state.index) ui.picker.value = state.index;
  ui.pickerWrap.hidden = state.indexes.length < 2;
  showIndexInfo();
}

const plural = (n, word) => `${n.toLocaleString()} ${word}${n === 1 ? "" : "s"}`;

function describeCounts(counts = {}) {
  const parts = [plural(counts.image || 0, "image")];
  if (counts.caption) parts.push(plural(counts.caption, "caption"));
  if (counts.text) parts.push(plural(counts.text, "text"));
  return parts.join(", ");
}

function currentIndex() {
  return state.indexes.find((ix) => ix.name === state.index) || state.indexes[0];
}

function showIndexInfo() {
  const ix = currentIndex();
  if (!ix) return;
  const model = ix.model.pretrained && !ix.model.pretrained.includes("/") ? `${ix.model.name} (${ix.model.pretrained})` : ix.model.name;
  ui.indexInfo.textContent = `${ix.name} · ${model} · ${ix.description || ix.index_type}`;
  ui.indexInfo.title = `${describeCounts(ix.counts)}; ${ix.model.embed_dim}-dimensional vectors`;
  ui.welcomeCounts.textContent = `${describeCounts(ix.counts)} in “${ix.name}”, encoded with ${ix.model.name}.`;
}

// ---------------------------------------------------------------------------------------------
// Queries

function setTarget(target, { run = true } = {}) {
  if (target !== "image" && target !== "text") return;
  const changed = state.target !== target;
  state.target = target;
  for (const button of ui.targets) button.setAttribute("aria-pressed", String(button.dataset.target === target));
  if (changed && run && state.query) search({ push: true });
}

// A new query (words, a picture, an item) starts without feedback chips, unless the URL has them.
function setQuery(query, { push = true, keepFeedback = false } = {}) {
  if (!keepFeedback) feedback.clear();
  if (state.query && state.query.kind === "image" && state.query.url && (!query || query.url !== state.query.url)) {
    URL.revokeObjectURL(state.query.url);
  }
  state.query = query;
  if (query && query.kind !== "text") {
    ui.chip.hidden = false;
    ui.chipImg.hidden = !query.thumb && !query.url;
    if (query.url || query.thumb) ui.chipImg.src = query.url || query.thumb;
    ui.chipLabel.textContent = query.kind === "image" ? query.name || "image" : query.label;
    ui.chip.title = query.kind === "image" ? `Searching with ${query.name || "an image"}` : `Searching for items like ${query.label}`;
    ui.q.value = "";
    ui.q.placeholder = "Type to search by words instead";
  } else {
    ui.chip.hidden = true;
    ui.chipImg.removeAttribute("src");
    ui.q.placeholder = "Search by words, or drop / paste an image";
  }
  options.lock(isTermsQuery());
  if (query) search({ push });
}

// An image, an item or feedback chips: a query of terms, which ranks by vector only.
const isTermsQuery = () => Boolean(state.query && (state.query.kind !== "text" || feedback.size));

const hitLabel = (hit) => (hit.kind === "image" ? shortPath(hit.path) || `#${hit.id}` : `“${truncate(hit.text, 40)}”`);

// "More like this" (+1) or "less like this" (-1): the result becomes a chip and a term of the query.
function addFeedback(hit, sign) {
  if (!state.query || (state.query.kind === "item" && state.query.id === hit.id)) return;
  if (!feedback.add({ id: hit.id, thumb: hit.thumb, label: hitLabel(hit) }, sign * FEEDBACK_WEIGHT)) return;
  closeDetail();
  options.lock(isTermsQuery());
  search({ push: true });
  feedback.removeButton(feedback.indexOf(hit.id))?.focus({ preventScroll: true }); // the results re-render
}

function removeFeedback(id) {
  const at = feedback.indexOf(id);
  if (!feedback.remove(id)) return;
  options.lock(isTermsQuery());
  (feedback.removeButton(at) || ui.q).focus({ preventScroll: true }); // the next chip, else the search box
  if (state.query) search({ push: true });
}

// An option or a filter changed: the current query again (the mode only matters to a words query).
function rerun({ textOnly = false } = {}) {
  if (!state.query || (textOnly && isTermsQuery())) updateUrl(false);
  else search({ push: true });
}

function imageQuery(file) {
  if (!file) return;
  const name = file.name && file.name !== "image.png" ? file.name : "pasted image";
  setQuery({ kind: "image", file, url: URL.createObjectURL(file), name });
}

function itemQuery(hit) {
  const label = `like ${hitLabel(hit)}`;
  setQuery({ kind: "item", id: hit.id, thumb: hit.thumb, label });
  window.scrollTo({ top: 0 });
}

function updateUrl(push) {
  const params = new URLSearchParams();
  const q = state.query;
  if (q && q.kind === "text") params.set("q", q.text);
  if (q && q.kind === "item") params.set("item", String(q.id));
  if (q && q.kind !== "image") params.set("to", state.target);
  options.toParams(params, Boolean(q && q.kind === "text"));
  filters.toParams(params);
  if (q && q.kind !== "image") feedback.toParams(params);
  if (state.index && state.indexes.length > 1) params.set("index", state.index);
  const wanted = params.toString() ? `?${params}` : "";
  if (wanted === location.search) return;
  if (push) history.pushState(null, "", wanted || location.pathname);
  else history.replaceState(null, "", wanted || location.pathname);
}

async function search({ append = false, push = false } = {}) {
  const query = state.query;
  if (!query) return;
  if (append && (state.loading || !state.hasMore)) return;
  const seq = append ? state.seq : ++state.seq;
  const offset = append ? state.hits.length : 0;
  state.loading = true;
  if (!append) {
    updateUrl(push);
    hideError();
    state.hits = [];
    state.hasMore = false;
    showSkeletons();
    showStatus("Searching…");
    ui.notes.textContent = "";
  } else {
    ui.spinner.hidden = false;
    ui.loadMore.hidden = true;
  }
  const request = searchRequest(query, offset);
  let answer;
  try {
    answer = await api("api/search", request);
  } catch (error) {
    if (seq !== state.seq) return;
    state.loading = false;
    ui.spinner.hidden = true;
    if (!append) {
      ui.results.replaceChildren();
      ui.results.dataset.state = "error";
      showStatus("");
    }
    ui.loadMore.hidden = !state.hasMore;
    showError(error.message);
    return;
  }
  if (seq !== state.seq) return; // a newer search started meanwhile
  state.loading = false;
  ui.spinner.hidden = true;
  const hits = answer.hits || [];
  state.hits = append ? state.hits.concat(hits) : hits;
  state.hasMore = Boolean(answer.has_more);
  render(answer, hits, append);
  if (!append && query.kind === "item" && !query.thumb) describeItemQuery(query);
}

// The search request: JSON, or multipart for an uploaded picture. Feedback chips make it a terms
// query (the query's own term weighs 1); the mode goes with a plain words query only.
function searchRequest(query, offset) {
  const more = feedback.asTerms();
  const filtering = offset === 0 ? filters.current() : filters.sent(); // a next page: the first page's
  if (query.kind === "image") {
    const form = new FormData();
    form.append("image", query.file, query.file.name || "query");
    form.append("to", state.target);
    form.append("k", String(PAGE_SIZE));
    form.append("offset", String(offset));
    if (state.index) form.append("index", state.index);
    if (more.length) form.append("terms", JSON.stringify(more));
    if (filtering) form.append("filters", JSON.stringify(filtering));
    form.append("hide_duplicates", String(options.hideDuplicates));
    return { method: "POST", body: form };
  }
  const body = { to: state.target, k: PAGE_SIZE, offset };
  if (state.index) body.index = state.index;
  const own = query.kind === "text" ? { text: query.text } : { item: query.id };
  if (more.length) body.terms = [{ ...own, weight: 1 }, ...more];
  else Object.assign(body, own);
  if (query.kind === "text" && !more.length) body.mode = options.mode;
  body.hide_duplicates = options.hideDuplicates;
  if (filtering) body.filters = filtering;
  return { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
}

// An item query from the URL (?item=12) learns its picture and name once the search found it.
async function describeItemQuery(query) {
  try {
    const item = await api(withIndex(`api/items/${query.id}`));
    if (state.query !== query) return;
    query.thumb = item.thumb;
    query.label = item.kind === "image" ? `like ${shortPath(item.path) || `#${item.id}`}` : `like “${truncate(item.text, 40)}”`;
    if (item.thumb) {
      ui.chipImg.src = item.thumb;
      ui.chipImg.hidden = false;
    }
    ui.chipLabel.textContent = query.label;
  } catch {
    // the search itself worked; the chip keeps its plain label
  }
}

// ---------------------------------------------------------------------------------------------
// Rendering

function showSkeletons() {
  ui.welcome.hidden = true;
  ui.empty.hidden = true;
  ui.loadMore.hidden = true;
  const text = state.target === "text";
  ui.results.className = `results ${text ? "cards" : "grid"}`;
  ui.results.dataset.state = "loading";
  ui.results.setAttribute("aria-busy", "true");
  const count = text ? 8 : 18;
  ui.results.replaceChildren(
    ...Array.from({ length: count }, () => el("div", { class: `skeleton ${text ? "skeleton-card" : "skeleton-tile"}`, "aria-hidden": "true" })),
  );
}

function render(answer, hits, append) {
  const toText = answer.to === "text";
  if (!append) {
    ui.results.replaceChildren();
    ui.results.className = `results ${toText ? "cards" : "grid"}`;
  }
  const start = state.hits.length - hits.length;
  ui.results.append(...hits.map((hit, i) => (toText ? textCard(hit, start + i) : imageTile(hit, start + i))));
  ui.results.dataset.state = state.hits.length ? "ready" : "empty";
  ui.results.dataset.to = answer.to;
  ui.results.dataset.queryKind = state.query.kind;
  ui.results.dataset.terms = String(feedback.size); // feedback chips in the query that answered
  ui.results.dataset.mode = isTermsQuery() ? "vector" : options.mode;
  ui.results.dataset.count = String(state.hits.length);
  ui.results.removeAttribute("aria-busy");
  ui.empty.hidden = state.hits.length > 0;
  ui.loadMore.hidden = !state.hasMore;

  const timings = answer.timings_ms || {};
  const total = Object.values(timings).reduce((a, b) => a + (Number(b) || 0), 0);
  const noun = toText ? "text" : "image";
  const ms = total >= 10 ? Math.round(total) : total.toFixed(1);
  showStatus(`${plural(state.hits.length, noun)}${state.hasMore ? " so far" : ""} · ${ms} ms`);
  ui.status.title = Object.entries(timings).map(([k, v]) => `${k} ${Number(v).toFixed(1)} ms`).join(", ");
  const notes = answer.notes || [];
  if (!append || notes.length) {
    ui.notes.replaceChildren(...(notes.length ? [el("span", { class: "note-icon", "aria-hidden": "true" }, "i"),
      notes.join(" · ")] : []));
    ui.notes.title = notes.join("\n");
  }
  requestAnimationFrame(maybeLoadMore);
}

function imageTile(hit, index) {
  const ratio = hit.width && hit.height ? hit.width / hit.height : 1;
  const caption = hit.captions && hit.captions.length ? hit.captions[0] : hit.text || shortPath(hit.path) || "";
  const tile = el(
    "figure",
    {
      class: "hit image-hit",
      dataset: { id: hit.id, imageId: hit.image_id ?? "", rank: hit.rank, kind: hit.kind },
      style: `--ratio: ${ratio.toFixed(4)}`,
    },
    el(
      "a",
      { class: "open", href: hit.file || "#", "aria-label": `Result ${hit.rank}: ${caption || "image"} (score ${score(hit.score)})` },
      thumbImg(hit, caption, 256),
    ),
    el(
      "figcaption",
      { class: "overlay" },
      el("span", { class: "score", title: "cosine similarity" }, score(hit.score)),
      el("span", { class: "cap" }, caption),
    ),
    hitActions(hit, index),
  );
  tile.querySelector("a.open").addEventListener("click", (event) => openFromEvent(event, index));
  return tile;
}

function textCard(hit, index) {
  const hasImage = Boolean(hit.thumb);
  const card = el(
    "article",
    { class: `hit text-hit${hasImage ? "" : " no-image"}`, dataset: { id: hit.id, imageId: hit.image_id ?? "", rank: hit.rank, kind: hit.kind } },
    el(
      "a",
      { class: "open", href: hit.file || "#", "aria-label": `Result ${hit.rank}: ${hit.text} (score ${score(hit.score)})` },
      hasImage ? thumbImg(hit, "", 160) : el("div", { class: "card-thumb text-only", "aria-hidden": "true" }, "¶"),
      el(
        "div",
        { class: "card-body" },
        el("p", { class: "card-text" }, hit.text || ""),
        el(
          "p",
          { class: "card-meta" },
          el("span", { class: `badge badge-${hit.kind}` }, hit.kind),
          el("span", { class: "score", title: "cosine similarity" }, score(hit.score)),
          hit.path ? el("span", { class: "path" }, shortPath(hit.path)) : null,
        ),
      ),
    ),
    hitActions(hit, index),
  );
  card.querySelector("a.open").addEventListener("click", (event) => openFromEvent(event, index));
  return card;
}

function thumbImg(hit, alt, size) {
  if (!hit.thumb) return el("div", { class: "thumb-missing" }, "no preview");
  // loading=lazy before src: an image starts loading as soon as it has a src, even detached
  const img = el("img", {
    loading: "lazy",
    decoding: "async",
    alt,
    draggable: "true",
    width: hit.width || 256,
    height: hit.height || 256,
    class: hit.kind === "image" ? null : "card-thumb",
    srcset: `${hit.thumb} 1x, ${sized(hit.thumb, Math.min(size * 2, THUMB_2X))} 2x`,
    src: hit.thumb,
  });
  img.addEventListener("dragstart", (event) => {
    event.dataTransfer.setData("application/x-crossmodal-item", JSON.stringify(hit));
  });
  img.addEventListener("error", () => img.closest(".hit")?.classList.add("thumb-failed"), { once: true });
  return img;
}

// "+" and "−" add the result to the query as a chip (relevance feedback); "Similar" starts a new
// search from it alone.
function hitActions(hit, index) {
  const button = (props, children, action) => {
    const node = el("button", { type: "button", ...props }, ...children);
    node.addEventListener("click", (event) => {
      event.stopPropagation();
      action(state.hits[index] || hit);
    });
    return node;
  };
  return el(
    "div",
    { class: "hit-actions" },
    button({ class: "feedback-button feedback-more", title: "More like this (adds it to the query)",
      "aria-label": `More like result ${hit.rank}: add it to the query` }, ["+"], (h) => addFeedback(h, 1)),
    button({ class: "feedback-button feedback-less", title: "Less like this (adds it to the query)",
      "aria-label": `Less like result ${hit.rank}: add it to the query` }, ["−"], (h) => addFeedback(h, -1)),
    button({ class: "more-like-this", title: "A new search for items like this one",
      "aria-label": `Search for items like result ${hit.rank}` },
    [svgIcon("M12 2l2.4 6.9H22l-6 4.6 2.3 7L12 16.3 5.7 20.5 8 13.5 2 8.9h7.6z"), el("span", {}, "Similar")], itemQuery),
  );
}

const score = (s) => (typeof s === "number" ? s.toFixed(3) : "");
const shortPath = (p) => (p ? p.split(/[\\/]/).slice(-2).join("/") : "");
const truncate = (s, n) => (!s ? "" : s.length > n ? `${s.slice(0, n - 1)}…` : s);

function showStatus(text) {
  ui.status.textContent = text;
}

function showError(message) {
  ui.errorText.textContent = message;
  ui.error.hidden = false;
}

function hideError() {
  ui.error.hidden = true;
}

// Infinite scroll, with the "Load more" button for keyboards and as a fallback.
function maybeLoadMore() {
  if (!state.hasMore || state.loading || ui.detail.open) return;
  const rect = ui.sentinel.getBoundingClientRect();
  if (rect.top < window.innerHeight + 600) search({ append: true });
}

new IntersectionObserver((entries) => {
  if (entries.some((entry) => entry.isIntersecting)) maybeLoadMore();
}, { rootMargin: "600px 0px" }).observe(ui.sentinel);

// ---------------------------------------------------------------------------------------------
// Detail view

function openFromEvent(event, index) {
  if (event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return; // new tab
  event.preventDefault();
  openDetail(index);
}

let detailSeq = 0;

async function openDetail(index) {
  const hit = state.hits[index];
  if (!hit) return;
  state.detail = index;
  const seq = ++detailSeq;
  const img = $("#detail-img");
  const hasImage = Boolean(hit.thumb);
  img.hidden = !hasImage;
  $("#detail-noimage").hidden = hasImage;
  if (hasImage) {
    img.alt = (hit.captions && hit.captions[0]) || hit.text || "";
    const src = sized(hit.thumb, DETAIL_SIZE);
    if (img.src !== src) {
      img.removeAttribute("src");
      img.src = src;
    }
  } else {
    img.removeAttribute("src");
  }
  $("#detail-title").textContent = hit.kind === "image" ? shortPath(hit.path) || `Image ${hit.id}` : hit.kind === "caption" ? "Caption" : "Text";
  $("#detail-score").textContent = `Result ${hit.rank} · score ${score(hit.score)}`;
  const text = $("#detail-text");
  text.hidden = hit.kind === "image" || !hit.text;
  text.textContent = hit.text || "";
  $("#detail-path").textContent = hit.path || "—";
  $("#detail-size").textContent = hit.width && hit.height ? `${hit.width} × ${hit.height} px` : "—";
  for (const name of ["source", ...PHOTO_FACTS]) showFact(name, "");
  const own = state.query && state.query.kind === "item" && state.query.id === hit.id;
  $("#detail-plus").disabled = own; // the query's own item
  $("#detail-minus").disabled = own;
  fillCaptions((hit.captions || []).map((c) => ({ text: c })), hit);
  const file = $("#detail-file");
  file.hidden = !hit.file;
  if (hit.file) file.href = hit.file;
  $("#detail-prev").disabled = index === 0;
  $("#detail-next").disabled = index >= state.hits.length - 1 && !state.hasMore;
  ui.detail.dataset.id = hit.id;
  if (!ui.detail.open) ui.detail.showModal();
  $("#detail-close").focus({ preventScroll: true });

  try {
    const item = await api(withIndex(`api/items/${hit.id}`));
    if (seq !== detailSeq) return;
    if (item.path) $("#detail-path").textContent = item.root ? `${item.path}  (in ${item.root})` : item.path;
    const px = item.width && item.height ? `${item.width} × ${item.height} px` : "";
    const bytes = item.size_bytes ? formatBytes(item.size_bytes) : "";
    $("#detail-size").textContent = [px, bytes].filter(Boolean).join(" · ") || "—";
    showFact("source", item.source || "");
    showPhoto(item.photo || {});
    fillCaptions(item.captions || [], hit);
  } catch (error) {
    if (seq === detailSeq) showError(error.message);
  }
}

const PHOTO_FACTS = ["taken", "camera", "format", "gps"];

function showFact(name, text) {
  $(`#detail-${name}-label`).hidden = !text;
  $(`#detail-${name}`).hidden = !text;
  $(`#detail-${name}`).textContent = text;
}

// What the file's header said (the item's "photo"): only the fields it has.
function showPhoto(photo) {
  showFact("taken", photo.taken_at ? photo.taken_at.replace("T", " ") : "");
  const make = photo.camera_make || "";
  const model = photo.camera_model || "";
  showFact("camera", model.toLowerCase().startsWith(make.toLowerCase()) ? model : `${make} ${model}`.trim());
  showFact("format", photo.format || "");
  const located = typeof photo.gps_lat === "number" && typeof photo.gps_lon === "number";
  showFact("gps", located ? `${photo.gps_lat.toFixed(5)}, ${photo.gps_lon.toFixed(5)}` : "");
}

function fillCaptions(captions, hit) {
  const list = $("#detail-captions");
  $("#detail-captions-title").hidden = captions.length === 0;
  list.replaceChildren(
    ...captions.map((c) => el("li", { class: c.id === hit.id || (c.id === undefined && c.text === hit.text) ? "current" : "" }, c.text)),
  );
}

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 ** 2) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 ** 2).toFixed(1)} MB`;
}

async function moveDetail(step) {
  let next = state.detail + step;
  if (next < 0) return;
  if (next >= state.hits.length) {
    if (!state.hasMore) return;
    await search({ append: true });
    if (next >= state.hits.length) return;
  }
  openDetail(next);
}

function closeDetail() {
  if (ui.detail.open) ui.detail.close();
}

ui.detail.addEventListener("close", () => {
  const hit = state.hits[state.detail];
  const node = hit && ui.results.querySelector(`.hit[data-id="${CSS.escape(String(hit.id))}"] a.open`);
  if (node) node.focus({ preventScroll: false });
  requestAnimationFrame(maybeLoadMore);
});
ui.detail.addEventListener("click", (event) => {
  if (event.target === ui.detail) closeDetail(); // the backdrop
});
ui.detail.addEventListener("keydown", (event) => {
  if (event.key === "ArrowLeft") {
    event.preventDefault();
    moveDetail(-1);
  } else if (event.key === "ArrowRight") {
    event.preventDefault();
    moveDetail(1);
  }
});
$("#detail-close").addEventListener("click", closeDetail);
$("#detail-prev").addEventListener("click", () => moveDetail(-1));
$("#detail-next").addEventListener("click", () => moveDetail(1));
for (const [id, sign] of [["#detail-plus", 1], ["#detail-minus", -1]]) {
  $(id).addEventListener("click", () => {
    const hit = state.hits[state.detail];
    if (hit) addFeedback(hit, sign);
  });
}
$("#detail-more").addEventListener("click", () => {
  const hit = state.hits[state.detail];
  if (!hit) return;
  closeDetail();
  itemQuery(hit);
});

// ---------------------------------------------------------------------------------------------
// Input: form, target switch, index picker, file picker, paste, drag and drop, keyboard

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.q.value.trim();
  if (text) setQuery({ kind: "text", text });
  else if (state.query && state.query.kind !== "text") search({ push: false });
  else ui.q.focus();
});

for (const button of ui.targets) button.addEventListener("click", () => setTarget(button.dataset.target));

ui.picker.addEventListener("change", () => {
  state.index = ui.picker.value;
  showIndexInfo();
  feedback.clear(); // item ids belong to one index
  if (state.query && state.query.kind === "item") setQuery(null);
  options.lock(isTermsQuery());
  if (state.query) search({ push: true });
  else updateUrl(true);
});

$("#query-chip-clear").addEventListener("click", () => {
  setQuery(null);
  resetToWelcome();
  ui.q.focus();
});
ui.chipImg.addEventListener("error", () => {
  ui.chipImg.hidden = true; // a format the browser cannot show (HEIC, TIFF...): the server still reads it
});

const pick = () => ui.fileInput.click();
$("#pick-image").addEventListener("click", pick);
$("#welcome-pick").addEventListener("click", pick);
ui.fileInput.addEventListener("change", () => {
  const [file] = ui.fileInput.files;
  if (file) imageQuery(file);
  ui.fileInput.value = "";
});
$("#load-more").addEventListener("click", () => search({ append: true }));
$("#error-close").addEventListener("click", hideError);

document.addEventListener("paste", (event) => {
  const items = [...(event.clipboardData?.items || [])];
  const item = items.find((i) => i.kind === "file" && i.type.startsWith("image/"));
  if (!item) return; // ordinary text paste
  event.preventDefault();
  imageQuery(item.getAsFile());
});

let dragDepth = 0;
const isFileDrag = (event) => {
  const types = [...(event.dataTransfer?.types || [])];
  return types.includes("Files") || types.includes("application/x-crossmodal-item");
};
window.addEventListener("dragenter", (event) => {
  if (!isFileDrag(event)) return;
  event.preventDefault();
  dragDepth += 1;
  ui.dropOverlay.hidden = false;
});
window.addEventListener("dragover", (event) => {
  if (!isFileDrag(event)) return;
  event.preventDefault();
  event.dataTransfer.dropEffect = "copy";
});
window.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (dragDepth === 0) ui.dropOverlay.hidden = true;
});
window.addEventListener("drop", (event) => {
  dragDepth = 0;
  ui.dropOverlay.hidden = true;
  if (!event.dataTransfer) return;
  const own = event.dataTransfer.getData("application/x-crossmodal-item");
  if (own) {
    event.preventDefault();
    itemQuery(JSON.parse(own));
    return;
  }
  const files = [...(event.dataTransfer.files || [])];
  if (!files.length) return;
  event.preventDefault();
  const file = files.find((f) => f.type.startsWith("image/")) || files[0];
  imageQuery(file);
});

document.addEventListener("keydown", (event) => {
  const typing = event.target instanceof HTMLElement && event.target.closest("input, textarea, select, [contenteditable]");
  if (event.key === "/" && !typing && !ui.detail.open && !ui.login.open) {
    event.preventDefault();
    ui.q.focus();
    ui.q.select();
  }
});

function resetToWelcome() {
  state.seq += 1;
  state.hits = [];
  state.hasMore = false;
  state.loading = false;
  ui.results.replaceChildren();
  ui.results.dataset.state = "idle";
  ui.empty.hidden = true;
  ui.welcome.hidden = false;
  ui.loadMore.hidden = true;
  ui.spinner.hidden = true;
  ui.notes.textContent = "";
  showStatus("");
  updateUrl(true);
}

// ---------------------------------------------------------------------------------------------
// URL state: ?q=words&to=text, ?item=12, &index=name (the back button works); and query.js's
// &mode=keyword, &hide_duplicates=1, the filters by their API names (&formats=png&taken=A..B),
// and the feedback chips, &more=ID,ID&less=ID.

function fromUrl() {
  const params = new URLSearchParams(location.search);
  setTarget(params.get("to") || state.target, { run: false });
  options.setFromParams(params);
  filters.setFromParams(params);
  const q = params.get("q");
  const item = Number(params.get("item"));
  const describe = () => feedback.setFromParams(params).forEach(describeFeedback);
  if (q) {
    ui.q.value = q;
    describe();
    setQuery({ kind: "text", text: q }, { push: false, keepFeedback: true });
  } else if (Number.isInteger(item) && item > 0 && params.has("item")) {
    describe();
    setQuery({ kind: "item", id: item, thumb: null, label: `like #${item}` }, { push: false, keepFeedback: true });
  } else if (state.query && state.query.kind !== "image") {
    setQuery(null, { push: false });
    resetToWelcome();
  } else if (state.query) {
    search({ push: false }); // a picture is not in the URL; its options and filters are
  }
}

// A chip from the URL learns its picture and name.
async function describeFeedback(id) {
  try {
    const item = await api(withIndex(`api/items/${id}`));
    feedback.describe(id, { thumb: item.thumb, label: hitLabel(item) });
  } catch {
    // the chip keeps its plain label; the search itself says what is wrong with the id
  }
}

window.addEventListener("popstate", () => {
  closeDetail();
  const wanted = new URLSearchParams(location.search).get("index");
  if (wanted && wanted !== state.index && state.indexes.some((ix) => ix.name === wanted)) {
    state.index = wanted;
    ui.picker.value = wanted;
    showIndexInfo();
  }
  fromUrl();
});

ui.results.dataset.state = "idle";
await loadIndexes();
fromUrl();
if (!state.query) ui.q.focus();
document.documentElement.dataset.ready = "true";
