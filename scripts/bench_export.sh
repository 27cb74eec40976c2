#!/usr/bin/env bash
# Peak memory of `safeguard export dataset` as the database grows: a SQLite file of N decisions (2 KB of text
# each, every tenth corrected by a person) is exported with model labels, and the peak RSS of a 5x larger
# database is printed as a ratio to the smaller one's, measured in the same run. Memory that stays flat means
# the export streams; one that grows 5x means it holds the database.
# Usage: scripts/bench_export.sh [SMALL] [LARGE]   (default 20000 100000; needs sqlite3 and GNU time)
set -euo pipefail
cd "$(dirname "$0")/.."
small="${1:-20000}"
large="${2:-100000}"
bin="${SAFEGUARD_BIN:-}"
if [ -z "$bin" ]; then
  cargo build --bin safeguard
  bin="${CARGO_TARGET_DIR:-target}/debug/safeguard"
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

fill() {
  local db="$1" n="$2"
  : > "$db"  # prune opens an existing database only
  "$bin" prune --database "sqlite://$db" --older-than-days 1 --dry-run >/dev/null
  sqlite3 "$db" <<SQL
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $n)
INSERT INTO decisions (id, created_at, policy_hashes, policy_names, model_id, effort, sampling, content, verdicts,
                       outcome, timings, prompt_tokens, cached_prompt_tokens, completion_tokens, source)
SELECT printf('d%08d', i), 1700000000000 + i, '["sha256:spam"]', '["spam"]', 'gpt-oss-safeguard-20b', 'low', '"greedy"',
       json_object('kind', 'text', 'text', printf('item %d ', i) || hex(randomblob(1000))),
       json_array(json_object('policy', 'spam', 'policy_hash', 'sha256:spam',
                              'outcome', CASE WHEN i % 7 = 0 THEN 'violation' ELSE 'allow' END, 'rule_ids', json_array())),
       CASE WHEN i % 7 = 0 THEN 'violation' ELSE 'allow' END, '{}', 0, 0, 0, 'api'
FROM n;
INSERT INTO decision_policies (decision_id, policy_hash, policy_name, created_at)
SELECT id, 'sha256:spam', 'spam', created_at FROM decisions;
INSERT INTO reviews (id, decision_id, status, priority, reviewer, rationale, rule_id, created_at, decided_at, kind,
                     outcome, policy_hash)
SELECT 'r' || substr(id, 2), id, 'decided', 1, 'ana', 'checked', 'SP1', created_at, created_at + 5, 'review',
       'violation', 'sha256:spam'
FROM decisions WHERE CAST(substr(id, 2) AS INTEGER) % 10 = 0;
SQL
}

peak_kb() {
  local db="$1"
  /usr/bin/time -f '%M %e' -o "$work/rss" "$bin" export dataset --database "sqlite://$db" --include-model-labels \
    --out "$work/out.jsonl" 2>/dev/null
  cat "$work/rss"
}

for n in "$small" "$large"; do
  fill "$work/$n.db" "$n"
done
read -r small_kb small_s <<< "$(peak_kb "$work/$small.db")"
small_lines="$(wc -l < "$work/out.jsonl")"
read -r large_kb large_s <<< "$(peak_kb "$work/$large.db")"
large_lines="$(wc -l < "$work/out.jsonl")"
db_mb="$(( $(stat -c %s "$work/$large.db") / 1048576 ))"
echo "export of $small decisions: $small_lines examples in ${small_s}s, peak RSS $((small_kb / 1024)) MiB"
echo "export of $large decisions: $large_lines examples in ${large_s}s, peak RSS $((large_kb / 1024)) MiB (database $db_mb MiB)"
awk -v a="$small_kb" -v b="$large_kb" -v s="$small" -v l="$large" \
  'BEGIN { printf "peak RSS ratio (%dx the decisions): %.2fx\n", l / s, b / a }'
