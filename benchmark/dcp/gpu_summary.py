"""Summarise the stages of gpu_check.sh found in WORK: print a table, write JSON.

    python benchmark/dcp/gpu_summary.py WORK_DIR OUT_JSON CARD [COMMIT]

CARD names the GPUs (``gpu_card`` of gpu_common.sh, e.g. "2x NVIDIA H100 80GB HBM3"). OUT_JSON
gets every stage and result; beside it, ``gpu_shared.json`` gets one row per DCP run made in
the shared-GPU test mode (card, date, commit, case, comm, requests, identical, max gap,
capacity ratio, pass), the rows docs/gpu-checks.md's proof table quotes, after the rows of the
repository's ``results/gpu_shared.json`` whose case this run did not run again.
A row's date and commit are those its stage recorded when it finished (else the summary's,
and COMMIT).
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


def load_all(pattern: str) -> list:
    results = []
    for path in sorted(glob.glob(pattern)):
        with open(path) as f:
            results.append(json.load(f))
    return results


def e2e_rows(result: dict) -> list:
    """One row per DCP run of an e2e case (the dcp 1 baseline sets tolerances, no row)."""
    return [
        {"stage": result.get("stage"), "case": result["case"], "label": run["label"], "comm": run["comm"],
         "graphs": run["graphs"], "requests": run["requests"],
         "identical": run["identical"], "max_logprob_diff": round(run["max_logprob_diff"], 4),
         "max_gap": run["max_divergence_gap"], "capacity_ratio": run["capacity_ratio"], "pass": run["pass"],
         "shared_gpu": result["shared_gpu"]}
        for run in result["runs"] if run["dcp_size"] > 1
    ]


def soak_rows(soak: dict, shared_gpu: bool) -> list:
    """One row per DCP server of a soak: its greedy requests completed on both it and the
    reference; it passes with no mismatch beyond a near-tie and no error."""
    return [
        {"stage": "soak", "case": f"soak-{soak['sent']}", "comm": name.rsplit("-", 1)[-1], "graphs": not shared_gpu,
         "requests": c["compared"], "identical": c["identical"], "near_ties": c["near_ties"],
         "max_gap": c["max_gap"], "capacity_ratio": None,
         "pass": c["mismatched"] == 0 and soak["errors"][name] == 0, "shared_gpu": shared_gpu}
        for name, c in soak["candidates"].items()
    ]


def http_rows(http: dict, shared_gpu: bool) -> list:
    bench = http["bench_serving"]
    return [{"stage": "http", "case": "http", "comm": http["dcp_comm"], "graphs": not shared_gpu,
             "requests": bench["num_prompts"], "identical": None, "completed": bench["completed"],
             "max_gap": None, "capacity_ratio": None, "pass": http["ok"], "shared_gpu": shared_gpu}]


SHARED_ROWS = "benchmark/dcp/results/gpu_shared.json"


def with_earlier_rows(rows: list, earlier_path: str) -> list:
    """``rows`` after the rows of ``earlier_path`` (if it exists) of cases they do not hold."""
    if not os.path.exists(earlier_path):
        return rows
    with open(earlier_path) as f:
        earlier = json.load(f)
    cases = {row["case"] for row in rows}
    return [row for row in earlier if row["case"] not in cases] + rows


def main():
    work, out_json, card = sys.argv[1:4]
    commit = sys.argv[4] if len(sys.argv) > 4 else "unknown"
    summary = {
        "card": card,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "stages": {},
        "e2e": {},
    }
    for stage in load_all(os.path.join(work, "stage_*.json")):
        xml = os.path.join(work, f"{stage['stage']}.xml")
        if os.path.exists(xml):
            stage["tests"] = junit_counts(xml)
        summary["stages"][stage["stage"]] = stage
    shared = {name: stage.get("shared_gpu", False) for name, stage in summary["stages"].items()}
    rows = []
    for result in load_all(os.path.join(work, "e2e_*.json")):
        summary["e2e"][result["case"]] = result
        rows += e2e_rows(result)
    summary["http"] = load_all(os.path.join(work, "http_check_*.json"))
    for http in summary["http"]:
        rows += http_rows(http, shared.get("http", False))
    soak_file = os.path.join(work, "soak.json")
    if os.path.exists(soak_file):
        with open(soak_file) as f:
            summary["soak"] = json.load(f)
        rows += soak_rows(summary["soak"], shared.get("soak", False))
    for row in rows:
        stage = summary["stages"].get(row.pop("stage"), {})
        row.update(card=card, date=stage.get("finished", summary["date"]), commit=stage.get("commit", commit))
    summary["rows"] = rows
    with open(out_json, "w") as f:
        json.dump(summary, f, indent=1)
    shared_rows = [row for row in rows if row["shared_gpu"]]
    if shared_rows:
        with open(os.path.join(os.path.dirname(out_json), "gpu_shared.json"), "w") as f:
            json.dump(with_earlier_rows(shared_rows, SHARED_ROWS), f, indent=1)

    print(f"\nGPU check on {card}, {summary['date']}, commit {commit}")
    print(f"{'stage':14} {'rc':>3} {'s':>5} {'shared':>6}  tests")
    for name, stage in summary["stages"].items():
        print(f"{name:14} {stage['returncode']:>3} {stage['seconds']:>5} {str(shared[name]):>6}  {stage.get('tests', '')}")
    print(f"\n{'case':22} {'run':26} {'graphs':6} {'shared':6} {'requests':>8} {'identical':>9} "
          f"{'max |dlogp|':>11} {'max gap':>8} {'capacity':>8}  pass")
    for row in rows:
        print(f"{row['case']:22} {row['label']:26} {str(row['graphs']):6} {str(row['shared_gpu']):6} "
              f"{row['requests']:>8} {str(row['identical']):>9} {str(row.get('max_logprob_diff', '')):>11} "
              f"{str(row['max_gap']):>8} {str(row['capacity_ratio']):>8}  {row['pass']}")
    for case, result in summary["e2e"].items():
        if "tolerances" in result:
            print(f"{case}: bars logprob {result['tolerances']['logprob']:.4f}, near-tie "
                  f"{result['tolerances']['near_tie']:.4f}; skipped graph modes {result['skipped_graph_modes']}")


if __name__ == "__main__":
    main()
