"""The page of `classifier serve` in a real browser: headless Chromium under
Selenium 4 uploads photos through the file input, pastes image URLs, picks a
model and gives the API key, as a person would, and checks what the page
shows. tests/page.rs runs it against a server it starts; by hand:

    python tests/page_browser.py http://127.0.0.1:8080 \
        --photo ../shared/fixtures/birds/images/owl.jpg "Athene cunicularia"

Chromium is $CLASSIFIER_TEST_CHROMIUM or /usr/bin/chromium, its driver
$CLASSIFIER_TEST_CHROMEDRIVER or /usr/bin/chromedriver (given, so Selenium
never looks for one on the network). Exits 0 when every check holds, else 1
saying what the page showed.
"""

import argparse
import os
import re
import signal
import sys

from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

# Seconds for one card to be classified (the real model in a debug build).
WAIT = 90
# The whole run: past it the browser is closed and the run fails, rather
# than being killed by the caller with Chromium left behind.
DEADLINE = 200


class Failed(Exception):
    pass


def check(condition, message):
    if not condition:
        raise Failed(message)


def browser():
    options = Options()
    options.binary_location = os.environ.get("CLASSIFIER_TEST_CHROMIUM", "/usr/bin/chromium")
    for arg in [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1200,1000",
        # Only the loopback server: no proxy, and none of Chromium's own traffic.
        "--no-proxy-server",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-domain-reliability",
        "--no-first-run",
    ]:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(os.environ.get("CLASSIFIER_TEST_CHROMEDRIVER", "/usr/bin/chromedriver"))
    return webdriver.Chrome(options=options, service=service)


def cards(driver, source):
    # Compared in Python: sources are URLs and file names, awkward to quote in CSS.
    return [e for e in driver.find_elements(By.CSS_SELECTOR, "#results .result") if e.get_attribute("data-source") == source]


def settled(driver, source, states=("done", "error")):
    """The card of `source` once it is in one of `states`."""

    def ready(d):
        found = cards(d, source)
        return found[-1] if found and found[-1].get_attribute("data-state") in states else False

    try:
        return WebDriverWait(driver, WAIT).until(ready)
    except TimeoutException:
        found = cards(driver, source)
        shown = found[-1].text if found else "no card"
        raise Failed(f"{source}: not {' or '.join(states)} after {WAIT} s; the page shows: {shown!r}")


def shows_label(driver, source, label, thumbnail):
    """The card of `source` shows `label` first, among three predictions
    with their scores in percent, best first, under its thumbnail."""
    card = settled(driver, source)
    state = card.get_attribute("data-state")
    check(state == "done", f"{source}: {state}: {card.text!r}")
    predictions = card.find_elements(By.CSS_SELECTOR, ".prediction")
    labels = [p.find_element(By.CSS_SELECTOR, ".label").text for p in predictions]
    scores = [p.find_element(By.CSS_SELECTOR, ".score").text for p in predictions]
    check(len(predictions) == 3, f"{source}: {len(predictions)} predictions: {labels}")
    check(labels[0] == label, f"{source}: top-1 {labels[0]!r}, expected {label!r} (all: {labels})")
    check(all(re.fullmatch(r"\d+\.\d%", s) for s in scores), f"{source}: scores {scores}")
    values = [float(s[:-1]) for s in scores]
    check(values == sorted(values, reverse=True) and values[0] > 0, f"{source}: scores {scores}")
    widths = [p.find_element(By.CSS_SELECTOR, ".fill").value_of_css_property("width") for p in predictions]
    check(widths[0] != "0px", f"{source}: the first bar is empty ({widths})")
    image = card.find_element(By.CSS_SELECTOR, "img.thumb")
    src = image.get_attribute("src") or ""
    check(thumbnail(src), f"{source}: thumbnail {src!r}")
    driver.execute_script("arguments[0].scrollIntoView()", image)
    try:
        WebDriverWait(driver, 20).until(lambda d: d.execute_script("return arguments[0].naturalWidth", image) > 0)
    except TimeoutException:
        raise Failed(f"{source}: the thumbnail {src!r} did not load")
    print(f"ok: {source}: {labels[0]} {scores[0]}")


def shows_error(driver, source, error):
    card = settled(driver, source)
    state = card.get_attribute("data-state")
    text = card.find_element(By.CSS_SELECTOR, ".status").text
    check(state == "error" and text == error, f"{source}: {state} {text!r}, expected the error {error!r}")
    check(not card.find_elements(By.CSS_SELECTOR, ".prediction"), f"{source}: an error with predictions")
    print(f"ok: {source}: error {text!r}")


def upload(driver, paths):
    # One send_keys with the paths a line each: a multiple selection.
    driver.find_element(By.ID, "files").send_keys("\n".join(os.path.abspath(p) for p in paths))


def is_blob(src):
    return src.startswith("blob:")


