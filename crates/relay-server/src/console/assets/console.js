// relay console: live updates for the group page. Every fragment comes from the server,
// rendered and escaped there; this script only places them. No inline script anywhere
// (the Content-Security-Policy forbids it).
"use strict";

(function () {
  const main = document.querySelector("main.group");
  if (!main) return;
  const group = main.dataset.group;
  const timeline = document.getElementById("timeline");
  const state = document.getElementById("stream-state");
  const base = "/console/g/" + encodeURIComponent(group);

  function fragment(html) {
    const t = document.createElement("template");
    t.innerHTML = html; // server-escaped markup; <template> runs nothing
    return t.content;
  }

  function nearBottom() {
    return window.innerHeight + window.scrollY >= document.body.scrollHeight - 80;
  }

  function addEntry(html) {
    const content = fragment(html);
    const li = content.firstElementChild;
    if (!li || document.getElementById(li.id)) return; // already shown
    const follow = nearBottom();
    timeline.appendChild(content);
    if (follow) li.scrollIntoView({ block: "end" });
  }

  function placeMark(html) {
    const mark = fragment(html).firstElementChild;
    if (!mark) return;
    const marks = document.getElementById("marks-" + mark.dataset.for);
    if (!marks) return;
    const old = Array.from(marks.children).find((m) => m.dataset.peer === mark.dataset.peer);
    if (old) old.replaceWith(mark);
    else marks.appendChild(mark);
  }

  async function refresh(part) {
    try {
      const r = await fetch(base + "/" + part, { credentials: "same-origin" });
      if (r.ok) document.getElementById(part).replaceChildren(fragment(await r.text()));
    } catch (_) {
      /* the next refresh tries again */
    }
  }
  const refreshPeers = () => refresh("peers");

  // the activity panel follows new messages, at most every few seconds
  let activityDue = null;
  function activitySoon() {
    if (activityDue === null) activityDue = setTimeout(() => { activityDue = null; refresh("activity"); }, 3000);
  }

  if (main.dataset.live === "true") {
    const events = new EventSource(base + "/events?after=" + encodeURIComponent(main.dataset.head));
    for (const kind of ["message", "dm"]) {
      events.addEventListener(kind, (e) => {
        addEntry(e.data);
        activitySoon();
      });
    }
    for (const kind of ["peer_joined", "peer_left"]) {
      events.addEventListener(kind, (e) => {
        addEntry(e.data);
        refreshPeers();
      });
    }
    events.addEventListener("receipt", (e) => placeMark(e.data));
    events.onopen = () => {
      state.textContent = "live";
      main.dataset.stream = "open";
      refreshPeers(); // the human is online now too
    };
    events.onerror = () => {
      state.textContent = "reconnecting…";
      main.dataset.stream = "retrying";
      // the browser gives up on an answer that is not a stream (signed out, a proxy's
      // error page): load the page again, which says what is wrong or starts afresh
      if (events.readyState === EventSource.CLOSED) setTimeout(() => location.reload(), 3000);
    };
    setInterval(refreshPeers, 15000);
    setInterval(() => refresh("activity"), 60000);
  }

  const compose = document.getElementById("compose");
  const error = document.getElementById("compose-error");
  compose.addEventListener("submit", async (e) => {
    e.preventDefault();
    error.textContent = "";
    const body = new URLSearchParams(new FormData(compose));
    try {
      const r = await fetch(compose.action, {
        method: "POST",
        body,
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      const answer = await r.json().catch(() => ({}));
      if (!r.ok) {
        error.textContent = answer.error || "not sent (HTTP " + r.status + ")";
        return;
      }
      compose.querySelector("textarea").value = "";
    } catch (err) {
      error.textContent = "not sent: " + err;
    }
  });
  compose.querySelector("textarea").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) compose.requestSubmit();
  });
  window.scrollTo(0, document.body.scrollHeight);
})();
