// The chat page: keeps the conversation, streams replies over SSE (fetch + ReadableStream), stop button.
"use strict";

var state = { history: [], controller: null };
var $ = function (id) { return document.getElementById(id); };

function addMessage(role, text) {
  var el = document.createElement("div");
  el.className = "message " + role;
  if (role === "user") el.textContent = text;  // user text is never parsed as HTML
  else setAssistantText(el, text);
  $("messages").appendChild(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

function setAssistantText(el, text) {
  el.dataset.raw = text;              // the exact reply text (tests compare it to the engine's)
  el.innerHTML = renderMarkdown(text); // escaped first, see markdown.js
}

function showError(message) {
  var box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function requestBody() {
  var messages = [];
  var system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  return {
    messages: messages.concat(state.history),
    temperature: parseFloat($("temperature").value),
    max_tokens: parseInt($("max-tokens").value, 10) || undefined,
    stream: true,
  };
}

// Parse SSE lines ("data: {...}") out of the byte stream; calls onData for each JSON payload.
async function readSSE(response, onData) {
  var reader = response.body.getReader();
  var decoder = new TextDecoder();
  var buffer = "";
  for (;;) {
    var chunk = await reader.read();
    if (chunk.done) break;
    buffer += decoder.decode(chunk.value, { stream: true });
    var events = buffer.split("\n\n");
    buffer = events.pop();
    for (var i = 0; i < events.length; i++) {
      var lines = events[i].split("\n");
      for (var j = 0; j < lines.length; j++) {
        if (lines[j].indexOf("data:") !== 0) continue;
        var data = lines[j].slice(5).trim();
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  showError("");
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  var el = addMessage("assistant", "");
  el.classList.add("streaming");
  var reply = "";
  var controller = new AbortController();
  state.controller = controller;
  $("send").disabled = true;
  $("stop").disabled = false;
  var headers = { "Content-Type": "application/json" };
  var key = $("api-key").value.trim();
  if (key) headers["Authorization"] = "Bearer " + key;
  try {
    var response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers, body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!response.ok) {
      var err = await response.json().catch(function () { return {}; });
      throw new Error((err.error && err.error.message) || ("HTTP " + response.status));
    }
    await readSSE(response, function (payload) {
      if (payload.error) throw new Error(payload.error.message);
      var choice = payload.choices && payload.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        reply += choice.delta.content;
        setAssistantText(el, reply);
        el.scrollIntoView({ block: "end" });
      }
    });
  } catch (e) {
    if (e.name !== "AbortError") showError(e.message);
  } finally {
    el.classList.remove("streaming");
    el.dataset.done = "1";
    // Keep what arrived (also after Stop) so the conversation continues from what the user saw.
    if (reply) state.history.push({ role: "assistant", content: reply });
    else state.history.pop();
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("composer").addEventListener("submit", function (ev) {
  ev.preventDefault();
  var text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", function (ev) {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", function () { if (state.controller) state.controller.abort(); });
$("reset").addEventListener("click", function () {
  if (state.controller) state.controller.abort();
  state.history = [];
  $("messages").textContent = "";
  showError("");
});
$("temperature").addEventListener("input", function () { $("temperature-value").textContent = this.value; });

fetch("/v1/models").then(function (r) { return r.json(); }).then(function (body) {
  if (body.data && body.data[0]) $("model-name").textContent = body.data[0].id;
}).catch(function () {});
