#!/usr/bin/env bash
# The GPU check is scripts/gpu_check.py (python3, standard library only); this wrapper keeps the old name.
exec python3 "$(dirname "$0")/gpu_check.py" "$@"
