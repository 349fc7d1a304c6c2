#!/usr/bin/env bash
# `make image-check`: build docker/trainer.Dockerfile for real and run the built image.
#
# Uses Debian's buildah with `--isolation chroot` (no daemon, no cgroup access needed), as root.
# Where no container registry can be reached, the base image is a stand-in for
# python:3.11-slim-bookworm made from Debian's own packages: debootstrap bookworm with Python 3.11,
# venv, pip, ca-certificates, netbase and tzdata, and python/python3/python3.11/pip in
# /usr/local/bin as in the official image (same Debian release, same Python minor). It is built
# once and kept. The real Dockerfile is then built on it (BASE_IMAGE build argument; the machine's
# CA bundle mounted into the build and named by the PIP_CERT build argument, so pip reaches the
# package index through a TLS-intercepting network; neither ends up in the image), and inside the
# built image, as its non-root user: `personcar --help`, TensorFlow's import and CUDA build, and a
# tiny run on the generated sample (sample -> validate -> tfrecords -> train 3 steps + export ->
# evaluate); then the whole DAG on the kubernetes backend with the emulated kubelet running its
# pods in the image (needs `make install`'s .venv). Prints the build time and the image size.
#
# Caches: the stand-in base image and buildah's layer cache (--layers): a second run with an
# unchanged build context reuses every layer. A change under tasks/ or data_checks/ re-runs the
# install step (pip downloads the ~4 GB of wheels again: through this network the package index's
# responses carry no cache headers, so pip's HTTP cache keeps nothing). `buildah rmi IMAGE
# BASE_IMAGE` removes the images; the intermediate layers show in `buildah images --all`.
#
# Settings (environment):
#   PERSONCAR_CHECK_BASE_IMAGE  base image to build on; built from Debian packages when absent
#                               (default localhost/python:3.11-slim-bookworm-debian)
#   PERSONCAR_CHECK_IMAGE       tag of the built trainer image (default localhost/personcar-trainer:image-check)
#   PERSONCAR_CHECK_CA_BUNDLE   CA bundle mounted into the build for pip (default the machine's)
#   PERSONCAR_CHECK_WORK        logs and scratch space (default /var/tmp/personcar-image-check)
#   PERSONCAR_CHECK_NICE        niceness of the build and the in-image run (default 10)
#   PERSONCAR_CHECK_DEBIAN_MIRROR  mirror for debootstrap (default http://deb.debian.org/debian)
#   PERSONCAR_CHECK_NO_CACHE=1  build every layer again (buildah bud --no-cache): a cold build time
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
BASE_IMAGE=${PERSONCAR_CHECK_BASE_IMAGE:-localhost/python:3.11-slim-bookworm-debian}
IMAGE=${PERSONCAR_CHECK_IMAGE:-localhost/personcar-trainer:image-check}
CA_BUNDLE=${PERSONCAR_CHECK_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
WORK=${PERSONCAR_CHECK_WORK:-/var/tmp/personcar-image-check}
NICE=${PERSONCAR_CHECK_NICE:-10}
MIRROR=${PERSONCAR_CHECK_DEBIAN_MIRROR:-http://deb.debian.org/debian}
DOCKERFILE=docker/trainer.Dockerfile

STEP="start"
REASON=""
CONTAINER=""
T0=$(date +%s)

step() { STEP=$1; printf '\n==> %s\n' "$1"; }
fail() { REASON=$*; exit 1; }
log_tail() { [ -f "$1" ] && { echo "--- last lines of $1:"; tail -n "${2:-25}" "$1"; } >&2 || true; }
finish() {
    local rc=$?
    if [ -n "$CONTAINER" ]; then buildah rm "$CONTAINER" >/dev/null 2>&1 || true; fi
    if [ "$rc" -ne 0 ]; then
        printf '\nimage-check: FAILED at step "%s": %s; logs in %s\n' \
            "$STEP" "${REASON:-exit status $rc}" "$WORK" >&2
    fi
}
trap finish EXIT
elapsed() { local s=$(( $(date +%s) - $1 )); printf '%dm%02ds' $((s / 60)) $((s % 60)); }

# ---- 1. tools -----------------------------------------------------------------------------------
step "tools: buildah and debootstrap"
[ "$(id -u)" = 0 ] || fail "run as root: buildah --isolation chroot and apt-get need it"
missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} (apt-get)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >/dev/null \
        || fail "apt-get install ${missing[*]} failed"
fi
[ -r "$CA_BUNDLE" ] || fail "CA bundle $CA_BUNDLE not readable (set PERSONCAR_CHECK_CA_BUNDLE)"
mkdir -p "$WORK"
exec 9>"$WORK/lock"
flock -n 9 || fail "another image check holds $WORK/lock"
buildah --version

# ---- 2. the stand-in base image -----------------------------------------------------------------
step "base image $BASE_IMAGE"
BASE_BUILT="cached"
if buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "using the cached $BASE_IMAGE (buildah rmi it to rebuild)"
else
    t=$(date +%s)
    rootfs="$WORK/rootfs"
    rm -rf "$rootfs"
    echo "debootstrap bookworm (log: $WORK/debootstrap.log)"
    nice -n "$NICE" debootstrap --variant=minbase \
        --include=python3.11,python3.11-venv,python3-venv,python3-pip,ca-certificates,netbase,tzdata \
        bookworm "$rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { log_tail "$WORK/debootstrap.log"; fail "debootstrap failed"; }
    # As in the official image: Python on /usr/local/bin, pip usable without Debian's PEP 668
    # marker, the bookworm, bookworm-updates and bookworm-security suites, no apt lists or caches.
    for name in python3.11 python3 python; do ln -sf /usr/bin/python3.11 "$rootfs/usr/local/bin/$name"; done
    for name in pip3.11 pip3 pip; do ln -sf /usr/bin/pip3 "$rootfs/usr/local/bin/$name"; done
    rm -f "$rootfs"/usr/lib/python3.11/EXTERNALLY-MANAGED "$rootfs/etc/apt/sources.list"
    cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log
    version=$(chroot "$rootfs" /usr/local/bin/python -c 'import platform; print(platform.python_version())') \
        || fail "python in the debootstrapped tree does not run"
    ctr=$(buildah from scratch)
    CONTAINER=$ctr
    mnt=$(buildah mount "$ctr")
    tar -C "$rootfs" --numeric-owner --xattrs -cf - . | tar -C "$mnt" --numeric-owner --xattrs -xpf - \
        || fail "copying the root file system into the image failed"
    buildah umount "$ctr" >/dev/null
    buildah config \
        --env PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 --env PYTHON_VERSION="$version" --cmd python3 \
        --label org.opencontainers.image.description="stand-in for python:3.11-slim-bookworm: Debian bookworm packages, Python $version" \
        "$ctr"
    buildah commit --quiet --rm "$ctr" "$BASE_IMAGE" >/dev/null || fail "buildah commit of the base image failed"
    CONTAINER=""
    rm -rf "$rootfs"
    BASE_BUILT="built in $(elapsed "$t")"
    echo "$BASE_IMAGE: Python $version, $BASE_BUILT"
fi

# ---- 3. the trainer image -----------------------------------------------------------------------
step "build $DOCKERFILE as $IMAGE"
STEP="build $DOCKERFILE"
echo "log: $WORK/build.log"
cache_flags=(--layers)
[ "${PERSONCAR_CHECK_NO_CACHE:-0}" = 1 ] && cache_flags+=(--no-cache)
t_build=$(date +%s)
# --force-rm: a failed step leaves no working container behind (a failed install holds GBs).
nice -n "$NICE" buildah bud --isolation chroot "${cache_flags[@]}" --force-rm --pull=never \
    --file "$DOCKERFILE" --ignorefile "$DOCKERFILE.dockerignore" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --volume "$CA_BUNDLE:$CA_BUNDLE:ro" --build-arg PIP_CERT="$CA_BUNDLE" \
    --tag "$IMAGE" "$REPO" >"$WORK/build.log" 2>&1 \
    || { log_tail "$WORK/build.log" 40; fail "buildah bud failed"; }
BUILD_TIME=$(elapsed "$t_build")
grep -E '^\[[0-9]/[0-9]\] STEP' "$WORK/build.log" | cut -c1-110 || true
echo "$(grep -c -- '--> Using cache' "$WORK/build.log" || true) steps from the layer cache"
SIZE=$(buildah images --noheading --format '{{.Size}}' "$IMAGE" | head -n 1)
ENTRYPOINT=$(buildah inspect --type image --format '{{.OCIv1.Config.Entrypoint}}' "$IMAGE")
USER_CFG=$(buildah inspect --type image --format '{{.OCIv1.Config.User}}' "$IMAGE")
echo "built in $BUILD_TIME; size $SIZE; entrypoint $ENTRYPOINT; user $USER_CFG"
[ "$ENTRYPOINT" = "[personcar]" ] || fail "entrypoint is $ENTRYPOINT, not [personcar]"

# ---- 4. inside the image ------------------------------------------------------------------------
CONTAINER=$(buildah from --pull=never "$IMAGE")
# The image's own user, environment and working directory (buildah run uses the image's USER).
in_image() { nice -n "$NICE" buildah run --isolation chroot --env TF_CPP_MIN_LOG_LEVEL=2 "$CONTAINER" -- "$@"; }
# run NAME LINES PATTERN CMD...: one step in the image, its output in $WORK/NAME.log; shown: the
# last LINES lines that match PATTERN (an extended regex), each cut to 300 characters.
run() {
    local name=$1 lines=$2 pattern=$3
    shift 3
    step "in the image: $*"
    STEP="in the image: $1 ${2:-}"
    in_image "$@" >"$WORK/$name.log" 2>&1 \
        || { local rc=$?; log_tail "$WORK/$name.log" 30; fail "$1 ${2:-} exited with status $rc (log $WORK/$name.log)"; }
    { grep -E -- "$pattern" "$WORK/$name.log" || true; } | tail -n "$lines" | cut -c1-300
}

run id 1 '^' id
# The numeric USER of the image (tests/unit/test_dockerfiles.py ties it to the trainer pods'
# runAsUser): buildah run must start as that user, and it must not be root.
uid=$(in_image id -u)
[ "$uid" = "${USER_CFG%%:*}" ] && [ "$uid" != 0 ] || fail "the image runs as uid $uid (image USER $USER_CFG)"
VENV_SIZE=$(in_image du -sh /opt/venv | cut -f1)
run help 100 '^' personcar --help
run tensorflow 2 '^(tensorflow|GPUs)' python -c "import tensorflow as tf; b = tf.sysconfig.get_build_info(); \
print('tensorflow', tf.__version__, 'built for CUDA', b.get('cuda_version'), 'cuDNN', b.get('cudnn_version')); \
print('GPUs visible here:', tf.config.list_physical_devices('GPU'))"

D=/tmp/personcar-image-check
t_run=$(date +%s)
run sample 1 '^\{' personcar sample --out "$D/sample" --images 8 --seed 0
run validate 1 '^\{' personcar validate --annotations "$D/sample/trainval/annotations/bbox-annotations.json" \
    --images "$D/sample/trainval/images" --out "$D/validate"
run tfrecords 2 'personcar: tfrecords:|^\{' personcar tfrecords --annotations "$D/validate/annotations.clean.json" \
    --images "$D/sample/trainval/images" --out "$D/tfrecords" --val-fraction 0.5 --seed 42
run train 8 'personcar: train:|^\{' personcar train --data "$D/tfrecords" --model-dir "$D/train" --model ssd_resnet26_v1_fpn_256x256_tiny \
    --steps 3 --batch-size 2 --image-size 128 --init-checkpoint scratch --warm-start none \
    --validate-every 0 --log-every 1
run evaluate 2 'personcar: mAP|^\{' personcar evaluate --model-dir "$D/train" --data "$D/tfrecords" --out "$D/evaluate"
RUN_TIME=$(elapsed "$t_run")
buildah rm "$CONTAINER" >/dev/null && CONTAINER=""

# ---- 5. the kubernetes backend with its pods in the image ---------------------------------------
# The whole DAG on the kubernetes backend (tests/e2e/test_dag_run_s3.py) with the emulated
# kubelet running the TFRecords, train and evaluate pods in this image (buildah working
# containers, the pod's user, the machine's network to reach the S3 server), compared with a
# local-backend run of the same sample and seed in the project's environment.
step "the kubernetes-backend DAG run, its pods in $IMAGE"
STEP="the kubernetes-backend DAG run"
[ -x "$REPO/.venv/bin/python" ] || fail "no .venv: run make install first"
t_dag=$(date +%s)
PERSONCAR_KUBELET_IMAGE="$IMAGE" nice -n "$NICE" "$REPO/.venv/bin/python" -m pytest tests/e2e/test_dag_run_s3.py \
    -n 0 -p no:cacheprovider -q -o addopts="" >"$WORK/dag.log" 2>&1 \
    || { log_tail "$WORK/dag.log" 40; fail "the kubernetes-backend DAG run failed (log $WORK/dag.log)"; }
grep -E '(passed|failed)' "$WORK/dag.log" | tail -n 1
DAG_TIME=$(elapsed "$t_dag")

step "summary"
STEP="summary"
cat <<EOF
image-check: OK
  image            $IMAGE ($SIZE, /opt/venv $VENV_SIZE; entrypoint $ENTRYPOINT, user $USER_CFG)
  base image       $BASE_IMAGE ($BASE_BUILT)
  build time       $BUILD_TIME (buildah bud ${cache_flags[*]}, nice $NICE; log $WORK/build.log)
  in-image run     $RUN_TIME (sample, validate, tfrecords, train 3 steps + export, evaluate)
  kubernetes DAG   $DAG_TIME (tests/e2e/test_dag_run_s3.py, the pods in the image; log $WORK/dag.log)
  total            $(elapsed "$T0")
EOF
