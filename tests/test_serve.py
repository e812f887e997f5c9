"""``moevl serve`` through the official ``openai`` client against a live server on an ephemeral 127.0.0.1 port:
answers, streaming, images as data URLs, every error class, auth, disconnect, queue full, metrics, shutdown."""
import base64
import concurrent.futures
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

import moevl  # noqa: E402
from moevl.model.tiny import DEMO_IMAGE  # noqa: E402
from moevl.serve.app import Server, ServerConfig, ThreadedServer, create_app  # noqa: E402

KEY = "sk-test-key"
MODEL = "tiny"
LONG = {"ignore_eos": True}  # (extension) run to max_tokens whatever the model says: a request that stays busy


def data_url(raw: bytes, kind="png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(raw).decode()


IMAGE = data_url(DEMO_IMAGE.read_bytes())


def user(text, *images):
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in images),
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    (d / "shapes.png").write_bytes(DEMO_IMAGE.read_bytes())
    return d


@pytest.fixture(scope="module")
def session():  # the random-weights structure (2 layers): the built-in awaker-tiny is trained now
    return moevl.load("awaker-tiny-random", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def server(session, media):
    cfg = ServerConfig("awaker-tiny-random", max_batch=4, max_queue=32, max_context=256, api_key=KEY,
                       allowed_media_dir=str(media), served_model_name=MODEL)
    with ThreadedServer(create_app(server=Server(cfg, session=session))) as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def alone(session, question, images=(), n=8):
    return session.ask(question, images=list(images), max_new_tokens=n, temperature=0.0).texts[0]


# ------------------------------------------------------------------------------------------ answers
def test_a_completion_with_an_image_as_a_data_url_answers_as_the_session_does(client, session):
    r = client.chat.completions.create(model=MODEL, messages=user("What is this?", IMAGE), max_tokens=8,
                                       temperature=0)
    assert r.choices[0].message.content == alone(session, "What is this?", [DEMO_IMAGE])
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 40  # image tokens count as prompt
    routing = r.model_extra["moevl_routing"]
    assert {(d["layer"], d["router"]) for d in routing} == {(0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp")}


def test_16_concurrent_clients_get_what_each_gets_alone(client, session):
    qs = [("What is this?", [IMAGE]), ("这是什么？", []), ("Describe every shape in detail.", [IMAGE]),
          ("你好", [])] * 4
    ns = [3 + (7 * i) % 10 for i in range(len(qs))]
    expected = [alone(session, q, [DEMO_IMAGE] * len(imgs), n) for (q, imgs), n in zip(qs, ns)]

    def ask(i):
        q, imgs = qs[i]
        return client.chat.completions.create(model=MODEL, messages=user(q, *imgs), max_tokens=ns[i],
                                              temperature=0).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, range(len(qs))))
    assert got == expected


def test_streaming_gives_the_same_text_then_usage_and_done(client, server):
    msgs = user("Describe the image.", IMAGE)
    whole = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and "moevl_routing" in finals[0].model_extra
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    # the raw stream ends with the SSE terminator
    req = urllib.request.Request(server.url + "/v1/chat/completions", method="POST", headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}, data=json.dumps(
        {"model": MODEL, "messages": msgs, "max_tokens": 2, "stream": True}).encode())
    with urllib.request.urlopen(req) as r:
        body = r.read().decode()
    assert body.rstrip().endswith("data: [DONE]") and body.startswith("data: {")


def test_stop_strings_cut_the_answer(client, session):
    full = alone(session, "What is this?", n=12)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), full
    r = client.chat.completions.create(model=MODEL, messages=user("What is this?"), max_tokens=12, temperature=0,
                                       stop=[stop])
    assert r.choices[0].message.content == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_a_seed_makes_sampling_repeatable_whatever_runs_beside_it(client):
    def ask(seed):
        return client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=8, temperature=1.0,
                                              top_p=0.9, seed=seed).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        a, b, c, _ = pool.map(ask, [7, 7, 8, 9])
    assert a == b


def test_file_urls_under_the_allowed_folder_are_read(client, media, session):
    r = client.chat.completions.create(model=MODEL, messages=user("What is this?", (media / "shapes.png").as_uri()),
                                       max_tokens=4, temperature=0)
    assert r.choices[0].message.content == alone(session, "What is this?", [DEMO_IMAGE], 4)


