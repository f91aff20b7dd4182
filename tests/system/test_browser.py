"""The web app at /ui in a real browser (Debian's Chromium, driven by Selenium): sign in, generate, watch the
progress bar reach 100 %, see the image, find it in the history after a reload; with keys on, through the session
cookie. /docs renders offline. Skipped, saying why, where no Chromium and driver can be found. Screenshots go to
test_output/browser/ (CI keeps test_output/)."""

import io
import re
import shutil

import httpx
import pytest
from PIL import Image

from config import Settings
from helpers import DEADLINE_S, PROJECT_DIR, png_bytes
from sd_server.demo.personalisation import subject_photos

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-dev.txt)")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

SCREENSHOTS = PROJECT_DIR / "test_output" / "browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
ADMIN_KEY = "admin-key-for-the-browser-tests-012345"


@pytest.fixture
def browser(live_server_factory):
    """A headless Chromium at a phone-and-a-half width; skipped when Chromium or its driver is missing. Set up after the
    servers' fixture, it closes before the test's servers stop: what a page still loads at the end (a history's images)
    loads, and the console read at the end shows the app's errors, not a stopped server's."""
    if not (CHROMIUM and DRIVER):
        pytest.skip("no Chromium and chromedriver here: start.sh --test installs Debian's chromium and chromium-driver where apt-get works")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,1400"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(DEADLINE_S)
    yield driver
    errors = console_errors(driver)
    driver.quit()
    assert not errors, f"the browser's console showed errors: {errors}"


# The one error a browser logs by itself: the web app asks GET /session who it is signed in as, and before signing
# in (keys on) the answer is 401, which Chromium logs as a failed resource load. Nothing else is allowed.
SIGNED_OUT_PROBE = re.compile(r"/session - Failed to load resource: the server responded with a status of 401")


def console_errors(driver) -> list[str]:
    """The console's errors (script errors, console.error, failed loads, invalid patterns...) since the last call."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE" and not SIGNED_OUT_PROBE.search(entry["message"])]


def screenshot(driver, name: str) -> None:
    """Keep what the browser showed."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def wait(driver, condition, what: str):
    """Wait for ``condition`` with the suite's generous deadline; fail naming what was awaited and the page's errors."""
    try:
        return WebDriverWait(driver, DEADLINE_S, poll_frequency=0.2).until(condition)
    except Exception:
        errors = [element.text for element in driver.find_elements(By.CSS_SELECTOR, ".error") if element.text]
        screenshot(driver, f"failed-{what.replace(' ', '-')}")
        pytest.fail(f"{what}: not seen within {DEADLINE_S} s; errors on the page: {errors}")


def image_loaded(driver, selector: str):
    """A condition: an image matching ``selector`` has loaded pixels."""
    return lambda _: driver.execute_script(
        f"return [...document.querySelectorAll('{selector}')].some(image => image.complete && image.naturalWidth > 0)"
    )


def fill(driver, values: dict[str, str]) -> None:
    """Type each value into the field of that id, replacing what it held."""
    for field, value in values.items():
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)


def generate_and_see(driver, url: str, name: str) -> None:
    """Fill the form, generate, watch progress reach 100 %, see the image; then find it in the history after a reload."""
    wait(driver, expected_conditions.visibility_of_element_located((By.ID, "prompt")), "the generate form")
    fill(driver, {"prompt": "a photo of sks person", "steps": "3", "width": "256", "height": "256", "seed": "7"})
    driver.find_element(By.ID, "generate-button").click()
    wait(driver, lambda _: driver.find_element(By.ID, "progress").get_attribute("value") == "100", "the progress bar at 100 %")
    wait(driver, image_loaded(driver, "img.result"), "the generated image")
    screenshot(driver, f"{name}-generated")
    assert "seed 7" in driver.find_element(By.CSS_SELECTOR, "#results figcaption").text

    driver.get(f"{url}/ui/#history")
    driver.refresh()
    wait(driver, image_loaded(driver, ".history-item img"), "the image in the history after a reload")
    screenshot(driver, f"{name}-history")


