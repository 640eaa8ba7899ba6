"""IKEv2 responder (and initiator) core for issue 6: no I/O, bytes in and bytes out.

Layout, one concern per module:

- ``constants``  IANA numbers (exchange, payload, transform, notify, ID types).
- ``crypto``     PRF/prf+, SKEYSEED and SK_* derivation, Child KEYMAT, DH groups 20/14/5
                 (MODP with pow() on the RFC 3526 primes), SK payload ciphers (GCM, CBC+HMAC).
- ``payloads``   payload classes with parse/serialize; unknown payloads stay representable;
                 errors are ``IkeProtocolError(notify)``.
- ``message``    IKE header, SK protection, RFC 7383 fragments (SKF) and reassembly.
- ``proposal``   ``select()``: the algorithm policy of the issue, one function.
- ``tunnels``    ``IkeTunnel``, ``TunnelDirectory`` (IDi -> tunnel by ID type), ``from_config``.
- ``state``      ``IkeSa``/``ChildSa`` state, PSK AUTH (RFC 7296 2.15), NAT-D hashes.
- ``tasks``      one class per exchange (IKE_SA_INIT, IKE_AUTH, CREATE_CHILD_SA for Child SAs
                 and IKE rekey, INFORMATIONAL), both roles: build_i/process_i, process_r/build_r.
- ``engine``     ``IkeEngine``: ``handle(datagram, local, remote, now) -> [Datagram]`` and
                 ``tick(now) -> [Datagram]``; message IDs, cached responses, cookies, timers.
- ``server``     asyncio UDP on 500/4500 (non-ESP marker), the only module doing I/O.
- ``export``     ``sa list`` rows (no keys) and Wireshark key tables (explicit request only).

Established Child SAs leave through ``pipeline.sa.SaInstaller`` (``ChildSaParams``).
"""
