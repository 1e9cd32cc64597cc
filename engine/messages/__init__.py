"""The messages the engine's parts exchange: a leaf that imports nothing of the engine but
`engine.sampling_params` (itself a leaf).

Rule: a type two layers share lives here, so neither imports the other to name it. `core`:
between an engine-core client and the engine core (the same msgspec structs in-process and
over ZMQ). `step`: between the scheduler and the workers (one step's decisions and results;
torch-free).
"""
