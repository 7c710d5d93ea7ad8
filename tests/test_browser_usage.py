"""/usage in a real browser: Debian's chromium driven by Playwright, against the service
under uvicorn with a month of launches and builds recorded in its SQLite state. The
charts are there and name themselves, the numbers on the page are the JSON's, the CSV
parses to the same, nothing personal shows, it works without JavaScript and on a phone,
and bad parameters get one sentence. No Docker needed."""

from __future__ import annotations

import csv
import io
import itertools
import re
from collections.abc import Iterator

import pytest
import requests
from tests.conftest import shot
from tests.test_service_build import Service
from tests.test_usage import (
    History,
    assert_nothing_personal,
    at,
    days_ago,
    record_three_days,
    recorded_state,
)

from binderbox.service.usage import DAY_COLUMNS, REPOSITORY_COLUMNS, duration, percent

playwright_sync = pytest.importorskip("playwright.sync_api")
expect = playwright_sync.expect


def record_month(history: History) -> None:
    """Three detailed days (tests/test_usage.py) and four weeks before them: a few
    repositories launched a little more on weekdays, a build or two a day."""
    record_three_days(history)
    for ago in range(4, 30):
        day = days_ago(ago)
        busy = 3 + (ago * 7) % 11
        image = f"img-m{ago % 5}:{ago}"
        history.build(image, at(day, 8), 30 + (ago * 37) % 400)
        if ago % 3:  # a second, quicker build: the median and the 95th percentile differ
            history.build(f"img-q:{ago}", at(day, 12), 20 + (ago * 13) % 60)
        if ago % 6 == 0:
            history.build(f"img-fail:{ago}", at(day, 7), 20, status="failed")
        for n in range(busy):
            history.launch(f"gh/month/repo{n % 4}/main", at(day, 9, n), image=image)
        if ago % 4 == 0:
            history.launch("gh/month/broken/main", at(day, 15), status="failed", image="x:1")


@pytest.fixture(scope="module")
def usage_service(tmp_path_factory) -> Iterator[Service]:
    state = tmp_path_factory.mktemp("usage-state")
    recorded_state(state / "binderbox.sqlite", record_month)
    svc = Service(state_dir=str(state), usage_min_launches=10)
    yield svc
    svc.stop()


def test_the_charts_and_figures_are_the_numbers_of_the_json(usage_service, page):
    data = requests.get(usage_service.url + "/usage.json", timeout=30).json()
    totals = data["totals"]
    assert data["days"] == 30 and totals["launches"] > 100
    page.goto(usage_service.url + "/usage")
    expect(page).to_have_title("Usage · binderbox")

    chart = page.locator("svg#launch-chart")
    expect(chart).to_be_visible()
    assert chart.get_attribute("role") == "img"
    assert chart.get_attribute("aria-labelledby") == "launch-chart-title launch-chart-desc"
    expect(page.locator("#launch-chart-title")).to_have_text("Launches per day")
    desc = page.locator("#launch-chart-desc").text_content()
    assert desc.startswith(f"{totals['launches']} launches from {data['since']}")
    assert chart.locator("g.bar").count() == 30
    titles = chart.locator("g.bar > title").all_text_contents()
    for title, day in zip(titles, data["per_day"], strict=True):
        assert title.startswith(day["day"] + ": "), title
        assert title.endswith(
            f"({day['launches_succeeded']} succeeded, {day['launches_failed']} failed)"
        )
    # Bar heights are in proportion to the day's launches.
    heights = chart.locator("g.bar").evaluate_all(
        "gs => gs.map(g => [...g.querySelectorAll('rect:not(.hit)')]"
        ".reduce((s, r) => s + r.getBBox().height, 0))"
    )
    launches = [day["launches"] for day in data["per_day"]]
    per_launch = max(heights) / max(launches)
    for height, count in zip(heights, launches, strict=True):
        assert abs(height - count * per_launch) < 1.5, (heights, launches)
    builds = page.locator("svg#build-chart")
    expect(builds).to_be_visible()
    assert builds.locator("g.bar").count() == 30
    assert "median" in page.locator("#build-chart-title").text_content()

    expect(page.locator("#usage-launches")).to_have_text(str(totals["launches"]))
    expect(page.locator("#usage-launches-failed")).to_have_text(str(totals["launches_failed"]))
    expect(page.locator("#usage-cache-rate")).to_have_text(percent(totals["cache_hit_rate"]))
    expect(page.locator("#usage-cache-hits")).to_have_text(str(totals["cache_hits"]))
    expect(page.locator("#usage-build-median")).to_have_text(
        duration(totals["build_median_seconds"])
    )
    expect(page.locator("#usage-build-p95")).to_have_text(duration(totals["build_p95_seconds"]))
    expect(page.locator("#usage-pool")).to_have_text("no warm pool")

    # Each day's numbers, newest first, behind a disclosure that needs no script.
    table = page.locator("#usage-days")
    expect(table).to_be_hidden()
    page.locator("details > summary").click()
    expect(table).to_be_visible()
    rows = table.locator("tbody tr")
    expect(rows).to_have_count(30)
    for row, day in [(rows.nth(0), data["per_day"][-1]), (rows.nth(10), data["per_day"][-11])]:
        cells = row.locator("td").all_text_contents()
        assert cells[:6] == [
            day["day"],
            *(str(day[k]) for k in ("launches", "launches_succeeded")),
            *(str(day[k]) for k in ("cache_hits", "cache_misses", "builds")),
        ]
        assert cells[6] == duration(day["build_median_seconds"])

    repositories = page.locator("#usage-repositories tbody tr")
    expect(repositories).to_have_count(len(data["repositories"]) + 1)
    names = repositories.locator("td.spec").all_text_contents()
    assert names[:-1] == [r["repository"] for r in data["repositories"]]
    assert names[-1].startswith(f"{data['others']['repositories']} others")
    assert repositories.last.locator("td.num").all_text_contents() == [
        str(data["others"]["launches"]),
        str(data["others"]["launches_succeeded"]),
    ]
    shot(page, "usage-full", full_page=True)
    page.evaluate("window.scrollTo(0, 0)")
    shot(page, "usage")
    assert_nothing_personal(page.content())


