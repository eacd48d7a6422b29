// effpose agent dashboard: keeps unfinished jobs up to date by polling GET /v1/jobs/{id}.
// No library; values are set with textContent only, never as HTML.
"use strict";
(function () {
  var POLL_MS = 1000;

  function setText(row, selector, value) {
    var node = row.querySelector(selector);
    if (node) node.textContent = value;
  }

  function show(row, job) {
    row.dataset.state = job.state;
    setText(row, ".job-state", job.state);
    setText(row, ".job-done", String(job.done));
    setText(row, ".job-total", String(job.total));
    setText(row, ".job-partial", job.partial ? "partial" : "");
    var bar = row.querySelector("progress");
    if (bar) {
      bar.max = Math.max(job.total, 1);
      bar.value = job.done;
    }
    var list = row.querySelector(".job-errors");
    if (list) {
      var items = (job.errors || []).map(function (error) {
        var item = document.createElement("li");
        var key = document.createElement("code");
        key.textContent = error.key;
        item.append(key, ": " + error.error);
        return item;
      });
      list.replaceChildren.apply(list, items);
    }
  }

  function poll(row) {
    var url = "/v1/jobs/" + encodeURIComponent(row.dataset.jobId);
    fetch(url, { credentials: "same-origin", cache: "no-store", headers: { Accept: "application/json" } })
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (job) {
        if (job) {
          show(row, job);
          if (job.state !== "queued" && job.state !== "running") {
            row.dataset.active = "0";
            return;
          }
        }
        setTimeout(poll, POLL_MS, row);
      })
      .catch(function () { setTimeout(poll, POLL_MS, row); }); // agent restarting: try again
  }

  document.querySelectorAll("tr.job[data-active='1']").forEach(function (row) { poll(row); });
})();
