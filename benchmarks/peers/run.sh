#!/usr/bin/env bash
# The peer benchmark: a venv of its own for LitServe and Ray Serve (benchmarks/peers/.venv, which
# reads the project's .venv for torch and diffusers through a .pth file), then run.py.
#   benchmarks/peers/run.sh [run.py flags]
set -euo pipefail
cd "$(dirname "$0")/../.."
make .venv/bin/ddpm >/dev/null
peers=benchmarks/peers/.venv
if [ ! -x "$peers/bin/python" ] || [ benchmarks/peers/requirements.txt -nt "$peers/bin/python" ]; then
  python3 -m venv "$peers"
  .venv/bin/python -c 'import site; print(site.getsitepackages()[0])' > "$peers/lib/python3.11/site-packages/_project.pth"
  "$peers/bin/pip" install --quiet -r benchmarks/peers/requirements.txt
fi
exec .venv/bin/python benchmarks/peers/run.py --peers-python "$peers/bin/python" "$@"
