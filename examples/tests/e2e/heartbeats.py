#!/usr/bin/env python3
"""Heartbeat capture, replay and forgery for the wspare e2e test.

capture IFACE PORT OUT SECONDS
    Records the payloads of UDP datagrams to PORT seen on IFACE (an
    AF_PACKET socket: the genuine heartbeats as they arrive), one hex line
    each, into OUT.
send DST PORT IN MODE COUNT RATE
    Sends COUNT datagrams built from the captured ones in IN, RATE per
    second, to DST:PORT. MODE:
      replay    the captured datagrams as they are
      tamper    a captured datagram with one body byte changed (tag kept)
      forge     a new body claiming a later boot and a take-over view of
                every pair (epoch 99, the recipient active, a hand-over),
                tagged with a key that is not the cluster's
      junk      random bytes
"""
import hashlib
import hmac
import json
import os
import socket
import struct
import sys
import time

HEADER = 37  # "WSHB" | version | 32-byte tag


def capture(iface, port, out, seconds):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0800))
    s.bind((iface, 0))
    s.settimeout(0.2)
    end = time.time() + seconds
    seen = []
    while time.time() < end:
        try:
            frame = s.recv(70000)
        except socket.timeout:
            continue
        ip = frame[14:]
        if len(ip) < 20 or ip[9] != 17:
            continue
        ihl = (ip[0] & 15) * 4
        udp = ip[ihl:]
        if len(udp) < 8 or struct.unpack("!H", udp[2:4])[0] != port:
            continue
        payload = udp[8:]
        if payload[:4] == b"WSHB":
            seen.append(payload.hex())
    with open(out, "w") as f:
        f.write("\n".join(seen))
    print(len(seen))


def forge(genuine):
    body = json.loads(genuine[HEADER:])
    body["boot"] += 1000
    body["seq"] = 1
    body["sent-ms"] = int(time.time() * 1000)
    for view in body["views"]:
        v = view[1]
        v["epoch"] = 99
        v["active"] = body["to"]
        v["handover"] = 1
    raw = json.dumps(body, separators=(",", ":")).encode()
    tag = hmac.new(os.urandom(32), b"WSHB" + bytes([1]) + raw, hashlib.sha256).digest()
    return b"WSHB" + bytes([1]) + tag + raw


def send(dst, port, infile, mode, count, rate):
    pkts = [bytes.fromhex(l) for l in open(infile).read().split()]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(count):
        p = pkts[i % len(pkts)]
        if mode == "tamper":
            p = bytearray(p)
            p[-5] ^= 0x01
            p = bytes(p)
        elif mode == "forge":
            p = forge(p)
        elif mode == "junk":
            p = os.urandom(64 + i % 200)
        s.sendto(p, (dst, port))
        time.sleep(1.0 / rate)
    print(count)


if __name__ == "__main__":
    if sys.argv[1] == "capture":
        capture(sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5]))
    else:
        send(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6]), float(sys.argv[7]))
