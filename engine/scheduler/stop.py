"""Stop checks run after each sampled token (token-id based; stop strings live client-side).

Rule: the order is fixed: stop token ids, then EOS (neither before `min_tokens` outputs; EOS
not at all with `ignore_eos`), then `max_tokens`, then `max_model_len`. The first that fires
sets the request's finished status and, for a stop token id, its `stop_reason`.
"""

from __future__ import annotations

from engine.scheduler.request import Request, RequestStatus


def check_stop(request: Request, max_model_len: int) -> bool:
    """Whether the request's newest token ends it; sets `status`/`stop_reason` if so."""
    params = request.sampling_params
    token_id = request.output_token_ids[-1]
    if request.num_output_tokens >= params.min_tokens:
        if params.stop_token_ids and token_id in params.stop_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = token_id
            return True
        if not params.ignore_eos and token_id == request.eos_token_id:
            request.status = RequestStatus.FINISHED_STOPPED
            return True
    if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
        request.status = RequestStatus.FINISHED_LENGTH
        return True
    # Its KV could not be stored: the next position would be past the model's limit.
    if request.num_tokens >= max_model_len:
        request.status = RequestStatus.FINISHED_LENGTH
        return True
    return False