def test_awaker_takes_earlier_turns(client):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "what now?"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3)
    assert r.usage.prompt_tokens > client.chat.completions.create(
        model=MODEL, messages=user("what now?"), max_tokens=1).usage.prompt_tokens


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list()] == [MODEL]


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs,names", [
    (dict(messages=user("x", "data:image/png;base64,@@notbase64@@")), "base64"),
    (dict(messages=user("x", data_url(b"these bytes are no image"))), "decoded"),
    (dict(messages=user("x", "https://example.com/cat.png")), "network"),
    (dict(messages=user("x", "file:///etc/passwd")), "not under"),
    (dict(messages=user("x"), max_tokens=100000), "context"),
    (dict(messages=user("x"), temperature=5), "temperature"),
    (dict(messages=user("x"), top_p=0), "top_p"),
    (dict(messages=user("x"), max_tokens=0), "max_tokens"),
    (dict(messages=user("x"), n=2), "'n'"),
    (dict(messages=user("x"), logprobs=True), "logprobs"),
    (dict(messages=user("x"), tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
    (dict(messages=[{"role": "system", "content": "be brief"}, *user("x")]), "system"),
    (dict(messages=[]), "messages"),
    (dict(messages=user("x"), stream_options={"include_usage": True}), "stream_options"),
    (dict(messages=user("x"), extra_body={"ignore_eos": "yes"}), "ignore_eos"),
    (dict(messages=user("x"), extra_body={"best_of": 3}), "unknown field"),
])
def test_bad_input_is_a_400_naming_the_problem(client, kwargs, names):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, **kwargs)
    assert e.value.status_code == 400
    assert names in e.value.body["message"], e.value.body


def test_invalid_json_is_a_400(server):
    req = urllib.request.Request(server.url + "/v1/chat/completions", data=b"{not json", method="POST",
                                 headers={"Authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400 and json.loads(e.value.read())["error"]["type"] == "invalid_request_error"


def test_a_wrong_or_missing_key_is_a_401(server):
    for key in ("wrong", ""):
        c = openai.OpenAI(base_url=server.url + "/v1", api_key=key or "-", max_retries=0,
                          default_headers={} if key else {"Authorization": ""})
        with pytest.raises(openai.AuthenticationError):
            c.chat.completions.create(model=MODEL, messages=user("x"), max_tokens=1)
        with pytest.raises(openai.AuthenticationError):
            c.models.list()


def test_an_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=user("x"), max_tokens=1)
    assert "gpt-4o" in e.value.body["message"] and MODEL in e.value.body["message"]


# ------------------------------------------------------------------------------------------ load, queue, disconnect
@pytest.fixture(scope="module")
def one_row(session):
    """One batch row and no queue: a second request while one runs is refused."""
    cfg = ServerConfig("awaker-tiny", max_batch=1, max_queue=0, max_context=2048, served_model_name=MODEL)
    with ThreadedServer(create_app(server=Server(cfg, session=session))) as srv:
        yield srv


def metric(url, name, **labels) -> float:
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            lbl = line[len(name):].split(" ")[0]
            if all(f'{k}="{v}"' in lbl for k, v in labels.items()) or not want:
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_full_queue_is_a_429_with_retry_after_and_a_disconnect_frees_the_row(one_row):
    aborted = metric(one_row.url, "moevl_requests_aborted_total")
    c = openai.OpenAI(base_url=one_row.url + "/v1", api_key="-", max_retries=0, timeout=60)
    long = c.chat.completions.create(model=MODEL, messages=user("tell me everything"), max_tokens=1900, stream=True,
                                     extra_body=LONG)
    next(iter(long))
    deadline = time.monotonic() + 30
    while metric(one_row.url, "moevl_num_requests_running") < 1 and time.monotonic() < deadline:
        time.sleep(0.02)  # it is running
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model=MODEL, messages=user("x"), max_tokens=1)
    assert int(e.value.response.headers["retry-after"]) >= 1
    long.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 30
    while metric(one_row.url, "moevl_num_requests_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(one_row.url, "moevl_num_requests_running") == 0
    assert metric(one_row.url, "moevl_requests_aborted_total") == aborted + 1  # dropped before its 900 tokens
    r = c.chat.completions.create(model=MODEL, messages=user("x"), max_tokens=2)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert metric(one_row.url, "moevl_requests_total", status="cancelled") >= 1
    assert metric(one_row.url, "moevl_requests_total", status="429") >= 1


def test_a_non_streaming_client_that_goes_away_frees_its_row(one_row):
    aborted = metric(one_row.url, "moevl_requests_aborted_total")
    c = openai.OpenAI(base_url=one_row.url + "/v1", api_key="-", max_retries=0, timeout=1.0)
    try:  # the client gives up after 1 s and closes the connection
        done = c.chat.completions.create(model=MODEL, messages=user("tell me everything"), max_tokens=1900,
                                         extra_body=LONG)
    except openai.APITimeoutError:
        pass
    else:  # a machine fast enough for 1,900 tokens within the second: nothing was left to drop
        pytest.skip(f"the answer ended ({done.choices[0].finish_reason}) before the client gave up")
    deadline = time.monotonic() + 30
    while metric(one_row.url, "moevl_num_requests_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(one_row.url, "moevl_num_requests_running") == 0
    assert metric(one_row.url, "moevl_requests_aborted_total") == aborted + 1  # dropped, not finished
    c = openai.OpenAI(base_url=one_row.url + "/v1", api_key="-", max_retries=0, timeout=60)
    assert c.chat.completions.create(model=MODEL, messages=user("x"), max_tokens=2).choices[0].finish_reason


def test_health_is_503_until_the_model_is_loaded():
    from fastapi.testclient import TestClient

    server = Server(ServerConfig("awaker-tiny", max_batch=1))
    with TestClient(create_app(server=server, load=False)) as http:
        assert http.get("/health").status_code == 503
        r = http.post("/v1/chat/completions", json={"model": "awaker-tiny", "messages": user("x")})
        assert r.status_code == 503 and "Retry-After" in r.headers and r.json()["error"]["message"]
        server.start(background=False)
        assert http.get("/health").status_code == 200
        server.close()


def test_metrics_report_latency_tokens_and_expert_selections(client, server):
    client.chat.completions.create(model=MODEL, messages=user("What is this?", IMAGE), max_tokens=4)
    text = urllib.request.urlopen(server.url + "/metrics").read().decode()
    for name in ("moevl_time_to_first_token_seconds_bucket", "moevl_time_per_output_token_seconds_bucket",
                 "moevl_num_requests_waiting", "moevl_num_requests_running", "moevl_decode_batch_size_bucket",
                 "moevl_prompt_tokens_total", "moevl_generation_tokens_total"):
        assert name in text, name
    assert metric(server.url, "moevl_time_to_first_token_seconds_count") >= 1
    assert metric(server.url, "moevl_requests_total", status="200") >= 1
    # Awaker: one selection per request and router; layer, router and expert as labels
    attn0 = metric(server.url, "moevl_expert_selections_total", layer="0", router="attn")
    assert attn0 == metric(server.url, "moevl_expert_selections_total", layer="1", router="mlp") >= 1
    assert 'expert="' in text


def test_shutdown_lets_a_running_request_finish(session):
    cfg = ServerConfig("awaker-tiny", max_batch=2, served_model_name=MODEL, max_context=512)
    srv = ThreadedServer(create_app(server=Server(cfg, session=session)), graceful_timeout=60).start()
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="-", max_retries=0, timeout=60)
    stream = iter(c.chat.completions.create(model=MODEL, messages=user("go on"), max_tokens=300, stream=True,
                                            extra_body=LONG))
    next(stream)
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    reasons = [ch.choices[0].finish_reason for ch in stream if ch.choices]
    stopper.join(60)
    assert reasons[-1] == "length"
    assert not stopper.is_alive()


def test_moellava_is_served_and_refuses_earlier_turns():
    cfg = ServerConfig("moellava-tiny", device="cpu", max_batch=2, max_context=512)
    with ThreadedServer(create_app(cfg)) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="-", max_retries=0)
        r = c.chat.completions.create(model="moellava-tiny", messages=user("What is this?", IMAGE), max_tokens=3)
        assert r.choices[0].message.content is not None
        assert all("counts" in d for d in r.model_extra["moevl_routing"])
        with pytest.raises(openai.BadRequestError, match="multi-turn"):
            c.chat.completions.create(model="moellava-tiny", max_tokens=1, messages=[
                {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}])


