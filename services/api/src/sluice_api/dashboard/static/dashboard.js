// Sluice dashboard: the live-updates toggle. Parts of a page marked data-live poll every 2 s
// through htmx; while the toggle is off their requests are dropped before they are sent.
(function () {
  "use strict";
  var KEY = "sluice-live";
  function paused() {
    return document.body.classList.contains("paused");
  }
  document.addEventListener("DOMContentLoaded", function () {
    var toggle = document.getElementById("live-toggle");
    if (!toggle) return;
    if (window.localStorage.getItem(KEY) === "off") {
      toggle.checked = false;
      document.body.classList.add("paused");
    }
    toggle.addEventListener("change", function () {
      document.body.classList.toggle("paused", !toggle.checked);
      window.localStorage.setItem(KEY, toggle.checked ? "on" : "off");
    });
  });
  document.addEventListener("htmx:beforeRequest", function (event) {
    var elt = event.detail && event.detail.elt;
    if (paused() && elt && elt.hasAttribute("data-live")) event.preventDefault();
  });
})();
