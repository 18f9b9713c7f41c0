#!/usr/bin/env bash
# Runs every fuzz target (or those named) for SECONDS each, one after another, and prints each
# target's executions, coverage and corpus size. Not part of CI (too slow); see fuzz/README.md.
#   fuzz/run.sh 1800                 # every target, 30 minutes each
#   fuzz/run.sh 60 frames http_range # two targets, one minute each
# New inputs go to fuzz/targets/corpus/<target> (ignored by git); the committed seeds in
# fuzz/corpus/<target> are read too. Crashes land in fuzz/targets/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(frames replies http_head http_range signed_url hello_token proxy_opening)
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for t in "${targets[@]}"; do
    mkdir -p "targets/corpus/$t" "targets/artifacts/$t"
    log="targets/artifacts/$t/last-run.log"
    echo "== $t: fuzzing for ${secs}s (log: fuzz/$log)"
    # -s none: no sanitizer, so stable Rust works; Rust's own checks (bounds, overflow in the
    # debug-assertions build cargo-fuzz makes) still turn bugs into crashes.
    status=0
    cargo fuzz run --fuzz-dir targets -s none "$t" "targets/corpus/$t" "corpus/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 \
        -artifact_prefix="targets/artifacts/$t/" >"$log" 2>&1 || status=$?
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    cov=$(grep -oE '#[0-9]+\s+DONE\s+cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[^ ]+' "$log" | tail -1 || true)
    [ -n "$cov" ] || cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[^ ]+' "$log" | tail -1 || echo "?")
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    if [ "$status" -ne 0 ]; then
        echo "   CRASH (exit $status): see fuzz/$log and fuzz/targets/artifacts/$t/"
    fi
    echo "   executions $execs ($rate/s), $cov"
done
