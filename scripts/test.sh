#!/usr/bin/env bash
# Set up everything the test suite needs, from nothing, and run it.
#   bash scripts/test.sh            # the whole suite
#   bash scripts/test.sh -k kafka   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

# System tools the tests drive for real: Chromium (web page), Prometheus (promtool, scraping).
if ! command -v chromium >/dev/null || ! command -v promtool >/dev/null || ! command -v amtool >/dev/null; then
  if command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "installing chromium, prometheus and alertmanager with apt-get" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium prometheus prometheus-alertmanager >/dev/null
  else
    echo "tests need chromium, prometheus (promtool) and alertmanager (amtool) on PATH; install them first" >&2
    exit 1
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev,detect]"
# The detector's packages, without their declared pins (see pyproject's detect extra).
.venv/bin/python -m pip install -q --no-deps "yolov5==7.0.14" "ultralytics==8.4.190"

# Photos and weights for the tests live beside the repo (see README, "Tests").
export IMGSEARCH_ASSETS=${IMGSEARCH_ASSETS:-$(cd .. && pwd)/shared}
exec .venv/bin/python -m pytest "$@"
