"""Take docs/img/web-page.png: the chat page of `esc-evolve serve` on the default backbone, in headless chromium.

    .venv/bin/python docs/img/web_page_screenshot.py [--model smollm2-135m-instruct] [--out docs/img/web-page.png]

Serves MODEL with the packaged risk detector and a throwaway seeker store (profile every message), types three
messages written for this picture (the last one at risk, so the resources panel shows) and saves the page.
Needs chromium, chromedriver and selenium (see tests/test_web_page.py)."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from esc_evolve.cli.model_arg import resolve_model
from esc_evolve.generation import build_generator
from esc_evolve.safety import SafetyGuard
from esc_evolve.serving import SeekerStore
from esc_evolve.serving.app import create_app
from esc_evolve.serving.live import serving

MESSAGES = [
    "I moved to a new city for work two months ago and I still don't know anyone here.",
    "Weekends are the worst. I just sit in my flat and scroll my phone.",
    "Some nights I think everyone would be better off without me.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("web-page.png"))
    args = parser.parse_args()
    overrides = ["serve.profile_every=1", "generation.max_new_tokens=60"]
    config, model, adapter, name = resolve_model(args.model, None, overrides)
    with tempfile.TemporaryDirectory() as tmp, build_generator(model, config.generation, adapter) as engine:
        store = SeekerStore(Path(tmp) / "seekers.db")
        app = create_app(engine, config, SafetyGuard(config.safety), store, name)
        with serving(app, start_timeout=60) as url:
            driver = browser()
            try:
                driver.get(url)
                until(driver, lambda d: "model:" in d.find_element(By.ID, "model").text)
                seeker = driver.find_element(By.ID, "seeker").get_attribute("value")
                for message in MESSAGES[:-1]:
                    say(driver, message)
                until(driver, lambda d: store.export(seeker)["profiles"])
                driver.refresh()  # opened again: the stored conversation and the newest profile
                until(driver, lambda d: d.find_elements(By.ID, "profile-fields"))
                say(driver, MESSAGES[-1])
                driver.save_screenshot(str(args.out))
            finally:
                driver.quit()
    print(f"wrote {args.out}")


def browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1200"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)


def say(driver: webdriver.Chrome, message: str) -> None:
    """Type a message and wait until its reply is complete."""
    done = "#log .supporter[data-done]"
    count = len(driver.find_elements(By.CSS_SELECTOR, done))
    driver.find_element(By.ID, "message").send_keys(message, "\n")
    until(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, done)) > count)


def until(driver: webdriver.Chrome, condition, timeout: float = 300):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


if __name__ == "__main__":
    main()
