// Flotilla dashboard: progressive enhancement only; every page works without it.
"use strict";

// A section with data-live="/path" is replaced by each update the server sends
// on that stream (server-sent events carrying HTML the server escaped).
function follow(el) {
  const status = document.getElementById(el.dataset.liveStatus || "");
  const src = new EventSource(el.dataset.live);
  src.addEventListener("update", (e) => {
    if (status) status.textContent = "live";
    // Each update names its version: the one the page already shows is kept.
    if (e.lastEventId && e.lastEventId === el.dataset.liveVersion) return;
    el.dataset.liveVersion = e.lastEventId;
    el.innerHTML = e.data;
    el.dataset.updates = String(Number(el.dataset.updates || "0") + 1);
    if (status) status.textContent = "live";
  });
  src.addEventListener("end", () => {
    src.close();
    if (status) status.textContent = "finished";
  });
  src.onerror = () => {
    if (status) status.textContent = "reconnecting…";
  };
}

// A file input with data-fills="ID" puts the chosen file's text in that field.
function fill(input) {
  input.addEventListener("change", () => {
    const file = input.files && input.files[0];
    const target = document.getElementById(input.dataset.fills);
    if (!file || !target || file.size > 65536) return;
    file.text().then((t) => { target.value = t; });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-live]").forEach(follow);
  document.querySelectorAll("input[data-fills]").forEach(fill);
});
