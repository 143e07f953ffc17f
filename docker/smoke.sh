#!/usr/bin/env bash
# Build the real Dockerfile and run the image, on a machine with no Docker engine and no registry:
#
#   sudo docker/smoke.sh          # or: make docker-smoke
#
# What it does, printing each command:
#   1. installs podman, buildah, runc, debootstrap and curl from Debian when they are missing;
#   2. makes the Dockerfile's base image locally: debootstrap --variant=minbase of the same Debian release, with
#      python3, python3-venv and ca-certificates, imported with podman and tagged with the name in FROM, then
#      checks that it gives what the Dockerfile uses (the same Python minor version, venv, tomllib, useradd...);
#   3. builds the Dockerfile with --pull=never and --isolation=chroot; pip reaches its configured index with this
#      machine's CA bundle, handed in as the build secret pip_ca (never stored in the image), and torch is a CPU
#      wheel from this machine (SMOKE_TORCH_WHEEL, or the newest in SMOKE_WHEEL_DIR), bind-mounted into the
#      build and named by the TORCH_SPEC build argument;
#   4. runs the image with runc and explicit ulimits, waits for /health and /ready, streams one completion with
#      curl -N, checks the container's user is not root and that the image's HEALTHCHECK passes, then stops
#      it with SIGTERM and checks it drained and exited 0;
#   5. removes the container. The images stay, so a second run reuses the base and the build cache.
#
# Too heavy for CI (a Debian bootstrap, torch): it is not part of `make test`. Runs as root (rootful podman,
# debootstrap). Knobs: SMOKE_TORCH_WHEEL (a CPU torch wheel for the base's Python) or SMOKE_WHEEL_DIR (a folder
# holding one; neither has a default), SMOKE_CA_BUNDLE, SMOKE_PORT, SMOKE_NETWORK (publish | host),
# SMOKE_STORAGE_DRIVER (e.g. vfs where overlay is refused), SMOKE_REBUILD_BASE=1, SMOKE_KEEP=1 (keep the
# container), SMOKE_CLEAN=1 (also remove the images and the bootstrap), SMOKE_DIR (work folder outside the build
# context, default /var/tmp/windowlm-smoke), SMOKE_MIRROR (a Debian mirror; unset: debootstrap's own default),
# SMOKE_INDEX_URL (the build's TORCH_INDEX_URL; unset: pip's configured index), SMOKE_HEALTH_TIMEOUT (seconds).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

image="${SMOKE_IMAGE:-localhost/windowlm:smoke}"
container="${SMOKE_CONTAINER:-windowlm-smoke}"
work="${SMOKE_DIR:-/var/tmp/windowlm-smoke}"
mirror="${SMOKE_MIRROR:-}"       # empty: debootstrap's own default mirror
ca_bundle="${SMOKE_CA_BUNDLE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}"
index_url="${SMOKE_INDEX_URL:-}" # empty: pip's configured index
health_timeout="${SMOKE_HEALTH_TIMEOUT:-300}"
network="${SMOKE_NETWORK:-publish}"

# runc, not crun: crun fails on some hosts' cgroups. Explicit ulimits: some hosts refuse podman's defaults.
podman=(podman --runtime runc)
if [ -n "${SMOKE_STORAGE_DRIVER:-}" ]; then
    podman+=(--storage-driver "$SMOKE_STORAGE_DRIVER")
fi
ulimits=(--ulimit nofile=20000:20000 --ulimit nproc=1024:1024)

started=$SECONDS
step() { printf '\n==> %s\n' "$*"; }
run() {
    printf '+ %s\n' "$*" >&2
    "$@"
}
die() {
    printf '\nsmoke: FAILED: %s\n' "$*" >&2
    exit 1
}

cleanup() {
    if [ "${SMOKE_KEEP:-0}" = 1 ]; then
        echo "smoke: keeping the container $container (SMOKE_KEEP=1)"
        return
    fi
    "${podman[@]}" rm --force "$container" >/dev/null 2>&1 || true
    if [ "${SMOKE_CLEAN:-0}" = 1 ]; then
        "${podman[@]}" rmi --force "$image" "${base_refs[@]}" >/dev/null 2>&1 || true
        rm -rf "$work"
    fi
}
base_refs=()
trap cleanup EXIT

container_logs() {
    echo "--- podman logs $container (last 40 lines) ---" >&2
    "${podman[@]}" logs --tail 40 "$container" >&2 || true
}

# --- 0. what is needed ------------------------------------------------------------------------------------------
step "checking the machine and the repository"
[ "$(id -u)" = 0 ] || die "run as root: rootful podman and debootstrap need it"
for file in config.json model.safetensors; do
    [ -f "weights/default/$file" ] || die "weights/default/$file is missing: the image bundles the default model; make it with weights/build_default.sh"
