"""The web app's page handlers through TestClient: the Score form (labels, ranges, the API's 422
messages beside the fields, CSRF), the Models page, placeholders, /docs, security headers, and no
request to another host in anything the pages load."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from custseg import schema
from custseg.serving.app import create_app
from custseg.serving.security import configured_keys
from custseg.serving.ui import pages, sessions
from custseg.settings import Settings
from tests.conftest import TrainedHome

FORM = {f.name: str(f.example) for f in schema.FEATURES}
"""The prototype's customer as the Score form sends it (every value as text); answered medium_value."""
STATIC = Path(pages.__file__).parent / "static"


def _settings(home: Path, **overrides: Any) -> Settings:
    values = {
        "home": home,
        "model_poll_seconds": 0,
        "trusted_hosts": "testserver",
        "prediction_log_enabled": False,
    }
    return Settings(**(values | overrides))


@pytest.fixture(scope="module")
def client(trained_home: TrainedHome) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(trained_home.home))) as test_client:
        yield test_client


class Page(HTMLParser):
    """What the tests read from a page: labels by their field, texts by element id, loaded URLs."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.labels: dict[str, str] = {}
        self.by_id: dict[str, str] = {}
        self.urls: list[str] = []
        self.inputs: dict[str, dict[str, str | None]] = {}
        self._open: list[tuple[str, str | None, list[str]]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for name in ("src", "href", "action"):
            if a.get(name):
                self.urls.append(str(a[name]))
        if tag in ("input", "select") and a.get("name"):
            self.inputs[str(a["name"])] = a
        if tag in ("input", "meta", "link", "br"):
            return
        key = f"label:{a['for']}" if tag == "label" and a.get("for") else a.get("id")
        self._open.append((tag, key, []))

    def handle_data(self, data: str) -> None:
        for _tag, _key, texts in self._open:
            texts.append(data)

    def handle_endtag(self, tag: str) -> None:
        if not self._open:
            return
        _tag, key, texts = self._open.pop()
        text = " ".join("".join(texts).split())
        if key and key.startswith("label:"):
            self.labels[key[6:]] = text
        elif key:
            self.by_id[key] = text


def csrf(client: TestClient) -> str:
    page = client.get("/ui/score")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token is not None
    return token.group(1)


def submit(client: TestClient, values: dict[str, str]) -> Any:
    return client.post("/ui/score", data={**values, "csrf_token": csrf(client)})


def test_score_form_has_a_labelled_field_per_feature_with_its_range(client: TestClient) -> None:
    response = client.get("/ui/score")
    assert response.status_code == 200
    page = Page(response.text)
    assert page.labels["f-total_spent"] == "Total spent"
    assert page.labels["f-annual_income"] == "Annual income"
    assert page.labels["f-days_since_last_purchase"] == "Days since last purchase"
    assert page.labels["f-num_purchases"] == "Number of purchases"
    assert page.labels["f-avg_purchase_value"] == "Average purchase value"
    assert len(page.labels) == len(schema.FEATURES)
    assert page.by_id["r-age"] == "0 to 120"
    assert page.by_id["r-online_activity_score"] == "0 to 100"
    assert page.by_id["r-total_spent"] == "0 or more"
    assert page.by_id["r-gender"] == "Female or Male"
    assert page.inputs["age"]["min"] == "0" and page.inputs["age"]["max"] == "120"
    assert "type" not in page.inputs["gender"]  # a select, not a text box
    assert re.search(r'<option value="Male"[^>]*>Male</option>', response.text)


def test_submitting_the_form_shows_the_segment_probabilities_and_reasons(client: TestClient) -> None:
    response = submit(client, FORM)
    assert response.status_code == 200, response.text
    page = Page(response.text)
    assert page.by_id["segment"] == "medium_value"  # what the API answers for the prototype's customer
    api = client.post("/predict", json=schema.EXAMPLE_RECORD).json()
    for name, p in api["probabilities"][0].items():
        assert f'<td>{name}</td><td class="num">{p:.3f}</td>' in response.text
    assert "Why medium_value" in page.by_id["reasons"]
    assert response.text.count('class="vega-spec"') == 2
    assert "/ui/static/vendor/vega-embed/vega-embed.min.js" in page.urls


def test_invalid_values_show_the_api_messages_beside_their_fields(client: TestClient) -> None:
    values = {**FORM, "age": "130", "total_spent": "-5", "gender": "Robot", "num_site_visits": "many"}
    del values["loyalty_program"]
    response = submit(client, values)
    assert response.status_code == 422
    page = Page(response.text)
    api_body = {
        **schema.EXAMPLE_RECORD,
        "age": 130,
        "total_spent": -5,
        "gender": "Robot",
        "num_site_visits": "many",
    }
    del api_body["loyalty_program"]
    api = client.post("/predict", json=api_body)
    assert api.status_code == 422
    expected = {e["field"]: e["reason"] for e in api.json()["errors"]}
    assert set(expected) == {"age", "total_spent", "gender", "num_site_visits", "loyalty_program"}
    for field, reason in expected.items():
        assert page.by_id[f"e-{field}"] == reason
    assert page.inputs["age"]["value"] == "130"  # what the person typed stays in the form
    assert page.inputs["age"]["aria-invalid"] == "true"
    assert "segment" not in page.by_id


def test_the_form_needs_its_csrf_token(client: TestClient) -> None:
    client.get("/ui/score")  # sets the cookie
    assert client.post("/ui/score", data={**FORM, "csrf_token": "forged"}).status_code == 403
    assert client.post("/ui/score", data=FORM).status_code == 403
    token = csrf(client)
    cross_site = client.post(
        "/ui/score", data={**FORM, "csrf_token": token}, headers={"origin": "http://evil.example"}
    )
    assert cross_site.status_code == 403


def test_models_page_shows_the_served_version_and_aliases(client: TestClient) -> None:
    model = client.get("/model").json()
    page = Page(client.get("/ui/models").text)
    assert page.by_id["model-version"] == model["version"]
    assert page.by_id["model-aliases"] == ", ".join(model["aliases"])


def test_every_page_is_built_and_the_monitoring_page_explains_an_empty_log(client: TestClient) -> None:
    assert pages.PLACEHOLDERS == {}
    response = client.get("/ui/monitoring")
    assert response.status_code == 200
    assert "This page is not built yet" not in response.text
    assert 'id="monitoring-empty"' in response.text and "prediction log is turned off" in response.text


def test_navigation_links_every_page(client: TestClient) -> None:
    page = Page(client.get("/ui/score").text)
    for slug in ("score", "upload", "segments", "monitoring", "models"):
        assert f"/ui/{slug}" in page.urls
    assert client.get("/ui/", follow_redirects=False).headers["location"] == "/ui/score"


def test_pages_docs_and_static_files_carry_security_headers(client: TestClient) -> None:
    for path in (
        "/ui/score",
        "/ui/models",
        "/docs",
        "/ui/static/app.js",
        "/ui/static/vendor/vega/vega.min.js",
    ):
        response = client.get(path)
        assert response.status_code == 200, path
        csp = response.headers["content-security-policy"]
        assert (
            "script-src 'self';" in csp and "unsafe-inline' " not in csp.split("script-src")[1].split(";")[0]
        )
        assert "frame-ancestors 'none'" in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"


def test_docs_loads_swagger_ui_from_vendored_files(client: TestClient) -> None:
    page = Page(client.get("/docs").text)
    assert page.urls == [
        "data:,",  # no favicon request
        "/ui/static/vendor/swagger-ui-dist/swagger-ui.css",
        "/ui/static/vendor/swagger-ui-dist/swagger-ui-bundle.js",
        "/ui/static/docs.js",
    ]
    for url in page.urls[1:]:
        assert client.get(url).status_code == 200


def test_nothing_served_points_at_another_host(client: TestClient) -> None:
    scored = submit(client, FORM).text
    for html in (
        scored,
        client.get("/ui/models").text,
        client.get("/docs").text,
        client.get("/ui/upload").text,
    ):
        assert "<script>" not in html  # no inline script: the CSP forbids it
        for url in Page(html).urls:
            assert url.startswith("/") or url == "data:,", url
    for name in ("app.js", "app.css", "docs.js"):
        assert "http" not in (STATIC / name).read_text(), name
    # only the identifier in a Vega-Lite spec's $schema names another host; it is never fetched
    assert set(re.findall(r"https?://[^\"' ]+", scored)) == {
        "https://vega.github.io/schema/vega-lite/v6.json"
    }


def test_every_vendored_package_has_its_licence() -> None:
    for package in (STATIC / "vendor").iterdir():
        assert (package / "LICENSE").stat().st_size > 500, package.name


@pytest.fixture(scope="module")
def keyed(trained_home: TrainedHome) -> Iterator[TestClient]:
    settings = _settings(trained_home.home, api_keys="all-key-123456", feedback_keys="fb-key-123456")
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def sign_in(client: TestClient, key: str) -> Any:
    page = client.get("/ui/sign-in")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token is not None
    return client.post(
        "/ui/sign-in", data={"api_key": key, "csrf_token": token.group(1)}, follow_redirects=False
    )


def test_with_api_keys_the_pages_ask_to_sign_in(keyed: TestClient) -> None:
    keyed.cookies.clear()
    response = keyed.get("/ui/score", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/ui/sign-in"
    assert keyed.post("/ui/score", data=FORM, follow_redirects=False).status_code == 303
    assert keyed.get("/docs").status_code == 200
    assert keyed.post("/predict", json=schema.EXAMPLE_RECORD).status_code == 401
    wrong = sign_in(keyed, "not-a-key")
    assert wrong.status_code == 401 and "That key is not valid" in wrong.text


def test_sign_in_sets_a_signed_strict_cookie_and_sign_out_clears_it(keyed: TestClient) -> None:
    keyed.cookies.clear()
    response = sign_in(keyed, "all-key-123456")
    assert response.status_code == 303 and response.headers["location"] == "/ui/score"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("custseg_session=") and "all-key-123456" not in cookie
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Max-Age=28800" in cookie
    page = keyed.get("/ui/score")
    assert page.status_code == 200 and "Sign out" in page.text
    assert Page(submit(keyed, FORM).text).by_id["segment"] == "medium_value"
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token is not None
    out = keyed.post("/ui/sign-out", data={"csrf_token": token.group(1)}, follow_redirects=False)
    assert out.status_code == 303 and 'custseg_session=""' in out.headers["set-cookie"]
    keyed.cookies.delete("custseg_session", path="/ui")
    assert keyed.get("/ui/score", follow_redirects=False).status_code == 303


def test_a_forged_or_expired_session_is_refused(keyed: TestClient) -> None:
    keys = pages.keys_of(_Request(keyed))
    key = keys[0]
    assert sessions.read(keys, sessions.issue(keys, key)) == key
    assert (
        sessions.read(keys, sessions.issue(keys, key, now=time.time() - sessions.SESSION_SECONDS - 1)) is None
    )
    payload, signature = sessions.issue(keys, key).split(".")
    assert sessions.read(keys, f"{payload}.{signature[:-2]}xx") is None
    other = configured_keys(Settings(api_keys="another-key-999"))
    assert sessions.read(other, sessions.issue(keys, key)) is None  # keys changed: everyone signs in again


def test_a_key_without_the_scoring_scope_sees_models_but_not_score(keyed: TestClient) -> None:
    keyed.cookies.clear()
    assert sign_in(keyed, "fb-key-123456").status_code == 303
    refused = keyed.get("/ui/score")
    assert refused.status_code == 403 and "&#39;scoring&#39; scope" in refused.text
    assert keyed.get("/ui/models").status_code == 200
    keyed.cookies.clear()


class _Request:
    """Just enough of a request for ``pages.keys_of``."""

    def __init__(self, client: TestClient) -> None:
        self.app = client.app
