#!/usr/bin/env bash
# `make compose-test`: the compose stack (docker-compose.yml under docker-compose.cpu.yml) built
# and run for real on this machine, checked end to end, and torn down, also when a step fails.
#
#  1. A container engine and compose: `docker compose` where a Docker engine answers; otherwise
#     podman with podman-compose (the `compose` extra, in .venv), podman and runc installed from
#     Debian's packages when missing (as root). Where podman's default runtime cannot start a
#     container (crun on hybrid cgroups, ulimits a sandbox refuses), and no
#     /etc/containers/containers.conf exists yet, one is written: runc, no default ulimits.
#  2. Images from no registry: a Debian base image made with debootstrap (trusting this host's
#     extra CA certificates, so that pip works behind a TLS-inspecting proxy) and a Redis image
#     from Debian's packages, unless MANYLORA_BASE_IMAGE and MANYLORA_REDIS_IMAGE name others.
#     The manylora image installs the CPU build of torch from this host's pip (the wheel `make`
#     installs into .venv) when it has it, otherwise from PyPI's CPU index.
#  3. `compose up`; every container healthy (its compose health check, run by this script:
#     podman runs none by itself where there is no systemd).
#  4. tools/compose/check.py: an adapter uploaded with the store's CLI, a completion streamed
#     through the router and through the OpenAI front, every service's metrics scraped.
#  5. The worker's container restarted: the stack is healthy again and serves the adapter.
#  6. `compose down -v`, always.
#
# Skipped (exit 0, saying why) only where containers cannot run here. Exit 1 on any failure,
# with the last lines of every container's log.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PY:-.venv/bin/python}
PODMAN_COMPOSE=${PODMAN_COMPOSE:-.venv/bin/podman-compose}
WORK=${COMPOSE_TEST_DIR:-build/compose-test}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
LOCAL_BASE=localhost/manylora-debian:bookworm
LOCAL_REDIS=localhost/manylora-redis:bookworm
WHEELS=tools/compose/wheels
SERVICES=(redis adapter_store gpu_worker router openai_front)
HEALTH_TIMEOUT_S=${HEALTH_TIMEOUT_S:-300}
export MANYLORA_TORCH_SPEC=${MANYLORA_TORCH_SPEC:-torch==2.13.0+cpu}
START=$SECONDS

step() { printf '\n==> [%3ds] %s\n' "$((SECONDS - START))" "$*"; }
note() { printf '    %s\n' "$*"; }
fail() { printf 'compose-test: FAILED: %s\n' "$*" >&2; exit 1; }
skip() {
    printf 'compose-test: SKIPPED: %s\n' "$*"
    exit 0
}
quiet() {  # run "$@" with its output in $WORK/last.log, shown only when it fails
    if ! "$@" >"$WORK/last.log" 2>&1; then
        tail -n 30 "$WORK/last.log" >&2
        return 1
    fi
}
as_root() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }
apt_install() {
    note "installing $* (Debian packages)"
    quiet apt-get update -q
    quiet env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}
mkdir -p "$WORK"

# ---- 1. engine and compose --------------------------------------------------------------------
step "container engine and compose"
if command -v docker >/dev/null && docker info >/dev/null 2>&1 \
    && docker compose version >/dev/null 2>&1; then
    ENGINE=docker
    COMPOSE=(docker compose)
else
    if ! command -v podman >/dev/null; then
        as_root || skip "no Docker engine, no podman, and no way to install it (needs root and apt-get)"
        apt_install podman runc
    fi
    ENGINE=podman
    [ -x "$PODMAN_COMPOSE" ] || fail "no $PODMAN_COMPOSE: run \`make compose-test\`"
    COMPOSE=("$PODMAN_COMPOSE")
fi
COMPOSE+=(-f docker-compose.yml -f docker-compose.cpu.yml)
note "$("$ENGINE" --version); $("${COMPOSE[@]}" version 2>/dev/null | head -n 1)"
"$ENGINE" info >/dev/null 2>&1 || skip "$ENGINE is installed but does not work here: $("$ENGINE" info 2>&1 | tail -n 1)"

