"""The web console in a real browser: Debian's chromium (make browser) driven by Playwright for Python,
against a live stack (redis-server, a Celery worker, uvicorn). The steps of a new user: sign in,
upload the shared BraTS training cases, see the cohort and its case previews, start a tiny
augmentation and watch it reach succeeded, see the preview grid, download the zip and count it, see
the 422 table for a bad zip, cancel a job; the page stays usable on a narrow window, every field has a
label, and nothing breaks the Content-Security-Policy.

Screenshots go to ``$DHVAE_SCREENSHOTS`` (the README's are docs/console/, made by
``DHVAE_SCREENSHOTS=docs/console .venv/bin/python -m pytest tests/console``), else to the test's tmp dir.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.service.conftest import SHARED_TRAIN
from tests.service.stack import live_stack

pytestmark = pytest.mark.slow
CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-gpu",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WAIT_MS = 600_000  # a bound, not a speed target


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    yield from live_stack(tmp_path_factory.mktemp("console-stack"))


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed: make browser")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield b
        b.close()


def brats_zip(path: Path) -> Path:
    if not SHARED_TRAIN.is_dir():
        pytest.skip(f"{SHARED_TRAIN} is absent")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(SHARED_TRAIN.rglob("*")):
            if p.is_file() and p.name.startswith(("Flair", "OTMultiClass")):
                zf.write(p, "train/" + p.relative_to(SHARED_TRAIN).as_posix())
    return path


def test_a_new_user_s_session(stack, browser, tmp_path):
    shots = Path(os.environ.get("DHVAE_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
    page.on("dialog", lambda d: d.accept())

    def shot(name: str) -> None:
        page.screenshot(path=str(shots / f"{name}.png"), full_page=True)

    # sign in: a wrong key is refused in words, the right one opens the console
    page.goto(stack.url + "/")
    page.fill("#key", "wrong")
    page.click("#signin-button")
    expect(page.locator("#whoami")).to_contain_text("refused")
    assert page.is_hidden("#app")
    page.fill("#key", "key-a")
    page.click("#signin-button")
    page.wait_for_selector("#app", state="visible")
    shot("01-signed-in")

    # upload the shared BraTS training cases; the summary and the case previews appear
    page.set_input_files("#zip", str(brats_zip(tmp_path / "brats.zip")))
    page.wait_for_selector("#upload-result .ok", timeout=WAIT_MS)
    summary = page.text_content("#upload-result")
    assert "2 cases" in summary and "brats_2013_pat0005_1" in summary
    expect(page.locator('#case-previews img[src^="blob:"]')).to_have_count(2, timeout=WAIT_MS)
    assert page.locator("#cohort-table tbody tr").count() == 1
    shot("02-cohort")

    # every field of every job form has a label
    for kind in ("augmentations", "trainings", "generations", "evaluations"):
        page.select_option("#job-kind", kind)
        page.wait_for_selector(f"#job-fields #f-{'model_id' if kind == 'generations' else 'cohort_id'}")
        unlabelled = page.evaluate(
            "[...document.querySelectorAll('#job-fields input, #job-fields select')]"
            ".filter(el => !document.querySelector(`label[for='${el.id}']`)).map(el => el.id)"
        )
        assert unlabelled == [], (kind, unlabelled)

    # a tiny augmentation, followed live to succeeded
    page.select_option("#job-kind", "augmentations")
    page.wait_for_selector("#f-n_pairs")
    page.fill("#f-n_pairs", "3")
    page.fill("#f-steps", "3")
    page.select_option("#f-preset", "tiny")
    assert page.get_attribute("#f-steps", "max")  # the limit comes from the OpenAPI schema
    page.click("#start-job")
    page.wait_for_selector("#job-table tbody tr", timeout=WAIT_MS)
    shot("03-job-running")
    page.wait_for_selector("#job-table .state.succeeded", timeout=WAIT_MS)
    bar = page.locator("#job-table tbody tr progress").first
    assert bar.get_attribute("value") == bar.get_attribute("max")
    shot("04-job-succeeded")

    # the preview grid and the gallery's page, then the download
    page.click("#job-table tbody tr button:has-text('Results')")
    expect(page.locator('#preview[src^="blob:"]')).to_have_count(1, timeout=WAIT_MS)
    assert page.locator("#pair-table tbody tr").count() == 3
    shot("05-results")
    with page.expect_download(timeout=WAIT_MS) as dl:
        page.click("#download")
    data = Path(dl.value.path()).read_bytes()
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert sum("labelsTr/synth_" in n for n in names) == 3 and "manifest.json" in names

    # a bad zip: the 422 with its table of problems
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("case1/image.nii.gz", b"not a nifti")
    page.set_input_files("#zip", str(bad))
    page.wait_for_selector("#upload-result table.problems", timeout=WAIT_MS)
    assert "422" in page.text_content("#upload-result")
    shot("06-upload-refused")

    # cancel a long training, confirming the dialog
    page.select_option("#job-kind", "trainings")
    page.wait_for_selector("#f-steps")
    page.fill("#f-steps", "5000")
    page.click("#start-job")
    page.wait_for_selector("#job-table tbody tr button:has-text('Cancel')", timeout=WAIT_MS)
    page.click("#job-table tbody tr button:has-text('Cancel')")
    page.wait_for_selector("#job-table .state.cancelled", timeout=WAIT_MS)
    shot("07-cancelled")

    # a narrow window: nothing wider than the screen
    page.set_viewport_size({"width": 390, "height": 800})
    too_wide = page.evaluate(
        "[...document.querySelectorAll('body *')].filter(el => el.getBoundingClientRect().right > "
        "window.innerWidth + 1 && !(el.parentElement && el.parentElement.closest('.table'))).map(el => el.tagName + '#' + el.id + '.' + el.className)"
    )
    widths = page.evaluate(
        "[document.documentElement.scrollWidth, window.innerWidth, document.body.scrollWidth, "
        "[...document.querySelectorAll('body *')].filter(el => el.getBoundingClientRect().right > window.innerWidth).length]"
    )
    assert too_wide == [] and widths[0] <= widths[1] + 1, (too_wide, widths)
    shot("08-narrow")
    assert not problems, problems


def test_docs_work_offline_with_local_assets(stack, browser):
    page = browser.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(stack.url + "/docs")
    page.wait_for_selector(".swagger-ui .opblock", timeout=WAIT_MS)
    assert all(u.startswith(stack.url) for u in requests), [
        u for u in requests if not u.startswith(stack.url)
    ]
