#!/usr/bin/env bash
# The test suite: installs what it needs, then runs pytest (slow tests excluded
# unless you pass -m slow or ENGINEKIT_SLOW=1).
source "$(dirname "$0")/_venv.sh"
MARK="not slow"
[ "${ENGINEKIT_SLOW:-0}" = "1" ] && MARK=""
exec python -m pytest -q -m "$MARK" "$@"
