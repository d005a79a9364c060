"""A DNS server for the container smoke test, on 127.0.0.1:53 (UDP).

    python3 .ci/loopback-dns.py NAME...

Answers A queries for the NAMEs with 127.0.0.1, other queries for them with
no records, and every other name with NXDOMAIN, so that a name it does not
know can only come from /etc/hosts."""
import socket
import struct
import sys

names = {name.lower().rstrip(".") for name in sys.argv[1:]}
server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
server.bind(("127.0.0.1", 53))
while True:
    query, client = server.recvfrom(512)
    try:
        labels, end = [], 12
        while query[end]:
            labels.append(query[end + 1 : end + 1 + query[end]].decode("ascii"))
            end += 1 + query[end]
        (qtype,) = struct.unpack(">H", query[end + 1 : end + 3])
    except (IndexError, UnicodeDecodeError, struct.error):
        continue
    question = query[12 : end + 5]
    known = ".".join(labels).lower() in names
    answers = 1 if known and qtype == 1 else 0
    # A response, recursion desired and available; NXDOMAIN for unknown names.
    flags = 0x8180 if known else 0x8183
    reply = query[:2] + struct.pack(">HHHHH", flags, 1, answers, 0, 0) + question
    if answers:
        # The name by a pointer to the question, type A, class IN, TTL 60.
        reply += b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton("127.0.0.1")
    server.sendto(reply, client)
