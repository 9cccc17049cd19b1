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
