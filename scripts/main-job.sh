#!/usr/bin/env bash
# The main job on the built-in default model: installs what it needs, then runs it.
# `enginekit optimize default`: export, build every candidate engine, check each
# against PyTorch, time each beside PyTorch, keep the fastest that passes in out/best.
source "$(dirname "$0")/_venv.sh"
exec enginekit optimize default -o out/best --overwrite "$@"
