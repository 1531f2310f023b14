#!/usr/bin/env python3
"""Generates unicode_tables.cpp: where the tokenizers library's Unicode data differs from ours.

The `tokenizers` library (0.23.2) normalizes with Unicode 9.0 tables (its NFC comes from the crate
unicode-normalization-alignments 0.1.12) and splits with Oniguruma's tables (Unicode 15/16),
while nanscope uses utf8proc (Unicode 15) for NFC and PCRE2 10.42 (Unicode 14) for the regex.
Rather than trust version numbers, the differences are measured on the library itself:

  1. probe (needs `pip install tokenizers`; run where it is installed):
       python3 src/tokenizer/gen_unicode_tables.py probe OUT/hf_unicode.json
     - for \\p{L}, \\p{N} and \\s: every code point the library's Split regex matches;
     - every code point whose NFC handling in the library differs from Python's unicodedata
       (reordering or decomposition that the library's older tables do not know).
  2. pcre (here): the sets PCRE2 gives for the same properties
       g++ -x c++ - -o /tmp/pcre_sets -lpcre2-8 <<< "$(python3 src/tokenizer/gen_unicode_tables.py pcre-source)"
       /tmp/pcre_sets > /tmp/pcre_sets.json
  3. emit:
       python3 src/tokenizer/gen_unicode_tables.py emit OUT/hf_unicode.json /tmp/pcre_sets.json \\
           > src/tokenizer/unicode_tables.cpp
"""

import json
import sys

PROPS = {"L": r"\p{L}", "N": r"\p{N}", "s": r"\s"}


def code_points():
    return [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]


def to_ranges(cps):
    out = []
    for c in sorted(cps):
        if out and out[-1][1] + 1 == c:
            out[-1][1] = c
        else:
            out.append([c, c])
    return out


def probe(out_path):
    import unicodedata as ud

    import tokenizers
    from tokenizers import Regex, normalizers, pre_tokenizers

    cps = code_points()
    text = "".join(chr(c) for c in cps)
    sets = {}
    for name, pattern in PROPS.items():
        split = pre_tokenizers.Split(Regex(pattern), behavior="removed")
        kept = set()
        for piece, _ in split.pre_tokenize_str(text):
            kept.update(ord(ch) for ch in piece)
        sets[name] = to_ranges(c for c in cps if c not in kept)

    nfc = normalizers.NFC()
    inert = []
    for c in cps:
        ch = chr(c)
        if not ud.combining(ch) and not (ud.decomposition(ch) and not ud.decomposition(ch).startswith("<")):
            continue
        # U+0345 has the highest combining class: a mark after it moves in front unless the
        # library gives it class 0; a character alone shows a decomposition the library lacks.
        for s in (ch, "a\u0345" + ch, ch + "\u0345"):
            if nfc.normalize_str(s) != ud.normalize("NFC", s):
                inert.append(c)
                break
    # A composite whose parts are newer than the library's tables: it leaves the parts apart.
    # Its second part becomes inert too (the emit step refuses one that is an old mark).
    for c in cps:
        d = ud.decomposition(chr(c))
        if not d or d.startswith("<") or len(d.split()) != 2:
            continue
        s = "".join(chr(int(x, 16)) for x in d.split())
        if nfc.normalize_str(s) != ud.normalize("NFC", s):
            inert.append(int(d.split()[1], 16))
    inert = sorted(set(inert))
    result = {
        "tokenizers_version": tokenizers.__version__,
        "python_unicodedata_version": ud.unidata_version,
        "onig": sets,
        "nfc_inert": to_ranges(inert),
    }
    with open(out_path, "w") as f:
        json.dump(result, f)
    print(f"wrote {out_path}: " + ", ".join(f"{k} {len(v)} ranges" for k, v in sets.items())
          + f", nfc_inert {len(result['nfc_inert'])} ranges", file=sys.stderr)


