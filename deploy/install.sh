#!/bin/sh
# The image's install steps, in one place: the Dockerfile's RUN lines call this script, and
# tests/integration/test_deploy.py runs the same lines in clean venvs (Docker has no engine
# there). PYTHON picks the interpreter (default python3).
#
#   deploy/install.sh build WHEELS     build stage, from the source tree: the pinned build
#                                      tools (requirements-build.lock), then the nexus-fast
#                                      wheel with its Cython hot paths compiled (no compiler
#                                      fails here), into WHEELS with requirements.lock
#   deploy/install.sh runtime WHEELS   runtime stage: exactly the locked wheels, each checked
#                                      against its sha256, then nexus-fast from WHEELS; fails
#                                      unless every compiled hot path imports
set -eu
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
pip() { "$PYTHON" -m pip "$@"; }
[ $# -eq 2 ] || { echo "usage: $0 build|runtime WHEELS" >&2; exit 2; }
wheels=$2

case $1 in
build)
    src=$(cd "$(dirname "$0")/.." && pwd)
    pip install --require-hashes -r "$src/requirements-build.lock"
    mkdir -p "$wheels"
    # No build isolation: the build uses the pinned tools just installed, nothing unpinned.
    pip wheel --no-deps --no-build-isolation --wheel-dir "$wheels" "$src"
    cp "$src/requirements.lock" "$wheels/"
    ;;
runtime)
    # Wheels only: what PyPI published for this platform, the hashes the lock records.
    pip install --require-hashes --only-binary=:all: -r "$wheels/requirements.lock"
    pip install --no-index --no-deps "$wheels"/nexus_fast-*.whl
    pip check
    NEXUS_REQUIRE_EXTENSIONS=1 "$PYTHON" -c 'import nexus_fast; print("hot paths:", nexus_fast.implementation())'
    ;;
*)
    echo "usage: $0 build|runtime WHEELS" >&2
    exit 2
    ;;
esac
