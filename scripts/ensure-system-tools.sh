#!/usr/bin/env bash
# Installs the system tools that tests/infra needs, only when they are missing:
#   nginx          -> `nginx -t` and a real load-balancing test
#   promtool       -> `promtool check config|rules`, `promtool test rules` (Debian package `prometheus`)
#   docker-compose -> `docker-compose config -q` (Debian's v1; no Docker engine needed for `config`)
#   envsubst       -> renders nginx/nginx.conf.template (Debian package `gettext-base`)
#   prometheus     -> a real Prometheus scraping the services (tests/infra/test_prometheus_live.py)
#   shellcheck     -> actionlint checks the workflows' `run:` scripts with it
#   pg_dump, pg_restore -> backups (shared/backup.py); Debian's client must be at least the server's major
#   chromium, chromedriver -> the operator console in a real browser (tests/ui/test_console_browser.py; selenium
#                     drives Debian's chromium through chromium-driver: no browser download)
# Idempotent and quiet: prints nothing and exits 0 when everything is already there.
# As root it installs with apt-get; otherwise it says what to install and exits 1.
set -euo pipefail

# tool on PATH (or in sbin, where Debian puts nginx) -> Debian package that provides it
declare -A PACKAGE_FOR=(
  [nginx]=nginx
  [promtool]=prometheus
  [docker-compose]=docker-compose
  [envsubst]=gettext-base
  [prometheus]=prometheus
  [shellcheck]=shellcheck
  [pg_dump]=postgresql-client
  [pg_restore]=postgresql-client
  [chromium]=chromium
  [chromedriver]=chromium-driver
)

have() {
  command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]
}

missing=()
for tool in "${!PACKAGE_FOR[@]}"; do
  pkg="${PACKAGE_FOR[$tool]}"
  if ! have "$tool" && [[ " ${missing[*]} " != *" $pkg "* ]]; then missing+=("$pkg"); fi
done

[ "${#missing[@]}" -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "ensure-system-tools: missing Debian packages: ${missing[*]}" >&2
  echo "  install them with: sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
  exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-system-tools: apt-get not found; install these packages by hand: ${missing[*]}" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "ensure-system-tools: installing ${missing[*]}" >&2
# The package lists may be absent on a fresh image; refresh only when an install fails for lack of them.
if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's nginx and prometheus packages start their daemons where an init system runs; the tests start
# their own instances on free ports, so stop the daemons of the packages installed just now (only those).
if command -v service >/dev/null 2>&1; then
  for pkg in "${missing[@]}"; do
    case "$pkg" in
      nginx | prometheus) service "$pkg" stop >/dev/null 2>&1 || true ;;
    esac
  done
fi

for tool in "${!PACKAGE_FOR[@]}"; do
  if ! have "$tool"; then
    echo "ensure-system-tools: $tool still missing after installing ${PACKAGE_FOR[$tool]}" >&2
    exit 1
  fi
done
