#!/usr/bin/env bash
# Set up (or reuse) the project's virtual environment and install this checkout into it.
#
# The environment lives outside the checkout, keyed by a hash of the dependency lists in
# pyproject.toml, so a second run, a fresh clone or a CI run reuses it in seconds; only a change
# of dependencies builds a new one (2-3 minutes: torch and torchvision come from the registry).
# `.venv` in the checkout is a link to it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
root=${DEBM_ENV_ROOT:-$HOME/.cache/distributed_ebm}
deps_hash=$("$PYTHON" - <<'PY'
import hashlib, json, sys, tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
key = {"deps": project["dependencies"], "extras": project.get("optional-dependencies", {}),
       "python": sys.version_info[:2]}
print(hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12])
PY
)
env_dir="$root/venv-$deps_hash"

if [ ! -f "$env_dir/.complete" ]; then
    echo "[setup] creating environment $env_dir (first time: downloads torch, a few minutes)"
    rm -rf "$env_dir"
    mkdir -p "$root"
    "$PYTHON" -m venv "$env_dir"
    "$env_dir/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
    # Dependencies first (from pyproject.toml), then this checkout without them.
    "$env_dir/bin/python" - <<'PY' > "$env_dir/requirements.txt"
import tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
for req in project["dependencies"] + project["optional-dependencies"]["test"]:
    print(req)
PY
    "$env_dir/bin/python" -m pip install --progress-bar off -r "$env_dir/requirements.txt"
    touch "$env_dir/.complete"
else
    echo "[setup] reusing environment $env_dir"
fi

ln -sfn "$env_dir" .venv

# Install this checkout (editable, no dependencies: seconds) unless it is already the one installed.
installed=$(.venv/bin/python -c 'import distributed_ebm, os; print(os.path.dirname(os.path.dirname(os.path.abspath(distributed_ebm.__file__))))' 2>/dev/null || true)
if [ "$installed" != "$(pwd)" ] || [ ! -x .venv/bin/debm ]; then
    .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
fi
.venv/bin/python -c 'import torch, torchvision, ray, mlflow, webdataset; print(f"[setup] ready: torch {torch.__version__}, torchvision {torchvision.__version__}, ray {ray.__version__}, mlflow {mlflow.__version__}")'
