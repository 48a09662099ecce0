"""One self-contained HTML page (inline CSS and JS, no network) that shows an Inspection."""

from __future__ import annotations

import html
import json

from charlm.report.viz import Inspection, encode_bytes

_MAX_BITS = 12.0  # surprisal at which the colour saturates


def render_page(ins: Inspection, title: str) -> str:
    data = {
        "chars": ins.chars,
        "surprisal": [round(b, 3) for b in ins.surprisal],
        "top5": ins.top5,
        "cellType": ins.cell_type,
        "layers": ins.layers,
        "hiddenSize": ins.hidden_size,
        "units": ins.units,
        "channels": {name: [encode_bytes(t) for t in per_layer] for name, per_layer in ins.channels.items()},
        "scales": ins.scales,
        "features": ins.features,
        "maxBits": _MAX_BITS,
    }
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")  # safe inside <script>
    return _TEMPLATE.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)


_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #222; }
header { position: sticky; top: 0; background: #fafafa; border-bottom: 1px solid #ddd; padding: 8px 16px; z-index: 2; }
header h1 { font-size: 16px; margin: 0 0 6px 0; }
label { margin-right: 14px; }
#units a { margin-right: 10px; cursor: pointer; color: #0645ad; }
#text { font: 14px/1.6 ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; padding: 12px 16px; }
#text span { border-radius: 2px; }
#tip { position: fixed; display: none; background: #fff; border: 1px solid #999; padding: 6px 8px;
       font: 12px ui-monospace, monospace; box-shadow: 0 2px 6px rgba(0,0,0,.2); pointer-events: none; z-index: 3; }
#legend { display: inline-block; width: 160px; height: 10px; vertical-align: middle; border: 1px solid #ccc; }
</style></head>
<body>
<header>
  <h1>__TITLE__</h1>
  <label>colour by <select id="view"><option value="surprisal">surprisal (bits)</option>
    <option value="unit">a unit</option></select></label>
  <label>layer <select id="layer"></select></label>
  <label>unit <select id="unit"></select></label>
  <label>show <select id="channel"></select></label>
  <span id="legend"></span> <span id="legendText"></span>
  <div id="units"></div>
