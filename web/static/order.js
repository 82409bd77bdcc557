// Polls the order's JSON until it is final, updating the page in place (no reload).
(function () {
  "use strict";
  var section = document.getElementById("order");
  if (!section || section.dataset.final === "true") { return; }
  var id = section.dataset.orderId;
  var texts = JSON.parse(section.dataset.texts);
  function text(el, value) { if (el) { el.textContent = value; } }
  function badge(status) {
    var span = document.createElement("span");
    span.className = "badge badge-" + status;
    span.textContent = status;
    return span;
  }
  function render(order) {
    var status = document.getElementById("order-status");
    text(status, order.status);
    status.className = "badge badge-" + order.status;
    text(document.getElementById("order-reason"), order.reason ? "· reason: " + order.reason.replace(/_/g, " ") : "");
    text(document.getElementById("saga-state"), order.saga.state);
    var explain = texts.statuses[order.status] ? texts.statuses[order.status] :
      (order.reason ? (order.status === "failed" ? texts.failed_prefix : "") + (texts.reasons[order.reason] || "") : texts.pending);
    text(document.getElementById("order-explain"), explain);
    var list = document.getElementById("steps");
    // A compensation shows once it ran, or while the saga turns back and it may still run (as the page).
    var turnedBack = ["compensating", "failed"].indexOf(order.saga.state) >= 0;
    list.textContent = "";
    order.saga.steps.forEach(function (step) {
      var li = document.createElement("li");
      li.dataset.step = step.name;
      li.appendChild(badge(step.status));
      li.appendChild(document.createTextNode(" " + step.name));
      if (step.compensation && (turnedBack || step.compensation.status !== "pending")) {
        li.appendChild(document.createTextNode(" · "));
        li.appendChild(badge(step.compensation.status));
        li.appendChild(document.createTextNode(" " + step.compensation.name));
      }
      list.appendChild(li);
    });
  }
  function poll() {
    fetch("/orders/" + encodeURIComponent(id), { headers: { Accept: "application/json" } })
      .then(function (r) { return r.json(); })
      .then(function (order) {
        render(order);
        if (order.status === "pending" || order.status === "returning" ||
            order.saga.state === "running" || order.saga.state === "compensating") {
          setTimeout(poll, 500);
        } else {
          section.dataset.final = "true";
          text(document.getElementById("live"), "");
        }
      })
      .catch(function () { setTimeout(poll, 2000); });
  }
  setTimeout(poll, 300);
})();
