"""The Streamlit demo: flows driven headless with AppTest, and a real browser (Chromium through
Playwright) uploading a video and waiting for the results table."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmr.bundle import write_bundle
from vmr.config import load_config
from vmr.model import VideoMomentRetrievalModel

from .conftest import free_port

APP = Path(__file__).parents[1] / "vmr" / "demo" / "app.py"
TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """An untrained tiny model's inference bundle: the demo's behaviour, not its accuracy, is tested."""
    out = tmp_path_factory.mktemp("bundle") / "export"
    model = VideoMomentRetrievalModel.from_config(load_config(TINY).model)
    write_bundle(model, out, load_config(TINY))
    return out


def app(bundle: Path | None, monkeypatch, max_mb: str = "200"):
    from streamlit.testing.v1 import AppTest

    if bundle is not None:
        monkeypatch.setenv("VMR_DEMO_CHECKPOINT", str(bundle))
    else:
        monkeypatch.delenv("VMR_DEMO_CHECKPOINT", raising=False)
    monkeypatch.setenv("VMR_DEMO_MAX_MB", max_mb)
    at = AppTest.from_file(str(APP), default_timeout=120)
    return at.run()


def errors(at) -> list[str]:
    return [e.value for e in at.error]


def test_query_on_a_bundled_sample(bundle, monkeypatch):
    at = app(bundle, monkeypatch)
    assert not at.exception and not errors(at)
    assert at.text_input[0].value  # a sample's own event is suggested
    at.button[0].click().run()
    assert not at.exception and not errors(at)
    table = at.dataframe[0].value
    assert list(table.columns) == ["rank", "start (s)", "end (s)", "length (s)", "score"]
    assert 1 <= len(table) <= 5 and (table["end (s)"] > table["start (s)"]).all()
    assert any("Processed in" in c.value for c in at.caption)
    # Settings are honoured: top-k 2.
    at.sidebar.slider[0].set_value(2).run()  # the first slider is top-k (the second, NMS IoU)
    at.button[0].click().run()
    assert len(at.dataframe[0].value) <= 2


def test_a_second_question_reuses_the_videos_encoding(bundle, monkeypatch):
    at = app(bundle, monkeypatch)
    at.button[0].click().run()
    assert not any("reused" in c.value for c in at.caption)
    at.text_input[0].set_value("a blue square grows").run()
    at.button[0].click().run()
    assert not at.exception and not errors(at) and len(at.dataframe[0].value) >= 1
    assert any("encoding from an earlier question was reused" in c.value for c in at.caption)


def test_the_search_page_finds_moments_over_an_indexed_collection(bundle, monkeypatch, synth_dir, tmp_path):
    from vmr.cli import main

    index = tmp_path / "index"
    assert main(["index", "--checkpoint", str(bundle), "--videos", str(synth_dir / "videos"), "--out", str(index)]) == 0
    monkeypatch.setenv("VMR_DEMO_INDEX", str(index))
    at = app(bundle, monkeypatch)
    at.radio(key="page").set_value("Search the collection").run()
    at.text_input(key="search_query").set_value("a red circle moves left").run()
    at.button[0].click().run()
    assert not at.exception and not errors(at)
    table = at.dataframe[0].value
    assert list(table.columns) == ["rank", "video", "start (s)", "end (s)", "score"] and len(table) >= 1
    assert set(table["video"]) <= {p.stem for p in (synth_dir / "videos").glob("*.mp4")}
    at.text_input(key="search_query").set_value("   ").run()
    at.button[0].click().run()
    assert not at.exception and any("query" in e.lower() for e in errors(at))


def test_a_siglip2_bundle_answers_and_searches(monkeypatch, synth_dir, tmp_path):
    """The demo on SigLIP 2 towers: a question on a sample, and the search page over an index the
    bundle built; nothing in the app knows which towers it runs."""
    from vmr.cli import main

    cfg = load_config(TINY, ["model.backbone=siglip2"])
    bundle = write_bundle(VideoMomentRetrievalModel.from_config(cfg.model), tmp_path / "export", cfg)
    index = tmp_path / "index"
    assert main(["index", "--checkpoint", str(bundle), "--videos", str(synth_dir / "videos"), "--out", str(index)]) == 0
    monkeypatch.setenv("VMR_DEMO_INDEX", str(index))
    at = app(bundle, monkeypatch)
    at.button[0].click().run()
    assert not at.exception and not errors(at) and len(at.dataframe[0].value) >= 1
    at.radio(key="page").set_value("Search the collection").run()
    at.text_input(key="search_query").set_value("a red circle moves left").run()
    at.button[0].click().run()
    assert not at.exception and not errors(at) and len(at.dataframe[0].value) >= 1


def test_upload_a_video(bundle, monkeypatch, synth_dir):
    at = app(bundle, monkeypatch)
    at.radio[0].set_value("Upload a video").run()
    video = sorted((synth_dir / "videos").glob("*.mp4"))[0]
    at.file_uploader[0].set_value((video.name, video.read_bytes(), "video/mp4")).run()
    at.text_input[0].set_value("a red circle moves left").run()
    at.button[0].click().run()
    assert not at.exception and not errors(at)
    assert len(at.dataframe[0].value) >= 1


@pytest.mark.parametrize("name, content, query, max_mb, message", [
    ("notes.mp4", b"this is not a video", "a red circle", "200", "cannot decode this video"),
    ("broken.mp4", None, "a red circle", "200", "cannot decode this video"),
    ("big.mp4", b"x" * 300_000, "a red circle", "0.1", "over the 0.1 MB limit"),
    (None, None, "   ", "200", "Type a query first"),
])
def test_bad_input_gets_a_message_and_the_app_stays_usable(bundle, monkeypatch, synth_dir, name, content, query,
                                                           max_mb, message):
    at = app(bundle, monkeypatch, max_mb)
    if name is not None:
        at.radio[0].set_value("Upload a video").run()
        if content is None:  # a real video cut in half
            content = sorted((synth_dir / "videos").glob("*.mp4"))[0].read_bytes()
            content = content[: len(content) // 2]
        at.file_uploader[0].set_value((name, content, "video/mp4")).run()
    at.text_input[0].set_value(query).run()
    if not at.button[0].disabled:
        at.button[0].click().run()
    assert not at.exception
    assert any(message in e for e in errors(at)), errors(at)
    # Still usable: back to a sample with a real query.
    at.radio[0].set_value("Bundled sample").run()
    at.text_input[0].set_value("a red circle moves left").run()
    at.button[0].click().run()
    assert not at.exception and not errors(at) and len(at.dataframe[0].value) >= 1


def test_without_a_model_the_app_says_so(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no runs/quickstart here
    at = app(None, monkeypatch)
    assert not at.exception
    assert "No model to load" in at.warning[0].value


@pytest.mark.browser
@pytest.mark.slow
def test_in_a_real_browser(bundle, synth_dir, tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("the browser test needs Debian's chromium (make test installs it as root)")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(port),
                               "--server.headless", "true", "--browser.gatherUsageStats", "false", "--",
                               "--checkpoint", str(bundle)], env={**os.environ}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    artifacts = Path(os.environ.get("VMR_TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            deadline = time.time() + 60
            while True:
                try:
                    page.goto(f"http://127.0.0.1:{port}", timeout=5000)
                    break
                except Exception:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.5)
            page.get_by_text("Upload a video").click()
            video = sorted((synth_dir / "videos").glob("*.mp4"))[0]
            page.locator("input[type=file]").set_input_files(str(video))
            page.get_by_label("Query").fill("a red circle moves left")
            page.get_by_label("Query").press("Enter")
            page.get_by_role("button", name="Find moments").click()
            page.get_by_text("Moments for").wait_for(timeout=90_000)
            page.locator("[data-testid=stDataFrame]").first.wait_for(timeout=30_000)
            page.screenshot(path=str(artifacts / "demo.png"), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert (artifacts / "demo.png").stat().st_size > 10_000


def test_a_bad_upload_limit_is_a_message_not_a_traceback(bundle, monkeypatch):
    at = app(bundle, monkeypatch, max_mb="abc")
    assert not at.exception
    assert any("VMR_DEMO_MAX_MB" in e and "'abc'" in e for e in errors(at)), errors(at)


def test_uploads_stay_private_and_are_removed(bundle, monkeypatch, synth_dir, tmp_path):
    """The upload is read from memory, never written to disk; an error names the user's file, never
    a temporary one."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    at = app(bundle, monkeypatch)
    at.radio[0].set_value("Upload a video").run()
    video = sorted((synth_dir / "videos").glob("*.mp4"))[0]
    at.file_uploader[0].set_value(("my holiday.mp4", video.read_bytes(), "video/mp4")).run()
    at.text_input[0].set_value("a red circle moves left").run()
    at.button[0].click().run()
    assert not at.exception and not errors(at) and len(at.dataframe[0].value) >= 1
    assert list(tmp_path.iterdir()) == []
    at.file_uploader[0].set_value(("notes.mp4", b"this is not a video", "video/mp4")).run()
    at.button[0].click().run()
    message = errors(at)[0]
    assert message.startswith("notes.mp4: cannot decode this video") and str(tmp_path) not in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_vmr_demo_listens_locally_raises_the_upload_cap_and_stops_on_sigterm(bundle):
    import signal
    import socket

    import psutil

    port = free_port()
    process = subprocess.Popen([str(Path(sys.executable).parent / "vmr"), "demo", "--checkpoint", str(bundle),
                                "--port", str(port), "--max-upload-mb", "500"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert process.poll() is None, "vmr demo exited"
                assert time.time() < deadline, "the demo did not listen within 60 s"
                time.sleep(0.3)
        server = psutil.Process(process.pid)  # vmr demo became the Streamlit server: one process
        assert "streamlit" in server.cmdline() and not server.children(recursive=True)
        cmdline = server.cmdline()
        assert cmdline[cmdline.index("--server.maxUploadSize") + 1] == "500"
        listening = {c.laddr.ip for c in server.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
        assert listening == {"127.0.0.1"}, listening
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert not psutil.pid_exists(process.pid) or psutil.Process(process.pid).status() == psutil.STATUS_ZOMBIE


def test_vmr_demo_refuses_a_bad_limit(capsys):
    from vmr.cli import main

    assert main(["demo", "--max-upload-mb", "abc"]) == 2
    assert "'abc' is not a size in MB" in capsys.readouterr().err
