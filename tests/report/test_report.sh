#!/usr/bin/env bash
# `check --report` as a reader sees it: the page of a checkpoint whose fp16 eager attention
# overflows (tests/fixtures/models/qwen3-fp16-attn, made by transformers), rendered by headless
# Chromium at 1200 and 390 px wide. Screenshots go to OUT_DIR; a small script, injected into a
# copy of the page (the page itself has none), measures the laid-out page into the DOM, and
# assertions are made on those measurements against transformers' own goldens.
#   usage: test_report.sh NANSCOPE_BINARY FIXTURES_DIR OUT_DIR
set -euo pipefail
bin=$1 fixtures=$2 out=$3
model=$fixtures/models/qwen3-fp16-attn
goldens=$fixtures/goldens/trace
ids=1,15,300,7,42,999,3,12  # the ids the goldens were made with (their metadata says so)
rm -rf "$out" && mkdir -p "$out"
die() { echo "FAIL: $*" >&2; exit 1; }
trap 'rm -rf "$out/profile"' EXIT  # Chromium's profile: megabytes nobody looks at
command -v chromium >/dev/null || die "chromium is not installed (scripts/install-deps.sh installs it)"

# 1. The command: exit 1 (the model is broken), the page written, stdout says where.
set +e
"$bin" check "$model" --ids "$ids" --report "$out/report.html" >"$out/stdout.txt" 2>"$out/stderr.txt"
rc=$?
set -e
[ "$rc" -eq 1 ] || die "check exited $rc, expected 1: $(cat "$out/stderr.txt")"
[ -s "$out/report.html" ] || die "no report written"
grep -qF "Report: $(realpath -s "$out")/report.html" "$out/stdout.txt" ||
  die "stdout does not say where the report went: $(tail -3 "$out/stdout.txt")"

# 2. Self-contained: nothing fetched, no scripts.
if grep -qiE '<script|<link|<img|@import|url\(|https?://' \
    <(sed 's#http://www.w3.org/2000/svg##g' "$out/report.html"); then
  die "the page references something outside itself or holds a script"
fi

# 3. Render at both widths: measurements (DOM) and a full-page screenshot each. Headless
# Chromium's window is at least 500 px wide, so the page is shown in an iframe of exactly the
# width under test (srcdoc: the page's own bytes, media queries see the iframe's width).
chrome() {
  chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
    --disable-component-update --disable-sync --no-first-run --hide-scrollbars \
    --user-data-dir="$out/profile" "$@" 2>>"$out/chromium.log"
}
# frame.html W H PROBE: the page in an iframe W x H; with PROBE, a script injected into the
# framed copy measures the laid-out page and posts the figures to the frame, which writes
# them into its DOM for --dump-dom.
frame() {
  python3 - "$out/report.html" "$@" <<'PY'
import html, sys
page = open(sys.argv[1], encoding="utf-8").read()
w, h, probe = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "probe"
script = r"""<script>
(() => {
  const m = {innerWidth: innerWidth, scrollWidth: document.documentElement.scrollWidth,
             pageHeight: document.documentElement.scrollHeight};
  const top = id => { const e = document.getElementById(id);
                      return e ? e.getBoundingClientRect().top + scrollY : null; };
  m.causesTop = top('causes'); m.factsTop = top('facts'); m.heatTop = top('heatmaps');
  m.verdict = document.getElementById('verdict').textContent;
  m.facts = Object.fromEntries([...document.querySelectorAll('dl.facts dt')]
      .map(dt => [dt.textContent, dt.nextElementSibling.textContent]));
  m.causes = [...document.querySelectorAll('#causes .cause')].map(c => {
    const r = c.getBoundingClientRect();
    return {kind: c.dataset.kind, left: r.left, right: r.right, text: c.textContent,
            font: parseFloat(getComputedStyle(c.querySelector('.detail')).fontSize)}; });
  m.panels = [...document.querySelectorAll('figure.panel')].map(p => {
    const cells = [...p.querySelectorAll('td.c')];
    const wrap = p.querySelector('.mapwrap'), r = p.getBoundingClientRect();
    return {run: p.dataset.run, limit: +p.dataset.limit, left: r.left, right: r.right,
            top: r.top + scrollY, caption: p.querySelector('figcaption').textContent,
            fits: wrap.scrollWidth <= wrap.clientWidth, cells: cells.length,
            minCell: Math.min(...cells.map(c => c.getBoundingClientRect().width)),
            colours: new Set(cells.map(c => getComputedStyle(c).backgroundColor)).size,
            first: [...p.querySelectorAll('td.first')].map(td => ({
              layer: +td.dataset.layer, site: td.dataset.site, peak: +td.dataset.peak,
              ratio: +td.dataset.ratio, text: td.textContent,
              bg: getComputedStyle(td).backgroundColor,
              outline: getComputedStyle(td).outlineStyle}))}; });
  // Nothing may stick out of the screen sideways, except inside boxes that scroll.
  m.outside = [...document.querySelectorAll('main *')].filter(e => {
    if (e.closest('.scroll, .mapwrap')) return false;
    const r = e.getBoundingClientRect();
    return r.width > 0 && (r.right > innerWidth + 0.5 || r.left < -0.5); })
    .map(e => e.tagName + '.' + e.className).slice(0, 10);
  parent.postMessage(JSON.stringify(m), '*');
})();
</script>"""
if probe:
    assert "</body>" in page
    page = page.replace("</body>", script + "</body>")
receiver = """<script>
addEventListener('message', e => { const pre = document.createElement('pre');
  pre.id = 'measure'; pre.textContent = e.data; document.body.appendChild(pre); });
</script>""" if probe else ""
print(f"""<!DOCTYPE html><html><head><meta charset="utf-8"><style>body{{margin:0;background:#ddd}}
iframe{{border:0;display:block;background:#fff}}</style></head><body>{receiver}
<iframe width="{w}" height="{h}" srcdoc="{html.escape(page, quote=True)}"></iframe></body></html>""")
PY
}
for w in 1200 390; do
  win=$((w > 500 ? w : 500))
  frame $w 900 probe >"$out/probe-$w.html"
  chrome --window-size=$win,900 --virtual-time-budget=5000 --dump-dom "file://$out/probe-$w.html" \
    >"$out/dom-$w.html" || die "chromium --dump-dom failed at $w px (see $out/chromium.log)"
  python3 - "$out/dom-$w.html" "$out/measure-$w.json" <<'PY'
