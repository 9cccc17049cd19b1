// The web app's only script: draws every chart whose Vega-Lite spec the server put in the page.
// Specs sit in <script type="application/json" class="vega-spec" data-target="ID"> blocks (data, not
// code), so the Content-Security-Policy needs no inline script. `ast: true` makes Vega interpret
// expressions instead of compiling them with Function(), so no 'unsafe-eval' either.
"use strict";

function drawCharts() {
  const blocks = document.querySelectorAll("script.vega-spec[type='application/json']");
  if (blocks.length === 0 || typeof window.vegaEmbed !== "function") {
    return;
  }
  for (const block of blocks) {
    const target = document.getElementById(block.dataset.target);
    const spec = JSON.parse(block.textContent);
    window.vegaEmbed(target, spec, { actions: false, ast: true, renderer: "svg" })
      .then(() => target.setAttribute("data-rendered", "true"))
      .catch((error) => console.error("chart " + block.dataset.target + " failed: " + error));
  }
}

document.addEventListener("DOMContentLoaded", drawCharts);

// ---- Upload page (issue 14): send the file with XMLHttpRequest (upload progress), then follow the
// scoring job's progress until it is done. ------------------------------------------------------------

function showUploadProblem(message) {
  const box = document.getElementById("upload-problem");
  box.textContent = message;
  box.hidden = false;
  document.getElementById("upload-progress").hidden = true;
  document.getElementById("upload-button").disabled = false;
}

function sendUpload(event) {
  event.preventDefault();
  const form = event.target;
  const file = document.getElementById("u-file").files[0];
  document.getElementById("upload-problem").hidden = true;
  if (!file) {
    showUploadProblem("Choose a CSV or Parquet file first.");
    return;
  }
  if (!/\.(csv|parquet)$/i.test(file.name)) {
    showUploadProblem("'" + file.name + "' is not a CSV or Parquet file: choose a file whose name ends in .csv or .parquet.");
    return;
  }
  if (file.size > Number(form.dataset.maxBytes)) {
    showUploadProblem("The file is larger than " + form.dataset.maxMb + " MiB, the most this server accepts. Split it, or score it with `custseg score INPUT --out OUTPUT`.");
    return;
  }
  const query = new URLSearchParams({
    name: file.name,
    reasons: document.getElementById("u-reasons").value,
    snapshot: document.getElementById("u-snapshot").value,
  });
  const bar = document.getElementById("upload-bar");
  const percent = document.getElementById("upload-percent");
  document.getElementById("upload-progress").hidden = false;
  document.getElementById("upload-button").disabled = true;
  const request = new XMLHttpRequest();
  request.open("POST", "/ui/upload?" + query.toString());
  request.setRequestHeader("Accept", "application/json");
  request.setRequestHeader("Content-Type", "application/octet-stream");
  request.setRequestHeader("X-CSRF-Token", form.dataset.csrf);
  request.upload.onprogress = (e) => {
    if (e.lengthComputable) {
      bar.value = Math.round((100 * e.loaded) / e.total);
      percent.textContent = bar.value + "% of " + (e.total / 1048576).toFixed(1) + " MiB";
    }
  };
  request.onload = () => {
    let answer = {};
    try {
      answer = JSON.parse(request.responseText);
    } catch (error) {
      answer = { message: "The server answered " + request.status + " without an explanation." };
    }
    if (request.status === 202 && answer.url) {
      // Scoring progress on this page; the job's page (summary, downloads) once it is done.
      document.querySelector("label[for='upload-bar']").textContent = "Scoring";
      bar.value = 0;
      percent.textContent = "";
      pollJob(answer.progress, (progress) => {
        bar.value = Math.round(100 * (progress.fraction || 0));
        percent.textContent = (progress.rows_read || 0).toLocaleString("en") + " rows";
      }, () => window.location.assign(answer.url));
    } else {
      showUploadProblem(answer.message || "The upload failed (" + request.status + ").");
    }
  };
  request.onerror = () => showUploadProblem("The upload did not reach the server: check the connection and try again.");
  request.send(file);
}

// Poll a scoring job's progress until it is done or failed, then call `finished` (a page change).
function pollJob(url, update, finished) {
  const poll = () => {
    fetch(url, { headers: { Accept: "application/json" }, cache: "no-store" })
      .then((response) => response.json())
      .then((progress) => {
        if (progress.state === "done" || progress.state === "failed") {
          // let the browser close the poll's request before the page goes away
          window.setTimeout(finished, 50);
          return;
        }
        if (progress.state === "running") {
          update(progress);
        }
        window.setTimeout(poll, 250);
      })
      .catch((error) => console.error("upload progress failed: " + error));
  };
  window.setTimeout(poll, 150);
}

function followJob(job) {
  const bar = document.getElementById("score-bar");
  const status = document.getElementById("job-status");
  pollJob(job.dataset.progress, (progress) => {
    bar.value = Math.round(100 * (progress.fraction || 0));
    status.textContent = "Scoring… " + (progress.rows_read || 0).toLocaleString("en") + " rows so far.";
  }, () => window.location.reload());
}

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("upload-form");
  if (form) {
    form.addEventListener("submit", sendUpload);
  }
  const job = document.getElementById("job");
  if (job && (job.dataset.state === "waiting" || job.dataset.state === "running")) {
    followJob(job);
  }
});
// ---- end of the Upload page ----------------------------------------------------------------------