image_exists() { "$ENGINE" image inspect "$1" >/dev/null 2>&1; }

# ---- 2. images --------------------------------------------------------------------------------
make_base_image() {
    command -v debootstrap >/dev/null || { as_root && apt_install debootstrap; } \
        || skip "no base image: set MANYLORA_BASE_IMAGE, or run as root with apt-get (debootstrap)"
    local root="$WORK/rootfs"
    rm -rf --one-file-system "$root"
    note "debootstrap bookworm from $DEBIAN_MIRROR (a few minutes)"
    quiet debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$root" "$DEBIAN_MIRROR"
    # This host's own CA certificates (a TLS-inspecting proxy's, say): pip in the build trusts
    # what the host trusts.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
        quiet chroot "$root" update-ca-certificates
    fi
    tar -C "$root" -c . | quiet "$ENGINE" import \
        --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt" \
        --change "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" \
        --change 'CMD ["bash"]' - "$LOCAL_BASE"
    rm -rf --one-file-system "$root"
}

step "base image"
if [ -n "${MANYLORA_BASE_IMAGE:-}" ]; then
    note "MANYLORA_BASE_IMAGE=$MANYLORA_BASE_IMAGE"
elif image_exists "$LOCAL_BASE"; then
    note "$LOCAL_BASE (made by an earlier run)"
    export MANYLORA_BASE_IMAGE=$LOCAL_BASE
else
    make_base_image
    export MANYLORA_BASE_IMAGE=$LOCAL_BASE
    note "made $LOCAL_BASE"
fi

step "can containers run here?"
probe() { "$ENGINE" run --rm "$MANYLORA_BASE_IMAGE" true >"$WORK/probe.log" 2>&1; }
if ! probe; then
    note "no: $(tail -n 1 "$WORK/probe.log")"
    if [ "$ENGINE" = podman ] && [ ! -e /etc/containers/containers.conf ] && as_root; then
        note "writing /etc/containers/containers.conf: runtime runc, no default ulimits"
        command -v runc >/dev/null || apt_install runc
        mkdir -p /etc/containers
        printf '%s\n' '# Written by `make compose-test` (tools/compose/compose_test.sh): crun cannot' \
            '# run containers on hybrid cgroups, and a sandbox may refuse the default ulimits.' \
            '[containers]' 'default_ulimits = []' '' '[engine]' 'runtime = "runc"' \
            >/etc/containers/containers.conf
    fi
    probe || skip "$ENGINE cannot run a container here: $(tail -n 1 "$WORK/probe.log")"
fi
note "yes"

step "Redis image"
if [ -n "${MANYLORA_REDIS_IMAGE:-}" ]; then
    note "MANYLORA_REDIS_IMAGE=$MANYLORA_REDIS_IMAGE"
else
    quiet nice "$ENGINE" build -t "$LOCAL_REDIS" --build-arg "BASE_IMAGE=$MANYLORA_BASE_IMAGE" \
        tools/compose/redis
    export MANYLORA_REDIS_IMAGE=$LOCAL_REDIS
    note "$LOCAL_REDIS (redis-server from Debian's packages)"
fi

