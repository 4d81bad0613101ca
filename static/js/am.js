// Live updates: say when the socket is down, and catch up from the event log after a reconnect.
(function () {
  var opened = false;
  function banner(show) {
    var el = document.getElementById("live-status");
    if (el) el.hidden = !show;
  }
  function lastSeq() {
    var el = document.getElementById("live-seq");
    // A string: event numbers pass 2**53 (a transaction id times 2**20), beyond what a JS number holds exactly.
    return el && el.dataset.seq ? el.dataset.seq : "0";
  }
  document.addEventListener("htmx:wsOpen", function (event) {
    banner(false);
    document.body.dataset.live = "open";
    if (opened) {
      // Events published while we were away are in the log: ask for them.
      event.detail.socketWrapper.send(JSON.stringify({catch_up_after: lastSeq()}));
    }
    opened = true;
  });
  // A catch-up may bring again events the page was sent live: keep the first of each.
  document.addEventListener("htmx:wsAfterMessage", function () {
    var seen = {};
    document.querySelectorAll("li[data-event]").forEach(function (li) {
      var key = li.parentNode.id + ":" + li.dataset.event;
      if (seen[key]) { li.remove(); } else { seen[key] = true; }
    });
  });
  document.addEventListener("htmx:wsClose", function () { banner(true); document.body.dataset.live = "closed"; });
  document.addEventListener("htmx:wsError", function () { banner(true); });
})();
