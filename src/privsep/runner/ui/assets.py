"""The page's stylesheet and its one script, served by the page itself (same origin, so the
Content-Security-Policy can name ``'self'`` and nothing else)."""

from __future__ import annotations

STYLE = """\
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #222; }
nav { background: #24292f; padding: 0.5em 1em; }
nav a { color: #fff; margin-right: 1.5em; text-decoration: none; }
main { padding: 0 1em 1em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.75em; text-align: left;
         vertical-align: top; }
th { background: #f3f3f3; }
td pre, #log { white-space: pre-wrap; word-break: break-all; margin: 0; }
#log { background: #111; color: #ddd; padding: 0.75em; font: 12px/1.35 monospace;
       min-height: 4em; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dt { font-weight: 600; }
dd { margin: 0; }
.state.success { color: #1a7f37; }
.state.failed, .state.up_for_retry { color: #cf222e; }
.state.running, .state.queued, .state.deferred { color: #9a6700; }
.empty { color: #666; font-style: italic; }
.error { color: #cf222e; }
"""

# The live tail: asks this page (never the server) for what follows ``data-next`` and adds
# it as text nodes, so a log line can never become markup. It stops once the log is complete.
TAIL_JS = """\
"use strict";
(function () {
  var log = document.getElementById("log");
  var state = document.getElementById("log-state");
  if (!log || !state) { return; }
  var url = log.getAttribute("data-tail");
  var next = log.getAttribute("data-next");
  var complete = log.getAttribute("data-complete") === "true";
  function poll() {
    if (complete) { return; }
    fetch(url + "?after=" + encodeURIComponent(next),
          {credentials: "same-origin", cache: "no-store"})
      .then(function (reply) {
        if (!reply.ok) { throw new Error("HTTP " + reply.status); }
        return reply.json();
      })
      .then(function (data) {
        data.chunks.forEach(function (chunk) {
          log.appendChild(document.createTextNode(chunk.text));
        });
        next = String(data.next);
        complete = data.complete === true;
        state.textContent = complete ? "complete" : "following\\u2026";
        setTimeout(poll, 1000);
      })
      .catch(function (error) {
        state.textContent = "live tail paused (" + error.message + "); retrying";
        setTimeout(poll, 5000);
      });
  }
  setTimeout(poll, 1000);
})();
"""

ASSETS = {
    "/static/ui.css": ("text/css; charset=utf-8", STYLE.encode()),
    "/static/tail.js": ("text/javascript; charset=utf-8", TAIL_JS.encode()),
}
