"""app.py in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright): train, generate, compare.

Screenshots go to pytest's tmp dir, and also to $LOLDU_SCREENSHOT_DIR when set (docs/app.png comes from here).
"""
import contextlib
import os
import re
import shutil
from pathlib import Path

import pytest

from test_app import CONCEPT, app_server  # noqa: F401  (the fixture: `python app.py` on the tiny pipeline)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                       reason=f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)"),
]


@contextlib.contextmanager
def chromium():
    """Debian's headless Chromium driven by Playwright: yields (browser, Playwright's `expect`); closed afterwards."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser, sync_api.expect
        finally:
            browser.close()


def screenshot(page, tmp_path: Path, name: str) -> Path:
    """Full-page PNG in tmp_path, copied to $LOLDU_SCREENSHOT_DIR when that is set."""
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("LOLDU_SCREENSHOT_DIR"):
        dest = Path(os.environ["LOLDU_SCREENSHOT_DIR"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest / name)
    return path


def set_number(page, elem_id: str, value, expect) -> None:
    """Type into a Gradio number box (a slider's or a plain Number) and wait until the component holds the value.

    On a loaded machine the first fill can land while the component is still mounting and be overwritten,
    so the value is re-typed until the component shows it.
    """
    box = page.locator(f"#{elem_id} input[type=number]")
    shown = page.locator(f"#{elem_id} input[type=range]") if page.locator(
        f"#{elem_id} input[type=range]").count() else box
    expect(box).to_be_editable()
    for attempt in range(5):
        box.fill(str(value))
        box.press("Tab")  # blur commits the value in both sliders and number boxes
        try:
            expect(shown).to_have_value(str(value), timeout=2_000)
            expect(box).to_have_value(str(value), timeout=2_000)
            return
        except AssertionError:
            if attempt == 4:
                raise


def test_upload_train_generate_in_chromium(app_server, tmp_path):  # noqa: F811
    url, lib = app_server
    with chromium() as (browser, expect):
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(30_000)
        page.goto(url)

        # Train: too few images is refused with one line; then 3 images, thumbnails, the prompt helper, 2 steps
        uploads = page.locator("#train-images input[type=file]")
        uploads.set_input_files([str(p) for p in CONCEPT[:2]])
        expect(page.locator("#train-thumbs img")).to_have_count(2)
        page.locator("#class-noun textarea").fill("robot")
        page.get_by_role("button", name="Suggest prompt").click()
        expect(page.locator("#instance-prompt textarea")).to_have_value("a photo of sks robot")
        page.locator("#adapter-name textarea").fill("browser-robot")
        page.locator("#train-start").click()
        expect(page.get_by_text("upload at least 3 images of the concept (got 2)").first).to_be_visible()
        assert "Traceback" not in page.content()
        page.locator("#train-images button[aria-label='Clear']").first.click()
        uploads.set_input_files([str(p) for p in CONCEPT[:3]])
        expect(page.locator("#train-thumbs img")).to_have_count(3)
        page.get_by_text("Settings").click()
        set_number(page, "train-steps", 2, expect)
        set_number(page, "train-every", 2, expect)  # previews: the final validation only (keeps the test fast)
        set_number(page, "train-lr", "0.005", expect)
        page.locator("#train-start").click()
        expect(page.locator("#train-progress[data-state=done]")).to_be_visible(timeout=180_000)
        expect(page.locator("#train-progress")).to_contain_text("step 2/2")
        expect(page.locator("#train-previews img").first).to_be_visible()
        screenshot(page, tmp_path, "app.png")

        # Generate: pick the new adapter, 1 image, 2 steps
        page.get_by_role("tab", name="Generate").click()
        pick = page.locator("#gen-adapter-0 input")
        pick.click()
        page.get_by_role("option", name="browser-robot").click()
        page.locator("#gen-prompt textarea").fill("a photo of sks robot on the beach")
        set_number(page, "gen-steps", 2, expect)
        page.locator("#gen-go").click()
        expect(page.locator("#gen-gallery img")).to_have_count(1, timeout=120_000)
        expect(page.locator("#gen-status")).to_contain_text("1 image(s) with browser-robot")
        screenshot(page, tmp_path, "app_generate.png")

        # Compare: the new concept and the base model in one batch, each image captioned with its concept
        page.get_by_role("tab", name="Compare").click()
        page.locator("#cmp-adapters input").click()
        page.get_by_role("option", name="browser-robot").click()
        page.keyboard.press("Escape")
        page.locator("#cmp-prompt textarea").fill("a photo of sks robot on the beach")
        set_number(page, "cmp-steps", 2, expect)
        page.locator("#cmp-go").click()
        expect(page.locator("#cmp-gallery img")).to_have_count(2, timeout=120_000)
        expect(page.locator("#cmp-status")).to_contain_text("2 images in one batch: browser-robot, base model")
        expect(page.locator("#cmp-gallery")).to_contain_text("browser-robot")
        expect(page.locator("#cmp-gallery")).to_contain_text("base model")
        screenshot(page, tmp_path, "app_compare.png")

        # Library: the adapter is listed with its size in KB
        page.get_by_role("tab", name="Library").click()
        row = page.locator("#library-table tr[data-adapter='browser-robot']")
        expect(row).to_be_visible()
        size = row.locator("td.size").inner_text()
        assert re.fullmatch(r"\d+\.\d KB", size), size
        kb = (lib / "browser-robot" / "pytorch_loldu_weights.safetensors").stat().st_size / 1024
        assert size == f"{kb:.1f} KB"
        screenshot(page, tmp_path, "app_library.png")


def fill_train_form(page, name: str, steps: int, expect) -> None:
    """Upload 3 concept images, write the prompt and adapter name, set the steps (previews only at the end)."""
    page.locator("#train-images input[type=file]").set_input_files([str(p) for p in CONCEPT[:3]])
    expect(page.locator("#train-thumbs img")).to_have_count(3)
    page.locator("#instance-prompt textarea").fill("a photo of sks robot")
    page.locator("#adapter-name textarea").fill(name)
    page.get_by_text("Settings").click()
    set_number(page, "train-steps", steps, expect)
    set_number(page, "train-every", 2000, expect)


def test_cancel_withdraws_a_queued_job_in_chromium(app_server, tmp_path):  # noqa: F811
    """Two browser sessions: B queues behind A's running job, cancels while waiting, and nothing of B's is trained."""
    url, lib = app_server
    with chromium() as (browser, expect):
        a, b = (browser.new_context().new_page() for _ in range(2))  # separate contexts: two sessions
        for page in (a, b):
            page.set_default_timeout(30_000)
            page.goto(url)
        fill_train_form(a, "long-run", 2000, expect)
        a.locator("#train-start").click()
        expect(a.locator("#train-progress")).to_contain_text(re.compile(r"step [1-9]\d*/2000"), timeout=90_000)

        fill_train_form(b, "withdrawn", 2, expect)
        b.locator("#train-start").click()
        expect(b.locator("#train-status")).to_contain_text("you are queued")
        b.locator("#train-cancel").click()
        expect(b.get_by_text("your queued training job is withdrawn").first).to_be_visible()
        assert a.locator("#train-progress[data-state=done]").count() == 0  # A's job runs on

        a.locator("#train-cancel").click()
        expect(a.locator("#train-progress[data-state=cancelled]")).to_be_visible(timeout=120_000)
        expect(b.locator("#train-status")).to_contain_text("Cancelled before it started", timeout=120_000)
        screenshot(b, tmp_path, "app_queued_cancel.png")
        assert (lib / "long-run").is_dir() and not (lib / "withdrawn").exists()
        assert "Traceback" not in a.content() + b.content()
