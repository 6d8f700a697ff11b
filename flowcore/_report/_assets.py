"""The report page's inline style sheet and script (kept inline so the page opens offline)."""

__all__ = ["CSS", "JS"]

CSS = """
:root { --fg:#1f2328; --muted:#656d76; --line:#d0d7de; --bg:#f6f8fa; }
* { box-sizing: border-box; }
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: var(--fg);
       margin: 0; padding: 24px 32px; background: #fff; }
h1 { font-size: 20px; margin: 0 0 4px; word-break: break-all; }
h2 { font-size: 16px; margin: 28px 0 10px; }
.muted { color: var(--muted); }
.pill { display: inline-block; padding: 1px 10px; border-radius: 999px; color: #fff;
        font-weight: 600; font-size: 12px; text-transform: uppercase; letter-spacing: .03em; }
.facts { display: flex; flex-wrap: wrap; gap: 8px 28px; margin: 12px 0 4px; }
.facts div span { display: block; font-size: 11px; text-transform: uppercase; color: var(--muted); }
.legend { display: flex; flex-wrap: wrap; gap: 6px 16px; font-size: 12px; margin: 6px 0; }
.legend i { display: inline-block; width: 11px; height: 11px; border-radius: 3px; margin-right: 5px;
            vertical-align: -1px; }
.legend i.waiting { background: repeating-linear-gradient(45deg, rgba(0,0,0,.3) 0 2px,
                     rgba(138,143,152,.3) 2px 5px); }
.scroll { overflow: auto; border: 1px solid var(--line); border-radius: 8px; background: var(--bg);
          padding: 8px; }
svg text { font-family: inherit; }
#dag .edge { fill: none; stroke: #8a8f98; stroke-width: 1.5; }
#dag .node { cursor: default; }
#dag .node:hover .box, #dag .node:focus .box { stroke-width: 3.5; }
#dag .name { font-size: 13px; font-weight: 600; fill: var(--fg); }
#dag .caption { font-size: 11.5px; }
#dag .badge { font-size: 11px; font-weight: 700; fill: #fff; }
#dag .status-skipped .box { stroke-dasharray: 5 4; }
#timeline .grid { stroke: var(--line); }
#timeline .axis { stroke: #8a8f98; }
#timeline .tick, #timeline .note { font-size: 11px; fill: var(--muted); }
#timeline .label { font-size: 12px; fill: var(--fg); }
#timeline .zebra { fill: rgba(0,0,0,.025); }
#timeline .bar:hover .label { font-weight: 700; }
#timeline .concurrency { fill: rgba(138,92,214,.28); stroke: #8a5cd6; stroke-width: 1; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line);
         vertical-align: top; }
th { font-size: 11px; text-transform: uppercase; color: var(--muted); }
td.num { font-variant-numeric: tabular-nums; }
pre { background: var(--bg); border: 1px solid var(--line); border-radius: 6px; padding: 10px;
      overflow: auto; font-size: 12px; max-height: 320px; }
#tip { position: fixed; pointer-events: none; z-index: 10; display: none; max-width: 420px;
       background: #1f2328; color: #fff; border-radius: 8px; padding: 10px 12px; font-size: 12px;
       box-shadow: 0 6px 20px rgba(0,0,0,.25); }
#tip b { font-size: 13px; }
#tip dl { margin: 6px 0 0; display: grid; grid-template-columns: auto 1fr; gap: 2px 10px; }
#tip dt { color: #9aa4b1; }
#tip dd { margin: 0; word-break: break-word; }
#tip .err { color: #ffb4b4; }
"""

JS = """
(function () {
  var data = JSON.parse(document.getElementById("step-data").textContent);
  var tip = document.getElementById("tip");
  function row(dl, key, value, cls) {
    if (value === null || value === undefined || value === "") return;
    var dt = document.createElement("dt"); dt.textContent = key;
    var dd = document.createElement("dd"); dd.textContent = String(value);
    if (cls) dd.className = cls;
    dl.appendChild(dt); dl.appendChild(dd);
  }
  function show(name, x, y) {
    var s = data[name];
    if (!s) return;
    tip.textContent = "";
    var title = document.createElement("b"); title.textContent = s.name;
    tip.appendChild(title);
    var dl = document.createElement("dl");
    row(dl, "status", s.status);
    row(dl, "attempts", s.attempts);
    row(dl, "started", s.start);
    row(dl, "ended", s.end);
    row(dl, "after", s.offset === null ? null : "+" + s.offset.toFixed(3) + "s");
    row(dl, "duration", s.duration);
    row(dl, "waited for a pool slot", s.waited);
    row(dl, "cache key", s.cache_key ? s.cache_key.slice(0, 16) : null);
    row(dl, "upstream", s.upstream.join(", "));
    row(dl, "error", s.error, "err");
    tip.appendChild(dl);
    tip.style.display = "block";
    place(x, y);
  }
  function place(x, y) {
    var w = tip.offsetWidth, h = tip.offsetHeight;
    var left = Math.min(x + 14, window.innerWidth - w - 8);
    var top = y + 14 + h > window.innerHeight ? y - h - 10 : y + 14;
    tip.style.left = Math.max(left, 4) + "px"; tip.style.top = Math.max(top, 4) + "px";
  }
  function hide() { tip.style.display = "none"; }
  document.querySelectorAll("[data-step]").forEach(function (el) {
    var name = el.getAttribute("data-step");
    el.addEventListener("mouseenter", function (ev) { show(name, ev.clientX, ev.clientY); });
    el.addEventListener("mousemove", function (ev) { place(ev.clientX, ev.clientY); });
    el.addEventListener("mouseleave", hide);
    el.addEventListener("focus", function () {
      var r = el.getBoundingClientRect(); show(name, r.left + r.width / 2, r.bottom);
    });
    el.addEventListener("blur", hide);
  });
})();
"""
