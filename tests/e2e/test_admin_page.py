"""The admin page in a real browser against a real node and a real Orthanc: one operator's whole day.

First admin and a viewer from the CLI (`dicom-ai-node users add`), sign in, write a rule in the form
(a bad regex is named next to its field), dry-run and replay the draft, save it, send a series with
`dicom-ai-node send`, watch the job reach "delivered, verified" on its stage timeline, edit the rule,
diff the two versions, roll back, sign out; then the viewer finds every write button disabled and a
forced write (with the page's own CSRF token) refused with 403.

Headless Debian Chromium through Python Playwright; screenshots (1366 x 768) go to
docs/screenshots/admin-*.png.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dicom_ai_node.devtools.node import NodeProcess
from dicom_ai_node.devtools.stack import orthanc_with_node
from dicom_ai_node.devtools.synthetic import FAKE_PATIENT_ID, FAKE_PATIENT_NAME, write_ct_series
from tests.support.browser import VIEWPORT, ConsoleWatch, chromium

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "docs" / "screenshots"
PASSWORD = {"admin1": "admin password 2026!", "viewer1": "viewer password 2026!"}
RULE_ID = "ct-phantom-classical"
DESCRIPTION = "Small chest CT phantom -> classical lung masks"
JOB_TIMEOUT_MS = 240_000
UI_TIMEOUT_MS = 15_000


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The installed `dicom-ai-node` console script of this environment."""
    script = Path(sys.executable).with_name("dicom-ai-node")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "dicom_ai_node.cli"]
    proc = subprocess.run(
        [*command, *args], input=stdin, capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, f"dicom-ai-node {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def add_user(node: NodeProcess, username: str, role: str) -> None:
    cli(
        "users",
        "add",
        username,
        "--role",
        role,
        "--password-stdin",
        "-c",
        str(node.config_path),
        stdin=PASSWORD[username] + "\n",
    )


def ct_phantom(directory: Path) -> Path:
    # 6 mm pixels and 10 mm slices make the phantom's lungs lung-sized, which ct-lung-classical needs;
    # 12 slices keep it under the default CT rule's minimum (20), so only the rule made here routes it.
    write_ct_series(directory, n_slices=12, pixel_spacing=(6.0, 6.0), slice_thickness=10.0)
    return directory


def send(node: NodeProcess, directory: Path) -> None:
    proc = cli(
        "send",
        str(directory),
        "--to",
        f"{node.ae_title}@127.0.0.1:{node.dicom_port}",
        "--calling-aet",
        "STORESCU",
    )
    assert "sent 12 instances" in proc.stdout


def series_uid_of(directory: Path) -> str:
    from pydicom import dcmread

    first = sorted(p for p in directory.iterdir() if p.is_file())[0]
    return str(dcmread(first, stop_before_pixels=True).SeriesInstanceUID)


def shot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"admin-{name}.png"
    page.screenshot(path=str(path))
    assert path.stat().st_size > 10_000  # a real rendering, not a blank page


def test_admin_page_end_to_end(tmp_path: Path) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=UI_TIMEOUT_MS)
    # api_account=False: no user at all, as on a fresh install, until the CLI makes the first admin.
    with orthanc_with_node(tmp_path, api_account=False) as (orthanc, node), chromium() as browser:
        page = browser.new_page(viewport=VIEWPORT)
        watch = ConsoleWatch(page)

        def t(name: str) -> Any:
            return page.locator(f'[data-test="{name}"]')

        def go(hash_path: str) -> None:
            page.goto(f"{node.http_url}/#{hash_path}")

        # -- first run: no user exists; the sign-in view says how to make the first admin.
        go("/jobs")
        expect(t("login-view")).to_be_visible()
        expect(t("no-users-hint")).to_contain_text("No user exists yet")
        expect(t("no-users-command")).to_have_text("dicom-ai-node users add NAME --role admin")

        add_user(node, "admin1", "admin")
        add_user(node, "viewer1", "viewer")
        page.reload()
        expect(t("login-view")).to_be_visible()
        expect(t("no-users-hint")).to_be_hidden()
        shot(page, "login")

        # a wrong password is refused in words, and nothing else happens
        sign_in(page, "admin1", "not the password")
        expect(t("login-error")).to_have_text("Wrong user name or password.")

        sign_in(page, "admin1", PASSWORD["admin1"])
        expect(t("current-user")).to_have_text("admin1")
        expect(t("current-role")).to_have_text("admin")
        expect(t("node-version")).to_contain_text("v")
        # login and /api/auth/me name the node: the header shows its AE title next to the version
        expect(t("node-name")).to_have_text(f"AE {node.ae_title}")

        # -- a first series arrives before the rule exists: no rule matches it ---------------------------
        first = ct_phantom(tmp_path / "ct-first")
        first_uid = series_uid_of(first)
        send(node, first)
        go("/series")
        row = page.locator(f'[data-test="series-row"][data-uid="{first_uid}"]')
        expect(row).to_be_visible(timeout=30_000)
        expect(row).to_contain_text("unmatched", timeout=30_000)

        # -- write the rule; a bad regex is named next to its field ------------------------------------
        go("/rules")
        expect(t("rules-table")).to_be_visible()
        t("new-rule").click()
        expect(t("rule-form")).to_be_visible()
        t("rule-id").fill(RULE_ID)
        t("rule-description").fill(DESCRIPTION)
        rows = t("condition-row")
        rows.nth(0).locator('[data-test="cond-value"]').fill("CT")
        t("add-condition").click()
        rows.nth(1).locator('[data-test="cond-attribute"]').select_option("SeriesDescription")
        rows.nth(1).locator('[data-test="cond-operator"]').select_option("regex")
        rows.nth(1).locator('[data-test="cond-value"]').fill("phantom(")
        t("add-condition").click()
        rows.nth(2).locator('[data-test="cond-attribute"]').select_option("NumberOfInstances")
        rows.nth(2).locator('[data-test="cond-operator"]').select_option("range")
        rows.nth(2).locator('[data-test="cond-min"]').fill("5")
        rows.nth(2).locator('[data-test="cond-max"]').fill("19")
        t("rule-model").select_option("ct-lung-classical")
        t("dest-pacs").check()
        t("rule-priority").fill("20")
        t("rule-quiet").fill("1")
        t("rule-comment").fill("phantom CTs to the classical model")

        regex_error = t("error-conditions.1.value")
        expect(regex_error).to_contain_text("regex")
        expect(t("validation-state")).to_have_attribute("data-state", "invalid")
        expect(t("error-conditions.0.value")).to_be_hidden()  # only the field at fault is marked
        # Saving anyway: the server refuses with 422 and the error stays at the same field.
        t("rule-save").click()
        expect(page.locator('[data-test="notice-error"]').last).to_contain_text("Not saved")
        expect(regex_error).to_contain_text("regex")
        expect(page).to_have_url(re.compile(r"#/rules/new$"))
        regex_error.scroll_into_view_if_needed()
        shot(page, "rule-editor-error")

        rows.nth(1).locator('[data-test="cond-value"]').fill("synthetic|phantom")
        expect(t("validation-state")).to_have_attribute("data-state", "valid")
        expect(regex_error).to_be_hidden()

        # -- dry-run the draft: against the received series, and against pasted attributes ------------
        t("dryrun-recent").select_option(first_uid)
        t("dryrun-run").click()
        match = t("dryrun-match")
        expect(match).to_have_count(1)
        expect(match).to_have_attribute("data-matched", "true")
        expect(match).to_contain_text("MATCH")
        expect(match).to_contain_text("Synthetic CT phantom")  # the value each condition saw
        t("dryrun-input").fill(
            json.dumps({"Modality": "MR", "SeriesDescription": "t1 phantom", "NumberOfInstances": 12})
        )
        t("dryrun-run").click()
        expect(match).to_have_attribute("data-matched", "false")
        expect(match).to_contain_text("no match")

        # -- replay: which of the last series the draft would route, and which saved rules also do ----
        t("replay-run").click()
        expect(t("replay-summary")).to_have_text("Would match 1 of the last 1 series.")
        replayed = t("replay-row")
        expect(replayed).to_have_count(1)
        expect(replayed).to_have_attribute("data-matched", "true")

        # -- save: version 1, in the history --------------------------------------------------------
        t("rule-save").click()
        expect(page).to_have_url(re.compile(rf"#/rules/{RULE_ID}$"))
        expect(t("rule-version")).to_have_text("v1")
        expect(t("version-row-1")).to_contain_text("admin1")
        expect(t("version-row-1")).to_contain_text("phantom CTs to the classical model")
        go("/rules")
        expect(t(f"rule-row-{RULE_ID}")).to_contain_text("ct-lung-classical")
        # highest priority first: ours (20) above the seeded MR rule (10)
        expect(page.locator('[data-test="rules-table"] tbody tr').first).to_have_attribute(
            "data-rule-id", RULE_ID
        )
        shot(page, "rules")

        # -- a second series is routed by it: the job reaches "delivered, verified" -----------------
        second = ct_phantom(tmp_path / "ct-second")
        second_uid = series_uid_of(second)
        send(node, second)
        go(f"/jobs?rule_id={RULE_ID}")
        job_row = page.locator('[data-test="jobs-table"] tbody tr[data-kind="infer"]')
        expect(job_row).to_have_count(1, timeout=60_000)
        expect(job_row).to_contain_text("ct-lung-classical")
        expect(t("updated")).to_have_text(re.compile(r"^updated \d\d:\d\d:\d\d$"))
        job_id = int(job_row.get_attribute("data-job-id") or 0)
        expect(job_row).to_have_attribute("data-status", "succeeded", timeout=JOB_TIMEOUT_MS)
        go("/jobs")  # every job: the infer job and its delivery
        expect(page.locator('[data-test="jobs-table"] tbody tr[data-job-id]')).to_have_count(2)
        # the delivery carries its rule and model too, so the list (and its filters) show them
        deliver_row = page.locator('[data-test="jobs-table"] tbody tr[data-kind="deliver"]')
        expect(deliver_row).to_contain_text(RULE_ID)
        expect(deliver_row).to_contain_text("ct-lung-classical")
        shot(page, "jobs")

        job_row = t(f"job-row-{job_id}")
        job_row.click()
        expect(page).to_have_url(re.compile(rf"#/jobs/{job_id}$"))
        expect(t("timeline-verified")).to_have_attribute("data-status", "done", timeout=JOB_TIMEOUT_MS)
        for stage in ("received", "complete", "routed", "inferred", "encoded", "delivered", "verified"):
            expect(t(f"timeline-{stage}")).to_have_attribute("data-status", "done")
        expect(t("job-status")).to_have_text("succeeded")
        expect(t("job-facts")).to_contain_text(RULE_ID)
        expect(t("job-results")).to_contain_text("SEG")
        expect(t("job-last-error")).to_have_text("None.")
        # retry needs a dead or failed job: disabled here even for an admin
        expect(t("job-retry")).to_be_disabled()
        expect(t("job-rerun")).to_be_enabled()
        shot(page, "job-timeline")
        assert_no_phi(page)

        deliver = t("related-jobs").locator("tbody tr[data-job-id]")
        expect(deliver).to_have_count(1)
        deliver.click()
        expect(t("job-verified")).to_have_text("✓ delivered, verified")
        expect(t("job-status")).to_have_text("succeeded")
        assert orthanc.series_by_modality(study_uid_of(second), "SEG"), "the SEG is not in Orthanc"

        # the destination answers C-ECHO from the page, and lists the verified delivery
        go("/destinations")
        t("test-pacs").click()
        expect(t("probe-result-pacs")).to_contain_text("reachable", timeout=30_000)
        expect(t("recent-pacs")).to_contain_text("verified")

        go(f"/series/{second_uid}")
        expect(t("series-facts")).to_contain_text(second_uid)
        assert_no_phi(page)

        # -- edit once more, diff v1 against v2, roll back to v1 -------------------------------------
        go(f"/rules/{RULE_ID}")
        expect(t("rule-version")).to_have_text("v1")
        t("rule-description").fill(DESCRIPTION + " (edited)")
        t("rule-priority").fill("25")
        t("rule-comment").fill("raise priority")
        expect(t("validation-state")).to_have_attribute("data-state", "valid")
        t("rule-save").click()
        expect(t("rule-version")).to_have_text("v2")
        t("pick-version-1").check()
        t("pick-version-2").check()
        diff = t("diff")
        expect(diff.locator(".line.del").filter(has_text="priority: 20")).to_have_count(1)
        expect(diff.locator(".line.add").filter(has_text="priority: 25")).to_have_count(1)
        expect(diff.locator(".line.add").filter(has_text="(edited)")).to_have_count(1)
        t("diff-panel").scroll_into_view_if_needed()
        shot(page, "rule-diff")

        page.once("dialog", lambda dialog: dialog.accept("back to the first version"))
        t("rollback-1").click()
        expect(t("rule-version")).to_have_text("v3")
        expect(t("rule-description")).to_have_value(DESCRIPTION)
        expect(t("rule-priority")).to_have_value("20")
        expect(t("version-row-3")).to_contain_text("back to the first version")

        # -- sign out: the session is gone on the server too -----------------------------------------
        t("sign-out").click()
        expect(t("login-view")).to_be_visible()
        assert page.evaluate("fetch('/api/auth/me').then(r => r.status)") == 401

        # -- the viewer sees everything, may change nothing ------------------------------------------
        sign_in(page, "viewer1", PASSWORD["viewer1"])
        expect(t("current-role")).to_have_text("viewer")
        expect(t("nav-users")).to_have_count(0)
        expect(t("nav-audit")).to_have_count(0)

        go("/rules")
        expect(t(f"rule-row-{RULE_ID}")).to_be_visible()
        for name in ("new-rule", "import-rules", f"rule-delete-{RULE_ID}", f"rule-up-{RULE_ID}"):
            expect(t(name)).to_be_disabled()
            expect(t(name)).to_have_attribute("title", "needs role admin")
        expect(t(f"rule-enabled-{RULE_ID}")).to_be_disabled()
        shot(page, "viewer")

        go(f"/rules/{RULE_ID}")
        expect(t("read-only-note")).to_be_visible()
        expect(t("rule-save")).to_be_disabled()
        expect(t("rule-save")).to_have_attribute("title", "needs role admin")
        expect(t("rollback-1")).to_be_disabled()
        # reading tools stay usable: a viewer may still dry-run a draft
        t("dryrun-recent").select_option(second_uid)
        t("dryrun-run").click()
        expect(t("dryrun-match")).to_have_attribute("data-matched", "true")

        go(f"/jobs/{job_id}")
        expect(t("timeline-verified")).to_have_attribute("data-status", "done")
        for verb in ("retry", "rerun", "cancel"):
            expect(t(f"job-{verb}")).to_be_disabled()
            expect(t(f"job-{verb}")).to_have_attribute("title", "needs role operator")
        go("/destinations")
        expect(t("test-pacs")).to_be_disabled()

        # a forced write with the page's own session and CSRF token: the server refuses it
        forced = page.evaluate(
            """async ([jobId, ruleId]) => {
                const me = await (await fetch('/api/auth/me')).json();
                const write = async (method, url, body) => {
                    const r = await fetch(url, {method, headers: {'Content-Type': 'application/json',
                        'X-CSRF-Token': me.csrf_token}, body: JSON.stringify(body)});
                    return {status: r.status, detail: (await r.json()).detail};
                };
                return {
                    csrf: me.csrf_token,
                    rerun: await write('POST', `/api/jobs/${jobId}/rerun`, {}),
                    rule: await write('POST', `/api/rules/${ruleId}/rollback`, {version: 2, comment: 'x'}),
                };
            }""",
            [job_id, RULE_ID],
        )
        assert forced["csrf"], "the viewer's session has a CSRF token"
        assert forced["rerun"] == {"status": 403, "detail": "needs role operator"}, forced
        assert forced["rule"] == {"status": 403, "detail": "needs role admin"}, forced

        # a page the role may not see says so, visibly
        go("/audit")
        expect(t("refusal")).to_contain_text("needs role admin")

        assert watch.problems == [], watch.problems


def sign_in(page: Any, username: str, password: str) -> None:
    page.locator('[data-test="login-username"]').fill(username)
    page.locator('[data-test="login-password"]').fill(password)
    page.locator('[data-test="login-submit"]').click()


def assert_no_phi(page: Any) -> None:
    text = page.content()
    assert FAKE_PATIENT_NAME not in text and FAKE_PATIENT_ID not in text


def study_uid_of(directory: Path) -> str:
    from pydicom import dcmread

    first = sorted(p for p in directory.iterdir() if p.is_file())[0]
    return str(dcmread(first, stop_before_pixels=True).StudyInstanceUID)
