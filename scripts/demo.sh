#!/usr/bin/env bash
# The main job on a machine with no inference server: start the simulated backend on loopback,
# solve one problem with the smoke preset, stop the backend.
set -euo pipefail
cd "$(dirname "$0")/.."
problem=${1:-"What is 17 + 25 * 3?"}
port=${MARKOV_RSA_DEMO_PORT:-18001}
.venv/bin/markov-rsa fake-backend --port "$port" --tokens-per-second 2000 --length-mean 300 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  sleep 0.1
done
.venv/bin/markov-rsa solve "$problem" --backend "http://127.0.0.1:$port/v1" --preset smoke
