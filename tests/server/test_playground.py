"""The browser playground over HTTP: the page at / and its assets, all local and relative, served with their
content types; --no-playground takes them away; with API keys the page is public and the API is not; the page's
constraint controls; and the model facts the page draws its receptive-field bands from (/v1/models: depth,
attention_span, receptive_field)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from server.routes.playground import FOLDER
from tests.server.conftest import ServerProcess, make_checkpoint

KEY = "playground-key"
TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript", ".png": "image/png"}
JS_IMPORT = re.compile(r"""\bimport\b[^"';]*?["']([^"']+)["']""")
CSS_URL = re.compile(r"""url\(\s*["']?([^"')]+)""")
CONSTRAINT_KINDS = ["none", "json_object", "json_schema", "regex", "choice", "grammar"]


class Links(HTMLParser):
    """Every src and href of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [value for name, value in attrs if name in ("src", "href") and value is not None]


def page_links(html: str) -> list[str]:
    parser = Links()
    parser.feed(html)
    return parser.links


def is_relative_and_local(link: str) -> bool:
    """A path below the page's own folder: no scheme, no host, not absolute."""
    return bool(link) and ":" not in link and not link.startswith(("/", "\\")) and ".." not in link


def resolve(base: str, link: str) -> str:
    """The server path of `link` in a document at server path `base` (links here never climb)."""
    folder = base.rsplit("/", 1)[0]
    return f"{folder}/{link.removeprefix('./')}"


def crawl(url: str, headers: dict[str, str] | None = None) -> dict[str, httpx.Response]:
    """The page and every file it loads, through its links, the scripts' imports and the stylesheets' url()s."""
    found: dict[str, httpx.Response] = {}
    queue = ["/"]
    while queue:
        path = queue.pop()
        if path in found:
            continue
        response = found[path] = httpx.get(url + path, headers=headers)
        assert response.status_code == 200, (path, response.status_code, response.text[:200])
        kind = response.headers["content-type"]
        text = response.text if not kind.startswith("image/") else ""
        links = page_links(text) if path == "/" else JS_IMPORT.findall(text) + CSS_URL.findall(text)
        for link in links:
            assert is_relative_and_local(link), f"{path} links to {link!r}"
            queue.append(resolve("/" if path == "/" else path, link))
    return found


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A model of bucketed windows that look two back, served without the playground."""
    folder = tmp_path_factory.mktemp("bucketed") / "ckpt"
    process = ServerProcess(
        make_checkpoint(folder, depth=3, look_backward=2, exact_windowsize=False), "--no-playground"
    )
    yield process
    process.stop()


@pytest.fixture(scope="module")
def keyed(relative_checkpoint: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(relative_checkpoint, "--api-key", KEY)
    yield process
    process.stop()


def test_the_page_and_its_assets_are_local_and_typed(bundled: ServerProcess) -> None:
    files = crawl(bundled.url)
    assert {"/", "/playground/playground.js", "/playground/playground.css", "/playground/api.js"} <= set(files)
    assert "/playground/icon.png" in files
    for path, response in files.items():
        suffix = ".html" if path == "/" else Path(path).suffix
        assert response.headers["content-type"].startswith(TYPES[suffix]), path
        assert response.headers["cache-control"] == "no-cache", path
        assert response.headers["x-content-type-options"] == "nosniff", path
        body = response.content.lower()
        assert b"http://" not in body and b"https://" not in body, f"{path} names a URL"
    page = files["/"].text
    assert '<script type="module" src="playground/playground.js">' in page
    assert 'id="bands-text"' in page


def test_the_page_has_the_constraint_controls(bundled: ServerProcess) -> None:
    """A kind selector with every kind the API takes, a box for its text, and the module that makes the fields."""
    page = httpx.get(f"{bundled.url}/").text
    select = re.search(r'<select id="constraint-kind"[^>]*>(.*?)</select>', page, re.DOTALL)
    assert select is not None
    assert re.findall(r'<option value="([^"]+)"', select.group(1)) == CONSTRAINT_KINDS
    assert re.search(r'<textarea id="constraint-text"', page) and 'for="constraint-text"' in page
    script = httpx.get(f"{bundled.url}/playground/constraint.js").text
    assert 'name: "playground"' in script and "structured_outputs" in script and "response_format" in script


def test_every_file_of_the_folder_is_reached_from_the_page(bundled: ServerProcess) -> None:
    """No file is left unused, and none the page needs is missing."""
    on_disk = {f"/playground/{path.name}" for path in FOLDER.iterdir() if path.name != "index.html"}
    assert set(crawl(bundled.url)) - {"/"} == on_disk


def test_an_unchanged_file_is_a_304_and_unknown_names_are_404(bundled: ServerProcess) -> None:
    first = httpx.get(f"{bundled.url}/playground/playground.js")
    again = httpx.get(f"{bundled.url}/playground/playground.js", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    assert httpx.head(f"{bundled.url}/").status_code == 200
    for name in ("nope.js", "index.html", "..%2Fapp.py", "api.js%00.js", "../routes/playground.py"):
        response = httpx.get(f"{bundled.url}/playground/{name}")
        assert response.status_code == 404, name
        assert response.json()["error"]["type"] == "not_found_error"


def test_no_playground_leaves_slash_a_404(bucketed: ServerProcess) -> None:
    for path in ("/", "/playground/playground.js", "/playground/api.js"):
        response = httpx.get(bucketed.url + path)
        assert response.status_code == 404, path
        assert response.json()["error"]["type"] == "not_found_error"
    assert httpx.get(f"{bucketed.url}/v1/models").status_code == 200


def test_with_a_key_the_page_is_public_and_the_api_is_not(keyed: ServerProcess) -> None:
    crawl(keyed.url)  # every file, without a key
    assert httpx.get(f"{keyed.url}/v1/models").status_code == 401
    assert httpx.get(f"{keyed.url}/v1/models", headers=keyed.headers).status_code == 200
    for path in ("/playground/", "/playground/nope.js", "/playground/index.html", "/index.html"):
        assert httpx.get(keyed.url + path).status_code == 401, path  # only the files themselves are open


def test_the_bundled_model_card(bundled: ServerProcess) -> None:
    card = httpx.get(f"{bundled.url}/v1/models").json()["data"][0]
    assert (card["depth"], card["window_size"], card["look_backward"]) == (4, 128, 1)
    assert card["attention_span"] == 128 * 1 + 1  # exact windows: the query and the 128 positions before it
    assert card["receptive_field"] == 4 * 128 * 1 + 1 == 513
    assert card["max_model_len"] is None
    assert card["chat_template"] == "default"


def test_a_bucketed_model_card(bucketed: ServerProcess) -> None:
    """Bucketed windows: a query sees its own bucket and the look_backward ones before it."""
    card = httpx.get(f"{bucketed.url}/v1/models").json()["data"][0]
    assert (card["depth"], card["window_size"], card["look_backward"]) == (3, 8, 2)
    assert card["attention_span"] == 8 * (2 + 1)
    assert card["receptive_field"] == 3 * 8 * 2 + 1
