#!/usr/bin/env bash
# Takes the MLflow UI screenshots kept in docs/ (docs/deploy.md): the training runs of both
# stages, the logged pipeline model with its linked metrics, and the registered model
# "pneumonia". Run it after `make demo`, which writes the mlflow.db and mlartifacts/ it shows:
#     make demo && make screenshots
# It starts the UI with the command of `make mlflow-ui`, on a free loopback port and in its own
# process group (scripts/own-group.sh), finds the experiment and model ids through the UI
# server's REST API (MLflow's python client), takes the pictures with headless Chromium
# (Debian's `chromium`) and, on exit, stops the server's whole process group.
# usage: scripts/mlflow-screenshots.sh [OUTPUT_FOLDER]  (default docs, from the repository root)
# environment: MLFLOW_UI_PORT (default: a free port), CHROMIUM (default: chromium),
#              SCREENSHOT_BUDGET_MS (Chromium's virtual time budget per page, default 40000)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${1:-docs}
py=.venv/bin/python
chromium=${CHROMIUM:-chromium}
budget_ms=${SCREENSHOT_BUDGET_MS:-40000}

[ -f mlflow.db ] || { echo "no $root/mlflow.db: run make demo first" >&2; exit 1; }
command -v "$chromium" >/dev/null ||
    { echo "$chromium not found (Debian: apt-get install chromium)" >&2; exit 1; }
mkdir -p "$out"

port=${MLFLOW_UI_PORT:-$($py -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')}
url=http://127.0.0.1:$port
tmp=$(mktemp -d)
server=""

cleanup() {
    if [ -n "$server" ]; then
        # own-group.sh stops the server's whole group (mlflow, its gunicorn/uvicorn workers and
        # huey consumers) on SIGTERM, then exits.
        kill -TERM "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The command of `make mlflow-ui`, on $port.
scripts/own-group.sh .venv/bin/mlflow ui --backend-store-uri "sqlite:///$root/mlflow.db" \
    --default-artifact-root "$root/mlartifacts" --host 127.0.0.1 --port "$port" \
    >"$tmp/server.log" 2>&1 &
server=$!

echo "MLflow UI on $url"
for _ in $(seq 1 240); do
    curl -sf -o /dev/null "$url/health" && break
    if ! kill -0 "$server" 2>/dev/null; then
        cat "$tmp/server.log" >&2
        echo "the MLflow UI exited before answering" >&2
        exit 1
    fi
    sleep 0.5
done
curl -sf -o /dev/null "$url/health" || {
    cat "$tmp/server.log" >&2
    echo "the MLflow UI did not answer on $url within 2 minutes" >&2
    exit 1
}

# The pages to take, one "NAME MARKER URL" a line (MARKER: a string the page's DOM holds once the
# part that loads last is drawn): the training experiments are named after the stages
# (conf/stage/*.yaml), the logged model is the one behind models:/pneumonia@champion.
$py - "$url" conf/stage/*.yaml >"$tmp/pages" <<'EOF'
import json
import sys
from pathlib import Path
from urllib.parse import quote

from mlflow import MlflowClient

url, stage_files = sys.argv[1], sys.argv[2:]
client = MlflowClient(tracking_uri=url)
stages = [client.get_experiment_by_name(Path(f).stem) for f in stage_files]
train_ids = sorted(e.experiment_id for e in stages if e is not None)
if not train_ids:
    sys.exit("no training experiment (binary, subtype): run make demo first")
version = client.get_model_version_by_alias("pneumonia", "champion")
# The version names its logged model in model_id or, registered from models:/<model id>, only in
# its source.
model_id = version.model_id or version.source.removeprefix("models:/")
model = client.get_logged_model(model_id)
# Both stages' runs side by side, in the chart view (their metrics; the table view shows no
# metric column until one is chosen).
if len(train_ids) == 1:
    runs = f"#/experiments/{train_ids[0]}/runs?compareRunsMode=CHART"
else:
    runs = ("#/compare-experiments/s?experiments=" + quote(json.dumps(train_ids), safe="")
            + "&compareRunsMode=CHART")
print("mlflow-ui-runs", "main-svg", f"{url}/{runs}")  # a plotly chart
metric = model.metrics[0].key if model.metrics else model.source_run_id
print("mlflow-ui-model", metric, f"{url}/#/experiments/{model.experiment_id}/models/{model_id}")
print("mlflow-ui-registry", "champion", f"{url}/#/models/pneumonia")
EOF

# Takes page $3 into $out/$1.png; the React app draws parts of a page late (the charts), so where
# the DOM dumped with the picture lacks the marker $2 it tries again with twice the virtual time.
take() {
    local name=$1 marker=$2 page=$3 budget=$budget_ms attempt
    for attempt in 1 2 3; do
        rm -rf "$out/$name.png" "$tmp/profile"
        # A fresh profile each time: nothing of an earlier page or of the user's browser is reused.
        if timeout 120 "$chromium" --headless --no-sandbox --disable-gpu \
            --disable-background-networking --no-first-run --user-data-dir="$tmp/profile" \
            --hide-scrollbars --window-size=1600,1000 --virtual-time-budget="$budget" \
            --dump-dom --screenshot="$out/$name.png" "$page" \
            </dev/null >"$tmp/dom.html" 2>"$tmp/chromium.log"; then
            if [ -s "$out/$name.png" ] && grep -qF -- "$marker" "$tmp/dom.html"; then
                return 0
            fi
            echo "$name: not drawn after $budget ms of virtual time (attempt $attempt)" >&2
        else
            # It hangs now and then (seen with virtual time budgets under a second).
            tail -5 "$tmp/chromium.log" >&2
            echo "$name: chromium failed or hung with $budget ms (attempt $attempt)" >&2
        fi
        budget=$((budget * 2))
    done
    echo "$name: the page did not finish drawing: $page" >&2
    return 1
}

while read -r name marker page; do
    echo "$name: $page"
    take "$name" "$marker" "$page" || exit 1
    if command -v optipng >/dev/null; then optipng -quiet -o2 "$out/$name.png"; fi
    ls -l "$out/$name.png"
done <"$tmp/pages"
