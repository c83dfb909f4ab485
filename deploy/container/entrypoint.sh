#!/bin/sh
# The image's start: `chorus serve` replaces this shell (exec), so it is the container's
# PID 1 and SIGTERM from the runtime (docker stop, a Kubernetes pod deletion) reaches the
# server itself, which then drains (server.shutdown_timeout_s). Chorus starts no children, so
# PID 1 has no zombies to reap; run with `--init` (tini) anyway if you prefer.
#
# Configuration, in order of precedence (later wins):
#   CHORUS_CONFIG  a YAML file (default /etc/chorus/chorus.yaml, the image's own; mount yours
#                  over it, e.g. a Kubernetes ConfigMap)
#   CHORUS_SET     whitespace-separated overrides, section.key=value (one --set each), e.g.
#                  CHORUS_SET="runner.device=cuda server.max_sessions=128"
#   arguments      anything after the image name goes to `chorus serve` as it is
# Secrets come from the environment variables the server reads itself (CHORUS_AUTH_TOKENS,
# CHORUS_TWILIO_AUTH_TOKEN, CHORUS_WEBHOOK_SECRET: docs/security.md), never from CHORUS_SET.
set -eu

CHORUS_BIN=${CHORUS_BIN:-chorus}
set -- --config "${CHORUS_CONFIG:-/etc/chorus/chorus.yaml}" "$@"
# Unquoted on purpose: one override per word (values with spaces belong in the YAML file).
for override in ${CHORUS_SET:-}; do
    set -- "$@" --set "$override"
done
exec "$CHORUS_BIN" serve "$@"
