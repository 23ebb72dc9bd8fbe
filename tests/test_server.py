"""The OpenAI-compatible server (server.py over serving.py), driven by the official `openai` client.

One server on the default model (SmolLM2-135M-Instruct, fp32, CPU) runs in a thread for the module.

Specification:
- /health, /v1/models; a greedy chat completion is the library's `generate` of the same messages,
  with usage counting the prompt, the completion and the reused prompt tokens;
- completions: a text prompt, `n` seeded samples (distinct, repeatable), logprobs in OpenAI's
  shape with the library's values; chat logprobs with top_logprobs;
- streaming (SSE): the deltas add up to the non-streamed text, one finish_reason per choice, and
  with stream_options.include_usage a last chunk holding the usage;
- a round without marking: agents that paste each other's answers into plain message text,
  sent together, reuse the answers (cached_tokens > 0, round accounting in /stats); requests
  submitted within the admission window run as one round; explicit marking through extra_body
  works too;
- concurrent unrelated requests each get exactly what they get alone; a plain request that
  arrives while a batch runs joins it and finishes before it;
- errors, OpenAI-shaped, and the server keeps serving: malformed JSON, unknown model, a bad
  parameter, an unsupported one, a prompt too long -> 400; a full queue -> 503 (ServingEngine);
  a client that disconnects mid-stream has its request aborted and its blocks freed;
- /metrics is Prometheus text with the request counters and the engine's stats.
"""
from __future__ import annotations

import contextlib
import threading
import time

import httpx
import openai
import pytest

from nanodance import LLM, SamplingParams
from nanodance.errors import CapacityError
from nanodance.server import BackgroundServer
from nanodance.serving import ServingEngine
from fixtures_default_model import default_model_dir  # noqa: F401

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def llm(default_model_dir):
    return LLM(default_model_dir, dtype="float32", device="cpu", kv_cache_blocks=512)


@pytest.fixture(scope="module")
def server(llm):
    """(base_url, serving) of a live server in a thread; stopped after the module."""
    serving = ServingEngine(llm, admission_window=0.05)
    background = BackgroundServer(serving, MODEL)
    yield background.url, serving
    background.stop()
    assert not serving.running  # the app's shutdown stopped the engine thread


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def idle(serving: ServingEngine, timeout: float = 60) -> None:
    """Wait until the engine thread has nothing queued or running."""
    deadline = time.monotonic() + timeout
    while serving.waiting() or serving.llm.engine.call is not None:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def start_long_request(serving: ServingEngine):
    """A 300-token request, once it runs (its first snapshot is in)."""
    ticket = serving.submit(chat("Tell me a long story."), SamplingParams(max_tokens=300, ignore_eos=True))
    deadline = time.monotonic() + 60
    while not ticket.outputs:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return ticket


@contextlib.contextmanager
def own_engine(llm, server, **options):
    """A `ServingEngine` of the test's own on the module's LLM, started once the server's engine is
    idle; stopped after, and then no block may be referenced that nothing holds."""
    idle(server[1])
    serving = ServingEngine(llm, **options)
    try:
        yield serving
    finally:
        serving.shutdown()
    llm.check_invariants()


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# --- basics -------------------------------------------------------------------------------------

def test_health_and_models(server):
    base, _ = server
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    models = httpx.get(base + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]


def test_a_greedy_chat_completion_is_what_the_library_generates(client, server, llm):
    messages = chat("Name a primary color.")
    idle(server[1])
    [expected] = llm.generate([messages], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    got = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12)
    assert got.choices[0].message.content == expected.text
    assert got.choices[0].finish_reason == expected.finish_reason
    assert got.usage.prompt_tokens == expected.num_prompt_tokens
    assert got.usage.completion_tokens == len(expected.token_ids)
    assert got.usage.prompt_tokens_details.cached_tokens >= 0


def test_completions_with_n_seeded_samples_and_logprobs(client):
    kwargs = dict(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=1.0, seed=3, n=3,
                  logprobs=2)
    got = client.completions.create(**kwargs)
    texts = [c.text for c in got.choices]
    assert [c.index for c in got.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert [c.text for c in client.completions.create(**kwargs).choices] == texts  # seeded: repeatable
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) > 0
    assert "".join(lp.tokens) == texts[0]
    assert all(len(top) <= 2 and all(v <= 0 for v in top.values()) for top in lp.top_logprobs)


