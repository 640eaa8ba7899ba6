"""SA database: parameter checks, secrets, lifetimes, sequence exhaustion, rekey/delete, 100,000 SAs,
SA changes while another thread processes packets, and IV uniqueness across two nodes."""
from __future__ import annotations

import random
import threading

import numpy as np
import pytest
from esp_support import SUITES, ipv4, outer_ipv4, ref_encrypt, run, suite_sas

from pipeline import esp

KEY = bytes(range(0xA0, 0xB0))


def gcm(**kw) -> esp.EspSaParams:
    base = {"spi": 0x100, "direction": "in", "encryption": "aes-gcm-16", "enc_key": KEY,
            "salt": b"\xde\xad\xbe\xef"}
    base.update(kw)
    return esp.EspSaParams(**base)


@pytest.mark.parametrize(("params", "message"), [
    (gcm(esn=True), "extended sequence numbers"),
    (gcm(encryption="null", enc_key=b"", salt=b"", integrity="hmac-sha1-96", auth_key=KEY),
     None),  # NULL without the opt-in: refused by C, see below
    (gcm(enc_key=KEY[:10]), "16- or 32-byte key"),
    (gcm(salt=b"\0"), "4-byte salt"),
    (gcm(integrity="hmac-sha1-96", auth_key=KEY), "unsupported algorithm combination"),
    (gcm(encryption="aes-ctr"), "unsupported encryption"),
    (gcm(spi=0), "SPI 0 is reserved"),
    (gcm(replay_window=70000), "replay window"),
    (gcm(direction="out", local="10.0.0.1", remote="10.0.0.2", mode="transport"), "transport"),
    (gcm(direction="out"), "local and remote"),
    (gcm(direction="out", local="10.0.0.1", remote="2001:db8::1"), "IPv4"),
    (gcm(direction="sideways"), "direction"),
    (gcm(encap_sport=4500), "both encap_sport and encap_dport"),
])
def test_bad_sa_is_refused_with_a_clear_error(params, message):
    with esp.EspContext() as ctx, pytest.raises(esp.EspError) as err:
        ctx.add_sa(params)
    text = str(err.value)
    assert message is None or message in text
    assert KEY.hex() not in text and repr(KEY) not in text


def test_null_and_no_integrity_need_the_opt_in():
    null = gcm(encryption="null", enc_key=b"", salt=b"", integrity="hmac-sha2-256-128",
               auth_key=KEY)
    cbc_noauth = gcm(encryption="aes-cbc", salt=b"", integrity="none")
    with esp.EspContext() as ctx:
        for p in (null, cbc_noauth):
            with pytest.raises(esp.EspError, match="explicit allow_null opt-in") as err:
                ctx.add_sa(p)
            assert err.value.code == esp.lib.XT_ESP_E_NULL_NOT_ALLOWED
        ctx.add_sa(esp.EspSaParams(**{**null.__dict__, "allow_null": True}))
        with pytest.raises(esp.EspError, match="unsupported algorithm combination"):
            ctx.add_sa(esp.EspSaParams(**{**null.__dict__, "allow_null": True,
                                          "integrity": "none", "auth_key": b""}))


def test_repr_and_str_hold_no_key_material():
    p = gcm(integrity="none")
    text = repr(p) + str(p)
    assert "enc_key" not in text and "salt" not in text and "auth_key" not in text
    assert KEY.hex() not in text and "\\xa0" not in text and "deadbeef" not in text


