"""The gRPC ChatService, served by real gateway processes beside their HTTP API: streams match the stored
replay, a resume on another gateway after a SIGKILL loses nothing, one BiStreamChat call carries several
requests and cancels, and bad requests get gRPC status codes with the HTTP API's messages."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator

import grpc
import httpx
import pytest

from tests.support import Cluster, Gateway, Worker, content_of, read_stream, wait_for
from tokenspool.gateway.proto import tokenspool_chat_pb2 as pb
from tokenspool.gateway.proto import tokenspool_chat_pb2_grpc as pb_grpc
from tokenspool.redis_server import free_port
from tokenspool.shared import keys

Kind = pb.ChatResponse

MODEL = "tokenspool-sim"


class GrpcGateway:
    """A gateway process serving both HTTP (``url``) and gRPC (``target``)."""

    def __init__(self, cluster: Cluster, **settings: object) -> None:
        port = free_port()
        self.gateway: Gateway = cluster.gateway(grpc_port=port, **settings)
        self.url = self.gateway.url
        self.target = f"127.0.0.1:{port}"
        self.channel = grpc.insecure_channel(self.target)
        # The HTTP side answering is not the gRPC port listening: wait for the channel itself.
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.stub = pb_grpc.ChatServiceStub(self.channel)


@pytest.fixture(scope="module")
def grpc_stack(cluster: Cluster) -> Iterator[tuple[GrpcGateway, GrpcGateway, list[Worker]]]:
    workers = [cluster.worker(sim_itl_ms=10, sim_ttft_ms=20), cluster.worker(sim_itl_ms=10, sim_ttft_ms=20)]
    a, b = GrpcGateway(cluster), GrpcGateway(cluster)
    yield a, b, workers
    a.channel.close()
    b.channel.close()


Stack = tuple[GrpcGateway, GrpcGateway, list[Worker]]


def chat(text: str, max_tokens: int, **extra: object) -> pb.ChatRequest:
    return pb.ChatRequest(
        model=MODEL, messages=[pb.ChatMessage(role="user", content=text)], max_tokens=max_tokens, seed=7, **extra
    )


def events_of(responses: list[pb.ChatResponse]) -> list[pb.ChatResponse]:
    return [r for r in responses if r.event_id]


def assert_contiguous(request_id: str, responses: list[pb.ChatResponse]) -> None:
    ids = [r.event_id for r in events_of(responses)]
    assert ids == [keys.event_id(request_id, n) for n in range(1, len(ids) + 1)], "gap or duplicate"


def http_replay_text_and_ids(url: str, request_id: str) -> tuple[str, list[str | None]]:
    replay = read_stream("GET", f"{url}/v1/requests/{request_id}/events")
    return content_of(replay.events), [e.id for e in replay.events if e.id]


def stored_request_count(cluster: Cluster) -> int:
    return sum(1 for _ in cluster.redis.scan_iter(match="ts:*:r:*:meta", count=1000))


def test_stream_chat_content_equals_the_stored_replay(grpc_stack: Stack) -> None:
    a, b, _ = grpc_stack
    call = a.stub.StreamChat(chat("tell me about rivers", 30))
    responses = list(call)
    accepted, *rest = responses
    assert accepted.kind == Kind.ACCEPTED and accepted.request_id and not accepted.event_id
    request_id = accepted.request_id
    assert dict(call.initial_metadata())["x-request-id"] == request_id
    assert all(r.request_id == request_id for r in rest)
    deltas = [r for r in rest if r.kind == Kind.DELTA]
    assert len(deltas) == 30 and all(r.token == r.content for r in deltas)
    end = rest[-1]
    assert end.kind == Kind.END and end.done and end.finish_reason == "length"
    assert end.usage.completion_tokens == 30
    assert end.usage.total_tokens == end.usage.prompt_tokens + 30
    assert [r.done for r in rest].count(True) == 1
    assert_contiguous(request_id, rest)
    text, ids = http_replay_text_and_ids(b.url, request_id)
    assert "".join(r.content for r in deltas) == text
    assert [r.event_id for r in rest] == ids, "gRPC and SSE name the same events"
    again = list(b.stub.StreamChat(pb.ChatRequest(resume=pb.Resume(request_id=request_id))))
    assert [(r.event_id, r.content) for r in again] == [(r.event_id, r.content) for r in rest]


def test_seed_shaped_request_works_without_a_model_name(grpc_stack: Stack) -> None:
    a, _, _ = grpc_stack
    responses = list(a.stub.StreamChat(pb.ChatRequest(prompt="the seed's request", max_tokens=5)))
    tokens = [r.token for r in responses if r.kind == Kind.DELTA]
    assert len(tokens) == 5 and all(tokens)
    assert responses[-1].done and responses[-1].kind == Kind.END


def test_resume_on_another_gateway_after_sigkill_loses_nothing(cluster: Cluster, grpc_stack: Stack) -> None:
    _, b, _ = grpc_stack
    doomed = GrpcGateway(cluster)
    head: list[pb.ChatResponse] = []
    call = doomed.stub.StreamChat(chat("survive the crash", 80))
    try:
        for response in call:
            head.append(response)
            if len(events_of(head)) == 6:
                doomed.gateway.proc.signal(signal.SIGKILL)
                doomed.gateway.proc.process.wait(10)
        raise AssertionError("the stream went on after its gateway was killed")
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
    finally:
        doomed.channel.close()
    request_id = head[0].request_id
    last = events_of(head)[-1]
    assert last.kind == Kind.DELTA and not last.done, "the kill must land mid-stream"
    tail = list(b.stub.StreamChat(pb.ChatRequest(resume=pb.Resume(request_id=request_id, last_event_id=last.event_id))))
    assert tail[0].event_id == keys.event_id(request_id, keys.parse_event_id(last.event_id)[1] + 1)
    whole = events_of(head) + tail
    assert_contiguous(request_id, whole)
    assert whole[-1].kind == Kind.END and whole[-1].usage.completion_tokens == 80
    text, ids = http_replay_text_and_ids(b.url, request_id)
    assert "".join(r.content for r in whole) == text
    assert [r.event_id for r in whole] == ids
    by_event_id_alone = list(b.stub.StreamChat(pb.ChatRequest(resume=pb.Resume(last_event_id=last.event_id))))
    assert [r.event_id for r in by_event_id_alone] == [r.event_id for r in tail]


async def bistream_two_and_cancel(target: str) -> tuple[list[pb.ChatResponse], dict[str, str]]:
    """Two requests on one call; the long one is cancelled once both have streamed; then half-close."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ChatServiceStub(channel)
        call = stub.BiStreamChat()
        await call.write(chat("the short one", 30, tag="short"))
        await call.write(chat("the long one", 2000, ignore_eos=True, tag="long"))
        responses: list[pb.ChatResponse] = []
        ids: dict[str, str] = {}
        cancelled = False
        while True:
            response = await asyncio.wait_for(call.read(), 30)
            assert response is not grpc.aio.EOF, "the call ended before both streams did"
            responses.append(response)
            if response.kind == Kind.ACCEPTED:
                ids[response.tag] = response.request_id
            deltas = {tag: sum(r.tag == tag and r.kind == Kind.DELTA for r in responses) for tag in ids}
            if not cancelled and len(deltas) == 2 and min(deltas.values()) >= 5:
                await call.write(pb.ChatRequest(cancel=pb.CancelRequest(request_id=ids["long"]), tag="long"))
                cancelled = True
            if sum(r.done for r in responses) == 2:
                break
        await call.done_writing()
        assert await asyncio.wait_for(call.read(), 10) is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
        return responses, ids


