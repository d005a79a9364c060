#!/usr/bin/env python3
"""Sequential Python peer: the original, naive service flow the Rust tool replaces.

For each image in turn, as the old per-request service did: download the
model and labels again, build a fresh LiteRT interpreter (--threads CPU
threads), download the image, decode and resize it, infer and print one JSON
line (the Rust tool's format). Nothing is cached or overlapped, on purpose.

    python3 bench/peer_sequential.py --model URL --labels URL [--threads 2] \
        [--concurrency 16] IMAGE_URL...

--concurrency is accepted (same CLI as peer_litert.py) and ignored.
"""
import peer_common as pc


def main():
    args = pc.parse_args(__doc__)
    for url in args.images:
        try:
            # Everything per image, because each request of the old service
            # started from scratch.
            interp = pc.make_interpreter(pc.fetch(args.model), args.threads)
            labels = pc.parse_labels(pc.fetch(args.labels))
            batch = pc.preprocess(pc.fetch(url), interp.get_input_details()[0])
            print(pc.result_line(url, pc.infer(interp, batch), labels), flush=True)
        except Exception as exc:  # a failure costs this image only
            print(pc.error_line(url, exc), flush=True)


if __name__ == "__main__":
    main()
