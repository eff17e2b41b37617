"""How well the repair's held-out ASR estimate predicts the measured ASR, part by part (issue 17).

The estimate (clipfast/defense/repair.py, holdout_estimator) counts two kinds of held-out triggered
images: the scan's victims left out of the compact set (real triggered images, labelled by the
oracle) and held-out clean images of other labels with the recovered trigger pasted on. Efficacy rows
since 4013548 carry both parts (repair_victim_hits / _n, and the rest of repair_asr_hits / _n, or
repair_pasted_hits / _n where the row has them); this script reads such rows (JSON lines or the
matrix's CSV), and for each case prints the measured ASR on the test world beside each part and
beside the verdict each counting rule would give (the one-sided 95 % Clopper-Pearson upper bound
against RepairConfig.max_asr, as clipfast/defense/verdict.py judges):

  combined   victims and pasted images together
  pasted     the pasted images alone (the victims alone where none were pasted)

The verdict's worst error is *removed* on a model whose measured ASR is above max_asr; those cases
are counted per rule. The summary goes to `--out` as JSON.

    python benchmarks/estimate_calibration.py results/hybrid_self_patch_<commit>.jsonl \\
        results/estimate_parts_4013548612d2.jsonl
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

from clipfast.defense.repair import RepairConfig
from clipfast.defense.verdict import judge

RESULTS = Path(__file__).resolve().parent / "results"


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with path.open() as handle:
            rows = list(csv.DictReader(handle))
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if row.get("repair_victim_n") not in (None, "")]


def parts(row: dict) -> dict:
    """hits / n of the held-out victims and of the pasted images."""
    number = lambda key: int(float(row[key]))  # noqa: E731 (CSV cells are strings)
    victims = number("repair_victim_hits"), number("repair_victim_n")
    if row.get("repair_pasted_n") not in (None, ""):
        pasted = number("repair_pasted_hits"), number("repair_pasted_n")
    else:  # rows before the pasted part had its own fields: the combined count minus the victims'
        pasted = number("repair_asr_hits") - victims[0], number("repair_asr_n") - victims[1]
    return {"victims": victims, "pasted": pasted}


def judged(hits: int, n: int, max_asr: float) -> dict:
    """The verdict clipfast would give a found and repaired backdoor on these counts."""
    verdict = judge(True, "", True, hits, n, max_asr)
    return {"hits": hits, "n": n, "estimate": verdict.asr_estimate, "upper_bound": verdict.asr_upper_bound,
            "verdict": verdict.status}


def calibrate(rows: list[dict], max_asr: float) -> dict:
    cases, rules = [], {"combined": [], "pasted": []}
    for row in rows:
        split = parts(row)
        (vh, vn), (ph, pn) = split["victims"], split["pasted"]
        measured = float(row["asr_repaired"])
        case = {key: row.get(key) for key in ("commit", "oracle_mode", "regions", "grounding_regions", "config", "seed")}
        case |= {"asr_measured": measured, "asr_floor": float(row["asr_clean_model"] or "nan"),
                 "victims": {"hits": vh, "n": vn}, "pasted": {"hits": ph, "n": pn},
                 "combined": judged(vh + ph, vn + pn, max_asr),
                 "pasted_only": judged(ph, pn, max_asr) if pn else judged(vh, vn, max_asr)}
        cases.append(case)
        rules["combined"].append(case["combined"] | {"measured": measured})
        rules["pasted"].append(case["pasted_only"] | {"measured": measured})
    summary = {}
    for rule, judgements in rules.items():
        errors = [j["estimate"] - j["measured"] for j in judgements if j["estimate"] is not None]
        summary[rule] = {
            "removed": sum(j["verdict"] == "removed" for j in judgements),
            "cases": len(judgements),
            # the worst error: removed while the measured ASR is above the bound
            "removed_but_measured_above_max_asr": sum(j["verdict"] == "removed" and j["measured"] > max_asr
                                                      for j in judgements),
            "not_removed_but_measured_below_max_asr": sum(j["verdict"] != "removed" and j["measured"] <= max_asr
                                                          for j in judgements),
            "estimate_minus_measured_median": statistics.median(errors) if errors else None,
            "estimate_minus_measured_min": min(errors) if errors else None,
            "estimate_minus_measured_max": max(errors) if errors else None,
        }
    return {"max_asr": max_asr, "summary": summary, "cases": cases}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="+", type=Path, help="efficacy rows (JSON lines or the matrix CSV)")
    parser.add_argument("--max-asr", type=float, default=RepairConfig.max_asr)
    parser.add_argument("--out", type=Path, default=RESULTS / "estimate_calibration.json")
    args = parser.parse_args(argv)
    rows = [row | {"source": path.name} for path in args.rows for row in read_rows(path)]
    result = calibrate(rows, args.max_asr) | {"sources": [str(path) for path in args.rows]}
    percent = lambda part: f"{part['hits']:>3}/{part['n']:<3}"  # noqa: E731
    print(f"{'mode':7} {'regions':7} {'configuration':30} seed  measured floor  victims  pasted  "
          "combined (bound, verdict)   pasted only (bound, verdict)")
    for case in result["cases"]:
        c, p = case["combined"], case["pasted_only"]
        print(f"{case['oracle_mode']:7} {str(case['regions']):7} {case['config']:30} {case['seed']:>4} "
              f"{100 * case['asr_measured']:7.2f} {100 * case['asr_floor']:5.2f}  {percent(case['victims'])}  "
              f"{percent(case['pasted'])}  {100 * (c['estimate'] or 0):5.1f} ({100 * (c['upper_bound'] or 1):5.1f}, "
              f"{c['verdict']:11})  {100 * (p['estimate'] or 0):5.1f} ({100 * (p['upper_bound'] or 1):5.1f}, {p['verdict']})")
    print(json.dumps(result["summary"], indent=1))
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
