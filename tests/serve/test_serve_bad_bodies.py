"""Bodies the server cannot read as JSON are 422 (docs/serving.md, Errors) with a message that
says what is wrong and where: malformed JSON, and bytes that are not UTF-8 text."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from cm3leon.pipeline import CM3Leon  # noqa: E402
from cm3leon.serve.app import ServeConfig, create_app  # noqa: E402
from helpers import build_tiny_model_dir  # noqa: E402

ENDPOINTS = ["/v1/images/generations", "/v1/images/generations/stream"]
JSON_HEADERS = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        d = build_tiny_model_dir(tmp_path_factory.mktemp("bad-bodies") / "model", resolution=16, encoder=False)
        with TestClient(create_app(CM3Leon.from_pretrained(d), ServeConfig(threads=1))) as c:
            yield c
    finally:
        torch.set_num_threads(threads)


def _python_says(body: bytes) -> str:
    """What ``json`` says about ``body`` (its wording differs between Python versions)."""
    try:
        json.loads(body)
    except json.JSONDecodeError as e:
        return f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
    raise AssertionError(f"{body!r} is valid JSON")


def test_the_message_for_a_missing_comma() -> None:
    assert _python_says(b'{"prompt": "a red circle" "n": 1}') == (
        "request body is not valid JSON: Expecting ',' delimiter at line 1 column 27")


@pytest.mark.parametrize("url", ENDPOINTS)
@pytest.mark.parametrize("body", [b'{"prompt": "a red circle" "n": 1}', b'{"prompt": "a",\n "n": 1,\n}',
                                  b"{not json", b'{"prompt": "a"}}', b'{"prompt": "a\n', b"\n\n  [1, 2"])
def test_malformed_json_is_422_and_says_where(client: TestClient, url: str, body: bytes) -> None:
    r = client.post(url, content=body, headers=JSON_HEADERS)
    assert r.status_code == 422
    assert r.json() == {"error": {"message": _python_says(body), "type": "invalid_request_error", "param": None,
                                  "code": "invalid_json"}}


@pytest.mark.parametrize("url", ENDPOINTS)
def test_non_utf8_body_is_422_with_a_message(client: TestClient, url: str) -> None:
    r = client.post(url, content=b'{"prompt": "caf\xe9"}', headers=JSON_HEADERS)  # Latin-1, not UTF-8
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_json"
    assert err["message"] == ("request body is not valid JSON: it is not UTF-8 text (utf-8 cannot decode byte 0xe9 "
                              "at position 15); send UTF-8 encoded JSON")


def test_a_good_body_still_works(client: TestClient) -> None:
    r = client.post(ENDPOINTS[0], json={"prompt": "a red circle", "seed": 1})
    assert r.status_code == 200 and len(r.json()["data"]) == 1