def test_in_open_mode_the_web_app_generates_shows_progress_keeps_the_image_in_its_history_and_shows_model_and_admin(browser, live_server):
    browser.get(f"{live_server}/ui/")
    wait(browser, expected_conditions.visibility_of_element_located((By.ID, "prompt")), "the generate form")
    assert not browser.find_element(By.ID, "progress-box").is_displayed()  # no job yet: no progress bar
    assert browser.find_elements(By.CSS_SELECTOR, "#styles input[type=checkbox]")  # the style presets, as checkboxes

    generate_and_see(browser, live_server, "open")

    assert "open mode" in browser.find_element(By.ID, "who").text
    browser.find_element(By.LINK_TEXT, "My model").click()
    wait(browser, lambda driver: "Model\ndemo" in driver.find_element(By.ID, "model-info").text, "the user's model, as facts")
    browser.find_element(By.LINK_TEXT, "Admin").click()
    wait(browser, lambda driver: '"queue"' in driver.find_element(By.ID, "admin-health").text, "the queue and cache")
    screenshot(browser, "open-admin")


def test_the_live_preview_shows_under_the_progress_bar_while_a_job_runs(browser, live_server):
    browser.get(f"{live_server}/ui/")
    wait(browser, expected_conditions.visibility_of_element_located((By.ID, "prompt")), "the generate form")
    browser.execute_script(  # remember whether the preview was ever shown: it hides again when the job ends
        "window.previewShown = false; const preview = document.getElementById('preview');"
        "new MutationObserver(() => { if (!preview.hidden && preview.src.startsWith('data:image/jpeg')) window.previewShown = true; })"
        ".observe(preview, {attributes: true});"
    )
    fill(browser, {"prompt": "a red circle on a white background", "steps": "30", "width": "256", "height": "256", "seed": "3"})
    browser.find_element(By.ID, "generate-button").click()
    wait(browser, image_loaded(browser, "img.result"), "the generated image")

    assert browser.execute_script("return window.previewShown") is True  # SD_PREVIEW_EVERY (5): previews at steps 5, 10...
    assert not browser.find_element(By.ID, "preview").is_displayed()


def test_with_keys_on_a_user_signs_in_with_a_key_and_the_session_carries_events_and_images(browser, settings: Settings, live_server_factory):
    settings.admin_key = ADMIN_KEY
    url = live_server_factory(settings)
    key = httpx.post(f"{url}/keys", json={"user_id": "alice"}, headers={"X-API-Key": ADMIN_KEY}).json()["key"]
    browser.get(f"{url}/ui/")
    wait(browser, expected_conditions.visibility_of_element_located((By.ID, "api-key")), "the sign-in form")
    browser.find_element(By.ID, "api-key").send_keys(key)
    browser.find_element(By.CSS_SELECTOR, "#signin-form button").click()

    generate_and_see(browser, url, "signed-in")

    assert browser.find_element(By.ID, "who").text.startswith("alice (user)")
    assert browser.get_cookie("sd_session")["httpOnly"] is True
    assert not browser.find_element(By.ID, "nav-admin").is_displayed()
    browser.find_element(By.LINK_TEXT, "My model").click()
    wait(browser, lambda driver: "Model\ndemo" in driver.find_element(By.ID, "model-info").text, "alice's model")
    assert not browser.find_element(By.ID, "lora-form").is_displayed()  # an admin's route: not offered to a user key


def test_before_signing_in_only_the_sign_in_form_shows_and_the_fields_validate_their_patterns(browser, settings: Settings, live_server_factory):
    settings.admin_key = ADMIN_KEY
    url = live_server_factory(settings)
    browser.get(f"{url}/ui/")
    wait(browser, expected_conditions.visibility_of_element_located((By.ID, "api-key")), "the sign-in form")

    hidden = browser.execute_script("return ['nav', 'progress-box', 'view-generate'].map(id => document.getElementById(id).offsetParent === null)")
    browser.execute_script("document.getElementById('view-model').hidden = false")  # show the form to check it
    trigger = browser.find_element(By.ID, "training-trigger")
    trigger.clear()
    trigger.send_keys("not a word!")
    invalid = browser.execute_script("return document.getElementById('training-trigger').validity.patternMismatch")

    assert hidden == [True, True, True]
    assert invalid is True  # the pattern compiles under the v flag, so it validates


