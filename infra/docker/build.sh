#!/usr/bin/env bash
# Build and push the image as <registry>/vit-pipeline:<version>-<commit>, from a clean checkout, and write
# that tag into the cluster files (infra/ray/cluster-aws.yaml, infra/kuberay/raycluster.yaml): commit them.
#   REGISTRY=123456789012.dkr.ecr.us-west-2.amazonaws.com infra/docker/build.sh
# A tag is never reused: it names the commit the image was built from, and pushing an existing tag fails
# (ECR repositories created with --image-tag-mutability IMMUTABLE refuse it too).
#   infra/docker/build.sh pin-base   # once, and to take upstream fixes: pin the Dockerfile's base by digest
set -euo pipefail
cd "$(dirname "$0")/../.."
dockerfile=infra/docker/Dockerfile
base="$(sed -n -E 's/^FROM ([^ ]+).*/\1/p' "$dockerfile" | head -n 1)"
if [ "${1:-}" = pin-base ]; then
  # The digest of what the tag names now (the multi-platform index), written into the FROM line.
  tag="${base%@*}"
  docker pull --quiet "$tag" >/dev/null
  digest="$(docker image inspect --format '{{index .RepoDigests 0}}' "$tag" | sed -n -E 's/.*@(sha256:[0-9a-f]{64})$/\1/p')"
  [ -n "$digest" ] || { echo "build.sh: no digest for $tag" >&2; exit 1; }
  sed -i -E "s#^FROM [^ ]+#FROM $tag@$digest#" "$dockerfile"
  echo "$tag@$digest: commit $dockerfile"
  exit 0
fi
if [[ "$base" != *@sha256:* ]]; then
  echo "build.sh: the base image $base is not pinned by digest; run infra/docker/build.sh pin-base and commit" >&2
  exit 1
fi
: "${REGISTRY:?set REGISTRY, e.g. 123456789012.dkr.ecr.us-west-2.amazonaws.com}"
if [ -n "$(git status --porcelain)" ]; then
  echo "build.sh: uncommitted changes; the tag must name the commit the image holds" >&2
  exit 1
fi
version="$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
commit="$(git rev-parse HEAD)"
image="$REGISTRY/vit-pipeline:$version-${commit:0:12}"
if docker manifest inspect "$image" >/dev/null 2>&1; then
  echo "build.sh: $image exists already; tags are never reused" >&2
  exit 1
fi
docker build -f infra/docker/Dockerfile --build-arg VIT_PIPELINE_VERSION="$version" \
  --build-arg VIT_PIPELINE_COMMIT="$commit" -t "$image" .
docker push "$image"
sed -i -E "s#(image: )[^ ]+/vit-pipeline:[^ ]+#\1$image#" infra/ray/cluster-aws.yaml infra/kuberay/raycluster.yaml
echo "$image"
