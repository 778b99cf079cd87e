// Replies rendered as markdown: marked parses, highlight.js colours code, DOMPurify sanitizes (all three vendored
// under vendor/, see vendor/VERSIONS.txt). Model output is untrusted: raw HTML in a reply is shown as text, a
// markdown image becomes a link (nothing is loaded from another host), and every rendered reply passes through
// DOMPurify, which keeps no script, no event handler, no style attribute and no link but http(s) and mailto.
// app.js calls renderReply(element, text) for each assistant reply, also while it streams.
"use strict";

const Markdown = (() => {
  const escapeHTML = (s) => s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;",
                                                            '"': "&quot;", "'": "&#39;" })[c]);

  function highlighted(code, lang) {
    const language = lang && hljs.getLanguage(lang) ? lang : null;
    try {
      if (language) return hljs.highlight(code, { language, ignoreIllegals: true }).value;
      // Guessing tries every language: each frame of a long streamed block would pay for it.
      return code.length < 8000 ? hljs.highlightAuto(code).value : escapeHTML(code);
    } catch { return escapeHTML(code); }
  }

  const marked = new window.marked.Marked({
    gfm: true,
    breaks: true,      // a model's single line breaks are meant as breaks (poems, addresses)
    renderer: {
      // Raw HTML in a reply is text to read (a model explaining HTML), never markup.
      html(token) { return token.block ? `<p class="raw">${escapeHTML(token.text)}</p>` : escapeHTML(token.text); },
      // No image is fetched from where a reply points: it is shown as a link to follow by hand.
      image(token) {
        const label = "image: " + (token.text || token.href);
        return `<a href="${escapeHTML(token.href)}">${escapeHTML(label)}</a>`;
      },
      // Task lists: the page keeps no form controls from a reply.
      checkbox(token) { return token.checked ? "☑ " : "☐ "; },
      code(token) {
        const lang = (token.lang || "").trim().split(/\s+/)[0].toLowerCase();
        const language = escapeHTML(lang);
        return `<pre data-lang="${language}"><code class="hljs${lang ? " language-" + language : ""}">`
          + highlighted(token.text, lang) + "</code></pre>";
      },
    },
  });

  const SANITIZE = {
    USE_PROFILES: { html: true },
    FORBID_TAGS: ["style", "img", "svg", "math", "form", "input", "button", "textarea", "select", "iframe",
                  "video", "audio", "source", "picture"],
    FORBID_ATTR: ["style", "id", "name", "srcset"],        // ids and names could shadow the page's own
    ALLOWED_URI_REGEXP: /^(?:https?:|mailto:)/i,
    RETURN_DOM_FRAGMENT: true,
  };
  // Links open in a new tab that cannot reach back to this page or learn where it came from.
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {
      if (node.hasAttribute("href")) {
        node.setAttribute("target", "_blank");
        node.setAttribute("rel", "noopener noreferrer");
      } else node.removeAttribute("target");
    }
  });

  function fragment(text) { return DOMPurify.sanitize(marked.parse(text), SANITIZE); }

  return { fragment };
})();

// Copies text to the clipboard; on a LAN address over plain HTTP the browser has no clipboard API (it needs a
// secure context), and the older selection copy is used.
async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  const box = document.createElement("textarea");
  box.value = text;
  box.setAttribute("readonly", "");
  box.className = "offscreen";
  document.body.append(box);
  box.select();
  document.execCommand("copy");
  box.remove();
}

// Each code block gets a header with its language and a copy button, added as elements after sanitizing.
function addCodeTools(root) {
  for (const pre of root.querySelectorAll("pre")) {
    const code = pre.querySelector("code");
    if (!code) continue;
    const head = document.createElement("div");
    head.className = "code-head";
    const lang = document.createElement("span");
    lang.className = "lang";
    lang.textContent = pre.dataset.lang || "code";
    const copy = document.createElement("button");
    copy.type = "button"; copy.className = "copy"; copy.textContent = "Copy";
    copy.onclick = async () => {
      try { await copyText(code.textContent); copy.textContent = "Copied"; }
      catch { copy.textContent = "Copy failed"; }
    };
    head.append(lang, copy);
    pre.prepend(head);
  }
}

// Puts a reply into `element`: rendered (markdown on) or as plain text.
function renderReply(element, text, asMarkdown) {
  if (!asMarkdown) {
    element.classList.remove("md");
    element.textContent = text;
    return;
  }
  element.classList.add("md");
  const rendered = Markdown.fragment(text);
  addCodeTools(rendered);
  element.replaceChildren(rendered);
}