def test_the_api_docs_render_without_network(browser, live_server):
    browser.get(f"{live_server}/docs")  # any request off this server fails here and shows in the console check
    wait(browser, lambda driver: driver.find_elements(By.CSS_SELECTOR, ".opblock"), "Swagger UI's operations")
    browser.get(f"{live_server}/redoc")
    wait(browser, lambda driver: driver.find_elements(By.CSS_SELECTOR, "[data-section-id]"), "ReDoc's sections")
    screenshot(browser, "redoc")


def test_swagger_ui_shows_the_picture_generate_image_answers(browser, live_server):
    browser.get(f"{live_server}/docs#/generation/generate_image_generate_image_post")
    operation = wait(browser, lambda driver: driver.find_element(By.ID, "operations-generation-generate_image_generate_image_post"), "the operation")
    if not operation.find_elements(By.CSS_SELECTOR, ".try-out__btn"):
        operation.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait(browser, lambda _: operation.find_element(By.CSS_SELECTOR, ".try-out__btn"), "Try it out").click()
    body = wait(browser, lambda _: operation.find_element(By.CSS_SELECTOR, "textarea.body-param__text"), "the body editor")
    body.clear()
    body.send_keys('{"prompt": "a photo of sks person", "num_inference_steps": 2, "width": 256, "height": 256, "seed": 1}')
    operation.find_element(By.CSS_SELECTOR, "button.execute").click()

    wait(browser, image_loaded(browser, ".live-responses-table img"), "the picture in Swagger UI's response")
    screenshot(browser, "swagger-generate-image")


def test_a_result_sent_to_img2img_and_painted_on_is_inpainted(browser, live_server):
    browser.get(f"{live_server}/ui/")
    generate_and_see(browser, live_server, "before-inpainting")
    browser.get(f"{live_server}/ui/#history")
    wait(browser, image_loaded(browser, ".history-item img"), "the history")
    browser.find_element(By.XPATH, "//*[@id='history']//button[text()='Send to img2img']").click()
    mask = wait(browser, expected_conditions.visibility_of_element_located((By.ID, "mask-canvas")), "the mask canvas")
    ActionChains(browser).move_to_element_with_offset(mask, -20, -20).click_and_hold().move_by_offset(40, 40).release().perform()
    fill(browser, {"prompt": "a photo of sks person", "steps": "3"})  # the reload emptied the form
    browser.find_element(By.ID, "generate-button").click()

    wait(browser, lambda driver: '"mode": "inpaint"' in driver.execute_script("return document.querySelector('#results pre')?.textContent || ''"), "an inpainted result")
    wait(browser, image_loaded(browser, "img.result"), "the inpainted image")
    screenshot(browser, "inpainted")


def test_the_web_app_fits_a_phone_screen_and_every_control_is_reachable_by_keyboard(browser, live_server):
    browser.set_window_size(390, 844)
    browser.get(f"{live_server}/ui/")
    wait(browser, expected_conditions.visibility_of_element_located((By.ID, "prompt")), "the generate form")

    overflow = browser.execute_script("return document.documentElement.scrollWidth - document.documentElement.clientWidth")
    focusable = browser.execute_script(
        "return [...document.querySelectorAll('#view-generate input, #view-generate select, #view-generate textarea, #view-generate button')]"
        ".filter(e => e.offsetParent !== null).every(e => e.tabIndex >= 0)"
    )
    screenshot(browser, "phone")

    assert overflow <= 0, f"the page is {overflow} px wider than a 390 px screen"
    assert focusable