</header>
<div id="text"></div>
<div id="tip"></div>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const $ = (id) => document.getElementById(id);
const decoded = {};
function bytesOf(name, layer) {
  const key = name + "/" + layer;
  if (!decoded[key]) {
    const bin = atob(D.channels[name][layer]);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    decoded[key] = out;
  }
  return decoded[key];
}
const signed = (name) => D.scales[name].low < 0;  // diverging colours around zero
const valueOf = (name, v) => D.scales[name].low + v * (D.scales[name].high - D.scales[name].low);
function colourOf(view, i, sel) {
  if (view === "surprisal") {
    const t = Math.min(D.surprisal[i] / D.maxBits, 1);
    return "rgba(230, 40, 20, " + (0.85 * t).toFixed(3) + ")";
  }
  const k = D.units[sel.layer].length;
  const v = bytesOf(sel.channel, sel.layer)[i * k + sel.column] / 255;
  if (signed(sel.channel)) {  // diverging: blue below zero, red above
    const t = Math.abs(v - 0.5) * 2;
    return v >= 0.5 ? "rgba(220, 50, 30, " + t.toFixed(3) + ")" : "rgba(30, 90, 220, " + t.toFixed(3) + ")";
  }
  return "rgba(30, 110, 230, " + v.toFixed(3) + ")";  // gates: 0 = clear, 1 = deep blue
}
function selection() {
  const layer = +$("layer").value, unit = +$("unit").value;
  return { layer, unit, channel: $("channel").value, column: D.units[layer].indexOf(unit) };
}
function paint() {
  const view = $("view").value, sel = selection();
  const spans = $("text").children;
  for (let i = 0; i < spans.length; i++) spans[i].style.backgroundColor = colourOf(view, i, sel);
  const gate = view === "unit" && !signed(sel.channel);
  $("legend").style.background = view === "surprisal" ? "linear-gradient(90deg, #fff, rgb(230,40,20))"
    : gate ? "linear-gradient(90deg, #fff, rgb(30,110,230))" : "linear-gradient(90deg, rgb(30,90,220), #fff, rgb(220,50,30))";
  $("legendText").textContent = view === "surprisal" ? "0 to " + D.maxBits + "+ bits"
    : D.scales[sel.channel].legend;
  history.replaceState(null, "", "#view=" + view + "&layer=" + sel.layer + "&unit=" + sel.unit + "&channel=" + sel.channel);
}
function fillUnits() {
  const layer = +$("layer").value, notes = {};
  for (const f of D.features) for (const [l, u, r] of f.units) if (l === layer)
    notes[u] = (notes[u] ? notes[u] + "; " : "") + f.name + " r=" + r;
  $("unit").innerHTML = D.units[layer].map((u) => "<option value='" + u + "'>unit " + u +
    (notes[u] ? " (" + notes[u] + ")" : "") + "</option>").join("");
}
function build() {
  const frag = document.createDocumentFragment();
  D.chars.forEach((ch, i) => { const s = document.createElement("span"); s.textContent = ch; s.dataset.i = i; frag.appendChild(s); });
  $("text").appendChild(frag);
  $("layer").innerHTML = Array.from({ length: D.layers }, (_, k) => "<option value='" + k + "'>" + k + "</option>").join("");
  $("channel").innerHTML = Object.keys(D.channels).map((c) => "<option>" + c + "</option>").join("");
  fillUnits();
  $("units").innerHTML = "units that track: " + D.features.map((f) => f.name + " " + f.units.slice(0, 3).map(
    ([l, u, r]) => "<a data-l='" + l + "' data-u='" + u + "'>L" + l + "/" + u + " (r=" + r + ")</a>").join("")).join(" · ");
}
function applyHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  if (p.get("view")) $("view").value = p.get("view");
  if (p.get("layer") !== null && p.get("layer") < D.layers) { $("layer").value = p.get("layer"); fillUnits(); }
  if (p.get("unit") !== null && D.units[+$("layer").value].includes(+p.get("unit"))) $("unit").value = p.get("unit");
  if (p.get("channel") && D.channels[p.get("channel")]) $("channel").value = p.get("channel");
}
build();
applyHash();
paint();
$("view").onchange = paint; $("unit").onchange = paint; $("channel").onchange = paint;
$("layer").onchange = () => { fillUnits(); paint(); };
$("units").onclick = (e) => {
  const a = e.target.closest("a"); if (!a) return;
  $("view").value = "unit"; $("layer").value = a.dataset.l; fillUnits(); $("unit").value = a.dataset.u; paint();
};
$("text").onmousemove = (e) => {
  const s = e.target.closest("span"); const tip = $("tip");
  if (!s) { tip.style.display = "none"; return; }
  const i = +s.dataset.i, sel = selection();
  const lines = [JSON.stringify(D.chars[i]) + "  " + D.surprisal[i].toFixed(2) + " bits", "expected:"];
  for (const [c, p] of D.top5[i]) lines.push("  " + JSON.stringify(c) + "  " + (100 * p).toFixed(1) + "%");
  if (sel.column >= 0) {
    const k = D.units[sel.layer].length;
    for (const name of Object.keys(D.channels)) {
      const v = bytesOf(name, sel.layer)[i * k + sel.column] / 255;
      lines.push("L" + sel.layer + "/" + sel.unit + " " + name + " " + valueOf(name, v).toFixed(2));
    }
  }
  tip.textContent = lines.join("\n"); tip.style.whiteSpace = "pre";
  tip.style.left = (e.clientX + 14) + "px"; tip.style.top = (e.clientY + 14) + "px"; tip.style.display = "block";
};
$("text").onmouseleave = () => { $("tip").style.display = "none"; };
</script>
</body></html>
"""
