"""The names of the appliance's own HTTP headers: shared vocabulary of the ring's protocol
(``appliance.ring.protocol``) and of what its signatures cover (``appliance.security.signing``)."""

from __future__ import annotations

MODEL = "X-Appliance-Model"
DIGEST = "X-Appliance-Digest"
SPAN = "X-Appliance-Span"  # "first-last" segments the receiver must run
REQUEST_ID = "X-Request-Id"
DEADLINE = "X-Appliance-Deadline"  # +seconds left (protocol 3); epoch seconds from older peers
ROUTE = "X-Appliance-Route"
SEQUENCE_ID = "X-Appliance-Sequence-Id"  # generation: the sequence whose KV a step extends
POSITION = "X-Appliance-Position"  # generation: where a step's tokens start in the sequence
# what an internal call's answer says it cost the callee once the body was in (seconds):
# all of it (its compute and its own calls further down the ring), and its own compute alone
SERVER_TIME = "X-Appliance-Server-Time"
COMPUTE_TIME = "X-Appliance-Compute-Time"
# what a signature covers besides method, path and body: everything that routes a hop or step
SIGNED_HEADERS = (MODEL, DIGEST, SPAN, DEADLINE, ROUTE, REQUEST_ID, SEQUENCE_ID, POSITION)
