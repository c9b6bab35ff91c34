#!/usr/bin/env sh
# Render nginx.conf.template to stdout. Every placeholder has the docker-compose default; override any of
# them from the environment (the infra tests point them at loopback ports).
#   nginx/render.sh > nginx/nginx.conf
set -eu
here=$(CDPATH="" cd -- "$(dirname -- "$0")" && pwd)

export NGINX_LISTEN_PORT="${NGINX_LISTEN_PORT:-8080}"
export NGINX_RUNTIME_DIR="${NGINX_RUNTIME_DIR:-/tmp}"
export PREDICTOR_1="${PREDICTOR_1:-predictor-1:8080}"
export PREDICTOR_2="${PREDICTOR_2:-predictor-2:8080}"
export PREDICTOR_3="${PREDICTOR_3:-predictor-3:8080}"
export INDICATORS_UPSTREAM="${INDICATORS_UPSTREAM:-indicators:8081}"
export TRAINER_UPSTREAM="${TRAINER_UPSTREAM:-trainer-api:8082}"

# Only these names are substituted: nginx's own $host, $request_id, ... must stay as they are.
# shellcheck disable=SC2016 # the single quotes are deliberate: envsubst expands them, not the shell
envsubst '${NGINX_LISTEN_PORT} ${NGINX_RUNTIME_DIR} ${PREDICTOR_1} ${PREDICTOR_2} ${PREDICTOR_3} ${INDICATORS_UPSTREAM} ${TRAINER_UPSTREAM}' \
  < "$here/nginx.conf.template"
