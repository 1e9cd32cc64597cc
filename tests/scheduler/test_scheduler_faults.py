"""Fault isolation in the scheduler: a request the worker reports as failed, or whose update
raises, ends alone with FinishReason.ERROR; its blocks come back and the others go on."""

from dataclasses import replace

from scheduler_fakes import FakeRunner, make_request, make_scheduler, run_to_completion

from engine.messages.core import FinishReason
from engine.scheduler import scheduler as scheduler_module


class _FailOne(FakeRunner):
    """The real fake runner, reporting request "bad" as unservable on its first step."""

    def execute(self, out):
        result = super().execute(out)
        if any(r.req_id == "bad" for r in out.scheduled_new_reqs):
            result = replace(result, failed={"bad": "token id 7 is outside the vocabulary"})
        return result


def test_a_worker_reported_failure_finishes_that_request_only():
    scheduler = make_scheduler()
    for req_id in ("a", "bad", "b"):
        scheduler.add_request(make_request(req_id, [1, 2, 3, 4, 5], max_tokens=6))
    result = run_to_completion(scheduler, _FailOne(64, 4))
    assert result.finished["bad"].finish_reason == FinishReason.ERROR
    assert "outside the vocabulary" in result.finished["bad"].error
    assert result.tokens.get("bad", []) == []
    for req_id in ("a", "b"):
        assert result.finished[req_id].finish_reason == FinishReason.LENGTH
        assert len(result.tokens[req_id]) == 6
    assert scheduler.kv_cache.num_free_blocks == 64 and not scheduler.requests
    # The worker is told to forget it like any finished request.
    assert any("bad" in step.finished_req_ids for step in result.steps)


def test_an_exception_in_one_request_update_fails_it_and_not_the_batch(monkeypatch):
    real = scheduler_module.check_stop

    def flaky(request, max_model_len):
        if request.request_id == "bad" and request.num_output_tokens == 3:
            raise RuntimeError("stop check exploded")
        return real(request, max_model_len)

    monkeypatch.setattr(scheduler_module, "check_stop", flaky)
    scheduler = make_scheduler()
    for req_id in ("a", "bad", "b"):
        scheduler.add_request(make_request(req_id, [1, 2, 3], max_tokens=5))
    result = run_to_completion(scheduler, FakeRunner(64, 4))
    assert result.finished["bad"].finish_reason == FinishReason.ERROR
    assert result.finished["bad"].error == "RuntimeError: stop check exploded"
    assert len(result.tokens["bad"]) == 2  # the tokens sent before the failing update
    assert [len(result.tokens[r]) for r in ("a", "b")] == [5, 5]
    assert scheduler.kv_cache.num_free_blocks == 64 and not scheduler.requests


def test_a_failure_after_the_blocks_were_freed_still_reaches_the_client(monkeypatch):
    real = scheduler_module.Scheduler._update_request

    def raising_after_release(self, request, *args):
        output = real(self, request, *args)
        if request.request_id == "bad" and request.is_finished:
            raise RuntimeError("reporting exploded")
        return output

    monkeypatch.setattr(scheduler_module.Scheduler, "_update_request", raising_after_release)
    scheduler = make_scheduler()
    for req_id in ("a", "bad"):
        scheduler.add_request(make_request(req_id, [1, 2, 3], max_tokens=3))
    result = run_to_completion(scheduler, FakeRunner(64, 4))
    assert result.finished["bad"].finish_reason == FinishReason.ERROR
    assert result.finished["bad"].error == "RuntimeError: reporting exploded"
    assert result.finished["a"].finish_reason == FinishReason.LENGTH
    assert scheduler.kv_cache.num_free_blocks == 64 and not scheduler.requests
