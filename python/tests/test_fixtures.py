"""The package and the CLI give the same verdicts on every committed fixture case: both run
`dsv3 check` on the case's inputs and outputs (the external oracle's), and the pass/fail, exit
code and per-tensor counts must agree, as must the case's expectation (planted bugs fail)."""

import json
import re
import subprocess

import pytest

import dsv3
from conftest import case_tensors, fixture_cases, write_safetensors

CASES = fixture_cases()


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_same_verdict_as_the_cli(case, cli, tmp_path):
    inputs, outputs = case_tensors(case, "inputs"), case_tensors(case, "outputs")
    exact = case["compare"] == "exact"
    report = dsv3.check(case["op"], inputs, outputs, config=case["config"], exact=exact)

    write_safetensors(tmp_path / "in.safetensors", inputs)
    write_safetensors(tmp_path / "out.safetensors", outputs)
    cmd = [cli, "check", case["op"], "--inputs", str(tmp_path / "in.safetensors"),
           "--outputs", str(tmp_path / "out.safetensors"), "--config", json.dumps(case["config"]),
           "--report", str(tmp_path / "report.json")] + (["--exact"] if exact else [])
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode in (0, 1), run.stderr
    assert report.exit_code == run.returncode, f"python {report.exit_code}, CLI {run.returncode}:\n{run.stdout}"

    # str(report) is the CLI's table (the reference's timing aside)
    timing = re.compile(r"reference [0-9.]+s")
    assert timing.sub("", str(report)).strip() == timing.sub("", run.stdout).strip()

    cli_report = json.loads((tmp_path / "report.json").read_text())
    assert cli_report["pass"] == report.passed
    cli_tensors = {t["name"]: t for t in cli_report["tensors"]}
    assert set(cli_tensors) == set(report.tensors)
    for name, t in report.tensors.items():
        c = cli_tensors[name]
        for field in ("pass", "numel", "exact", "allowed", "ignored", "violations", "max_ulp", "max_abs"):
            assert t[field] == c[field], f"{case['name']} `{name}`: {field} python {t[field]!r}, CLI {c[field]!r}"
        assert t["worst_index"] == (tuple(c["worst"]["index"]) if c["worst"] else None)

    # and the case's own expectation: the oracle's outputs pass, a planted bug fails
    assert report.passed == (case.get("expect") != "fail"), report.failure_message()