def test_bistream_interleaves_two_requests_and_cancels_one(grpc_stack: Stack) -> None:
    a, b, _ = grpc_stack
    responses, ids = asyncio.run(bistream_two_and_cancel(a.target))
    tags = [r.tag for r in responses if r.kind == Kind.DELTA]
    first_long, last_short = tags.index("long"), len(tags) - 1 - tags[::-1].index("short")
    assert first_long < last_short, "the two streams did not interleave"
    assert all(r.request_id == ids[r.tag] for r in responses)
    short = [r for r in responses if r.tag == "short"]
    assert_contiguous(ids["short"], short)
    assert short[-1].kind == Kind.END and short[-1].usage.completion_tokens == 30
    long = [r for r in responses if r.tag == "long"]
    assert_contiguous(ids["long"], long)
    ack = next(r for r in long if r.kind == Kind.CANCELLING)
    assert ack.notice in ("cancelling", "cancelled") and not ack.done
    assert long[-1].kind == Kind.ERROR and long[-1].done and long[-1].event_id
    assert long[-1].error.code == "cancelled" and long[-1].error.status == grpc.StatusCode.CANCELLED.value[0]
    assert sum(r.kind == Kind.DELTA for r in long) < 2000
    status = httpx.get(f"{b.url}/v1/requests/{ids['long']}").json()
    assert status["state"] == "cancelled"
    text, _ = http_replay_text_and_ids(b.url, ids["short"])
    assert "".join(r.content for r in short) == text


