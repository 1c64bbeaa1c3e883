"""The web chat page (miaotui/serve/static), served by the real server at / and driven in a
real headless Chromium through selenium: load, send, watch the answer stream in, stop a
generation mid-stream, keep history across a reload, clear it; the Markdown renderer is
checked against HTML injection inside the browser.

The server-side checks (the page and its files are served, the page's own origin may POST,
others may not) run without a browser. The browser tests need Debian's `chromium` and
`chromium-driver` (scripts/install.sh --test installs them) and are skipped without them.
Set MIAOTUI_WEB_SCREENSHOT=docs/web_chat.png to also write the README's screenshot.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import httpx
import pytest

from miaotui.llm import LLM
from miaotui.serve.api import STATIC_DIR, create_app
from miaotui.serve.cli import serve_in_thread
from test_server import metric, wait_for

KV = 64 << 20


# ---- the server side, no browser ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_engine(tiny_llama_dir):
    return LLM(tiny_llama_dir[0], kv_cache_memory=KV).engine


def test_page_and_files_are_served(tiny_engine):
    with serve_in_thread(create_app(tiny_engine, "tiny")) as base:
        page = httpx.get(base + "/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert '<script src="/static/app.js"' in page.text
        for name, kind in [("app.js", "javascript"), ("markdown.js", "javascript"),
                           ("style.css", "text/css")]:
            r = httpx.get(f"{base}/static/{name}")
            assert r.status_code == 200 and kind in r.headers["content-type"], name
            assert r.text == open(os.path.join(STATIC_DIR, name), encoding="utf-8").read()
        # the page loads nothing from elsewhere (it must work offline) and never assigns HTML
        for name in os.listdir(STATIC_DIR):
            text = open(os.path.join(STATIC_DIR, name), encoding="utf-8").read()
            assert "http://" not in text and "https://" not in text, name
            assert "innerHTML" not in text and "outerHTML" not in text and "insertAdjacentHTML" not in text
        assert httpx.get(base + "/static/nothing.js").status_code == 404


def chat_body(**kw) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}


def test_own_origin_may_post_others_may_not(tiny_engine):
    with serve_in_thread(create_app(tiny_engine, "tiny")) as base:
        port = base.rsplit(":", 1)[1]
        url = base + "/v1/chat/completions"
        for own in (base, f"http://localhost:{port}"):
            host = own.split("//")[1]
            r = httpx.post(url, json=chat_body(), headers={"Origin": own, "Host": host})
            assert r.status_code == 200, (own, r.text)
        for foreign in ("http://evil.example", f"http://127.0.0.1:{int(port) + 1}",
                        f"https://127.0.0.1:{port}"):
            r = httpx.post(url, json=chat_body(), headers={"Origin": foreign})
            assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed", foreign
    # bound to all interfaces (no Host check): a name could be a DNS-rebinding page's own, so
    # its "same origin" is refused; an IP address is not; an API key makes any name safe
    with serve_in_thread(create_app(tiny_engine, "tiny", host="0.0.0.0")) as base:
        port = base.rsplit(":", 1)[1]
        evil = f"evil.example:{port}"
        r = httpx.post(base + "/v1/chat/completions", json=chat_body(),
                       headers={"Origin": f"http://{evil}", "Host": evil})
        assert r.status_code == 403
        assert httpx.post(base + "/v1/chat/completions", json=chat_body(),
                          headers={"Origin": base}).status_code == 200
    with serve_in_thread(create_app(tiny_engine, "tiny", host="0.0.0.0", api_key="k")) as base:
        port = base.rsplit(":", 1)[1]
        evil = f"evil.example:{port}"
        headers = {"Origin": f"http://{evil}", "Host": evil}
        r = httpx.post(base + "/v1/chat/completions", json=chat_body(), headers=headers)
        assert r.status_code == 401
        r = httpx.post(base + "/v1/chat/completions", json=chat_body(),
                       headers={**headers, "Authorization": "Bearer k"})
        assert r.status_code == 200


# ---- in a real browser -------------------------------------------------------------------
def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("Chromium or its driver is not installed (Debian: apt-get install chromium "
                    "chromium-driver; scripts/install.sh --test does it)")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    binary, driver_path = _chromium()
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def default_server(smollm2_path):
    engine = LLM(smollm2_path, kv_cache_memory=256 << 20, max_model_len=2048).engine
    with serve_in_thread(create_app(engine, "smollm2")) as base:
        yield base


def by_id(driver, name):
    from selenium.webdriver.common.by import By
    return driver.find_element(By.ID, name)


def answers(driver) -> list[dict]:
    return driver.execute_script("""
        return [...document.querySelectorAll('.msg.assistant')].map(n => ({
            text: n.querySelector('.body').textContent,
            stats: n.querySelector('.stats').textContent,
            streaming: n.classList.contains('streaming')}));""")


def busy(driver) -> bool:
    return driver.execute_script("return document.body.dataset.busy") == "1"


def set_field(driver, name: str, value) -> None:
    field = by_id(driver, name)
    field.clear()
    field.send_keys(str(value))


def send(driver, text: str) -> None:
    set_field(driver, "input", text)
    by_id(driver, "send").click()


def watch_stream(driver, timeout: float = 120) -> list[str]:
    """The last answer's text each time it changed, until the page is idle again."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        idle = not busy(driver)
        text = answers(driver)[-1]["text"]
        if not seen or text != seen[-1]:
            seen.append(text)
        if idle:
            return seen
        time.sleep(0.02)
    raise AssertionError("the answer did not finish")