def test_chat_logprobs_have_the_library_values(client, server, llm):
    messages = chat("Say yes.")
    got = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=4,
                                         logprobs=True, top_logprobs=3)
    idle(server[1])
    [expected] = llm.generate([messages], SamplingParams(temperature=0, max_tokens=4, logprobs=3), use_tqdm=False)
    content = got.choices[0].logprobs.content
    assert [round(c.logprob, 4) for c in content] == [round(e.logprob, 4) for e in expected.logprobs]
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)


def test_a_stream_adds_up_to_the_completion_and_ends_with_usage(client):
    messages = chat("Count from one to five.")
    full = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=16)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=16,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really streamed


def test_a_stop_string_never_leaks_into_a_stream(client):
    messages = chat("Count from one to ten, separated by commas.")  # the model writes "1. 1\n2. 2\n..."
    stop = ["4. 4"]  # four tokens: its start is streamed before the whole of it is seen, unless held back
    full = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=40, stop=stop)
    chunks = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=40,
                                            stop=stop, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and text.endswith("3. 3\n")


# --- rounds without marking ----------------------------------------------------------------------

def test_agents_pasting_each_others_answers_share_them_without_marking(server):
    base, serving = server
    names = ["Ada", "Ben", "Cy"]
    questions = [f"{n}, in one sentence: why do leaves change color in autumn?" for n in names]

    def send_all(messages_list):
        results = [None] * len(messages_list)

        def one(i):
            c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
            results[i] = c.chat.completions.create(model=MODEL, messages=messages_list[i], temperature=0,
                                                   max_tokens=40)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(messages_list))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        return results

    first = send_all([chat(q) for q in questions])
    answers = [r.choices[0].message.content for r in first]
    assert all(len(a) > 40 for a in answers), answers
    rounds_before = len(serving.llm.round_history)
    spans_before = serving.llm.stats()["auto_shared_spans"]
    second = send_all([chat(f"{questions[i]}\n\nThe others answered:\n" +
                            "\n".join(f"- {names[j]}: {answers[j]}" for j in range(3) if j != i) +
                            "\n\nGive your final answer.") for i in range(3)])
    assert all(r.usage.prompt_tokens_details.cached_tokens > 20 for r in second), \
        [r.usage.prompt_tokens_details.cached_tokens for r in second]
    stats = httpx.get(base + "/stats").json()
    assert stats["engine"]["auto_shared_spans"] - spans_before >= 6  # each prompt holds the two others' answers
    new_rounds = stats["rounds"][-(len(serving.llm.round_history) - rounds_before):]
    # Usually one round of 3; on a loaded machine a request may miss the 50 ms window and form the next.
    assert sum(r["agents"] for r in new_rounds) == 3 and all(r["shared_tokens"] > 0 for r in new_rounds)


def test_requests_submitted_within_the_admission_window_run_as_one_round(llm, server):
    with own_engine(llm, server, admission_window=1.0) as serving:
        rounds = len(llm.round_history)
        tickets = [serving.submit(chat(f"Say {word}."), SamplingParams(temperature=0, max_tokens=3))
                   for word in ("yes", "no", "maybe")]
        for t in tickets:
            t.wait(60)
        assert serving.counters.batches == 1 and serving.counters.largest_batch == 3
        assert len(llm.round_history) == rounds + 1 and llm.round_history[-1]["agents"] == 3


def test_explicit_marking_through_extra_body(client, server):
    shared = "The meeting moved to Thursday at noon, in the large room on the third floor."
    got = client.chat.completions.create(model=MODEL, messages=chat(f"Note: {shared} When is the meeting?"),
                                         temperature=0, max_tokens=8, extra_body={"nanodance": {"shared": [shared]}})
    assert got.choices[0].message.content
    assert httpx.get(server[0] + "/stats").json()["rounds"][-1]["shared_tokens"] > 10
    with pytest.raises(openai.BadRequestError, match="does not occur"):
        client.chat.completions.create(model=MODEL, messages=chat("Hi"), max_tokens=2,
                                       extra_body={"nanodance": {"shared": ["not in the prompt"]}})


def test_concurrent_requests_each_get_what_they_get_alone(client, server):
    prompts = ["List two fruits.", "What is 2 + 2?", "Name a planet.", "Translate 'cat' to French."]
    alone = [client.chat.completions.create(model=MODEL, messages=chat(p), temperature=0, max_tokens=10)
             .choices[0].message.content for p in prompts]
    together = [None] * len(prompts)

    def one(i):
        together[i] = client.chat.completions.create(model=MODEL, messages=chat(prompts[i]), temperature=0,
                                                     max_tokens=10).choices[0].message.content
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == alone


