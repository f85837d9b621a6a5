#!/usr/bin/env python3
"""Reshapes the requests of chosen scenarios in a simulated trace, to probe detection with
actors the simulator does not generate. Reads the trace and its truth file, writes the new
trace to standard output (the truth file still applies, line for line).

    reshape.py TRACE TRUTH --scenarios E2,E5 [--input-scale F] [--output-ratio R]
                                             [--own-families] [--rotate-keys N]
                                             [--no-features]

--scenarios LIST  the scenarios to reshape, or `all`

--input-scale F   multiply those requests' input tokens by F (long, few-shot prompts)
--output-ratio R  set those requests' output tokens to R times their input tokens (a batch
                  job that translates or rewrites its documents: R near 1)
--own-families    give each of those API keys its own template and SimHash family (the key's
                  hash is XORed into both), so that no two keys of a campaign share a family
--rotate-keys N   replace each of those API keys by a fresh one every N of its requests (a
                  campaign that throws keys away before they escalate; its orgs stay)
--no-features     drop the prompt fingerprint, SimHash and template fingerprint (with
                  `--scenarios all`: a host that hashes no prompts)
"""
import argparse
import hashlib
import json
import sys


def key_hash(key):
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("truth")
    ap.add_argument("--scenarios", required=True)
    ap.add_argument("--input-scale", type=float, default=1.0)
    ap.add_argument("--output-ratio", type=float)
    ap.add_argument("--own-families", action="store_true")
    ap.add_argument("--rotate-keys", type=int)
    ap.add_argument("--no-features", action="store_true")
    a = ap.parse_args()
    if a.rotate_keys is not None and a.rotate_keys < 1:
        ap.error("--rotate-keys must be at least 1")
    chosen = set(a.scenarios.split(","))
    seen = {}  # requests so far per original key (--rotate-keys)
    out = sys.stdout
    with open(a.trace) as trace, open(a.truth) as truth:
        for line, label in zip(trace, truth):
            r = json.loads(line)
            if "all" in chosen or json.loads(label)["scenario"] in chosen:
                r["input_tokens"] = int(r["input_tokens"] * a.input_scale)
                if a.output_ratio is not None:
                    r["output_tokens"] = max(1, int(r["input_tokens"] * a.output_ratio))
                if a.own_families:
                    x = key_hash(r.get("api_key") or "")
                    for field in ("template_fp", "prompt_simhash"):
                        if r.get(field):
                            r[field] = "%016x" % (int(r[field], 16) ^ x)
                if a.rotate_keys is not None and r.get("api_key"):
                    k = r["api_key"]
                    n = seen.get(k, 0)
                    seen[k] = n + 1
                    r["api_key"] = "%s~%d" % (k, n // a.rotate_keys)
                if a.no_features:
                    for field in ("prompt_fp", "prompt_simhash", "template_fp"):
                        r.pop(field, None)
            out.write(json.dumps(r, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
