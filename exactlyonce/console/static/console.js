// The console's own script: optional. Pages read and work without it.
// - the overview reloads its content in place (instead of the <noscript> meta refresh), with a pause box;
// - forms with data-confirm ask before they are sent;
// - "select all" for the dead letters' checkboxes.
"use strict";
(function () {
  function confirmForms(root) {
    root.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        if (!window.confirm(form.getAttribute("data-confirm"))) { event.preventDefault(); }
      });
    });
  }

  function selectAll(root) {
    var box = root.querySelector("#select-all");
    if (!box) { return; }
    box.hidden = false;
    box.addEventListener("change", function () {
      root.querySelectorAll('input[type="checkbox"][name="at"]').forEach(function (c) { c.checked = box.checked; });
    });
  }

  function autoRefresh(seconds) {
    var state = document.getElementById("refresh-state");
    var paused = false;
    if (state) {
      var label = document.createElement("label");
      var box = document.createElement("input");
      box.type = "checkbox";
      box.id = "pause-refresh";
      box.addEventListener("change", function () { paused = box.checked; });
      label.appendChild(box);
      label.appendChild(document.createTextNode(" pause"));
      state.after(" ", label);
    }
    window.setInterval(function () {
      if (paused || document.hidden) { return; }
      fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (response) {
          if (!response.ok) { throw new Error("HTTP " + response.status); }
          return response.text();
        })
        .then(function (html) {
          var fresh = new DOMParser().parseFromString(html, "text/html");
          var main = document.getElementById("main");
          var next = fresh.getElementById("main");
          var footer = fresh.querySelector("footer");
          var open = Array.prototype.map.call(main.querySelectorAll("details"), function (d) { return d.open; });
          main.replaceChildren.apply(main, Array.prototype.slice.call(next.childNodes));
          main.querySelectorAll("details").forEach(function (d, i) { if (i < open.length) { d.open = open[i]; } });
          if (footer) { document.querySelector("footer").textContent = footer.textContent; }
          if (state) { state.textContent = "refreshes every " + seconds + " s"; }
          confirmForms(main);
        })
        .catch(function (error) {
          if (state) { state.textContent = "refresh failed (" + error.message + "), retrying every " + seconds + " s"; }
        });
    }, seconds * 1000);
  }

  document.addEventListener("DOMContentLoaded", function () {
    confirmForms(document);
    selectAll(document);
    var seconds = parseInt(document.body.getAttribute("data-refresh"), 10);
    if (seconds > 0) { autoRefresh(seconds); }
  });
})();
