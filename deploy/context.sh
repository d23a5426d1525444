#!/usr/bin/env bash
# Assembles the images' build context in $1 (deploy/.build/context): the archives and their manifest,
# the deploy files, and the UI's sources (app/). Nothing else of the checkout goes in: no .venv, no
# weights outside the archives, never the data sets.
set -euo pipefail
out=$(realpath -m "$1")
cd "$(dirname "$0")/.."
rm -rf "$out" && mkdir -p "$out/model_store" "$out/deploy" "$out/app/model_store" "$out/app/training/weights"
ls model_store/*.mar >/dev/null 2>&1 && test -f model_store/manifest.json || { echo "no archives: make archive" >&2; exit 1; }
cp -l model_store/*.mar "$out/model_store/" 2>/dev/null || cp model_store/*.mar "$out/model_store/"
cp model_store/manifest.json "$out/model_store/"
cp -r deploy/requirements-server.txt deploy/requirements-ui.txt deploy/prune-venv.sh deploy/torchserve "$out/deploy/"
# The UI: its pages, the REST client, the prediction log's table, the project's facts (catalog.py:
# class names, paths), the model cards.
tar -c --exclude=__pycache__ --exclude='*.pt' --exclude=grpc_stubs \
    ui serving handlers catalog.py training/weights \
    model_store/models.yaml model_store/manifest.json config.properties | tar -x -C "$out/app"
du -sh "$out" | cut -f1
