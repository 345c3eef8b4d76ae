#!/usr/bin/env bash
# Kill-and-resume check of `icon2-lens run` (not a ratio benchmark: a correctness check on the real model).
# Copies a finished run directory, deletes its generate stage, starts the pipeline up to generate,
# SIGKILLs it in the middle of the second batch of pairs, reruns it, and compares the rows with the
# uninterrupted run: rows before the kill, rows after resume, duplicates, lost, identical or not.
#   bash benchmarks/kill_resume.sh [FINISHED_RUN_DIR (default runs/icon2)] [SCRATCH_DIR (default runs/killtest)]
set -u
src=${1:-runs/icon2}
dst=${2:-runs/killtest}
[ -f "$src/generate/pairs.jsonl" ] || { echo "$src has no finished generate stage; run 'icon2-lens run --out $src' first" >&2; exit 2; }
rm -rf "$dst" && cp -r "$src" "$dst" && rm -rf "$dst/generate"
icon2-lens run --out "$dst" --stop-after generate --no-progress > "$dst.kill.log" 2>&1 &
pid=$!
f=$dst/generate/pairs.jsonl
batch=$(python -c "import yaml;print(yaml.safe_load(open('$dst/config.yaml'))['generate']['batch_size'])")
while [ ! -f "$f" ] || [ "$(wc -l < "$f")" -lt "$batch" ]; do sleep 0.5; done
sleep 8  # into the second batch
kill -9 $pid
wait $pid 2>/dev/null
status=$(python -c "import json;print(json.load(open('$dst/manifest.json'))['stages']['generate']['status'])")
echo "rows on disk at the kill: $(wc -l < "$f"); manifest status: $status"
icon2-lens run --out "$dst" --stop-after generate --no-progress > "$dst.resume.log" 2>&1
echo "rerun exit code: $?"
tr '\r' '\n' < "$dst.resume.log" | grep -a "^\[.*generate"
python - "$f" "$src/generate/pairs.jsonl" <<'PY'
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1])]
ref = [json.loads(x) for x in open(sys.argv[2])]
idx = [r["index"] for r in rows]
print(f"rows after resume: {len(rows)}; duplicates: {len(idx) - len(set(idx))}; "
      f"lost: {len(set(range(len(ref))) - set(idx))}; identical to the uninterrupted run: {rows == ref}")
PY
