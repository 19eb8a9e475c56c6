"""`dvc plots show` rendered by a real browser with no network: does every chart draw?

Writes the plots page of this checkout (the offline template of .dvc/config `plots.html_template`),
opens it in headless Chromium inside a network namespace of its own (`unshare -rn`: no interface but
loopback, so a CDN script could not load), screenshots it, and counts the charts the browser drew
(vega-embed puts one <svg> or <canvas> per chart into each plot's div).

    python bench/plots_offline.py [--out bench/results/plots_offline.png]

Needs Debian's `chromium` and unprivileged user namespaces. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = ["unshare", "-rn", "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "plots_offline.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "-o", tmp], cwd=REPO, check=True)
        page = Path(tmp) / "index.html"
        wait = ["--virtual-time-budget=10000", f"file://{page}"]
        subprocess.run(
            [*CHROMIUM, "--window-size=1400,5000", f"--screenshot={args.out}", *wait],
            check=True,
            capture_output=True,
        )
        dom = subprocess.run([*CHROMIUM, "--dump-dom", *wait], check=True, capture_output=True, text=True)
        charts = len(re.findall(r'<div id="[^"]*" class="vega-embed', dom.stdout))
        drawn = len(re.findall(r"<svg[^>]*class=\"marks\"|<canvas[^>]*class=\"marks\"", dom.stdout))
        images = dom.stdout.count("<img")
        external = re.findall(r"<script[^>]+src=\"(http[^\"]+)", page.read_text())
    print(
        json.dumps(
            {
                "charts": charts,
                "drawn": drawn,
                "images": images,
                "external_scripts": external,
                "screenshot": str(args.out),
            }
        )
    )


if __name__ == "__main__":
    main()