def test_the_window_is_chosen_by_links_or_the_form(usage_service, page):
    page.goto(usage_service.url + "/usage")
    expect(page.locator("#usage-json")).to_have_attribute("href", "/usage.json?days=30")
    page.get_by_role("link", name="7 days").click()
    expect(page).to_have_url(re.compile(r"/usage\?days=7$"))
    expect(page.locator("svg#launch-chart g.bar")).to_have_count(7)
    expect(page.locator("#usage-csv")).to_have_attribute("href", "/usage.csv?days=7")
    page.fill("#days-input", "3")
    page.get_by_role("button", name="Show").click()
    expect(page).to_have_url(re.compile(r"/usage\?days=3$"))
    expect(page.locator("#usage-days-count")).to_have_text("3")
    data = requests.get(usage_service.url + "/usage.json?days=3", timeout=30).json()
    expect(page.locator("#usage-launches")).to_have_text(str(data["totals"]["launches"]))


def test_the_csv_parses_to_the_json_and_nothing_personal_is_anywhere(usage_service):
    url = usage_service.url
    data = requests.get(url + "/usage.json?days=30", timeout=30).json()
    response = requests.get(url + "/usage.csv?days=30", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert tuple(rows[0]) == DAY_COLUMNS and len(rows) == 30
    for row, day in zip(rows, data["per_day"], strict=True):
        assert row == {k: "" if v is None else str(v) for k, v in day.items()}
    response = requests.get(url + "/usage.csv?days=30&table=repositories", timeout=30)
    repositories = list(csv.DictReader(io.StringIO(response.text)))
    assert tuple(repositories[0]) == REPOSITORY_COLUMNS
    assert [r["repository"] for r in repositories[:-1]] == [
        r["repository"] for r in data["repositories"]
    ]
    assert repositories[-1]["repository"] == "(others)"
    assert sum(int(r["launches"]) for r in repositories) == data["totals"]["launches"]
    for path in ["/usage", "/usage.json", "/usage.csv", "/usage.csv?table=repositories"]:
        assert_nothing_personal(requests.get(url + path, timeout=30).text)


def test_without_javascript_on_a_phone_the_charts_fit_and_read(usage_service, browser):
    context = browser.new_context(
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        is_mobile=True,
        java_script_enabled=False,
    )
    page = context.new_page()
    try:
        page.goto(usage_service.url + "/usage")
        chart = page.locator("svg#launch-chart")
        expect(chart).to_be_visible()
        box = chart.bounding_box()
        assert box and 300 <= box["width"] <= 390
        # Text keeps the page's size on a narrow screen (the SVG is not scaled down).
        size = page.eval_on_selector("#launch-chart text.tick", "e => getComputedStyle(e).fontSize")
        assert float(size.removesuffix("px")) >= 11
        labels = page.locator("#launch-chart text.day")
        assert labels.count() == 5
        boxes = [labels.nth(i).bounding_box() for i in range(5)]
        for left, right in itertools.pairwise(boxes):
            assert left["x"] + left["width"] <= right["x"], "day labels overlap"
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        shot(page, "usage-phone")
        page.locator("details > summary").click()  # <details> needs no script
        expect(page.locator("#usage-days")).to_be_visible()
    finally:
        context.close()


def test_bad_parameters_get_one_sentence(usage_service, page):
    response = page.goto(usage_service.url + "/usage?days=abc")
    assert response.status == 400
    expect(page.locator("#usage-error")).to_have_text(
        "The parameter days must be a whole number from 1 to 365."
    )
    page.get_by_role("link", name="Usage of the last 30 days").click()
    expect(page.locator("svg#launch-chart")).to_be_visible()
    response = requests.get(usage_service.url + "/usage.json?days=1&days=2", timeout=30)
    assert response.status_code == 400
    assert response.json() == {"error": "Give the parameter days once."}
    response = requests.get(usage_service.url + "/usage.csv?table=all", timeout=30)
    assert (response.status_code, response.text) == (
        400,
        "The parameter table must be days or repositories.\n",
    )


def test_the_status_page_and_every_page_link_to_it(usage_service, page):
    page.goto(usage_service.url + "/status")
    page.locator("#launches-title ~ p a[href='/usage']").click()
    expect(page).to_have_url(usage_service.url + "/usage")
    page.goto(usage_service.url + "/")
    page.get_by_role("navigation", name="Site").get_by_role("link", name="Usage").click()
    expect(page.locator("h1")).to_have_text("Usage")
