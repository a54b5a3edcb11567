#!/usr/bin/env python3
"""Turns the logs of one `gpu-pack/gpu-checks.sh` run into a dated results file.

    python3 scripts/gpu-results.py OUT_DIR [--results benches/results] [--command "..."]

OUT_DIR is the folder gpu-checks.sh wrote ($OUT). The file it writes,
benches/results/<date>-gpu-<card>.md, names the card (nvidia-smi), the commit the pack was built
from (gpu-pack/COMMIT, copied into info.log), the command of every phase with its exit status and
time, and holds the test summary, the sanitizer summaries, `senet gpu-bench`'s table,
torch_se.py's side-by-side table, the Nsight Compute lines and the network step times
(`senet net-bench`, torch_net.py). It copies what the logs say and
adds nothing: a phase that did not run is listed as missing.
"""
import argparse
import datetime
import pathlib
import re
import sys

PHASES = ["info", "tests", "pytorch", "sanitize", "bench", "torch", "ncu", "net", "train"]


def read(out, name):
    p = out / f"{name}.log"
    return p.read_text(errors="replace").splitlines() if p.exists() else None


def card_name(info, torch):
    for lines in (info or [], torch or []):
        for line in lines:
            m = re.search(r"(NVIDIA [A-Z]\w*[ -]?\w*(?: \w+)?)", line)
            if m and ("H100" in line or "H200" in line or "NVIDIA" in line):
                return m.group(1).strip()
    return "unknown-card"


def commit_of(info):
    for line in info or []:
        if re.fullmatch(r"[0-9a-f]{40}", line.strip()):
            return line.strip()
    return "unknown"


def phase_lines(lines):
    """The `=== name: command` and `=== name rc=.. in ..s` lines."""
    return [line for line in lines if line.startswith("=== ")]


def table(lines):
    """The Markdown tables in `lines`, each kept separate (a blank line between them) and headed
    by the line before it when that says what it is (a `profile:` or `===` line)."""
    out, prev = [], ""
    for line in lines:
        if line.startswith("|"):
            if not prev.startswith("|"):
                if out:
                    out.append("")
                if re.match(r"^profile:|^=== ", prev):
                    out.extend([prev, ""])
            out.append(line)
        prev = line
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=pathlib.Path)
    ap.add_argument("--results", type=pathlib.Path, default=pathlib.Path("benches/results"))
    ap.add_argument("--command", default="cd gpu-pack && OUT=$OUT ./gpu-checks.sh",
                    help="the command that ran gpu-checks.sh, as it should appear in the file")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--tag", default="", help="appended to the file name (several runs in a day)")
    a = ap.parse_args()
    if not a.out.is_dir():
        print(f"{a.out}: not a folder", file=sys.stderr)
        return 2
    logs = {name: read(a.out, name) for name in PHASES}
    if all(v is None for v in logs.values()):
        print(f"{a.out}: no gpu-checks logs (info.log, tests.log, ...) in it", file=sys.stderr)
        return 2
    card = card_name(logs["info"], logs["torch"])
    commit = commit_of(logs["info"])
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    tag = f"-{a.tag}" if a.tag else ""
    dest = a.results / f"{a.date}-gpu-{slug}{tag}.md"

    w = []
    w.append(f"# GPU checks on {card} ({a.date})\n")
    w.append(f"- Card: {card}")
    w.append(f"- Commit: `{commit}` (the gpu-pack was built from it; see info.log's COMMIT lines)")
    w.append(f"- Command: `{a.command}`")
    w.append(f"- Logs: the phase logs of that run, summarised below by `scripts/gpu-results.py`.\n")

    w.append("## Phases\n")
    w.append("```")
    for name in PHASES:
        lines = logs[name]
        if lines is None:
            w.append(f"{name}: did not run (no {name}.log)")
        else:
            w.extend(phase_lines(lines))
    w.append("```\n")

    def fenced(name, title, pattern):
        """A section with the lines of `name`.log that match `pattern`, if that log exists."""
        if logs[name] is not None:
            w.extend([f"## {title}\n", "```"])
            w.extend(line for line in logs[name] if re.search(pattern, line))
            w.append("```\n")

    def tabled(name):
        if logs[name] is not None:
            w.extend(table(logs[name]) or [f"(no table in {name}.log)"])
            w.append("")

    fenced("info", "Device and kernels", r"NVIDIA|Driver|CUDA|device|kernel builds|cuDNN")
    fenced("tests", "GPU tests (SENET_REQUIRE_GPU=1)", r"^test |FAIL|panicked|test result|cases x|^CUDA backend:|skipped cuDNN")
    fenced("pytorch", "senet_torch's CUDA tests (the packed wheel, the machine's torch)", r"^=== |passed|failed|FAILED|Error")
    fenced("sanitize", "compute-sanitizer", r"^=== |ERROR SUMMARY|test result|Invalid|Race|Barrier|error")
    if logs["bench"] is not None:
        w.append("## `senet gpu-bench`\n")
    tabled("bench")
    fenced("torch", "PyTorch (timm SEModule) on the same card, and the ratios", r"^device:|^  ")
    tabled("torch")
    fenced("ncu", "Nsight Compute", r"^\s+se_|dram__|lts__|gpu__time")
    fenced("net", "Whole network: `senet net-bench` and torch_net.py", r"^=== |^device:|^# |ms \(|epoch|done:|^profile:")
    tabled("net")
    fenced("train", "`senet train --device cuda` (one epoch on a digits subset)", r"epoch|done:|error|parameters")

    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("\n".join(w) + "\n")
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
