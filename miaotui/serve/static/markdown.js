// A small Markdown renderer for model output, safe by construction: it never parses HTML.
// Every piece of text becomes a DOM text node (createTextNode / textContent), and the only
// elements created are the fixed set below, with no attributes taken from the text except
// a code block's language (restricted to [A-Za-z0-9_+-]) and an ordered list's start
// number. So "<img src=x onerror=...>" or "<script>" in an answer shows as those
// characters. Handles what chat models write: fenced code blocks (also unclosed, while a
// block streams in), headings, bullet and numbered lists, quotes, rules, paragraphs with
// line breaks, `inline code`, **bold** and *italic*. Links stay plain text.
"use strict";

(function () {
  const FENCE = /^\s*(`{3,}|~{3,})\s*([A-Za-z0-9_+-]*)[^`]*$/;
  const HEADING = /^(#{1,6})\s+(.*)$/;
  const BULLET = /^\s*[-*+]\s+(.*)$/;
  const NUMBERED = /^\s*(\d{1,9})[.)]\s+(.*)$/;
  const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;
  const QUOTE = /^\s*>\s?(.*)$/;

  function el(tag, children) {
    const node = document.createElement(tag);
    for (const child of children || []) node.appendChild(child);
    return node;
  }

  function text(s) {
    return document.createTextNode(s);
  }

  // Inline spans: `code` first (its content is literal), then **bold**, then *italic*.
  function inline(s) {
    const out = [];
    const code = /`([^`\n]+)`/g;
    let last = 0;
    let m;
    while ((m = code.exec(s)) !== null) {
      out.push(...emphasis(s.slice(last, m.index)));
      const c = el("code");
      c.textContent = m[1];
      out.push(c);
      last = code.lastIndex;
    }
    out.push(...emphasis(s.slice(last)));
    return out;
  }

  function emphasis(s) {
    const out = [];
    const re = /\*\*([^*\n]+?)\*\*|\*([^*\s][^*\n]*?)\*/g;
    let last = 0;
    let m;
    while ((m = re.exec(s)) !== null) {
      if (m.index > last) out.push(text(s.slice(last, m.index)));
      out.push(m[1] !== undefined ? el("strong", emphasis(m[1])) : el("em", [text(m[2])]));
      last = re.lastIndex;
    }
    if (last < s.length) out.push(text(s.slice(last)));
    return out;
  }

  // Lines joined by <br>, each with its inline spans.
  function lines(ls) {
    const out = [];
    ls.forEach((l, i) => {
      if (i) out.push(el("br"));
      out.push(...inline(l));
    });
    return out;
  }

  function render(source) {
    const frag = document.createDocumentFragment();
    const ls = String(source).replace(/\r\n?/g, "\n").split("\n");
    let para = [];
    let list = null;          // {node, ordered}
    const flushPara = () => {
      if (para.length) frag.appendChild(el("p", lines(para)));
      para = [];
    };
    const flushList = () => {
      if (list) frag.appendChild(list.node);
      list = null;
    };
    for (let i = 0; i < ls.length; i++) {
      const line = ls[i];
      let m;
      if ((m = FENCE.exec(line))) {
        flushPara();
        flushList();
        const fence = m[1];
        const body = [];
        i++;
        while (i < ls.length && !ls[i].trim().startsWith(fence)) body.push(ls[i++]);
        const code = el("code");
        code.textContent = body.join("\n");
        const pre = el("pre", [code]);
        if (m[2]) {
          code.className = "lang-" + m[2];
          pre.dataset.lang = m[2];
        }
        frag.appendChild(pre);
        continue;
      }
      if (!line.trim()) {
        flushPara();
        flushList();
        continue;
      }
      if ((m = HEADING.exec(line))) {
        flushPara();
        flushList();
        frag.appendChild(el("h" + Math.min(m[1].length + 2, 6), inline(m[2])));
        continue;
      }
      if (RULE.test(line)) {
        flushPara();
        flushList();
        frag.appendChild(el("hr"));
        continue;
      }
      const bullet = BULLET.exec(line);
      const numbered = bullet ? null : NUMBERED.exec(line);
      if (bullet || numbered) {
        flushPara();
        const ordered = !!numbered;
        if (!list || list.ordered !== ordered) {
          flushList();
          list = {node: el(ordered ? "ol" : "ul"), ordered};
          if (ordered) list.node.start = parseInt(numbered[1], 10);
        }
        list.node.appendChild(el("li", inline(ordered ? numbered[2] : bullet[1])));
        continue;
      }
      if ((m = QUOTE.exec(line))) {
        flushPara();
        flushList();
        const quoted = [m[1]];
        while (i + 1 < ls.length && (m = QUOTE.exec(ls[i + 1]))) {
          quoted.push(m[1]);
          i++;
        }
        frag.appendChild(el("blockquote", lines(quoted)));
        continue;
      }
      if (list && /^\s{2,}\S/.test(line)) {   // a list item's continuation line
        const item = list.node.lastChild;
        item.appendChild(el("br"));
        for (const n of inline(line.trim())) item.appendChild(n);
        continue;
      }
      flushList();
      para.push(line);
    }
    flushPara();
    flushList();
    return frag;
  }

  // Replace `node`'s children with the rendering of `source`.
  function renderInto(node, source) {
    node.replaceChildren(render(source));
  }

  window.MiaotuiMarkdown = {render, renderInto};
})();
