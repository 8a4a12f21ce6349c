#!/bin/sh
# Regenerates requirements.lock (what the image runs) and requirements-build.lock (what its
# build stage compiles with) from pyproject.toml, at the versions installed in .venv (the
# versions `make test` just passed with), with the sha256 of every file PyPI has for each.
#   deploy/lock.sh             (needs .venv from `make install`; fetches pip-tools once)
set -eu
cd "$(dirname "$0")/.."
tools=${LOCK_TOOLS_VENV:-.venv-lock}
[ -x "$tools/bin/pip-compile" ] || {
    python3 -m venv "$tools"
    "$tools/bin/pip" install --quiet "pip-tools>=7.4"
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/python -m pip freeze --exclude-editable > "$work/venv.txt"
.venv/bin/python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))' > "$work/build.in"
compile() {
    CUSTOM_COMPILE_COMMAND="deploy/lock.sh" "$tools/bin/pip-compile" --quiet --generate-hashes \
        --strip-extras --no-emit-index-url --no-emit-find-links --constraint "$work/venv.txt" "$@"
}
compile --output-file requirements.lock pyproject.toml
compile --allow-unsafe --output-file requirements-build.lock "$work/build.in"