# --- errors -------------------------------------------------------------------------------------

def test_malformed_json_is_a_400_with_an_openai_error_body(server):
    r = httpx.post(server[0] + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "JSON" in error["message"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(model="gpt-4"), "not served here"),
    (dict(temperature=-1), "temperature"),
    (dict(n=0), "n must be"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools is not supported"),
    (dict(messages=[{"role": "user", "content": "word " * 9000}]), "max_model_len"),
    (dict(messages=[]), "messages"),
])
def test_bad_requests_are_400s_and_the_server_keeps_serving(client, kwargs, match):
    request = dict(model=MODEL, messages=chat("Hi"), max_tokens=2)
    request.update(kwargs)
    with pytest.raises(openai.BadRequestError, match=match):
        client.chat.completions.create(**request)
    assert client.chat.completions.create(model=MODEL, messages=chat("Hi"), max_tokens=2).choices


def test_a_client_that_leaves_mid_stream_has_its_request_aborted_and_freed(server):
    base, serving = server
    aborted = serving.llm.stats()["requests_aborted"]
    body = {"model": MODEL, "messages": chat("Tell me a long story."), "max_tokens": 400, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r:
        for n, _line in enumerate(r.iter_lines()):
            if n >= 6:
                break  # leave after a few chunks
    deadline = time.monotonic() + 60
    while serving.llm.stats()["requests_aborted"] == aborted:
        assert time.monotonic() < deadline, "the request was never aborted"
        time.sleep(0.05)
    idle(serving)
    serving.llm.check_invariants()  # nothing referenced that nobody holds


def test_a_full_queue_is_refused_not_crashed(llm, server):
    with own_engine(llm, server, admission_window=0, max_waiting=1) as serving:
        long = start_long_request(serving)
        queued = serving.submit(chat("Hi"), SamplingParams(max_tokens=2))
        with pytest.raises(CapacityError, match="already waiting"):
            serving.submit(chat("Hi"), SamplingParams(max_tokens=2))
        serving.cancel(long)
        assert long.wait(60)[0].finish_reason == "abort"
        assert queued.wait(60)[0].finish_reason == "length"


def test_a_plain_request_joins_a_running_batch_and_finishes_first(llm, server):
    idle(server[1])  # before the LLM is called from this thread
    hi = chat("What is 2 + 2?")
    [alone] = llm.generate([hi], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    with own_engine(llm, server, admission_window=0) as serving:
        long = start_long_request(serving)
        short = serving.submit(hi, SamplingParams(temperature=0, max_tokens=6))
        [out] = short.wait(60)
        assert not long.done and serving.counters.joined == 1 and serving.counters.batches == 1
        assert out.token_ids == alone.token_ids
        serving.cancel(long)
        assert long.wait(60)[0].finish_reason == "abort"


def test_a_late_request_reads_the_earlier_batchs_output_as_its_producer_master(llm, server):
    with own_engine(llm, server, admission_window=0) as serving:
        [answer] = serving.generate(chat("In one sentence, what is a comet?"),
                                    SamplingParams(temperature=0, max_tokens=40), timeout=60)
        before = llm.collector.counters.producer_masters
        serving.generate(chat(f"A student wrote: {answer.text}\nIs that right?"),
                         SamplingParams(temperature=0, max_tokens=4), timeout=60)
        assert llm.collector.counters.producer_masters == before + 1  # its K/V, pinned since the first batch
        assert llm.round_history[-1]["shared_tokens"] >= len(answer.token_ids) - 3  # but its stop and boundary tokens


def test_a_full_queue_over_http_is_a_503_with_an_openai_error_body(llm, server, monkeypatch):
    from fastapi.testclient import TestClient
    from nanodance.server import build_app

    with own_engine(llm, server) as serving:
        def full(*args, **kwargs):
            raise CapacityError("1024 requests are already waiting; retry later")
        monkeypatch.setattr(serving, "submit", full)
        r = TestClient(build_app(serving, MODEL)).post("/v1/chat/completions", json={"messages": chat("Hi")})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        assert "already waiting" in r.json()["error"]["message"]


def test_metrics_are_prometheus_text(server, client):
    client.chat.completions.create(model=MODEL, messages=chat("Hi"), max_tokens=2)
    text = httpx.get(server[0] + "/metrics").text
    assert 'nanodance_http_requests_total{endpoint="chat",status="200"}' in text
    assert "nanodance_prefill_tokens_computed " in text and "nanodance_serving_batches " in text