def test_lifetimes_soft_then_hard_in_packets():
    out_sa, in_sa, ref = suite_sas(SUITES[0], soft_packets=3, hard_packets=5)
    with esp.EspContext() as ctx, ctx.worker() as w:
        ctx.add_sa(out_sa)
        ctx.add_sa(in_sa)
        enc = run(w, [ipv4(b"x")] * 7, "encrypt", tunnel=5)
        assert [v for v, _ in enc] == ["ok"] * 5 + ["lifetime_expired"] * 2
        s = ctx.sa_stats("out", 5)
        assert s.lifetime == {"soft_packets", "hard_packets"} and s.expired and s.needs_rekey
        assert (s.packets, s.drops["lifetime_expired"], s.lifetime_packets) == (5, 2, 5)
        dec = run(w, [p for _, p in enc[:5]][:2])
        assert [v for v, _ in dec] == ["ok", "ok"]
        assert ctx.sa_stats("in", 0x1000).lifetime == frozenset()
        dec = run(w, [p for _, p in enc[:5]][2:])
        assert [v for v, _ in dec] == ["ok", "ok", "ok"]
        dec = run(w, [outer_ipv4(ref_encrypt(ref, ipv4(b"x"), 9, bytes(8)))])
        assert dec == [("lifetime_expired", None)]
        s = ctx.sa_stats("in", 0x1000)
        assert s.lifetime == {"soft_packets", "hard_packets"} and s.drops["lifetime_expired"] == 1


def test_lifetimes_in_bytes():
    out_sa, _, _ = suite_sas(SUITES[0], soft_bytes=100, hard_bytes=250)
    with esp.EspContext() as ctx, ctx.worker() as w:
        ctx.add_sa(out_sa)
        verdicts = [v for v, _ in run(w, [ipv4(bytes(80))] * 4, "encrypt", tunnel=5)]
        # 100 bytes each: soft at the 1st, the 3rd reaches 300 >= 250, the 4th is refused
        assert verdicts == ["ok", "ok", "ok", "lifetime_expired"]
        s = ctx.sa_stats("out", 5)
        assert s.lifetime == {"soft_bytes", "hard_bytes"} and s.lifetime_bytes == 300


def test_outbound_sequence_never_wraps():
    out_sa, _, _ = suite_sas(SUITES[0])
    with esp.EspContext() as ctx, ctx.worker() as w:
        ctx.add_sa(out_sa)
        ctx.test_set_next(5, 2**32 - 2, 0)
        res = run(w, [ipv4(b"x")] * 4, "encrypt", tunnel=5)
        assert [v for v, _ in res] == ["ok", "ok", "seq_exhausted", "seq_exhausted"]
        assert [int.from_bytes(p[24:28], "big") for _, p in res[:2]] == [2**32 - 2, 2**32 - 1]
        s = ctx.sa_stats("out", 5)
        assert s.seq == 2**32 - 1 and "seq_exhausted" in s.lifetime and s.needs_rekey
        assert s.drops["seq_exhausted"] == 2 and s.packets == 2


def test_iv_counter_exhaustion_refuses_to_send():
    out_sa, _, _ = suite_sas(SUITES[0])
    with esp.EspContext() as ctx, ctx.worker() as w:
        ctx.add_sa(out_sa)
        ctx.test_set_next(5, 1, 2**48 - 1)
        assert [v for v, _ in run(w, [ipv4(b"x")] * 2, "encrypt", tunnel=5)] == \
            ["ok", "seq_exhausted"]


def test_rekey_in_place_and_delete():
    suite = SUITES[0]
    _, in_old, ref_old = suite_sas(suite, seed=1)
    _, in_new, ref_new = suite_sas(suite, seed=2)
    old_pkt = outer_ipv4(ref_encrypt(ref_old, ipv4(b"old"), 1, bytes(8)))
    new_pkt = outer_ipv4(ref_encrypt(ref_new, ipv4(b"new"), 2, bytes(8)))
    with esp.EspContext() as ctx, ctx.worker() as w:
        ctx.add_sa(in_old)
        assert [v for v, _ in run(w, [old_pkt, new_pkt])] == ["ok", "icv_mismatch"]
        ctx.add_sa(in_new)  # same SPI: replaced, fresh counters and window
        assert [v for v, _ in run(w, [old_pkt, new_pkt])] == ["icv_mismatch", "ok"]
        assert ctx.stats()["sa_in"] == 1 and ctx.reclaim() == 0 and ctx.stats()["retired"] == 0
        ctx.del_sa("in", 0x1000)
        assert [v for v, _ in run(w, [new_pkt])] == ["unknown_spi"]
        with pytest.raises(esp.EspError, match="no such SA"):
            ctx.del_sa("in", 0x1000)
        with pytest.raises(esp.EspError, match="no such SA"):
            ctx.sa_stats("in", 0x1000)
        assert ctx.stats()["sa_in"] == 0


