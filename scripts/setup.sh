#!/usr/bin/env bash
# One-step setup: a virtualenv in .venv with torch, Chorus and its test tools.
#
# torch is installed first and explicitly, because an unpinned torch pulled in by a
# dependency would fetch several GB of CUDA packages. Choose it with CHORUS_TORCH:
#   CHORUS_TORCH=torch==2.13.0   (default; the CPU build on this project's machines)
#   CHORUS_TORCH=skip            keep the torch the base interpreter already has (e.g. your
#                                CUDA build): the venv is then made with --system-site-packages
# A torch already importable inside .venv is always kept.
# Re-running is cheap: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${CHORUS_PYTHON:-python3}
TORCH_SPEC=${CHORUS_TORCH:-torch==2.13.0}
VENV=${CHORUS_VENV:-.venv}

if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
    echo "setup: Python >= 3.11 is required (found $("$PY" --version 2>&1)); set CHORUS_PYTHON" >&2
    exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
    if [ "$TORCH_SPEC" = "skip" ]; then
        "$PY" -m venv --system-site-packages "$VENV"
    else
        "$PY" -m venv "$VENV"
    fi
fi
VPY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if "$VPY" -c 'import torch' 2>/dev/null; then
    echo "setup: keeping installed torch $("$VPY" -c 'import torch; print(torch.__version__)')"
elif [ "$TORCH_SPEC" = "skip" ]; then
    echo "setup: CHORUS_TORCH=skip but no torch is importable from $PY" >&2
    exit 1
else
    echo "setup: installing $TORCH_SPEC"
    "$VPY" -m pip install -q "$TORCH_SPEC"
fi

# Editable, so the tests and the server run the checkout's code.
if ! "$VPY" -c 'import server, pytest, xdist, funasr, webrtcvad, playwright, openai' 2>/dev/null || [ pyproject.toml -nt "$VENV/.chorus-installed" ]; then
    echo "setup: installing chorus and its dependencies (first time: a few minutes)"
    "$VPY" -m pip install -q -e ".[test]"
    touch "$VENV/.chorus-installed"
fi
# The browser test (tests/test_browser.py) drives Debian's Chromium with Playwright: Playwright's
# own browser download (`playwright install`) comes from a CDN, the system package does not.
# Setup never fails over it: without Chromium that one test file is skipped, loudly.
CHROMIUM=${CHORUS_CHROMIUM:-$(command -v chromium || echo /usr/bin/chromium)}
if [ -x "$CHROMIUM" ]; then
    echo "setup: browser test uses $CHROMIUM"
elif [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's chromium for the browser test (tests/test_browser.py)"
    if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; }; then
        echo "setup: *** WARNING: apt-get could not install chromium: tests/test_browser.py (the captioning page) will be SKIPPED ***" >&2
    fi
else
    why="not running as root"
    command -v apt-get >/dev/null 2>&1 || why="no apt-get on this system"
    echo "setup: *** WARNING: chromium is not installed and setup cannot install it ($why): tests/test_browser.py (the captioning page) will be SKIPPED; install Chromium (Debian: sudo apt-get install chromium) or set CHORUS_CHROMIUM to its binary ***" >&2
fi

# The fleet tests (docs/deploy.md): tests/test_haproxy.py runs Debian's haproxy in front of two
# servers; tests/test_deploy.py renders the Kubernetes overlays with kubectl (kustomize built in)
# and schema-checks them offline with kubernetes-validate (PyPI). Setup never fails over them:
# without one, the tests that need it are skipped, loudly.
HAPROXY=$(command -v haproxy || { [ -x /usr/sbin/haproxy ] && echo /usr/sbin/haproxy; } || true)
if [ -n "$HAPROXY" ]; then
    echo "setup: load-balancing test uses $HAPROXY"
elif [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's haproxy for the load-balancing test (tests/test_haproxy.py)"
    if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends haproxy; }; then
        echo "setup: *** WARNING: apt-get could not install haproxy: tests/test_haproxy.py (the fleet behind a balancer) will be SKIPPED ***" >&2
    fi
else
    why="not running as root"
    command -v apt-get >/dev/null 2>&1 || why="no apt-get on this system"
    echo "setup: *** WARNING: haproxy is not installed and setup cannot install it ($why): tests/test_haproxy.py will be SKIPPED; install it (Debian: sudo apt-get install haproxy) ***" >&2
fi
# tests/test_redis_calls.py (call events across replicas) starts Debian's redis-server itself,
# on a free loopback port with no persistence; the package's own service is not needed.
REDIS_SERVER=$(command -v redis-server || { [ -x /usr/bin/redis-server ] && echo /usr/bin/redis-server; } || true)
if [ -n "$REDIS_SERVER" ]; then
    echo "setup: call-events test uses $REDIS_SERVER"
elif [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's redis-server for the call-events test (tests/test_redis_calls.py)"
    if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server; }; then
        echo "setup: *** WARNING: apt-get could not install redis-server: tests/test_redis_calls.py (call events across replicas) will be SKIPPED ***" >&2
    fi
else
    why="not running as root"
    command -v apt-get >/dev/null 2>&1 || why="no apt-get on this system"
    echo "setup: *** WARNING: redis-server is not installed and setup cannot install it ($why): tests/test_redis_calls.py will be SKIPPED; install it (Debian: sudo apt-get install redis-server) ***" >&2
fi
if ! command -v kubectl >/dev/null 2>&1; then
    # Debian has no kubectl package; it comes from the Kubernetes project's own apt repository.
    echo "setup: *** WARNING: kubectl is not installed: the Kubernetes checks of tests/test_deploy.py will be SKIPPED; install it from https://kubernetes.io/docs/tasks/tools/ ***" >&2
fi
if ! "$VPY" -c 'import kubernetes_validate' 2>/dev/null; then
    echo "setup: installing kubernetes-validate (offline schema check of deploy/kubernetes)"
    "$VPY" -m pip install -q "kubernetes-validate>=1.30" || \
        echo "setup: *** WARNING: could not install kubernetes-validate: the schema check in tests/test_deploy.py will be SKIPPED ***" >&2
fi

# Qwen3-ASR's reference implementation (tests/test_qwen3asr_runner.py compares Chorus's runner
# with it): qwen-asr's transformers model classes need transformers 4.57, the server has 5, so it
# goes into a directory of its own, without qwen-asr's unrelated dependencies, and runs there.
QWEN_REF="$VENV/qwen-asr-ref"
if [ ! -d "$QWEN_REF/qwen_asr" ]; then
    echo "setup: installing the qwen-asr reference into $QWEN_REF (for the Qwen3-ASR equality tests)"
    "$VPY" -m pip install -q --no-deps --target "$QWEN_REF" transformers==4.57.6 huggingface_hub==0.36.2 \
        tokenizers==0.22.2 qwen-asr==0.0.6 || \
        echo "setup: *** WARNING: could not install the qwen-asr reference: its equality tests in tests/test_qwen3asr_runner.py will be SKIPPED ***" >&2
fi

echo "setup: ready ($("$VPY" -c 'import torch, funasr; print("torch", torch.__version__, "funasr", funasr.__version__)' 2>/dev/null | tail -1))"
