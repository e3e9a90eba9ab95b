"""`kdsweep dashboard` in a real browser: headless Chromium shows the study and its trials.

The screenshot is kept as a test artefact in test-artifacts/ (gitignored) for a person to look at.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from PIL import Image

from kdsweep.service import keys
from kdsweep.service import spec as studies
from kdsweep.service.dashboard import write_verdict
from kdsweep.service.sweep import Sweep

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
STUDY = "q2-smoke-dash"
N_TRIALS = 6


def _finished_smoke_study(url: str) -> None:
    """A finished q2 smoke-sized study (known values, one pruned trial) with kdsweep's attrs."""
    study = optuna.create_study(study_name=STUDY, storage=url, direction="maximize")
    study.set_user_attr(keys.DEFINITION, studies.load("q2").definition("smoke"))
    dists = {"kd.alpha": optuna.distributions.FloatDistribution(0.0, 1.0),
             "kd.temperature": optuna.distributions.FloatDistribution(1.0, 20.0)}
    for i in range(N_TRIALS):
        t = study.ask(dists)
        for epoch in (1, 2, 3):
            t.report(0.5 + 0.05 * epoch + 0.01 * i, epoch)
        if i == 3:
            study.tell(t, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(t, 0.65 + 0.01 * i)
    # A race over the top two on three fresh seeds (scripted values), then the verdict as the
    # launch summary and `best --verify` write it: the study's note and its figures.
    sweep = Sweep(study)
    top = sweep.top(2)
    sweep.queue_verification([(t.params, t.number, 1000 + s) for s in range(3) for t in top])
    sibling = sweep.sibling(".verify")
    sibling.study.set_user_attr(keys.VERIFY_MODE, "race")
    script = {top[0].number: [0.70, 0.72, 0.71], top[1].number: [0.60, 0.61, 0.61]}
    for _ in range(6):
        run = sibling.study.ask()
        attrs = sibling.study._storage.get_trial(run._trial_id).user_attrs
        sibling.study.tell(run, script[attrs[keys.VERIFY_SOURCE]][attrs[keys.VERIFY_SEED] - 1000])
    write_verdict(sweep)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("dash")
    url = f"sqlite:///{folder}/dash.db"
    _finished_smoke_study(url)
    port = _free_port()
    log = open(folder / "dashboard.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "kdsweep", "dashboard", "--storage", url,
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _get(base + "/api/studies")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"dashboard did not start: {(folder / 'dashboard.log').read_text()[-2000:]}")
                time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("the dashboard ignored SIGTERM for 20 s")
        finally:
            log.close()


def test_api_lists_the_study_and_its_trials(dashboard: str) -> None:
    summaries = _get(dashboard + "/api/studies")["study_summaries"]
    assert sorted(s["study_name"] for s in summaries) == [STUDY, STUDY + ".verify"]
    study_id = next(s["study_id"] for s in summaries if s["study_name"] == STUDY)
    detail = _get(f"{dashboard}/api/studies/{study_id}")
    assert len(detail["trials"]) == N_TRIALS
    assert [t["state"] for t in detail["trials"]].count("Pruned") == 1


def _study_id(dashboard: str) -> int:
    return next(s["study_id"] for s in _get(dashboard + "/api/studies")["study_summaries"] if s["study_name"] == STUDY)


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_browser_shows_the_study_and_trials(dashboard: str, tmp_path: Path) -> None:
    study_id = _study_id(dashboard)
    dom = _chromium(tmp_path, "--dump-dom", f"{dashboard}/dashboard/studies/{study_id}/trials").stdout
    assert STUDY in dom
    for n in range(N_TRIALS):  # the trial list, rendered by the dashboard's JavaScript
        assert f"Trial {n}" in dom
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard-study.png"
    shot.unlink(missing_ok=True)
    done = _chromium(tmp_path, "--window-size=1280,900", f"--screenshot={shot}",
                     f"{dashboard}/dashboard/studies/{study_id}")
    assert shot.exists(), done.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 900)
        colours = im.convert("RGB").resize((64, 48)).getcolors(64 * 48)
    assert colours is not None and len(colours) > 20  # a rendered page, not a blank one


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_browser_shows_the_verdict_note_and_the_study_figure(dashboard: str, tmp_path: Path) -> None:
    page = f"{dashboard}/dashboard/studies/{_study_id(dashboard)}"
    note = _chromium(tmp_path, "--dump-dom", page + "/note").stdout
    assert "kdsweep verdict: " + STUDY in note  # the note, rendered from its Markdown
    assert "How much of the top is noise" in note and "Seed verification" in note
    assert "settled after 3 seeds" in note  # what the race settled
    top = _chromium(tmp_path, "--dump-dom", page).stdout
    assert 'data-unformatted="alpha x T: val_acc"' in top  # the study's own figure, drawn by plotly
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard-verdict.png"
    shot.unlink(missing_ok=True)
    done = _chromium(tmp_path, "--window-size=1280,1100", f"--screenshot={shot}", page + "/note")
    assert shot.exists(), done.stderr[-2000:]
    with Image.open(shot) as im:
        colours = im.convert("RGB").resize((64, 55)).getcolors(64 * 55)
    assert colours is not None and len(colours) > 20
