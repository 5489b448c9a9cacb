#!/usr/bin/env bash
# The README's quickstart, run as a user would: its install line in a fresh virtual
# environment (enginekit[...] read as this checkout, .[...]), then each command of its
# bash block and its Python block, in a scratch folder with a photo.jpg, in order.
# Fails on the first command that fails. CI runs it after the tests.
#   bash scripts/quickstart.sh [WORK]     (default: a temporary folder, removed at the end)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WORK="${1:-$(mktemp -d -t enginekit-quickstart.XXXXXX)}"
[ -n "${1:-}" ] || trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK"

# The quickstart section: its first bash block (install line, then commands) and its first python block.
"$PY" - "$ROOT/README.md" "$WORK" <<'EOF'
import re, sys
from pathlib import Path
text = Path(sys.argv[1]).read_text(encoding="utf-8")
section = text.split("\n## Quickstart", 1)[1].split("\n## ", 1)[0]
blocks = re.findall(r"```(bash|python)\n(.*?)```", section, re.S)
bash = next(b for kind, b in blocks if kind == "bash")
python = next(b for kind, b in blocks if kind == "python")
lines = [re.sub(r"(^|\s)#.*$", "", line).strip() for line in bash.splitlines()]
lines = [line for line in lines if line]
if not lines or not lines[0].startswith("pip install "):
    sys.exit("the quickstart's bash block does not open with its pip install line")
out = Path(sys.argv[2])
(out / "install.txt").write_text(lines[0] + "\n")
(out / "commands.txt").write_text("\n".join(lines[1:]) + "\n")
(out / "quickstart.py").write_text(python)
EOF

INSTALL="$(cat "$WORK/install.txt")"
SPEC="$(sed -n "s/^pip install '\(enginekit\(\[[^]]*\]\)\?\)'.*/\1/p" "$WORK/install.txt")"
[ -n "$SPEC" ] || { echo "quickstart: cannot read the install line: $INSTALL" >&2; exit 1; }
echo "quickstart: $INSTALL  (as ${SPEC/enginekit/$ROOT})" >&2
"$PY" -m venv "$WORK/venv"
if ! "$WORK/venv/bin/python" -m pip install -q "${SPEC/enginekit/$ROOT}" >"$WORK/pip.log" 2>&1; then
    tail -30 "$WORK/pip.log" >&2
    echo "quickstart: the install line failed" >&2
    exit 1
fi
export PATH="$WORK/venv/bin:$PATH"
cd "$WORK"
# A photo to classify, as a user has one.
python -c "
import numpy as np
from PIL import Image
y, x = np.mgrid[0:480, 0:640]
rgb = np.stack([(x * 255 // 640), (y * 255 // 480), ((x + y) % 256)], -1).astype(np.uint8)
Image.fromarray(rgb).save('photo.jpg', quality=90)"

n=0
while IFS= read -r cmd; do
    n=$((n + 1))
    echo "quickstart [$n]: $cmd" >&2
    start=$(date +%s)
    if ! bash -c "$cmd" </dev/null; then
        echo "quickstart: command $n failed: $cmd" >&2
        exit 1
    fi
    echo "quickstart [$n]: ok in $(( $(date +%s) - start )) s" >&2
done < commands.txt
echo "quickstart [python]: the Python block" >&2
python quickstart.py
echo "quickstart: every command ran" >&2
