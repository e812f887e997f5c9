"""Scale-out on Ray Serve: the same app as a deployment with two replicas on a local Ray instance (127.0.0.1),
requests through Ray's HTTP proxy with the ``openai`` client, one replica killed mid-load."""
import socket
import threading
import time

import pytest

ray = pytest.importorskip("ray", reason="ray[serve] is not installed (pip install 'moevl-ascend[ray]')")
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'moevl-ascend[ray]')")
openai = pytest.importorskip("openai")

from moevl.serve import ray_app  # noqa: E402
from moevl.serve.app import ServerConfig  # noqa: E402

MODEL = "tiny"


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="moevl-test")
    port = free_port()
    # two rows and no queue per replica: Ray's router holds what the replicas cannot start yet
    cfg = ServerConfig("awaker-tiny", device="cpu", max_batch=2, max_queue=0, max_context=1024,
                       served_model_name=MODEL)
    ray_app.start(cfg, replicas=2, host="127.0.0.1", port=port)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def replicas():
    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::") and "MoevlReplica" in a["name"]]


def test_placement_asks_ray_for_one_device_per_replica():
    assert ray_app.placement("npu", {"NPU": 8})[0] == {"resources": {"NPU": 1}}
    assert ray_app.placement("auto", {"NPU": 8, "CPU": 96})[1:] == ("npu", 8)
    assert ray_app.placement("auto", {"GPU": 2})[0] == {"num_gpus": 1}
    assert ray_app.placement("cpu", {"CPU": 4}) == ({"num_cpus": 1}, "cpu", 4)


def test_two_replicas_serve_through_rays_proxy_and_survive_losing_one(cluster):
    assert len(replicas()) == 2
    client = openai.OpenAI(base_url=cluster + "/v1", api_key="-", max_retries=0, timeout=120)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert r.choices[0].finish_reason in ("length", "stop")

    results = {}

    def stream(i):
        started, reason = False, None
        try:
            for chunk in client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"story {i}"}], max_tokens=300, stream=True,
                    extra_body={"ignore_eos": True}):
                if chunk.choices and chunk.choices[0].delta.content:
                    started = True
                if chunk.choices and chunk.choices[0].finish_reason:
                    reason = chunk.choices[0].finish_reason
            results[i] = ("done", started, reason)
        except Exception as e:  # noqa: BLE001  recorded and judged below
            results[i] = ("failed", started, repr(e))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # some requests are streaming, others wait in Ray's router
    victim = replicas()[0]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    for t in threads:
        t.join(180)
    assert len(results) == 8
    lost = [i for i, (state, started, _) in results.items() if state == "failed" and not started]
    assert not lost, f"requests lost before they started streaming: {[results[i] for i in lost]}"
    assert sum(state == "done" for state, _, _ in results.values()) >= 4, results
    # the service recovers: a new request is answered, and Serve brings the replica count back to two
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "again"}], max_tokens=4)
    assert r.choices[0].finish_reason in ("length", "stop")
    deadline = time.monotonic() + 90
    while len(replicas()) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert len(replicas()) == 2
