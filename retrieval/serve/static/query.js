// crossmodal serve: what a search asks for besides its words or picture (app.js sends it).
//
// - Feedback: "more / less like this" chips. Each one is a term {"item": id, "weight": ±0.5} added
//   to the query's own term (weight 1): Rocchio's relevance feedback, sent as a fused `terms` query.
// - Options: the ranking mode of a text query, and hiding near-duplicates.
// - FilterPanel: the metadata filters (indexer/filters.py), only the fields filled in.
// Each keeps its part of the URL, so reloading and Back show the same search.

import { $, el } from "./dom.js";

export const FEEDBACK_WEIGHT = 0.5;
export const MODES = ["vector", "keyword", "hybrid", "fused"];

// ---------------------------------------------------------------------------------------------
// Relevance feedback

export class Feedback {
  constructor(list, { onRemove }) {
    this.list = list;
    this.onRemove = onRemove;
    this.terms = []; // {id, weight, thumb, label}
  }

  get size() {
    return this.terms.length;
  }

  // True when the query changed (a new term, or an item moved from "more" to "less").
  add({ id, thumb, label }, weight) {
    const known = this.terms.find((t) => t.id === id);
    if (known && known.weight === weight) return false;
    if (known) known.weight = weight;
    else this.terms.push({ id, weight, thumb: thumb || null, label: label || `#${id}` });
    this.render();
    return true;
  }

  remove(id) {
    const before = this.terms.length;
    this.terms = this.terms.filter((t) => t.id !== id);
    this.render();
    return this.terms.length !== before;
  }

  clear() {
    if (!this.terms.length) return;
    this.terms = [];
    this.render();
  }

  asTerms() {
    return this.terms.map((t) => ({ item: t.id, weight: t.weight }));
  }

  toParams(params) {
    const ids = (positive) => this.terms.filter((t) => (t.weight > 0) === positive).map((t) => t.id).join(",");
    if (ids(true)) params.set("more", ids(true));
    if (ids(false)) params.set("less", ids(false));
  }

  setFromParams(params) {
    const ids = (name) => (params.get(name) || "").split(",").map(Number).filter((n) => Number.isInteger(n) && n > 0);
    const kept = new Map(this.terms.map((t) => [t.id, t]));
    this.terms = [];
    for (const [name, weight] of [["more", FEEDBACK_WEIGHT], ["less", -FEEDBACK_WEIGHT]]) {
      for (const id of ids(name)) {
        if (this.terms.some((t) => t.id === id)) continue;
        const old = kept.get(id);
        this.terms.push({ id, weight, thumb: old?.thumb || null, label: old?.label || `#${id}` });
      }
    }
    this.render();
    return this.terms.filter((t) => !t.thumb && t.label === `#${t.id}`).map((t) => t.id); // to look up
  }

  // A term from the URL learns its picture and name once the item is fetched.
  describe(id, { thumb, label }) {
    const term = this.terms.find((t) => t.id === id);
    if (!term) return;
    Object.assign(term, { thumb: thumb || term.thumb, label: label || term.label });
    this.render();
  }

  indexOf(id) {
    return this.terms.findIndex((t) => t.id === id);
  }

  // The remove button of the chip at ``at`` (the last one when fewer), or null without chips.
  removeButton(at) {
    const buttons = this.list.querySelectorAll(".chip-clear");
    return buttons[Math.min(at, buttons.length - 1)] || null;
  }

  render() {
    this.list.hidden = this.terms.length === 0;
    this.list.replaceChildren(...this.terms.map((term) => this.chip(term)));
  }

  chip(term) {
    const more = term.weight > 0;
    const words = `${more ? "more" : "less"} like ${term.label}`;
    const remove = el("button", { type: "button", class: "chip-clear", title: "Remove",
      "aria-label": `Remove “${words}” from the query` }, "×");
    remove.addEventListener("click", () => this.onRemove(term.id));
    return el(
      "li",
      { class: `chip feedback-chip ${more ? "is-more" : "is-less"}`, dataset: { id: term.id, weight: term.weight },
        title: words[0].toUpperCase() + words.slice(1) },
      el("span", { class: "sign", "aria-hidden": "true" }, more ? "+" : "−"),
      term.thumb ? el("img", { src: term.thumb, alt: "" }) : el("span", { "aria-hidden": "true" }, term.label),
      el("span", { class: "visually-hidden" }, words),
      remove,
    );
  }
}

// ---------------------------------------------------------------------------------------------
// Ranking mode and near-duplicates

export class Options {
  constructor({ onMode, onDuplicates }) {
    this.select = $("#mode");
    this.hint = $("#mode-hint");
    this.duplicates = $("#hide-duplicates");
    this.mode = "vector"; // the choice for text queries; a terms query ranks by vector whatever it says
    this.select.addEventListener("change", () => {
      this.mode = MODES.includes(this.select.value) ? this.select.value : "vector";
      onMode();
    });
    this.duplicates.addEventListener("change", onDuplicates);
  }

  get hideDuplicates() {
    return this.duplicates.checked;
  }

  // An image, an item or feedback chips make a terms query: the vector mode only (the API's rule).
  lock(termsQuery) {
    this.select.disabled = termsQuery;
    this.select.value = termsQuery ? "vector" : this.mode;
    this.hint.hidden = !termsQuery;
  }

  toParams(params, textQuery) {
    if (textQuery && this.mode !== "vector") params.set("mode", this.mode);
    if (this.hideDuplicates) params.set("hide_duplicates", "1");
  }

