#!/usr/bin/env bash
# The main job on the built-in default model: installs what it needs, then runs it.
source "$(dirname "$0")/_venv.sh"
exec enginekit demo "$@"
