"""app.py through gradio_client: start `python app.py` on a free localhost port with the tiny pipeline, train, generate.

The `app_server` fixture is reused by test_app_browser.py.
"""
import html
import os
import re
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
CONCEPT = sorted((ROOT / "assets" / "concept").glob("*.png"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    """(url, library_dir) of a running `python app.py` on the tiny offline pipeline; stopped afterwards."""
    from loldu_sd.testing import save_tiny_pipeline

    tmp = tmp_path_factory.mktemp("app")
    save_tiny_pipeline(tmp / "tiny-sd", seed=0)
    port, lib = free_port(), tmp / "library"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    log = open(tmp / "app.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--pretrained_model_name_or_path", "tiny-sd",
                             "--library_dir", str(lib), "--port", str(port), "--device", "cpu"],
                            cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    ready = threading.Event()
    reader = threading.Thread(target=copy_until_ready, args=(proc.stdout, log, url.rstrip("/"), ready), daemon=True)
    reader.start()
    try:
        # Gradio prints its URL once the server listens; the event is also set when app.py exits
        if not ready.wait(timeout=120) or proc.poll() is not None:
            pytest.fail(f"app.py did not start (exit code {proc.poll()}):\n{(tmp / 'app.log').read_text()[-3000:]}")
        assert httpx.get(url, timeout=10).status_code == 200
        yield url, lib
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        reader.join(timeout=20)
        log.close()


def copy_until_ready(stream, log, url: str, ready: threading.Event) -> None:
    """Copy app.py's output to its log (so the pipe never fills); set `ready` when it prints `url`, or at exit."""
    for line in stream:
        log.write(line)
        log.flush()
        if url in line:
            ready.set()
    ready.set()


def train_args(name, steps=2, images=None, prompt="a photo of sks robot", every=1000):
    from gradio_client import handle_file

    files = [handle_file(str(p)) for p in (images if images is not None else CONCEPT[:3])]
    # files, instance prompt, class prompt, steps, rank, learning rate, seed, preview every, name
    return files, prompt, "", steps, 4, 5e-3, 0, every, name


def gen_args(prompt="a photo of sks robot on the beach", adapter="robot", n=1):
    return prompt, "", 2, 7.5, 0, n, adapter, 1.0, None, 1.0, None, 1.0


@pytest.mark.slow
def test_train_then_generate(app_server):
    from gradio_client import Client

    url, lib = app_server
    client = Client(url, verbose=False)
    status, _, previews = client.predict(*train_args("robot"), api_name="/train")
    status = html.unescape(status)
    assert "Done: saved 'robot'" in status, status
    assert (lib / "robot" / "pytorch_loldu_weights.safetensors").is_file() and previews
    gallery, message = client.predict(*gen_args(n=2), api_name="/generate")
    assert len(gallery) == 2 and "robot × 1" in message
    gallery, message = client.predict("a photo of sks robot", "", 2, 7.5, 0, True, ["robot"], api_name="/compare")
    assert [g["caption"] for g in gallery] == ["robot", "base model"] and "2 images in one batch" in message
    path, message = client.predict("robot", api_name="/download")
    weights = lib / "robot" / "pytorch_loldu_weights.safetensors"
    assert Path(path).read_bytes() == weights.read_bytes()
    for secret in (weights, Path("/etc/passwd"), lib.parent / "tiny-sd" / "model_index.json"):  # no raw file access
        assert httpx.get(f"{url}gradio_api/file={secret}").status_code in (403, 404)
    path, message = client.predict("robot", "kohya", api_name="/export_lora")
    assert path.endswith("robot.lora.safetensors") and "exported as a kohya LoRA" in message


@pytest.mark.slow
def test_bad_input_gets_one_clear_line(app_server, tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    url, _ = app_server
    client = Client(url, verbose=False)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    cases = [(train_args("x", images=CONCEPT[:2]), "/train", "at least 3 images"),
             (train_args("x", images=[*CONCEPT[:2], corrupt]), "/train", "corrupt.png: not a readable image"),
             (train_args("x", prompt="  "), "/train", "instance prompt is empty"),
             (train_args("x", steps=0), "/train", "less than minimum value 1"),  # Gradio checks slider ranges
             (gen_args(prompt=""), "/generate", "the prompt is empty"),
             (gen_args(adapter="nope"), "/generate", "no adapter named 'nope'")]
    for args, api, message in cases:
        with pytest.raises(AppError, match=message) as err:
            client.predict(*args, api_name=api)
        assert "Traceback" not in str(err.value)


@pytest.mark.slow
def test_one_training_job_at_a_time_and_cancel(app_server):
    from gradio_client import Client

    url, lib = app_server
    first, second = Client(url, verbose=False), Client(url, verbose=False)  # two sessions
    long_job = first.submit(*train_args("long", steps=500, every=1000), api_name="/train")
    with ThreadPoolExecutor(1) as pool:  # the job's outputs as they stream, until one shows a finished step
        running = pool.submit(lambda: any(re.search(r"step [1-9]\d*/500", out[0]) for out in long_job))
        assert running.result(timeout=120), long_job.outputs()
    # the studio refuses a second job outright (StudioBusyError) while one runs, so "after" ending "Done" below
    # proves it waited in the queue behind "long": no sleep, no status snapshot at a chosen moment
    queued = second.submit(*train_args("after", steps=1, every=1000), api_name="/train")
    second.predict(api_name="/cancel")  # another session cannot cancel it
    assert not long_job.done()
    first.predict(api_name="/cancel")
    status = html.unescape(long_job.result(timeout=60)[0])
    assert "Cancelled" in status and "kept the last checkpoint" in status, status
    assert "Done: saved 'after'" in html.unescape(queued.result(timeout=60)[0])
    assert {"long", "after"} <= {p.name for p in lib.iterdir()}


def test_the_toy_world_trains_several_photos_a_step():
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT))
    import app
    from loldu_sd import toyworld

    form = ([], "a photo of a sks star", "", 400, 32, 1e-3, 0, 25, "star")
    toy = app.Events(SimpleNamespace(base_model=str(toyworld.PIPELINE_DIR)))._request(*form)
    sd = app.Events(SimpleNamespace(base_model="stable-diffusion-v1-5/stable-diffusion-v1-5"))._request(*form)
    assert (toy.batch_size, sd.batch_size) == (toyworld.TRAIN_BATCH_SIZE, 1)
