"""Continuous batching on one device: requests, the scheduler, one step of the model, sampling and
text. Everything here runs on the engine thread, except `engine_loop`, which hands work to it, and
`request_limits`, which the gRPC process also checks requests with."""
