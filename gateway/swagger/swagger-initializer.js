// Starts Swagger UI on the gateway's OpenAPI document, whose URL the page names in
// data-openapi-url. A file, not an inline script as in FastAPI's own /docs: the page's
// Content-Security-Policy runs scripts from the gateway only.
"use strict";

(() => {
  const root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.openapiUrl,
    domNode: root,
    layout: "BaseLayout",
    deepLinking: true,
    showExtensions: true,
    showCommonExtensions: true,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
    // No badge from the public validator: the page loads nothing from elsewhere.
    validatorUrl: null,
  });
})();
