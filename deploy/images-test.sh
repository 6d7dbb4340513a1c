#!/usr/bin/env bash
# Build the three images (deploy/Dockerfile) and, unless asked only to build, run them against this
# machine's PostgreSQL and Redis: migrate, api + worker + scheduler, one workflow run to `succeeded`,
# /metrics, a clean SIGTERM stop of each, the api once more on a read-only root file system.
#
#   deploy/images-test.sh build   build sluice-{api,worker,scheduler}:$IMAGE_TAG with docker (if its
#                                 daemon answers) or podman; PYTHON_IMAGE picks the base image
#   deploy/images-test.sh         (as root, on Debian, without Docker) podman, runc and debootstrap
#                                 from apt when missing; a base image made locally with debootstrap
#                                 (cached: localhost/sluice-base-python:bookworm); the build; the test
#
# Podman's settings go in a file of this script's own (CONTAINERS_CONF), not in /etc. Nothing is
# left running: the containers, the database and the Redis keys of the run are removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE="${1:-test}"
IMAGE_TAG="${IMAGE_TAG:-latest}"
SERVICES=(api worker scheduler)
BASE_IMAGE="localhost/sluice-base-python:bookworm"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PG_URL_BASE="${SLUICE_IMAGES_PG:-postgresql://postgres@127.0.0.1:5432}"
REDIS_URL_BASE="${SLUICE_IMAGES_REDIS:-redis://127.0.0.1:6379/0}"
CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/sluice-images"