# test hooks: the bodies the page POSTs, and every text the page renders as an answer
RECORD = """
    window.__requests = [];
    const realFetch = window.fetch;
    window.fetch = (url, init) => {
        if (init && init.body) window.__requests.push(JSON.parse(init.body));
        return realFetch(url, init);
    };
    window.__renders = [];
    const realRender = MiaotuiMarkdown.renderInto;
    MiaotuiMarkdown.renderInto = (node, source) => {
        window.__renders.push(source);
        realRender(node, source);
    };"""


def test_chat_streams_stops_and_clears(browser, default_server, tmp_path):
    d = browser
    d.get(default_server + "/")
    d.execute_script("localStorage.clear(); sessionStorage.clear();")
    d.get(default_server + "/")
    assert wait_for(lambda: by_id(d, "model").text == "smollm2")
    d.execute_script(RECORD)
    set_field(d, "system", "You are a helpful assistant.")
    set_field(d, "temperature", 0)
    set_field(d, "max-tokens", 120)

    # 1. an answer, with its stats
    send(d, "What is the capital of France?")
    watch_stream(d)
    final = answers(d)[-1]
    assert "Paris" in final["text"], final
    assert "TTFT" in final["stats"] and "tok/s" in final["stats"] and "tokens" in final["stats"]
    body = d.execute_script("return window.__requests[0]")
    assert body["stream"] is True and body["temperature"] == 0 and body["max_tokens"] == 120
    assert body["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}

    # 2. the conversation goes back with the next question (history); the answer is
    # shown while it streams, growing render by render; code is rendered as code
    d.execute_script("window.__renders = []")
    send(d, "Write a Python function that reverses a string.")
    seen = [t for t in watch_stream(d) if t]
    renders = d.execute_script("return window.__renders")
    final_code = renders[-1]
    growing = [r for i, r in enumerate(renders) if r and r != renders[i - 1]]
    assert len(growing) >= 5 and all(final_code.startswith(r) for r in growing), renders
    assert len(seen) >= 2                       # the test itself saw it before it was done
    body = d.execute_script("return window.__requests[1]")
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert "Paris" in body["messages"][2]["content"]
    code = d.execute_script("return [...document.querySelectorAll('.msg.assistant pre code')]"
                            ".map(c => c.textContent)")
    assert any("def " in c and "[::-1]" in c for c in code), (code, answers(d)[-1])

    # 3. stop a long generation mid-stream: the page stops and the server aborts the request
    set_field(d, "max-tokens", 1500)       # greedy: this answer runs to the limit
    aborted = metric(default_server, "miaotui_requests_finished_total", '{reason="abort"}')
    send(d, "Write a very long story about a dragon who learns to bake bread.")
    assert wait_for(lambda: len(answers(d)[-1]["text"]) > 150, timeout=60)
    by_id(d, "stop").click()
    assert wait_for(lambda: not busy(d), timeout=10)
    stopped = answers(d)[-1]
    assert stopped["stats"].startswith("stopped") and not stopped["streaming"]
    assert wait_for(lambda: metric(default_server, "miaotui_requests_finished_total",
                                   '{reason="abort"}') == aborted + 1, timeout=10)
    assert wait_for(lambda: metric(default_server, "miaotui_num_running_seqs") == 0, timeout=10)
    n_tokens = int(stopped["stats"].split("~")[1].split(" ")[0])
    assert n_tokens < 1500
    time.sleep(0.5)
    assert answers(d)[-1]["text"] == stopped["text"]           # nothing arrives after stop

    shot = tmp_path / "web_chat.png"
    d.execute_script("document.getElementById('messages').scrollTop = 0")
    assert d.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("MIAOTUI_WEB_SCREENSHOT"):
        shutil.copy(shot, os.environ["MIAOTUI_WEB_SCREENSHOT"])

    # 4. the history survives a reload, and "Clear history" forgets it
    d.get(default_server + "/")
    assert wait_for(lambda: len(answers(d)) == 3)
    assert answers(d)[0]["text"] == final["text"]
    by_id(d, "clear").click()
    assert d.execute_script("return document.querySelectorAll('.msg').length") == 0
    d.get(default_server + "/")
    assert wait_for(lambda: by_id(d, "model").text == "smollm2")
    assert d.execute_script("return document.querySelectorAll('.msg').length") == 0


ATTACKS = [
    '<img src=x onerror="window.__pwned = 1">',
    "<script>window.__pwned = 1</script>",
    '**bold <svg onload="window.__pwned=1">** and `<b>code</b>`',
    "```html\n<iframe src=\"javascript:window.__pwned=1\"></iframe>\n```",
    '<a href="javascript:window.__pwned=1">click</a> [x](javascript:alert(1))',
]


def test_markdown_renderer_is_safe_and_renders(browser, tiny_engine):
    with serve_in_thread(create_app(tiny_engine, "tiny")) as base:
        browser.get(base + "/")
        result = browser.execute_script("""
            const out = [];
            for (const src of arguments[0]) {
                const div = document.createElement('div');
                document.body.appendChild(div);
                MiaotuiMarkdown.renderInto(div, src);
                out.push({text: div.textContent,
                          tags: [...div.querySelectorAll('*')].map(e => e.tagName.toLowerCase()),
                          attrs: [...div.querySelectorAll('*')].flatMap(e => e.getAttributeNames())});
            }
            return out;""", ATTACKS)
        time.sleep(0.3)
        assert browser.execute_script("return window.__pwned") is None
        for src, r in zip(ATTACKS, result):
            assert set(r["tags"]) <= {"p", "strong", "em", "code", "pre", "br"}, (src, r)
            assert set(r["attrs"]) <= {"class", "data-lang"}, (src, r)
            if not src.startswith("```"):
                assert r["text"] == src.replace("**", "").replace("`", ""), (src, r)
        assert result[3]["text"] == '<iframe src="javascript:window.__pwned=1"></iframe>'
        assert result[3]["tags"] == ["pre", "code"]

        md = ("# Title\n\nSome **bold** and *it* with `x<y`.\n\n- one\n- two\n\n3. three\n4. four\n\n"
              "> quoted\n\n```python\nprint('<hi>')\n```\nafter\nline two")
        tree = browser.execute_script("""
            const div = document.createElement('div');
            MiaotuiMarkdown.renderInto(div, arguments[0]);
            const walk = n => n.nodeType === 3 ? n.data :
                [n.tagName.toLowerCase(), ...[...n.childNodes].map(walk)];
            return [...div.childNodes].map(walk);""", md)
        assert tree == [
            ["h3", "Title"],
            ["p", "Some ", ["strong", "bold"], " and ", ["em", "it"], " with ", ["code", "x<y"], "."],
            ["ul", ["li", "one"], ["li", "two"]],
            ["ol", ["li", "three"], ["li", "four"]],
            ["blockquote", "quoted"],
            ["pre", ["code", "print('<hi>')"]],
            ["p", "after", ["br"], "line two"],
        ]
        assert browser.execute_script(
            "const d = document.createElement('div');"
            "MiaotuiMarkdown.renderInto(d, '3. a\\n4. b'); return d.firstChild.start") == 3


def test_streamed_html_shows_as_text(browser, tiny_engine):
    """A model answer made of HTML, streamed through the page's own SSE path (the network
    replaced by a canned event stream), appears as text and runs nothing."""
    with serve_in_thread(create_app(tiny_engine, "tiny")) as base:
        browser.get(base + "/")
        browser.execute_script("localStorage.clear();")
        browser.get(base + "/")
        deltas = ['<img src=x onerror="window.__pwned=1">', " and ", "<script>window.__pwned=1",
                  "</script>", " **<b>bold</b>**"]
        events = "".join(f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': c}}]})}\n\n"
                         for c in deltas) + "data: [DONE]\n\n"
        browser.execute_script("""
            const events = arguments[0];
            window.fetch = async (url, init) => new Response(new ReadableStream({
                start(c) {
                    const enc = new TextEncoder();
                    for (let i = 0; i < events.length; i += 7) c.enqueue(enc.encode(events.slice(i, i + 7)));
                    c.close();
                }}), {status: 200, headers: {'Content-Type': 'text/event-stream'}});""", events)
        send(browser, "show me html")
        assert wait_for(lambda: not busy(browser) and answers(browser)[-1]["stats"])
        time.sleep(0.3)
        assert answers(browser)[-1]["text"] == "".join(deltas).replace("**", "")
        assert browser.execute_script("return window.__pwned") is None
        assert browser.execute_script(
            "return document.querySelectorAll('#messages img, #messages script, #messages b').length") == 0


def test_api_key_is_asked_for(browser, tiny_engine):
    with serve_in_thread(create_app(tiny_engine, "tiny", api_key="sesame")) as base:
        browser.get(base + "/")
        browser.execute_script("localStorage.clear(); sessionStorage.clear();")
        browser.get(base + "/")
        assert wait_for(lambda: by_id(browser, "api-key").is_displayed())
        assert "401" in by_id(browser, "status").text
        set_field(browser, "max-tokens", 8)
        send(browser, "hello")
        assert wait_for(lambda: not busy(browser) and "401" in answers(browser)[-1]["text"])
        set_field(browser, "api-key", "sesame")
        by_id(browser, "input").click()          # leaving the key field saves it and retries
        assert wait_for(lambda: by_id(browser, "model").text == "tiny")
        send(browser, "hello again")
        assert wait_for(lambda: not busy(browser))
        last = answers(browser)[-1]
        assert "tokens" in last["stats"] and "401" not in last["text"], last
