#!/bin/sh
# The image's install steps, in one place: the Dockerfile's RUN lines call this script, and
# tests/integration/test_deploy.py runs the same lines in clean venvs (Docker has no engine
# there). PYTHON picks the interpreter (default python3).
#
#   deploy/install.sh build WHEELS   build stage, from the source tree: the pinned build tools
#                                    (requirements-build.lock), then the nexus-fast wheel with
#                                    its Cython hot paths compiled (no compiler fails here)
#   deploy/install.sh deps LOCK      runtime stage: exactly the wheels requirements.lock names,
#                                    each checked against its sha256 (needs no build output,
#                                    so BuildKit runs it while the build stage compiles)
#   deploy/install.sh app WHEELS     runtime stage: nexus-fast from WHEELS, no index, no new
#                                    dependency; fails unless every compiled hot path imports
set -eu
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
pip() { "$PYTHON" -m pip "$@"; }
usage="usage: $0 build WHEELS | deps LOCK | app WHEELS"
[ $# -eq 2 ] || { echo "$usage" >&2; exit 2; }

case $1 in
build)
    src=$(cd "$(dirname "$0")/.." && pwd)
    pip install --require-hashes -r "$src/requirements-build.lock"
    mkdir -p "$2"
    # No build isolation: the build uses the pinned tools just installed, nothing unpinned.
    pip wheel --no-deps --no-build-isolation --wheel-dir "$2" "$src"
    ;;
deps)
    # Wheels only: what PyPI published for this platform, with the hashes the lock records.
    pip install --require-hashes --only-binary=:all: -r "$2"
    ;;
app)
    pip install --no-index --no-deps "$2"/nexus_fast-*.whl
    pip check  # every dependency nexus-fast declares came from the lock
    NEXUS_REQUIRE_EXTENSIONS=1 "$PYTHON" -c 'import nexus_fast; print("hot paths:", nexus_fast.implementation())'
    ;;
*)
    echo "$usage" >&2
    exit 2
    ;;
esac
