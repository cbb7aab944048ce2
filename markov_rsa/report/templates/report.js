"use strict";
(function () {
  // Each run section carries its rollouts' details as JSON; parse a section's once, on first use.
  var cache = new WeakMap();
  function dataOf(section) {
    if (!cache.has(section)) {
      var node = section.querySelector("script.run-data");
      cache.set(section, node ? JSON.parse(node.textContent) : {});
    }
    return cache.get(section);
  }

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function row(dl, name, value) {
    dl.appendChild(el("dt", null, name));
    dl.appendChild(el("dd", null, value));
  }

  function block(parent, title, text, open) {
    var details = el("details");
    if (open) details.open = true;
    details.appendChild(el("summary", null, title));
    details.appendChild(el("pre", "text", text));
    parent.appendChild(details);
  }

  function show(cell) {
    var section = cell.closest(".run-section");
    if (!section) return;
    var d = dataOf(section)[cell.getAttribute("data-k")];
    var target = section.querySelector(".panel .detail");
    if (!d || !target) return;
    section.querySelectorAll(".cell.sel").forEach(function (c) { c.classList.remove("sel"); });
    cell.classList.add("sel");
    target.textContent = "";
    target.appendChild(el("h3", null, "Round " + d.round + " · slot " + d.slot + (d.chosen ? " · returned" : "")));
    var dl = el("dl");
    if (d.error) row(dl, "failed", d.error);
    if (d.excluded) row(dl, "verifier", "excluded from the pool and the vote: " + d.excluded);
    if (d.fitted) row(dl, "context", d.fitted);
    row(dl, "answer", d.answer === null ? "none extracted" : d.answer);
    if (d.correct !== null && d.answer !== null) row(dl, "right?", d.correct ? "✓ right" : "✗ wrong");
    row(dl, "finish", d.finish_reason === null ? "–" : d.finish_reason + (d.finish_reason === "length" ? " (hit the token budget)" : ""));
    row(dl, "tokens", d.prompt_tokens.toLocaleString() + " prompt · " + d.completion_tokens.toLocaleString() + " generated");
    row(dl, "time", d.latency_s.toFixed(2) + " s" + (d.attempts > 1 ? " · " + d.attempts + " attempts" : ""));
    row(dl, "parents", d.parents === null ? "none (round 0 samples the problem)" : d.parents.map(function (p) { return "slot " + p; }).join(", "));
    target.appendChild(dl);
    if (d.tail !== null) block(target, "Tail, as shown to its children", d.tail, true);
    else target.appendChild(el("p", "muted", "No later rollout was shown this trace's tail."));
    // Outer blank lines carry nothing; the tail above is shown exactly as the children saw it.
    if (d.reasoning.trim()) block(target, "Reasoning", d.reasoning.trim(), d.tail === null);
    if (d.content.trim()) block(target, "Answer text", d.content.trim(), d.tail === null);
  }

  function highlight(cell, on) {
    var svg = cell.closest("svg.graph");
    if (!svg) return;
    var key = cell.getAttribute("data-k");
    svg.classList.toggle("focus", on);
    svg.querySelectorAll('.edge[data-child="' + key + '"]').forEach(function (edge) {
      edge.classList.toggle("hl", on);
      var parent = svg.querySelector('.cell[data-k="' + edge.getAttribute("data-parent") + '"]');
      if (parent) parent.classList.toggle("parent-hl", on);
    });
    svg.querySelectorAll('.edge[data-parent="' + key + '"]').forEach(function (edge) {
      edge.classList.toggle("hl-out", on);
    });
  }

  document.addEventListener("click", function (event) {
    var cell = event.target.closest && event.target.closest(".cell");
    if (cell) show(cell);
  });
  document.addEventListener("keydown", function (event) {
    var cell = event.target.closest && event.target.closest(".cell");
    if (cell && (event.key === "Enter" || event.key === " ")) { event.preventDefault(); show(cell); }
  });
  ["mouseover", "focusin"].forEach(function (type) {
    document.addEventListener(type, function (event) {
      var cell = event.target.closest && event.target.closest(".cell");
      if (cell) highlight(cell, true);
    });
  });
  ["mouseout", "focusout"].forEach(function (type) {
    document.addEventListener(type, function (event) {
      var cell = event.target.closest && event.target.closest(".cell");
      if (cell) highlight(cell, false);
    });
  });
})();
