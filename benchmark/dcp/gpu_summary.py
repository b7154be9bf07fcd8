"""Summarise the stages of gpu_check.sh found in WORK: print a table, write JSON.

    python benchmark/dcp/gpu_summary.py WORK_DIR OUT_JSON CARD

CARD names the GPUs (``gpu_card`` of gpu_common.sh, e.g. "2x NVIDIA H100 80GB HBM3").
"""

import datetime
import glob
import json
import os
import sys
import xml.etree.ElementTree as ET


def junit_counts(path: str) -> str:
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failed = int(suite.get("tests")), int(suite.get("failures")) + int(suite.get("errors"))
    skipped = int(suite.get("skipped"))
    return f"{total - failed - skipped} passed, {failed} failed, {skipped} skipped"


def main():
    work, out_json, card = sys.argv[1:]
    summary = {
        "card": card,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "stages": {},
        "e2e": {},
    }
    for path in sorted(glob.glob(os.path.join(work, "stage_*.json"))):
        with open(path) as f:
            stage = json.load(f)
        xml = os.path.join(work, f"{stage['stage']}.xml")
        if os.path.exists(xml):
            stage["tests"] = junit_counts(xml)
        summary["stages"][stage["stage"]] = stage
    for path in sorted(glob.glob(os.path.join(work, "e2e_*.json"))):
        with open(path) as f:
            result = json.load(f)
        summary["e2e"][result["case"]] = result
    http = os.path.join(work, "http_check.json")
    if os.path.exists(http):
        with open(http) as f:
            summary["http"] = json.load(f)
    with open(out_json, "w") as f:
        json.dump(summary, f, indent=1)

    print(f"\nGPU check on {summary['card']}, {summary['date']}")
    print(f"{'stage':10} {'rc':>3} {'s':>5}  tests")
    for name, stage in summary["stages"].items():
        print(f"{name:10} {stage['returncode']:>3} {stage['seconds']:>5}  {stage.get('tests', '')}")
    print(f"\n{'e2e case':20} {'run':12} {'requests':>8} {'identical':>9} {'max |dlogp|':>11} "
          f"{'tie gap':>7} {'capacity':>18}")
    for case, result in summary["e2e"].items():
        for run in ("dcp1-triton", "dcp2-graphs", "dcp2-eager"):
            if run in result:
                r = result[run]
                print(f"{case:20} {run:12} {result['num_requests']:>8} {r['identical_fraction']:>9.3f} "
                      f"{r['max_logprob_diff']:>11.4f} {r.get('max_divergence_gap', float('nan')):>7.3f} "
                      f"{result['reference_capacity']:>8} -> {r['capacity']}")
        if "tolerances" in result:
            tol = result["tolerances"]
            print(f"{'':20} {'(DCP bars)':12} {'':>8} {'':>9} {tol['logprob']:>11.4f} {tol['near_tie']:>7.3f}")
    if "http" in summary:
        h = summary["http"]
        print(f"\nhttp tp{h['tp']} dcp{h['dcp']}: /generate {h['generate']['status']}, "
              f"/v1/completions {h['completions']['status']}, bench_serving "
              f"{h['bench_serving']['completed']}/{h['bench_serving']['num_prompts']}, ok={h['ok']}")


if __name__ == "__main__":
    main()