def test_a_user_trains_their_model_from_photos_in_the_web_app_and_sees_its_samples(browser, live_server, tmp_path):
    photos = []
    for index, picture in enumerate(subject_photos(3)):
        path = tmp_path / f"photo-{index}.png"
        picture.save(path)
        photos.append(str(path))
    browser.get(f"{live_server}/ui/#model")
    wait(browser, expected_conditions.visibility_of_element_located((By.ID, "training-photos")), "the training form")

    browser.find_element(By.ID, "training-photos").send_keys("\n".join(photos))
    fill(browser, {"training-class": "shape", "training-steps": "2", "training-resolution": "64"})  # not a person: no face to find
    browser.find_element(By.ID, "training-button").click()

    wait(browser, lambda driver: driver.find_element(By.ID, "training-progress").get_attribute("value") == "100", "the training done")
    wait(browser, image_loaded(browser, "img.sample"), "a sample of the trained model")
    wait(browser, lambda driver: "your own, trained from your photos" in driver.find_element(By.ID, "model-info").text, "the trained model as the user's")
    wait(browser, image_loaded(browser, "#model-samples img.sample"), "the trained model's samples on its page")
    assert "loras/" not in browser.find_element(By.ID, "view-model").text  # no internal path
    screenshot(browser, "trained")



def test_a_generated_image_shows_its_badge_and_its_provenance_and_any_picture_can_be_verified(browser, settings, live_server_factory, tmp_path):
    settings.models_dir = PROJECT_DIR / "models"  # the demo model draws pictures (random weights draw noise, no place for a mark)
    live_server = live_server_factory(settings)
    browser.get(f"{live_server}/ui/")
    wait(browser, expected_conditions.visibility_of_element_located((By.ID, "prompt")), "the generate form")
    fill(browser, {"prompt": "a red circle on a white background", "steps": "10", "width": "256", "height": "256", "seed": "5"})
    browser.find_element(By.ID, "generate-button").click()
    wait(browser, image_loaded(browser, "img.result"), "the generated image")
    assert "AI-generated" in browser.find_element(By.CSS_SELECTOR, "#results figcaption").text

    browser.find_element(By.XPATH, "//button[text()='Check provenance']").click()
    wait(browser, lambda driver: "signature valid, trusted" in driver.find_element(By.CSS_SELECTOR, "#results .provenance").text, "the credentials checked")
    assert "(this service)" in browser.find_element(By.CSS_SELECTOR, "#results .provenance").text  # the watermark read back
    screenshot(browser, "provenance-checked")
    served = tmp_path / "served.jpg"
    served_png = httpx.get(browser.find_element(By.CSS_SELECTOR, "img.result").get_attribute("src")).content
    Image.open(io.BytesIO(served_png)).convert("RGB").save(served, quality=75)  # as shared: a JPEG, no metadata left
    plain = tmp_path / "plain.png"
    plain.write_bytes(png_bytes(seed=4, size=128))

    browser.get(f"{live_server}/ui/#verify")
    wait(browser, expected_conditions.visibility_of_element_located((By.ID, "verify-file")), "the verify form")
    verdicts = {}
    for picture in (served, plain):
        browser.find_element(By.ID, "verify-file").send_keys(str(picture))
        browser.find_element(By.ID, "verify-button").click()
        wait(browser, lambda driver: "Watermark" in driver.find_element(By.ID, "verify-result").text, f"{picture.name} verified")
        verdicts[picture.name] = browser.find_element(By.ID, "verify-result").text
        browser.find_element(By.ID, "verify-file").clear()
    assert "yes: marked as made by an AI model" in verdicts["served.jpg"] and "(this service)" in verdicts["served.jpg"]
    assert "no mark says so" in verdicts["plain.png"] and "none found" in verdicts["plain.png"]

    browser.get(f"{live_server}/ui/#history")
    wait(browser, lambda driver: "AI-generated" in driver.find_element(By.ID, "history").text, "the badge on the image in the history")
