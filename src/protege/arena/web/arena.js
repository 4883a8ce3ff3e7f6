// The arena page: fetch a pair, render both answers through the safe Markdown renderer, vote, reveal.
// Model names come only from the vote response, so they are not in the DOM before the vote.
"use strict";

var battle = null, voted = false;

function cookie(name) {
  var m = document.cookie.match(new RegExp("(?:^|; )" + name + "=([^;]*)"));
  return m ? decodeURIComponent(m[1]) : "";
}

function show(el, text) { el.innerHTML = renderMarkdown(text); } // escaped first, see markdown.js

function setError(text) {
  var el = document.getElementById("error");
  el.textContent = text || "";
  el.hidden = !text;
}

function render(b) {
  var prompt = document.getElementById("prompt");
  prompt.textContent = "";
  (b.turns || []).forEach(function (t, i) {
    var p = document.createElement("div");
    show(p, (b.turns.length > 1 ? "**Turn " + (i + 1) + ":** " : "") + t);
    prompt.appendChild(p);
  });
  ["left", "right"].forEach(function (side) {
    var art = document.getElementById(side);
    show(art.querySelector(".body"), b[side].join("\n\n---\n\n"));
    var model = art.querySelector(".model");
    model.textContent = "";
    model.hidden = true;
  });
  document.getElementById("comment").value = "";
  document.getElementById("next").hidden = true;
  document.getElementById("status").textContent = "";
  voted = false;
}

async function next() {
  setError("");
  var r = await fetch("/api/next", { credentials: "same-origin" });
  var body = await r.json();
  if (!r.ok) { setError(body.error ? body.error.message : "could not load a pair"); return; }
  if (body.done) {
    battle = null;
    document.getElementById("pair").hidden = true;
    document.getElementById("status").textContent = body.message;
    return;
  }
  battle = body;
  render(battle);
}

function uuid() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return Date.now().toString(36) + Math.random().toString(36).slice(2);
}

async function vote(winner) {
  if (!battle || voted) return;
  voted = true;
  var payload = { vote_id: battle.vote_id || (battle.vote_id = uuid()), battle_id: battle.battle_id, winner: winner,
                  comment: document.getElementById("comment").value };
  var r = await fetch("/api/vote", {
    method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": cookie("arena_csrf") },
    body: JSON.stringify(payload),
  });
  var body = await r.json();
  if (!r.ok) { voted = false; setError(body.error ? body.error.message : "vote failed"); return; }
  ["left", "right"].forEach(function (side) {
    var model = document.getElementById(side).querySelector(".model");
    model.textContent = body.models[side];
    model.hidden = false;
  });
  document.getElementById("status").textContent = "Thank you. Press Enter for the next pair.";
  document.getElementById("next").hidden = false;
}

document.querySelectorAll("#buttons button[data-winner]").forEach(function (b) {
  b.addEventListener("click", function () { vote(b.getAttribute("data-winner")); });
});
document.getElementById("next").addEventListener("click", next);
document.addEventListener("keydown", function (e) {
  if (e.target && e.target.id === "comment") return;
  var map = { "1": "left", "2": "right", "3": "tie", "4": "bad" };
  if (map[e.key]) vote(map[e.key]);
  else if (e.key === "Enter" && voted) next();
});
next();
