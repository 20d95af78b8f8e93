"""ClientApp: answers "upload" with an array of the asked size, and "download" with a receipt.

Wall-clock stamps (``time.time()``; every process runs on the same machine) mark where a
payload leaves or reaches the ClientApp: the ServerApp subtracts them from its own.
"""

import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query("upload")
def upload(msg: Message, context: Context) -> Message:
    """Build the asked number of float32 bytes, then stamp and return them (the build is untimed)."""
    size = int(msg.content["ask"]["bytes"])
    payload = np.random.default_rng(size).random(size // 4, dtype=np.float32)
    stamp = ConfigRecord({"sent_at": time.time()})
    return Message(RecordDict({"lora": ArrayRecord(numpy_ndarrays=[payload], keep_input=False), "stamp": stamp}),
                   reply_to=msg)


@app.query("download")
def download(msg: Message, context: Context) -> Message:
    """Stamp the arrival of the ServerApp's payload and say how many bytes came."""
    got_at = time.time()
    received = sum(int(array.numpy().nbytes) for array in msg.content["lora"].values())
    return Message(RecordDict({"stamp": ConfigRecord({"got_at": got_at, "bytes": received})}), reply_to=msg)
