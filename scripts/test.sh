#!/usr/bin/env bash
# The test suite: installs what it needs, then runs pytest (slow tests excluded
# unless you pass -m slow or ENGINEKIT_SLOW=1) on every core through pytest-xdist,
# one test file per worker at a time (module fixtures are built once);
# ENGINEKIT_TEST_WORKERS=0 runs it in one process.
source "$(dirname "$0")/_venv.sh"
MARK="not slow"
[ "${ENGINEKIT_SLOW:-0}" = "1" ] && MARK=""
exec python -m pytest -q -m "$MARK" -n "${ENGINEKIT_TEST_WORKERS:-auto}" --dist loadfile "$@"
