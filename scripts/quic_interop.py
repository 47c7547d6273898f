"""QUIC interop with an independent stack: aioquic (Python) against a Fabric node.

Connects two peers with ALPN fabric/1, pins the node's certificate by its SHA-256 (the same
fingerprint `fabric serve` prints), says hello on the control stream, sends a direct message
from one to the other, and waits for its durable ok and its delivery. Frames are a 4-byte
little-endian length, then postcard; the few postcard shapes needed are written out below
(varints for integers and lengths, enum variants by index), which is the documented format
(docs/PROTOCOL.md, "QUIC").

usage: quic_interop.py HOST PORT PIN MESH PEER_A TOKEN_A PEER_B TOKEN_B
"""

import asyncio
import hashlib
import ssl
import struct
import sys

from aioquic.asyncio import connect
from cryptography.hazmat.primitives.serialization import Encoding
from aioquic.quic.configuration import QuicConfiguration

TIMEOUT_S = 10


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def text(s):
    b = s.encode()
    return varint(len(b)) + b


def frame(payload):
    return struct.pack("<I", len(payload)) + payload


# ClientOp variants (the enum's order is the wire format).
def hello(mesh, peer, token):
    return frame(varint(0) + text(mesh) + text(peer) + text(token))


def send(r, to_peer, body_json):
    # Send { r, to: Target::Peer(to), body: Body(bytes) }
    return frame(varint(1) + varint(r) + varint(0) + text(to_peer) + text(body_json))


class Reader:
    def __init__(self, data):
        self.d, self.i = data, 0

    def varint(self):
        n, shift = 0, 0
        while True:
            b = self.d[self.i]
            self.i += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n

    def text(self):
        n = self.varint()
        s = self.d[self.i : self.i + n]
        self.i += n
        return s.decode()

    def option(self):
        tag = self.d[self.i]
        self.i += 1
        return self.varint() if tag == 1 else None


def decode_server(payload):
    """The ServerOps this test expects: welcome (0), ok (1), deliver (2), error (5)."""
    r = Reader(payload)
    v = r.varint()
    if v == 0:
        return ("welcome", r.varint(), r.varint(), r.varint())
    if v == 1:
        ref = r.varint()
        pos = r.option()
        seq = r.option()
        return ("ok", ref, pos, seq)
    if v == 2:
        pos = r.varint()
        frm = r.text()
        target = r.varint()
        to = r.text() if target in (0, 1) else "*"
        body = r.text()
        return ("deliver", pos, frm, to, body)
    if v == 5:
        ref = r.option()
        code = r.varint()
        return ("error", ref, code, r.text())
    return ("other", v)


async def read_frame(reader):
    n = struct.unpack("<I", await reader.readexactly(4))[0]
    return decode_server(await reader.readexactly(n))


async def peer(host, port, pin, mesh, name, token):
    config = QuicConfiguration(is_client=True, alpn_protocols=["fabric/1"])
    # Trust by pin, as Fabric's own clients do: no CA, then compare the leaf's SHA-256.
    config.verify_mode = ssl.CERT_NONE
    cm = connect(host, port, configuration=config)
    protocol = await cm.__aenter__()
    cert = protocol._quic.tls._peer_certificate
    der = cert.public_bytes(Encoding.DER)
    got = hashlib.sha256(der).hexdigest()
    if got != pin.replace(":", "").lower():
        raise SystemExit(f"certificate pin mismatch: {got}")
    if protocol._quic.tls.alpn_negotiated != "fabric/1":
        raise SystemExit(f"ALPN {protocol._quic.tls.alpn_negotiated!r}")
    reader, writer = await protocol.create_stream()
    writer.write(hello(mesh, name, token))
    welcome = await asyncio.wait_for(read_frame(reader), TIMEOUT_S)
    if welcome[0] != "welcome":
        raise SystemExit(f"{name}: expected welcome, got {welcome}")
    return cm, reader, writer


async def main():
    host, port, pin, mesh, a, ta, b, tb = sys.argv[1:9]
    port = int(port)
    cm_b, rb, _wb = await peer(host, port, pin, mesh, b, tb)
    cm_a, ra, wa = await peer(host, port, pin, mesh, a, ta)
    wa.write(send(1, b, '{"text":"hello over aioquic"}'))
    ok = await asyncio.wait_for(read_frame(ra), TIMEOUT_S)
    if ok[0] != "ok" or ok[1] != 1 or ok[2] is None:
        raise SystemExit(f"expected ok with pos, got {ok}")
    delivered = await asyncio.wait_for(read_frame(rb), TIMEOUT_S)
    if delivered[0] != "deliver" or delivered[1] != ok[2] or delivered[2] != a:
        raise SystemExit(f"expected the delivery of pos {ok[2]}, got {delivered}")
    if '"hello over aioquic"' not in delivered[4]:
        raise SystemExit(f"body changed: {delivered[4]}")
    print(f"quic interop ok: aioquic sent pos {ok[2]} and received it as {b}")
    for cm in (cm_a, cm_b):
        await cm.__aexit__(None, None, None)


asyncio.run(main())
