#!/bin/sh
# Image build: make sure the base image has Python >= 3.11 with venv. python:3.11-slim has it;
# a CUDA base (nvidia/cuda:*-ubuntu24.04) gets Ubuntu's python3 (3.12) from apt.
set -eu
ok='import sys, venv; sys.exit(0 if sys.version_info >= (3, 11) else 1)'
if python3 -c "$ok" 2>/dev/null; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends python3 python3-venv ca-certificates
rm -rf /var/lib/apt/lists/*
python3 -c "$ok" || { echo "ensure-python: the base image's python3 is older than 3.11" >&2; exit 1; }
