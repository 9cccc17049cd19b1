#!/usr/bin/env bash
# Vendor the web app's JavaScript and CSS (custseg/serving/ui/static/vendor/) from the npm registry.
#
# Every file the pages load is served by custseg itself: no CDN, no third-party request. This script
# is the record of where those files came from: it fetches the exact versions below with `npm pack`,
# keeps only the files the pages load and each package's licence, and prints their sizes. Run it from
# the repository root after changing a version, then run tests/unit/serving/test_ui.py and the browser
# test (tests/integration/serving/test_ui_browser.py). Files are copied byte for byte.
set -euo pipefail

DEST="custseg/serving/ui/static/vendor"
PACKAGES=(
  "swagger-ui-dist@5.35.0"  # /docs (Apache-2.0)
  "vega@6.4.0"              # chart runtime (BSD-3-Clause)
  "vega-lite@6.5.0"         # chart grammar compiled in the browser (BSD-3-Clause)
  "vega-embed@7.3.0"        # renders a spec; bundles vega-tooltip and the CSP-safe expression interpreter (BSD-3-Clause)
)
# package -> the files the pages load (paths inside the package)
declare -A FILES=(
  [swagger-ui-dist]="swagger-ui-bundle.js swagger-ui.css"
  [vega]="build/vega.min.js"
  [vega-lite]="build/vega-lite.min.js"
  [vega-embed]="build/vega-embed.min.js"
)

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rm -rf "$DEST"
mkdir -p "$DEST"
for spec in "${PACKAGES[@]}"; do
  name="${spec%@*}"
  version="${spec##*@}"
  (cd "$work" && npm pack --silent "$spec" >/dev/null)
  mkdir -p "$work/$name"
  tar -xzf "$work/$name-$version.tgz" -C "$work/$name"
  mkdir -p "$DEST/$name"
  for file in ${FILES[$name]}; do
    cp "$work/$name/package/$file" "$DEST/$name/$(basename "$file")"
  done
  cp "$work/$name/package/LICENSE" "$DEST/$name/LICENSE"
  [ -f "$work/$name/package/NOTICE" ] && cp "$work/$name/package/NOTICE" "$DEST/$name/NOTICE"
  echo "$spec" >"$DEST/$name/VERSION"
done
du -ab "$DEST" | sort -k2
echo "total: $(du -sb "$DEST" | cut -f1) bytes"
