() => {
  // tests/ui/test_browser_layout.py: what looks broken on the visible part of the page
  const visible = (el) => el.offsetParent !== null && el.getBoundingClientRect().width > 0;
  const out = { window: window.innerWidth, pageWidth: document.documentElement.scrollWidth };
  out.splitWords = []; // a header word broken across lines
  for (const th of document.querySelectorAll("th")) {
    if (!visible(th)) continue;
    const walker = document.createTreeWalker(th, NodeFilter.SHOW_TEXT);
    let node;
    while ((node = walker.nextNode())) {
      const words = /\S+/g;
      let m;
      while ((m = words.exec(node.textContent))) {
        const range = document.createRange();
        range.setStart(node, m.index);
        range.setEnd(node, m.index + m[0].length);
        const lines = new Set([...range.getClientRects()].map((r) => Math.round(r.top)));
        if (lines.size > 1) out.splitWords.push(m[0]);
      }
    }
  }
  out.cutTables = []; // a table past its place whose place does not scroll sideways
  for (const table of document.querySelectorAll("table")) {
    if (!visible(table)) continue;
    let box = table.parentElement;
    while (box && box !== document.body && !["auto", "scroll"].includes(getComputedStyle(box).overflowX)) {
      box = box.parentElement;
    }
    const right = table.getBoundingClientRect().right;
    const limit = box && box !== document.body ? box.getBoundingClientRect().right : window.innerWidth;
    if (right > limit + 1 && (!box || box === document.body)) out.cutTables.push(table.innerText.slice(0, 40));
  }
  out.cutTitles = [];
  out.cutPlots = [];
  out.legendScrollbars = 0;
  out.plots = 0;
  out.memoryTicks = 0;
  for (const plot of document.querySelectorAll(".js-plotly-plot")) {
    if (!visible(plot)) continue;
    out.plots += 1;
    const svg = plot.querySelector("svg.main-svg").getBoundingClientRect();
    if (svg.right > window.innerWidth + 1) out.cutPlots.push(Math.round(svg.right));
    const area = plot.querySelector(".nsewdrag"); // the plot area
    const top = area ? area.getBoundingClientRect().top : svg.bottom;
    for (const title of plot.querySelectorAll(".gtitle")) {
      const box = title.getBoundingClientRect();
      // past the plot's right edge, or its note lines running into the plot area
      if (box.right > svg.right + 1 || box.bottom > top + 1) out.cutTitles.push(title.textContent.slice(0, 40));
    }
    for (const bar of plot.querySelectorAll(".legend .scrollbar")) {
      if (parseFloat(bar.getAttribute("height") || "0") > 0) out.legendScrollbars += 1;
    }
    const title = plot.querySelector(".gtitle");
    if (title && title.textContent.startsWith("Memory")) out.memoryTicks = plot.querySelectorAll(".ytick").length;
  }
  return out;
}
