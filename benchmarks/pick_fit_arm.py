"""Pick the fit settings for the end-to-end run from bench_fit records, by a rule fixed before the arms ran.

    python benchmarks/pick_fit_arm.py docs/bench/fit_speed_h200.json W/fit/fit_speed.json > arm.txt

Reads every complete (e) row at ``--batch`` (default 128) of the given records (a row without a ``variant`` is the
control: no overrides) that was compared with the plain gsplat reference. Rule: among the rows at >= 50 objects/min,
the fastest whose worst object is >= -0.3 dB of the reference; when none is, the one with the best worst object
(ties: the faster). Prints the chosen arm's overrides (``key=value,...``, bench_data_e2e ``--fit-set`` syntax; empty
for the control) on stdout and the table and the reason on stderr; exits 1 when no row is at >= 50 objects/min.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def rows_of(paths: list[Path], batch: int) -> list[dict]:
    out = []
    for p in paths:
        rec = json.loads(p.read_text())
        for r in rec.get("batches", []):
            if r.get("batch") == batch and "objects_per_minute" in r and "psnr_minus_reference_min" in r:
                out.append({"source": str(p), "commit": rec.get("commit"), "variant": r.get("variant") or "control",
                            "overrides": r.get("overrides") or {}, "objects_per_minute": r["objects_per_minute"],
                            "worst": r["psnr_minus_reference_min"], "mean": r["psnr_minus_reference_mean"]})
    return out


def pick(rows: list[dict], speed: float = 50.0, floor: float = -0.3) -> tuple[dict | None, str]:
    fast = [r for r in rows if r["objects_per_minute"] >= speed]
    if not fast:
        return None, f"no arm reaches {speed:g} objects/min"
    good = [r for r in fast if r["worst"] >= floor]
    if good:
        return max(good, key=lambda r: r["objects_per_minute"]), f"fastest arm with every object >= {floor:+g} dB"
    return max(fast, key=lambda r: (r["worst"], r["objects_per_minute"])), \
        f"no arm has every object >= {floor:+g} dB: the best worst object among those >= {speed:g} objects/min"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records", nargs="+", type=Path)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    rows = rows_of(args.records, args.batch)
    for r in rows:
        print(f"{r['variant']:>24s}: {r['objects_per_minute']:6.1f} objects/min, PSNR - reference mean "
              f"{r['mean']:+.2f}, worst {r['worst']:+.2f} dB  ({r['source']})", file=sys.stderr)
    best, why = pick(rows)
    if best is None:
        print(f"pick: {why}", file=sys.stderr)
        raise SystemExit(1)
    print(f"pick: {best['variant']} ({why})", file=sys.stderr)
    print(",".join(f"{k}={v}" for k, v in best["overrides"].items()))


if __name__ == "__main__":
    main()
