#!/usr/bin/env python3
"""Python LiteRT peer: what a good Python engineer would ship for the same job.

Downloads the model, the labels and every image concurrently, builds one
LiteRT interpreter (XNNPACK, --threads CPU threads) as soon as the model has
arrived, decodes images in the download threads as they arrive, runs them
through the interpreter one at a time in the order they become ready, and
prints one JSON line per image in command-line order (the Rust tool's format).

    python3 bench/peer_litert.py --model URL --labels URL [--threads 2] \
        [--concurrency 16] IMAGE_URL...
"""
import sys
from concurrent.futures import Future, ThreadPoolExecutor, as_completed

import peer_common as pc


def main():
    args = pc.parse_args(__doc__)
    # Workers wait on this for the model's input size before decoding; the
    # main thread fills it once the interpreter exists.
    input_ready = Future()

    def load(url):
        data = pc.fetch(url)
        return pc.preprocess(data, input_ready.result())

    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        # Model and labels are submitted first: the pool runs tasks in order,
        # so they get threads before any image task can block on input_ready.
        model_f = pool.submit(pc.fetch, args.model)
        labels_f = pool.submit(pc.fetch, args.labels)
        image_fs = {pool.submit(load, url): i for i, url in enumerate(args.images)}

        try:
            interp = pc.make_interpreter(model_f.result(), args.threads)
            input_ready.set_result(interp.get_input_details()[0])
            labels = pc.parse_labels(labels_f.result())
        except Exception as exc:
            # Unblock the image workers so the pool can shut down, then give up:
            # nothing can be classified without the model and its labels.
            if not input_ready.done():
                input_ready.set_exception(exc)
            for f in image_fs:
                f.cancel()
            sys.exit(f"peer_litert: cannot load model or labels: {pc.describe(exc)}")

        # One inference loop in this thread (the interpreter is not thread-safe);
        # lines are buffered and flushed as soon as the next one in order is done.
        lines = [None] * len(args.images)
        next_out = 0
        for f in as_completed(image_fs):
            i = image_fs[f]
            url = args.images[i]
            try:
                lines[i] = pc.result_line(url, pc.infer(interp, f.result()), labels)
            except Exception as exc:  # a bad image must not stop the others
                lines[i] = pc.error_line(url, exc)
            while next_out < len(lines) and lines[next_out] is not None:
                print(lines[next_out], flush=True)
                next_out += 1


if __name__ == "__main__":
    main()
