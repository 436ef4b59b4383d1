"""bench/speed_run.py: the stages of the whole-run speed suite resume, fail and time out as its docstring says.

The stages here are tiny scripts (the real stages need a GPU); `summary` is also read back from the committed
H100 results, which the README's speed tables quote.
"""

import json
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import speed_run  # noqa: E402


def _script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / f"{name}.py"
    path.write_text("import json, os, subprocess, sys, time\nout = sys.argv[sys.argv.index('--json') + 1]\n" + body)
    return str(path)


# a stage that starts a child (in its process group) and then sleeps: what a time limit or a signal must stop
SLOW = ("p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "open(out + '.pid', 'w').write(str(p.pid))\ntime.sleep(60)\n")


def _gone(pid: int, seconds: float = 5.0) -> bool:
    """Whether process `pid` has ended within `seconds`."""
    for _ in range(int(seconds * 10)):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _stage(name: str, script: str, timeout_s: int = 60) -> speed_run.Stage:
    return speed_run.Stage(name, name, script, ("--json", "{json}"), ("--json", "{json}"), timeout_s)


@pytest.fixture
def stages(tmp_path, monkeypatch):
    counter = tmp_path / "runs.txt"
    ok = _script(tmp_path, "ok", f"open({str(counter)!r}, 'a').write('ok\\n')\njson.dump({{'x': 1}}, open(out, 'w'))\n")
    bad = _script(tmp_path, "bad", "sys.exit(3)\n")
    slow = _script(tmp_path, "slow", SLOW)
    st = (_stage("ok", ok), _stage("bad", bad), _stage("slow", slow, timeout_s=3))
    monkeypatch.setattr(speed_run, "STAGES", st)
    monkeypatch.setattr(speed_run, "SUMMARY", {s.name: lambda res, label: [{"row": label, **res}] for s in st})
    return counter


def test_failed_and_timed_out_stages_are_recorded_and_the_run_goes_on(stages, tmp_path):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    assert speed_run.main(["--out", str(out)]) == 1
    assert time.perf_counter() - t0 < 30
    rec = json.loads((out / speed_run.RECORD).read_text())["stages"]
    assert rec["ok"]["ok"] and rec["ok"]["rc"] == 0
    assert not rec["bad"]["ok"] and rec["bad"]["rc"] == 3
    assert rec["slow"]["timed_out"] and not rec["slow"]["ok"]
    # the stage's whole process group went: its child, sleeping 60 s, is gone too
    assert _gone(int((out / "slow.json.pid").read_text())), "the timed-out stage's child process survived"


def test_resume_skips_finished_stages_and_reruns_failed_ones(stages, tmp_path):
    out = tmp_path / "run"
    speed_run.main(["--out", str(out), "--only", "ok,bad"])
    (out / "bad.json").write_text("{}")  # a failed stage's leftover file must not count as done
    assert speed_run.main(["--out", str(out), "--only", "ok,bad"]) == 1
    assert stages.read_text().count("ok") == 1  # "ok" ran once: the second run found its JSON
    assert speed_run.main(["--out", str(out), "--only", "ok", "--redo"]) == 0
    assert stages.read_text().count("ok") == 2
    (out / "ok.json").write_text('{"x": ')  # cut off while being written: not a result
    assert speed_run.main(["--out", str(out), "--only", "ok"]) == 0
    assert stages.read_text().count("ok") == 3
    rows = json.loads((out / speed_run.RECORD).read_text())["summary"]
    assert {"row": "ok", "x": 1} in rows and {"row": "slow", "error": "not measured"} in rows


def test_unknown_stage_is_refused_before_anything_runs(stages, tmp_path, capsys):
    with pytest.raises(SystemExit):
        speed_run.main(["--out", str(tmp_path / "run"), "--only", "nope"])
    assert "unknown stage" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_committed_h100_results_have_every_stage():
    """The README quotes bench/results/speed_2026-11-25: every stage measured, both whole runs finite."""
    rows = speed_run.summary(str(ROOT / "bench" / "results" / "speed_2026-11-25"))
    assert not [r for r in rows if r.get("error")]
    whole = {r["row"]: r for r in rows if r["row"].startswith("whole")}
    assert set(whole) == {"whole_a14b_480p", "whole_a14b_720p"}
    assert all(r["sample_s"] > 0 and r["peak_denoise_gib"] for r in whole.values())
    assert {r["row"].split(": ")[1].split()[0] for r in rows if r["row"].startswith("fast_modes")} >= {
        "full", "step", "CFG", "truncation"}


def test_sigterm_stops_the_stage_group_and_marks_it_interrupted(tmp_path):
    """A stage runs in its own session, so the suite must take it down when it is itself terminated (a lease
    ending, `timeout`), and the stage must run again on resume."""
    import signal
    import subprocess

    slow = _script(tmp_path, "slow", SLOW)
    out = tmp_path / "run"
    driver = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "from bench import speed_run\n"
              f"speed_run.STAGES = (speed_run.Stage('slow', 'slow', {slow!r}, ('--json', '{{json}}'), (), 60),)\n"
              "speed_run.SUMMARY = {'slow': lambda res, label: [{'row': label}]}\n"
              f"sys.exit(speed_run.main(['--out', {str(out)!r}]))\n")
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid_file = out / "slow.json.pid"
    for _ in range(300):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 130
    assert _gone(int(pid_file.read_text())), "the stage's child survived the suite's SIGTERM"
    assert json.loads((out / speed_run.RECORD).read_text())["stages"]["slow"] == {"interrupted": True, "ok": False}