import html, re, sys
m = re.search(r'<pre id="measure">(.*?)</pre>', open(sys.argv[1], encoding="utf-8").read(), re.S)
if not m:
    sys.exit("the measuring script left nothing in the DOM")
open(sys.argv[2], "w").write(html.unescape(m.group(1)))
PY
  height=$(python3 -c 'import json,sys; print(min(12000, int(json.load(open(sys.argv[1]))["pageHeight"])))' "$out/measure-$w.json")
  frame $w "$height" plain >"$out/frame-$w.html"
  chrome --window-size=$win,$height --screenshot="$out/report-$w.png" "file://$out/frame-$w.html" ||
    die "chromium --screenshot failed at $w px"
  [ -s "$out/report-$w.png" ] || die "no screenshot at $w px"
done

# 4. What the page shows, judged against transformers' goldens.
python3 - "$out" "$goldens" "$model" <<'PY'
import array, json, math, struct, sys
out, goldens, model = sys.argv[1:4]

def tensors(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    head = json.loads(b[8:8 + n])
    def finite(name):
        v = head[name]
        assert v["dtype"] == "F32", v
        a = array.array("f")
        a.frombytes(b[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]])
        return all(math.isfinite(x) for x in a)
    return head, finite

# transformers' fp16 eager run: the first layer whose attention probabilities are non-finite
# while its queries and keys (q_norm, k_norm) are finite is where q.k^T overflowed.
head, finite = tensors(f"{goldens}/qwen3-fp16-attn__float16__eager__sites.safetensors")
layers = sorted(int(k.split(".")[1]) for k in head if k.startswith("attn_probs."))
want = next(l for l in layers if not finite(f"attn_probs.{l}"))
assert finite(f"model.layers.{want}.self_attn.q_norm") and \
    finite(f"model.layers.{want}.self_attn.k_norm"), "golden: the overflow is not in the scores"
want_site = f"model.layers.{want}.self_attn.scores"
# transformers' fp16 SDPA run (scores in fp32) is finite: every hidden state and the logits.
head_f, finite_f = tensors(f"{goldens}/qwen3-fp16-attn__float16__sdpa.safetensors")
fused_finite = all(finite_f(k) for k in head_f if k.startswith("hidden.") or k == "logits")

errors = []
def expect(cond, what):
    if not cond:
        errors.append(what)

