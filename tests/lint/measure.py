#!/usr/bin/env python3
"""Figures of `backstop lint` (and squawk) on the real-migrations corpus.

    python3 tests/lint/measure.py [--backstop BIN] [--squawk BIN] [--json OUT]

Prints, for each tool: files, statements, files with a parse failure, the
share of files blocked (backstop: an error-level finding that is not
ignored, or text that is not SQL; squawk: any violation, its exit code), and
the count of each rule. Then the files where squawk reports a safety rule
that maps to a backstop rule and backstop reports none of the mapped ones
(squawk's style rules, such as prefer-robust-stmts, map to nothing).
"""

import argparse
import collections
import glob
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# squawk rule -> backstop rules that cover the same hazard.
SQUAWK_TO_BACKSTOP = {
    "require-concurrent-index-creation": {"BS301"},
    "require-concurrent-index-deletion": {"BS302"},
    "ban-drop-column": {"BS102"},
    "ban-drop-table": {"BS101"},
    "ban-drop-database": {"BS113"},
    "renaming-column": {"BS112"},
    "renaming-table": {"BS112"},
    "changing-column-type": {"BS111", "BS310"},
    "adding-not-nullable-field": {"BS201", "BS202"},
    "adding-required-field": {"BS202"},
    "adding-foreign-key-constraint": {"BS304", "BS313"},
    "constraint-missing-not-valid": {"BS304", "BS305", "BS306", "BS307", "BS316"},
    "adding-field-with-default": {"BS308", "BS309", "BS314", "BS315"},
    "disallowed-unique-constraint": {"BS306"},
    "adding-serial-primary-key-field": {"BS307", "BS315"},
    "require-lock-timeout": {"BS313"},
    "ban-truncate-cascade": {"BS108"},
    "ban-alter-domain-with-add-constraint": {"BS318"},
    "transaction-nesting": {"BS402"},
    "ban-concurrent-index-creation-in-transaction": {"BS401"},
}


def files():
    return sorted(glob.glob(os.path.join(HERE, "real", "**", "*.sql"), recursive=True))


def run_backstop(binary, paths):
    out = subprocess.run([binary, "lint", "--format", "json", *paths], capture_output=True, text=True)
    results = json.loads(out.stdout)
    per_file = {}
    for r in results:
        findings = r.get("findings", [])
        per_file[r["file"]] = {
            "statements": r.get("statements", 0),
            "rules": [f["rule"] for f in findings],
            "parse_failure": r.get("not_sql", 0) > 0 or r.get("unreadable") is not None,
            "blocked": r.get("not_sql", 0) > 0
            or r.get("unreadable") is not None
            or any(f["severity"] == "error" and not f.get("ignored") for f in findings),
        }
    return per_file


def run_squawk(binary, paths):
    per_file = {p: {"rules": [], "parse_failure": False, "blocked": False} for p in paths}
    # One process per batch: squawk stops nothing on a bad file.
    for i in range(0, len(paths), 200):
        batch = paths[i : i + 200]
        out = subprocess.run([binary, "--reporter", "json", *batch], capture_output=True, text=True)
        for v in json.loads(out.stdout or "[]"):
            f = per_file.setdefault(v["file"], {"rules": [], "parse_failure": False, "blocked": False})
            f["rules"].append(v["rule_name"])
            f["blocked"] = True
            if v["rule_name"] == "syntax-error":
                f["parse_failure"] = True
    return per_file


def summary(name, per_file):
    n = len(per_file)
    counts = collections.Counter(r for f in per_file.values() for r in f["rules"])
    blocked = sum(1 for f in per_file.values() if f["blocked"])
    s = {
        "tool": name,
        "files": n,
        "statements": sum(f.get("statements", 0) for f in per_file.values()),
        "parse_failures": sum(1 for f in per_file.values() if f["parse_failure"]),
        "blocked_files": blocked,
        "blocked_share": round(blocked / n, 3) if n else 0,
        "rules": dict(sorted(counts.items())),
    }
    return s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backstop", default=os.path.join(HERE, "..", "..", "target", "debug", "backstop"))
    ap.add_argument("--squawk", default=shutil.which("squawk"))
    ap.add_argument("--json")
    args = ap.parse_args()
    paths = files()
    if not paths:
        sys.exit("no files under tests/lint/real")
    ours = run_backstop(args.backstop, paths)
    report = {"backstop": summary("backstop", ours)}
    if args.squawk:
        theirs = run_squawk(args.squawk, paths)
        report["squawk"] = summary("squawk", theirs)
        misses = []
        for p in paths:
            mine = set(ours.get(p, {}).get("rules", []))
            for rule in set(theirs[p]["rules"]):
                wanted = SQUAWK_TO_BACKSTOP.get(rule)
                if wanted and not (wanted & mine):
                    misses.append({"file": os.path.relpath(p, HERE), "squawk": rule, "backstop": sorted(mine)})
        report["misses"] = misses
    text = json.dumps(report, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
