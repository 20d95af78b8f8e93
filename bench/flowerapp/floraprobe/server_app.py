"""ServerApp: per size and repeat, one upload and one download through the SuperLink.

Upload: the ClientApp stamps its reply just before returning it; the ServerApp pulls replies in a
tight loop (every 5 ms, rather than ``send_and_receive``'s own interval) and stamps the arrival.
Download: stamped before ``push_messages``, and by the ClientApp when its function is entered.
Each transfer's window (start, end) is written too, so that bench/peers.py can find the
SuperLink's memory peak inside it; three 4-byte transfers give the fixed cost per message. Results: one JSON file at the run config's ``out``.
"""

import json
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()
MiB = 1 << 20
POLL_S = 0.005


def _exchange(grid: Grid, node: int, kind: str, content: RecordDict) -> tuple[float, float, Message]:
    """Push one message, pull its reply: (wall time before the push, wall time of arrival, reply)."""
    start = time.time()
    (message_id,) = grid.push_messages([Message(content, dst_node_id=node, message_type=f"query.{kind}")])
    while True:
        replies = list(grid.pull_messages([message_id]))
        if replies:
            end = time.time()
            reply = replies[0]
            if reply.has_error():
                raise RuntimeError(f"{kind}: the ClientApp failed: {reply.error}")
            return start, end, reply
        time.sleep(POLL_S)


def _transfer(grid: Grid, node: int, size: int) -> dict:
    start, end, reply = _exchange(grid, node, "upload", RecordDict({"ask": ConfigRecord({"bytes": size})}))
    got = sum(int(a.numpy().nbytes) for a in reply.content["lora"].values())
    sample = {"bytes": size, "up_bytes": got, "up_s": end - float(reply.content["stamp"]["sent_at"]),
              "up_window": [start, end]}
    payload = np.random.default_rng(size + 1).random(size // 4, dtype=np.float32)
    start, end, reply = _exchange(grid, node, "download", RecordDict({"lora": ArrayRecord(numpy_ndarrays=[payload])}))
    stamp = reply.content["stamp"]
    sample.update(down_bytes=int(stamp["bytes"]), down_s=float(stamp["got_at"]) - start, down_window=[start, end])
    return sample


@app.main()
def main(grid: Grid, context: Context) -> None:
    """A warm-up of each size, then ``repeats`` rounds of every size, interleaved."""
    sizes = [int(float(s) * MiB) for s in str(context.run_config["sizes-mib"]).split(",")]
    repeats = int(context.run_config["repeats"])
    while not (nodes := list(grid.get_node_ids())):
        time.sleep(0.2)
    node = nodes[0]
    samples = [{**_transfer(grid, node, size), "warmup": True} for size in sizes]
    samples += [{**_transfer(grid, node, size), "warmup": False} for _ in range(repeats) for size in sizes]
    # The fixed cost of a message through the runtime, whatever its size: 4-byte payloads both ways.
    empty = [_transfer(grid, node, 4) for _ in range(3)]
    result = {"samples": samples, "empty": empty}
    with open(str(context.run_config["out"]), "w") as out:
        json.dump(result, out)