async def bistream_bad_then_good(target: str) -> list[pb.ChatResponse]:
    async with grpc.aio.insecure_channel(target) as channel:
        call = pb_grpc.ChatServiceStub(channel).BiStreamChat()
        await call.write(chat("too hot", 5, temperature=9.0, tag="bad"))
        await call.write(pb.ChatRequest(resume=pb.Resume(request_id=keys.new_request_id("chat")), tag="unknown"))
        await call.write(pb.ChatRequest(cancel=pb.CancelRequest(request_id="nonsense"), tag="cancel"))
        await call.write(chat("fine", 4, tag="good"))
        await call.done_writing()
        responses = [r async for r in call]
        assert await call.code() == grpc.StatusCode.OK
        return responses


def test_bistream_refuses_a_bad_request_and_goes_on(grpc_stack: Stack) -> None:
    a, _, _ = grpc_stack
    responses = asyncio.run(bistream_bad_then_good(a.target))
    by_tag = {tag: [r for r in responses if r.tag == tag] for tag in ("bad", "unknown", "cancel", "good")}
    for tag, status in (("bad", "INVALID_ARGUMENT"), ("unknown", "NOT_FOUND"), ("cancel", "NOT_FOUND")):
        (refusal,) = by_tag[tag]
        assert refusal.kind == Kind.ERROR and refusal.done and not refusal.event_id
        assert refusal.error.status == grpc.StatusCode[status].value[0], (tag, refusal)
    assert by_tag["bad"][0].error.message == "invalid value for 'temperature': Input should be less than or equal to 2"
    assert by_tag["good"][-1].kind == Kind.END and by_tag["good"][-1].usage.completion_tokens == 4


def refusal_of(stub: pb_grpc.ChatServiceStub, request: pb.ChatRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.StreamChat(request))
    return caught.value


