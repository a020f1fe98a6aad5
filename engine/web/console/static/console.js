// wecast console: the little JavaScript the pages need, on top of the vendored htmx (static/htmx.min.js).
//
// The server accepts changes only as JSON (engine/web/security.py refuses form bodies, which any site can post),
// so this htmx extension sends every form and button's values as a JSON object. The CSRF token travels in the
// X-CSRF-Token header that <body hx-headers> sets on every request.
"use strict";

htmx.defineExtension("wecast-json", {
  onEvent: function (name, evt) {
    if (name === "htmx:configRequest" && evt.detail.verb !== "get") {
      evt.detail.headers["Content-Type"] = "application/json";
    }
  },
  encodeParameters: function (xhr, parameters) {
    const object = {};
    parameters.forEach(function (value, key) {
      if (Object.prototype.hasOwnProperty.call(object, key)) {
        object[key] = [].concat(object[key], value);
      } else {
        object[key] = value;
      }
    });
    return JSON.stringify(object);
  },
});

// A failed request the server did not answer (network down, server stopped) says so instead of doing nothing.
document.addEventListener("htmx:sendError", function () {
  const notice = document.getElementById("notice");
  if (notice) {
    notice.textContent = document.body.dataset.offline || "The server did not answer.";
    notice.className = "notice error";
  }
});
