#!/usr/bin/env bash
# Runs the criterion `contention` group at several thread counts and prints a table of
# throughput (million checks per second, criterion's middle estimate) and scaling against one
# thread, for ratewarden and governor.
#
#   scripts/contention_curve.sh                  # builds the bench, threads 1,2,4,8,16
#   THREADS=1,2 scripts/contention_curve.sh      # other thread counts
#   BENCH=path/to/bench-binary scripts/contention_curve.sh   # a binary built elsewhere
#                                                # (`cargo bench --bench ratewarden --no-run`)
# Raw criterion lines go to ${LOG:-contention.log}; the table goes to stdout.
set -euo pipefail
THREADS=${THREADS:-1,2,4,8,16}
LOG=${LOG:-contention.log}
if [ -z "${BENCH:-}" ]; then
    BENCH=$(cargo bench --bench ratewarden --no-run --message-format=json 2>/dev/null |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
fi
RATEWARDEN_BENCH_THREADS=$THREADS "$BENCH" --bench '^contention/' --noplot 2>&1 |
    grep -E '^contention/|thrpt:' >"$LOG"
# A result is a name line followed by its thrpt line: [low mid high] with units.
awk '
/^contention\// { split($1, p, "/"); key = p[2] "/" p[3]; t = p[4]; next }
/thrpt:/ {
    v = $4; u = $5
    if (u ~ /^Kelem/) v /= 1000; else if (u ~ /^Gelem/) v *= 1000; else if (u ~ /^elem/) v /= 1e6
    m[key, t] = v; if (!(t in seen)) { seen[t] = 1; ts[++n] = t }
}
END {
    split("ratewarden/shared_key governor/shared_key ratewarden/distinct_keys governor/distinct_keys", ks, " ")
    printf "| threads |"; for (i = 1; i <= 4; i++) printf " %s M/s (x1) |", ks[i]; printf "\n"
    printf "| ---: |"; for (i = 1; i <= 4; i++) printf " ---: |"; printf "\n"
    for (j = 1; j <= n; j++) {
        t = ts[j]; printf "| %s |", t
        for (i = 1; i <= 4; i++) {
            k = ks[i]; b = m[k, ts[1]]
            if ((k, t) in m) printf " %.2f (%.2fx) |", m[k, t], (b > 0 ? m[k, t] / b : 0)
            else printf " - |"
        }
        printf "\n"
    }
}' "$LOG"
