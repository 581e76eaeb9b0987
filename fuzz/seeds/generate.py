#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets into fuzz/seeds/<target>/ (committed; run this
again only when a layout changes). Built from the documented layouts, independently of the Rust
encoder, so a seed that stops decoding points at a real change:

- NVMe/TCP PDUs (transport spec 1.0; nvme/src/tcp/pdu.rs): 8-byte common header (type, flags,
  HLEN, PDO, PLEN le32), type-specific header, optional CRC32C header digest (HDGSTF 0x01),
  data at PDO, optional CRC32C data digest (DDGSTF 0x02).
- command_fields: 64-byte command followed by the data (Connect data, identify structures,
  discovery log, completion) as fuzz_targets/command_fields.rs reads it.
- config_parse: small YAML files beside examples/*.yaml (which scripts/fuzz also feeds it).
- fabric_frame: streams of the fabric's frames (rdma/src/wire/frame.rs): 8-byte common header
  (type, flags, 0 u16, body_len le32), WRITE + key le32, imm le32, offset le64; ACK + count le32, 0.
- fabric_setup: handshake conversations (rdma/src/wire/setup.rs): len le16, type, body.
- log_damage: a seed (u16) and up to 8 rots (at u32 as a fraction of the log, len u16, xor u8)
  for policy/src/sim/damage.rs.
- replica_frame: what a source writes into a replica's ring (policy/src/replica/wire.rs): a
  64-byte record header ("STRR", version 1, count le16, volume le32, len le32, epoch, pos,
  record, first_seq le64, crc32c over bytes 0..60 and the entry headers) and 64-byte entry
  headers (policy/src/log/entry.rs); acknowledgement ("STRA") and publication ("STRP") blocks;
  and the JSON control messages of a link's set-up (target/src/volume/replication.rs).

Usage: python3 fuzz/seeds/generate.py   (from anywhere; writes next to this file)
"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

# ---- CRC32C (Castagnoli, reflected polynomial 0x82F63B78), as the crc32c crate computes it.
_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


assert crc32c(b"123456789") == 0xE3069283  # the standard check value

# ---- PDUs
IC_REQ, IC_RESP, H2C_TERM, C2H_TERM, CAPSULE_CMD, CAPSULE_RESP, H2C_DATA, C2H_DATA, R2T = (
    0, 1, 2, 3, 4, 5, 6, 7, 9)
HDGSTF, DDGSTF, LAST_PDU, SUCCESS = 1, 2, 4, 8
DIGESTIBLE = {CAPSULE_CMD, CAPSULE_RESP, H2C_DATA, C2H_DATA, R2T}


def pdu(t, specific: bytes, hlen, data=b"", hdgst=False, ddgst=False, flags=0, pad=0):
    """One PDU: `specific` fills the header after the common 8 bytes up to HLEN; `pad` extra
    bytes between the header (and its digest) and PDO."""
    assert len(specific) <= hlen - 8
    digestible = t in DIGESTIBLE
    hd = hdgst and digestible
    dd = ddgst and digestible and len(data) > 0
    header_end = hlen + (4 if hd else 0)
    is_term = t in (H2C_TERM, C2H_TERM)
    pdo = 0 if (not data or is_term) else header_end + pad
    plen = (pdo if pdo else header_end) + len(data) + (4 if dd else 0)
    if pdo == 0 and data:  # TermReq: data right after the header
        plen = hlen + len(data)
    f = flags | (HDGSTF if hd else 0) | (DDGSTF if dd else 0)
    h = struct.pack("<BBBBI", t, f, hlen, pdo, plen) + specific
    h += bytes(hlen - len(h))
    out = h
    if hd:
        out += struct.pack("<I", crc32c(h))
    if pdo:
        out += bytes(pdo - len(out))
    out += data
    if dd:
        out += struct.pack("<I", crc32c(data))
    assert len(out) == plen, (t, len(out), plen)
    return out


def icreq(hdgst=False, ddgst=False, maxr2t=0, hpda=0):
    dgst = (1 if hdgst else 0) | (2 if ddgst else 0)
    return pdu(IC_REQ, struct.pack("<HBBI", 0, hpda, dgst, maxr2t), 128)


def icresp(hdgst=False, ddgst=False, maxh2c=128 << 10):
    dgst = (1 if hdgst else 0) | (2 if ddgst else 0)
    return pdu(IC_RESP, struct.pack("<HBBI", 0, 0, dgst, maxh2c), 128)


def command(opc, cid, nsid=0, sgl_id=0, sgl_addr=0, sgl_len=0, cdw10_15=(0, 0, 0, 0, 0, 0), fctype=None):
    c = bytearray(64)
    c[0] = opc
    c[1] = 0x40  # PSDT: SGLs
    struct.pack_into("<H", c, 2, cid)
    struct.pack_into("<I", c, 4, nsid)
    if fctype is not None:
        c[4] = fctype
    struct.pack_into("<QI", c, 24, sgl_addr, sgl_len)
    c[39] = sgl_id
    struct.pack_into("<6I", c, 40, *cdw10_15)
    return bytes(c)


def capsule_cmd(cmd: bytes, data=b"", **kw):
    return pdu(CAPSULE_CMD, cmd, 72, data, **kw)


def capsule_resp(cid, status_field=0, dw0=0, sqhd=1, **kw):
    return pdu(CAPSULE_RESP, struct.pack("<IIHHHH", dw0, 0, sqhd, 0, cid, status_field), 24, **kw)


def data_pdu(t, cccid, ttag, offset, data, last=True, success=False, **kw):
    flags = (LAST_PDU if last else 0) | (SUCCESS if success else 0)
    return pdu(t, struct.pack("<HHII", cccid, ttag, offset, len(data)), 24, data, flags=flags, **kw)


def r2t(cccid, ttag, offset, length, **kw):
    return pdu(R2T, struct.pack("<HHII", cccid, ttag, offset, length), 24, **kw)


def term(t, fes, fei, data=b""):
    return pdu(t, struct.pack("<HI", fes, fei), 24, data)


def connect_cmd_and_data(qid=0, sqsize=31, kato=120000, cntlid=0xFFFF,
                         subnqn=b"nqn.2026-11.dev.stager:default",
                         hostnqn=b"nqn.2014-08.org.nvmexpress:uuid:6b3f1a52-2a1e-4a53-9d0e-0d4c1f0e5a11"):
    c = bytearray(command(0x7F, 1, fctype=0x01, sgl_id=0x01, sgl_len=1024))
    struct.pack_into("<HHHBx I", c, 40, 0, qid, sqsize, 0, kato)
    d = bytearray(1024)
    d[0:16] = bytes(range(1, 17))
    struct.pack_into("<H", d, 16, cntlid)
    d[256:256 + len(subnqn)] = subnqn
    d[512:512 + len(hostnqn)] = hostnqn
    return bytes(c), bytes(d)


WRITE, READ, IDENTIFY, GET_LOG_PAGE = 0x01, 0x02, 0x06, 0x02
IN_CAPSULE, TRANSPORT = 0x01, 0x5A


def write_cmd(cid, nlb_blocks, data_len, in_capsule):
    return command(WRITE, cid, nsid=1, sgl_id=IN_CAPSULE if in_capsule else TRANSPORT, sgl_len=data_len,
                   cdw10_15=(0, 0, nlb_blocks - 1, 0, 0, 0))


def seeds_pdu_decode():
    ccmd, cdata = connect_cmd_and_data()
    out = {
        "icreq": icreq(),
        "icreq_digests": icreq(True, True, maxr2t=3),
        "icresp": icresp(True, False),
        "capsule_cmd": capsule_cmd(command(READ, 7, nsid=1, sgl_id=TRANSPORT, sgl_len=4096)),
        "capsule_cmd_hdgst": capsule_cmd(command(READ, 8, nsid=1, sgl_id=TRANSPORT, sgl_len=4096), hdgst=True),
        "capsule_cmd_connect": capsule_cmd(ccmd, cdata),
        "capsule_cmd_write_digests": capsule_cmd(write_cmd(9, 1, 512, True), bytes([0xA5]) * 512,
                                                 hdgst=True, ddgst=True),
        "capsule_cmd_write_ddgst": capsule_cmd(write_cmd(10, 1, 512, True), bytes(range(256)) * 2, ddgst=True),
        "capsule_cmd_write_pdo_pad": capsule_cmd(write_cmd(11, 1, 512, True), bytes(512), pad=8),
        "capsule_resp": capsule_resp(7),
        "capsule_resp_error": capsule_resp(7, status_field=(0x80 << 1) | 0x8000, hdgst=True),
        "h2c_data": data_pdu(H2C_DATA, 12, 1, 0, bytes([0x5A]) * 100),
        "h2c_data_digests": data_pdu(H2C_DATA, 12, 1, 4096, bytes([1, 2, 3, 4]) * 64, last=False,
                                     hdgst=True, ddgst=True),
        "c2h_data_success": data_pdu(C2H_DATA, 7, 0, 0, bytes(64), success=True),
        "r2t": r2t(12, 1, 0, 65536),
        "r2t_hdgst": r2t(12, 2, 65536, 4096, hdgst=True),
        "h2c_term_req": term(H2C_TERM, 1, 2, bytes(72)),
        "c2h_term_req": term(C2H_TERM, 2, 0),
    }
    return out


def seeds_pdu_stream():
    # First byte: low 2 bits pick the data limit (0: 8 KiB, 1: 128 KiB), the rest the chunk size.
    ccmd, cdata = connect_cmd_and_data()
    plain = (icreq() + capsule_cmd(ccmd, cdata)
             + capsule_cmd(command(READ, 2, nsid=1, sgl_id=TRANSPORT, sgl_len=4096))
             + capsule_cmd(write_cmd(3, 8, 4096, False))
             + data_pdu(H2C_DATA, 3, 1, 0, bytes([7]) * 2048, last=False)
             + data_pdu(H2C_DATA, 3, 1, 2048, bytes([8]) * 2048, last=True)
             + capsule_cmd(command(0x18, 4)))  # Keep Alive
    dg = (icreq(True, True) + capsule_cmd(ccmd, cdata, hdgst=True, ddgst=True)
          + capsule_cmd(write_cmd(5, 1, 512, True), bytes([3]) * 512, hdgst=True, ddgst=True)
          + data_pdu(H2C_DATA, 6, 2, 0, bytes([9]) * 256, hdgst=True, ddgst=True)
          + term(H2C_TERM, 1, 0))
    hdr_only = (icreq(True, False) + capsule_cmd(command(READ, 1, nsid=1, sgl_id=TRANSPORT, sgl_len=512), hdgst=True)
                + capsule_cmd(write_cmd(2, 1, 512, True), bytes(512), hdgst=True))
    return {
        "session_plain_whole": bytes([0x00 | 0xFC]) + plain,
        "session_plain_chunk7": bytes([(2 << 2) | 0]) + plain,
        "session_digests": bytes([(20 << 2) | 1]) + dg,
        "session_digests_bytewise": bytes([0 | 0]) + dg,
        "session_header_digest": bytes([(5 << 2) | 0]) + hdr_only,
        "bad_second_pdu": bytes([0x10]) + icreq() + bytes([0x42, 0, 24, 0, 24, 0, 0, 0]) + bytes(16),
    }


def seeds_rx_stream():
    # Byte 0: digests (bits 0-1), data limit (bits 2-3), header-sized receives (bit 4); byte 1:
    # buffer size (512 + 64 * b); byte 2: receive sizes - 1; then that many le16 sizes - 1.
    def cfg(bits, cap, sizes):
        return bytes([bits, cap, len(sizes) - 1]) + b"".join(struct.pack("<H", n - 1) for n in sizes)
    plain = (capsule_cmd(command(READ, 2, nsid=1, sgl_id=TRANSPORT, sgl_len=4096))
             + capsule_cmd(write_cmd(5, 1, 512, True), bytes([3]) * 512)
             + data_pdu(H2C_DATA, 3, 1, 0, bytes([7]) * 4096, last=False)
             + data_pdu(H2C_DATA, 3, 1, 4096, bytes([8]) * 4096, last=True)
             + capsule_cmd(write_cmd(6, 16, 8192, True), bytes([4]) * 8192))
    dg = (capsule_cmd(write_cmd(5, 1, 512, True), bytes([3]) * 512, hdgst=True, ddgst=True)
          + data_pdu(H2C_DATA, 6, 2, 0, bytes([9]) * 4096, hdgst=True, ddgst=True)
          + term(H2C_TERM, 1, 0))
    return {
        "plain_big_receives": cfg(0x00, 0, [65535]) + plain,
        "plain_byte_by_byte": cfg(0x00, 0, [1]) + plain,
        "plain_odd_sizes": cfg(0x04, 8, [7, 300, 13, 4097]) + plain,
        "plain_header_sized": cfg(0x10, 255, [65535]) + plain,
        "digests_header_sized": cfg(0x13, 2, [100, 28]) + dg,
        "digests_chunks": cfg(0x03, 40, [3, 1000]) + dg,
    }


def seeds_command_fields():
    ccmd, cdata = connect_cmd_and_data()
    # Identify Controller (only the fields ControllerInfo reads).
    ic = bytearray(4096)
    ic[4:24] = b"STG0123456789ABCDEF ".ljust(20)
    ic[24:64] = b"Stager".ljust(40)
    ic[64:72] = b"0.1.0".ljust(8)
    ic[77] = 8  # MDTS: 1 MiB
    struct.pack_into("<HI", ic, 78, 1, 0x00010400)
    ic[111] = 1
    struct.pack_into("<HI H", ic, 514, 128, 4, 0b1101)
    ic[525] = 1
    ic[768:768 + 30] = b"nqn.2026-11.dev.stager:default"
    struct.pack_into("<I", ic, 1792, (64 + 8192) // 16)
    # Identify Namespace: 262144 blocks of 4 KiB.
    ns = bytearray(4096)
    struct.pack_into("<QQQ", ns, 0, 262144, 262144, 262144)
    ns[104:120] = bytes(range(16))
    struct.pack_into("<I", ns, 128, 12 << 16)
    descs = bytearray(4096)
    descs[0:4] = bytes([2, 16, 0, 0])
    descs[4:20] = bytes(range(16))
    descs[20:24] = bytes([3, 16, 0, 0])
    descs[24:40] = bytes(range(16, 32))
    active = struct.pack("<4I", 1, 2, 7, 0) + bytes(64)

    def entry(subtype, nqn, port=b"4420", addr=b"127.0.0.1"):
        e = bytearray(1024)
        e[0:3] = bytes([3, 1, subtype])
        struct.pack_into("<HHH", e, 4, 1, 0xFFFF, 32)
        e[32:64] = port.ljust(32)
        e[256:256 + len(nqn)] = nqn
        e[512:768] = addr.ljust(256)
        return bytes(e)

    disc = bytearray(1024)
    struct.pack_into("<QQ", disc, 0, 5, 2)
    disc = (bytes(disc) + entry(3, b"nqn.2014-08.org.nvmexpress.discovery")
            + entry(2, b"nqn.2026-11.dev.stager:default"))
    smart = bytearray(512)
    smart[1:3] = struct.pack("<H", 300)
    smart[80:96] = (12345).to_bytes(16, "little")
    completion = struct.pack("<IIHHHH", 0x10001, 0, 5, 0, 7, (0x82 << 1) | (1 << 9) | 0x8000 | 1)
    identify = command(IDENTIFY, 3, nsid=1, sgl_id=TRANSPORT, sgl_len=4096, cdw10_15=(1, 0, 0, 0, 0, 0))
    glp = command(GET_LOG_PAGE, 4, nsid=0xFFFFFFFF, sgl_id=TRANSPORT, sgl_len=3072,
                  cdw10_15=(0x70 | ((3072 // 4 - 1) << 16), 0, 0, 0, 0, 0))
    rw = write_cmd(9, 256, 1 << 20, False)
    return {
        "connect": ccmd + cdata,
        "identify_controller": identify + bytes(ic),
        "identify_namespace": identify + bytes(ns),
        "ns_descriptors": identify + bytes(descs),
        "active_namespaces": identify + active,
        "discovery_log": glp + disc,
        "smart_log": glp + bytes(smart),
        "completion": rw + completion,
        "property_set_cc": command(0x7F, 2, fctype=0x00, cdw10_15=(0, 0x14, 0x460001, 0, 0, 0)),
    }


def seeds_config_parse():
    return {
        "empty.yaml": b"",
        "comment_only.yaml": b"# nothing here\n",
        "file_backend.yaml": b"""listeners:
  - { name: a, address: "0.0.0.0:4420" }
  - { name: b, transport: tcp, address: "[::1]:4421" }
reactors: { cores: [0], idle_poll_us: 0 }
transport: { max_queue_depth: 32, in_capsule_data_bytes: 0, max_h2c_data_bytes: 4 KiB, max_io_bytes: 8MiB }
subsystems:
  - nqn: nqn.2026-11.dev.stager:f
    serial: SN1
    hosts: [nqn.2014-08.org.nvmexpress:uuid:0f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a]
    listeners: [b]
    namespaces:
      - nsid: 1024
        uuid: 6F1C2D3E-0000-4000-8000-00000000ABCD
        backend: { kind: file, path: /dev/null, block_size: 512, direct: false }
""",
        "bad_size.yaml": b"""listeners: [{ name: tcp0, address: 127.0.0.1:4420 }]
subsystems:
  - nqn: nqn.2026-11.dev.stager:x
    allow_any_host: true
    namespaces:
      - { nsid: 1, backend: { kind: memory, size: 64MB } }
""",
        "anchors.yaml": b"""base: &b { kind: memory, size: 1MiB }
listeners: [{ name: tcp0, address: 127.0.0.1:0 }]
subsystems:
  - nqn: nqn.2026-11.dev.stager:y
    allow_any_host: true
    namespaces: [{ nsid: 1, backend: *b }, { nsid: 2, backend: { <<: *b, block_size: 512 } }]
""",
    }


# ---- fabric frames (rdma/src/wire/frame.rs)
F_WRITE, F_MSG, F_HEARTBEAT, F_ACK, F_IMM = 1, 2, 3, 4, 0x01


def fabric_write(key, offset, data, imm=None):
    flags = F_IMM if imm is not None else 0
    return struct.pack("<BBHIIIQ", F_WRITE, flags, 0, len(data), key, imm or 0, offset) + data


def fabric_msg(body):
    return struct.pack("<BBHI", F_MSG, 0, 0, len(body)) + body


def fabric_heartbeat():
    return struct.pack("<BBHI", F_HEARTBEAT, 0, 0, 0)


def fabric_ack(count):
    return struct.pack("<BBHIII", F_ACK, 0, 0, 0, count, 0)


def seeds_fabric_frame():
    key = struct.pack("<IQQ", 0x1234, 0, 1 << 20)  # a RemoteKey first: key, addr, len
    return {
        "key_then_write_imm": key + fabric_write(0x1234, 4096, bytes(range(64)), imm=7),
        "writes_acks_heartbeats": fabric_write(9, 0, b"abc") + fabric_ack(1) + fabric_heartbeat()
        + fabric_write(9, 8, b"", imm=0) + fabric_ack(2),
        "messages": fabric_msg(b"") + fabric_msg(b"KEY" + key) + fabric_msg(b"x" * 300),
        "cut_write": fabric_write(5, 0, b"0123456789")[:30],
        "bad_type": fabric_heartbeat() + struct.pack("<BBHI", 9, 0, 0, 0),
        "stray_imm": struct.pack("<BBHIIIQ", F_WRITE, 0, 0, 0, 1, 5, 0),
    }


# ---- fabric set-up messages (rdma/src/wire/setup.rs)
S_HELLO, S_CHALLENGE, S_PROOF, S_WELCOME, S_REFUSED, S_VERBS_INFO, S_READY = 1, 2, 3, 4, 5, 6, 7


def setup_msg(t, body):
    return struct.pack("<HB", len(body) + 1, t) + body


def hello(node, kind=1, version=1):
    return setup_msg(S_HELLO, b"STGF" + bytes([version, kind]) + bytes(range(32)) + bytes([len(node)]) + node)


def challenge(node, kind=1):
    return setup_msg(S_CHALLENGE, bytes([kind]) + bytes(32) + bytes([0xAB] * 32) + bytes([len(node)]) + node)


def seeds_fabric_setup():
    verbs = struct.pack("<IIHB", 0x11, 0xABCDEF, 0, 3) + bytes([0] * 10 + [0xFF, 0xFF, 10, 11, 0, 1])
    return {
        "client_side": hello(b"node-a") + setup_msg(S_PROOF, bytes(32)),
        "server_side": challenge(b"node-b") + setup_msg(S_WELCOME, b""),
        "verbs": hello(b"a", kind=2) + challenge(b"b", kind=2) + setup_msg(S_PROOF, bytes(32))
        + setup_msg(S_WELCOME, b"") + setup_msg(S_VERBS_INFO, verbs) + setup_msg(S_READY, b""),
        "refused": setup_msg(S_REFUSED, b"node 'x' is not in the peers of node 'b'"),
        "bad_magic": setup_msg(S_HELLO, b"XXXX" + bytes(40)),
    }


# ---- replica records, acknowledgements, publications (policy/src/replica/wire.rs)

def entry_header(kind, volume, blocks, epoch, seq, lba, data_crc):
    b = struct.pack("<IBBHIIQQQI", 0x454C5453, 2, kind, 0, volume, blocks, epoch, seq, lba, data_crc) + bytes(16)
    return b + struct.pack("<I", crc32c(b))


def record(entries, volume=7, epoch=3, pos=0, rec=1, data=b""):
    heads = b"".join(entries)
    count = len(entries)
    length = 64 + len(heads) + len(data)
    length = (length + 63) // 64 * 64
    first_seq = struct.unpack_from("<Q", entries[0], 24)[0] if entries else 1
    h = struct.pack("<IBBHIIQQQQ", 0x52525453, 1, 0, count, volume, length, epoch, pos, rec, first_seq) + bytes(12)
    crc = crc32c(h + heads)
    return h + struct.pack("<I", crc) + heads + data


def block64(magic, fields_at):
    b = bytearray(64)
    struct.pack_into("<IB", b, 0, magic, 1)
    for off, fmt, v in fields_at:
        struct.pack_into(fmt, b, off, v)
    struct.pack_into("<I", b, 60, crc32c(bytes(b[:60])))
    return bytes(b)


def seeds_replica_frame():
    data = bytes([0x5A]) * 4096
    one = record([entry_header(1, 7, 1, 3, 10, 80, crc32c(data))], data=data)
    three = record(
        [entry_header(1, 7, 1, 3, 11, 8, crc32c(data)), entry_header(2, 7, 64, 3, 12, 0, 0),
         entry_header(3, 7, 8, 3, 13, 100, 0)],
        pos=4096 * 3, rec=2, data=data)
    ack = block64(0x41525453, [(8, "<I", 7), (16, "<Q", 3), (24, "<Q", 13), (32, "<Q", 12480), (40, "<Q", 9), (48, "<Q", 4)])
    pub = block64(0x50525453, [(5, "<B", 1), (8, "<I", 7), (16, "<Q", 3), (24, "<Q", 9), (32, "<Q", 2)])
    return {
        "record_one_write": one,
        "record_write_zeroes_unmap": three,
        "record_gap": record([entry_header(1, 7, 1, 3, 11, 8, 0), entry_header(1, 7, 1, 3, 13, 9, 0)], data=bytes(8192)),
        "record_cut": one[:100],
        "ack": ack,
        "publish": pub,
        "ctl_open": b'{"msg":"open","volume":7,"blocks":262144,"epoch":3,"ring_bytes":33554432,"ack_key":"' + b"00" * 20 + b'"}',
        "ctl_opened": b'{"msg":"opened","durable":12,"watermark":9,"epoch":3,"ring_key":"' + b"ab" * 20 + b'"}',
        "ctl_refused": b'{"msg":"refused","why":"stale epoch 2"}',
    }


def seeds_log_damage():
    def case(seed, rots):
        return struct.pack("<H", seed) + b"".join(struct.pack("<IHB", at, ln, x) for at, ln, x in rots)
    return {
        "one_byte": case(1, [(0x40000000, 1, 0x01)]),
        "a_sector": case(2, [(0x80000000, 512, 0xFF)]),
        "garbage_64k": case(3, [(0x20000000, 65535, 0x5A)]),
        "three": case(4, [(0x10000000, 1, 0x80), (0x90000000, 2048, 0x11), (0xC0000000, 7, 0x33)]),
    }


def write(target, files):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    for name, content in files.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(content)
    print(f"{target}: {len(files)} seeds in {os.path.relpath(d)}")


if __name__ == "__main__":
    write("pdu_decode", seeds_pdu_decode())
    write("pdu_stream", seeds_pdu_stream())
    write("rx_stream", seeds_rx_stream())
    write("command_fields", seeds_command_fields())
    write("config_parse", seeds_config_parse())
    write("fabric_frame", seeds_fabric_frame())
    write("fabric_setup", seeds_fabric_setup())
    write("replica_frame", seeds_replica_frame())
    write("log_damage", seeds_log_damage())