def test_workers_are_limited_and_reusable():
    with esp.EspContext(max_workers=2) as ctx:
        a, b = ctx.worker(), ctx.worker()
        with pytest.raises(esp.EspError, match="no free worker slot"):
            ctx.worker()
        batch = esp.PacketBatch(1)
        batch.set(0, ipv4(b"x", proto=6))
        # the handle is what the AF_XDP loop passes to the C batch functions directly
        assert esp.lib.xt_esp_decrypt_batch(a.handle, batch.pkts, 1) == 0
        assert batch.verdict(0) == "not_esp" and ctx.stats()["drops"]["not_esp"] == 1
        a.close()
        with pytest.raises(esp.EspError, match="worker is closed"):
            a.decrypt(batch)
        ctx.worker().close()
        b.close()


def test_100k_inbound_sas_constant_lookup():
    rnd = random.Random(7)
    spis = rnd.sample(range(256, 2**32), 100_000)
    ref = suite_sas(SUITES[0])[2]
    with esp.EspContext() as ctx, ctx.worker() as w:
        for i, spi in enumerate(spis):
            ctx.add_sa(esp.EspSaParams(spi=spi, direction="in", encryption="aes-gcm-16",
                                       enc_key=ref.enc_key, salt=ref.salt, tunnel_id=i,
                                       replay_window=0))
        st = ctx.stats()
        assert st["sa_in"] == 100_000
        # 2^17 buckets: chains stay short whatever the SPIs, so a lookup is O(1)
        assert st["max_chain"] <= 10
        picks = rnd.sample(range(100_000), 500)
        pkts = []
        for i in picks:
            ref.spi = spis[i]
            pkts.append(outer_ipv4(ref_encrypt(ref, ipv4(i.to_bytes(4, "big")), 1, bytes(8))))
        b = esp.PacketBatch(len(pkts), frame_size=256, headroom=0)
        b.fill(pkts)
        assert w.decrypt(b) == len(pkts)
        assert [b.tunnel(k) for k in range(len(pkts))] == picks
        assert [b.spi(k) for k in range(len(pkts))] == [spis[i] for i in picks]
        for spi in spis[:50_000]:
            ctx.del_sa("in", spi)
        assert ctx.stats()["sa_in"] == 50_000 and ctx.stats()["retired"] == 0


def test_sa_changes_while_another_thread_decrypts():
    """The batch calls release the GIL: one thread decrypts continuously while this one replaces
    and deletes the SAs it uses. Every packet gets a verdict, none crashes (make sanitize runs
    this under ASan), and once the worker is idle everything retired is freed."""
    suite = SUITES[0]
    n_sa = 32
    sas, pkts = [], []
    for k in range(n_sa):
        _, in_sa, ref = suite_sas(suite, spi=0x5000 + k, replay_window=0, seed=3)
        sas.append(in_sa)
        pkts.append(outer_ipv4(ref_encrypt(ref, ipv4(b"concurrent"), 1, bytes(8))))
    with esp.EspContext(max_workers=2) as ctx:
        for sa in sas:
            ctx.add_sa(sa)
        stop = threading.Event()
        seen: dict[str, int] = {}
        batches = [0]
        errors: list[BaseException] = []

        def worker_loop():
            try:
                with ctx.worker() as w:
                    b = esp.PacketBatch(n_sa * 8, frame_size=256, headroom=0)
                    while not stop.is_set():
                        b.fill(pkts * 8)
                        w.decrypt(b)
                        batches[0] += 1
                        for v in b.verdicts():
                            seen[v] = seen.get(v, 0) + 1
            except BaseException as e:  # noqa: BLE001 - reported to the main thread
                errors.append(e)

        t = threading.Thread(target=worker_loop)
        t.start()
        rnd = random.Random(5)
        ops = 0
        while (ops < 3000 or batches[0] < 50) and not errors and ops < 1_000_000:
            ops += 1
            sa = rnd.choice(sas)
            if rnd.random() < 0.5:
                ctx.add_sa(sa)  # replace (rekey with the same keys) or re-add
            else:
                try:
                    ctx.del_sa("in", sa.spi)
                except esp.EspError:
                    pass
        stop.set()
        t.join(timeout=30)
        assert not t.is_alive() and not errors
        assert set(seen) <= {"ok", "unknown_spi"} and seen.get("ok", 0) > 0
        ctx.reclaim()
        assert ctx.stats()["retired"] == 0


