#!/usr/bin/env bash
# Renders an ascend-quant HTML page (`compare --html` or `calibrate --html`)
# in headless Chromium and checks that the page drew its charts: takes a
# screenshot and dumps the rendered DOM, then counts the cosine bars,
# histogram bins and clip lines in it.
# Usage: scripts/check_html_report.sh REPORT.html [SCREENSHOT.png]
# Needs: chromium (apt-get install chromium).
set -euo pipefail
report=$(realpath "$1")
shot=${2:-${report%.html}.png}
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking
       --disable-component-update --disable-sync --user-data-dir="$profile")
chromium "${flags[@]}" --window-size=900,1400 --screenshot="$shot" "file://$report" >/dev/null 2>&1
dom=$(chromium "${flags[@]}" --dump-dom "file://$report" 2>/dev/null)
bars=$(grep -o 'class="bar"' <<<"$dom" | wc -l)
bins=$(grep -o 'class="bin"' <<<"$dom" | wc -l)
clips=$(grep -o 'class="clip"' <<<"$dom" | wc -l)
[ -s "$shot" ] || { echo "no screenshot written" >&2; exit 1; }
[ "$bars" -gt 0 ] && [ "$bins" -gt 0 ] || { echo "charts missing: $bars bars, $bins bins" >&2; exit 1; }
echo "rendered: $bars cosine bars, $bins histogram bins, $clips clip lines; screenshot $shot"
