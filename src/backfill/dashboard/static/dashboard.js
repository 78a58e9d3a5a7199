// backfill's dashboard: the numbers of every migration on the page, kept current from the
// server-sent events of /events (the status JSON, about once a second). No build, no library.
// The texts are display.py's (keep the two alike); they are set as text, never as HTML.
(function () {
  "use strict";

  var NOTHING = "\u2014";

  function number(value) {
    return value === null || value === undefined ? NOTHING : value.toLocaleString("en-US");
  }

  function pad(n) {
    return (n < 10 ? "0" : "") + n;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return NOTHING;
    var total = Math.round(seconds);
    var secs = total % 60;
    var minutes = Math.floor(total / 60) % 60;
    var hours = Math.floor(total / 3600);
    if (hours) return hours + "h " + pad(minutes) + "m";
    return minutes ? minutes + "m " + pad(secs) + "s" : secs + "s";
  }

  function when(moment) {
    return moment === null || moment === undefined ? NOTHING : moment.replace("T", " ");
  }

  function shownId(id) {
    return typeof id === "string" ? "'" + id + "'" : JSON.stringify(id);
  }

  function progress(status) {
    var done = status.progress.processed;
    var total = status.progress.total;
    if (total === null) return number(done) + " / ?";
    var share = total ? " (" + Math.floor((100 * done) / total) + "%)" : "";
    var about = status.total_is_estimate ? "~" : "";
    return number(done) + " / " + about + number(total) + share;
  }

  function error(found) {
    if (!found) return "";
    var where = found.row_id === null ? "" : "row " + shownId(found.row_id);
    if (found.field) where += ", field '" + found.field + "'";
    return where ? where + ": " + found.message + " (" + found.type + ")" : found.message;
  }

  function revert(found) {
    if (!found) return NOTHING;
    return (
      found.state + " " + number(found.progress.processed) + " / " + number(found.progress.total) +
      " (reverted " + number(found.reverted) + ", kept " + number(found.kept_changed_by_app) + ")"
    );
  }

  function verified(found) {
    if (!found) return NOTHING;
    return (
      number(found.remaining) + " left, " + number(found.raising) + " raising (" +
      when(found.at) + ")"
    );
  }

  function undo(status) {
    var logged = status.undo === null ? "" : status.undo ? "logged, " : "not logged, ";
    return logged + number(status.undo_rows) + " rows";
  }

  function workers(status) {
    var shards = status.shards.length;
    return shards ? status.workers + " / " + shards + " shards" : String(status.workers);
  }

  function shown(status) {
    var rate = status.rows_per_second;
    return {
      state: status.state,
      progress: progress(status),
      changed: number(status.changed),
      skipped: number(status.skipped_errors),
      kept: number(status.kept),
      rate: rate === null ? NOTHING : rate.toLocaleString("en-US", {
        minimumFractionDigits: 1, maximumFractionDigits: 1
      }) + " rows/s",
      eta: duration(status.eta_seconds),
      started: when(status.started_at),
      updated: when(status.updated_at),
      error: error(status.error),
      undo: undo(status),
      revert: revert(status.revert),
      workers: workers(status),
      verified: verified(status.verified)
    };
  }

  function update(element, status, texts) {
    var field = element.getAttribute("data-field");
    if (field === "bar") {
      var total = status.progress.total;
      element.max = total || 1;
      element.value = total ? Math.min(status.progress.processed, total) : 0;
      return;
    }
    if (!(field in texts)) return;
    element.textContent = texts[field];
    if (field === "state") element.className = "state state-" + status.state;
  }

  function show(report) {
    var rows = document.querySelectorAll("[data-migration]");
    for (var i = 0; i < rows.length; i++) {
      var row = rows[i];
      var status = report[row.getAttribute("data-migration")];
      if (!status) continue;
      var texts = shown(status);
      var fields = row.querySelectorAll("[data-field]");
      for (var j = 0; j < fields.length; j++) update(fields[j], status, texts);
      if (row.hasAttribute("data-hide-empty")) row.hidden = !texts.error;
    }
  }

  function say(text, ok) {
    var live = document.getElementById("live");
    if (!live) return;
    live.hidden = false;
    live.textContent = text;
    live.className = ok ? "live" : "live stale";
  }

  function listen() {
    if (!window.EventSource || !document.querySelector("[data-migration]")) return;
    var source = new EventSource("/events");
    source.onmessage = function (message) {
      show(JSON.parse(message.data));
      say("live", true);
    };
    source.addEventListener("error", function (message) {
      // Ours (a read that failed) carries the sentence; the browser's (connection lost) not.
      var sentence = message.data ? JSON.parse(message.data).error : "reconnecting\u2026";
      say(sentence, false);
    });
  }

  // What the page shows of a status, for tests (tests/test_dashboard.py compares it with
  // display.py's).
  window.backfillDashboard = { shown: shown };

  // Forms marked data-confirm ask first (prod runs, reverts).
  document.addEventListener("submit", function (event) {
    var question = event.target.getAttribute("data-confirm");
    if (question && !window.confirm(question)) event.preventDefault();
  });

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", listen);
  } else {
    listen();
  }
})();
