"""/dashboard and /dashboard/status.json: versions, aliases and their history, detector plots with
thresholds, SLOs, incidents with their actions; rendered in a real headless Chromium (the system
browser, through Selenium and the system chromedriver), with a screenshot check that the plots
were drawn (non-blank pixels inside each plot, in the line colours)."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from monitor_helpers import Finished, StaticFleet, features, policy, registry_with_two

from trustmoe.serve import dashboard
from trustmoe.serve.monitoring import LiveMonitor


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[LiveMonitor, StaticFleet]]:
    reg, fleet = registry_with_two(tmp_path)
    lm = LiveMonitor(fleet, policy(), registry=reg).start()
    rng = np.random.default_rng(7)
    for i in range(300):
        key = "demo@2" if i % 5 == 0 else "demo@1"
        fleet.finish(Finished(key, f"r{i}", status=500 if i % 50 == 3 else 200,
                              features=features(rng, 1.0 if key == "demo@2" else 0.0)))
    assert lm.drain(120)
    yield lm, fleet
    lm.stop()
    reg.close()


def _app(lm: LiveMonitor) -> FastAPI:
    app = FastAPI()
    app.include_router(dashboard.router(lm.status))
    return app


def test_page_and_status_json(live: tuple[LiveMonitor, StaticFleet], live_server: Any) -> None:
    lm, fleet = live
    with live_server(_app(lm)) as srv:
        st = httpx.get(f"{srv.url}/dashboard/status.json", timeout=30).json()
        page = httpx.get(f"{srv.url}/dashboard", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert st["canary_percent"] == 0.0 and fleet.percent == 0.0
    inc = next(i for i in st["incidents"] if i["version"] == "demo@2" and i["action_result"])
    assert inc["action_result"] == "canary demo@2 set to 0% of traffic"
    text = page.text
    assert "http://" not in text.replace(srv.url, "") and "https://" not in text  # nothing from outside
    for needle in ("demo@1", "demo@2", "production", "canary", "promote", inc["id"],
                   "canary demo@2 set to 0% of traffic", "expected run time", "max_error_rate"):
        assert needle in text, needle
    n_plots = sum(len(v["detectors"]) for v in st["versions"].values())
    assert text.count('<svg class="plot"') == n_plots >= 8
    assert 'class="thr"' in text and 'class="st"' in text


def test_render_without_windows_or_registry() -> None:
    html = dashboard.render({"versions": {"x@1": {"info": {"role": "production"}, "detectors": {
        "tokens": {"explain": "PSI", "history": []}}, "slo": {}}}, "served": [], "incidents": []})
    assert "no window yet" in html and "not served from a registry" in html
    assert "<script" not in html


def _chromium() -> tuple[str, str] | None:
    browser = os.environ.get("TRUSTMOE_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("TRUSTMOE_TEST_CHROMEDRIVER") or shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def test_dashboard_in_headless_chromium(live: tuple[LiveMonitor, StaticFleet], live_server: Any,
                                        tmp_path: Path) -> None:
    found = _chromium()
    if found is None:
        msg = ("headless Chromium not found: see .ci/services.d/20-chromium.sh "
               "(apt-get install chromium chromium-driver)")
        if os.environ.get("CI"):
            pytest.fail(msg, pytrace=False)  # under CI a missing browser is a failure, never a skip
        pytest.skip(msg)
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    browser, driver_bin = found
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1400,3000", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(a)
    lm, _ = live
    with live_server(_app(lm)) as srv:
        drv = webdriver.Chrome(options=opts, service=Service(executable_path=driver_bin))
        try:
            drv.get(f"{srv.url}/dashboard")
            assert drv.title == "trustmoe monitor"
            assert drv.find_element(By.CSS_SELECTOR, "table.versions").text.count("demo@") == 2
            assert "canary demo@2 set to 0% of traffic" in drv.find_element(By.CSS_SELECTOR, "table.incidents").text
            assert "promote" in drv.find_element(By.CSS_SELECTOR, "table.aliases").text
            plots = drv.find_elements(By.CSS_SELECTOR, "svg.plot")
            assert len(plots) >= 8
            shot = Image.open(io.BytesIO(drv.get_screenshot_as_png())).convert("RGB")
            scale = shot.width / drv.execute_script("return window.innerWidth")
            checked = 0
            for el in plots:
                name, version = el.get_attribute("data-detector"), el.get_attribute("data-version")
                drv.execute_script("arguments[0].scrollIntoView({block: 'center'})", el)
                shot = Image.open(io.BytesIO(drv.get_screenshot_as_png())).convert("RGB")
                r = drv.execute_script("const b = arguments[0].getBoundingClientRect();"
                                       "return [b.left, b.top, b.right, b.bottom];", el)
                box = tuple(round(v * scale) for v in r)
                px = np.asarray(shot.crop(box)).astype(int)  # (h, w, 3)
                assert px.shape[0] > 50 and px.shape[1] > 200, (name, px.shape)
                nonwhite = (px.sum(-1) < 600).mean()
                blue = ((px[..., 2] > 150) & (px[..., 0] < 90)).sum()  # the statistic line #1f5fbf
                red = ((px[..., 0] > 150) & (px[..., 0] - px[..., 1] > 60)).sum()  # threshold #c0392b
                shot.crop(box).save(tmp_path / f"{version}-{name}.png")
                hist = lm.status()["versions"][version]["detectors"][name]["history"]
                if hist:
                    assert nonwhite > 0.01, (name, nonwhite)
                    assert blue > 10 and red > 30, (name, blue, red)  # a one-window plot: a dot
                    checked += 1
            assert checked >= 4  # the canary's drift detectors all have windows
        finally:
            drv.quit()
