"""A DNS server for the container smoke test: answers every A query on
127.0.0.1:53 (UDP) with 127.0.0.1, and any other query with no records, so
that the image's resolver can be seen to go through /etc/resolv.conf."""
import socket
import struct

server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
server.bind(("127.0.0.1", 53))
while True:
    query, client = server.recvfrom(512)
    ident = query[:2]
    end = 12
    while query[end]:
        end += 1 + query[end]
    question = query[12 : end + 5]
    (qtype,) = struct.unpack(">H", query[end + 1 : end + 3])
    answers = 1 if qtype == 1 else 0
    # A response, recursion desired and available, no error; one question.
    reply = ident + struct.pack(">HHHHH", 0x8180, 1, answers, 0, 0) + question
    if answers:
        # The name by a pointer to the question, type A, class IN, TTL 60.
        reply += b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton("127.0.0.1")
    server.sendto(reply, client)
