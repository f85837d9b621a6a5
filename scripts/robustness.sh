#!/usr/bin/env bash
# How detection moves away from the simulator's defaults: each variant of the public mix
# (60 simulated minutes) is simulated, replayed with the `llm_api` preset with and without the
# behavioural layer, and evaluated, for seeds 1-3. Prints one summary line per run.
#
#   bash scripts/robustness.sh            # all variants, seeds 1 2 3
#   SEEDS="1" bash scripts/robustness.sh  # one seed
#   PROBES=1 bash scripts/robustness.sh   # the probes below instead (needs python3)
#   MATCH=rotated PROBES=1 bash scripts/robustness.sh   # only the runs whose name has "rotated"
#
# A variant is "name|simulate flags", or "name|simulate flags|reshape.py flags" for a probe
# whose trace is reshaped after simulation (attack shapes the simulator does not generate).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --example simulate --example replay --example evaluate
bin=target/release/examples
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Attack scenarios' default rates (requests/min per actor), read from `simulate --list`,
# each multiplied by a factor: "E1=60,E2=20,..." for 0.5.
rates() { # factor
    "$bin/simulate" --list | awk -v f="$1" '$2 == "attack" {
        out = out (out == "" ? "" : ",") $1 "=" $5 * f } END { print out }'
}

variants=(
    "default|"
    "attacks at half rate|--rate $(rates 0.5)"
    "attacks at a quarter rate|--rate $(rates 0.25)"
    "attacks at double rate|--rate $(rates 2)"
    "benign actors doubled|--actors B1=4000,B2=12,B3=80,B4=1200,B5=12"
    "all actors doubled|--scale 2"
    "E4 at 1 request/min|--rate E4=1"
    "E4 with 400 actors|--actors E4=400"
    # Benign stress: more of the hard negatives, and benign actors closer to their limits.
    "batch classifiers x5|--actors B2=30"
    "20 batch classifiers, 1 org|--actors B2=20 --groups B2=1"
    "enterprise keys x3|--actors B3=120"
    "enterprise keys at 55/min|--rate B3=55"
    "CI bots x10|--actors B5=60"
    "NAT accounts x3|--actors B4=1800"
)
probes=(
    # More enterprise keys: one org's heaviest service keys come closer to a harvester's.
    "enterprise keys x3|--actors B3=120"
    "enterprise keys x5|--actors B3=200"
    # Campaigns with long (few-shot) prompts, and with a family of their own per key.
    "E2, E5 prompts x4||--scenarios E2,E5 --input-scale 4"
    "E2, E5 own families||--scenarios E2,E5 --own-families"
    "E2, E5 both||--scenarios E2,E5 --input-scale 4 --own-families"
    # Batch customers (B2's shape, near 80% of their key limits) that translate or rewrite
    # their documents instead of classifying them: output as long as the input, or 1.2x.
    "B2 writing what it reads||--scenarios B2 --output-ratio 1.0"
    "B2 writing 1.2x what it reads||--scenarios B2 --output-ratio 1.2"
    # Campaigns that throw each key away after a number of its requests (new keys in the
    # same orgs), before it has built up much evidence of its own.
    "attack keys rotated every 100||--scenarios E1,E2,E3,E4,E5,E6 --rotate-keys 100"
    "attack keys rotated every 20||--scenarios E1,E2,E3,E4,E5,E6 --rotate-keys 20"
    "attack keys rotated every 5||--scenarios E1,E2,E3,E4,E5,E6 --rotate-keys 5"
    "rotated every 20, half rate|--rate $(rates 0.5)|--scenarios E1,E2,E3,E4,E5,E6 --rotate-keys 20"
    # Every key of every actor, benign too, replaced every 20 of its requests: a platform
    # that mints short-lived keys (the benign side of rotation).
    "every key rotated every 20||--scenarios all --rotate-keys 20"
    # A host that computes no prompt features: metadata only (tokens, timing, addresses);
    # with the benign stress variants, and with slower attacks.
    "no prompt features at all||--scenarios all --no-features"
    "no features, enterprise keys x3|--actors B3=120|--scenarios all --no-features"
    "no features, enterprise at 55/min|--rate B3=55|--scenarios all --no-features"
    "no features, batch classifiers x5|--actors B2=30|--scenarios all --no-features"
    "no features, NAT accounts x3|--actors B4=1800|--scenarios all --no-features"
    "no features, CI bots x10|--actors B5=60|--scenarios all --no-features"
    "no features, attacks at half rate|--rate $(rates 0.5)|--scenarios all --no-features"
)
if [ -n "${PROBES:-}" ]; then
    variants=("${probes[@]}")
fi

run() { # what, command...: runs it, and on failure says which run and shows its errors
    local what=$1
    shift
    if ! "$@" 2> "$tmp/err"; then
        echo "robustness.sh: $what failed ($name, seed $seed):" >&2
        cat "$tmp/err" >&2
        exit 1
    fi
}

for v in "${variants[@]}"; do
    IFS='|' read -r name flags reshape <<< "$v"
    if [ -n "${MATCH:-}" ] && [[ $name != *"$MATCH"* ]]; then
        continue
    fi
    for seed in ${SEEDS:-1 2 3}; do
        # shellcheck disable=SC2086
        run simulate "$bin/simulate" --quiet --seed "$seed" --duration-min 60 $flags \
            --trace "$tmp/t.jsonl" --truth "$tmp/truth.jsonl"
        if [ -n "$reshape" ]; then
            # shellcheck disable=SC2086
            run reshape python3 scripts/reshape.py "$tmp/t.jsonl" "$tmp/truth.jsonl" $reshape \
                > "$tmp/r.jsonl"
            mv "$tmp/r.jsonl" "$tmp/t.jsonl"
        fi
        run replay "$bin/replay" --quiet --seed "$seed" < "$tmp/t.jsonl" > "$tmp/d.jsonl"
        run "replay --limits-only" "$bin/replay" --quiet --seed "$seed" --limits-only \
            < "$tmp/t.jsonl" > "$tmp/b.jsonl"
        run evaluate "$bin/evaluate" --trace "$tmp/t.jsonl" --truth "$tmp/truth.jsonl" \
            --decisions "$tmp/d.jsonl" --baseline "$tmp/b.jsonl" > "$tmp/eval.txt"
        summary=$(grep '^summary' "$tmp/eval.txt" || true)
        if [ -z "$summary" ]; then
            echo "robustness.sh: evaluate printed no summary ($name, seed $seed)" >&2
            exit 1
        fi
        printf '%-28s seed %s  %s\n' "$name" "$seed" "${summary#summary: }"
        if [ -n "$reshape" ]; then
            # The reshaped scenarios (reshape.py's --scenarios): requests denied, actors
            # escalated.
            reshaped=$(sed -n 's/.*--scenarios \([^ ]*\).*/\1/p' <<< "$reshape")
            awk -v list="$reshaped" '
                BEGIN { n = split(list, s, ","); for (i = 1; i <= n; i++) want[s[i]] = 1 }
                ($1 in want) || ("all" in want && $1 ~ /^[BE][0-9]+$/) {
                    sub(/,$/, "", $8)
                    printf "%-28s         %s denied %s%%, escalated %s\n", "", $1, $5, $8
                }' "$tmp/eval.txt"
        fi
    done
done
