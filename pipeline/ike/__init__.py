"""IKEv2 responder (and initiator) core: no I/O, bytes in and bytes out (issue 6)."""
