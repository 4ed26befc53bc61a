"""A radiologist reviews an AI result in a real headless Chromium, against a live server.

Debian's chromium and chromedriver are used as installed; the test is skipped, saying which is
missing, only where they are not. Screenshots of the worklist and the review page are kept in
``$PYTEST_ARTIFACTS`` (else ``artifacts/`` in the repository) and in the test's tmp_path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Group, User

from inference import services
from inference.models import AuditEvent, Prediction, Review
from tests.conftest import ROOT, wait_for
from tests.inference.conftest import LABELS, SPECS, make_model_files
from tests.inference.test_review import analysed_radiograph

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PASSWORD = "a-test-password-for-the-browser"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """A headless Chromium with a fresh profile, driven through the installed chromedriver."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.skip(f"no browser to drive: {', '.join(missing)} not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1600,1500",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def prediction(transactional_db: None, settings: Any, tmp_path: Path) -> Prediction:
    """A real chest X-ray result with its Grad-CAM heatmap, from a tiny active model."""
    settings.INFERENCE_MODELS_DIR = tmp_path / "models"
    settings.INFERENCE_OUTPUT_DIR = tmp_path / "outputs"
    settings.INFERENCE_GRADCAM = "always"
    onnx_file, weights_file, architecture = make_model_files("cxr2d", tmp_path)
    model = services.model_version_register(
        name="tiny-cxr2d", version="1", task="cxr2d", architecture=architecture,
        class_labels=LABELS["cxr2d"], positive_label="PNEUMONIA", threshold=0.5,
        preprocessing=SPECS["cxr2d"].to_dict(), onnx_file=onnx_file, weights_file=weights_file,
    )  # fmt: skip
    services.model_version_activate(model_version=model)
    return analysed_radiograph()


@pytest.fixture
def radiologist(transactional_db: None, settings: Any) -> User:
    # The live server speaks plain HTTP; production's Secure cookies would never come back.
    settings.SESSION_COOKIE_SECURE = settings.CSRF_COOKIE_SECURE = False
    user = User.objects.create_user(username="dr-house", password=PASSWORD, is_staff=True)
    user.groups.add(Group.objects.get_or_create(name="radiologist")[0])
    return user


def screenshot(driver: Any, name: str, tmp_path: Path) -> None:
    """Keep a screenshot of the page among the test artefacts and in ``tmp_path``."""
    folder = Path(os.environ.get("PYTEST_ARTIFACTS") or ROOT / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    png = driver.get_screenshot_as_png()
    for target in (folder / name, tmp_path / name):
        target.write_bytes(png)


def loaded(driver: Any, element: Any) -> bool:
    return bool(
        driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", element)
    )


def test_a_radiologist_reviews_a_result_seeing_its_heatmap(
    live_server: Any, browser: Any, prediction: Prediction, radiologist: User, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    other_label = next(label for label in LABELS["cxr2d"] if label != prediction.label)
    browser.get(f"{live_server.url}/admin/login/?next=/admin/inference/prediction/")
    browser.find_element(By.NAME, "username").send_keys(radiologist.username)
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()

    heatmap = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "img.ai-heatmap"), timeout=30)
    image = browser.find_element(By.CSS_SELECTOR, "img.ai-image")
    wait_for(lambda: loaded(browser, heatmap[0]) and loaded(browser, image), timeout=30)
    assert "not for diagnostic use" in browser.find_element(By.CLASS_NAME, "ai-notice").text
    assert "tiny-cxr2d 1" in browser.find_element(By.ID, "result_list").text
    screenshot(browser, "review-worklist.png", tmp_path)

    browser.find_element(By.LINK_TEXT, "Review").click()
    wait_for(lambda: browser.find_elements(By.ID, "review-form"), timeout=30)
    page_heatmap = browser.find_element(By.ID, "ai-heatmap")
    wait_for(lambda: loaded(browser, page_heatmap), timeout=30)
    browser.find_element(By.CSS_SELECTOR, "input[name=verdict][value=corrected]").click()
    Select(browser.find_element(By.NAME, "corrected_label")).select_by_value(other_label)
    browser.find_element(By.NAME, "comment").send_keys("Seen in the browser test.")
    screenshot(browser, "review-form.png", tmp_path)
    browser.find_element(By.CSS_SELECTOR, "#review-form input[type=submit]").click()

    saved = wait_for(
        lambda: browser.find_elements(By.CSS_SELECTOR, ".messagelist .success"), timeout=30
    )
    assert f"Review of prediction #{prediction.pk} saved." in saved[0].text
    latest = browser.find_element(By.CSS_SELECTOR, "td.field-latest_review").text
    assert f"corrected label: {other_label}" in latest
    assert radiologist.username in latest
    screenshot(browser, "review-worklist-after.png", tmp_path)

    browser.find_element(By.CSS_SELECTOR, ".field-id a").click()
    detail_heatmap = wait_for(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#content-main img.ai-heatmap"), timeout=30
    )
    wait_for(lambda: loaded(browser, detail_heatmap[0]), timeout=30)
    assert (
        f"corrected label: {other_label} by {radiologist.username}"
        in browser.find_element(By.ID, "content-main").text
    )
    screenshot(browser, "prediction-detail.png", tmp_path)
    review = Review.objects.get(prediction=prediction)
    assert (review.reviewer, review.verdict, review.corrected_label, review.comment) == (
        radiologist,
        "corrected",
        other_label,
        "Seen in the browser test.",
    )
    viewed = AuditEvent.objects.filter(user=radiologist, action="view", object_id=prediction.pk)
    assert {path.rsplit("/", 1)[-1] for path in viewed.values_list("path", flat=True)} >= {
        "heatmap.png",
        "thumbnail.png",
    }
