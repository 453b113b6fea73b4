// Keeps the open dashboard page current without reloading it: every few seconds fetch the same URL's main
// content (?fragment=1, rendered by the server) and swap it in. No framework, no build step. Pauses while
// the tab is hidden and backs off while the gateway does not answer.
"use strict";

(function () {
  const main = document.getElementById("content");
  if (!main || !main.dataset.refreshMs) {
    return;
  }
  const every = Math.max(1000, parseInt(main.dataset.refreshMs, 10) || 2000);
  const stamp = document.getElementById("refreshed");
  let delay = every;
  let timer = null;
  let last = null;

  function fragmentUrl() {
    const url = new URL(window.location.href);
    url.searchParams.set("fragment", "1");
    return url.toString();
  }

  function schedule() {
    window.clearTimeout(timer);
    timer = window.setTimeout(refresh, delay);
  }

  async function refresh() {
    if (document.hidden) {
      schedule();
      return;
    }
    try {
      const response = await fetch(fragmentUrl(), {
        headers: { "X-Requested-With": "dashboard" },
        cache: "no-store",
        credentials: "same-origin",
      });
      if (!response.ok) {
        throw new Error("HTTP " + response.status);
      }
      const html = await response.text();
      if (html !== last) {
        main.innerHTML = html;
        last = html;
      }
      if (stamp) {
        stamp.textContent = "updated " + (response.headers.get("X-Rendered-At") || new Date().toLocaleString());
        stamp.classList.remove("stale");
      }
      delay = every;
    } catch (err) {
      if (stamp) {
        stamp.textContent = "gateway not answering (" + err.message + "), retrying";
        stamp.classList.add("stale");
      }
      delay = Math.min(delay * 2, 30000);
    }
    schedule();
  }

  document.addEventListener("visibilitychange", function () {
    if (!document.hidden) {
      delay = every;
      refresh();
    }
  });
  schedule();
})();
