#!/usr/bin/env bash
# Build images/cpu or images/gpu from a clean build context.
#
#   images/build.sh cpu|gpu [--tag REF] [--base IMAGE] [--torch-wheel FILE] [--ca-bundle FILE] [--print-tag]
#                           [-- DOCKER_BUILD_ARGS...]
#
# The context holds only what the Dockerfiles copy (pyproject.toml, README.md, refine_core/, components/,
# pipelines/, images/), taken from the files git knows (tracked or untracked but not ignored), so .venv, runs/ and
# caches never reach the engine. Optional local inputs are staged under images/local/ in the context:
#   --torch-wheel FILE  the torch 2.13.0+cpu cp311 wheel (cpu only); the build then reads no PyTorch index.
#                       Default for cpu: /opt/wheels/torch-2.13.0+cpu-cp311-*.whl when it exists.
#   --ca-bundle FILE    a CA bundle for pip inside the build (a TLS-intercepting proxy); never in the final image.
#   --base IMAGE        passed as --build-arg BASE_IMAGE (e.g. the local base from images/local-base.sh).
# The default tag is the one components/_image.py names: $REFINE_IMAGE_REGISTRY (default: its DEFAULT_REGISTRY)
# /refine-<kind>:$REFINE_IMAGE_TAG (default: the refine-core version in pyproject.toml). Arguments after -- go to docker build (e.g. --network host, --pull).
# Uses the classic builder unless DOCKER_BUILDKIT is set (these machines have no buildx); the Dockerfiles work
# with both.
set -euo pipefail

say() { echo "build: $*" >&2; }
die() { say "$*"; exit 2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
kind="${1:-}"
[[ "$kind" == cpu || "$kind" == gpu ]] || die "usage: $0 cpu|gpu [--tag REF] [--base IMAGE] [--torch-wheel FILE] [--ca-bundle FILE] [--print-tag] [-- DOCKER_BUILD_ARGS...]"
shift

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml" | head -n1)"
[[ -n "$version" ]] || die "no version in pyproject.toml"
# The reference components/_image.py gives the image by default (same variables, same defaults).
registry="$(sed -n 's/^DEFAULT_REGISTRY = "\(.*\)"$/\1/p' "$ROOT/components/_image.py" 2>/dev/null | head -n1 || true)"
registry="${REFINE_IMAGE_REGISTRY:-${registry:-ghcr.io/refine-core}}"
tag="${registry%/}/refine-$kind:${REFINE_IMAGE_TAG:-$version}"
base=""
wheel=""
ca=""
print_tag=0
if [[ "$kind" == cpu ]]; then
    wheel="$(compgen -G '/opt/wheels/torch-2.13.0+cpu-cp311-*.whl' | head -n1 || true)"
fi
extra=()
while (($#)); do
    case "$1" in
        --tag) tag="$2"; shift 2 ;;
        --base) base="$2"; shift 2 ;;
        --torch-wheel) wheel="$2"; shift 2 ;;
        --ca-bundle) ca="$2"; shift 2 ;;
        --print-tag) print_tag=1; shift ;;
        --) shift; extra=("$@"); break ;;
        *) die "unknown argument $1" ;;
    esac
done
if ((print_tag)); then
    echo "$tag"
    exit 0
fi
if [[ -n "$wheel" ]]; then
    [[ "$kind" == cpu ]] || die "--torch-wheel is for the cpu image (the gpu image takes torch's CUDA build from PyPI)"
    [[ -f "$wheel" ]] || die "no such wheel: $wheel"
    [[ "$(basename "$wheel")" == torch-2.13.0+cpu-cp311-* ]] || die "$wheel is not torch 2.13.0+cpu for cp311"
fi
[[ -z "$ca" || -f "$ca" ]] || die "no such CA bundle: $ca"
command -v docker >/dev/null 2>&1 || die "no docker client on PATH"

stage="$(mktemp -d /tmp/refine-build.XXXXXX)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/images/local/wheels"
[[ -n "$wheel" ]] && cp "$wheel" "$stage/images/local/wheels/"
[[ -n "$ca" ]] && cp "$ca" "$stage/images/local/ca-certificates.crt"
# Folders the Dockerfiles copy must exist even while empty (git keeps no empty folder).
mkdir -p "$stage/components" "$stage/pipelines"

cd "$ROOT"
git rev-parse --is-inside-work-tree >/dev/null 2>&1 || die "$ROOT is not a git work tree"
git ls-files -z --cached --others --exclude-standard -- \
    pyproject.toml README.md refine_core components pipelines images \
    | while IFS= read -r -d '' f; do
        # Deleted-but-tracked files and the wheels/CA someone left in images/local are not part of the context.
        [[ -f "$f" && "$f" != images/local/wheels/* && "$f" != images/local/ca-certificates.crt ]] \
            && printf '%s\0' "$f"
    done >"$stage/files"

args=(-f "images/$kind/Dockerfile" -t "$tag" --label "org.opencontainers.image.version=$version")
if revision="$(git rev-parse HEAD 2>/dev/null)"; then
    args+=(--label "org.opencontainers.image.revision=$revision")
fi
[[ -n "$base" ]] && args+=(--build-arg "BASE_IMAGE=$base")
[[ -n "$wheel" ]] && args+=(--build-arg "TORCH_INDEX_URL=")
say "docker build $kind -> $tag${base:+ (base $base)}${wheel:+ (torch from $(basename "$wheel"))}"
# A deterministic tar (sorted, fixed owner and mtime) as the context, read from stdin.
tar --create --file=- --null --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 \
    -C "$ROOT" --files-from="$stage/files" -C "$stage" images/local components pipelines \
    | DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}" docker build "${args[@]}" "${extra[@]}" -
say "built $tag"
