"""Structured outputs: constrain a request's tokens to a JSON schema, regex, choice or
grammar (`SamplingParams.structured_outputs`).

Rule: a grammar library does the language work behind a small interface
(`backend.StructuredOutputBackend` -> `backend.Grammar`); the engine core compiles each
request's grammar off the step loop and keeps its matcher, the scheduler advances it with
the tokens it accepts, and the step's token bitmask (one row per request that samples) goes
to the workers with the scheduler output, where `apply_token_bitmask` masks the logits.
"""