def models_listed(driver, expected):
    WebDriverWait(driver, 20).until(lambda d: d.find_element(By.TAG_NAME, "html").get_attribute("data-models"))
    picker = driver.find_element(By.ID, "model-choice")
    if not expected:
        check(not picker.is_displayed(), "a model picker for a single model")
        print("ok: no model picker for one model")
        return
    check(picker.is_displayed(), "no model picker")
    options = Select(driver.find_element(By.ID, "model")).options
    names = [o.get_attribute("value") for o in options]
    check(names == expected, f"the picker lists {names}, expected {expected}")
    check(options[0].text.endswith("(default)"), f"the first option reads {options[0].text!r}")
    label = driver.find_element(By.CSS_SELECTOR, "label[for=model]").text
    check(label == "Model", f"the picker's label reads {label!r}")
    print(f"ok: the picker lists {names}")


def key_case(driver, url, photos, key):
    """Without the key the page says it is missing and shows the field; with
    it typed in, the same photos are classified; the key is remembered."""
    upload(driver, [p for p, _ in photos])
    for path, _ in photos:
        settled(driver, os.path.basename(path), states=("waiting", "error"))
    notice = driver.find_element(By.ID, "notice").text
    check("API key is missing or wrong" in notice, f"after a 401 the page says {notice!r}")
    field = driver.find_element(By.ID, "api-key")
    check(field.is_displayed(), "the API key field is hidden after a 401")
    check(driver.switch_to.active_element == field, "the API key field does not have the focus")
    print(f"ok: without the key: {notice!r}")
    field.send_keys(key + Keys.ENTER)
    for path, label in photos:
        shows_label(driver, os.path.basename(path), label, is_blob)
    check(driver.find_element(By.ID, "notice").text == "", "the 401 notice stays once the key works")
    driver.get(url)
    field = driver.find_element(By.ID, "api-key")
    check(field.is_displayed() and field.get_attribute("value") == key, "the key is not remembered")
    path, label = photos[0]
    upload(driver, [path])
    shows_label(driver, os.path.basename(path), label, is_blob)
    print("ok: the key is remembered")


def console_errors(driver):
    """What the browser refused or what threw: the policy blocking the
    page's own script or style shows here. Failed loads (a 401, a 404
    thumbnail) are expected."""
    entries = driver.get_log("browser")
    return [e["message"] for e in entries if "Content Security Policy" in e["message"] or "Uncaught" in e["message"]]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the page, such as http://127.0.0.1:8080/")
    parser.add_argument("--photo", nargs=2, action="append", default=[], metavar=("PATH", "LABEL"),
                        help="a photo to upload and its expected top-1 label")
    parser.add_argument("--link", nargs=2, action="append", default=[], metavar=("URL", "LABEL"),
                        help="an image URL to paste and its expected top-1 label")
    parser.add_argument("--broken-link", nargs=2, action="append", default=[], metavar=("URL", "ERROR"),
                        help="an image URL to paste and the error its card shows")
    parser.add_argument("--models", nargs="+", default=[], metavar="NAME",
                        help="the models the picker lists, the default first (none: no picker)")
    parser.add_argument("--other-model", nargs=3, metavar=("NAME", "PATH", "LABEL"),
                        help="pick this model, upload the photo, expect the label")
    parser.add_argument("--api-key", help="the server wants this key: first without it, then typed in")
    args = parser.parse_args()

    def too_long(*_):
        raise Failed(f"still running after {DEADLINE} s")

    signal.signal(signal.SIGALRM, too_long)
    signal.alarm(DEADLINE)
    driver = browser()
    try:
        driver.get(args.url)
        check(driver.title == "Classifier", f"title {driver.title!r}")
        models_listed(driver, args.models)
        if args.api_key:
            key_case(driver, args.url, args.photo, args.api_key)
        elif args.photo:
            upload(driver, [p for p, _ in args.photo])
            for path, label in args.photo:
                shows_label(driver, os.path.basename(path), label, is_blob)
        if args.link or args.broken_link:
            links = [u for u, _ in args.link + args.broken_link]
            driver.find_element(By.ID, "urls").send_keys("\n".join(links))
            driver.find_element(By.ID, "classify-urls").click()
            for link, label in args.link:
                shows_label(driver, link, label, lambda src, link=link: src == link)
            for link, error in args.broken_link:
                shows_error(driver, link, error)
        if args.other_model:
            name, path, label = args.other_model
            driver.find_element(By.ID, "clear").click()
            check(not driver.find_elements(By.CSS_SELECTOR, "#results .result"), "results left after clearing")
            Select(driver.find_element(By.ID, "model")).select_by_value(name)
            upload(driver, [path])
            shows_label(driver, os.path.basename(path), label, is_blob)
        errors = console_errors(driver)
        check(not errors, f"the browser's console: {errors}")
    except Failed as failure:
        print(f"FAILED: {failure}", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
        driver.quit()
    print("page: every check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