  setFromParams(params) {
    const mode = params.get("mode");
    this.mode = MODES.includes(mode) ? mode : "vector";
    if (!this.select.disabled) this.select.value = this.mode;
    this.duplicates.checked = params.get("hide_duplicates") === "1";
  }
}

// ---------------------------------------------------------------------------------------------
// Metadata filters

const RANGES = ["taken", "modified"];
const NUMBERS = [["min_width", "#f-min-width"], ["min_height", "#f-min-height"]];

export class FilterPanel {
  constructor({ onChange }) {
    this.form = $("#filters-form");
    this.panel = $("#filters-panel");
    this.toggle = $("#filters-toggle");
    this.count = $("#filters-count");
    this.onChange = onChange;
    this.applied = "{}"; // what the last search sent, as JSON
    this.toggle.addEventListener("click", () => this.open(this.panel.hidden));
    this.form.addEventListener("change", () => this.apply());
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.apply();
    });
    $("#filters-clear").addEventListener("click", () => {
      this.write({});
      this.apply();
    });
    $("#filters-close").addEventListener("click", () => {
      this.open(false);
      this.toggle.focus();
    });
  }

  open(open) {
    this.panel.hidden = !open;
    this.toggle.setAttribute("aria-expanded", String(open));
    if (open) this.form.querySelector("input")?.focus({ preventScroll: true });
  }

  field(selector) {
    return this.form.querySelector(selector);
  }

  // The API's `filters`: only the fields filled in (an empty object is no filter).
  read() {
    const text = (selector) => this.field(selector).value.trim();
    const filters = {};
    const paths = text("#f-paths").split(",").map((p) => p.trim()).filter(Boolean);
    if (paths.length) filters.paths = paths;
    const formats = [...this.form.querySelectorAll('input[name="format"]:checked')].map((box) => box.value);
    if (formats.length) filters.formats = formats;
    for (const name of RANGES) {
      const from = text(`#f-${name}-from`);
      const to = text(`#f-${name}-to`);
      if (from || to) filters[name] = `${from}..${to}`;
    }
    if (text("#f-camera")) filters.camera = text("#f-camera");
    for (const [name, selector] of NUMBERS) {
      if (text(selector)) filters[name] = Number(text(selector));
    }
    if (text("#f-orientation")) filters.orientation = text("#f-orientation");
    if (text("#f-captioned")) filters.has_caption = text("#f-captioned") === "yes";
    const box = text("#f-bbox");
    if (box) {
      const numbers = box.split(",").map((v) => (v.trim() === "" ? NaN : Number(v)));
      filters.bbox = numbers.length === 4 && numbers.every(Number.isFinite) ? numbers : box; // else the API says why
    }
    return filters;
  }

  write(filters) {
    const set = (selector, value) => {
      this.field(selector).value = value ?? "";
    };
    set("#f-paths", (filters.paths || []).join(", "));
    const formats = new Set((filters.formats || []).map((f) => String(f).toLowerCase()));
    for (const box of this.form.querySelectorAll('input[name="format"]')) box.checked = formats.has(box.value);
    for (const name of RANGES) {
      const value = filters[name] || "";
      const [from, to] = value.includes("..") ? value.split("..", 2) : [value, value];
      set(`#f-${name}-from`, from);
      set(`#f-${name}-to`, to);
    }
    set("#f-camera", filters.camera);
    for (const [name, selector] of NUMBERS) set(selector, filters[name]);
    set("#f-orientation", ["landscape", "portrait", "square"].includes(filters.orientation) ? filters.orientation : "");
    set("#f-captioned", filters.has_caption === true ? "yes" : filters.has_caption === false ? "no" : "");
    set("#f-bbox", Array.isArray(filters.bbox) ? filters.bbox.join(",") : filters.bbox);
    this.showCount();
  }

  // What a search sends now (what is filled in, committed or not); null when nothing is.
  current() {
    const filters = this.read();
    this.applied = JSON.stringify(filters);
    this.showCount();
    return Object.keys(filters).length ? filters : null;
  }

  // What the last first page sent (its next pages send the same).
  sent() {
    const filters = JSON.parse(this.applied);
    return Object.keys(filters).length ? filters : null;
  }

  apply() {
    const now = JSON.stringify(this.read());
    this.showCount();
    if (now === this.applied) return;
    this.applied = now;
    this.onChange();
  }

  showCount() {
    const n = Object.keys(this.read()).length;
    this.count.hidden = n === 0;
    this.count.textContent = String(n);
    this.toggle.setAttribute("aria-label", n ? `Filters, ${n} active` : "Filters");
    this.toggle.classList.toggle("active", n > 0);
    $("#filters-clear").disabled = n === 0;
  }

  toParams(params) {
    const filters = JSON.parse(this.applied);
    for (const [name, value] of Object.entries(filters)) {
      if (name === "paths") for (const path of value) params.append("paths", path);
      else if (Array.isArray(value)) params.set(name, value.join(","));
      else params.set(name, String(value));
    }
  }

  setFromParams(params) {
    const filters = {};
    if (params.getAll("paths").length) filters.paths = params.getAll("paths");
    if (params.get("formats")) filters.formats = params.get("formats").split(",");
    for (const name of [...RANGES, "camera", "orientation", "bbox"]) {
      if (params.get(name)) filters[name] = params.get(name);
    }
    for (const [name] of NUMBERS) if (params.get(name)) filters[name] = params.get(name);
    if (params.get("has_caption")) filters.has_caption = params.get("has_caption") === "true";
    this.write(filters);
    this.applied = JSON.stringify(this.read());
  }
}