def test_bad_requests_get_invalid_argument_or_not_found_with_the_http_messages(
    cluster: Cluster, grpc_stack: Stack
) -> None:
    a, _, _ = grpc_stack
    http_bodies = {
        "max_tokens": ({"max_tokens": 0}, chat("x", 0)),
        "temperature": ({"temperature": 2.5}, chat("x", 3, temperature=2.5)),
        "role": (
            {"messages": [{"role": "robot", "content": "x"}]},
            pb.ChatRequest(model=MODEL, messages=[pb.ChatMessage(role="robot", content="x")]),
        ),
        "stop": ({"stop": ["a", "b", "c", "d", "e"]}, chat("x", 3, stop=["a", "b", "c", "d", "e"])),
        "model": ({"model": "no-such-model"}, pb.ChatRequest(model="no-such-model", prompt="x")),
    }
    before = stored_request_count(cluster)
    for name, (http_override, request) in http_bodies.items():
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True, **http_override}
        http = httpx.post(a.url + "/v1/chat/completions", json=body).json()["error"]
        error = refusal_of(a.stub, request)
        expected = grpc.StatusCode.NOT_FOUND if name == "model" else grpc.StatusCode.INVALID_ARGUMENT
        assert error.code() == expected, (name, error)
        assert error.details() == http["message"], name
        assert dict(error.trailing_metadata())["tokenspool-error-code"] == str(http["code"]), name  # vLLM's are ints

    done = list(a.stub.StreamChat(chat("finished", 3)))
    request_id = done[0].request_id
    other_events = events_of(list(a.stub.StreamChat(chat("another", 3))))
    cases = {
        "both prompt and messages": (chat("x", 3, prompt="y"), "INVALID_ARGUMENT", "not both"),
        "neither prompt nor messages": (pb.ChatRequest(model=MODEL), "INVALID_ARGUMENT", "'messages'"),
        "malformed event id": (
            pb.ChatRequest(resume=pb.Resume(request_id=request_id, last_event_id="garbage")),
            "INVALID_ARGUMENT",
            "malformed event id 'garbage'",
        ),
        "another request's event": (
            pb.ChatRequest(resume=pb.Resume(request_id=request_id, last_event_id=other_events[1].event_id)),
            "INVALID_ARGUMENT",
            "belongs to another request",
        ),
        "an event it never had": (
            pb.ChatRequest(resume=pb.Resume(last_event_id=keys.event_id(request_id, 99))),
            "INVALID_ARGUMENT",
            "never had event",
        ),
        "unknown request": (
            pb.ChatRequest(resume=pb.Resume(request_id=keys.new_request_id("chat"))),
            "NOT_FOUND",
            "no request",
        ),
        "resume with a prompt": (
            pb.ChatRequest(prompt="x", resume=pb.Resume(request_id=request_id)),
            "INVALID_ARGUMENT",
            "a resume takes only request_id and last_event_id",
        ),
        "cancel on StreamChat": (
            pb.ChatRequest(cancel=pb.CancelRequest(request_id=request_id)),
            "INVALID_ARGUMENT",
            "call Cancel",
        ),
    }
    for name, (request, status, words) in cases.items():
        error = refusal_of(a.stub, request)
        assert error.code() == grpc.StatusCode[status], (name, error)
        assert words in (error.details() or ""), (name, error.details())
    assert stored_request_count(cluster) == before + 2, "a refused request left something in Redis"


def test_cancel_stops_a_running_request_and_says_why_it_cannot(grpc_stack: Stack) -> None:
    a, b, _ = grpc_stack
    call = a.stub.StreamChat(chat("cancel me", 2000, ignore_eos=True))
    responses = iter(call)
    request_id = next(responses).request_id
    assert next(responses).kind == Kind.DELTA
    answer = b.stub.Cancel(pb.CancelRequest(request_id=request_id))
    assert answer.request_id == request_id and answer.state in ("cancelling", "cancelled")
    rest = list(responses)
    assert rest[-1].kind == Kind.ERROR and rest[-1].error.code == "cancelled" and rest[-1].done
    assert call.code() == grpc.StatusCode.OK, "a cancelled request is not a failed call"
    assert httpx.get(f"{b.url}/v1/requests/{request_id}").json()["state"] == "cancelled"
    refusals = {
        request_id: (grpc.StatusCode.FAILED_PRECONDITION, f"request {request_id} already ended (cancelled)"),
        keys.new_request_id("chat"): (grpc.StatusCode.NOT_FOUND, "no request"),
        "not-an-id": (grpc.StatusCode.NOT_FOUND, "no request 'not-an-id'"),
        "": (grpc.StatusCode.INVALID_ARGUMENT, "missing required parameter 'request_id'"),
    }
    for target_id, (status, words) in refusals.items():
        with pytest.raises(grpc.RpcError) as caught:
            a.stub.Cancel(pb.CancelRequest(request_id=target_id))
        assert caught.value.code() == status, (target_id, caught.value)
        assert words in (caught.value.details() or ""), caught.value.details()


