// The review page's script: plain JavaScript against the JSON API of this server, no build step, no libraries.
// The API key lives in memory and in sessionStorage (this tab only); thumbnails are fetched with it and shown from
// blob: URLs that are revoked as soon as they are replaced. Every text from the API goes in through textContent.
"use strict";

const KEY_SLOT = "nsfw-index-review-key";
const state = { key: sessionStorage.getItem(KEY_SLOT) || "", kind: "group", cluster: null, image: null, noThumbs: false };

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function headers(extra = {}) {
  return state.key ? { ...extra, Authorization: "Bearer " + state.key } : extra;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
  if (message) setTimeout(() => { if (box.textContent === message) box.hidden = true; }, 6000);
}

async function api(path, options = {}) {
  const response = await fetch(path, { cache: "no-store", ...options, headers: headers(options.headers) });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const message = body && body.error ? body.error.message : response.status + " " + response.statusText;
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return body;
}

function score(scores) {
  return scores ? Object.entries(scores).map(([lv, v]) => lv + " " + Number(v).toFixed(3)).join(", ") : "";
}

// -- key ------------------------------------------------------------------------------------------------------------
function showKeyState() {
  $("key-state").textContent = state.key ? "a key is set for this tab" : "no key: reads only, no thumbnails (they need a key with view_images)";
}

function useKey(event) {
  event.preventDefault();
  state.key = $("key").value.trim();
  $("key").value = "";
  if (state.key) sessionStorage.setItem(KEY_SLOT, state.key);
  else sessionStorage.removeItem(KEY_SLOT);
  showKeyState();
  reload();
}

function forgetKey() {
  state.key = "";
  sessionStorage.removeItem(KEY_SLOT);
  showKeyState();
  reload();
}

// -- groups and clusters ----------------------------------------------------------------------------------------------
async function loadList() {
  const list = $("cluster-list");
  list.replaceChildren();
  $("list-state").textContent = "loading ...";
  try {
    const page = await api(`/v1/clusters?kind=${state.kind}&sort=unsafe&per_page=200`);
    $("list-state").textContent = page.total
      ? `${page.total} ${state.kind === "group" ? "groups" : "clusters"}, most known-unsafe first` +
        (page.fresh ? "" : " (images changed since `nsfw-index cluster` ran)")
      : "none yet: run `nsfw-index cluster --store DIR`";
    for (const c of page.items) {
      const text = `#${c.id}: ${c.size} images, ${c.unsafe_count} known-unsafe`;
      list.append(el("li", {}, el("button", {
        type: "button", class: c.flagged ? "flagged" : "", "data-cluster": String(c.id), text,
        onclick: () => openCluster(c.id),
      })));
    }
  } catch (e) {
    $("list-state").textContent = "cannot list: " + e.message;
  }
}

async function openCluster(id) {
  state.cluster = id;
  for (const card of $("member-grid").querySelectorAll(".card")) forgetThumb(card);
  $("member-grid").replaceChildren();
  $("members-title").textContent = `${state.kind === "group" ? "Group" : "Cluster"} #${id}`;
  $("members-state").textContent = "loading ...";
  try {
    const detail = await api(`/v1/clusters/${id}?limit=500`);
    $("members-state").textContent =
      `${detail.size} images, ${detail.unsafe_count} known-unsafe` +
      (detail.members.length < detail.size ? `, the first ${detail.members.length} shown` : "");
    for (const m of detail.members) $("member-grid").append(memberCard(m));
  } catch (e) {
    $("members-state").textContent = "cannot open: " + e.message;
  }
}

function memberCard(m) {
  const card = el("div", { class: "card" + (m.sources.length ? " unsafe" : ""), "data-id": String(m.id) });
  const thumb = el("button", { type: "button", class: "thumb blurred", "data-role": "thumb", onclick: () => toggle(card) },
    el("span", { class: "hint", text: "loading thumbnail ..." }));
  card.append(
    thumb,
    el("div", {}, el("strong", { text: "#" + m.id }), " ", el("span", { text: m.level })),
    el("div", { class: "muted", text: score(m.scores) }),
    el("div", { class: "sources", "data-role": "sources", text: m.sources.length ? "known-unsafe: " + m.sources.join(", ") : "" }),
  );
  if (m.paths) card.append(el("ul", { class: "paths" }, ...m.paths.map((p) => el("li", { text: p }))));
  card.append(el("button", { type: "button", class: "link", "data-role": "details", text: "Details", onclick: () => openImage(m.id) }));
  if (state.noThumbs) thumb.replaceChildren(el("span", { class: "hint muted", text: "no thumbnails in this store" }));
  else loadThumb(card, false);
  return card;
}

// -- thumbnails -------------------------------------------------------------------------------------------------------
function forgetThumb(card) {
  if (card.thumbUrl) URL.revokeObjectURL(card.thumbUrl);
  card.thumbUrl = null;
}

