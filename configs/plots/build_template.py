"""Build offline.html: DVC's plots page with vega, vega-lite and vega-embed inlined (no CDN).

`dvc plots show`/`diff` fill the page's `{plot_divs}`; DVC's default page loads the three libraries
from cdn.jsdelivr.net, so offline no chart renders. This page leaves out DVC's `{scripts}`
placeholder (where those CDN tags go) and carries the libraries' minified builds instead.

Rebuild (needs npm and its registry; versions and licences: LICENSES.md):

    cd "$(mktemp -d)" && npm pack vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0
    for f in *.tgz; do mkdir "${f%.tgz}" && tar xzf "$f" -C "${f%.tgz}"; done
    python /path/to/repo/configs/plots/build_template.py . /path/to/repo/configs/plots/offline.html
"""

from __future__ import annotations

import sys
from pathlib import Path

BUILDS = ("vega-5.33.1/package/build/vega.min.js", "vega-lite-5.23.0/package/build/vega-lite.min.js",
          "vega-embed-6.29.0/package/build/vega-embed.min.js")  # load order: embed needs vega and vega-lite

PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>sam3ft plots</title>
<!-- vega, vega-lite, vega-embed (BSD-3-Clause, UW Interactive Data Lab), inlined: configs/plots/LICENSES.md -->
{libraries}
<style>
body {{ font-family: sans-serif; margin: 16px; }}
table {{ border-spacing: 15px; }}
</style>
</head>
<body>
{plot_divs}
</body>
</html>
"""


def main(unpacked: Path, out: Path) -> None:
    scripts = []
    for rel in BUILDS:
        code = (unpacked / rel).read_text(encoding="utf-8")
        if "</script" in code.lower():  # would end the inline <script> element early
            raise SystemExit(f"{rel} contains '</script': cannot inline it as is")
        scripts.append(f"<script>\n{code}\n</script>")
    page = PAGE.format(refresh_tag="{refresh_tag}", plot_divs="{plot_divs}", libraries="\n".join(scripts))
    out.write_text(page, encoding="utf-8")
    print(f"{out}: {out.stat().st_size} bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
