#!/usr/bin/env python3
"""Reshapes the requests of chosen scenarios in a simulated trace, to probe detection with
actors the simulator does not generate. Reads the trace and its truth file, writes the new
trace to standard output (the truth file still applies, line for line).

    reshape.py TRACE TRUTH --scenarios E2,E5 [--input-scale F] [--output-ratio R]
                                             [--own-families]

--input-scale F   multiply those requests' input tokens by F (long, few-shot prompts)
--output-ratio R  set those requests' output tokens to R times their input tokens (a batch
                  job that translates or rewrites its documents: R near 1)
--own-families    give each of those API keys its own template and SimHash family (the key's
                  hash is XORed into both), so that no two keys of a campaign share a family
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
    a = ap.parse_args()
    chosen = set(a.scenarios.split(","))
    out = sys.stdout
    with open(a.trace) as trace, open(a.truth) as truth:
        for line, label in zip(trace, truth):
            r = json.loads(line)
            if json.loads(label)["scenario"] in chosen:
                r["input_tokens"] = int(r["input_tokens"] * a.input_scale)
                if a.output_ratio is not None:
                    r["output_tokens"] = max(1, int(r["input_tokens"] * a.output_ratio))
                if a.own_families:
                    x = key_hash(r.get("api_key") or "")
                    for field in ("template_fp", "prompt_simhash"):
                        if r.get(field):
                            r[field] = "%016x" % (int(r[field], 16) ^ x)
            out.write(json.dumps(r, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