async def start_then_cancel_bistream(target: str) -> str:
    async with grpc.aio.insecure_channel(target) as channel:
        call = pb_grpc.ChatServiceStub(channel).BiStreamChat()
        await call.write(chat("nobody will read me", 2000, ignore_eos=True))
        accepted = await call.read()
        assert accepted.kind == Kind.ACCEPTED and (await call.read()).kind == Kind.DELTA
        call.cancel()
        return str(accepted.request_id)


def start_then_cancel_stream_chat(gateway: GrpcGateway) -> str:
    call = gateway.stub.StreamChat(chat("nobody will read me", 2000, ignore_eos=True))
    responses = iter(call)
    request_id = str(next(responses).request_id)
    assert next(responses).kind == Kind.DELTA
    call.cancel()
    return request_id


@pytest.mark.parametrize("rpc", ["StreamChat", "BiStreamChat"])
def test_a_cancelled_call_detaches_so_its_request_stops_after_the_grace(
    cluster: Cluster, grpc_stack: Stack, rpc: str
) -> None:
    """Dropping the call is a disconnect, as over SSE: after disconnect_grace_s with nobody attached, the
    request is cancelled and its slot freed."""
    gateway = GrpcGateway(cluster, disconnect_grace_s=0.5)
    try:
        if rpc == "StreamChat":
            request_id = start_then_cancel_stream_chat(gateway)
        else:
            request_id = asyncio.run(start_then_cancel_bistream(gateway.target))
        wait_for(lambda: cluster.meta(request_id)["state"] == "cancelled", 10, "the abandoned request to be cancelled")
        wait_for(
            lambda: f"{request_id}: gRPC stream closed (disconnected)" in gateway.gateway.proc.log(),
            5,
            "the gateway to close the stream as a disconnect",
        )
    finally:
        gateway.channel.close()


def test_a_stopping_gateway_ends_its_calls_and_the_client_resumes_elsewhere(
    cluster: Cluster, grpc_stack: Stack
) -> None:
    _, b, _ = grpc_stack
    stopping = GrpcGateway(cluster)
    head: list[pb.ChatResponse] = []
    try:
        call = stopping.stub.StreamChat(chat("outlive the gateway", 400, ignore_eos=True))
        with pytest.raises(grpc.RpcError) as caught:
            for response in call:
                head.append(response)
                if len(head) == 4:
                    stopping.gateway.proc.signal(signal.SIGTERM)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
        stopping.gateway.proc.process.wait(15)  # uvicorn re-raises the SIGTERM once it has shut down
        assert "Application shutdown complete" in stopping.gateway.proc.log()
    finally:
        stopping.channel.close()
    request_id, last = head[0].request_id, events_of(head)[-1]
    assert not last.done, "the stop must land mid-stream"
    tail = list(b.stub.StreamChat(pb.ChatRequest(resume=pb.Resume(last_event_id=last.event_id))))
    whole = events_of(head) + tail
    assert_contiguous(request_id, whole)
    assert whole[-1].kind == Kind.END and whole[-1].usage.completion_tokens == 400


def test_delta_responses_carry_choice_reasoning_and_tool_calls() -> None:
    from tests.samples import meta
    from tokenspool.gateway.transports.grpc import ChatService
    from tokenspool.shared import wire

    calls = '[{"index":0,"function":{"arguments":"{\\"ci"}}]'
    event = wire.Event("delta", "", (9,), index=1, reasoning="hm", tool_calls=calls)
    response = ChatService._event(meta(), 4, event, "t", 0.0)
    assert (response.index, response.reasoning, response.tool_calls) == (1, "hm", calls)
    plain = ChatService._event(meta(), 5, wire.Event("delta", "word", (3,)), "t", 0.0)
    assert not (plain.index or plain.reasoning or plain.tool_calls)