def _ivs_of_node(node_id: int, n: int, key: bytes, salt: bytes) -> np.ndarray:
    frame, head, batch_n = 128, 64, 1024
    sa = esp.EspSaParams(spi=0x777, direction="out", encryption="aes-gcm-16", enc_key=key,
                         salt=salt, tunnel_id=1, local="203.0.113.1", remote="203.0.113.2",
                         node_id=node_id)
    out = np.empty(n, dtype=np.uint64)
    with esp.EspContext() as ctx, ctx.worker() as w:
        ctx.add_sa(sa)
        b = esp.PacketBatch(batch_n, frame_size=frame, headroom=head)
        b.fill([ipv4(b"")] * batch_n, tunnel=1)
        pristine_buf = bytes(b.buffer)
        pristine_pkts = esp.ffi.new("struct xt_pkt[]", batch_n)
        esp.ffi.memmove(pristine_pkts, b.pkts, esp.ffi.sizeof(pristine_pkts))
        view = np.frombuffer(b.buffer, dtype=np.uint8).reshape(batch_n, frame)
        done = 0
        while done < n:
            k = min(batch_n, n - done)
            b.count = k
            b.buffer[:] = pristine_buf
            esp.ffi.memmove(b.pkts, pristine_pkts, esp.ffi.sizeof(pristine_pkts))
            assert w.encrypt(b) == k
            # outer header at head - 36; IV at outer + 28 = head - 8
            out[done:done + k] = view[:k, head - 8:head].copy().view(">u8").ravel()
            done += k
        assert ctx.sa_stats("out", 1).seq == n
    return out


def test_two_nodes_sharing_an_sa_never_repeat_an_iv():
    n = 1_000_000
    key, salt = bytes(range(16)), b"salt"
    a = _ivs_of_node(1, n, key, salt)
    b = _ivs_of_node(2, n, key, salt)
    both = np.concatenate([a, b])
    assert len(np.unique(both)) == 2 * n
    assert np.all(a >> np.uint64(48) == 1) and np.all(b >> np.uint64(48) == 2)
    # per node the counter runs 0, 1, 2, ...: independent of the sequence number's role
    assert np.array_equal(a & np.uint64(2**48 - 1), np.arange(n, dtype=np.uint64))


def test_c_api_refuses_esn_itself():
    """Callers from C (the AF_XDP worker) get the same refusal as the Python wrapper gives."""
    p = esp.ffi.new("struct xt_esp_sa_params *")
    p.spi, p.direction, p.enc_alg, p.enc_key_len = 0x42, esp.lib.XT_ESP_DIR_IN, \
        esp.lib.XT_ESP_ENC_AES_GCM_16, 16
    p.flags = esp.lib.XT_ESP_F_ESN
    with esp.EspContext() as ctx:
        assert esp.lib.xt_esp_sa_add(ctx._ptr(), p) == esp.lib.XT_ESP_E_ESN
        msg = esp.ffi.string(esp.lib.xt_esp_strerror(esp.lib.XT_ESP_E_ESN)).decode()
        assert msg == "extended sequence numbers (ESN) are not supported"
        p.flags = 0
        assert esp.lib.xt_esp_sa_add(ctx._ptr(), p) == 0
