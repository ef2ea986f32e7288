"""Run the architecture matrix on every TransformerLens line and class; print it, or write it to the
README.

The matrix is ``tests/matrix/test_architecture_matrix.py``: every public analysis and report section
on a tiny seeded random model of each family. This script runs it three times, each in its own
process with a JUnit report: TransformerLens 4 (``.venv``, TransformerBridge), then TransformerLens
3.9 (``.venv-tl3``) with ``TLMICROSCOPE_TEST_KIND=hooked`` and ``=bridge``. From the reports it
builds one table row per family: how many of the family's tests passed in each configuration, the
reason for any configuration it was skipped in, and the refusals (sites a family lacks, report
sections with a missing prerequisite) the tests recorded. Nothing in the table is typed by hand.

Usage:
    python benchmarks/architecture_matrix.py                  # run, print the table and wall times
    python benchmarks/architecture_matrix.py --write-readme   # also replace the README's table
    python benchmarks/architecture_matrix.py --reports DIR    # reuse DIR/{tl4-bridge,...}.xml
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tlmicroscope.models.families import FAMILIES  # noqa: E402 (needs the sys.path entry above)

TEST_FILE = "tests/matrix/test_architecture_matrix.py"
CONFIGS = {  # name: (column title, python, TLMICROSCOPE_TEST_KIND)
    "tl4-bridge": ("TL 4 bridge", ".venv/bin/python", "bridge"),
    "tl3-hooked": ("TL 3.9 HookedTransformer", ".venv-tl3/bin/python", "hooked"),
    "tl3-bridge": ("TL 3.9 bridge", ".venv-tl3/bin/python", "bridge"),
}
START, END = "<!-- architecture-matrix:start -->", "<!-- architecture-matrix:end -->"
_ID = re.compile(r"^(test_\w+)\[([^\]]+)\]$")


def run_config(name: str, out: Path) -> float:
    """Run the matrix for one configuration into ``out/<name>.xml``; return the wall time."""
    _, python, kind = CONFIGS[name]
    env = dict(os.environ, TLMICROSCOPE_TEST_KIND=kind, HF_HUB_OFFLINE="1")
    cmd = [
        str(ROOT / python),
        "-m",
        "pytest",
        TEST_FILE,
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "matrix",
        f"--junitxml={out / (name + '.xml')}",
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=False, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def parse(report: Path) -> dict[str, dict]:
    """Per family: passed, failed and skipped test counts, skip reasons, recorded refusals."""
    rows: dict[str, dict] = defaultdict(
        lambda: {"passed": 0, "failed": [], "skipped": [], "refused": []}
    )
    for case in ET.parse(report).getroot().iter("testcase"):
        m = _ID.match(case.get("name", ""))
        if not m:
            continue
        test, params = m.groups()
        family = next((f for f in FAMILIES if params == f or params.startswith(f + "-")), None)
        if family is None:
            continue
        row = rows[family]
        label = test.removeprefix("test_") + (params[len(family) :].replace("-", ": ", 1) or "")
        if case.find("failure") is not None or case.find("error") is not None:
            row["failed"].append(label)
        elif (skip := case.find("skipped")) is not None:
            row["skipped"].append((skip.get("message") or "").removeprefix("Skipped: "))
        else:
            row["passed"] += 1
        for prop in case.iter("property"):
            if prop.get("name") == "refused":
                row["refused"].append((label, prop.get("value", "")))
    return rows


def _cell(row: dict | None) -> str:
    if row is None:
        return "not run"
    total = row["passed"] + len(row["failed"])
    if total == 0 and row["skipped"]:
        return "skipped"
    mark = "pass" if not row["failed"] else f"**{len(row['failed'])} failed**"
    return f"{mark} ({row['passed']}/{total})"


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[.)])\s", text.strip(), maxsplit=1)[0]


def table(results: dict[str, dict[str, dict]]) -> str:
    """The Markdown table, with refusals shared by every family in a footnote."""
    shared: dict[str, set[str]] = {}
    for config, rows in results.items():
        per_family = [
            {(lab, _first_sentence(msg)) for lab, msg in r["refused"]}
            for r in rows.values()
            if r["passed"]
        ]
        common = set.intersection(*per_family) if per_family else set()
        shared[config] = common
    head = (
        ["family", "what it exercises"] + [CONFIGS[c][0] for c in results] + ["refusals and notes"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, fam in FAMILIES.items():
        notes: list[str] = []
        for config, rows in results.items():
            row = rows.get(name)
            if row is None:
                continue
            for reason in sorted(set(row["skipped"])):
                if row["passed"] == 0 and reason and reason not in notes:
                    notes.append(f"{CONFIGS[config][0]}: {reason}")
            for lab, msg in row["refused"]:
                if (lab, _first_sentence(msg)) in shared[config]:
                    continue
                section = lab.split(": ", 1)[1] if lab.startswith("report_section") else None
                note = (
                    f"report `{section}`: {_first_sentence(msg)}"
                    if section
                    else f"{msg}: refused when asked for, left out of the defaults"
                )
                if note not in notes:
                    notes.append(note)
            notes += [f"{CONFIGS[config][0]} failed: {lab}" for lab in row["failed"]]
        cells = [fam.title, fam.features] + [_cell(results[c].get(name)) for c in results]
        lines.append("| " + " | ".join(cells + ["; ".join(notes) or "none"]) + " |")
    foot = []
    for config, common in shared.items():
        for lab, sentence in sorted(common):
            foot.append(
                f"* {CONFIGS[config][0]}, every family: report section "
                f"`{lab.split(': ', 1)[-1]}` refuses ({sentence})"
            )
    return "\n".join(lines) + ("\n\n" + "\n".join(foot) if foot else "")


def write_readme(text: str, readme: Path = ROOT / "README.md") -> None:
    body = readme.read_text()
    if START not in body or END not in body:
        raise SystemExit(f"{readme} has no {START} ... {END} markers to write between.")
    before, rest = body.split(START, 1)
    after = rest.split(END, 1)[1]
    readme.write_text(f"{before}{START}\n{text}\n{END}{after}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help="comma-separated subset of " + ", ".join(CONFIGS),
    )
    ap.add_argument("--reports", type=Path, help="read DIR/<config>.xml instead of running")
    ap.add_argument(
        "--out",
        type=Path,
        default=ROOT / "out" / "architecture-matrix",
        help="where the JUnit reports are written",
    )
    ap.add_argument("--write-readme", action="store_true", help="replace the README's table")
    args = ap.parse_args()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"Unknown configurations {unknown}; choose from {list(CONFIGS)}.")
    folder = args.reports or args.out
    folder.mkdir(parents=True, exist_ok=True)
    results, seconds = {}, {}
    for config in configs:
        if args.reports is None:
            seconds[config] = run_config(config, folder)
        report = folder / f"{config}.xml"
        if not report.is_file():
            raise SystemExit(f"No report {report}: run without --reports first.")
        results[config] = parse(report)
    text = table(results)
    print(text)
    for config, s in seconds.items():
        print(f"{CONFIGS[config][0]}: {s:.0f} s wall")
    if args.write_readme:
        write_readme(text)
        print("README.md updated.")


if __name__ == "__main__":
    main()