done
[ -f "$ca_bundle" ] || die "no CA bundle at $ca_bundle (set SMOKE_CA_BUNDLE)"
run mkdir -p "$work"
echo "repository: $root"
echo "CA bundle for pip (build secret pip_ca): $ca_bundle"

missing=()
for tool in podman buildah runc debootstrap curl; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    step "installing ${missing[*]} from Debian"
    run apt-get update
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y podman buildah runc debootstrap curl
fi
run podman --version
run runc --version

# --- 1. the base image ------------------------------------------------------------------------------------------
from="$(awk 'toupper($1) == "FROM" { print $2; exit }' Dockerfile)"
if [[ ! "$from" =~ ^python:([0-9]+)\.([0-9]+)(\.[0-9]+)?-slim-([a-z]+)$ ]]; then
    die "the Dockerfile's FROM is '$from'; this script stands in only for python:X.Y[.Z]-slim-<debian release>"
fi
want_python="${BASH_REMATCH[1]}.${BASH_REMATCH[2]}"
suite="${BASH_REMATCH[4]}"
base="docker.io/library/$from"
# FROM's short name is looked up in local storage under localhost/ or docker.io/library/ depending on
# registries.conf: tag both.
base_refs=("$base" "localhost/$from")
step "base image $from: stand-in from debootstrap $suite (the Dockerfile expects Python $want_python)"

if "${podman[@]}" image exists "$base" && [ "${SMOKE_REBUILD_BASE:-0}" != 1 ]; then
    echo "$base is already in local storage (SMOKE_REBUILD_BASE=1 makes it again)"
else
    rootfs="$work/rootfs-$suite"
    if [ ! -f "$work/rootfs-$suite.done" ] || [ "${SMOKE_REBUILD_BASE:-0}" = 1 ]; then
        run rm -rf "$rootfs" "$work/rootfs-$suite.done"
        run debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$suite" "$rootfs" ${mirror:+"$mirror"}
        run rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        touch "$work/rootfs-$suite.done"
    else
        echo "reusing the bootstrap in $rootfs"
    fi
    run tar --numeric-owner -C "$rootfs" -cf "$work/rootfs-$suite.tar" .
    run "${podman[@]}" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        "$work/rootfs-$suite.tar" "$base"
    run rm -f "$work/rootfs-$suite.tar"
fi
run "${podman[@]}" tag "$base" "localhost/$from"

# The stand-in must give what the Dockerfile's RUN steps use, where they use it.
check_base='
import shutil, subprocess, sys, tempfile
import ensurepip, tomllib, venv  # noqa: F401 - the Dockerfile uses venv and tomllib
got = "%d.%d" % sys.version_info[:2]
assert got == sys.argv[1], f"python3 is {got}, the Dockerfile expects {sys.argv[1]}"
for command in ("python3", "groupadd", "useradd", "mkdir", "rm", "sleep", "id"):
    assert shutil.which(command), f"no {command} on PATH"
with tempfile.TemporaryDirectory() as folder:
    subprocess.run([sys.executable, "-m", "venv", folder + "/venv"], check=True)
    subprocess.run([folder + "/venv/bin/python", "-m", "pip", "--version"], check=True)
print(f"python3 {sys.version.split()[0]} with venv, pip and tomllib; groupadd, useradd, sleep, id are there")
'
run "${podman[@]}" run --rm --pull=never --network none "${ulimits[@]}" "$base" python3 -c "$check_base" "$want_python" ||
    die "the stand-in base does not give what the Dockerfile uses"

# --- 2. the build -----------------------------------------------------------------------------------------------
python_tag="cp${want_python/./}"
wheel="${SMOKE_TORCH_WHEEL:-}"
wheel_folder="${SMOKE_WHEEL_DIR:-}"
if [ -z "$wheel" ] && [ -n "$wheel_folder" ]; then
    wheel="$(find "$wheel_folder" -maxdepth 1 -name "torch-*+cpu-$python_tag-$python_tag-*x86_64.whl" 2>/dev/null |
        sort -V | tail -n 1 || true)"
fi
[ -n "$wheel" ] && [ -f "$wheel" ] ||
    die "no CPU torch wheel for $python_tag: set SMOKE_TORCH_WHEEL=/path/to/torch-...+cpu-$python_tag-...whl, or SMOKE_WHEEL_DIR to a folder holding one"
wheel_dir="$(cd "$(dirname "$wheel")" && pwd)"
step "building $image from the Dockerfile (torch: $(basename "$wheel"))"
run "${podman[@]}" build \
    --pull=never \
    --isolation=chroot \
    --format docker \
    --secret "id=pip_ca,src=$ca_bundle" \
    --volume "$wheel_dir:/wheels:ro" \
    --build-arg "TORCH_SPEC=/wheels/$(basename "$wheel")" \
    ${index_url:+--build-arg "TORCH_INDEX_URL=$index_url"} \
    --tag "$image" \
    --file Dockerfile \
    .