step "manylora image ($MANYLORA_TORCH_SPEC)"
rm -f "$WHEELS"/*.whl
python_version=$("$ENGINE" run --rm "$MANYLORA_BASE_IMAGE" python3 -c \
    'import sys; print("%d.%d" % sys.version_info[:2])')
# The wheel this host's pip finds without an index (the one `make` put in .venv), copied into
# the build context: the CPU build is published on PyTorch's own index, which may be out of
# reach.
if "$PY" -m pip download -q --no-index --no-deps --only-binary=:all: --dest "$WHEELS" \
    --python-version "$python_version" --platform "manylinux_2_28_$(uname -m)" \
    "$MANYLORA_TORCH_SPEC" >/dev/null 2>&1; then
    note "torch from this host: $(cd "$WHEELS" && ls ./*.whl)"
    export MANYLORA_TORCH_INDEX_URL=""
else
    note "torch from ${MANYLORA_TORCH_INDEX_URL:-the PyTorch CPU index (docker-compose.cpu.yml)}"
fi
set +e
nice "${COMPOSE[@]}" build adapter_store 2>&1 | tee "$WORK/build.log" \
    | grep --line-buffered -o -E '^(STEP [0-9]+/[0-9]+|#[0-9]+ \[|Successfully installed).{0,100}'
built=${PIPESTATUS[0]}
set -e
[ "$built" = 0 ] || { tail -n 30 "$WORK/build.log" >&2; fail "the image did not build"; }
rm -f "$WHEELS"/*.whl

# ---- 3. up, healthy ---------------------------------------------------------------------------
container_of() {
    "$ENGINE" ps -a -q --filter "label=com.docker.compose.project=manylora" \
        --filter "label=com.docker.compose.service=$1" | head -n 1
}
healthy() {
    local id
    id=$(container_of "$1")
    [ -n "$id" ] || return 1
    if [ "$ENGINE" = podman ]; then
        podman healthcheck run "$id" >/dev/null 2>&1
    else
        [ "$(docker inspect -f '{{.State.Health.Status}}' "$id")" = healthy ]
    fi
}
wait_healthy() {
    local deadline=$((SECONDS + HEALTH_TIMEOUT_S)) waiting s
    while true; do
        waiting=()
        for s in "$@"; do healthy "$s" || waiting+=("$s"); done
        [ "${#waiting[@]}" = 0 ] && { note "healthy: $*"; return 0; }
        [ "$SECONDS" -lt "$deadline" ] || fail "not healthy after ${HEALTH_TIMEOUT_S}s: ${waiting[*]}"
        note "[$((SECONDS - START))s] waiting for ${waiting[*]}"
        sleep 5
    done
}
tear_down() {
    local status=$?
    trap - EXIT
    if [ "$status" != 0 ]; then
        for s in "${SERVICES[@]}"; do
            id=$(container_of "$s") || true
            [ -n "$id" ] || continue
            printf '\n---- %s (last lines of its log) ----\n' "$s" >&2
            "$ENGINE" logs --tail 25 "$id" >&2 2>&1 || true
        done
    fi
    step "tearing down"
    "${COMPOSE[@]}" down -v >"$WORK/down.log" 2>&1 || tail -n 20 "$WORK/down.log" >&2
    printf '\ncompose-test: %s in %ds\n' "$([ "$status" = 0 ] && echo passed || echo FAILED)" \
        "$((SECONDS - START))"
    exit "$status"
}

step "compose up"
"${COMPOSE[@]}" down -v >/dev/null 2>&1 || true  # what an interrupted run left
trap tear_down EXIT
# A signal is a failure: without these the EXIT trap saw the interrupted command's status
# and a killed run reported "passed" and exited 0.
trap 'exit 143' TERM
trap 'exit 130' INT
quiet "${COMPOSE[@]}" up -d
wait_healthy "${SERVICES[@]}"

# ---- 4. the checks ----------------------------------------------------------------------------
check() { "$PY" -m tools.compose.check "$@" | sed 's/^/    /'; }
scrape_worker() {
    "$ENGINE" exec "$(container_of gpu_worker)" python -c "import urllib.request; \
print(urllib.request.urlopen('http://127.0.0.1:9101/metrics', timeout=10).read().decode())" \
        >"$WORK/worker.prom"
}
step "upload an adapter with the store's CLI"
check upload
step "stream a completion through the router and through the OpenAI front"
check serve
step "scrape every service's metrics"
scrape_worker
check metrics "$WORK/worker.prom"

# ---- 5. restart -------------------------------------------------------------------------------
step "restart the worker's container"
started() { "$ENGINE" inspect -f '{{.State.StartedAt}}' "$(container_of gpu_worker)"; }
before=$(started)
quiet "$ENGINE" restart "$(container_of gpu_worker)"
[ "$(started)" != "$before" ] || fail "the worker's container did not restart"
wait_healthy gpu_worker router openai_front
check serve
