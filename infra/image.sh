#!/usr/bin/env bash
# Build, push and pin the isa image: every build gets a tag of its own, and the manifests name that exact build.
# Run from the repository root.
#
#   infra/image.sh tag                 print this checkout's tag: VERSION-COMMIT (12 hex digits of HEAD)
#   infra/image.sh build REGISTRY      docker build + push REGISTRY/isa:TAG, then pin the manifests to its digest
#   infra/image.sh pin REFERENCE       write REFERENCE into every `image:` field of infra/kuberay/*.yaml
#
# The stage configs (infra/configs/) are baked into the image, and the pods pull with IfNotPresent: a tag used
# for two builds leaves each node with whichever build it pulled first. So a tag names one commit, `build`
# refuses a checkout with uncommitted changes in what the image holds, and `pin` refuses a reference whose tag
# is the bare version (the tag a rebuild would reuse) or that names no registry.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE_PATHS=(Dockerfile pyproject.toml README.md isa pipelines tune infra) # what the Dockerfile copies in
MANIFESTS=("$ROOT"/infra/kuberay/*.yaml)

fail() { # fail MESSAGE
  echo "image.sh: error: $1" >&2
  exit 2
}

version() {
  sed -n 's/^version = "\([^"]*\)"$/\1/p' "$ROOT/pyproject.toml" | head -n 1
}

tag() { # VERSION-COMMIT of a checkout whose image paths are committed
  local changed
  git -C "$ROOT" rev-parse --verify -q HEAD >/dev/null 2>&1 || fail "$ROOT is not a git checkout with a commit"
  changed="$(git -C "$ROOT" status --porcelain -- "${IMAGE_PATHS[@]}")"
  if [ -n "$changed" ]; then
    fail "uncommitted changes in what the image holds (commit them first, so the tag names them):
$changed"
  fi
  echo "$(version)-$(git -C "$ROOT" rev-parse --short=12 HEAD)"
}

check_reference() { # REFERENCE: REGISTRY/.../isa:TAG[@sha256:DIGEST], TAG not the bare version
  local reference="$1" name tag_part
  name="${reference%%@*}"
  case "$name" in
    */*) ;;
    *) fail "$reference names no registry: give REGISTRY/isa:TAG (e.g. <account>.dkr.ecr.<region>.amazonaws.com/isa:TAG)" ;;
  esac
  [[ "${name##*/}" == isa:* ]] || fail "$reference is not an isa image (REGISTRY/isa:TAG)"
  tag_part="${name##*:}"
  [[ "$tag_part" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || fail "$reference: '$tag_part' is not a valid image tag"
  if [[ "$reference" != *@sha256:* && "$tag_part" == "$(version)" ]]; then
    fail "$reference reuses the tag $(version) for every build: tag each build ($0 tag) or pin a digest (@sha256:...)"
  fi
  if [[ "$reference" == *@* && ! "$reference" =~ @sha256:[0-9a-f]{64}$ ]]; then
    fail "$reference: a digest is @sha256: and 64 hex digits"
  fi
}

pin() { # REFERENCE
  local reference="$1" file
  check_reference "$reference"
  for file in "${MANIFESTS[@]}"; do
    # only the value of `image:` keys: comments and layout stay as they are
    sed -i -E "s|^([[:space:]]*(- )?image:[[:space:]]*)[^[:space:]#]+|\1${reference}|" "$file"
  done
  echo "pinned: $reference in ${#MANIFESTS[@]} manifests under infra/kuberay/"
}

build() { # REGISTRY
  local registry="${1%/}" reference digest
  [ -n "$registry" ] || fail "give the registry your nodes pull from: $0 build REGISTRY"
  command -v docker >/dev/null || fail "docker is not installed"
  reference="$registry/isa:$(tag)"
  docker build -t "$reference" "$ROOT"
  docker push "$reference"
  digest="$(docker inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "$reference" |
    sed -n "s#^${registry}/isa@\(sha256:[0-9a-f]\{64\}\)\$#\1#p" | head -n 1)"
  [ -n "$digest" ] || fail "docker reported no digest for $reference after the push"
  pin "$reference@$digest"
}

case "${1:-}" in
  tag) tag ;;
  build) build "${2:-}" ;;
  pin) [ -n "${2:-}" ] || fail "give the image reference: $0 pin REGISTRY/isa:TAG[@sha256:DIGEST]"; pin "$2" ;;
  *)
    echo "usage: $0 tag | build REGISTRY | pin REGISTRY/isa:TAG[@sha256:DIGEST]" >&2
    exit 2
    ;;
esac
