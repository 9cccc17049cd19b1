// Starts Swagger UI (vendored swagger-ui-dist) on /docs; a file, not an inline script, for the CSP.
"use strict";

window.addEventListener("DOMContentLoaded", () => {
  const root = document.getElementById("swagger-ui");
  window.ui = window.SwaggerUIBundle({
    url: root.dataset.openapiUrl,
    dom_id: "#swagger-ui",
    layout: "BaseLayout",
    deepLinking: true,
    showExtensions: true,
    showCommonExtensions: true,
    validatorUrl: null, // the online validator badge would call validator.swagger.io
    presets: [window.SwaggerUIBundle.presets.apis],
  });
});