async function loadThumb(card, reveal) {
  const id = card.dataset.id;
  const thumb = card.querySelector("[data-role=thumb]");
  const response = await fetch(`/v1/images/${id}/thumbnail${reveal ? "?reveal=true" : ""}`, {
    cache: "no-store", headers: headers(),
  });
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    const message = body && body.error ? body.error.message : String(response.status);
    if (response.status === 404 && message.includes("keeps no thumbnails")) {
      state.noThumbs = true;
      thumb.replaceChildren(el("span", { class: "hint muted", text: "no thumbnails in this store" }));
    } else if (reveal) {
      showError("cannot reveal #" + id + ": " + message);
    } else {
      thumb.replaceChildren(el("span", { class: "hint muted", text: message }));
    }
    return;
  }
  const variant = response.headers.get("X-Thumbnail") || "blurred";
  const url = URL.createObjectURL(await response.blob());
  forgetThumb(card);
  card.thumbUrl = url;
  card.dataset.variant = variant;
  thumb.className = "thumb " + (variant === "blurred" ? "blurred" : "revealed");
  thumb.replaceChildren(
    el("img", { src: url, alt: `image ${id} (${variant})`, "data-variant": variant }),
    el("span", { class: "hint", text: variant === "blurred" ? "blurred: click to reveal" : reveal ? "click to blur" : "" }),
  );
}

function toggle(card) {
  if (state.noThumbs || !card.dataset.variant) return;
  loadThumb(card, card.dataset.variant === "blurred");
}

// -- one image: details, neighbours, labels -----------------------------------------------------------------------------
async function openImage(id) {
  state.image = id;
  $("detail-title").textContent = "Image #" + id;
  $("label-form").hidden = false;
  $("label-state").textContent = "";
  const body = $("detail-body");
  body.textContent = "loading ...";
  try {
    const [image, near] = await Promise.all([api(`/v1/images/${id}`), api(`/v1/images/${id}/neighbours`)]);
    body.replaceChildren(
      el("div", { text: `${image.width}×${image.height} ${image.format}, level ${image.level}, ${image.is_nsfw ? "NSFW" : "not NSFW"}` }),
      el("div", { class: "muted", text: score(image.scores) }),
      el("div", { class: "sources", "data-role": "detail-sources",
        text: image.known_unsafe_sources.length ? "known-unsafe: " + image.known_unsafe_sources.join(", ") : "not known-unsafe" }),
      el("div", { "data-role": "detail-label", text: "current label: " + (image.label || "none") }),
      image.paths ? el("ul", { class: "paths" }, ...image.paths.map((p) => el("li", { text: p }))) : null,
    );
    const rows = image.labels.map((ev) => el("tr", {},
      ...[ev.event, ev.label + (ev.override_hash_lists ? " (overrides hash lists)" : ""), ev.who, ev.at, ev.reason || ""]
        .map((v) => el("td", { text: String(v) }))));
    $("history").tBodies[0].replaceChildren(...rows);
    showNeighbours(near);
  } catch (e) {
    body.textContent = "cannot load: " + e.message;
  }
}

function showNeighbours(near) {
  const link = (n, text) => el("button", { type: "button", class: "link", text, onclick: () => openImage(n.id) });
  const box = $("neighbours");
  box.className = "";
  box.replaceChildren(
    el("div", { text: `exact duplicates: ${near.exact_duplicates.count} other path(s)` }),
    el("h4", { text: "Nearest known-unsafe" }),
    near.nearest_unsafe.length
      ? el("ul", {}, ...near.nearest_unsafe.map((n) => el("li", {},
          link(n, "#" + n.id), ` similarity ${n.similarity.toFixed(3)}, ${n.sources.join(", ")}`)))
      : el("div", { class: "muted", text: "none" }),
    el("h4", { text: "Near-duplicates" }),
    near.near_duplicates.length
      ? el("ul", {}, ...near.near_duplicates.map((n) => el("li", {}, link(n, "#" + n.id), ` similarity ${n.similarity.toFixed(3)}`)))
      : el("div", { class: "muted", text: "none" }),
  );
}

async function label(kind) {
  const id = state.image;
  if (id == null) return;
  const reason = $("reason").value.trim();
  $("label-state").textContent = "saving ...";
  try {
    const body = JSON.stringify(reason ? { label: kind, reason } : { label: kind });
    const done = await api(`/v1/images/${id}/label`, {
      method: "PUT", body, headers: { "Content-Type": "application/json" },
    });
    $("reason").value = "";
    for (const card of document.querySelectorAll(`.card[data-id="${id}"]`)) {
      const sources = done.known_unsafe_sources;
      card.classList.toggle("unsafe", sources.length > 0);
      card.querySelector("[data-role=sources]").textContent = sources.length ? "known-unsafe: " + sources.join(", ") : "";
      if (!state.noThumbs) loadThumb(card, false); // the default variant again: a label may blur it
    }
    await openImage(id);
    $("label-state").textContent = `recorded event ${done.event}: ${done.label}`;
  } catch (e) {
    $("label-state").textContent = "not recorded: " + e.message;
  }
}

function reload() {
  loadList();
  if (state.cluster != null) openCluster(state.cluster);
  if (state.image != null) openImage(state.image);
}

function selectKind(kind) {
  state.kind = kind;
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.kind === kind);
  loadList();
}

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", useKey);
  $("key-forget").addEventListener("click", forgetKey);
  $("tab-group").addEventListener("click", () => selectKind("group"));
  $("tab-cluster").addEventListener("click", () => selectKind("cluster"));
  $("label-unsafe").addEventListener("click", () => label("unsafe"));
  $("label-safe").addEventListener("click", () => label("safe"));
  showKeyState();
  loadList();
});
window.addEventListener("pagehide", () => {
  for (const card of document.querySelectorAll(".card")) forgetThumb(card);
});