def test_serve_cli_refuses_a_bad_model_in_one_line(capsys):
    from moevl.cli import main

    assert main(["serve", "--model", "/no/such/folder"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moevl serve: error:")


def test_an_exported_onnx_folder_is_served_one_request_at_a_time(tmp_path):
    """--backend ort has no step-level engine: requests run one after another (request-level), each as alone."""
    pytest.importorskip("onnxruntime")
    from moevl.export.onnx import export_onnx

    folder = export_onnx("moellava-tiny", tmp_path / "onnx", validate=False, log=lambda *a: None)
    ort = moevl.load(folder, backend="ort")
    questions = ["What is this?", "这是什么？", "Where is the circle?"]
    expected = [ort.ask(q, images=[DEMO_IMAGE] if i != 1 else [], max_new_tokens=4).texts[0]
                for i, q in enumerate(questions)]
    cfg = ServerConfig(str(folder), backend="ort", max_queue=8, served_model_name=MODEL)
    with ThreadedServer(create_app(server=Server(cfg, session=ort))) as srv:
        assert type(srv.server.config.app.state.server.scheduler).__name__ == "SerialScheduler"
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="-", max_retries=0, timeout=120)

        def ask(i):
            return c.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, messages=user(
                questions[i], *([IMAGE] if i != 1 else []))).choices[0].message.content

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            assert list(pool.map(ask, range(3))) == expected
        with pytest.raises(openai.BadRequestError, match="ignore_eos"):
            c.chat.completions.create(model=MODEL, max_tokens=2, messages=user("x"), extra_body=LONG)


def test_moevl_serve_starts_answers_and_exits_cleanly_on_sigterm(tmp_path):
    """The CLI end to end: health turns 200, a streaming answer started before SIGTERM still completes."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proc = subprocess.Popen([sys.executable, "-m", "moevl.cli", "serve", "--model", "awaker-tiny", "--device", "cpu",
                             "--port", str(port), "--max-batch", "2", "--max-context", "512"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                    break
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        c = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=60)
        stream = iter(c.chat.completions.create(model="awaker-tiny", messages=user("go on"), max_tokens=100,
                                                stream=True, extra_body=LONG))
        next(stream)
        os.kill(proc.pid, signal.SIGTERM)
        reasons = [ch.choices[0].finish_reason for ch in stream if ch.choices]
        assert reasons[-1] == "length"  # finished, not cut (well within --shutdown-timeout)
        assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