for w in (1200, 390):
    m = json.load(open(f"{out}/measure-{w}.json"))
    at = f"[{w} px]"
    expect(m["innerWidth"] == w, f"{at} the window is {m['innerWidth']} px wide, not {w}")
    expect(m["scrollWidth"] <= m["innerWidth"], f"{at} the page scrolls sideways: {m['scrollWidth']} px")
    expect(not m["outside"], f"{at} elements beyond the screen's edge: {m['outside']}")
    expect(m["verdict"] == "FAIL", f"{at} verdict shown: {m['verdict']}")
    expect(None not in (m["causesTop"], m["factsTop"], m["heatTop"]) and
           m["causesTop"] < m["factsTop"] < m["heatTop"],
           f"{at} order causes < facts < heat map broken: {m['causesTop']}, {m['factsTop']}, {m['heatTop']}")
    kinds = [c["kind"] for c in m["causes"]]
    expect("activation_overflow" in kinds, f"{at} causes shown: {kinds}")
    for c in m["causes"]:
        expect(c["left"] >= 0 and c["right"] <= m["innerWidth"], f"{at} a cause runs off the page: {c}")
        expect(c["font"] >= 14, f"{at} cause text too small: {c['font']} px")
        expect("Fix:" in c["text"], f"{at} a cause without its fix")
    overflow = next(c for c in m["causes"] if c["kind"] == "activation_overflow")
    expect(want_site in overflow["text"], f"{at} the cause does not name {want_site}")
    for key in ("Model", "Prompt", "Tokens", "nanscope", "Date"):
        expect(key in m["facts"], f"{at} fact {key} missing: {list(m['facts'])}")
    expect(m["facts"].get("Model", "").rstrip("/").endswith("qwen3-fp16-attn"), f"{at} model: {m['facts'].get('Model')}")
    expect(m["facts"].get("Tokens", "").startswith("8: [1, 15, 300"), f"{at} tokens: {m['facts'].get('Tokens')}")
    panels = {p["run"]: p for p in m["panels"]}
    expect(set(panels) >= {"fp32 eager", "bf16 eager", "fp16 eager", "fp16 fused"},
           f"{at} panels: {list(panels)}")
    if "fp16 eager" not in panels:
        continue
    p = panels["fp16 eager"]
    expect(m["panels"][0]["run"] == "fp16 eager", f"{at} the failing run is not the first panel")
    expect(p["limit"] == 65504, f"{at} fp16 limit {p['limit']}")
    expect(len(p["first"]) == 1, f"{at} fp16 eager marks {len(p['first'])} cells first non-finite")
    if p["first"]:
        f = p["first"][0]
        expect(f["site"] == want_site and f["layer"] == want,
               f"{at} fp16 eager first non-finite marked at {f['site']}, transformers says {want_site}")
        expect(f["peak"] > 65504 and f["ratio"] > 1, f"{at} the marked cell's fp32 value {f['peak']} is within fp16")
        expect(f["text"] == "\u2715" and f["outline"] != "none", f"{at} the marked cell is not drawn as marked: {f}")
        expect(f["bg"] == "rgb(63, 0, 16)", f"{at} the over-limit cell is not dark: {f['bg']}")
    expect("first non-finite: layer %d scores" % want in p["caption"], f"{at} caption: {p['caption']}")
    expect(p["cells"] >= 3 * 15, f"{at} {p['cells']} cells for 3 layers")
    expect(p["colours"] >= 5, f"{at} only {p['colours']} colours: no picture")
    expect(p["minCell"] >= 10, f"{at} cells {p['minCell']:.1f} px wide: unreadable")
    for name, q in panels.items():
        expect(q["fits"], f"{at} heat map {name} needs sideways scrolling")
        expect(q["left"] >= 0 and q["right"] <= m["innerWidth"], f"{at} panel {name} off the page")
        if name != "fp16 eager":
            expect(not q["first"], f"{at} {name} marks a first non-finite site: {q['first']}")
    fused = panels.get("fp16 fused")
    if fused:
        expect(("finite" in fused["caption"]) == fused_finite,
               f"{at} fp16 fused caption {fused['caption']!r}, transformers' SDPA finite: {fused_finite}")
    if w == 1200:  # two panels side by side on a wide screen, one above the other on a phone
        expect(sum(1 for q in m["panels"] if abs(q["top"] - m["panels"][0]["top"]) < 1) >= 2,
               f"{at} panels not side by side")
    else:
        tops = [q["top"] for q in m["panels"]]
        expect(len(set(round(t) for t in tops)) == len(tops), f"{at} panels share a row on a phone")
if errors:
    print("\n".join("FAIL: " + e for e in errors), file=sys.stderr)
    sys.exit(1)
print(f"report OK: first non-finite of fp16 eager at {want_site}; screenshots in {out}")
PY