log() { printf 'images: %s\n' "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

docker_works() { command -v docker >/dev/null && docker info >/dev/null 2>&1; }

# --- podman, with settings of our own -------------------------------------------------------------

setup_podman() {
  local missing=()
  # type -P: the podman() wrapper below is a shell function, which command -v would find instead.
  type -P podman >/dev/null || missing+=(podman)
  command -v runc >/dev/null || [ -x /usr/sbin/runc ] || missing+=(runc)
  if [ "$MODE" = test ]; then
    command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
  fi
  if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
      die "missing ${missing[*]}; install them (apt-get install ${missing[*]}) or run as root on Debian"
    fi
    log "installing ${missing[*]} with apt-get"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  export PATH="$PATH:/usr/sbin:/sbin"
  mkdir -p "$CACHE_DIR"
  # runc: crun refuses hybrid cgroup hierarchies; cgroupfs and a file for events: no systemd needed.
  if [ -z "${CONTAINERS_CONF:-}" ]; then
    export CONTAINERS_CONF="$CACHE_DIR/containers.conf"
    cat >"$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=20000:20000"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
  fi
}

# --- the base image: Debian bookworm's python3 (3.11), made here ---------------------------------

build_base() {
  if podman image exists "$BASE_IMAGE"; then
    log "base image $BASE_IMAGE exists (podman rmi it to make it again)"
    return
  fi
  local start dir
  start="$(now)"
  dir="$(mktemp -d)"
  log "making $BASE_IMAGE: debootstrap bookworm from $DEBIAN_MIRROR"
  debootstrap --variant=minbase bookworm "$dir/rootfs" "$DEBIAN_MIRROR" >"$dir/debootstrap.log" 2>&1 \
    || { tail -20 "$dir/debootstrap.log" >&2; rm -rf "$dir"; die "debootstrap failed"; }
  # No documentation, manuals, translations or package lists: a smaller base.
  rm -rf "$dir/rootfs"/usr/share/{doc,man,info,locale}/* "$dir/rootfs"/var/lib/apt/lists/* \
    "$dir/rootfs"/var/cache/apt/*
  printf 'path-exclude %s\n' '/usr/share/doc/*' '/usr/share/man/*' '/usr/share/info/*' '/usr/share/locale/*' \
    >"$dir/rootfs/etc/dpkg/dpkg.cfg.d/sluice-nodoc"
  tar -C "$dir/rootfs" -c . | podman import - localhost/sluice-base-rootfs:bookworm >/dev/null
  rm -rf "$dir/rootfs"
  # This machine's extra CA certificates (HTTPS to PyPI may be re-signed by one of them) join the
  # image's store, which pip and uv are pointed at.
  mkdir -p "$dir/ctx/extra-ca"
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$dir/ctx/extra-ca/"
  fi
  cat >"$dir/ctx/Containerfile" <<'EOF'
FROM localhost/sluice-base-rootfs:bookworm
COPY extra-ca/ /usr/local/share/ca-certificates/
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3 python3-venv ca-certificates \
    && update-ca-certificates \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    LANG=C.UTF-8
CMD ["python3"]
EOF
  podman build --quiet --network=host --format docker -t "$BASE_IMAGE" "$dir/ctx" >/dev/null
  podman rmi localhost/sluice-base-rootfs:bookworm >/dev/null
  rm -rf "$dir"
  log "base image made in $(since "$start") s"
}

# --- the three images ----------------------------------------------------------------------------

build_images() {
  local engine="$1" start service revision version source
  shift
  revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
  version="${VERSION:-$(git describe --tags --always --dirty 2>/dev/null || echo dev)}"
  # The origin's address as https, without any user or token in it.
  source="$(git remote get-url origin 2>/dev/null \
    | sed -E 's#^git@([^:]+):#https://\1/#; s#//[^/@]*@#//#; s#\.git$##' || true)"
  for service in "${SERVICES[@]}"; do
    start="$(now)"
    local args=(build -f deploy/Dockerfile --target "$service" -t "sluice-$service:$IMAGE_TAG"
      --build-arg "VERSION=$version" --build-arg "REVISION=$revision" --build-arg "SOURCE=$source")
    if [ -n "${PYTHON_IMAGE:-}" ]; then
      args+=(--build-arg "PYTHON_IMAGE=$PYTHON_IMAGE")
    elif [ "$engine" = podman ]; then
      # The Dockerfile's default, spelt in full: podman may refuse a short name without a terminal.
      args+=(--build-arg "PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm")
    fi
    # podman: the docker format keeps HEALTHCHECK (the OCI format has no field for it).
    if [ "$engine" = podman ]; then args+=(--format docker); fi
    "$engine" "${args[@]}" "$@" . >&2
    log "built sluice-$service:$IMAGE_TAG in $(since "$start") s"
  done
}

print_sizes() {
  local engine="$1" service
  for service in "${SERVICES[@]}"; do
    "$engine" image inspect --format "sluice-$service:$IMAGE_TAG {{.Size}}" "sluice-$service:$IMAGE_TAG" \
      | awk '{ printf "images: %s %.1f MB\n", $1, $2 / 1e6 }' >&2
  done
}

if [ "$MODE" = build ]; then
  if docker_works; then
    build_images docker
    print_sizes docker
  else
    setup_podman
    build_images podman --network=host
    print_sizes podman
  fi
  exit 0
fi
[ "$MODE" = test ] || die "usage: $0 [build]"

# --- the test ------------------------------------------------------------------------------------

# Without systemd podman cannot time the images' healthchecks (they are run below by hand) and says
# so at each start and stop: not an error, left out.
podman() {
  local rc=0
  { command podman "$@" 2>&1 1>&3 3>&- | { grep -v 'unable to get systemd connection' >&2 || true; }; } 3>&1 || rc=$?
  return "$rc"
}

total_start="$(now)"
setup_podman
build_base
PYTHON_IMAGE="$BASE_IMAGE" build_images podman --network=host
log "base (if made) and images: $(since "$total_start") s"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

RUN_ID="$(python3 -c 'import secrets; print(secrets.token_hex(4))')"
DB_NAME="sluice_images_$RUN_ID"
REDIS_PREFIX="sluice_images_$RUN_ID"
DATABASE_URL="$PG_URL_BASE/$DB_NAME"
SECRET_KEY="$(python3 -c 'import base64, os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())')"
API_PORT="$(free_port)"
WORKER_METRICS="$(free_port)"
SCHEDULER_METRICS="$(free_port)"
HTTP_PORT="$(free_port)"
RO_PORT="$(free_port)"
API="http://127.0.0.1:$API_PORT"
WORK_DIR="$(mktemp -d)"
CONTAINERS=()
HTTP_PID=""
DB_CREATED=""

cleanup() {
  local rc=$?
  set +e
  for c in "${CONTAINERS[@]}"; do
    if [ "$rc" -ne 0 ] && podman container exists "$c"; then
      log "last lines of $c:"
      podman logs --tail 15 "$c" >&2 2>&1
    fi
    podman rm -f -t 0 "$c" >/dev/null 2>&1
  done
  if [ -n "$HTTP_PID" ]; then kill "$HTTP_PID" 2>/dev/null; wait "$HTTP_PID" 2>/dev/null; fi
  if [ -n "$DB_CREATED" ]; then
    psql "$PG_URL_BASE/postgres" -qAt -c "DROP DATABASE IF EXISTS $DB_NAME WITH (FORCE)" >/dev/null
    podman run --rm --network=host "sluice-api:$IMAGE_TAG" python -c \
      "import redis, sys; r = redis.Redis.from_url(sys.argv[1]); [r.delete(k) for k in r.scan_iter(sys.argv[2] + '*')]" \
      "$REDIS_URL_BASE" "$REDIS_PREFIX" >/dev/null 2>&1
  fi
  rm -rf "$WORK_DIR"
  if [ "$rc" -eq 0 ]; then log "PASS"; else log "FAILED (exit $rc)"; fi
  exit "$rc"
}
trap cleanup EXIT
trap "exit 130" INT
trap "exit 143" TERM

psql "$PG_URL_BASE/postgres" -qAt -c "CREATE DATABASE $DB_NAME" >/dev/null
DB_CREATED=1
log "database $DB_NAME, Redis prefix $REDIS_PREFIX"

# A local HTTP server for the workflow's step to call.
mkdir -p "$WORK_DIR/www"
echo '{"hello": "images"}' >"$WORK_DIR/www/hello.json"
python3 -m http.server "$HTTP_PORT" --bind 127.0.0.1 --directory "$WORK_DIR/www" >"$WORK_DIR/http.log" 2>&1 &
HTTP_PID=$!

ENV_ARGS=(
  -e "DATABASE_URL=$DATABASE_URL" -e "REDIS_URL=$REDIS_URL_BASE" -e "SLUICE_REDIS_PREFIX=$REDIS_PREFIX"
  -e "SLUICE_SECRET_KEY=$SECRET_KEY" -e SLUICE_HTTP_ALLOW_PRIVATE=true
)
run_once() { podman run --rm --network=host "${ENV_ARGS[@]}" "$@"; }
start() {
  local name="sluice-images-$RUN_ID-$1"
  shift
  CONTAINERS+=("$name")
  podman run -d --name "$name" --network=host "${ENV_ARGS[@]}" "$@" >/dev/null
}
name() { echo "sluice-images-$RUN_ID-$1"; }

wait_ready() {
  local url="$1" container="$2" _
  for _ in $(seq 1 120); do
    if curl -fs -o /dev/null "$url"; then return 0; fi
    if [ "$(podman inspect -f '{{.State.Running}}' "$container")" != true ]; then
      die "$container exited before $url answered"
    fi
    sleep 0.25
  done
  die "$url did not answer in 30 s"
}

stop_clean() {
  local container="$1" start code took
  start="$(now)"
  podman stop -t 10 "$container" >/dev/null
  took="$(since "$start")"
  code="$(podman inspect -f '{{.State.ExitCode}}' "$container")"
  [ "$code" = 0 ] || die "$container exited with $code on SIGTERM (after $took s)"
  awk -v t="$took" 'BEGIN { exit !(t < 10) }' || die "$container took $took s to stop"
  log "$container stopped on SIGTERM in $took s, exit code 0"
}

# The Kubernetes init containers' check, as they run it (read-only root): pending first, then in.
if run_once --read-only --tmpfs /tmp "sluice-worker:$IMAGE_TAG" sluice migrate --check >&2; then
  die "sluice migrate --check passed on a database that was never migrated"
fi
run_once --read-only --tmpfs /tmp "sluice-api:$IMAGE_TAG" sluice migrate >&2
for service in api worker scheduler; do
  run_once --read-only --tmpfs /tmp "sluice-$service:$IMAGE_TAG" sluice migrate --wait 30 >&2 \
    || die "sluice migrate --wait failed in the $service image after the migration"
done
log "migrated; each image's migrate --wait (the pods' init container) sees it"
TOKEN="$(run_once "sluice-api:$IMAGE_TAG" sluice users create "images-$RUN_ID" | tail -n 1)"
[ -n "$TOKEN" ] || die "no token from sluice users create"

start api -e "SLUICE_API_BIND=127.0.0.1:$API_PORT" "sluice-api:$IMAGE_TAG"
start worker -e "SLUICE_METRICS_HOST=127.0.0.1" -e "SLUICE_METRICS_PORT=$WORKER_METRICS" "sluice-worker:$IMAGE_TAG"
start scheduler -e "SLUICE_METRICS_HOST=127.0.0.1" -e "SLUICE_METRICS_PORT=$SCHEDULER_METRICS" \
  "sluice-scheduler:$IMAGE_TAG"
wait_ready "$API/api/ready" "$(name api)"
log "api ready on $API"

# One workflow, one http step against the local server, run until it succeeds.
python3 - "$API" "$TOKEN" "http://127.0.0.1:$HTTP_PORT/hello.json" <<'EOF'
import json, sys, time, urllib.request

base, token, url = sys.argv[1:4]

def call(method, path, body=None):
    req = urllib.request.Request(
        base + path, method=method, data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)

wf = call("POST", "/api/workflows", {
    "name": "images test", "trigger": {"type": "manual"},
    "steps": [{"id": "fetch", "type": "http", "config": {"url": url}}],
})
run_id = call("POST", f"/api/workflows/{wf['id']}/run", {})["runId"]
deadline = time.monotonic() + 60
while True:
    run = call("GET", f"/api/runs/{run_id}")
    if run["status"] in ("succeeded", "failed", "cancelled", "timed_out"):
        break
    if time.monotonic() > deadline:
        sys.exit(f"images: run {run_id} still {run['status']} after 60 s")
    time.sleep(0.25)
if run["status"] != "succeeded":
    sys.exit(f"images: run {run_id} ended {run['status']}: {json.dumps(run)[:2000]}")
print(f"images: run {run_id} succeeded", file=sys.stderr)
EOF

has_metrics() {
  local body
  body="$(curl -fsS "$1")" || die "$1 did not answer"
  grep -q '^sluice_' <<<"$body" || die "no sluice_ metrics on $1"
}
has_metrics "$API/metrics"
has_metrics "http://127.0.0.1:$WORKER_METRICS/metrics"
has_metrics "http://127.0.0.1:$SCHEDULER_METRICS/metrics"
log "/metrics served by the api, the worker and the scheduler"

# The dashboard's templates and static files are in the api image (package data of the wheel).
page="$(curl -fsS "$API/login")" || die "the api image serves no sign-in page at /login"
grep -q 'name="token"' <<<"$page" || die "the api image's /login has no token field"
script="$(curl -fsS "$API/static/vendor/htmx-2.0.11.min.js")" || die "the api image serves no htmx"
grep -q 'htmx' <<<"$script" || die "the api image's htmx is not htmx"
log "the dashboard's sign-in page and static files served by the api"

for service in "${SERVICES[@]}"; do
  podman healthcheck run "$(name "$service")" >/dev/null || die "the $service image's HEALTHCHECK failed"
done
log "each image's HEALTHCHECK passes"

# `sluice <service>` execs the service: PID 1 is the service itself, which gets the SIGTERM.
for service in "${SERVICES[@]}"; do
  pid1="$(podman exec "$(name "$service")" cat /proc/1/cmdline | tr '\0' ' ')"
  log "$service: PID 1 is: $pid1"
  case "$pid1" in
    *"-m sluice_$service"*) ;;
    *) die "PID 1 of the $service container is not the service: $pid1" ;;
  esac
done

for service in "${SERVICES[@]}"; do stop_clean "$(name "$service")"; done

# The api on a read-only root file system (a tmpfs for its metric files).
start api-ro --read-only --tmpfs /tmp -e "SLUICE_API_BIND=127.0.0.1:$RO_PORT" "sluice-api:$IMAGE_TAG"
wait_ready "http://127.0.0.1:$RO_PORT/api/ready" "$(name api-ro)"
log "api ready on a read-only root file system"
stop_clean "$(name api-ro)"

print_sizes podman
log "total: $(since "$total_start") s"
