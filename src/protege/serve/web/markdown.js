// A tiny, safe Markdown subset for model output.
// Safety rule: every piece of model text is HTML-escaped FIRST; the only tags in the result are the
// ones this file writes (p, br, pre, code, strong, em, h3-h6, ul, ol, li, a with an http(s) href).
// So "<script>alert(1)</script>" in a reply shows as text and nothing runs.
"use strict";

function escapeHtml(text) {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

// Inline spans on ESCAPED text: `code`, **bold**, *italic*, [text](http://...).
function renderInline(escaped) {
  return escaped.split(/(`[^`\n]+`)/g).map(function (part, i) {
    if (i % 2 === 1) return "<code>" + part.slice(1, -1) + "</code>";
    return part
      .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^*])\*([^*\n]+)\*(?!\*)/g, "$1<em>$2</em>")
      .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g,
        '<a href="$2" target="_blank" rel="noopener noreferrer nofollow">$1</a>');
  }).join("");
}

// Block structure of a text part (no code fences inside): headings, lists, paragraphs.
function renderBlocks(text) {
  var out = [], para = [], list = null;
  function flushPara() {
    if (para.length) out.push("<p>" + para.map(renderInline).join("<br>") + "</p>");
    para = [];
  }
  function flushList() {
    if (list) out.push("<" + list.tag + ">" + list.items.map(function (it) {
      return "<li>" + renderInline(it) + "</li>";
    }).join("") + "</" + list.tag + ">");
    list = null;
  }
  escapeHtml(text).split("\n").forEach(function (line) {
    var m;
    if (/^\s*$/.test(line)) { flushPara(); flushList(); return; }
    if ((m = /^(#{1,4})\s+(.*)$/.exec(line))) {
      flushPara(); flushList();
      var level = m[1].length + 2;  // # -> h3: a reply's headings stay below the page's own
      out.push("<h" + level + ">" + renderInline(m[2]) + "</h" + level + ">");
      return;
    }
    if ((m = /^\s*(?:[-*+]|(\d+)[.)])\s+(.*)$/.exec(line))) {
      flushPara();
      var tag = m[1] ? "ol" : "ul";
      if (!list || list.tag !== tag) { flushList(); list = { tag: tag, items: [] }; }
      list.items.push(m[2]);
      return;
    }
    flushList();
    para.push(line);
  });
  flushPara(); flushList();
  return out.join("");
}

// Whole reply: ``` fences become <pre><code> (an unclosed fence while streaming runs to the end).
function renderMarkdown(text) {
  var parts = text.split(/^```[^\n]*\n?/m);
  var html = "";
  parts.forEach(function (part, i) {
    if (i % 2 === 1) html += "<pre><code>" + escapeHtml(part.replace(/\n$/, "")) + "</code></pre>";
    else html += renderBlocks(part);
  });
  return html;
}

if (typeof module !== "undefined") module.exports = { escapeHtml: escapeHtml, renderMarkdown: renderMarkdown };
