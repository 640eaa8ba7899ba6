"""Fuzz smoke test of the IKE core (the long run: ``make fuzz-ike``, IKE_FUZZ_EXAMPLES=100000)."""
from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ike_fuzz import InnerTarget, check_parse, inner_plaintext, mutated
from ike_peers import CUSTOMER, EDGE, Pair

from pipeline.ike.constants import ExchangeType

EXAMPLES = int(os.environ.get("IKE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))

_responder = Pair()


@FUZZ
@given(mutated())
def test_fuzz_mutated_datagrams(data):
    check_parse(data)
    _responder.resp.handle(data, (EDGE, 4500), (CUSTOMER, 4500), 0.0)
    assert _responder.resp.stats["internal_error"] == 0


_target = InnerTarget()


@settings(FUZZ, max_examples=max(50, EXAMPLES // 4))
@given(inner_plaintext())
def test_fuzz_ike_auth_inner_payloads(inner):
    _target.auth(*inner)


@FUZZ
@given(st.sampled_from([ExchangeType.INFORMATIONAL, ExchangeType.CREATE_CHILD_SA]), inner_plaintext())
def test_fuzz_established_inner_payloads(exchange, inner):
    _target.established(exchange, *inner)
