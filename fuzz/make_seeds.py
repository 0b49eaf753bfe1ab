#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora into fuzz/seeds/<target>/.

Seeds are the inputs each target sees in real life (firmware DHCP packets,
TFTP requests with options, windowed uploads, multicast joins and ACKs,
iPXE's HTTP requests), so that a short run in CI starts from the shapes
that matter instead of from nothing. The files are committed; run this
again after changing it: `python3 fuzz/make_seeds.py`. Files named
regression-* are inputs that once crashed a target (each also a unit test);
they are kept by hand, not written here.
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    directory = os.path.join(HERE, "seeds", target)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)


# ---- DHCP (RFC 2131 / 2132, PXE options 60, 93, 94, 97, iPXE's 77) ----

def dhcp(mac, options, ciaddr=b"\0" * 4, giaddr=b"\0" * 4, flags=0):
    p = bytes([1, 1, 6, 0]) + struct.pack(">IHH", 0x12345678, 4, flags)
    p += ciaddr + b"\0" * 4 + b"\0" * 4 + giaddr
    p += mac + b"\0" * 10 + b"\0" * 64 + b"\0" * 128
    p += bytes([99, 130, 83, 99])
    for code, value in options:
        p += bytes([code, len(value)]) + value
    return p + b"\xff"


MAC = bytes([0x52, 0x54, 0x00, 0x12, 0x34, 0x56])
OTHER = bytes([0x02, 0, 0, 0, 0, 9])
PXE = [(60, b"PXEClient:Arch:00000:UNDI:002001"), (93, b"\0\0"), (94, b"\1\2\1"),
       (97, b"\0" + bytes(range(16)))]
SERVER = bytes([10, 0, 0, 1])
SEP = b"\xfe\xfe"
discover = dhcp(MAC, [(53, b"\1")] + PXE, flags=0x8000)
request = dhcp(MAC, [(53, b"\3"), (50, bytes([10, 0, 0, 150])), (54, SERVER)] + PXE)
ipxe = dhcp(OTHER, [(53, b"\1"), (60, b"PXEClient:Arch:00007:UNDI:003016"), (93, b"\0\7"),
                    (77, b"iPXE")])
init_reboot = dhcp(OTHER, [(53, b"\3"), (50, bytes([10, 0, 0, 101]))])
relayed = dhcp(OTHER, [(53, b"\1")], giaddr=bytes([10, 9, 0, 1]))
decline = dhcp(MAC, [(53, b"\4"), (50, bytes([10, 0, 0, 150])), (54, SERVER)])
release = dhcp(MAC, [(53, b"\7")], ciaddr=bytes([10, 0, 0, 150]))
inform = dhcp(OTHER, [(53, b"\x08")], ciaddr=bytes([10, 0, 0, 77]))
write("dhcp_decide", "dora", SEP.join([discover, request]))
write("dhcp_decide", "ipxe_then_init_reboot", SEP.join([ipxe, init_reboot, relayed]))
write("dhcp_decide", "decline_release_inform", SEP.join([discover, request, decline, release, inform]))
write("dhcp_decide", "uefi_http", dhcp(OTHER, [(53, b"\1"), (60, b"HTTPClient:Arch:00016:UNDI:003001"),
                                            (93, b"\0\x10")]))

# ---- TFTP (RFC 1350, 2347-2349, 7440, 2090) ----

def rrq(name, mode=b"octet", options=()):
    p = b"\0\1" + name + b"\0" + mode + b"\0"
    for key, value in options:
        p += key + b"\0" + value + b"\0"
    return p


def wrq(name, options=()):
    return b"\0\2" + rrq(name, b"octet", options)[2:]


def data(block, payload):
    return b"\0\3" + struct.pack(">H", block) + payload


def ack(block):
    return b"\0\4" + struct.pack(">H", block)


write("tftp_packet", "rrq_options", rrq(b"pxelinux.0", options=[(b"blksize", b"1468"), (b"tsize", b"0"),
                                                                (b"windowsize", b"8"), (b"timeout", b"2")]))
write("tftp_packet", "rrq_then_acks", rrq(b"undionly.kpxe") + b"\xff" + ack(0) + b"\xff" + ack(1))
write("tftp_packet", "multicast", rrq(b"vmlinuz", options=[(b"multicast", b"")]))
write("tftp_packet", "error", b"\0\5\0\1file not found\0")

write("tftp_write_netascii", "wrq_two_blocks",
      wrq(b"upload.bin", [(b"blksize", b"16")]) + b"\xff" + data(1, b"a" * 16) + b"\xff" + data(2, b"end"))
write("tftp_write_netascii", "wrq_lockstep", wrq(b"log.txt") + b"\xff" + data(1, b"line one\nline two\r\n"))
write("tftp_write_netascii", "netascii_text", b"\x0f\x03" + b"menu\nlabel linux\r\n  kernel vmlinuz\r\r\n\n")

# op (join 0, ack 1, error 2, timeout 3, stranger 4), who, argument
ops = bytes([20, 0, 1, 0, 0, 2, 0, 3, 0, 60, 1, 1, 1, 0, 1, 2, 1, 1, 3, 3, 0, 200, 2, 2, 0, 4, 9, 9, 1, 2, 5])
write("multicast_session", "join_ack_timeout", ops)
write("multicast_session", "master_leaves", bytes([3, 0, 1, 0, 0, 2, 0, 2, 0, 1, 2, 1, 3, 0, 250, 3, 0, 250]))

# ---- HTTP (what iPXE, UEFI HTTP boot and curl send) ----

write("http_request", "ipxe_script", b"GET /boot/52%3A54%3A00%3A12%3A34%3A56.ipxe?uuid=x&serial=S1 HTTP/1.1\r\n"
      b"Connection: keep-alive\r\nUser-Agent: iPXE/1.21.1\r\nHost: 10.0.0.1\r\n\r\n")
write("http_request", "range", b"GET /debian12/vmlinuz HTTP/1.1\r\nHost: h\r\nRange: bytes=0-99,200-\r\n"
      b"If-Range: \"x\"\r\n\r\n")
write("http_request", "pipelined", b"HEAD /boot.ipxe HTTP/1.1\r\nHost: h\r\n\r\nGET /api/v1/events HTTP/1.0\r\n\r\n")
write("boot_names_and_ranges", "mac", b"52-54-00-12-34-56")
write("boot_names_and_ranges", "pxelinux", b"01-52-54-00-12-34-56")
write("boot_names_and_ranges", "range", b"bytes=0-0,-5\n\"x\"")
