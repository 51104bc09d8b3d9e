"""`altlm serve` under bad requests: the real server over the tiny model on 127.0.0.1, real sockets.

Every bad request must get a 4xx JSON answer in OpenAI's error shape — never a dropped connection, a 5xx or a
traceback in the server's log — and the server must still answer a good request after all of them. Raw sockets
are used where a well-behaved client library could not send the request (lying Content-Length, trickled bodies,
garbage request lines); the real OpenAI client checks that it reads our errors as OpenAI's.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import traceback

import pytest

from altlm.serve import serve

READ_TIMEOUT = 2.0  # seconds the server gives a request body; short so the slow-body cases finish quickly
USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server():
    srv = serve("tiny-smollm2", port=0, read_timeout=READ_TIMEOUT)  # port 0: the OS picks a free one, no race
    # socketserver prints a traceback for any exception that escapes a handler (and drops that connection):
    # record them so every test can assert there were none
    srv.escaped = []
    srv.handle_error = lambda request, address: srv.escaped.append(traceback.format_exc())
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def no_escaped_exceptions(request):
    yield
    if "server" in request.fixturenames:
        srv = request.getfixturevalue("server")
        time.sleep(0.05)  # a handler thread may still be finishing the connection the test just closed
        assert not srv.escaped, srv.escaped[0]


def raw(srv, data: bytes, timeout: float = 10.0, then=None) -> tuple[int, dict, float]:
    """Send `data` on a fresh connection (then call `then(sock)` if given), read one response: status, JSON body
    and seconds until the answer arrived. A dropped connection raises, which fails the test."""
    sock = socket.create_connection(srv.server_address[:2], timeout=timeout)
    try:
        start = time.monotonic()
        sock.sendall(data)
        if then:
            then(sock)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        body = resp.read()
        assert resp.getheader("Content-Type") == "application/json", body
        return resp.status, json.loads(body), time.monotonic() - start
    finally:
        sock.close()


def post(srv, body, path: str = "/v1/chat/completions", headers: str | None = None) -> tuple[int, dict, float]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = headers if headers is not None else f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    return raw(srv, f"POST {path} HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode() + data)


def is_openai_error(body: dict) -> bool:
    err = body.get("error")
    return (
        isinstance(err, dict)
        and set(err) == {"message", "type", "param", "code"}
        and isinstance(err["message"], str)
        and err["message"]
        and isinstance(err["type"], str)
    )


def chat(**kw) -> dict:
    return {"model": "tiny-smollm2", "messages": USER, "max_tokens": 4, **kw}


# (name, body, status, param, code): each must be refused before any generation
BAD_BODIES = [
    ("max_tokens -5", chat(max_tokens=-5), 400, "max_tokens", "invalid_value"),
    ("max_tokens 0", chat(max_tokens=0), 400, "max_tokens", "invalid_value"),
    ("max_tokens text", chat(max_tokens="ten"), 400, "max_tokens", "invalid_type"),
    ("max_tokens float", chat(max_tokens=2.5), 400, "max_tokens", "invalid_type"),
    ("max_tokens bool", chat(max_tokens=True), 400, "max_tokens", "invalid_type"),
    (
        "max_completion_tokens -1",
        {"messages": USER, "max_completion_tokens": -1},
        400,
        "max_completion_tokens",
        "invalid_value",
    ),
    (
        "50,000 words",
        chat(messages=[{"role": "user", "content": "word " * 50_000}]),
        400,
        "messages",
        "context_length_exceeded",
    ),
    ("max_tokens over the context", chat(max_tokens=9000), 400, "messages", "context_length_exceeded"),
    ("no messages", {"model": "m"}, 400, "messages", None),
    ("messages not a list", chat(messages="Hi"), 400, "messages", None),
    ("messages empty", chat(messages=[]), 400, "messages", None),
    ("message not an object", chat(messages=["Hi"]), 400, "messages[0]", None),
    ("content missing", chat(messages=[{"role": "user"}]), 400, "messages[0].content", None),
    ("content a number", chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content", None),
    ("role missing", chat(messages=[{"content": "Hi"}]), 400, "messages[0].role", None),
    ("role a list", chat(messages=[{"role": ["user"], "content": "Hi"}]), 400, "messages[0].role", None),
    ("temperature text", chat(temperature="hot"), 400, "temperature", "invalid_type"),
    ("temperature negative", chat(temperature=-1), 400, "temperature", "invalid_value"),
    ("top_p 0", chat(top_p=0), 400, "top_p", "invalid_value"),
    ("top_p 2", chat(top_p=2), 400, "top_p", "invalid_value"),
    ("n 0", chat(n=0), 400, "n", "invalid_value"),
    ("n text", chat(n="2"), 400, "n", "invalid_type"),
    ("seed text", chat(seed="x"), 400, "seed", "invalid_type"),
    ("stream", chat(stream=True), 400, "stream", "unsupported_value"),
]


@pytest.mark.parametrize("name,body,status,param,code", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_request_body_is_a_4xx_openai_error(server, name, body, status, param, code):
    got, answer, _ = post(server, body)
    assert got == status and is_openai_error(answer), answer
    assert (answer["error"]["param"], answer["error"]["code"]) == (param, code), answer


@pytest.mark.parametrize(
    "name,data,status",
    [
        ("malformed JSON", b'{"messages": [', 400),
        ("NaN temperature", b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}', 400),
        ("not UTF-8", b"\xff\xfe{}", 400),
        ("a JSON list", b"[1, 2]", 400),
        ("empty body", b"", 400),
    ],
)
def test_unparsable_body_is_a_400(server, name, data, status):
    got, answer, _ = post(server, data)
    assert got == status and is_openai_error(answer), answer


def test_context_length_message_counts_the_tokens(server):
    _, answer, _ = post(server, chat(max_tokens=9000))
    assert "maximum context length is 8192 tokens" in answer["error"]["message"]
    assert "9000 in the completion" in answer["error"]["message"]


def test_huge_announced_body_is_refused_unread(server):
    """999,999,999 bytes announced, none sent: the answer is 413 at once, not a thread waiting for the body."""
    got, answer, seconds = raw(
        server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n"
    )
    assert got == 413 and is_openai_error(answer), answer
    assert seconds < READ_TIMEOUT  # (a server that waited for the body would answer 408 after READ_TIMEOUT)


def test_body_that_never_arrives_times_out(server):
    got, answer, seconds = raw(
        server, b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"messages"'
    )
    assert got == 408 and is_openai_error(answer), answer
    # the upper bound has room for a busy machine; a server that never times out makes raw() raise at 10 s
    assert READ_TIMEOUT * 0.9 < seconds < READ_TIMEOUT + 6


def test_trickled_body_times_out_on_the_total_not_per_read(server):
    """One byte every 0.3 s never trips a per-read timeout; the deadline is for the whole body."""
    stop = threading.Event()

    def trickle(sock):
        def run():
            while not stop.wait(0.3):
                try:
                    sock.sendall(b" ")
                except OSError:
                    return

        threading.Thread(target=run, daemon=True).start()

    try:
        got, answer, seconds = raw(
            server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n", then=trickle
        )
    finally:
        stop.set()
    assert got == 408 and is_openai_error(answer), answer
    assert seconds < READ_TIMEOUT + 6  # a per-read timeout never fires: raw() raises at 10 s


def test_idle_connection_is_closed(server):
    """A client that connects and sends nothing frees its thread after the read timeout."""
    with socket.create_connection(server.server_address[:2], timeout=READ_TIMEOUT + 8) as sock:
        start = time.monotonic()
        assert sock.recv(1) == b""
        assert time.monotonic() - start < READ_TIMEOUT + 6


@pytest.mark.parametrize(
    "name,request_head,status",
    [
        ("bad Content-Length", "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
        ("negative Content-Length", "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400),
        (
            "chunked",
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            "5\r\nhello\r\n0\r\n\r\n",
            411,
        ),
        ("unknown POST route", "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", 404),
        ("unknown GET route", "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        ("unknown method", "PUT /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
        ("request line with a space in the path", "GET /v1/a b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ],
)
def test_bad_http_is_a_4xx_openai_error(server, name, request_head, status):
    got, answer, _ = raw(server, request_head.encode())
    assert got == status and is_openai_error(answer), answer


def test_client_gone_mid_body_leaves_the_server_up(server):
    with socket.create_connection(server.server_address[:2], timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    got, answer, _ = post(server, chat())
    assert got == 200 and answer["choices"], answer


def test_openai_client_reads_our_errors_and_a_good_request_still_works(server, capfd):
    """Runs after the bad requests above (same module-scoped server): it still answers."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny-smollm2", messages=[{"role": "user", "content": "word " * 50_000}], max_tokens=4
        )
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
    r = client.chat.completions.create(model="tiny-smollm2", messages=USER, max_tokens=4, temperature=0, n=2)
    assert len(r.choices) == 2 and all(isinstance(c.message.content, str) for c in r.choices)
    assert 0 < r.usage.completion_tokens <= 8
    parts = client.chat.completions.create(
        model="tiny-smollm2",
        max_tokens=4,
        temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
    )
    assert parts.choices[0].message.content == r.choices[0].message.content  # text parts read as the same string
    err = capfd.readouterr().err
    assert "Traceback" not in err and "altlm serve:" not in err, err  # nor a 500 logged for a good request


def test_generation_refuses_zero_new_tokens_with_a_clear_error():
    """The in-process path (the judge's) checks too, instead of failing inside the sampler."""
    from altlm.serve import ChatModel

    chat_model = ChatModel.__new__(ChatModel)  # the check comes before any model use
    with pytest.raises(ValueError, match="max_tokens must be at least 1"):
        chat_model.complete_ids([[1, 2]], max_tokens=0)