PCRE_SOURCE = r'''
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <cstdio>
#include <string>
int main() {
  const char* props[][2] = {{"L", "^\\p{L}$"}, {"N", "^\\p{N}$"}, {"s", "^\\s$"}};
  std::printf("{\"pcre2_version\": \"%d.%d\"", PCRE2_MAJOR, PCRE2_MINOR);
  for (auto& p : props) {
    int err; PCRE2_SIZE off;
    pcre2_code* re = pcre2_compile((PCRE2_SPTR)p[1], PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &err, &off, nullptr);
    pcre2_match_data* md = pcre2_match_data_create(1, nullptr);
    std::printf(", \"%s\": [", p[0]);
    bool first = true; long start = -1;
    for (long c = 0; c <= 0x110000; ++c) {
      bool m = false;
      if (c < 0x110000 && !(c >= 0xD800 && c <= 0xDFFF)) {
        std::string s;
        if (c < 0x80) s += char(c);
        else if (c < 0x800) { s += char(0xC0 | (c >> 6)); s += char(0x80 | (c & 63)); }
        else if (c < 0x10000) { s += char(0xE0 | (c >> 12)); s += char(0x80 | ((c >> 6) & 63)); s += char(0x80 | (c & 63)); }
        else { s += char(0xF0 | (c >> 18)); s += char(0x80 | ((c >> 12) & 63)); s += char(0x80 | ((c >> 6) & 63)); s += char(0x80 | (c & 63)); }
        m = pcre2_match(re, (PCRE2_SPTR)s.data(), s.size(), 0, 0, md, nullptr) > 0;
      }
      if (m && start < 0) start = c;
      if (!m && start >= 0) { std::printf("%s[%ld, %ld]", first ? "" : ", ", start, c - 1); first = false; start = -1; }
    }
    std::printf("]");
  }
  std::printf("}\n");
}
'''


def expand(ranges):
    out = set()
    for lo, hi in ranges:
        out.update(range(lo, hi + 1))
    return out


def emit(hf_path, pcre_path):
    hf = json.load(open(hf_path))
    pc = json.load(open(pcre_path))
    lines = [
        "// Generated by src/tokenizer/gen_unicode_tables.py from measurements of",
        f"// tokenizers {hf['tokenizers_version']} and PCRE2 {pc['pcre2_version']}. Do not edit.",
        '#include "tokenizer/unicode_tables.hpp"',
        "",
        "namespace nanscope::unicode_tables {",
        "",
    ]

    def table(name, ranges, why):
        lines.append(f"// {why}")
        lines.append(f"const std::vector<Range> {name} = {{")
        row = "   "
        for lo, hi in ranges:
            item = f" {{0x{lo:X}, 0x{hi:X}}},"
            if len(row) + len(item) > 98:
                lines.append(row)
                row = "   "
            row += item
        if row.strip():
            lines.append(row)
        lines.append("};")
        lines.append("")

    for prop in ("L", "N", "s"):
        onig, pcre = expand(hf["onig"][prop]), expand(pc[prop])
        table(f"k{prop}Extra", to_ranges(onig - pcre),
              f"In Oniguruma's \\{'p{' + prop + '}' if prop != 's' else 's'} but not PCRE2's.")
        table(f"k{prop}Missing", to_ranges(pcre - onig),
              f"In PCRE2's \\{'p{' + prop + '}' if prop != 's' else 's'} but not Oniguruma's.")
    table("kNfcInert", hf["nfc_inert"],
          "Code points the library's NFC leaves alone (unknown to its Unicode 9.0 tables).")
    lines.append("}  // namespace nanscope::unicode_tables")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "probe":
        probe(sys.argv[2])
    elif len(sys.argv) == 2 and sys.argv[1] == "pcre-source":
        print(PCRE_SOURCE)
    elif len(sys.argv) == 4 and sys.argv[1] == "emit":
        emit(sys.argv[2], sys.argv[3])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
