// A conversation is a tree of messages, each knowing its parent (null: the first turn); the page shows one path
// through it, from the first turn to `conv.leaf`. Takes of a reply (regenerate) and branches started by editing a
// user turn are siblings: messages with the same parent. Each message remembers which child was shown last
// (`pick`; the first turns' is `conv.rootPick`), so the arrows can move between siblings and come back to where
// each one was left. app.js calls these; they never touch the page.
"use strict";

const Tree = {
  blank(id, title) {
    return { id, title, system: "", nodes: [], leaf: null, rootPick: null, nextId: 0, updated: Date.now() };
  },

  // A conversation saved before takes and branches (a plain list of messages) as a tree with one path.
  fromList(conv, messages) {
    let parent = null;
    for (const m of messages) parent = Tree.add(conv, parent, m).id;
    return conv;
  },

  node(conv, id) { return id === null ? null : conv.nodes.find((n) => n.id === id) || null; },
  children(conv, parent) { return conv.nodes.filter((n) => n.parent === parent); },
  siblings(conv, n) { return Tree.children(conv, n.parent); },

  // The messages from the first turn down to `id`; the shown path is the leaf's.
  lineage(conv, id) {
    const out = [];
    for (let n = Tree.node(conv, id); n; n = Tree.node(conv, n.parent)) out.push(n);
    return out.reverse();
  },
  path(conv) { return Tree.lineage(conv, conv.leaf); },

  // An imported file may name parents that loop (a's parent b, b's parent a): such a message starts at the top.
  breakLoops(conv) {
    for (const start of conv.nodes) {
      const seen = new Set();
      for (let n = start; n; n = Tree.node(conv, n.parent)) {
        if (seen.has(n.id)) { n.parent = null; break; }
        seen.add(n.id);
      }
    }
  },

  // The message under `id` (null: the top) that the page shows: follows each message's pick down.
  descend(conv, id) {
    let at = id;
    for (;;) {
      const kids = Tree.children(conv, at);
      if (!kids.length) return at;
      const pick = at === null ? conv.rootPick : Tree.node(conv, at).pick;
      at = (kids.find((k) => k.id === pick) || kids[kids.length - 1]).id;
    }
  },

  // Shows the path through `id` (the message and, below it, what was shown there last).
  show(conv, id) {
    conv.leaf = Tree.descend(conv, id);
    for (const n of Tree.path(conv)) {
      if (n.parent === null) conv.rootPick = n.id; else Tree.node(conv, n.parent).pick = n.id;
    }
  },

  add(conv, parent, fields) {
    conv.nextId = (conv.nextId || 0) + 1;
    const n = { ...fields, id: "m" + conv.nextId, parent };
    conv.nodes.push(n);
    Tree.show(conv, n.id);
    return n;
  },

  // Moves from message `n` to its sibling `step` places away (-1, +1), if there is one.
  step(conv, n, step) {
    const sibs = Tree.siblings(conv, n);
    const to = sibs[sibs.indexOf(n) + step];
    if (to) Tree.show(conv, to.id);
  },

  // Removes message `n` from its place; what followed it moves up to its parent. A reply goes with all its takes
  // (what followed the other takes goes too); a user turn goes alone, its other branches stay.
  remove(conv, n) {
    const doomed = new Set([n.id]);
    const drop = (id) => { doomed.add(id); Tree.children(conv, id).forEach((c) => drop(c.id)); };
    if (n.role === "assistant") Tree.siblings(conv, n).filter((s) => s !== n).forEach((s) => drop(s.id));
    const below = Tree.children(conv, n.id);
    for (const c of below) c.parent = n.parent;
    conv.nodes = conv.nodes.filter((x) => !doomed.has(x.id));
    const next = below.find((c) => c.id === n.pick) || below[0];
    if (next) Tree.show(conv, next.id);
    else if (n.parent === null || Tree.node(conv, n.parent)) Tree.show(conv, n.parent === null ? null : n.parent);
  },
};
