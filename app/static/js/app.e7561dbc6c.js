// Ask the API through nginx and show the answer: proof the page and the API share one origin.
(function () {
  "use strict";
  var out = document.getElementById("hello");
  var badge = document.getElementById("status");
  fetch("/api/hello", { headers: { Accept: "application/json" } })
    .then(function (response) {
      var id = response.headers.get("X-Request-ID");
      return response.json().then(function (body) {
        out.textContent = JSON.stringify(body, null, 2) + "\n\nX-Request-ID: " + id;
        badge.textContent = "API reachable";
        badge.className = "status ok";
      });
    })
    .catch(function (error) {
      out.textContent = String(error);
      badge.textContent = "API unreachable";
      badge.className = "status down";
    });
})();