step "checking the image's configuration"
"${podman[@]}" image inspect "$image" | python3 -c '
import json, sys
image = json.load(sys.stdin)[0]
config = image.get("Config", {})
env = config.get("Env") or []
for key in ("User", "ExposedPorts", "StopSignal", "Entrypoint", "Cmd"):
    print(f"{key}: {config.get(key)}")
healthcheck = image.get("Healthcheck") or image.get("HealthCheck") or config.get("Healthcheck")
print("Healthcheck:", healthcheck)
print("Env:", *[e for e in env if e.startswith(("WINDOWLM_", "PATH="))], sep="\n  ")
assert not any(e.startswith("PIP_CERT=") for e in env), "PIP_CERT is baked into the image"
assert config.get("User") not in (None, "", "0", "root", "0:0"), "the image runs as root"
assert "8000/tcp" in (config.get("ExposedPorts") or {}), "port 8000 is not exposed"
assert healthcheck, "the HEALTHCHECK was lost (build with --format docker)"
' || die "the image's configuration is wrong"
# shellcheck disable=SC2016 # the variable is expanded by the container's shell, not here
run "${podman[@]}" run --rm --pull=never --network none "${ulimits[@]}" --entrypoint /bin/sh "$image" \
    -c 'test ! -e /run/secrets/pip_ca && test -z "${PIP_CERT:-}" && echo "no CA secret and no PIP_CERT in the image"' ||
    die "the build secret is in the image"

# --- 3. run it --------------------------------------------------------------------------------------------------
port="${SMOKE_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
url="http://127.0.0.1:$port"
step "running $container on $url"
"${podman[@]}" rm --force "$container" >/dev/null 2>&1 || true
run_args=(run --detach --name "$container" "${ulimits[@]}")
if [ "$network" = publish ]; then
    if ! run "${podman[@]}" "${run_args[@]}" --publish "127.0.0.1:$port:8000" "$image"; then
        echo "publishing the port failed; trying the host's network instead (SMOKE_NETWORK=host)"
        "${podman[@]}" rm --force "$container" >/dev/null 2>&1 || true
        network=host
    fi
fi
if [ "$network" = host ]; then
    run "${podman[@]}" "${run_args[@]}" --network host \
        --env WINDOWLM_HOST=127.0.0.1 --env "WINDOWLM_PORT=$port" "$image"
fi

wait_for() { # wait_for PATH: until it answers 200, while the container runs
    local path="$1" deadline=$((SECONDS + health_timeout)) state
    printf 'waiting for %s%s ' "$url" "$path"
    until curl -fsS --max-time 5 "$url$path" >/dev/null 2>&1; do
        state="$("${podman[@]}" inspect --format '{{.State.Status}}' "$container" 2>/dev/null || echo gone)"
        if [ "$state" != running ]; then
            echo
            container_logs
            die "the container is $state before $path answered"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo
            container_logs
            die "$path did not answer within $health_timeout s"
        fi
        printf '.'
        sleep 2
    done
    echo " ok ($(curl -fsS --max-time 5 "$url$path"))"
}
wait_for /health
wait_for /ready

model="$(curl -fsS --max-time 10 "$url/v1/models" | python3 -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])')"
echo "served model: $model"

step "one streamed completion (curl -N)"
body="$(printf '{"model": "%s", "prompt": "ROMEO:", "max_tokens": 64, "temperature": 0.8, "seed": 0, "stream": true}' "$model")"
run curl -N -sS --fail --max-time 120 "$url/v1/completions" -H 'Content-Type: application/json' -d "$body" |
    tee "$work/stream.txt"
grep -q '^data: {' "$work/stream.txt" || die "the stream had no data events"
grep -q '^data: \[DONE\]' "$work/stream.txt" || die "the stream did not end with data: [DONE]"
printf '\ntext: %s\n' "$(python3 -c '
import json, sys
pieces = []
for line in open(sys.argv[1]):
    if line.startswith("data: {"):
        pieces += [choice["text"] for choice in json.loads(line[6:]).get("choices", [])]
print(repr("ROMEO:" + "".join(pieces)))
' "$work/stream.txt")"

step "the container's user"
run "${podman[@]}" exec "$container" id
uid="$("${podman[@]}" exec "$container" id -u)"
[ "$uid" != 0 ] || die "the container runs as root"
echo "uid $uid: not root"

step "the image's HEALTHCHECK"
run "${podman[@]}" healthcheck run "$container" || die "the HEALTHCHECK failed"
echo "healthy"

step "SIGTERM: drain and exit"
run "${podman[@]}" stop --time 45 "$container"
code="$("${podman[@]}" inspect --format '{{.State.ExitCode}}' "$container")"
"${podman[@]}" logs --tail 5 "$container" || true
[ "$code" = 0 ] || die "the server exited with $code after SIGTERM, not 0"
echo "exit code 0"

printf '\nsmoke: PASSED in %d s (image %s, base stand-in %s)\n' "$((SECONDS - started))" "$image" "$base"
